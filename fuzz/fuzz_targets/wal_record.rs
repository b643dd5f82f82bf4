//! WAL segment header and record decoding at every offset of a buffer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::engine::wal::record::decode_at;
use shale::engine::wal::segment;

fuzz_target!(|data: &[u8]| {
    let _ = segment::decode(data);
    let mut pos = 0;
    while pos < data.len() {
        match decode_at(data, pos) {
            Ok((_, range)) => {
                assert!(range.end <= data.len() && range.start >= pos);
                pos = range.end.max(pos + 1);
            }
            Err(_) => pos += 1,
        }
    }
});
