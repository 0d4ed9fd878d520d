#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nodewarden::fuzz::go_buildinfo(data));
