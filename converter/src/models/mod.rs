//! Model families: how each architecture's tensors map between the Hugging Face
//! and Megatron-Core layouts, and the Megatron model configuration derived from
//! `config.json`.
//!
//! A [`Mapping`] turns a source's tensor list into planned outputs; it never reads
//! tensor data. [`Identity`] keeps names and shapes (a raw export, and the format
//! proof); the families live in their own files.

pub mod gpt;
pub mod llama;
pub mod mistral;
pub mod qwen2;
pub mod qwen3;

use std::path::Path;

use crate::dtype::DType;
use crate::error::Error;
use crate::formats::FormatError;
use crate::formats::hf::HfCheckpoint;
use crate::formats::megatron::MegatronCheckpoint;
use crate::layout::DcpBytesSpec;
use crate::preflight::PreflightError;
use crate::run_config::Yaml;
use crate::steps::{ChunkOut, TensorOut};

/// The parallel layout a Megatron checkpoint is meant for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parallelism {
    /// Tensor parallel size.
    pub tp: u64,
    /// Pipeline parallel size.
    pub pp: u64,
    /// Expert parallel size.
    pub ep: u64,
    /// Expert tensor parallel size.
    pub etp: u64,
}

/// What an import is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOptions {
    /// The parallel layout the checkpoint is meant for.
    pub parallel: Parallelism,
    /// Parameter dtype.
    pub dtype: DType,
    /// `make_vocab_size_divisible_by`; `None` uses Megatron-Bridge's rule (the
    /// largest power of two up to 128 that divides the vocabulary: no padding).
    pub vocab_multiple: Option<u64>,
    /// The HF model id recorded in `run_config.yaml` (`model.hf_model_id`,
    /// `tokenizer.tokenizer_model`).
    pub hf_model_id: String,
}

/// Planned Megatron output.
#[derive(Debug, Clone, Default)]
pub struct MegatronBuild {
    /// Tensor chunks.
    pub chunks: Vec<ChunkOut>,
    /// Bytes items (`_extra_state`).
    pub bytes: Vec<DcpBytesSpec>,
    /// Source tensors not converted, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Notes for the user.
    pub warnings: Vec<String>,
    /// The `model:` section of `run_config.yaml`.
    pub model_config: Vec<(String, Yaml)>,
}

/// Planned HF output.
#[derive(Debug, Clone, Default)]
pub struct HfBuild {
    /// Tensors in state-dict order.
    pub tensors: Vec<TensorOut>,
    /// Source tensors not converted, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Notes for the user.
    pub warnings: Vec<String>,
}

/// How one architecture maps between the two layouts.
pub trait Mapping {
    /// The mapping's name (`llama`, `identity`).
    fn name(&self) -> &str;

    /// Refuses parallel sizes the model cannot be split into.
    ///
    /// # Errors
    /// [`PreflightError`] naming the size and the dimension it must divide.
    fn check_parallelism(&self, p: &Parallelism) -> Result<(), PreflightError>;

    /// Plans the Megatron tensors from an HF checkpoint (store index `store`).
    ///
    /// # Errors
    /// [`Error`] when the source lacks a tensor or has one of the wrong shape.
    fn hf_to_megatron(
        &self,
        src: &HfCheckpoint,
        store: usize,
        opts: &ImportOptions,
    ) -> Result<MegatronBuild, Error>;

    /// Plans the HF tensors from a Megatron checkpoint (store index `store`);
    /// `reference` is the HF model the output mirrors (for which optional tensors,
    /// such as a tied `lm_head.weight`, its layout stores).
    ///
    /// # Errors
    /// [`Error`] when the source lacks a tensor or has one of the wrong shape.
    fn megatron_to_hf(
        &self,
        src: &MegatronCheckpoint,
        store: usize,
        dtype: Option<DType>,
        reference: Option<&HfCheckpoint>,
    ) -> Result<HfBuild, Error>;

    /// The dense decoder mapping, when this is one (a LoRA merge needs its head
    /// layout to split fused adapters).
    fn as_dense(&self) -> Option<&gpt::DenseGpt> {
        None
    }

    /// The `config.json` to write on export, when it must differ from the source's
    /// (a changed dtype); `None` copies the source's unchanged.
    fn export_config(
        &self,
        config: Option<&serde_json::Value>,
        dtype: Option<DType>,
    ) -> Option<String> {
        let mut cfg = config?.clone();
        let dtype = dtype?;
        let obj = cfg.as_object_mut()?;
        let mut changed = false;
        for key in ["torch_dtype", "dtype"] {
            if let Some(v) = obj.get_mut(key)
                && v.as_str() != Some(dtype.torch_name())
            {
                *v = serde_json::Value::String(dtype.torch_name().into());
                changed = true;
            }
        }
        changed.then(|| {
            let mut s = serde_json::to_string_pretty(&cfg).expect("config serializes");
            s.push('\n');
            s
        })
    }
}

/// Reads `config.json` of an HF directory, if present.
///
/// # Errors
/// [`FormatError`] when it exists but is not JSON.
pub fn read_config(dir: &Path) -> Result<Option<serde_json::Value>, FormatError> {
    let path = dir.join("config.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| FormatError::file(&path, format!("not valid JSON: {e}"))),
        Err(_) => Ok(None),
    }
}

/// Picks the mapping for a model from its `config.json` (`architectures`, then
/// `model_type`).
///
/// # Errors
/// [`PreflightError::Unsupported`] naming the architecture, or the option that the
/// family does not support.
pub fn for_config(
    dir: &Path,
    config: Option<&serde_json::Value>,
) -> Result<Box<dyn Mapping>, Error> {
    let config = config.ok_or_else(|| {
        PreflightError::Unsupported(format!(
            "{}: no config.json, so the architecture is unknown (use mapping=identity to copy tensors under their own names)",
            dir.display()
        ))
    })?;
    let arch = config
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
        .map(str::to_owned)
        .or_else(|| {
            config
                .get("model_type")
                .and_then(|m| m.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "(none)".into());
    type Build = fn(&serde_json::Value) -> Result<gpt::DenseGpt, PreflightError>;
    // Matched by architecture, or by model_type when `architectures` is absent.
    let families: [(&[&str], &str, Build); 4] = [
        (llama::ARCHITECTURES, "llama", llama::mapping),
        (mistral::ARCHITECTURES, "mistral", mistral::mapping),
        (qwen2::ARCHITECTURES, "qwen2", qwen2::mapping),
        (qwen3::ARCHITECTURES, "qwen3", qwen3::mapping),
    ];
    let has_arch = config.get("architectures").and_then(|a| a.get(0)).is_some();
    for (archs, model_type, build) in families {
        let matches = if has_arch {
            archs.contains(&arch.as_str())
        } else {
            arch == model_type
        };
        if matches {
            return build(config)
                .map(|m| Box::new(m) as Box<dyn Mapping>)
                .map_err(|e| match e {
                    PreflightError::Unsupported(why) => {
                        PreflightError::Unsupported(format!("{}/{why}", dir.display()))
                    }
                    other => other,
                })
                .map_err(Error::from);
        }
    }
    let supported: Vec<&str> = families
        .iter()
        .flat_map(|(a, _, _)| a.iter().copied())
        .collect();
    Err(PreflightError::Unsupported(format!(
        "{}: architecture {arch} is not supported (supported: {}; mapping=identity copies tensors under their own names)",
        dir.join("config.json").display(),
        supported.join(", ")
    ))
    .into())
}

impl Mapping for gpt::DenseGpt {
    fn name(&self) -> &str {
        &self.cfg.architecture
    }

    fn as_dense(&self) -> Option<&gpt::DenseGpt> {
        Some(self)
    }

    fn check_parallelism(&self, p: &Parallelism) -> Result<(), PreflightError> {
        self.check(p)
    }

    fn hf_to_megatron(
        &self,
        src: &HfCheckpoint,
        store: usize,
        opts: &ImportOptions,
    ) -> Result<MegatronBuild, Error> {
        self.import(src, store, opts)
    }

    fn megatron_to_hf(
        &self,
        src: &MegatronCheckpoint,
        store: usize,
        dtype: Option<DType>,
        reference: Option<&HfCheckpoint>,
    ) -> Result<HfBuild, Error> {
        self.export(
            src,
            store,
            dtype,
            reference.map(|r| r.by_name.contains_key("lm_head.weight")),
        )
    }
}

/// Keeps names, shapes and chunking; only casts floats. A raw export of Megatron
/// tensors to safetensors and back, and the proof that both formats are right.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity;

impl Mapping for Identity {
    fn name(&self) -> &str {
        "identity"
    }

    fn check_parallelism(&self, _: &Parallelism) -> Result<(), PreflightError> {
        Ok(())
    }

    fn hf_to_megatron(
        &self,
        src: &HfCheckpoint,
        store: usize,
        opts: &ImportOptions,
    ) -> Result<MegatronBuild, Error> {
        Ok(MegatronBuild {
            chunks: crate::steps::hf_to_megatron::identity_chunks(src, store, Some(opts.dtype))?,
            model_config: crate::run_config::parallel_fields(&opts.parallel, opts.dtype),
            warnings: vec![
                "mapping=identity writes tensors under their HF names and no _extra_state items; Megatron-Core loads it only into a model with those keys, with a relaxed dist_ckpt_strictness".into(),
            ],
            ..MegatronBuild::default()
        })
    }

    fn megatron_to_hf(
        &self,
        src: &MegatronCheckpoint,
        store: usize,
        dtype: Option<DType>,
        _: Option<&HfCheckpoint>,
    ) -> Result<HfBuild, Error> {
        let skipped = src
            .byte_items
            .iter()
            .map(|b| {
                (
                    b.fqn.clone(),
                    "bytes item (module state), not a tensor".to_owned(),
                )
            })
            .chain(
                src.skipped
                    .iter()
                    .map(|k| (k.clone(), "optimizer or RNG state".to_owned())),
            )
            .collect();
        Ok(HfBuild {
            tensors: crate::steps::megatron_to_hf::identity_tensors(src, store, dtype)?,
            skipped,
            warnings: Vec::new(),
        })
    }

    fn export_config(&self, _: Option<&serde_json::Value>, _: Option<DType>) -> Option<String> {
        None
    }
}
