//! Snapshot objects (frozen maps) and snapshot names.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::catalog::snapshot::parse_spec;
use shale::engine::snapshot::SnapshotObject;

fuzz_target!(|data: &[u8]| {
    let _ = SnapshotObject::decode(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_spec(s);
    }
});
