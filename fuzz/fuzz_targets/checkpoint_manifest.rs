//! Checkpoint objects and manifests.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::engine::checkpoint::{Checkpoint, Manifest};

fuzz_target!(|data: &[u8]| {
    let _ = Checkpoint::decode(data);
    let _ = serde_json::from_slice::<Manifest>(data);
});
