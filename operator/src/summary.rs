//! The converter's termination message in status. The message is the
//! [`ckpt_wire::Summary`] the converter writes (its wire format and its lenient,
//! bounded parser live there); this module only says how it reads in status.

use ckpt_wire::Summary;

use crate::api::ConversionSummary;

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

/// A count as the CRD stores it (an integer the API can hold).
fn count(n: Option<u64>) -> Option<i64> {
    n.map(|n| i64::try_from(n).unwrap_or(i64::MAX))
}

/// The status summary of `s`; container paths become paths inside the target
/// claim (whose mounted directory is `target_dir`).
pub fn to_status(s: &Summary, target_dir: &str) -> ConversionSummary {
    ConversionSummary {
        tensors: count(s.tensors),
        bytes: count(s.bytes),
        files: count(s.files),
        seconds: s.seconds,
        checks_passed: count(s.checks_passed),
        checks_failed: count(s.checks_failed),
        smoke_test_max_abs_diff: s.smoke_test_max_abs_diff,
        output_digest: s.weights_digest.clone(),
        report_path: s
            .report
            .as_deref()
            .or(s.manifest.as_deref())
            .map(|p| claim_path(p, target_dir)),
        output_path: s.output.as_deref().map(|p| claim_path(p, target_dir)),
        reused: s.reused.then_some(true),
        warnings: s
            .warnings
            .iter()
            .take(16)
            .map(|w| crate::conditions::shorten(w, 1024))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(message: &str) -> Option<Summary> {
        Summary::parse(message)
    }

    #[test]
    fn success_becomes_status_with_claim_paths() {
        let w = parse(r#"{"v":1,"step":"convert/megatron_to_hf","status":"succeeded","output":"/data/target/sft-hf","kind":"checkpoint_hf","tensors":291,"bytes":6425673728,"files":9,"seconds":12.5,"weights_digest":"ab","manifest":"/data/target/sft-hf/ckpt-manifest.json"}"#).unwrap();
        let s = to_status(&w, "output/convert");
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
        let s = to_status(&w, "");
        assert_eq!(s.reused, Some(true));
        assert_eq!(s.warnings, vec!["base name could not be confirmed"]);
        // Absent, or of an unexpected type: the rest of the summary still counts.
        let w = parse(r#"{"v":1,"step":"s","status":"succeeded","tensors":3,"reused":"yes","warnings":{"a":1}}"#).unwrap();
        let s = to_status(&w, "");
        assert_eq!((s.tensors, s.reused, s.warnings.len()), (Some(3), None, 0));
        let w = parse(r#"{"v":1,"step":"s","status":"succeeded","reused":false}"#).unwrap();
        assert_eq!(to_status(&w, "").reused, None);
    }

    #[test]
    fn log_tails_and_oversized_messages_are_not_summaries() {
        assert!(parse("error: something broke").is_none());
        assert!(parse(r#"{"v":2}"#).is_none());
        let f =
            parse(r#"{"v":1,"step":"s","status":"failed","exit_code":2,"error":"bad"}"#).unwrap();
        assert_eq!((f.exit_code, f.error.as_deref()), (Some(2), Some("bad")));
        // Longer than a termination message can be: not read at all.
        let long = format!(
            r#"{{"v":1,"step":"s","status":"failed","error":"{}"}}"#,
            "x".repeat(ckpt_wire::summary::MAX_BYTES)
        );
        assert!(parse(&long).is_none());
    }

    #[test]
    fn counts_beyond_the_api_integer_are_capped() {
        let w = parse(&format!(
            r#"{{"v":1,"step":"s","status":"succeeded","bytes":{}}}"#,
            u64::MAX
        ))
        .unwrap();
        assert_eq!(to_status(&w, "").bytes, Some(i64::MAX));
    }
}
