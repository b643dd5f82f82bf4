//! Checkpoint objects and manifests.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::engine::checkpoint::{Checkpoint, Manifest};

fuzz_target!(|data: &[u8]| {
    // Both formats (binary SHALECP2, JSON SHALECP1); a decoded map is
    // rebuilt too, which checks every number against the others.
    if let Ok(cp) = Checkpoint::decode(data) {
        let _ = cp.to_map(1 << 40);
    }
    let _ = serde_json::from_slice::<Manifest>(data);
});
