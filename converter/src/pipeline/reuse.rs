//! An identical re-run is done already: when the target (without `--overwrite`)
//! holds the output of the
//! same step, with the same parameters, from the same sources (the same files,
//! sizes and header digests, the same side files), by the same converter version,
//! and every file its manifest lists is there at its size, nothing is rewritten
//! and the report says `reused`. An orchestrator that retries a step whose first
//! run published and then died is told it succeeded.

use std::collections::BTreeMap;
use std::path::Path;

use ckpt_wire::Step;

use super::{Report, SourceInfo, Target, ValidationSummary};
use crate::formats::manifest::{self, Manifest};
use crate::plan::Plan;

/// Whether `target` already holds this run's output: `Ok(report)` when it does,
/// `Err(why not)` otherwise.
pub fn check(
    step: Step,
    parameters: &BTreeMap<String, String>,
    sources: &[SourceInfo],
    plan: &Plan,
    target: &Target,
) -> Result<Report, String> {
    let path = target.dir.join(manifest::FILE_NAME);
    let text = crate::formats::file::read_text(&path, crate::formats::file::limit::INDEX)
        .map_err(|e| e.to_string())?;
    let m: Manifest =
        serde_json::from_str(&text).map_err(|e| format!("not a ckpt manifest: {e}"))?;
    let differs = |what: &str| Err(format!("its manifest records another {what}"));
    if m.tool != manifest::tool() {
        return differs("converter version");
    }
    if m.step != step.name() || m.output.kind != target.kind {
        return differs("step");
    }
    if &m.parameters != parameters {
        return differs("set of parameters");
    }
    if m.output.iteration != target.run_dir.as_ref().map(|(_, i)| *i) {
        return differs("iteration");
    }
    let recorded: Vec<_> = m
        .provenance
        .sources
        .iter()
        .map(|s| (&s.role, &s.path, s.kind, &s.files))
        .collect();
    let now: Vec<_> = sources
        .iter()
        .map(|s| (&s.role, s.path.display().to_string(), s.kind, &s.files))
        .collect();
    let same_sources = recorded.len() == now.len()
        && recorded
            .iter()
            .zip(&now)
            .all(|(a, b)| a.0 == b.0 && *a.1 == b.1 && a.2 == b.2 && a.3 == b.3);
    if !same_sources {
        return differs("source (its files, sizes or header digests changed)");
    }
    for c in &plan.copied {
        let rec = m.provenance.side_files.iter().find(|s| s.path == c.rel);
        let now = crate::formats::digest::file(&c.from).map(|(_, d)| d).ok();
        if rec.map(|s| &s.xxh3) != now.as_ref() {
            return differs(&format!("side file {}", c.rel));
        }
    }
    for f in &m.files {
        let size = std::fs::symlink_metadata(target.dir.join(&f.path)).map(|m| m.len());
        if size.as_ref().ok() != Some(&f.size) {
            return Err(format!(
                "{} is not as its manifest records it (expected {} bytes)",
                f.path, f.size
            ));
        }
    }
    let validation = validation_summary(&target.dir);
    Ok(Report {
        step: step.name().into(),
        status: "succeeded".into(),
        output: target.dir.clone(),
        kind: target.kind,
        tensors: m.output.tensors,
        tensor_bytes: m.output.tensor_bytes,
        files: m.files.len() + 1,
        seconds: 0.0,
        bytes_per_second: 0.0,
        peak_in_flight_bytes: 0,
        weights_digest: m.output.weights_digest,
        manifest: Some(path),
        validation,
        plan: Vec::new(),
        skipped: Vec::new(),
        warnings: vec![format!(
            "{} already holds this conversion's output (same step, parameters and sources); nothing was rewritten",
            target.dir.display()
        )],
        reused: true,
        other_outputs: Vec::new(),
    })
}

/// The validation recorded next to an output, if any.
fn validation_summary(dir: &Path) -> Option<ValidationSummary> {
    let path = dir.join(crate::validate::FILE_NAME);
    let text = crate::formats::file::read_text(&path, crate::formats::file::limit::INDEX).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    Some(ValidationSummary {
        passed: v.get("passed")?.as_u64()? as usize,
        failed: v.get("failed")?.as_u64()? as usize,
        seconds: v.get("seconds").and_then(|s| s.as_f64()).unwrap_or(0.0),
        report: path,
        smoke_test: v
            .pointer("/smoke_test/status")
            .and_then(|s| s.as_str())
            .map(str::to_owned),
        smoke_test_max_abs_diff: v.get("smoke_test_max_abs_diff").and_then(|d| d.as_f64()),
    })
}
