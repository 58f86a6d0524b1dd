//! The compact summary a run leaves for its orchestrator: at most 4 KiB of JSON
//! in the container's termination message, which the operator parses into
//! status. Both sides use this one type.
//!
//! Wire format (version 1), one JSON object; absent fields are omitted:
//! ```json
//! {"v": 1, "step": "convert/megatron_to_hf", "status": "succeeded",
//!  "output": "/data/target/out", "kind": "checkpoint_hf", "tensors": 291,
//!  "bytes": 6425673728, "files": 9, "seconds": 12.5,
//!  "weights_digest": "…", "manifest": "/data/target/out/ckpt-manifest.json",
//!  "checks_passed": 9, "checks_failed": 0, "smoke_test_max_abs_diff": 0.0,
//!  "report": "/data/target/out/ckpt-validation.json",
//!  "warnings": ["…"], "reused": true}
//! {"v": 1, "step": "convert/hf_to_megatron", "status": "failed", "exit_code": 2,
//!  "error": "hf_model_id=…: …"}
//! ```
//! `reused` is true when the target already held the output of the same
//! conversion (same step, output-defining parameters and sources) and nothing
//! was rewritten. Readers ignore fields they do not know, so fields may be
//! added within version 1; a change of meaning takes version 2.

use serde::{Deserialize, Serialize};

use crate::ArtifactKind;

/// The kubelet's limit on a container's termination message.
pub const MAX_BYTES: usize = 4096;

/// The format version written and read.
pub const VERSION: u32 = 1;

/// `status` of a run that succeeded.
pub const SUCCEEDED: &str = "succeeded";

/// `status` of a run that failed.
pub const FAILED: &str = "failed";

/// What a run reports to its orchestrator.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Format version ([`VERSION`]).
    pub v: u32,
    /// The step.
    #[serde(default)]
    pub step: String,
    /// [`SUCCEEDED`] or [`FAILED`].
    #[serde(default)]
    pub status: String,
    /// The output directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// Output artifact kind.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "lenient::kind"
    )]
    pub kind: Option<ArtifactKind>,
    /// Tensors written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensors: Option<u64>,
    /// Tensor bytes written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    /// Files written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<u64>,
    /// Wall time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// Layout-independent digest of the output tensors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_digest: Option<String>,
    /// The manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// Validation checks passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks_passed: Option<u64>,
    /// Validation checks failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks_failed: Option<u64>,
    /// The smoke test's largest absolute logit difference (for LoRA merges, the
    /// largest probe residual); absent when it did not run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoke_test_max_abs_diff: Option<f64>,
    /// The validation report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<String>,
    /// Things the user should know (a base name that could not be confirmed,
    /// tensors kept in float32).
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "lenient::strings"
    )]
    pub warnings: Vec<String>,
    /// The target already held this conversion's output; nothing was rewritten.
    #[serde(
        default,
        skip_serializing_if = "std::ops::Not::not",
        deserialize_with = "lenient::flag"
    )]
    pub reused: bool,
    /// Exit code of a failed run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The error of a failed run (shortened to fit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Fields that only inform are read leniently: a value of another type is dropped
/// rather than making the whole summary unreadable (the numbers and the error still
/// count).
mod lenient {
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    use crate::ArtifactKind;

    pub(super) fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        Ok(Value::deserialize(d)?.as_bool().unwrap_or(false))
    }

    pub(super) fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        Ok(match Value::deserialize(d)? {
            Value::Array(items) => items
                .into_iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            Value::String(s) => vec![s],
            _ => Vec::new(),
        })
    }

    pub(super) fn kind<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ArtifactKind>, D::Error> {
        Ok(Value::deserialize(d)?
            .as_str()
            .and_then(ArtifactKind::from_name))
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut.
fn shorten(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut cut = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s.truncate(cut);
    s.push('…');
}

impl Summary {
    /// The summary of a failed step.
    pub fn failed(step: &str, exit_code: i32, error: &str) -> Summary {
        Summary {
            v: VERSION,
            step: step.into(),
            status: FAILED.into(),
            exit_code: Some(exit_code),
            error: Some(error.into()),
            ..Summary::default()
        }
    }

    /// Compact JSON of at most [`MAX_BYTES`]: the error, then the warnings are
    /// shortened, then paths are dropped, until it fits.
    pub fn to_json(&self) -> String {
        let fits = |s: &Summary| serde_json::to_string(s).expect("summary serializes");
        let mut s = self.clone();
        let mut text = fits(&s);
        if text.len() <= MAX_BYTES {
            return text;
        }
        if let Some(e) = &mut s.error {
            let over = text.len() - MAX_BYTES;
            shorten(e, e.len().saturating_sub(over + 8).max(64));
            text = fits(&s);
        }
        while text.len() > MAX_BYTES && !s.warnings.is_empty() {
            let w = s.warnings.len();
            if w > 1 {
                s.warnings.truncate(w - 1);
                let last = s.warnings.len() - 1;
                s.warnings[last] = format!("… and {w} more");
            } else {
                shorten(&mut s.warnings[0], 256);
                if fits(&s).len() > MAX_BYTES {
                    s.warnings.clear();
                }
            }
            text = fits(&s);
        }
        if text.len() > MAX_BYTES {
            s.output = None;
            s.manifest = None;
            s.report = None;
            s.weights_digest = None;
            text = fits(&s);
        }
        if text.len() > MAX_BYTES {
            text = fits(&Summary::failed(
                &self.step,
                self.exit_code.unwrap_or(1),
                "summary too large",
            ));
        }
        text
    }

    /// Parses a termination message; `None` when it is not a summary of this
    /// version (for example the log tail a kubelet substitutes with
    /// `FallbackToLogsOnError`, or an oversized or malformed message).
    pub fn parse(message: &str) -> Option<Summary> {
        if message.len() > MAX_BYTES {
            return None;
        }
        let s: Summary = serde_json::from_str(message.trim()).ok()?;
        (s.v == VERSION).then_some(s)
    }

    /// Whether the run succeeded.
    pub fn succeeded(&self) -> bool {
        self.status == SUCCEEDED
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
        let back = Summary::parse(&text).unwrap();
        assert_eq!(back.status, FAILED);
        assert_eq!(back.exit_code, Some(2));
        assert!(back.error.unwrap().ends_with('…'));
    }

    #[test]
    fn many_warnings_are_cut_to_fit() {
        let s = Summary {
            v: VERSION,
            step: "convert/hf_to_megatron".into(),
            status: SUCCEEDED.into(),
            warnings: (0..200)
                .map(|i| format!("warning number {i}: {}", "x".repeat(40)))
                .collect(),
            ..Summary::default()
        };
        let text = s.to_json();
        assert!(text.len() <= MAX_BYTES, "{}", text.len());
        let back = Summary::parse(&text).unwrap();
        assert!(back.succeeded());
        assert!(back.warnings.last().unwrap().starts_with("… and"));
        assert_eq!(back.warnings[0], s.warnings[0]);
    }

    #[test]
    fn round_trip_omits_absent_fields() {
        let s = Summary {
            v: VERSION,
            step: "convert/megatron_to_hf".into(),
            status: SUCCEEDED.into(),
            tensors: Some(291),
            reused: true,
            ..Summary::default()
        };
        let text = s.to_json();
        assert!(
            !text.contains("error") && !text.contains("warnings"),
            "{text}"
        );
        assert_eq!(Summary::parse(&text), Some(s));
        let plain = Summary {
            reused: false,
            ..Summary::parse(&text).unwrap()
        };
        assert!(!plain.to_json().contains("reused"));
    }

    /// Found by the `summary` fuzz target: serde_json's default float parser is
    /// off by one unit in the last place for some values, so the operator read a
    /// slightly different number than the converter wrote.
    #[test]
    fn floats_read_back_exactly() {
        let s = Summary {
            v: VERSION,
            smoke_test_max_abs_diff: Some(1.1111111111111112e111),
            seconds: Some(0.1 + 0.2),
            ..Summary::default()
        };
        assert_eq!(Summary::parse(&s.to_json()), Some(s));
    }

    #[test]
    fn other_messages_are_not_summaries() {
        assert!(Summary::parse("error: something broke").is_none());
        assert!(Summary::parse(r#"{"v":2}"#).is_none());
        assert!(
            Summary::parse(&format!("{{\"v\":1,\"error\":\"{}\"}}", "x".repeat(5000))).is_none()
        );
        let f = Summary::parse(
            r#"{"v":1,"step":"s","status":"failed","exit_code":2,"error":"bad","new_field":[1]}"#,
        )
        .unwrap();
        assert_eq!((f.exit_code, f.error.as_deref()), (Some(2), Some("bad")));
    }

    #[test]
    fn informative_fields_of_another_type_are_dropped_not_fatal() {
        let s = Summary::parse(
            r#"{"v":1,"step":"s","status":"succeeded","tensors":3,"reused":"yes","warnings":{"a":1},"kind":"checkpoint_onnx"}"#,
        )
        .unwrap();
        assert_eq!(
            (s.tensors, s.reused, s.warnings.len(), s.kind),
            (Some(3), false, 0, None)
        );
        let s = Summary::parse(
            r#"{"v":1,"step":"s","status":"succeeded","reused":true,"warnings":"one","kind":"checkpoint_hf"}"#,
        )
        .unwrap();
        assert!(s.reused);
        assert_eq!(s.warnings, vec!["one"]);
        assert_eq!(s.kind, Some(ArtifactKind::CheckpointHf));
        assert_eq!(Summary::parse(&s.to_json()), Some(s));
    }
}
