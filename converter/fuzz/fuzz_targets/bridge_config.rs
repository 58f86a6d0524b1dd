#![no_main]
//! `ckpt_convert::fuzz::bridge_config` on raw bytes (seeded from converter/fuzz/corpus/bridge_config).

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpt_convert::fuzz::bridge_config(data));
