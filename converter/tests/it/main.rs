//! Integration tests of the `ckpt-convert` binary: one binary, one module per
//! capability, a small DSL in `util`.

mod bad_inputs;
mod cli;
mod faults;
mod fuzz_corpus;
mod hostile;
mod injected_faults;
mod layers;
mod memory;
mod merge_lora;
mod options;
mod preflight;
mod profiles;
mod properties;
mod publish;
mod roundtrip;
mod split;
mod util;
mod validate;
