#![no_main]
//! `ckpt_convert::fuzz::peft_config` on raw bytes (seeded from converter/fuzz/corpus/peft_config).

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpt_convert::fuzz::peft_config(data));
