#![no_main]
//! `ckpt_convert::fuzz::torch_save` on raw bytes (seeded from converter/fuzz/corpus/torch_save).

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpt_convert::fuzz::torch_save(data));
