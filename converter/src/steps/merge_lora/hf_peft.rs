//! `backend=hf_peft`: a PEFT adapter merged into an HF base.

use super::{
    Common, STEP, check_digest, check_dtype, expected_digests, name_note, refuse_quantized,
};
use crate::execute::{Outcome, Progress};
use crate::formats::hf::{self, HfCheckpoint};
use crate::formats::manifest;
use crate::lora::base::{Claim, Identity};
use crate::lora::peft::plan as peft_plan;
use crate::lora::peft::{self, AdapterConfig, AdapterWeights};
use crate::models;
use crate::pipeline::error::Error;
use crate::pipeline::preflight::{self};
use crate::pipeline::{Report, RunOptions, SourceInfo, Target};
use crate::plan::layout::Sharding;
use crate::plan::{Generated, Plan, TensorStore};
use crate::steps::Params;
use ckpt_wire::ArtifactKind;
use std::path::Path;

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

pub(super) fn run(
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
    if common.parallel.iter().any(Option::is_some) {
        warnings.push(
            "tp, pp and ep have no effect on a PEFT merge: its output is an HF checkpoint".into(),
        );
    }
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
    let naming = base_config
        .as_ref()
        .and_then(models::family_of)
        .map(|f| peft_plan::Naming {
            renames: f.hf_module_renames(),
            expert_params: f.hf_expert_params(),
        })
        .unwrap_or_default();
    let planned = peft_plan::plan(
        &base_ckpt,
        base_config.as_ref(),
        &weights,
        &cfg,
        &keys,
        naming,
    )?;
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
        crate::pipeline::Prepared::Planned(r) | crate::pipeline::Prepared::Partial(r) => Ok(r),
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
