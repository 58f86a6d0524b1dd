//! The compact summary a conversion leaves for Kubernetes: at most 4 KiB of JSON in
//! the container's termination message, which the operator parses into status.
//!
//! Wire format (version 1), one JSON object:
//! ```json
//! {"v": 1, "step": "convert/megatron_to_hf", "status": "succeeded",
//!  "output": "/data/target/out", "kind": "checkpoint_hf", "tensors": 291,
//!  "bytes": 6425673728, "files": 9, "seconds": 12.5,
//!  "weights_digest": "…", "manifest": "/data/target/out/ckpt-manifest.json",
//!  "checks_passed": 9, "checks_failed": 0, "smoke_test_max_abs_diff": 0.0,
//!  "report": "/data/target/out/ckpt-validation.json"}
//! {"v": 1, "step": "convert/hf_to_megatron", "status": "failed", "exit_code": 2,
//!  "error": "hf_model_id=…: …"}
//! ```
//! Written to `$CKPT_TERMINATION_LOG` when set, else to `/dev/termination-log`
//! when that file exists (the kubelet's default `terminationMessagePath`).

use std::path::PathBuf;

use serde::Serialize;

/// The kubelet's limit on a container's termination message.
pub const MAX_BYTES: usize = 4096;

/// What a run reports to its orchestrator.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Format version (1).
    pub v: u32,
    /// The step.
    pub step: String,
    /// `succeeded` or `failed`.
    pub status: String,
    /// The output directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Output artifact kind.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Tensors written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors: Option<usize>,
    /// Tensor bytes written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Files written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub files: Option<usize>,
    /// Wall time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Layout-independent digest of the output tensors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weights_digest: Option<String>,
    /// The manifest.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// Validation checks passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks_passed: Option<usize>,
    /// Validation checks failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checks_failed: Option<usize>,
    /// The smoke test's largest absolute logit difference (for LoRA merges, the
    /// largest probe residual); absent when it did not run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub smoke_test_max_abs_diff: Option<f64>,
    /// The validation report.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
    /// Exit code of a failed run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The error of a failed run (shortened to fit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Summary {
    /// The summary of a successful step.
    pub fn succeeded(r: &crate::steps::Report) -> Summary {
        Summary {
            v: 1,
            step: r.step.clone(),
            status: "succeeded".into(),
            output: Some(r.output.display().to_string()),
            kind: Some(r.kind.clone()),
            tensors: Some(r.tensors),
            bytes: Some(r.tensor_bytes),
            files: Some(r.files),
            seconds: Some((r.seconds * 100.0).round() / 100.0),
            weights_digest: Some(r.weights_digest.clone()),
            manifest: r.manifest.as_ref().map(|m| m.display().to_string()),
            checks_passed: r.validation.as_ref().map(|v| v.passed),
            checks_failed: r.validation.as_ref().map(|v| v.failed),
            smoke_test_max_abs_diff: r
                .validation
                .as_ref()
                .and_then(|v| v.smoke_test_max_abs_diff),
            report: r
                .validation
                .as_ref()
                .map(|v| v.report.display().to_string()),
            ..Summary::default()
        }
    }

    /// The summary of `convert/validate`: failed (exit code 1) when a check failed.
    pub fn validated(r: &crate::validate::Report) -> Summary {
        let failed = r.failed > 0;
        Summary {
            v: 1,
            step: crate::steps::validate::STEP.into(),
            status: if failed { "failed" } else { "succeeded" }.into(),
            output: Some(r.path.display().to_string()),
            kind: Some(r.kind.clone()),
            seconds: Some((r.seconds * 100.0).round() / 100.0),
            checks_passed: Some(r.passed),
            checks_failed: Some(r.failed),
            smoke_test_max_abs_diff: r.smoke_test_max_abs_diff,
            report: r.path.join(crate::validate::FILE_NAME).is_file().then(|| {
                r.path
                    .join(crate::validate::FILE_NAME)
                    .display()
                    .to_string()
            }),
            exit_code: failed.then_some(1),
            error: failed.then(|| r.failures().join("; ")),
            ..Summary::default()
        }
    }

    /// The summary of a failed step.
    pub fn failed(step: &str, exit_code: i32, error: &str) -> Summary {
        Summary {
            v: 1,
            step: step.into(),
            status: "failed".into(),
            exit_code: Some(exit_code),
            error: Some(error.into()),
            ..Summary::default()
        }
    }

    /// Compact JSON of at most [`MAX_BYTES`], shortening the error if needed.
    pub fn to_json(&self) -> String {
        let mut s = self.clone();
        loop {
            let text = serde_json::to_string(&s).expect("summary serializes");
            if text.len() <= MAX_BYTES {
                return text;
            }
            match &mut s.error {
                Some(e) if e.len() > 16 => {
                    let keep = e
                        .len()
                        .saturating_sub(text.len() - MAX_BYTES + 4)
                        .min(e.len() - 16);
                    let mut cut = keep;
                    while !e.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    e.truncate(cut);
                    e.push('…');
                }
                _ => {
                    s.output = None;
                    s.manifest = None;
                    s.weights_digest = None;
                    if serde_json::to_string(&s).map_or(0, |t| t.len()) > MAX_BYTES {
                        return serde_json::to_string(&Summary::failed(
                            &self.step,
                            self.exit_code.unwrap_or(1),
                            "summary too large",
                        ))
                        .expect("serializes");
                    }
                }
            }
        }
    }

    /// Writes the summary where the orchestrator reads it, if anywhere; returns
    /// the path written.
    pub fn write(&self) -> Option<PathBuf> {
        let path = std::env::var_os("CKPT_TERMINATION_LOG")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from("/dev/termination-log")).filter(|p| p.exists()))?;
        std::fs::write(&path, self.to_json()).ok().map(|_| path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_errors_are_cut_to_fit() {
        let s = Summary::failed("convert/hf_to_megatron", 2, &"é".repeat(10_000));
        let text = s.to_json();
        assert!(text.len() <= MAX_BYTES, "{}", text.len());
        let back: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(back["status"], "failed");
        assert_eq!(back["exit_code"], 2);
        assert!(back["error"].as_str().unwrap().ends_with('…'));
    }
}
