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
    /// The output path holds a converter output, but not this conversion's.
    #[error("{} already holds the output of another conversion ({why}): expected a new path, or this conversion's own output (use --overwrite to replace it)", path.display())]
    Occupied {
        /// The output.
        path: PathBuf,
        /// How it differs.
        why: String,
    },
    /// A Megatron output's run directory holds files of something else.
    #[error("{param}={} is not a Megatron run directory: it holds {found}; expected a new directory, or one holding only iter_* directories and {tracker}", path.display(), tracker = crate::formats::megatron::TRACKER)]
    NotARunDir {
        /// The parameter.
        param: String,
        /// The run directory.
        path: PathBuf,
        /// What it holds that a run directory does not.
        found: String,
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

/// Refuses an existing output unless `overwrite`, or unless it is a converter
/// output (it has a manifest): whether it is this conversion's, to be reused, is
/// decided once the sources are known ([`crate::pipeline::reuse`]).
///
/// # Errors
/// [`PreflightError::Exists`].
pub fn check_new(param: &str, path: &Path, overwrite: bool) -> Result<(), PreflightError> {
    let ours = path
        .join(crate::formats::manifest::FILE_NAME)
        .symlink_metadata()
        .is_ok_and(|m| m.is_file());
    if std::fs::symlink_metadata(path).is_ok() && !overwrite && !ours {
        return Err(PreflightError::Exists {
            param: param.into(),
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// What a Megatron run directory may hold: iteration directories, the trackers,
/// and what runs of this converter leave beside an iteration while they work.
fn belongs_in_run_dir(name: &str) -> bool {
    use crate::formats::megatron::{TRACKER, parse_iter_dir_name};
    let base = name
        .strip_prefix('.')
        .and_then(|n| {
            [".ckpt-staging-", ".ckpt-replaced-", ".tmp-"]
                .iter()
                .find_map(|t| n.rfind(t).map(|i| &n[..i]))
        })
        .unwrap_or(name);
    parse_iter_dir_name(base).is_some()
        || base == "release"
        || base == TRACKER
        || base == "latest_train_state.pt"
        || base == "run_config.yaml"
}

/// Refuses writing an iteration into an existing directory that is not a
/// Megatron run directory (it holds other files), so a conversion never mixes
/// its output into unrelated data.
///
/// # Errors
/// [`PreflightError::NotARunDir`] naming up to five of the files found.
pub fn check_run_dir(param: &str, run_dir: &Path) -> Result<(), PreflightError> {
    let Ok(rd) = std::fs::read_dir(run_dir) else {
        return Ok(());
    };
    let mut foreign: Vec<String> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !belongs_in_run_dir(n))
        .collect();
    if foreign.is_empty() {
        return Ok(());
    }
    foreign.sort();
    let n = foreign.len();
    foreign.truncate(5);
    let mut found = foreign.join(", ");
    if n > 5 {
        found.push_str(&format!(" and {} more", n - 5));
    }
    Err(PreflightError::NotARunDir {
        param: param.into(),
        path: run_dir.to_owned(),
        found,
    })
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

    #[test]
    fn run_directories_hold_only_what_runs_write() {
        for ok in [
            "iter_0000100",
            "release",
            "latest_checkpointed_iteration.txt",
            "latest_train_state.pt",
            ".iter_0000100.ckpt-staging-12-3",
            ".iter_0000100.ckpt-replaced-12-3",
            ".latest_checkpointed_iteration.txt.tmp-77",
        ] {
            assert!(belongs_in_run_dir(ok), "{ok}");
        }
        for bad in ["notes.txt", "model.safetensors", ".bashrc", "iter_x"] {
            assert!(!belongs_in_run_dir(bad), "{bad}");
        }
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("iter_0000001")).unwrap();
        assert!(check_run_dir("megatron_path", tmp.path()).is_ok());
        std::fs::write(tmp.path().join("config.json"), b"{}").unwrap();
        let err = check_run_dir("megatron_path", tmp.path()).unwrap_err();
        assert!(err.to_string().contains("holds config.json"), "{err}");
    }
}
