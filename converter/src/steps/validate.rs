//! `convert/validate`: the validation every conversion runs before it publishes,
//! as a step of its own on a published output (`ckpt-convert validate PATH …` or
//! `ckpt-convert run convert/validate path=…`).
//!
//! Parameters: `path` (an HF directory, a Megatron iter_* directory, or a run
//! directory whose tracker names one), `reference` (the source it was converted
//! from: then the forward pass of both is compared), `hf_model_id` (the HF model
//! whose config.json and tokenizer describe a Megatron checkpoint without a
//! usable run_config.yaml or tokenizer), `smoke_test` (default true; false skips
//! the forward pass), `generate` (decode `max_new_tokens`, default 8, greedy
//! tokens after `prompt` and report the text), `tokens` (comma-separated ids for
//! the forward pass of `dump_logits`), `dump_logits` (write the output's f32
//! logits for `tokens`, default the smoke test's fixed ids, to a safetensors
//! file with `logits` `[tokens, rows of the output layer]` and `tokens`).
//!
//! Nothing here writes into `path` except the report `ckpt-validation.json`
//! beside an output that has our manifest; a source is never modified or deleted.

use ckpt_wire::ArtifactKind;
use ckpt_wire::Step;
use std::path::{Path, PathBuf};

use crate::formats::{hf, megatron};
use crate::pipeline::error::{Error, ValidationError};
use crate::pipeline::preflight::PreflightError;
use crate::smoke;
use crate::validate::{self, Report};

use super::Params;

/// The step.
pub const STEP: Step = Step::Validate;

/// The default prompt of `generate=true`.
pub const DEFAULT_PROMPT: &str = "The capital of France is";

/// A typed `convert/validate` request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The directory validated (an iteration directory for Megatron).
    pub dir: PathBuf,
    /// `checkpoint_hf` or `checkpoint_megatron`.
    pub kind: ArtifactKind,
    /// What validation runs.
    pub options: validate::Options,
    /// Greedy decoding after this prompt.
    pub generate: Option<String>,
    /// Tokens to decode.
    pub max_new_tokens: usize,
    /// Token ids for `dump_logits`.
    pub tokens: Option<Vec<u32>>,
    /// Where to write the logits.
    pub dump_logits: Option<PathBuf>,
}

/// A checkpoint directory: an iteration when a run directory's tracker names one.
///
/// # Errors
/// [`PreflightError::BadValue`] when it is not a directory.
pub fn resolve_dir(name: &'static str, path: &Path) -> Result<PathBuf, PreflightError> {
    let mut dir = path.to_owned();
    if !dir.join(".metadata").is_file()
        && let Some(Ok(latest)) = megatron::read_tracker(&dir)
    {
        dir = dir.join(latest.map_or("release".to_owned(), megatron::iter_dir_name));
    }
    if !dir.is_dir() {
        return Err(PreflightError::BadValue {
            name: name.into(),
            value: path.display().to_string(),
            expected: "an HF directory, a Megatron iter_* directory, or a run directory naming one"
                .into(),
        });
    }
    Ok(dir)
}

/// The kind of checkpoint in `dir`.
pub fn kind_of(dir: &Path) -> ArtifactKind {
    if dir.join(".metadata").is_file() {
        ArtifactKind::CheckpointMegatron
    } else {
        ArtifactKind::CheckpointHf
    }
}

impl Request {
    /// Builds the request from parameters.
    ///
    /// # Errors
    /// [`PreflightError`] for missing or bad parameters and paths that are not
    /// checkpoints.
    pub fn from_params(p: &mut Params) -> Result<Request, Error> {
        let path = p.path(
            "path",
            "the output to validate (an HF directory or a Megatron iter_* directory)",
        )?;
        let reference = p.opt("reference").map(PathBuf::from);
        let hf_model_id = p.opt("hf_model_id");
        let smoke_test = p.flag("smoke_test", true)?;
        let generate = p.flag("generate", false)?;
        let prompt = p.opt("prompt").unwrap_or_else(|| DEFAULT_PROMPT.to_owned());
        let max_new_tokens = p.positive("max_new_tokens", 8)? as usize;
        let tokens = match p.opt("tokens") {
            None => None,
            Some(text) => Some(
                text.split(',')
                    .map(|t| t.trim().parse::<u32>())
                    .collect::<Result<Vec<_>, _>>()
                    .ok()
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| PreflightError::BadValue {
                        name: "tokens".into(),
                        value: text.clone(),
                        expected: "comma-separated token ids".into(),
                    })?,
            ),
        };
        let dump_logits = p.opt("dump_logits").map(PathBuf::from);
        p.finish()?;
        let dir = resolve_dir("path", &path)?;
        let reference = reference
            .map(|r| resolve_dir("reference", &r))
            .transpose()?;
        let hf_model = hf_model_id.as_deref().map(hf::resolve_model).transpose()?;
        Ok(Request {
            kind: kind_of(&dir),
            dir,
            options: validate::Options {
                reference,
                hf_model,
                smoke_test,
                rope_as_megatron: false,
                known: Default::default(),
            },
            generate: generate.then_some(prompt),
            max_new_tokens,
            tokens,
            dump_logits,
        })
    }
}

/// Runs the step: validation, then the optional generation and logits dump.
/// The report is written beside the output (`ckpt-validation.json`) when the
/// output carries our manifest.
///
/// # Errors
/// [`Error`] for bad parameters (exit 2), and when generation or the logits dump
/// cannot run (exit 1). Failed checks are in the report, not an error.
pub fn run(params: &mut Params) -> Result<Report, Error> {
    let req = Request::from_params(params)?;
    let mut report = validate::validate_with(&req.dir, req.kind, true, &req.options);
    let hf_model = req.options.hf_model.as_deref();
    if req.generate.is_some() || req.dump_logits.is_some() {
        let model =
            smoke::Model::open(&req.dir, hf_model).map_err(|e| ValidationError::Unreadable {
                path: req.dir.clone(),
                why: e.to_string(),
            })?;
        if let Some(prompt) = &req.generate {
            let forward = |why: String| ValidationError::Forward {
                path: req.dir.clone(),
                what: "generation",
                why,
            };
            let tok = smoke::generate::tokenizer_file(&req.dir, hf_model).ok_or_else(|| {
                forward(
                    "no tokenizer.json (nor tokenizer/tokenizer.json); hf_model_id= names a model that has one"
                        .into(),
                )
            })?;
            let g = smoke::generate::generate(&model, &tok, prompt, req.max_new_tokens, hf_model)
                .map_err(forward)?;
            report.generation = Some(g);
        }
        if let Some(out) = &req.dump_logits {
            let tokens = req
                .tokens
                .clone()
                .unwrap_or_else(|| smoke::tokens(model.arch.vocab, smoke::TOKENS));
            let logits = model
                .logits(&tokens, None)
                .map_err(|why| ValidationError::Forward {
                    path: req.dir.clone(),
                    what: "logits dump",
                    why,
                })?;
            write_logits(out, &tokens, &logits)?;
        }
    }
    if req.dir.join(crate::formats::manifest::FILE_NAME).is_file() {
        let mut text = serde_json::to_string_pretty(&report).expect("report serializes");
        text.push('\n');
        // A read-only output still validates; the report is then only printed.
        if let Err(e) =
            crate::publish::write_atomic(&req.dir.join(validate::FILE_NAME), text.as_bytes())
        {
            tracing::warn!(error = %e, "the validation report could not be written beside the output");
        }
    }
    Ok(report)
}

/// Writes `logits` (f32) and `tokens` (i64) as a safetensors file.
///
/// # Errors
/// [`ValidationError::Forward`] naming the file.
pub fn write_logits(path: &Path, tokens: &[u32], logits: &smoke::Logits) -> Result<(), Error> {
    use safetensors::tensor::TensorView;
    let lbytes: Vec<u8> = logits.values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tbytes: Vec<u8> = tokens
        .iter()
        .flat_map(|&t| i64::from(t).to_le_bytes())
        .collect();
    let err = |e: safetensors::SafeTensorError| -> Error {
        ValidationError::Forward {
            path: path.to_owned(),
            what: "logits dump",
            why: e.to_string(),
        }
        .into()
    };
    let views = vec![
        (
            "logits",
            TensorView::new(
                safetensors::Dtype::F32,
                vec![logits.tokens, logits.cols],
                &lbytes,
            )
            .map_err(err)?,
        ),
        (
            "tokens",
            TensorView::new(safetensors::Dtype::I64, vec![tokens.len()], &tbytes).map_err(err)?,
        ),
    ];
    safetensors::tensor::serialize_to_file(views, None, path).map_err(err)
}
