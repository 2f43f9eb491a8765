#![no_main]
//! `cargo +nightly fuzz run mask_plan`: see `candle_mha::fuzz_support::mask_bytes`.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = candle_mha::fuzz_support::mask_bytes(data);
});
