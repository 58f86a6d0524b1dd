//! ckpt-convert: checkpoint conversion between Hugging Face and Megatron-Core layouts.
#![deny(missing_docs)]

pub mod dtype;
pub mod formats;
pub mod source;
