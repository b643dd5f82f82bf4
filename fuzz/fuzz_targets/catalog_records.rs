//! Catalog objects read from the store: volume records, the id counter,
//! lease records, published usage, and a volume directory's identity file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::catalog::lease::LeaseRecord;
use shale::catalog::local_dir::LocalIdentity;
use shale::catalog::{NextId, VolumeRecord};
use shale::engine::usage::VolumeUsage;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<VolumeRecord>(data);
    let _ = serde_json::from_slice::<NextId>(data);
    let _ = serde_json::from_slice::<LeaseRecord>(data);
    let _ = serde_json::from_slice::<VolumeUsage>(data);
    let _ = serde_json::from_slice::<LocalIdentity>(data);
});
