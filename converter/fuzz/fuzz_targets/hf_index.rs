#![no_main]
//! `ckpt_convert::fuzz::hf_index` on raw bytes (seeded from converter/fuzz/corpus/hf_index).

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpt_convert::fuzz::hf_index(data));
