//! `convert/megatron_to_hf`: a Megatron-Core iteration directory into a Hugging
//! Face directory, rebuilt around `hf_model_id` (config, generation config,
//! tokenizer, chat template) as Megatron-Bridge's export does.

use ckpt_wire::ArtifactKind;
use ckpt_wire::Step;
use std::collections::HashMap;
use std::path::PathBuf;

use super::Params;
use crate::execute::Progress;
use crate::formats::dtype::DType;
use crate::formats::hf::{self, HfCheckpoint};
use crate::formats::megatron::MegatronCheckpoint;
use crate::models::{self, HfBuild};
use crate::pipeline::error::Error;
use crate::pipeline::preflight::{self, PreflightError};
use crate::pipeline::{Report, RunOptions, Target};
use crate::plan::TensorStore;
use crate::plan::layout::Sharding;

/// The step.
pub const STEP: Step = Step::MegatronToHf;

/// Default largest shard, as `huggingface_hub` and transformers 4.x write them.
pub const DEFAULT_MAX_SHARD_SIZE: &str = "5GB";

/// A typed `convert/megatron_to_hf` request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The iteration directory read.
    pub megatron_path: PathBuf,
    /// The HF model that supplies config and tokenizer (and the layout to mirror).
    pub hf_model_id: Option<String>,
    /// Its resolved directory.
    pub hf_dir: Option<PathBuf>,
    /// The HF directory written.
    pub hf_path: PathBuf,
    /// Output dtype for floating-point weights.
    pub dtype: Option<DType>,
    /// Largest shard, in bytes.
    pub max_shard_size: u64,
    /// `auto` or `identity`.
    pub mapping: String,
    /// Mirror the shard file assignment of `hf_model_id`'s weights.
    pub mirror_shards: bool,
    /// Keep float32 tensors of a lower-precision checkpoint in float32.
    pub keep_fp32: bool,
    /// Convert what the two sides compute differently anyway.
    pub overrides: models::Overrides,
}

impl Request {
    /// Builds the request from parameters, checking everything that needs no data.
    ///
    /// # Errors
    /// [`PreflightError`] for missing or bad parameters and unsafe paths.
    pub fn from_params(p: &mut Params, overwrite: bool) -> Result<Request, Error> {
        let megatron_path = p.path("megatron_path", "the iter_NNNNNNN directory to read")?;
        let hf_model_id = p.opt("hf_model_id");
        let hf_path = p.path("hf_path", "the Hugging Face directory to write")?;
        let dtype = p.dtype(Some(DType::BF16))?;
        for name in ["tp", "pp", "ep", "etp"] {
            // Any saved layout is read; these only have to be well formed.
            p.positive(name, 1)?;
        }
        let mapping = p.choice("mapping", &["auto", "identity"], "auto")?;
        let size_text = p
            .opt("max_shard_size")
            .unwrap_or_else(|| DEFAULT_MAX_SHARD_SIZE.into());
        let max_shard_size =
            hf::parse_size(&size_text).ok_or_else(|| PreflightError::BadValue {
                name: "max_shard_size".into(),
                value: size_text.clone(),
                expected: "a size such as 5GB, 500MB or 2GiB".into(),
            })?;
        let mirror_shards = p.flag("mirror_shards", true)?;
        let keep_fp32 = p.flag("keep_fp32", true)?;
        let overrides = models::Overrides {
            rope_mismatch: p.flag("allow_rope_mismatch", false)?,
        };
        p.accept_ignored();
        p.finish()?;
        let hf_dir = hf_model_id.as_deref().map(hf::resolve_model).transpose()?;
        preflight::check_disjoint("hf_path", &hf_path, "megatron_path", &megatron_path)?;
        if let Some(dir) = &hf_dir {
            preflight::check_disjoint("hf_path", &hf_path, "hf_model_id", dir)?;
        }
        preflight::check_new("hf_path", &hf_path, overwrite)?;
        Ok(Request {
            megatron_path,
            hf_model_id,
            hf_dir,
            hf_path,
            dtype,
            max_shard_size,
            mapping,
            mirror_shards,
            keep_fp32,
            overrides,
        })
    }
}

/// Runs the step.
///
/// # Errors
/// [`Error`]: preflight refusals (exit 2), unreadable sources (2), write failures (1).
pub fn run(
    params: &mut Params,
    opts: &RunOptions,
    progress: &dyn Progress,
) -> Result<Report, Error> {
    let req = Request::from_params(params, opts.overwrite)?;
    let src = MegatronCheckpoint::open(&req.megatron_path)?;
    let config = match &req.hf_dir {
        Some(dir) => crate::formats::hf::read_config(dir)?,
        None => None,
    };
    let model = if req.mapping == "identity" {
        None
    } else {
        let dir = req.hf_dir.as_ref().ok_or_else(|| PreflightError::Missing {
            step: STEP.name().into(),
            name: "hf_model_id".into(),
            hint: "the Hugging Face model whose config and tokenizer the output is rebuilt from (or mapping=identity to export raw Megatron tensors)".into(),
        })?;
        Some(models::for_config(dir, config.as_ref(), req.overrides)?)
    };
    let reference = match &req.hf_dir {
        Some(dir) if dir.join(hf::INDEX_FILE).is_file() || dir.join(hf::SINGLE_FILE).is_file() => {
            Some(HfCheckpoint::open(dir)?)
        }
        _ => None,
    };
    let built = match &model {
        None => HfBuild {
            tensors: models::identity::tensors(&src, 0, req.dtype)?,
            skipped: src
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
                .collect(),
            warnings: Vec::new(),
        },
        Some(m) => m.export(
            &src,
            0,
            &models::ExportOptions {
                dtype: req.dtype,
                keep_fp32: req.keep_fp32,
                reference_has_head: reference
                    .as_ref()
                    .map(|r| r.by_name.contains_key(m.hf.head)),
            },
        )?,
    };
    let mut warnings = built.warnings;
    let mut side = Vec::new();
    // Mirror the reference's shard files when it has weights, as Megatron-Bridge
    // does; otherwise shard greedily like save_pretrained.
    let mut sharding = Sharding::MaxSize(req.max_shard_size);
    if let Some(dir) = &req.hf_dir {
        side = hf::side_files(dir)?;
        if let Some(reference) = reference.as_ref().filter(|_| req.mirror_shards) {
            let shard_of: HashMap<String, String> = reference.shard_of.clone();
            let covered = built.tensors.iter().all(|t| shard_of.contains_key(&t.name));
            if covered {
                sharding = Sharding::Assigned {
                    shard_of,
                    index: reference.index_metadata.is_some(),
                };
            } else {
                warnings.push(format!(
                    "hf_model_id={} names different tensors; sharding with max_shard_size instead of mirroring its shard files",
                    dir.display()
                ));
            }
        }
    } else {
        // No reference model: take the tokenizer saved inside the iteration, if any.
        let tok = src.dir.join("tokenizer");
        if tok.is_dir() {
            side = hf::side_files(&tok)?;
        }
        warnings.push(
            "no hf_model_id: config.json is not written, so transformers cannot load the output"
                .into(),
        );
    }
    let mut plan = crate::plan::tensor::plan_hf(built.tensors, &sharding)?;
    plan.skipped = built.skipped;
    crate::plan::tensor::copy_side_files(&mut plan, &side, "");
    if model.is_some()
        && let Some(cfg) = config
            .as_ref()
            .and_then(|c| models::Model::export_config(c, req.dtype))
    {
        plan.copied.retain(|c| c.rel != "config.json");
        plan.generated.push(crate::plan::Generated {
            rel: "config.json".into(),
            bytes: cfg.into_bytes(),
        });
    }
    let stores: [&dyn TensorStore; 1] = [&src];
    let mut sources = vec![crate::pipeline::megatron_source_info("megatron_path", &src)];
    if let Some(dir) = &req.hf_dir {
        sources.push(crate::pipeline::hf_source_info(
            "hf_model_id",
            dir,
            reference.as_ref(),
        ));
    }
    let target = Target {
        dir: req.hf_path.clone(),
        kind: ArtifactKind::CheckpointHf,
        run_dir: None,
        // The forward pass of the output must reproduce the source's.
        reference: (req.mapping != "identity").then(|| req.megatron_path.clone()),
        hf_model: req.hf_dir.clone(),
        rope_as_megatron: req.overrides.rope_mismatch,
    };
    crate::pipeline::execute_and_publish(
        STEP,
        params.all(),
        plan,
        &stores,
        sources,
        target,
        opts,
        progress,
        params.with_ignored(warnings),
    )
}
