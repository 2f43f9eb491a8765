#![no_main]
//! `cargo +nightly fuzz run layout_load`: see `candle_mha::fuzz_support::layout_bytes`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = candle_mha::fuzz_support::layout_bytes(data);
});
