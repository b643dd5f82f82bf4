//! The DER walker that names TLS clients.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shale::frontend::nbd::cert_name::common_name;

fuzz_target!(|data: &[u8]| {
    let _ = common_name(data);
});
