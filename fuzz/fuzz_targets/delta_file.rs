//! Delta files (`shale export --from`): validation and record reading.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::transfer::delta::{validate, DeltaReader};

fuzz_target!(|data: &[u8]| {
    let _ = validate(data);
    if let Ok(mut r) = DeltaReader::new(data) {
        let mut buf = Vec::new();
        for _ in 0..1024 {
            match r.next_record(&mut buf) {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
});
