#![no_main]
//! `ckpt_convert::fuzz::summary` on raw bytes (seeded from converter/fuzz/corpus/summary).

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpt_convert::fuzz::summary(data));
