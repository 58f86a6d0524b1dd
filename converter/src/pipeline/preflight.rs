//! Preflight: the refusals that need no tensor data, checked before anything is
//! written. Each one names the parameter, what was expected and what was found.

use std::path::{Path, PathBuf};

use crate::paths::normalize;

/// A refusal before any work starts (exit code 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PreflightError {
    /// A required parameter is missing.
    #[error("{step}: missing required parameter {name} ({hint})")]
    Missing {
        /// The step.
        step: String,
        /// The parameter.
        name: String,
        /// What it should be.
        hint: String,
    },
    /// A parameter the step does not take.
    #[error("{step}: unknown parameter {name:?}; expected one of: {known}")]
    Unknown {
        /// The step.
        step: String,
        /// The parameter.
        name: String,
        /// The parameters it takes.
        known: String,
    },
    /// A parameter with a value that cannot be used.
    #[error("{name}={value}: expected {expected}")]
    BadValue {
        /// The parameter.
        name: String,
        /// Its value.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// An unknown step.
    #[error(
        "unknown step {0:?}; expected one of: convert/hf_to_megatron, convert/megatron_to_hf, convert/merge_lora"
    )]
    UnknownStep(String),
    /// The output would overlap an input.
    #[error("{output_param}={} {relation} {input_param}={}: expected an output outside every input, so the source can never be harmed", output.display(), input.display())]
    Overlap {
        /// The output parameter.
        output_param: String,
        /// The output path.
        output: PathBuf,
        /// The input parameter.
        input_param: String,
        /// The input path.
        input: PathBuf,
        /// `is the same path as`, `is inside`, `contains`.
        relation: String,
    },
    /// The output already exists.
    #[error("{param}={} already exists: expected a new path (use --overwrite to replace it)", path.display())]
    Exists {
        /// The parameter.
        param: String,
        /// The path.
        path: PathBuf,
    },
}

/// Refuses an output equal to, inside, or containing an input.
///
/// # Errors
/// [`PreflightError::Overlap`] naming both parameters.
pub fn check_disjoint(
    output_param: &str,
    output: &Path,
    input_param: &str,
    input: &Path,
) -> Result<(), PreflightError> {
    let (o, i) = (normalize(output), normalize(input));
    let relation = if o == i {
        "is the same path as"
    } else if o.starts_with(&i) {
        "is inside"
    } else if i.starts_with(&o) {
        "contains"
    } else {
        return Ok(());
    };
    Err(PreflightError::Overlap {
        output_param: output_param.into(),
        output: output.to_owned(),
        input_param: input_param.into(),
        input: input.to_owned(),
        relation: relation.into(),
    })
}

/// Refuses an existing output unless `overwrite`.
///
/// # Errors
/// [`PreflightError::Exists`].
pub fn check_new(param: &str, path: &Path, overwrite: bool) -> Result<(), PreflightError> {
    if path.exists() && !overwrite {
        return Err(PreflightError::Exists {
            param: param.into(),
            path: path.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_detected_through_spellings() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir(&src).unwrap();
        let same = tmp.path().join("x/../src");
        assert!(
            matches!(check_disjoint("o", &same, "i", &src), Err(PreflightError::Overlap { relation, .. }) if relation == "is the same path as")
        );
        assert!(
            check_disjoint("o", &src.join("out"), "i", &src)
                .unwrap_err()
                .to_string()
                .contains("is inside")
        );
        assert!(
            check_disjoint("o", tmp.path(), "i", &src)
                .unwrap_err()
                .to_string()
                .contains("contains")
        );
        assert!(check_disjoint("o", &tmp.path().join("srcx"), "i", &src).is_ok());
    }
}
