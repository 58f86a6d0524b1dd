#![no_main]
//! `ckpt_convert::fuzz::dcp_metadata` on raw bytes (seeded from converter/fuzz/corpus/dcp_metadata).

libfuzzer_sys::fuzz_target!(|data: &[u8]| ckpt_convert::fuzz::dcp_metadata(data));
