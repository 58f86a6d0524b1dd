#![no_main]
//! `ckpt_convert::fuzz::pickle` on raw bytes (seeded from converter/fuzz/corpus/pickle).

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpt_convert::fuzz::pickle(data));
