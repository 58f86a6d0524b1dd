//! The numeric smoke test: a short forward pass of fixed tokens through a source
//! and through its converted output, logits compared; and, for LoRA merges, a
//! probe of every merged tensor with random vectors ([`probe`]).
//!
//! The forward is our own small f32 decoder ([`forward`], [`kernels`]) over two
//! weight views ([`views`]): Hugging Face names, and Megatron-Core's fused
//! tensors split at run time as Megatron-Core splits them. Neither view uses the
//! conversion's mapping ([`crate::models`]); the configuration is read again by
//! [`crate::reference`]. Both views share the arithmetic, so the interop suite
//! (`e2e/interop/test_validate.py`) proves the arithmetic against transformers
//! and megatron-core (`--dump-logits`).
//!
//! Memory follows the converter's promise: weights are read layer by layer in
//! blocks of rows from the mapped files and released after use, so a model of
//! any size validates in a few hundred megabytes.
//!
//! # Tolerance
//! Source and output are computed in f32 from the same weights (when the output
//! has another dtype, the source's weights are rounded to it as they are read,
//! as the converter's cast does), through the same kernels, so an exact
//! conversion gives (nearly) identical logits: only a different summation order
//! could separate them, by a few f32 ulps of the logits. The check passes when
//! `max |Δlogit| ≤ 1e-4 · max |logit|` ([`RELATIVE_TOLERANCE`], relative so that
//! it means the same for a model whose logits are 0.02 or 30); a swapped head
//! block, a wrong norm, a shifted vocabulary row or a missing bias moves the
//! logits by orders of magnitude more (the integration tests pin both).

pub mod bf16_rows;
pub mod forward;
pub mod generate;
pub mod kernels;
pub mod probe;
pub mod residual;
pub mod views;

use ckpt_wire::ArtifactKind;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::formats::dtype::DType;
use crate::formats::hf::HfCheckpoint;
use crate::formats::megatron::MegatronCheckpoint;
use crate::formats::source::GlobalTensor;

pub use crate::reference::Arch;
pub use forward::Logits;

/// Tokens of the forward pass.
pub const TOKENS: usize = 8;

/// The comparison's tolerance, relative to the largest logit magnitude.
pub const RELATIVE_TOLERANCE: f64 = 1e-4;

/// Why a smoke test did not give a number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SmokeError {
    /// No forward pass exists for the model (another architecture, an option the
    /// forward does not compute, no configuration).
    #[error("not applicable: {0}")]
    NotApplicable(String),
    /// The checkpoint could not be read or does not fit its configuration.
    #[error("{0}")]
    Failed(String),
}

/// The fixed token ids of the smoke test: both ends of the vocabulary and a
/// spread of ids between them.
pub fn tokens(vocab: usize, n: usize) -> Vec<u32> {
    let v = vocab.max(1) as u64;
    let mut out = vec![1 % v, v - 1];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.push(x.wrapping_mul(0x9E37_79B9_7F4A_7C15) % v);
    }
    out.truncate(n);
    out.into_iter().map(|t| t as u32).collect()
}

/// A checkpoint opened for the forward pass.
pub enum Checkpoint {
    /// A Hugging Face directory.
    Hf(HfCheckpoint),
    /// A Megatron-Core iteration directory.
    Megatron(MegatronCheckpoint),
}

/// A checkpoint with the configuration its forward follows.
pub struct Model {
    /// The weights.
    pub ckpt: Checkpoint,
    /// The configuration.
    pub arch: Arch,
    /// Where the configuration came from (`config.json`, `run_config.yaml`, or
    /// `hf_model_id`'s config.json).
    pub config_source: String,
}

fn read_json(path: &Path) -> Result<Option<serde_json::Value>, SmokeError> {
    crate::formats::hf::read_json_opt(path).map_err(|e| SmokeError::Failed(e.to_string()))
}

/// The configuration of an HF directory: its config.json.
///
/// # Errors
/// [`SmokeError::NotApplicable`] without a config.json or for an architecture
/// without a forward.
pub fn hf_arch(dir: &Path) -> Result<Arch, SmokeError> {
    let path = dir.join("config.json");
    let cfg = read_json(&path)?.ok_or_else(|| {
        SmokeError::NotApplicable(format!("{} has no config.json", dir.display()))
    })?;
    Arch::from_hf_config(&cfg).map_err(SmokeError::NotApplicable)
}

/// The configuration of a Megatron iteration: its run_config.yaml, else the
/// config.json of `hf_config` (the HF model it belongs to). Returns it with where
/// it came from.
///
/// # Errors
/// [`SmokeError::NotApplicable`] when neither describes a dense decoder.
pub fn megatron_arch(dir: &Path, hf_config: Option<&Path>) -> Result<(Arch, String), SmokeError> {
    let rc_path = dir.join("run_config.yaml");
    let from_rc =
        match crate::formats::file::read_text_opt(&rc_path, crate::formats::file::limit::YAML) {
            Ok(Some(text)) => crate::formats::yaml::parse(&text)
                .map_err(|e| format!("{}: {e}", rc_path.display()))
                .and_then(|v| Arch::from_run_config(&v)),
            Ok(None) => Err(format!("{} has no run_config.yaml", dir.display())),
            Err(e) => Err(e.to_string()),
        };
    match (from_rc, hf_config) {
        (Ok(a), _) => Ok((a, "run_config.yaml".into())),
        (Err(why), Some(h)) => match hf_arch(h) {
            Ok(a) => Ok((a, format!("{}/config.json", h.display()))),
            Err(e) => Err(SmokeError::NotApplicable(format!("{why}; and {e}"))),
        },
        (Err(why), None) => Err(SmokeError::NotApplicable(format!(
            "{why} (hf_model_id= names the HF model whose config.json describes it)"
        ))),
    }
}

/// The dtype every floating-point tensor has, if they agree.
pub fn uniform_float_dtype(tensors: &[GlobalTensor]) -> Option<DType> {
    let mut it = tensors
        .iter()
        .filter(|t| t.dtype.is_float())
        .map(|t| t.dtype);
    let first = it.next()?;
    it.all(|d| d == first).then_some(first)
}

impl Model {
    /// Opens `dir`: a Megatron iteration when it has `.metadata`, else an HF
    /// directory. `hf_config` describes a Megatron iteration without a usable
    /// run_config.yaml.
    ///
    /// # Errors
    /// [`SmokeError`].
    pub fn open(dir: &Path, hf_config: Option<&Path>) -> Result<Model, SmokeError> {
        if dir.join(".metadata").is_file() {
            let (arch, config_source) = megatron_arch(dir, hf_config)?;
            let ckpt =
                MegatronCheckpoint::open(dir).map_err(|e| SmokeError::Failed(e.to_string()))?;
            Ok(Model {
                ckpt: Checkpoint::Megatron(ckpt),
                arch,
                config_source,
            })
        } else {
            let arch = hf_arch(dir)?;
            let ckpt = HfCheckpoint::open(dir).map_err(|e| SmokeError::Failed(e.to_string()))?;
            Ok(Model {
                ckpt: Checkpoint::Hf(ckpt),
                arch,
                config_source: "config.json".into(),
            })
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        match &self.ckpt {
            Checkpoint::Hf(c) => &c.root,
            Checkpoint::Megatron(c) => &c.dir,
        }
    }

    /// `checkpoint_hf` or `checkpoint_megatron`.
    pub fn kind(&self) -> ArtifactKind {
        match &self.ckpt {
            Checkpoint::Hf(_) => ArtifactKind::CheckpointHf,
            Checkpoint::Megatron(_) => ArtifactKind::CheckpointMegatron,
        }
    }

    /// The tensors.
    pub fn tensors(&self) -> &[GlobalTensor] {
        match &self.ckpt {
            Checkpoint::Hf(c) => &c.tensors,
            Checkpoint::Megatron(c) => &c.tensors,
        }
    }

    /// The forward pass of `tokens`; with `round_to`, weights are rounded to that
    /// dtype as they are read.
    ///
    /// # Errors
    /// A message naming the tensor that is missing or does not fit.
    pub fn logits(&self, tokens: &[u32], round_to: Option<DType>) -> Result<Logits, String> {
        self.logits_as(&self.arch, tokens, round_to)
    }

    /// The forward pass computed as `arch` says (the model's own configuration
    /// with a rule of the other side's, to compare like with like).
    ///
    /// # Errors
    /// A message naming the tensor that is missing or does not fit.
    pub fn logits_as(
        &self,
        arch: &Arch,
        tokens: &[u32],
        round_to: Option<DType>,
    ) -> Result<Logits, String> {
        match &self.ckpt {
            Checkpoint::Hf(c) => {
                forward::forward(&views::HfView::new(c, arch.clone(), round_to)?, tokens)
            }
            Checkpoint::Megatron(c) => {
                forward::forward(&views::MegatronView::new(c, arch.clone(), round_to), tokens)
            }
        }
    }
}

/// What comparing two forward passes found.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// The reference (source) directory.
    pub reference: PathBuf,
    /// Tokens in the forward pass.
    pub tokens: usize,
    /// Logit columns compared (the vocabulary).
    pub vocab: usize,
    /// Largest absolute difference of the logits.
    pub max_abs_diff: f64,
    /// Largest absolute logit of the reference.
    pub max_abs_logit: f64,
    /// The tolerance applied ([`RELATIVE_TOLERANCE`] · max_abs_logit).
    pub tolerance: f64,
    /// The dtype the reference's weights were rounded to as read (the output's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference_rounded_to: Option<String>,
    /// Rules of the reference's model code the output's forward followed too, so
    /// both compute alike where transformers and Megatron-Core differ.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shared_rules: Vec<String>,
    /// Time of both passes (the reference's counted in full when it ran ahead,
    /// beside the conversion).
    pub seconds: f64,
}

impl Comparison {
    /// Whether the logits agree within the tolerance.
    pub fn passed(&self) -> bool {
        self.max_abs_diff <= self.tolerance
    }

    /// One line for reports.
    pub fn describe(&self) -> String {
        format!(
            "max |Δlogit| {:.3e} over {} tokens × {} logits (tolerance {:.2e} = {:.0e} · max |logit| {:.4}; reference {}{}), {:.1} s",
            self.max_abs_diff,
            self.tokens,
            self.vocab,
            self.tolerance,
            RELATIVE_TOLERANCE,
            self.max_abs_logit,
            self.reference.display(),
            self.reference_rounded_to
                .as_ref()
                .map(|d| format!(", its weights rounded to {d} like the output's"))
                .unwrap_or_default(),
            self.seconds
        ) + &self
            .shared_rules
            .iter()
            .map(|r| format!("; {r}"))
            .collect::<String>()
    }
}

/// Largest absolute difference over the first `vocab` columns, and the largest
/// absolute value of `a` there.
pub fn diff(a: &Logits, b: &Logits, vocab: usize) -> (f64, f64) {
    let mut max_diff = 0f64;
    let mut max_abs = 0f64;
    for i in 0..a.tokens.min(b.tokens) {
        let ra = &a.values[i * a.cols..i * a.cols + vocab];
        let rb = &b.values[i * b.cols..i * b.cols + vocab];
        for (x, y) in ra.iter().zip(rb) {
            let d = (f64::from(*x) - f64::from(*y)).abs();
            // A NaN on either side is a failure, never a pass.
            max_diff = if d.is_nan() {
                f64::INFINITY
            } else {
                max_diff.max(d)
            };
            max_abs = max_abs.max(f64::from(*x).abs());
        }
    }
    (max_diff, max_abs)
}

/// The reference's forward pass, computed ahead of the output's (while the
/// conversion writes the output), with the rounding it was computed under.
pub struct Ahead {
    /// The dtype the reference's weights were rounded to as read (the dtype the
    /// output is expected to have, when it differs from the reference's).
    pub round_to: Option<DType>,
    /// The logits, or why the pass failed.
    pub logits: Result<Logits, String>,
    /// Time of the pass.
    pub seconds: f64,
}

impl Model {
    /// The pass [`compare`] runs on a reference, ahead of time: `round_to` is the
    /// dtype every floating-point tensor of the output will have, when known.
    pub fn ahead(&self, output_dtype: Option<DType>) -> Ahead {
        let started = Instant::now();
        let round_to = output_dtype.filter(|d| Some(*d) != uniform_float_dtype(self.tensors()));
        let logits = self.logits(&tokens(self.arch.vocab, TOKENS), round_to);
        Ahead {
            round_to,
            logits,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

/// Runs the forward pass through `reference` and `output` and compares the logits.
///
/// # Errors
/// [`SmokeError::Failed`] when either pass cannot run (a tensor missing or of the
/// wrong shape) or the vocabularies differ.
pub fn compare(reference: &Model, output: &Model) -> Result<Comparison, SmokeError> {
    compare_ahead(reference, None, output)
}

/// [`compare`], with the reference's pass taken from `ahead` when it was computed
/// under the rounding the output calls for (else it is computed again).
///
/// # Errors
/// As [`compare`].
pub fn compare_ahead(
    reference: &Model,
    ahead: Option<Ahead>,
    output: &Model,
) -> Result<Comparison, SmokeError> {
    let started = Instant::now();
    let vocab = reference.arch.vocab;
    if output.arch.vocab != vocab {
        return Err(SmokeError::Failed(format!(
            "vocabulary differs: {} says {vocab}, {} says {}",
            reference.dir().display(),
            output.dir().display(),
            output.arch.vocab
        )));
    }
    let tokens = tokens(vocab, TOKENS);
    let out_dtype = uniform_float_dtype(output.tensors());
    let round_to = out_dtype.filter(|d| Some(*d) != uniform_float_dtype(reference.tensors()));
    // Where transformers and Megatron-Core compute a model differently, the
    // output is computed with the reference's rule: the test is of the weights.
    let mut out_arch = output.arch.clone();
    let mut shared_rules = Vec::new();
    if let (Some(r), Some(o)) = (&reference.arch.mamba, &mut out_arch.mamba)
        && r.dt_min != o.dt_min
    {
        shared_rules.push(format!(
            "Mamba-2 time step clamped from below at {} on both sides (the reference's rule; the output's format computes with {})",
            r.dt_min,
            o.dt_min
        ));
        o.dt_min = r.dt_min;
    }
    let (a, b, ahead_seconds) = match ahead.filter(|a| a.round_to == round_to) {
        Some(a) => (
            a.logits,
            output.logits_as(&out_arch, &tokens, None),
            a.seconds,
        ),
        None => {
            let (a, b) = rayon::join(
                || reference.logits(&tokens, round_to),
                || output.logits_as(&out_arch, &tokens, None),
            );
            (a, b, 0.0)
        }
    };
    let a = a.map_err(|e| SmokeError::Failed(format!("reference: {e}")))?;
    let b = b.map_err(|e| SmokeError::Failed(format!("output: {e}")))?;
    let (max_abs_diff, max_abs_logit) = diff(&a, &b, vocab);
    Ok(Comparison {
        reference: reference.dir().to_owned(),
        tokens: tokens.len(),
        vocab,
        max_abs_diff,
        max_abs_logit,
        tolerance: RELATIVE_TOLERANCE * max_abs_logit,
        reference_rounded_to: round_to.map(|d| d.torch_name().to_owned()),
        shared_rules,
        seconds: ahead_seconds + started.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_fixed_and_inside_the_vocabulary() {
        let t = tokens(128, 8);
        assert_eq!(t.len(), 8);
        assert_eq!(&t[..2], &[1, 127]);
        assert!(t.iter().all(|&x| x < 128));
        assert_eq!(t, tokens(128, 8));
    }
}
