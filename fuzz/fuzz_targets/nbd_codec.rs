//! NBD wire decoders: request headers (and what the server decides to do
//! with them), option headers, NBD_OPT_INFO/GO data, simple replies.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::frontend::nbd::codec::*;

fuzz_target!(|data: &[u8]| {
    if let Some(hdr) = data.get(..REQUEST_LEN) {
        let hdr: &[u8; REQUEST_LEN] = hdr.try_into().unwrap();
        if let Ok(req) = Request::decode(hdr) {
            assert_eq!(Request::decode(&req.encode()), Ok(req));
            let _ = classify(&req);
        }
    }
    if let Some(hdr) = data.get(..OPTION_HEADER_LEN) {
        let _ = OptionHeader::decode(hdr.try_into().unwrap());
    }
    if let Some(hdr) = data.get(..SIMPLE_REPLY_LEN) {
        let _ = decode_simple_reply(hdr.try_into().unwrap());
    }
    if let Ok(info) = InfoRequest::decode(data) {
        assert_eq!(InfoRequest::decode(&info.encode()), Ok(info));
    }
});
