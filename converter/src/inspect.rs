//! `ckpt-convert inspect PATH`: what a checkpoint holds, for any supported layout,
//! from headers and metadata only.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::formats::hf::{self, HfCheckpoint};
use crate::formats::megatron::{self, MegatronCheckpoint};
use crate::formats::source::{Files, GlobalTensor};
use crate::formats::{FormatError, safetensors};
use crate::pipeline::error::Error;

/// One tensor as stored.
#[derive(Debug, Clone, Serialize)]
pub struct TensorInfo {
    /// Name or DCP key.
    pub name: String,
    /// Element type.
    pub dtype: String,
    /// Global shape.
    pub shape: Vec<u64>,
    /// Bytes.
    pub bytes: u64,
    /// Chunk boxes as `[offsets, sizes]` (one chunk covering everything for HF).
    pub chunks: Vec<[Vec<u64>; 2]>,
    /// Where it lives (shard file, or the `.distcp` files of its chunks).
    pub files: Vec<String>,
}

/// A bytes item of a Megatron checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct ByteItemInfo {
    /// The DCP key.
    pub name: String,
    /// Payload size.
    pub bytes: u64,
    /// What the payload holds.
    pub payload: String,
}

/// What `inspect` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The path inspected.
    pub path: PathBuf,
    /// `checkpoint_hf`, `checkpoint_megatron` or `safetensors_file`.
    pub kind: String,
    /// `architectures[0]` from `config.json`, when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// Megatron iteration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u64>,
    /// A note (for example that a run directory was resolved to its latest iteration).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Tensors.
    pub tensors: Vec<TensorInfo>,
    /// Total tensor bytes.
    pub total_bytes: u64,
    /// Total elements.
    pub total_parameters: u64,
    /// Megatron bytes items.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub byte_items: Vec<ByteItemInfo>,
    /// Non-model keys skipped (optimizer, RNG).
    pub skipped_keys: usize,
    /// Megatron common state, rendered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub common_state: Option<String>,
    /// Side files (config, tokenizer, chat template), with kinds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub side_files: Vec<(String, hf::SideFileKind)>,
    /// Whether a `ckpt-manifest.json` is present.
    pub has_manifest: bool,
}

fn tensor_infos(files: &Files, tensors: &[GlobalTensor], root: &Path) -> Vec<TensorInfo> {
    tensors
        .iter()
        .map(|t| {
            let mut where_: Vec<String> = t
                .chunks
                .iter()
                .map(|c| {
                    let p = &files.get(c.footprint().file).path;
                    p.strip_prefix(root).unwrap_or(p).display().to_string()
                })
                .collect();
            where_.sort();
            where_.dedup();
            TensorInfo {
                name: t.name.clone(),
                dtype: t.dtype.torch_name().into(),
                shape: t.shape.clone(),
                bytes: t.nbytes(),
                chunks: t
                    .chunks
                    .iter()
                    .map(|c| [c.offsets.clone(), c.sizes.clone()])
                    .collect(),
                files: where_,
            }
        })
        .collect()
}

/// Inspects `path`: an HF directory, a single `.safetensors` file, a Megatron
/// iteration directory, or a run directory (resolved to its latest iteration).
///
/// # Errors
/// [`Error`] when the path is none of these or its headers are broken.
pub fn inspect(path: &Path) -> Result<Inspection, Error> {
    if path.is_file() {
        let mut files = Files::default();
        let (_, st) = safetensors::open(&mut files, path)?;
        let tensors = tensor_infos(&files, &st.tensors, path.parent().unwrap_or(Path::new("")));
        return Ok(summary(path, "safetensors_file", None, None, None, tensors));
    }
    if !path.is_dir() {
        return Err(FormatError::NotACheckpoint {
            path: path.to_owned(),
            why: "no such file or directory".into(),
        }
        .into());
    }
    if path.join(".metadata").is_file() {
        return inspect_megatron(path, None);
    }
    if let Some(Ok(latest)) = megatron::read_tracker(path) {
        let name = latest.map_or("release".to_owned(), megatron::iter_dir_name);
        let note = format!(
            "{} is a run directory; showing its latest iteration {name}",
            path.display()
        );
        return inspect_megatron(&path.join(name), Some(note));
    }
    let ckpt = HfCheckpoint::open(path)?;
    let config = crate::formats::hf::read_config(path)?;
    let arch = config
        .as_ref()
        .and_then(|c| c.get("architectures"))
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .map(str::to_owned);
    let tensors = tensor_infos(&ckpt.files, &ckpt.tensors, path);
    let mut out = summary(path, "checkpoint_hf", arch, None, None, tensors);
    out.side_files = hf::side_files(path)?
        .into_iter()
        .map(|f| (f.rel, f.kind))
        .collect();
    Ok(out)
}

fn inspect_megatron(dir: &Path, note: Option<String>) -> Result<Inspection, Error> {
    let ckpt = MegatronCheckpoint::open(dir)?;
    let tensors = tensor_infos(&ckpt.files, &ckpt.tensors, dir);
    let mut out = summary(
        dir,
        "checkpoint_megatron",
        None,
        ckpt.iteration,
        note,
        tensors,
    );
    out.byte_items = ckpt
        .byte_items
        .iter()
        .map(|b| ByteItemInfo {
            name: b.fqn.clone(),
            bytes: b.data.len,
            payload: match &b.refused {
                Some(why) => format!("refused, would not be carried into an output: {why}"),
                None => megatron::describe_bytes_item(ckpt.files.slice(b.data)),
            },
        })
        .collect();
    out.skipped_keys = ckpt.skipped.len();
    out.common_state = ckpt.common.source.as_ref().map(|src| {
        format!(
            "{src}: iteration={:?} checkpoint_version={:?} keys={:?} content_metadata={}",
            ckpt.common.iteration,
            ckpt.common.checkpoint_version,
            ckpt.common.keys,
            ckpt.common.content_metadata.as_deref().unwrap_or("none")
        )
    });
    let tok = dir.join("tokenizer");
    if tok.is_dir() {
        out.side_files = hf::side_files(&tok)?
            .into_iter()
            .map(|f| (format!("tokenizer/{}", f.rel), f.kind))
            .collect();
    }
    Ok(out)
}

fn summary(
    path: &Path,
    kind: &str,
    architecture: Option<String>,
    iteration: Option<u64>,
    note: Option<String>,
    tensors: Vec<TensorInfo>,
) -> Inspection {
    Inspection {
        path: path.to_owned(),
        kind: kind.into(),
        architecture,
        iteration,
        note,
        total_bytes: tensors.iter().map(|t| t.bytes).sum(),
        total_parameters: tensors
            .iter()
            .map(|t| t.shape.iter().product::<u64>())
            .sum(),
        tensors,
        byte_items: Vec::new(),
        skipped_keys: 0,
        common_state: None,
        side_files: Vec::new(),
        has_manifest: path.join(crate::formats::manifest::FILE_NAME).is_file(),
    }
}

/// Whether `path` names a YAML file (`run_config.yaml`), which `inspect` shows as
/// the values this tool reads from it.
pub fn is_yaml(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|e| e == "yaml" || e == "yml")
}

/// The values this tool reads from a YAML file, as JSON (sets and tuples become
/// lists, aliases are resolved), so a user sees how a `run_config.yaml` is
/// understood.
///
/// # Errors
/// [`FormatError`] naming the file and line.
pub fn inspect_yaml(path: &Path) -> Result<serde_json::Value, Error> {
    let text = crate::formats::file::read_named_text(path, crate::formats::file::limit::YAML)?;
    crate::formats::yaml::parse(&text).map_err(|e| FormatError::file(path, e.to_string()).into())
}
