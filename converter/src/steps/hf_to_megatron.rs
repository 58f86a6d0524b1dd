//! `convert/hf_to_megatron`: a Hugging Face directory into a Megatron-Core
//! `torch_dist` iteration directory, as Megatron-Bridge's import writes it.

use ckpt_wire::ArtifactKind;
use ckpt_wire::Step;
use std::path::PathBuf;

use super::Params;
use crate::execute::Progress;
use crate::formats::dtype::DType;
use crate::formats::hf::{self, HfCheckpoint};
use crate::formats::megatron;
use crate::formats::run_config;
use crate::formats::run_config::Parallelism;
use crate::models::{self, MegatronBuild};
use crate::pipeline::error::Error;
use crate::pipeline::preflight::{self, PreflightError};
use crate::pipeline::{Report, RunOptions, Target};
use crate::plan::{Generated, TensorStore};

/// The step.
pub const STEP: Step = Step::HfToMegatron;

/// A typed `convert/hf_to_megatron` request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The HF model (directory or cached id).
    pub hf_model_id: String,
    /// The resolved HF directory.
    pub hf_dir: PathBuf,
    /// The run directory written to.
    pub run_dir: PathBuf,
    /// The iteration directory written.
    pub iter_dir: PathBuf,
    /// The iteration number.
    pub iteration: u64,
    /// Parameter dtype of the Megatron model.
    pub dtype: DType,
    /// Tensor parallel size the checkpoint is meant for.
    pub tp: u64,
    /// Pipeline parallel size.
    pub pp: u64,
    /// Expert parallel size.
    pub ep: u64,
    /// Expert tensor parallel size.
    pub etp: u64,
    /// `auto` (by architecture) or `identity`.
    pub mapping: String,
    /// Number of `.distcp` files.
    pub distcp_files: usize,
    /// `make_vocab_size_divisible_by`, when given.
    pub vocab_multiple: Option<u64>,
    /// Keep float32 tensors of a lower-precision source in float32.
    pub keep_fp32: bool,
    /// Convert what the two sides compute differently anyway.
    pub overrides: models::Overrides,
}

impl Request {
    /// Builds the request from parameters, checking everything that needs no data.
    ///
    /// # Errors
    /// [`PreflightError`] for missing or bad parameters, unresolvable model ids,
    /// outputs overlapping the input or already present.
    pub fn from_params(p: &mut Params, overwrite: bool) -> Result<Request, Error> {
        let hf_model_id = p.required(
            "hf_model_id",
            "a Hugging Face model directory or a cached model id",
        )?;
        let megatron_path = p.path(
            "megatron_path",
            "the run directory or iter_NNNNNNN directory to write",
        )?;
        let dtype = p.dtype(Some(DType::BF16))?.unwrap_or(DType::BF16);
        let tp = p.positive("tp", 1)?;
        let pp = p.positive("pp", 1)?;
        let ep = p.positive("ep", 1)?;
        let etp = p.positive("etp", 1)?;
        let mapping = p.choice("mapping", &["auto", "identity"], "auto")?;
        let default_iteration = p.count("iteration", 0)?;
        let distcp_files = p.positive("distcp_files", 2)? as usize;
        let vocab_multiple = match p.opt("make_vocab_size_divisible_by") {
            None => None,
            Some(_) => Some(p.positive("make_vocab_size_divisible_by", 1)?),
        };
        let keep_fp32 = p.flag("keep_fp32", true)?;
        let overrides = models::Overrides {
            rope_mismatch: p.flag("allow_rope_mismatch", false)?,
        };
        p.accept_ignored();
        p.finish()?;
        let hf_dir = hf::resolve_model(&hf_model_id)?;
        let (run_dir, iter_dir, iteration) =
            crate::pipeline::resolve_megatron_output(&megatron_path, default_iteration);
        preflight::check_disjoint("megatron_path", &iter_dir, "hf_model_id", &hf_dir)?;
        preflight::check_disjoint(
            "megatron_path",
            &run_dir.join(megatron::TRACKER),
            "hf_model_id",
            &hf_dir,
        )?;
        preflight::check_new("megatron_path", &iter_dir, overwrite)?;
        preflight::check_run_dir("megatron_path", &run_dir)?;
        if run_dir.is_file() {
            return Err(PreflightError::BadValue {
                name: "megatron_path".into(),
                value: megatron_path.display().to_string(),
                expected: "a directory (or a path that does not exist yet)".into(),
            }
            .into());
        }
        Ok(Request {
            hf_model_id,
            hf_dir,
            run_dir,
            iter_dir,
            iteration,
            dtype,
            tp,
            pp,
            ep,
            etp,
            mapping,
            distcp_files,
            vocab_multiple,
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
    let src = HfCheckpoint::open(&req.hf_dir)?;
    let side = hf::side_files(&req.hf_dir)?;
    let config = crate::formats::hf::read_config(&req.hf_dir)?;
    let parallel = Parallelism {
        tp: req.tp,
        pp: req.pp,
        ep: req.ep,
        etp: req.etp,
    };
    let built = if req.mapping == "identity" {
        MegatronBuild {
            chunks: models::identity::chunks(&src, 0, Some(req.dtype))?,
            model_config: run_config::parallel_fields(&parallel, req.dtype),
            warnings: vec![models::identity::IMPORT_WARNING.into()],
            ..MegatronBuild::default()
        }
    } else {
        let model = models::for_config(&req.hf_dir, config.as_ref(), req.overrides)?;
        model.check_parallelism(&parallel)?;
        let import = models::ImportOptions {
            parallel,
            dtype: req.dtype,
            vocab_multiple: req.vocab_multiple,
            hf_model_id: req.hf_model_id.clone(),
            keep_fp32: req.keep_fp32,
        };
        let mut built = model.import(&src, 0, &import)?;
        if !model.has_experts() && (req.ep > 1 || req.etp > 1) {
            built.warnings.push(format!(
                "ep={} etp={} have no effect on a dense {}",
                req.ep, req.etp, model.architecture
            ));
        }
        built
    };
    let mut plan = crate::plan::tensor::plan_megatron(built.chunks, &built.bytes, req.distcp_files);
    plan.skipped = built.skipped;
    plan.generated.push(Generated {
        rel: "metadata.json".into(),
        bytes: megatron::METADATA_JSON.as_bytes().to_vec(),
    });
    plan.generated.push(Generated {
        rel: "common.pt".into(),
        bytes: megatron::common_pt(req.iteration),
    });
    plan.generated.push(Generated {
        rel: "train_state.pt".into(),
        bytes: megatron::train_state_pt(req.iteration),
    });
    plan.generated.push(Generated {
        rel: "run_config.yaml".into(),
        bytes: run_config::render(&run_config::RunConfig {
            model: built.model_config.clone(),
            hf_model_id: req.hf_model_id.clone(),
        })
        .into_bytes(),
    });
    // Megatron-Bridge keeps the tokenizer and chat template inside the iteration.
    crate::plan::tensor::copy_side_files(
        &mut plan,
        &crate::plan::tensor::tokenizer_files(&side),
        "tokenizer/",
    );
    let stores: [&dyn TensorStore; 1] = [&src];
    let sources = vec![crate::pipeline::hf_source_info(
        "hf_model_id",
        &req.hf_dir,
        Some(&src),
    )];
    let target = Target {
        dir: req.iter_dir.clone(),
        kind: ArtifactKind::CheckpointMegatron,
        run_dir: Some((req.run_dir.clone(), req.iteration)),
        // The forward pass of the output must reproduce the source's.
        reference: (req.mapping != "identity").then(|| req.hf_dir.clone()),
        hf_model: Some(req.hf_dir.clone()),
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
        params.with_ignored(built.warnings),
    )
}
