//! LoRA adapters: PEFT adapter directories ([`peft`]) and Megatron-Bridge adapter
//! checkpoints ([`megatron_bridge`]), read into the updates a plan applies to the
//! base weights ([`crate::plan::LoraMerge`]), the kernels that apply them
//! ([`merge`]), and the checks that an adapter meets the base it was trained on
//! ([`base`]).
//!
//! Adapters are read from headers and configuration only; like every planner,
//! nothing here reads tensor data. What cannot be merged faithfully (variants
//! whose merge rewrites the base, replicated layers, quantized bases, pickles) is
//! refused with the reason, before anything is written.

pub mod base;
pub mod megatron_bridge;
pub mod peft;

use std::path::PathBuf;

/// Why an adapter was refused (exit code 2: nothing was written).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LoraError {
    /// The adapter uses a variant or option that cannot be merged faithfully.
    #[error("{}: {why}", path.display())]
    Refused {
        /// The file that says so (`adapter_config.json`, `run_config.yaml`, a weights file).
        path: PathBuf,
        /// What was found and why it is refused.
        why: String,
    },
    /// A configuration field has a value that cannot be used.
    #[error("{}: {key}: {why}", path.display())]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// The field.
        key: String,
        /// What was expected and found.
        why: String,
    },
    /// An adapter tensor does not fit the base (missing or mis-shaped base tensor,
    /// inconsistent adapter matrices). Never downgraded by `allow_base_mismatch`.
    #[error("{}: tensor {tensor:?}: expected {expected}, found {found}", path.display())]
    Mismatch {
        /// The file holding the tensor that does not fit.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What the other side requires.
        expected: String,
        /// What is there.
        found: String,
    },
    /// The base is not the model the adapter was trained on.
    #[error("wrong base: {why}")]
    WrongBase {
        /// What names or digests disagree, and how to proceed if the base is right.
        why: String,
    },
    /// An adapter file could not be read (the message names the file).
    #[error("{0}")]
    Unreadable(String),
    /// `lora_checkpoint` does not lead to one adapter.
    #[error("lora_checkpoint={}: {why}", path.display())]
    Resolve {
        /// The path given.
        path: PathBuf,
        /// What was expected and found.
        why: String,
    },
}
