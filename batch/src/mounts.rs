//! The shared filesystem as this machine and the job see it. A path a user types
//! must lie under one of the profile's mounts: for Kubernetes it becomes the claim
//! and the directory inside it that a `CheckpointConversion` names; for Slurm it is
//! passed unchanged. Paths are compared by their components after `.` and `..` are
//! resolved by hand (the target does not exist yet, so nothing is canonicalized).

use std::path::{Component, Path, PathBuf};

/// One mount of a profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The directory, as this machine sees it (and, for Slurm, the job too).
    pub path: PathBuf,
    /// Kubernetes: the PersistentVolumeClaim holding it.
    pub claim: Option<String>,
    /// Kubernetes: the directory inside the claim that `path` is (`""`: the root).
    pub sub_path: String,
}

impl Mount {
    /// `/mnt/lustre-shared → claim lustre-shared`, for messages.
    pub fn describe(&self) -> String {
        match &self.claim {
            Some(c) if self.sub_path.is_empty() => format!("{} (claim {c})", self.path.display()),
            Some(c) => format!("{} (claim {c}, {})", self.path.display(), self.sub_path),
            None => self.path.display().to_string(),
        }
    }
}

/// Where a path lies: its mount and the part below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located<'a> {
    /// The mount.
    pub mount: &'a Mount,
    /// The path below the mount (`""`: the mount itself).
    pub below: String,
}

impl Located<'_> {
    /// The directory inside the claim (`sub_path/below`).
    pub fn claim_path(&self) -> String {
        match (self.mount.sub_path.is_empty(), self.below.is_empty()) {
            (true, _) => self.below.clone(),
            (false, true) => self.mount.sub_path.clone(),
            (false, false) => format!("{}/{}", self.mount.sub_path, self.below),
        }
    }
}

/// `s` as an absolute path with `.` and `..` resolved.
///
/// # Errors
/// A message when it is relative or climbs above `/`.
pub fn absolute(s: &str) -> Result<PathBuf, String> {
    let p = Path::new(s);
    if !p.is_absolute() {
        return Err(format!("{s:?}: expected an absolute path"));
    }
    normalize(p).ok_or_else(|| format!("{s:?}: climbs above /"))
}

/// `p` with `.` and `..` resolved lexically; `None` when it climbs above the root.
pub fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => out.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return None;
                }
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Some(out)
}

/// A directory inside a claim as the resource names it: relative, `/`-separated,
/// each component of letters, digits and `._@+=-`, not starting with `.`
/// (`""` is the claim's root).
///
/// # Errors
/// A message saying which component is not allowed.
pub fn claim_dir(s: &str) -> Result<String, String> {
    let trimmed = s.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(String::new());
    }
    for part in trimmed.split('/') {
        let ok = !part.is_empty()
            && !part.starts_with('.')
            && part
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._@+=-".contains(c));
        if !ok {
            return Err(format!(
                "{part:?}: a CheckpointConversion names directories whose components are letters, digits and ._@+=- (not starting with .)"
            ));
        }
    }
    Ok(trimmed.to_owned())
}

/// The mount `path` lies under (the deepest one when mounts nest).
pub fn locate<'a>(mounts: &'a [Mount], path: &Path) -> Option<Located<'a>> {
    mounts
        .iter()
        .filter_map(|m| {
            path.strip_prefix(&m.path).ok().map(|rest| Located {
                mount: m,
                below: rest
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/"),
            })
        })
        .max_by_key(|l| l.mount.path.components().count())
}

/// Every mount, for messages: `/a (claim x), /b (claim y)`.
pub fn describe(mounts: &[Mount]) -> String {
    if mounts.is_empty() {
        return "none".into();
    }
    mounts
        .iter()
        .map(Mount::describe)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The path this machine sees for `claim_path` inside `claim`, when a mount shows it.
pub fn host_path(mounts: &[Mount], claim: &str, claim_path: &str) -> Option<PathBuf> {
    mounts
        .iter()
        .filter(|m| m.claim.as_deref() == Some(claim))
        .filter_map(|m| {
            let rest = if m.sub_path.is_empty() {
                Some(claim_path)
            } else if claim_path == m.sub_path {
                Some("")
            } else {
                claim_path
                    .strip_prefix(m.sub_path.as_str())
                    .and_then(|r| r.strip_prefix('/'))
            }?;
            Some(if rest.is_empty() {
                m.path.clone()
            } else {
                m.path.join(rest)
            })
        })
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mounts() -> Vec<Mount> {
        vec![
            Mount {
                path: "/mnt/lustre-shared".into(),
                claim: Some("lustre-shared".into()),
                sub_path: String::new(),
            },
            Mount {
                path: "/mnt/lustre-shared/models".into(),
                claim: Some("models".into()),
                sub_path: "hf".into(),
            },
        ]
    }

    #[test]
    fn the_deepest_mount_wins_and_paths_round_trip() {
        let m = mounts();
        let l = locate(&m, Path::new("/mnt/lustre-shared/output/sft/iter_0000100")).unwrap();
        assert_eq!(l.mount.claim.as_deref(), Some("lustre-shared"));
        assert_eq!(l.claim_path(), "output/sft/iter_0000100");
        let l = locate(&m, Path::new("/mnt/lustre-shared/models/llama")).unwrap();
        assert_eq!(
            (l.mount.claim.as_deref(), l.claim_path().as_str()),
            (Some("models"), "hf/llama")
        );
        assert_eq!(
            host_path(&m, "models", "hf/llama"),
            Some(PathBuf::from("/mnt/lustre-shared/models/llama"))
        );
        assert_eq!(host_path(&m, "models", "other/x"), None);
        assert!(locate(&m, Path::new("/mnt/lustre-sharedX/a")).is_none());
        assert!(locate(&m, Path::new("/scratch/a")).is_none());
    }

    #[test]
    fn normalizing_and_claim_directories() {
        assert_eq!(absolute("/a/./b/../c").unwrap(), PathBuf::from("/a/c"));
        assert!(absolute("a/b").is_err());
        assert!(absolute("/..").is_err());
        assert_eq!(claim_dir("/output/x/").unwrap(), "output/x");
        assert!(claim_dir("out put").is_err());
        assert!(claim_dir("a/.hidden").is_err());
    }
}
