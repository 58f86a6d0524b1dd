//! `convert/merge_lora`: a LoRA adapter merged into the base it was trained on.
//!
//! - `backend=hf_peft`: a PEFT adapter directory (`lora_checkpoint`, or a training
//!   output directory holding several; the highest step is taken) into an HF base
//!   (`base_hf_path`), written as an HF directory (`output_hf_path`) with the
//!   base's tensor names, dtypes and shard files, `config.json` from the base
//!   (changed only where the merge requires: `tie_word_embeddings`, `vocab_size`),
//!   and tokenizer and chat-template files from the adapter directory first, the
//!   base second. Adapter files are never copied (transformers would attach them
//!   again, peft#1381).
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

use ckpt_wire::ArtifactKind;
use ckpt_wire::Step;
use std::path::{Path, PathBuf};

use std::collections::HashMap;

use super::Params;
use crate::execute::{Outcome, Progress};
use crate::formats::dtype::DType;
use crate::formats::hf::{self, HfCheckpoint};
use crate::formats::manifest;
use crate::formats::megatron::{self, MegatronCheckpoint};
use crate::formats::source::GlobalTensor;
use crate::lora::base::{self, Claim, Identity, NameCheck};
use crate::lora::megatron_bridge::{self, BridgeConfig, Planner, QkvLayout};
use crate::lora::peft::{self, AdapterConfig, AdapterWeights};
use crate::lora::{LoraError, peft_plan};
use crate::models;
use crate::pipeline::error::Error;
use crate::pipeline::preflight::{self, PreflightError};
use crate::pipeline::{Prepared, Report, RunOptions, SourceInfo, Target};
use crate::plan::layout::{DcpBytesSpec, Sharding};
use crate::plan::tensor::{ChunkOut, row_len, rows};
use crate::plan::{Copied, Generated, Input, LoraMerge, Plan, Rounding, RowGather, TensorStore};

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
    let common = Common {
        lora_checkpoint,
        base_digest,
        allow_base_mismatch: params.flag("allow_base_mismatch", false)?,
        dtype: params.dtype(None)?,
    };
    // Accepted as the upstream merge script takes them; any saved layout is read.
    for name in ["tp", "pp", "ep"] {
        params.positive(name, 1)?;
    }
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
            run_peft(params, &common, opts, progress)
        }
        Backend::MegatronBridge => run_bridge(params, &common, opts, progress),
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

/// The files of an adapter directory that identify it.
fn adapter_source(dir: &Path, weights: &AdapterWeights) -> SourceInfo {
    let mut files = Vec::new();
    if let Ok(Some(bytes)) = crate::formats::file::read_opt(
        &dir.join(peft::CONFIG_FILE),
        crate::formats::file::limit::CONFIG,
    ) {
        files.push(manifest::SourceFile {
            path: peft::CONFIG_FILE.into(),
            size: bytes.len() as u64,
            header_xxh3: Some(crate::formats::digest::hex(&bytes)),
        });
    }
    files.push(manifest::SourceFile {
        path: peft::WEIGHTS_FILE.into(),
        size: weights.files.get(0).len(),
        header_xxh3: Some(crate::formats::digest::hex(&weights.header)),
    });
    SourceInfo {
        role: "lora_checkpoint".into(),
        path: dir.to_owned(),
        kind: ArtifactKind::CheckpointLora,
        files,
    }
}

/// Refuses a quantized base (`quantization_config`, fp8 weights): its merge
/// would dequantize, which PEFT does differently per backend (peft#2321).
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

fn run_peft(
    params: &mut Params,
    common: &Common,
    opts: &RunOptions,
    progress: &dyn Progress,
) -> Result<Report, Error> {
    let base_id = params.required(
        "base_hf_path",
        "the Hugging Face base model the adapter was trained on (a directory or a cached model id)",
    )?;
    let out = params.path("output_hf_path", "the Hugging Face directory to write")?;
    params.finish()?;
    let resolved = peft::resolve(&common.lora_checkpoint)?;
    let adapter_dir = resolved.dir.clone();
    let base_dir = hf::resolve_model(&base_id)?;
    preflight::check_disjoint("output_hf_path", &out, "base_hf_path", &base_dir)?;
    preflight::check_disjoint(
        "output_hf_path",
        &out,
        "lora_checkpoint",
        &common.lora_checkpoint,
    )?;
    preflight::check_disjoint("output_hf_path", &out, "lora_checkpoint", &adapter_dir)?;
    preflight::check_new("output_hf_path", &out, opts.overwrite)?;

    let cfg = AdapterConfig::read(&adapter_dir)?;
    let weights = AdapterWeights::open(&adapter_dir)?;
    let base_config = crate::formats::hf::read_config(&base_dir)?;
    let base_ckpt = HfCheckpoint::open(&base_dir)?;
    refuse_quantized(&base_dir, base_config.as_ref(), &base_ckpt.tensors)?;
    check_dtype(common.dtype, &base_ckpt.tensors, "base_hf_path")?;

    // Names, then digests known without reading data.
    let mut warnings: Vec<String> = resolved.note.into_iter().collect();
    let id = Identity::of_hf(&base_dir, base_config.as_ref());
    let claim = Claim {
        file: cfg.path.clone(),
        field: "base_model_name_or_path".into(),
        name: cfg.base_model_name_or_path.clone(),
        revision: cfg.revision.clone(),
    };
    warnings.extend(name_note(
        &claim,
        &id,
        "base_hf_path",
        common.allow_base_mismatch,
    )?);
    let recorded = cfg.base_model_name_or_path.as_deref().map(|n| {
        (
            "base_model_name_or_path in adapter_config.json",
            Path::new(n),
        )
    });
    let expected = expected_digests(common, &id, recorded, ArtifactKind::CheckpointHf)?;

    // The plan: shapes are checked here.
    let names: Vec<&str> = weights.tensors.iter().map(|t| t.name.as_str()).collect();
    let keys = peft::classify(&weights.path, &names)?;
    let planned = peft_plan::plan(&base_ckpt, base_config.as_ref(), &weights, &cfg, &keys)?;
    warnings.extend(planned.notes.iter().cloned());
    let sharding = Sharding::Assigned {
        shard_of: base_ckpt.shard_of.clone(),
        index: base_ckpt.index_metadata.is_some(),
    };
    let mut plan: Plan = crate::plan::tensor::plan_hf(planned.tensors, &sharding)?;
    for (piece, merge) in plan.pieces.iter_mut().zip(planned.merges) {
        piece.merge = merge;
    }
    plan.skipped = planned.skipped;
    crate::plan::tensor::copy_side_files(&mut plan, &hf::side_files(&base_dir)?, "");
    crate::plan::tensor::copy_side_files(
        &mut plan,
        &crate::plan::tensor::tokenizer_files(&hf::side_files(&adapter_dir)?),
        "",
    );
    if let Some(config) = merged_config(base_config.as_ref(), planned.untie, planned.vocab_size) {
        plan.copied.retain(|c| c.rel != "config.json");
        plan.generated.push(Generated {
            rel: "config.json".into(),
            bytes: config.into_bytes(),
        });
    }
    tracing::info!(
        lora_modules = planned.lora_modules,
        replaced = planned.replaced,
        adapter = %adapter_dir.display(),
        "planned the merge"
    );
    let stores: [&dyn TensorStore; 2] = [&base_ckpt, &weights];
    let sources = vec![
        crate::pipeline::hf_source_info("base_hf_path", &base_dir, Some(&base_ckpt)),
        adapter_source(&adapter_dir, &weights),
    ];
    // A merge changes the weights: its smoke test is the probe of every merged
    // tensor, not a forward pass against the base.
    let target = Target {
        dir: out,
        kind: ArtifactKind::CheckpointHf,
        run_dir: None,
        reference: None,
        hf_model: None,
        rope_as_megatron: false,
    };
    let check = |o: &Outcome| check_digest(&base_dir, &base_ckpt, 0, o, &expected);
    match crate::pipeline::stage(
        STEP,
        params.all(),
        plan,
        &stores,
        sources,
        target,
        opts,
        progress,
        params.with_ignored(warnings),
        Some(&check),
    )? {
        crate::pipeline::Prepared::Planned(r) => Ok(r),
        crate::pipeline::Prepared::Staged(s) => s.commit(progress),
    }
}

/// The base's `config.json` with the changes the merge requires, or `None` when it
/// is copied unchanged.
pub fn merged_config(
    config: Option<&serde_json::Value>,
    untie: bool,
    vocab_size: Option<u64>,
) -> Option<String> {
    if !untie && vocab_size.is_none() {
        return None;
    }
    let mut cfg = config?.clone();
    let obj = cfg.as_object_mut()?;
    if untie {
        obj.insert("tie_word_embeddings".into(), serde_json::Value::Bool(false));
    }
    if let Some(v) = vocab_size {
        obj.insert("vocab_size".into(), serde_json::Value::from(v));
    }
    let mut s = serde_json::to_string_pretty(&cfg).expect("config serializes");
    s.push('\n');
    Some(s)
}

fn run_bridge(
    params: &mut Params,
    common: &Common,
    opts: &RunOptions,
    progress: &dyn Progress,
) -> Result<Report, Error> {
    let base_path = params.path(
        "base_megatron_path",
        "the Megatron iter_* directory of the base the adapter was trained on",
    )?;
    let out_megatron = params.path(
        "output_megatron_path",
        "the run or iter_* directory to write the merged Megatron checkpoint to",
    )?;
    let export_hf = params.flag("export_hf", true)?;
    let out_hf = params.opt("output_hf_path").map(PathBuf::from);
    let hf_model = params.opt_alias("hf_model_id", "hf_model_path");
    let base_hf = params.opt("base_hf_path");
    let default_iteration = params.count("iteration", 0)?;
    let distcp_files = params.positive("distcp_files", 2)? as usize;
    let rounding = match params
        .choice("merge_arithmetic", &["param_dtype", "fp32"], "param_dtype")?
        .as_str()
    {
        "fp32" => Rounding::Once,
        _ => Rounding::EachStep,
    };
    let size_text = params
        .opt("max_shard_size")
        .unwrap_or_else(|| super::megatron_to_hf::DEFAULT_MAX_SHARD_SIZE.into());
    let max_shard_size = hf::parse_size(&size_text).ok_or_else(|| PreflightError::BadValue {
        name: "max_shard_size".into(),
        value: size_text.clone(),
        expected: "a size such as 5GB, 500MB or 2GiB".into(),
    })?;
    params.finish()?;
    let out_hf = match (export_hf, out_hf) {
        (true, Some(p)) => Some(p),
        (true, None) => {
            return Err(PreflightError::Missing {
                step: STEP.name().into(),
                name: "output_hf_path".into(),
                hint: "the Hugging Face directory the merged model is exported to (or export_hf=false)".into(),
            }
            .into());
        }
        (false, Some(p)) => {
            return Err(PreflightError::BadValue {
                name: "output_hf_path".into(),
                value: p.display().to_string(),
                expected: "nothing with export_hf=false".into(),
            }
            .into());
        }
        (false, None) => None,
    };
    let hf_source = hf_model.clone().or(base_hf.clone());
    if export_hf && hf_source.is_none() {
        return Err(PreflightError::Missing {
            step: STEP.name().into(),
            name: "hf_model_id".into(),
            hint: "the Hugging Face model whose config.json and tokenizer the HF export is built around (or base_hf_path)".into(),
        }
        .into());
    }
    let (adapter_dir, note) = megatron_bridge::resolve(&common.lora_checkpoint)?;
    let (run_dir, iter_dir, iteration) =
        crate::pipeline::resolve_megatron_output(&out_megatron, default_iteration);
    let hf_dir = hf_source.as_deref().map(hf::resolve_model).transpose()?;
    let mut inputs: Vec<(&str, &Path)> = vec![
        ("base_megatron_path", &base_path),
        ("lora_checkpoint", &common.lora_checkpoint),
        ("lora_checkpoint", &adapter_dir),
    ];
    if let Some(d) = &hf_dir {
        inputs.push((
            if hf_model.is_some() {
                "hf_model_id"
            } else {
                "base_hf_path"
            },
            d,
        ));
    }
    let tracker = run_dir.join(megatron::TRACKER);
    for (name, input) in &inputs {
        preflight::check_disjoint("output_megatron_path", &iter_dir, name, input)?;
        preflight::check_disjoint("output_megatron_path", &tracker, name, input)?;
        if let Some(o) = &out_hf {
            preflight::check_disjoint("output_hf_path", o, name, input)?;
        }
    }
    if let Some(o) = &out_hf {
        preflight::check_disjoint("output_hf_path", o, "output_megatron_path", &iter_dir)?;
        preflight::check_new("output_hf_path", o, opts.overwrite)?;
    }
    preflight::check_new("output_megatron_path", &iter_dir, opts.overwrite)?;

    let base = MegatronCheckpoint::open(&base_path)?;
    let adapter = MegatronCheckpoint::open(&adapter_dir)?;
    let cfg = BridgeConfig::read(&adapter_dir)?;
    let adapters = megatron_bridge::classify(&adapter)?;
    refuse_quantized(&base_path, None, &base.tensors)?;
    check_dtype(common.dtype, &base.tensors, "base_megatron_path")?;
    let base_run = megatron_bridge::read_run_config(&base_path)?;
    let hf_config = hf_dir
        .as_deref()
        .map(crate::formats::hf::read_config)
        .transpose()?
        .flatten();
    let model = match (&hf_dir, export_hf) {
        (Some(dir), true) => Some(models::for_config(
            dir,
            hf_config.as_ref(),
            models::Overrides::default(),
        )?),
        _ => None,
    };
    let layout = model
        .as_ref()
        .and_then(QkvLayout::from_model)
        .or_else(|| base_run.as_ref().and_then(QkvLayout::from_run_config));

    // Names, then digests known without reading data.
    let mut warnings: Vec<String> = note.into_iter().collect();
    let base_hf_id = base_run
        .as_ref()
        .and_then(|v| megatron_bridge::field(v, "model.hf_model_id"))
        .and_then(|v| v.as_str());
    let id = Identity::of_megatron(&base_path, base_hf_id);
    let claim = Claim {
        file: cfg.path.clone(),
        field: "model.hf_model_id".into(),
        name: cfg.hf_model_id.clone(),
        revision: None,
    };
    let same_dir = cfg.pretrained_checkpoint.as_deref().is_some_and(|p| {
        Path::new(p).is_dir()
            && crate::paths::normalize(Path::new(p)) == crate::paths::normalize(&base_path)
    });
    if !same_dir {
        warnings.extend(name_note(
            &claim,
            &id,
            "base_megatron_path",
            common.allow_base_mismatch,
        )?);
    }
    let recorded = cfg.pretrained_checkpoint.as_deref().map(|p| {
        (
            "checkpoint.pretrained_checkpoint in run_config.yaml",
            Path::new(p),
        )
    });
    let expected = expected_digests(common, &id, recorded, ArtifactKind::CheckpointMegatron)?;

    // Shapes.
    let planner = Planner {
        adapter: &adapter,
        adapters: &adapters,
        config: &cfg,
        layout,
        rounding,
    };
    planner.check(&base)?;
    let transform = format!(
        "lora merge (dim={} alpha={}{})",
        cfg.dim,
        cfg.alpha,
        if cfg.canonical { ", canonical" } else { "" }
    );

    // The merged Megatron iteration: the base's chunks, adapted weights merged.
    let mut chunks = Vec::new();
    let mut merges = Vec::new();
    for (ti, t) in base.tensors.iter().enumerate() {
        for c in &t.chunks {
            if megatron_bridge::spans_layers(t, &c.sizes) {
                return Err(LoraError::Refused {
                    path: base_path.clone(),
                    why: format!(
                        "tensor {:?}: a stored chunk at {:?} spans {} layers; adapters are merged per layer",
                        t.name, c.offsets, c.sizes[0]
                    ),
                }
                .into());
            }
            let mut inputs = vec![Input {
                store: 0,
                tensor: ti,
                offsets: c.offsets.clone(),
                sizes: c.sizes.clone(),
            }];
            let mut merge = None;
            let n = c.sizes.len();
            if let Some((module, layer, fused)) =
                megatron_bridge::weight_of_chunk(t, &c.offsets, &c.sizes)
                && let Some(p) = planner.updates(
                    module,
                    layer,
                    fused,
                    &[(c.offsets[n - 2], c.sizes[n - 2])],
                    (c.offsets[n - 1], c.sizes[n - 1]),
                    1,
                )
            {
                inputs.extend(p.inputs);
                merge = Some(LoraMerge { updates: p.updates });
            }
            chunks.push(ChunkOut {
                fqn: t.name.clone(),
                global_shape: t.shape.clone(),
                offsets: c.offsets.clone(),
                sizes: c.sizes.clone(),
                dtype: t.dtype,
                inputs,
                gather: RowGather::copy(rows(&c.sizes), row_len(&c.sizes)),
                transform: if merge.is_some() {
                    transform.clone()
                } else {
                    "copy".into()
                },
            });
            merges.push(merge);
        }
    }
    let bytes: Vec<DcpBytesSpec> = base
        .carried_bytes()?
        .into_iter()
        .map(|(b, payload)| DcpBytesSpec {
            fqn: b.fqn.clone(),
            payload: payload.to_vec(),
        })
        .collect();
    let mut mplan = crate::plan::tensor::plan_megatron(chunks, &bytes, distcp_files);
    for (piece, m) in mplan.pieces.iter_mut().zip(merges) {
        piece.merge = m;
    }
    if !base.skipped.is_empty() {
        mplan.skipped.push((
            format!("{} optimizer/RNG entries of the base", base.skipped.len()),
            "not model weights".into(),
        ));
    }
    mplan.generated.push(Generated {
        rel: "metadata.json".into(),
        bytes: megatron::METADATA_JSON.as_bytes().to_vec(),
    });
    mplan.generated.push(Generated {
        rel: "common.pt".into(),
        bytes: megatron::common_pt(iteration),
    });
    mplan.generated.push(Generated {
        rel: "train_state.pt".into(),
        bytes: megatron::train_state_pt(iteration),
    });
    match &base.run_config {
        Some(rc) => mplan.copied.push(Copied {
            rel: "run_config.yaml".into(),
            from: rc.clone(),
            kind: "run_config".into(),
        }),
        None => warnings.push(format!(
            "{} has no run_config.yaml, so the merged Megatron checkpoint has none either (Megatron-Bridge needs one to load it)",
            base_path.display()
        )),
    }
    // Megatron-Bridge keeps the tokenizer inside the iteration: adapter's first.
    let tokenizer_of = |dir: &Path| -> Result<Vec<hf::SideFile>, Error> {
        Ok(crate::plan::tensor::tokenizer_files(&hf::side_files(
            &dir.join("tokenizer"),
        )?))
    };
    crate::plan::tensor::copy_side_files(&mut mplan, &tokenizer_of(&base_path)?, "tokenizer/");
    crate::plan::tensor::copy_side_files(&mut mplan, &tokenizer_of(&adapter_dir)?, "tokenizer/");

    let stores: [&dyn TensorStore; 2] = [&base, &adapter];
    let adapter_source = || {
        let mut s = crate::pipeline::megatron_source_info("lora_checkpoint", &adapter);
        s.kind = ArtifactKind::CheckpointLora;
        if let Some(rc) = &adapter.run_config
            && let Ok(b) = crate::formats::file::read(rc, crate::formats::file::limit::YAML)
        {
            s.files.push(manifest::SourceFile {
                path: "run_config.yaml".into(),
                size: b.len() as u64,
                header_xxh3: Some(crate::formats::digest::hex(&b)),
            });
        }
        s
    };
    let check = |o: &Outcome| check_digest(&base_path, &base, 0, o, &expected);
    let staged_megatron = crate::pipeline::stage(
        STEP,
        params.all(),
        mplan,
        &stores,
        vec![
            crate::pipeline::megatron_source_info("base_megatron_path", &base),
            adapter_source(),
        ],
        Target {
            dir: iter_dir.clone(),
            kind: ArtifactKind::CheckpointMegatron,
            run_dir: Some((run_dir.clone(), iteration)),
            reference: None,
            hf_model: hf_dir.clone(),
            rope_as_megatron: false,
        },
        opts,
        progress,
        params.with_ignored(warnings.clone()),
        Some(&check),
    )?;

    // The HF export: the base's export plan, adapted weights merged per HF tensor.
    let staged_hf = match (out_hf, &model, &hf_dir) {
        (Some(out), Some(model), Some(dir)) => {
            let reference =
                if dir.join(hf::INDEX_FILE).is_file() || dir.join(hf::SINGLE_FILE).is_file() {
                    Some(HfCheckpoint::open(dir)?)
                } else {
                    None
                };
            let built = model.export(
                &base,
                0,
                &models::ExportOptions {
                    dtype: None,
                    keep_fp32: true,
                    reference_has_head: reference
                        .as_ref()
                        .map(|r| r.by_name.contains_key(model.hf.head)),
                },
            )?;
            let mut tensors = built.tensors;
            let mut hf_merges = Vec::with_capacity(tensors.len());
            for t in &mut tensors {
                // Every HF tensor is rows of one Megatron tensor: the adapter of that
                // module updates exactly those rows.
                let placed = t.inputs.first().and_then(|first| {
                    let (module, layer, fused) = megatron_bridge::weight_of_chunk(
                        &base.tensors[first.tensor],
                        &first.offsets,
                        &first.sizes,
                    )?;
                    let n = first.sizes.len();
                    let runs: Vec<(u64, u64)> = t
                        .inputs
                        .iter()
                        .map(|i| (i.offsets[n - 2], i.sizes[n - 2]))
                        .collect();
                    let cols = (first.offsets[n - 1], first.sizes[n - 1]);
                    planner.updates(module, layer, fused, &runs, cols, t.inputs.len())
                });
                hf_merges.push(placed.map(|p| {
                    t.inputs.extend(p.inputs);
                    t.transform = format!("{} + {transform}", t.transform);
                    LoraMerge { updates: p.updates }
                }));
            }
            let mut sharding = Sharding::MaxSize(max_shard_size);
            if let Some(r) = &reference {
                let shard_of: HashMap<String, String> = r.shard_of.clone();
                if tensors.iter().all(|t| shard_of.contains_key(&t.name)) {
                    sharding = Sharding::Assigned {
                        shard_of,
                        index: r.index_metadata.is_some(),
                    };
                }
            }
            let out_dtype = tensors.first().map(|t| t.dtype);
            let mut hplan = crate::plan::tensor::plan_hf(tensors, &sharding)?;
            for (piece, m) in hplan.pieces.iter_mut().zip(hf_merges) {
                piece.merge = m;
            }
            hplan.skipped = built.skipped;
            crate::plan::tensor::copy_side_files(&mut hplan, &hf::side_files(dir)?, "");
            crate::plan::tensor::copy_side_files(&mut hplan, &tokenizer_of(&base_path)?, "");
            crate::plan::tensor::copy_side_files(&mut hplan, &tokenizer_of(&adapter_dir)?, "");
            if let Some(config) = hf_config
                .as_ref()
                .and_then(|c| models::Model::export_config(c, out_dtype))
            {
                hplan.copied.retain(|c| c.rel != "config.json");
                hplan.generated.push(Generated {
                    rel: "config.json".into(),
                    bytes: config.into_bytes(),
                });
            }
            let mut sources = vec![
                crate::pipeline::megatron_source_info("base_megatron_path", &base),
                adapter_source(),
            ];
            sources.push(crate::pipeline::hf_source_info(
                if hf_model.is_some() {
                    "hf_model_id"
                } else {
                    "base_hf_path"
                },
                dir,
                reference.as_ref(),
            ));
            let mut hwarnings = warnings.clone();
            hwarnings.extend(built.warnings);
            Some(crate::pipeline::stage(
                STEP,
                params.all(),
                hplan,
                &stores,
                sources,
                Target {
                    dir: out,
                    kind: ArtifactKind::CheckpointHf,
                    run_dir: None,
                    reference: None,
                    hf_model: None,
                    rope_as_megatron: false,
                },
                opts,
                progress,
                params.with_ignored(hwarnings),
                None,
            )?)
        }
        _ => None,
    };
    // Publish both only when both are complete.
    let finish = |p: Prepared| -> Result<Report, Error> {
        match p {
            Prepared::Planned(r) => Ok(r),
            Prepared::Staged(s) => s.commit(progress),
        }
    };
    let megatron_report = finish(staged_megatron)?;
    match staged_hf {
        Some(h) => {
            let mut report = finish(h)?;
            report.other_outputs.push(megatron_report);
            Ok(report)
        }
        None => Ok(megatron_report),
    }
}
