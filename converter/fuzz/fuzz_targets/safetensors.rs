#![no_main]
//! `ckpt_convert::fuzz::safetensors` on raw bytes (seeded from converter/fuzz/corpus/safetensors).

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpt_convert::fuzz::safetensors(data));
