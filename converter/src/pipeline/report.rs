//! What a run leaves for its orchestrator: the [`ckpt_wire::Summary`] of a
//! report, written as the container's termination message (its wire format is
//! documented with the type, which the operator parses with the same code).
//!
//! Written to `$CKPT_TERMINATION_LOG` when set, else to `/dev/termination-log`
//! when that file exists (the kubelet's default `terminationMessagePath`).

use std::path::PathBuf;

use ckpt_wire::summary::{FAILED, SUCCEEDED, VERSION};
use ckpt_wire::{Step, Summary};

use super::Report;

/// The summary of a successful step.
pub fn succeeded(r: &Report) -> Summary {
    Summary {
        v: VERSION,
        step: r.step.clone(),
        status: SUCCEEDED.into(),
        output: Some(r.output.display().to_string()),
        kind: Some(r.kind),
        tensors: Some(r.tensors as u64),
        bytes: Some(r.tensor_bytes),
        files: Some(r.files as u64),
        seconds: Some((r.seconds * 100.0).round() / 100.0),
        weights_digest: Some(r.weights_digest.clone()),
        manifest: r.manifest.as_ref().map(|m| m.display().to_string()),
        checks_passed: r.validation.as_ref().map(|v| v.passed as u64),
        checks_failed: r.validation.as_ref().map(|v| v.failed as u64),
        smoke_test_max_abs_diff: r
            .validation
            .as_ref()
            .and_then(|v| v.smoke_test_max_abs_diff),
        report: r
            .validation
            .as_ref()
            .map(|v| v.report.display().to_string()),
        warnings: r
            .warnings
            .iter()
            .chain(r.other_outputs.iter().flat_map(|o| &o.warnings))
            .cloned()
            .collect(),
        reused: r.reused,
        ..Summary::default()
    }
}

/// The summary of `convert/validate`: failed (exit code 1) when a check failed.
pub fn validated(r: &crate::validate::Report) -> Summary {
    let failed = r.failed > 0;
    let report = r.path.join(crate::validate::FILE_NAME);
    Summary {
        v: VERSION,
        step: Step::Validate.name().into(),
        status: if failed { FAILED } else { SUCCEEDED }.into(),
        output: Some(r.path.display().to_string()),
        kind: Some(r.kind),
        seconds: Some((r.seconds * 100.0).round() / 100.0),
        checks_passed: Some(r.passed as u64),
        checks_failed: Some(r.failed as u64),
        smoke_test_max_abs_diff: r.smoke_test_max_abs_diff,
        report: report.is_file().then(|| report.display().to_string()),
        exit_code: failed.then_some(1),
        error: failed.then(|| r.failures().join("; ")),
        ..Summary::default()
    }
}

/// Writes `summary` where the orchestrator reads it, if anywhere; returns the
/// path written.
pub fn write(summary: &Summary) -> Option<PathBuf> {
    let path = std::env::var_os("CKPT_TERMINATION_LOG")
        .map(PathBuf::from)
        .or_else(|| Some(PathBuf::from("/dev/termination-log")).filter(|p| p.exists()))?;
    std::fs::write(&path, summary.to_json()).ok().map(|_| path)
}
