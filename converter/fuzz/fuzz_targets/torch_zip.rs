#![no_main]
//! `ckpt_convert::fuzz::torch_zip` on raw bytes (seeded from converter/fuzz/corpus/torch_zip).

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpt_convert::fuzz::torch_zip(data));
