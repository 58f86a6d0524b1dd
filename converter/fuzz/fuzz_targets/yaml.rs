#![no_main]
//! `ckpt_convert::fuzz::yaml` on raw bytes (seeded from converter/fuzz/corpus/yaml).

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpt_convert::fuzz::yaml(data));
