//! Local state files of the ublk frontend: device run-state records and
//! /proc/self/mountinfo.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::frontend::ublk::mountns::parse_mountinfo;
use shale::frontend::ublk::runstate::DeviceRecord;

fuzz_target!(|data: &[u8]| {
    let _ = serde_json::from_slice::<DeviceRecord>(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_mountinfo(s);
    }
});
