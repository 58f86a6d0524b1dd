//! Which adapter directory `lora_checkpoint` means.

use std::path::{Path, PathBuf};

use super::{CONFIG_FILE, PICKLED_WEIGHTS_FILE, WEIGHTS_FILE};
use crate::lora::LoraError;

/// The adapter directory `lora_checkpoint` leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The directory holding `adapter_config.json`.
    pub dir: PathBuf,
    /// How it was chosen, when it is not the path given.
    pub note: Option<String>,
}

/// The step a checkpoint directory is named after: the last number in the
/// deepest component of `rel` that has one (`checkpoint-1000` → 1000,
/// `checkpoint-1000/my_adapter` → 1000, `global_step300` → 300).
pub fn step_of(rel: &Path) -> Option<u64> {
    rel.components().rev().find_map(|c| {
        let s = c.as_os_str().to_string_lossy();
        let mut last = None;
        let mut cur = String::new();
        for ch in s.chars().chain(std::iter::once('/')) {
            if ch.is_ascii_digit() {
                cur.push(ch);
            } else if !cur.is_empty() {
                last = cur.parse::<u64>().ok().or(last);
                cur.clear();
            }
        }
        last
    })
}

/// Directories under `root` (not `root` itself) holding `adapter_config.json`,
/// searched to a bounded depth without following directory links.
fn adapter_dirs(root: &Path) -> Vec<PathBuf> {
    const MAX_DEPTH: usize = 6;
    const MAX_DIRS: usize = 20_000;
    let mut found = Vec::new();
    let mut stack = vec![(root.to_owned(), 0usize)];
    let mut seen = 0usize;
    while let Some((dir, depth)) = stack.pop() {
        seen += 1;
        if seen > MAX_DIRS {
            break;
        }
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.filter_map(Result::ok) {
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if !is_dir {
                continue;
            }
            let p = e.path();
            if p.join(CONFIG_FILE).is_file() {
                found.push(p.clone());
            }
            if depth + 1 < MAX_DEPTH {
                stack.push((p, depth + 1));
            }
        }
    }
    found.sort();
    found
}

/// Resolves `lora_checkpoint` as users expect: the directory itself when it holds
/// `adapter_config.json` (a file inside it is accepted too); otherwise, inside a
/// training output directory, the adapter directory with the highest step number
/// in its path (`checkpoint-1000` over `checkpoint-500`), and a note saying which.
///
/// # Errors
/// [`LoraError::Resolve`] when the path does not exist, holds no adapter, or
/// holds several that no step number tells apart (listing them).
pub fn resolve(path: &Path) -> Result<Resolved, LoraError> {
    let err = |why: String| LoraError::Resolve {
        path: path.to_owned(),
        why,
    };
    if path.is_file() {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let parent = path.parent().map(Path::to_owned).unwrap_or_default();
        return match name.as_deref() {
            Some(CONFIG_FILE | WEIGHTS_FILE | PICKLED_WEIGHTS_FILE)
                if parent.join(CONFIG_FILE).is_file() =>
            {
                Ok(Resolved {
                    dir: parent.clone(),
                    note: Some(format!(
                        "lora_checkpoint={} is a file; using its directory {}",
                        path.display(),
                        parent.display()
                    )),
                })
            }
            _ => Err(err(format!(
                "is a file: expected an adapter directory holding {CONFIG_FILE}"
            ))),
        };
    }
    if !path.is_dir() {
        return Err(err("does not exist: expected an adapter directory".into()));
    }
    if path.join(CONFIG_FILE).is_file() {
        return Ok(Resolved {
            dir: path.to_owned(),
            note: None,
        });
    }
    let found = adapter_dirs(path);
    let rel = |p: &Path| p.strip_prefix(path).unwrap_or(p).to_owned();
    let list = |v: &[PathBuf]| {
        v.iter()
            .map(|p| rel(p).display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match found.as_slice() {
        [] => Err(err(format!(
            "expected a directory holding {CONFIG_FILE} (or a training output directory with one inside), found none"
        ))),
        [only] => Ok(Resolved {
            dir: only.clone(),
            note: Some(format!(
                "lora_checkpoint={} resolved to the only adapter directory inside it, {}",
                path.display(),
                only.display()
            )),
        }),
        many => {
            let best = many.iter().filter_map(|p| step_of(&rel(p))).max();
            let Some(best) = best else {
                return Err(err(format!(
                    "holds {} adapter directories and none is named after a step ({}): name the one to merge",
                    many.len(),
                    list(many)
                )));
            };
            let top: Vec<PathBuf> = many
                .iter()
                .filter(|p| step_of(&rel(p)) == Some(best))
                .cloned()
                .collect();
            match top.as_slice() {
                [one] => Ok(Resolved {
                    dir: one.clone(),
                    note: Some(format!(
                        "lora_checkpoint={} resolved to {} (step {best}, the highest of {} adapter directories: {})",
                        path.display(),
                        one.display(),
                        many.len(),
                        list(many)
                    )),
                }),
                _ => Err(err(format!(
                    "holds {} adapter directories at step {best} ({}): name the one to merge",
                    top.len(),
                    list(&top)
                ))),
            }
        }
    }
}
