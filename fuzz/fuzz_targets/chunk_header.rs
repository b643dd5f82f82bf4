//! Chunk object headers and extent tables.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::engine::format::chunk::decode_header;
use shale::engine::format::layout::parse_chunk_name;

fuzz_target!(|data: &[u8]| {
    let _ = decode_header(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = parse_chunk_name(s);
    }
});
