//! Checkpoint formats: what is on disk, read and written without the frameworks.
//!
//! - [`safetensors`] and [`hf`]: Hugging Face directories.
//! - [`pickle`], [`torch_zip`], [`torch_save`]: the pieces of `torch.save` archives.
//! - [`dcp`]: the `torch.distributed.checkpoint` `.metadata`.
//! - [`megatron`]: Megatron-Core `iter_*` directories built from the above.
//! - [`yaml`] and [`run_config`]: Megatron-Bridge's `run_config.yaml`.
//! - [`manifest`]: the `ckpt-manifest.json` every output carries.
//! - [`dtype`], [`source`], [`digest`]: element types, tensors as mapped sources,
//!   and the digests that identify them.
//! - [`file`]: how every source file is opened (regular files only, inside their
//!   checkpoint, reads bounded).

pub mod dcp;
pub mod digest;
pub mod dtype;
pub mod file;
pub mod hf;
pub mod manifest;
pub mod megatron;
pub mod pickle;
pub mod run_config;
pub mod safetensors;
pub mod source;
pub mod torch_save;
pub mod torch_zip;
pub mod yaml;

use std::path::{Path, PathBuf};

/// A format error, always naming the file (and tensor, where one is involved).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// Reading or mapping a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A safetensors header was refused.
    #[error("{}: {why}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// One tensor is wrong.
    #[error("{}: tensor {tensor:?}: {why}", path.display())]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        why: String,
    },
    /// A JSON or YAML side file is wrong.
    #[error("{}: {why}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A pickle was refused.
    #[error("{}: {source}", path.display())]
    Pickle {
        /// The file.
        path: PathBuf,
        /// Why.
        source: pickle::PickleError,
    },
    /// A DCP `.metadata` was refused.
    #[error("{}: {source}", path.display())]
    Dcp {
        /// The file.
        path: PathBuf,
        /// Why.
        source: dcp::DcpError,
    },
    /// The directory is not a checkpoint of the kind expected.
    #[error("{}: {why}", path.display())]
    NotACheckpoint {
        /// The directory.
        path: PathBuf,
        /// What was expected and found.
        why: String,
    },
    /// A source changed while the run read it.
    #[error("{}: {why} while the conversion read it; nothing was published (run again once the source is stable)", path.display())]
    Changed {
        /// The file.
        path: PathBuf,
        /// What changed.
        why: String,
    },
    /// A bug: an invariant the code established did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

impl FormatError {
    /// Wraps an I/O error with its path.
    pub fn io(path: &Path, source: std::io::Error) -> FormatError {
        FormatError::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// A problem with a side file.
    pub fn file(path: &Path, why: impl Into<String>) -> FormatError {
        FormatError::File {
            path: path.to_owned(),
            why: why.into(),
        }
    }
}

/// Orders names so that `layers.2` comes before `layers.10` (digit runs compare as
/// numbers), which is the order people and `save_pretrained` expect to see.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, _) => return std::cmp::Ordering::Less,
            (_, None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let na = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let nb = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (da, db) = (&a[..na], &b[..nb]);
                let strip = |d: &[u8]| -> usize { d.iter().take_while(|&&c| c == b'0').count() };
                let (ta, tb) = (&da[strip(da)..], &db[strip(db)..]);
                let ord = ta
                    .len()
                    .cmp(&tb.len())
                    .then_with(|| ta.cmp(tb))
                    .then(na.cmp(&nb));
                if ord != std::cmp::Ordering::Equal {
                    return ord;
                }
                a = &a[na..];
                b = &b[nb..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::natural_cmp;

    #[test]
    fn natural_order() {
        let mut v = vec![
            "layers.10.w",
            "layers.2.w",
            "layers.1.w",
            "embed",
            "layers.2.v",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            vec![
                "embed",
                "layers.1.w",
                "layers.2.v",
                "layers.2.w",
                "layers.10.w"
            ]
        );
    }
}
