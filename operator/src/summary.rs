//! The converter's termination message (wire format version 1, at most 4 KiB of
//! JSON), parsed into status. See the converter's `termination` module for the
//! producer; the operator knows only this shape.

use serde::Deserialize;

use crate::api::ConversionSummary;

/// The converter's summary as it travels.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct Wire {
    /// Format version.
    pub v: u32,
    /// The step.
    #[serde(default)]
    pub step: String,
    /// `succeeded` or `failed`.
    #[serde(default)]
    pub status: String,
    /// Output directory (container path).
    pub output: Option<String>,
    /// Tensors written.
    pub tensors: Option<i64>,
    /// Tensor bytes.
    pub bytes: Option<i64>,
    /// Files written.
    pub files: Option<i64>,
    /// Wall time.
    pub seconds: Option<f64>,
    /// Digest of the output tensors.
    pub weights_digest: Option<String>,
    /// Manifest path (container path).
    pub manifest: Option<String>,
    /// Validation checks passed.
    pub checks_passed: Option<i64>,
    /// Validation checks failed.
    pub checks_failed: Option<i64>,
    /// Smoke-test logit difference.
    pub smoke_test_max_abs_diff: Option<f64>,
    /// Validation report (container path).
    pub report: Option<String>,
    /// Exit code of a failure.
    pub exit_code: Option<i32>,
    /// The error of a failure.
    pub error: Option<String>,
    /// The target already held an identical conversion's output, which was not
    /// rewritten (absent: false).
    #[serde(default, deserialize_with = "lenient_bool")]
    pub reused: Option<bool>,
    /// Warnings of the run (absent: none).
    #[serde(default, deserialize_with = "lenient_strings")]
    pub warnings: Vec<String>,
}

/// The optional fields are read leniently: a value of another type is dropped rather
/// than making the whole summary unreadable (the numbers and the error still count).
fn lenient_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    Ok(serde_json::Value::deserialize(d)?.as_bool())
}

fn lenient_strings<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Array(items) => items
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        serde_json::Value::String(s) => vec![s],
        _ => Vec::new(),
    })
}

/// Parses a termination message; `None` when it is not the converter's summary
/// (for example the log tail that `FallbackToLogsOnError` substitutes).
pub fn parse(message: &str) -> Option<Wire> {
    let w: Wire = serde_json::from_str(message.trim()).ok()?;
    (w.v == 1).then_some(w)
}

/// Translates a container path under `/data/target` into the path inside the
/// target claim, for status.
fn claim_path(container: &str, target_dir: &str) -> String {
    container
        .strip_prefix(crate::step::paths::TARGET)
        .map(|rest| {
            let rest = rest.trim_start_matches('/');
            if target_dir.is_empty() {
                rest.to_owned()
            } else {
                format!("{target_dir}/{rest}")
            }
        })
        .unwrap_or_else(|| container.to_owned())
}

impl Wire {
    /// The status summary; container paths become paths inside the target claim
    /// (whose mounted directory is `target_dir`).
    pub fn to_status(&self, target_dir: &str) -> ConversionSummary {
        ConversionSummary {
            tensors: self.tensors,
            bytes: self.bytes,
            files: self.files,
            seconds: self.seconds,
            checks_passed: self.checks_passed,
            checks_failed: self.checks_failed,
            smoke_test_max_abs_diff: self.smoke_test_max_abs_diff,
            output_digest: self.weights_digest.clone(),
            report_path: self
                .report
                .as_deref()
                .or(self.manifest.as_deref())
                .map(|p| claim_path(p, target_dir)),
            output_path: self.output.as_deref().map(|p| claim_path(p, target_dir)),
            reused: self.reused.filter(|r| *r),
            warnings: self
                .warnings
                .iter()
                .take(16)
                .map(|w| crate::conditions::shorten(w, 1024))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn success_becomes_status_with_claim_paths() {
        let w = parse(r#"{"v":1,"step":"convert/megatron_to_hf","status":"succeeded","output":"/data/target/sft-hf","kind":"checkpoint_hf","tensors":291,"bytes":6425673728,"files":9,"seconds":12.5,"weights_digest":"ab","manifest":"/data/target/sft-hf/ckpt-manifest.json"}"#).unwrap();
        let s = w.to_status("output/convert");
        assert_eq!(s.tensors, Some(291));
        assert_eq!(s.output_path.as_deref(), Some("output/convert/sft-hf"));
        assert_eq!(
            s.report_path.as_deref(),
            Some("output/convert/sft-hf/ckpt-manifest.json")
        );
        assert_eq!(s.output_digest.as_deref(), Some("ab"));
    }

    #[test]
    fn reuse_and_warnings_are_read_leniently() {
        let w = parse(r#"{"v":1,"step":"s","status":"succeeded","reused":true,"warnings":["base name could not be confirmed"]}"#).unwrap();
        let s = w.to_status("");
        assert_eq!(s.reused, Some(true));
        assert_eq!(s.warnings, vec!["base name could not be confirmed"]);
        // Absent, or of an unexpected type: the rest of the summary still counts.
        let w = parse(r#"{"v":1,"step":"s","status":"succeeded","tensors":3,"reused":"yes","warnings":{"a":1}}"#).unwrap();
        assert_eq!((w.tensors, w.reused, w.warnings.len()), (Some(3), None, 0));
        let w = parse(r#"{"v":1,"step":"s","status":"succeeded","reused":false}"#).unwrap();
        assert_eq!(w.to_status("").reused, None);
    }

    #[test]
    fn log_tails_are_not_summaries() {
        assert!(parse("error: something broke").is_none());
        assert!(parse(r#"{"v":2}"#).is_none());
        let f =
            parse(r#"{"v":1,"step":"s","status":"failed","exit_code":2,"error":"bad"}"#).unwrap();
        assert_eq!((f.exit_code, f.error.as_deref()), (Some(2), Some("bad")));
    }
}
