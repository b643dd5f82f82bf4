//! NBD wire decoders: request headers (and what the server decides to do
//! with them under every combination of negotiated features), option
//! headers, NBD_OPT_INFO/GO and metadata context option data, simple
//! replies, structured reply chunks and block status spans.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::frontend::nbd::codec::*;

fuzz_target!(|data: &[u8]| {
    if let Some(hdr) = data.get(..REQUEST_LEN) {
        let hdr: &[u8; REQUEST_LEN] = hdr.try_into().unwrap();
        if let Ok(req) = Request::decode(hdr) {
            assert_eq!(Request::decode(&req.encode()), Ok(req));
            for (structured, allocation) in [(false, false), (true, false), (true, true)] {
                let _ = classify(&req, Features { structured, allocation });
            }
            let _ = block_status_span(req.offset, req.length, 1 << 40);
        }
    }
    if let Some(hdr) = data.get(..OPTION_HEADER_LEN) {
        let _ = OptionHeader::decode(hdr.try_into().unwrap());
    }
    if let Some(hdr) = data.get(..SIMPLE_REPLY_LEN) {
        let _ = decode_simple_reply(hdr.try_into().unwrap());
    }
    if let Some(hdr) = data.get(..STRUCTURED_REPLY_LEN) {
        if let Ok(chunk) = ChunkHeader::decode(hdr.try_into().unwrap()) {
            assert_eq!(ChunkHeader::decode(&chunk.encode()), Ok(chunk));
        }
    }
    if let Ok(info) = InfoRequest::decode(data) {
        assert_eq!(InfoRequest::decode(&info.encode()), Ok(info));
    }
    if let Ok(meta) = MetaContextRequest::decode(data) {
        assert_eq!(meta.encode(), data);
        for q in &meta.queries {
            let _ = shale::frontend::nbd::meta::names_allocation(q, true);
        }
    }
    let _ = decode_block_status(data);
    let _ = decode_error(data);
});
