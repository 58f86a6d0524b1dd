//! `convert/merge_lora`: a LoRA adapter merged into the base it was trained on.
//!
//! - `backend=hf_peft`: a PEFT adapter directory (`lora_checkpoint`, or a training
//!   output directory holding several; the highest step is taken) into an HF base
//!   (`base_hf_path`), written as an HF directory (`output_hf_path`) with the
//!   base's tensor names, dtypes and shard files, `config.json` from the base
//!   (changed only where the merge requires: `tie_word_embeddings`, `vocab_size`),
//!   and tokenizer and chat-template files from the adapter directory first, the
//!   base second. Adapter files are never copied (transformers would attach them
//!   again and apply the adapter twice).
//! - `backend=megatron_bridge`: a Megatron-Bridge adapter checkpoint into a
//!   Megatron base (`base_megatron_path`), written as a Megatron iteration
//!   (`output_megatron_path`) and, with `export_hf=true` (the default), as an HF
//!   directory (`output_hf_path`, config and tokenizer from `hf_model_id`).
//! - `backend=auto` (the default) is `megatron_bridge` when `base_megatron_path`
//!   is given, else `hf_peft`.
//!
//! The merge arithmetic is in [`crate::plan::merge`], the adapter readers in
//! [`crate::lora`], and the wrong-base guard (shapes, names, digests; parameters
//! `base_digest` and `allow_base_mismatch`) is documented in
//! [`crate::lora::base`].

use super::Params;
use crate::execute::{Outcome, Progress};
use crate::formats::dtype::DType;
use crate::formats::manifest;
use crate::formats::source::GlobalTensor;
use crate::lora::LoraError;
use crate::lora::base::{self, Claim, Identity, NameCheck};
use crate::pipeline::error::Error;
use crate::pipeline::preflight::PreflightError;
use crate::pipeline::{Report, RunOptions};
use crate::plan::TensorStore;
use ckpt_wire::ArtifactKind;
use ckpt_wire::Step;
use std::path::{Path, PathBuf};

mod hf_peft;
mod megatron_bridge;

pub use hf_peft::merged_config;

/// The step.
pub const STEP: Step = Step::MergeLora;

/// Which implementation of LoRA is merged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PEFT adapters into HF checkpoints.
    HfPeft,
    /// Megatron-Bridge adapters into Megatron checkpoints.
    MegatronBridge,
}

/// Parameters shared by both backends.
#[derive(Debug, Clone)]
pub struct Common {
    /// `lora_checkpoint` as given.
    pub lora_checkpoint: PathBuf,
    /// `base_digest`: the expected weights digest of the base.
    pub base_digest: Option<String>,
    /// `allow_base_mismatch`: downgrade a name mismatch to a warning.
    pub allow_base_mismatch: bool,
    /// `dtype` / `torch_dtype` when given and not `auto`: must be the base's.
    pub dtype: Option<DType>,
    /// `tp`, `pp`, `ep` when given: the layout the merged Megatron checkpoint
    /// records (Megatron-Bridge's merge saves at the sizes it ran with).
    pub parallel: [Option<u64>; 3],
}

/// Runs the step.
///
/// # Errors
/// [`Error`]: refusals (exit 2: parameters, paths, adapters that cannot be merged
/// faithfully, a wrong base), write failures (exit 1).
pub fn run(
    params: &mut Params,
    opts: &RunOptions,
    progress: &dyn Progress,
) -> Result<Report, Error> {
    let backend = params.choice("backend", &["auto", "hf_peft", "megatron_bridge"], "auto")?;
    let base_megatron = params.opt("base_megatron_path");
    let backend = match backend.as_str() {
        "hf_peft" => Backend::HfPeft,
        "megatron_bridge" => Backend::MegatronBridge,
        _ if base_megatron.is_some() => Backend::MegatronBridge,
        _ => Backend::HfPeft,
    };
    let lora_checkpoint = params.path(
        "lora_checkpoint",
        "the adapter: a PEFT adapter directory (or a training output directory) or a Megatron-Bridge adapter checkpoint",
    )?;
    let base_digest = params
        .opt("base_digest")
        .map(|v| {
            base::parse_digest(&v).map_err(|expected| PreflightError::BadValue {
                name: "base_digest".into(),
                value: v,
                expected,
            })
        })
        .transpose()?;
    // Any saved layout is read; the sizes given are what the output records.
    let mut parallel = [None; 3];
    for (i, name) in ["tp", "pp", "ep"].into_iter().enumerate() {
        if params.opt(name).is_some() {
            parallel[i] = Some(params.positive(name, 1)?);
        }
    }
    let common = Common {
        lora_checkpoint,
        base_digest,
        allow_base_mismatch: params.flag("allow_base_mismatch", false)?,
        dtype: params.dtype(None)?,
        parallel,
    };
    params.accept_ignored();
    match backend {
        Backend::HfPeft => {
            if let Some(m) = base_megatron {
                return Err(PreflightError::BadValue {
                    name: "base_megatron_path".into(),
                    value: m,
                    expected: "nothing with backend=hf_peft (a Megatron base takes backend=megatron_bridge or auto)".into(),
                }
                .into());
            }
            hf_peft::run(params, &common, opts, progress)
        }
        Backend::MegatronBridge => megatron_bridge::run(params, &common, opts, progress),
    }
}

/// Refuses a `dtype` other than the one every floating-point base tensor has: the
/// merge keeps the base's dtypes, as PEFT's `save_pretrained` does.
///
/// # Errors
/// [`PreflightError::BadValue`].
pub fn check_dtype(
    asked: Option<DType>,
    tensors: &[GlobalTensor],
    base_param: &str,
) -> Result<(), Error> {
    let Some(asked) = asked else {
        return Ok(());
    };
    if let Some(t) = tensors
        .iter()
        .find(|t| t.dtype.is_float() && t.dtype != asked)
    {
        return Err(PreflightError::BadValue {
            name: "dtype".into(),
            value: asked.to_string(),
            expected: format!(
                "auto or the base's dtype: the merged weights keep the dtypes of {base_param} ({} is {})",
                t.name, t.dtype
            ),
        }
        .into());
    }
    Ok(())
}

/// The name check's outcome as a note for the report, or the refusal.
///
/// # Errors
/// [`LoraError::WrongBase`].
pub fn name_note(
    claim: &Claim,
    id: &Identity,
    base_param: &str,
    allow: bool,
) -> Result<Option<String>, Error> {
    Ok(match base::check_name(claim, id, base_param, allow)? {
        NameCheck::Agrees(_) => None,
        NameCheck::Unconfirmed(w) | NameCheck::Allowed(w) => Some(w),
    })
}

/// The digests the base must have: `base_digest=`, and our manifest in the
/// directory the adapter names as its base. Compared now with the base's own
/// manifest; returned for the check on the tensors as read.
///
/// # Errors
/// [`LoraError::WrongBase`] when an expected digest differs from the one the base's
/// manifest records.
pub fn expected_digests(
    common: &Common,
    id: &Identity,
    recorded_base: Option<(&str, &Path)>,
    kind: ArtifactKind,
) -> Result<Vec<(String, String)>, Error> {
    let mut expected: Vec<(String, String)> = Vec::new();
    if let Some(d) = &common.base_digest {
        expected.push(("base_digest".into(), d.clone()));
    }
    if let Some((what, dir)) = recorded_base
        && dir.is_dir()
        && crate::paths::normalize(dir) != crate::paths::normalize(&id.dir)
        && let Some(m) = base::manifest_of(dir, kind)
    {
        expected.push((
            format!(
                "the weights digest in {} ({what})",
                dir.join(manifest::FILE_NAME).display()
            ),
            m.output.weights_digest,
        ));
    }
    if let Some(recorded) = &id.manifest_digest {
        for (what, d) in &expected {
            if d != recorded {
                return Err(LoraError::WrongBase {
                    why: format!(
                        "{} records weights digest {recorded} in its {}, but {what} is {d}: a different model (a digest mismatch is never overridden)",
                        id.dir.display(),
                        manifest::FILE_NAME
                    ),
                }
                .into());
            }
        }
        expected.push((format!("its own {}", manifest::FILE_NAME), recorded.clone()));
    }
    Ok(expected)
}

/// The base's weights digest from the chunk digests execution recorded for store
/// `store`, hashing the chunks execution did not read (tensors the merge replaced).
pub fn digest_as_read(base: &dyn TensorStore, store: usize, outcome: &Outcome) -> String {
    let tensors = base.tensors();
    let mut known: Vec<Vec<Option<u128>>> =
        tensors.iter().map(|t| vec![None; t.chunks.len()]).collect();
    for c in outcome.source_chunks.iter().filter(|c| c.store == store) {
        known[c.tensor][c.chunk] = Some(c.xxh3);
    }
    let mut lines = Vec::new();
    for (ti, t) in tensors.iter().enumerate() {
        for (ci, chunk) in t.chunks.iter().enumerate() {
            let d = known[ti][ci].unwrap_or_else(|| {
                let r = chunk.footprint();
                let f = base.files().get(r.file);
                f.will_need(r.offset, r.len);
                let d = xxhash_rust::xxh3::xxh3_128(base.files().slice(r));
                f.release(r.offset, r.len);
                d
            });
            lines.push(base::digest_line(t, ci, d));
        }
    }
    crate::formats::digest::of_lines(lines)
}

/// The check of the base's identity on the tensors as read.
///
/// # Errors
/// [`LoraError::WrongBase`] naming both digests.
pub fn check_digest(
    base_dir: &Path,
    store: &dyn TensorStore,
    index: usize,
    outcome: &Outcome,
    expected: &[(String, String)],
) -> Result<(), Error> {
    if expected.is_empty() {
        return Ok(());
    }
    let got = digest_as_read(store, index, outcome);
    for (what, d) in expected {
        if *d != got {
            return Err(LoraError::WrongBase {
                why: format!(
                    "the weights of {} as read have digest {got}, but {what} is {d}: a different (or modified) base; nothing was published (a digest mismatch is never overridden)",
                    base_dir.display()
                ),
            }
            .into());
        }
    }
    Ok(())
}

/// Refuses a quantized base (`quantization_config`, fp8 weights): its merge
/// would dequantize, which PEFT does differently per backend
/// (`docs/lora.md#quantized-bases`).
///
/// # Errors
/// [`LoraError::Refused`] naming the file.
pub fn refuse_quantized(
    dir: &Path,
    config: Option<&serde_json::Value>,
    tensors: &[GlobalTensor],
) -> Result<(), Error> {
    if config
        .and_then(|c| c.get("quantization_config"))
        .is_some_and(|q| !q.is_null())
    {
        return Err(LoraError::Refused {
            path: dir.join("config.json"),
            why: "has a quantization_config: merging into a quantized base is not supported (the result depends on how each backend dequantizes; dequantize the base first)".into(),
        }
        .into());
    }
    if let Some(t) = tensors.iter().find(|t| {
        matches!(t.dtype, DType::F8E4M3 | DType::F8E5M2)
            || t.name.ends_with("weight_scale_inv")
            || t.name.ends_with(".absmax")
            || t.name.contains(".quant_state")
    }) {
        return Err(LoraError::Refused {
            path: dir.to_owned(),
            why: format!(
                "tensor {:?} ({}) is quantized: merging into a quantized base is not supported (dequantize the base first)",
                t.name, t.dtype
            ),
        }
        .into());
    }
    Ok(())
}
