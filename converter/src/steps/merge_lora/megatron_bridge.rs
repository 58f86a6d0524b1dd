//! `backend=megatron_bridge`: a Megatron-Bridge adapter checkpoint merged into a
//! Megatron base, with the HF export of the merged model.

use super::{
    Common, STEP, check_digest, check_dtype, expected_digests, name_note, refuse_quantized,
};
use crate::execute::{Outcome, Progress};
use crate::formats::hf::{self, HfCheckpoint};
use crate::formats::manifest;
use crate::formats::megatron::{self, MegatronCheckpoint};
use crate::formats::run_config::{self, Parallelism};
use crate::lora::LoraError;
use crate::lora::base::{Claim, Identity};
use crate::lora::megatron_bridge::{self, BridgeConfig, Planner, QkvLayout};
use crate::models;
use crate::pipeline::error::Error;
use crate::pipeline::preflight::{self, PreflightError};
use crate::pipeline::{Prepared, Report, RunOptions, Target};
use crate::plan::layout::{DcpBytesSpec, Sharding};
use crate::plan::tensor::{ChunkOut, row_len, rows};
use crate::plan::{Copied, Generated, Input, LoraMerge, Rounding, RowGather, TensorStore};
use crate::steps::Params;
use ckpt_wire::ArtifactKind;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The Megatron-Bridge adapter updates of an output tensor whose inputs are
/// `inputs` (rows of base weights, in the output's row order).
fn bridge_updates(
    planner: &megatron_bridge::Planner<'_>,
    base: &MegatronCheckpoint,
    inputs: &[Input],
) -> megatron_bridge::Planned {
    let mut out = megatron_bridge::Planned {
        inputs: Vec::new(),
        updates: Vec::new(),
    };
    // Only matrices (and stacks of them) have adapters.
    let Some(n) = inputs.first().map(|i| i.sizes.len()).filter(|n| *n >= 2) else {
        return out;
    };
    let total: u64 = inputs.iter().map(|i| i.sizes[n - 2]).sum();
    let mut row = 0u64;
    for group in inputs.chunk_by(|a, b| a.tensor == b.tensor) {
        let first = &group[0];
        let rows: u64 = group.iter().map(|i| i.sizes[n - 2]).sum();
        if let Some((module, layer, fused)) = megatron_bridge::weight_of_chunk(
            &base.tensors[first.tensor],
            &first.offsets,
            &first.sizes,
        ) {
            let runs: Vec<(u64, u64)> = group
                .iter()
                .map(|i| (i.offsets[n - 2], i.sizes[n - 2]))
                .collect();
            let cols = (first.offsets[n - 1], first.sizes[n - 1]);
            if let Some(p) = planner.updates(
                module,
                layer,
                fused,
                &runs,
                cols,
                (row, total),
                inputs.len() + out.inputs.len(),
            ) {
                out.inputs.extend(p.inputs);
                out.updates.extend(p.updates);
            }
        }
        row += rows;
    }
    out
}

pub(super) fn run(
    params: &mut Params,
    common: &Common,
    opts: &RunOptions,
    progress: &dyn Progress,
) -> Result<Report, Error> {
    let base_given = params.path(
        "base_megatron_path",
        "the Megatron checkpoint (iter_* or run directory) of the base the adapter was trained on",
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
        .unwrap_or_else(|| crate::steps::megatron_to_hf::DEFAULT_MAX_SHARD_SIZE.into());
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
    // A run directory is read at its latest iteration, as Megatron-Bridge's
    // `pretrained_checkpoint` is.
    let (base_path, base_note) = megatron::resolve_iteration(
        &base_given,
        "base_megatron_path",
        "the base's Megatron checkpoint",
    )
    .map_err(|why| PreflightError::BadValue {
        name: "base_megatron_path".into(),
        value: base_given.display().to_string(),
        expected: why,
    })?;
    let (run_dir, iter_dir, iteration) =
        crate::pipeline::resolve_megatron_output(&out_megatron, default_iteration);
    let hf_dir = hf_source.as_deref().map(hf::resolve_model).transpose()?;
    let mut inputs: Vec<(&str, &Path)> = vec![
        ("base_megatron_path", &base_given),
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
    let mut warnings: Vec<String> = note.into_iter().chain(base_note).collect();
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
    // Names are compared even when checkpoint.pretrained_checkpoint is this very
    // directory: a path can be reused for another model.
    warnings.extend(name_note(
        &claim,
        &id,
        "base_megatron_path",
        common.allow_base_mismatch,
    )?);
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
                    (0, c.sizes[n - 2]),
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
    match (&base.run_config, common.parallel) {
        (Some(rc), [None, None, None]) => mplan.copied.push(Copied {
            rel: "run_config.yaml".into(),
            from: rc.clone(),
            kind: "run_config".into(),
        }),
        // The sizes asked for replace the base's; the rest of its record stays.
        (Some(rc), asked) => {
            let text = crate::formats::file::read_text(rc, crate::formats::file::limit::YAML)?;
            let size = |key: &str| {
                base_run
                    .as_ref()
                    .and_then(|v| megatron_bridge::field(v, &format!("model.{key}")))
                    .and_then(|v| v.as_u64())
                    .unwrap_or(1)
            };
            let p = Parallelism {
                tp: asked[0].unwrap_or_else(|| size("tensor_model_parallel_size")),
                pp: asked[1].unwrap_or_else(|| size("pipeline_model_parallel_size")),
                ep: asked[2].unwrap_or_else(|| size("expert_model_parallel_size")),
                etp: size("expert_tensor_parallel_size"),
            };
            if let Some(m) = &model {
                m.check_parallelism(&p)?;
            }
            let edited = run_config::with_parallel(&text, &p).map_err(|why| LoraError::Refused {
                path: rc.clone(),
                why: format!("cannot record tp/pp/ep: {why}"),
            })?;
            mplan.generated.push(Generated {
                rel: "run_config.yaml".into(),
                bytes: edited.into_bytes(),
            });
        }
        (None, _) => warnings.push(format!(
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
                // An HF tensor is rows of one Megatron weight, or of several stacked
                // on each other (Mamba's in_proj from its five components): each run of
                // inputs from one weight is updated by that module's adapter.
                let planned = bridge_updates(&planner, &base, &t.inputs);
                hf_merges.push((!planned.updates.is_empty()).then(|| {
                    t.inputs.extend(planned.inputs);
                    t.transform = format!("{} + {transform}", t.transform);
                    LoraMerge {
                        updates: planned.updates,
                    }
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
            Prepared::Planned(r) | Prepared::Partial(r) => Ok(r),
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
