//! The YAML configuration and the access patterns inside it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::config::{Config, Origin};
use shale::frontend::nbd::access::ClientSpec;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = Config::parse(s, Origin::Defaults, Some(std::path::Path::new("/base")));
        let _ = s.parse::<ClientSpec>();
    }
});
