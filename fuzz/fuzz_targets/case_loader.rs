#![no_main]
//! `cargo +nightly fuzz run case_loader`: see `candle_mha::fuzz_support::case_bytes`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = candle_mha::fuzz_support::case_bytes(data);
});
