//! ckpt-convert: checkpoint conversion between Hugging Face and Megatron-Core
//! layouts, streamed, bounded in memory, published atomically.
//!
//! Data flows one way through the layers, each a module that names only the
//! ones before it (a test holds the code to this order):
//! 1. [`formats`] (and [`paths`], [`failpoint`]): bytes on disk ↔ validated headers and tensor
//!    views; `run_config.yaml`, manifests;
//! 2. [`plan`]: what a plan is made of (planned tensors, row gathers, LoRA
//!    updates and their kernels) and every output byte offset ([`plan::layout`]);
//! 3. [`models`] and [`lora`]: from headers and configuration only, the planned
//!    tensors of a family's mapping or of an adapter merge;
//! 4. [`execute`]: pieces in parallel, mapped inputs, positioned writes;
//! 5. [`publish`]: staging directory, fsync, atomic rename;
//! 6. [`validate`] (with [`smoke`]): completeness, shapes, finiteness and a
//!    forward pass of source and output compared, from an implementation
//!    independent of the mapping;
//! 7. [`pipeline`]: preflight → plan → execute → publish → validate → commit,
//!    in order, with the report;
//! 8. [`steps`]: the steps users type (`convert/hf_to_megatron`, …); beside them,
//!    [`fuzz`], the entry points of the fuzz targets.
#![deny(missing_docs)]

pub mod execute;
pub mod failpoint;
pub mod formats;
pub mod fuzz;
pub mod inspect;
pub mod lora;
pub mod models;
pub mod paths;
pub mod pipeline;
pub mod plan;
pub mod publish;
pub mod reference;
pub mod smoke;
pub mod steps;
pub mod synthetic;
pub mod validate;

pub use pipeline::error::Error;
