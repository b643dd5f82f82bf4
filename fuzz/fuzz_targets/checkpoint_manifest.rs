//! Checkpoint objects (full and delta) and manifests.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::engine::checkpoint::delta::{Chain, CheckpointObject};
use shale::engine::checkpoint::Checkpoint;
use shale::engine::format::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    // Every format (binary SHALECP2 full and delta, JSON SHALECP1); a
    // decoded map is rebuilt too, and a delta applied over an empty base,
    // which checks every number against the others.
    match CheckpointObject::decode(data) {
        Ok(CheckpointObject::Full(cp)) => {
            let _ = cp.to_map(1 << 40);
        }
        Ok(CheckpointObject::Delta(d)) => {
            let base = Checkpoint::empty(d.body.volume, 0, 0);
            if let Ok(mut chain) = Chain::from_base(base, 1 << 40) {
                if chain.apply(&d).is_ok() {
                    let _ = chain.finish();
                }
            }
        }
        Err(_) => {}
    }
    let _ = serde_json::from_slice::<Manifest>(data);
});
