//! One step as a user asked for it, ready to run elsewhere: the step, its
//! parameters (after `-c` and the command line were merged) with relative paths
//! made absolute, and the converter's own options.

use std::collections::BTreeMap;
use std::path::Path;

use ckpt_wire::{Step, Value};

/// A step to run where a profile says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The step.
    pub step: Step,
    /// Parameters by the name typed; paths absolute.
    pub params: BTreeMap<String, String>,
    /// `--threads N`.
    pub threads: Option<usize>,
    /// `--memory-budget SIZE`.
    pub memory_budget: Option<String>,
    /// `--overwrite`.
    pub overwrite: bool,
}

/// Whether a model parameter's value names a directory (rather than a model id
/// looked up in the Hugging Face cache), as the converter decides: a directory
/// that exists, or anything written as a path.
fn is_path(value: &str, cwd: &Path) -> bool {
    value.starts_with('/')
        || value.starts_with("./")
        || value.starts_with("../")
        || value == "."
        || value == ".."
        || cwd.join(value).is_dir()
}

impl Request {
    /// The request for `step` with `params` as typed, relative paths resolved
    /// against `cwd` (the job runs elsewhere).
    pub fn new(step: Step, params: BTreeMap<String, String>, cwd: &Path) -> Request {
        let params = params
            .into_iter()
            .map(|(k, v)| {
                let path_like = match step.param(&k).map(|p| p.value) {
                    Some(Value::Path) => !v.is_empty() && v != "null",
                    Some(Value::Model) => is_path(&v, cwd),
                    _ => false,
                };
                if path_like && !v.starts_with('/') {
                    let joined = cwd.join(&v);
                    let abs = crate::mounts::normalize(&joined).unwrap_or(joined);
                    (k, abs.display().to_string())
                } else {
                    (k, v)
                }
            })
            .collect();
        Request {
            step,
            params,
            threads: None,
            memory_budget: None,
            overwrite: false,
        }
    }

    /// The converter's arguments after its binary: `run STEP key=value … [options]`.
    pub fn args(&self) -> Vec<String> {
        let mut out = vec!["run".to_owned(), self.step.name().to_owned()];
        out.extend(self.params.iter().map(|(k, v)| format!("{k}={v}")));
        if let Some(n) = self.threads {
            out.push(format!("--threads={n}"));
        }
        if let Some(b) = &self.memory_budget {
            out.push(format!("--memory-budget={b}"));
        }
        if self.overwrite {
            out.push("--overwrite".into());
        }
        out
    }

    /// The path parameters (and model parameters that name a directory), by the
    /// name typed: what must lie under a mount.
    pub fn paths(&self) -> impl Iterator<Item = (&str, &str)> {
        self.params.iter().filter_map(|(k, v)| {
            let kind = self.step.param(k).map(|p| p.value);
            let path = match kind {
                Some(Value::Path) => v.starts_with('/'),
                Some(Value::Model) => v.starts_with('/'),
                _ => false,
            };
            path.then_some((k.as_str(), v.as_str()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_become_absolute_and_model_ids_stay() {
        let params = BTreeMap::from([
            (
                "megatron_path".to_owned(),
                "sft/../sft/iter_0000100".to_owned(),
            ),
            (
                "hf_model_id".to_owned(),
                "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16".to_owned(),
            ),
            ("hf_path".to_owned(), "/abs/out".to_owned()),
            ("dtype".to_owned(), "bfloat16".to_owned()),
        ]);
        let r = Request::new(Step::MegatronToHf, params, Path::new("/work/x"));
        assert_eq!(r.params["megatron_path"], "/work/x/sft/iter_0000100");
        assert_eq!(
            r.params["hf_model_id"],
            "nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-Base-BF16"
        );
        let paths: Vec<_> = r.paths().map(|(k, _)| k).collect();
        assert_eq!(paths, vec!["hf_path", "megatron_path"]);
        assert_eq!(
            r.args()[..3],
            ["run", "convert/megatron_to_hf", "dtype=bfloat16"]
        );
    }
}
