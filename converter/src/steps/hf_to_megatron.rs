//! `convert/hf_to_megatron`: a Hugging Face directory into a Megatron-Core
//! `torch_dist` iteration directory, as Megatron-Bridge's import writes it.

use std::path::PathBuf;

use super::{
    ChunkOut, Params, Report, RunOptions, Target, copy_transform, out_dtype, row_len, rows,
};
use crate::dtype::DType;
use crate::error::Error;
use crate::execute::Progress;
use crate::formats::hf::{self, HfCheckpoint};
use crate::formats::megatron;
use crate::layout::DcpBytesSpec;
use crate::models::{self, Mapping};
use crate::plan::{Generated, Input, PlanError, RowGather, TensorStore};
use crate::preflight::{self, PreflightError};
use crate::run_config;

/// The step name.
pub const STEP: &str = "convert/hf_to_megatron";

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
        p.accept_ignored(&["trust_remote_code", "device_map", "distributed"]);
        p.finish()?;
        let hf_dir = hf::resolve_model(&hf_model_id)?;
        let (run_dir, iter_dir, iteration) =
            super::resolve_megatron_output(&megatron_path, default_iteration);
        preflight::check_disjoint("megatron_path", &iter_dir, "hf_model_id", &hf_dir)?;
        preflight::check_disjoint(
            "megatron_path",
            &run_dir.join(megatron::TRACKER),
            "hf_model_id",
            &hf_dir,
        )?;
        preflight::check_new("megatron_path", &iter_dir, overwrite)?;
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
    let config = models::read_config(&req.hf_dir)?;
    let mapping: Box<dyn Mapping> = if req.mapping == "identity" {
        Box::new(models::Identity)
    } else {
        models::for_config(&req.hf_dir, config.as_ref())?
    };
    let parallel = models::Parallelism {
        tp: req.tp,
        pp: req.pp,
        ep: req.ep,
        etp: req.etp,
    };
    mapping.check_parallelism(&parallel)?;
    let import = models::ImportOptions {
        parallel,
        dtype: req.dtype,
        vocab_multiple: req.vocab_multiple,
        hf_model_id: req.hf_model_id.clone(),
    };
    let built = mapping.hf_to_megatron(&src, 0, &import)?;
    let mut plan = super::plan_megatron(built.chunks, &built.bytes, req.distcp_files);
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
    super::copy_side_files(&mut plan, &super::tokenizer_files(&side), "tokenizer/");
    let stores: [&dyn TensorStore; 1] = [&src];
    let sources = vec![super::hf_source_info(
        "hf_model_id",
        &req.hf_dir,
        Some(&src),
    )];
    let target = Target {
        dir: req.iter_dir.clone(),
        kind: "checkpoint_megatron".into(),
        run_dir: Some((req.run_dir.clone(), req.iteration)),
        // The forward pass of the output must reproduce the source's.
        reference: (req.mapping != "identity").then(|| req.hf_dir.clone()),
        hf_model: Some(req.hf_dir.clone()),
    };
    super::execute_and_publish(
        STEP,
        params,
        plan,
        &stores,
        sources,
        target,
        opts,
        progress,
        built.warnings,
    )
}

/// The identity mapping's chunks: every HF tensor under its own name, one chunk.
pub fn identity_chunks(
    src: &dyn TensorStore,
    store: usize,
    dtype: Option<DType>,
) -> Result<Vec<ChunkOut>, PlanError> {
    let mut chunks = Vec::new();
    for (i, t) in src.tensors().iter().enumerate() {
        let to = out_dtype(t.dtype, dtype);
        crate::dtype::check_cast(t.dtype, to).map_err(|source| PlanError::Cast {
            tensor: t.name.clone(),
            source,
        })?;
        chunks.push(ChunkOut {
            fqn: t.name.clone(),
            global_shape: t.shape.clone(),
            offsets: vec![0; t.shape.len()],
            sizes: t.shape.clone(),
            dtype: to,
            inputs: vec![Input::whole(store, i, t)],
            gather: RowGather::copy(rows(&t.shape), row_len(&t.shape)),
            transform: copy_transform(t.dtype, to),
        });
    }
    Ok(chunks)
}

/// No bytes items: the identity mapping has no module state to write.
pub fn no_bytes() -> Vec<DcpBytesSpec> {
    Vec::new()
}
