//! ckpt-convert: checkpoint conversion between Hugging Face and Megatron-Core
//! layouts, streamed, bounded in memory, published atomically.
//!
//! Data flows through five stages:
//! 1. **preflight** ([`preflight`], [`steps::params`]): parameters and paths,
//!    refused before anything is read or written;
//! 2. **plan** ([`plan`], [`layout`], [`models`], [`lora`]): from headers and metadata only,
//!    every output tensor with its source boxes and transform, every output byte
//!    offset;
//! 3. **execute** ([`execute`]): pieces in parallel, mapped inputs, positioned writes;
//! 4. **publish** ([`publish`], [`manifest`]): staging directory, fsync, manifest,
//!    atomic rename;
//! 5. **validate** ([`validate`], [`smoke`]): completeness, shapes, finiteness,
//!    and a forward pass of source and output compared (or, for LoRA merges, a
//!    probe of every merged tensor), before anything is published;
//! 6. a [`steps::Report`].
//!
//! Formats are in [`formats`]; tensors as sources hold them in [`source`].
#![deny(missing_docs)]

pub mod digest;
pub mod dtype;
pub mod error;
pub mod execute;
pub mod formats;
pub mod inspect;
pub mod layout;
pub mod lora;
pub mod manifest;
pub mod models;
pub mod plan;
pub mod preflight;
pub mod publish;
pub mod run_config;
pub mod smoke;
pub mod source;
pub mod steps;
pub mod synthetic;
pub mod termination;
pub mod validate;

pub use error::Error;
