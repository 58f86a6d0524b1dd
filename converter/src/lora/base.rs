//! The wrong-base guard: "do not merge into a different base model, even if the
//! architecture name matches".
//!
//! Three checks, from cheapest to strongest:
//!
//! 1. **Shapes** (in the planners): every tensor the adapter changes or replaces
//!    exists in the base with the shape the adapter requires. Never downgraded.
//! 2. **Names** ([`check_name`]): what the adapter says it was trained on
//!    (`base_model_name_or_path` and `revision` in `adapter_config.json`;
//!    `model.hf_model_id` in a Megatron-Bridge `run_config.yaml`) against the names
//!    the base is known by ([`Identity`]). The base *declares* a name through the
//!    Hugging Face cache layout it sits in (`models--org--name/snapshots/<commit>`),
//!    `_name_or_path` in its `config.json`, or the `hf_model_id` our manifest
//!    recorded when we converted it. A declared name that differs is a clear
//!    mismatch: refused (exit 2) unless `allow_base_mismatch=true`, which turns it
//!    into a warning. A base that declares no name is known only by its directory
//!    name, which proves nothing either way: a different directory name is a
//!    warning, never a refusal. Names compare case-insensitively by their last
//!    path component (`meta-llama/Llama-3.2-1B` = `/models/llama-3.2-1b`). A
//!    revision in the adapter is compared with the cache snapshot's commit (or
//!    the refs naming it) when the base sits in the cache.
//! 3. **Digests**: the identity of weights is the layout-independent weights
//!    digest our manifests record (`output.weights_digest`, see
//!    [`crate::execute::Outcome::weights_digest`]): XXH3-128 over the sorted lines
//!    `name|dtype|shape|xxh3(bytes)`, one line per tensor of an HF directory, one
//!    per stored chunk of a Megatron checkpoint (named `key[a:b, …]` when the
//!    chunk is not the whole tensor). An expected digest comes from `base_digest=`
//!    (the user), or from our manifest in the directory the adapter names as its
//!    base (when that directory exists here). Before any data is read, an
//!    expected digest is compared with the digest the base's own manifest records;
//!    and while the merge runs, the same digest is computed from the base's
//!    tensors as they are read (every tensor, including ones the merge replaces)
//!    and compared with the expected digests and with the base's manifest, after
//!    the output is written to staging and before it is published. A mismatch is
//!    refused (exit 2) and nothing is published. `allow_base_mismatch` never
//!    downgrades a digest mismatch.

use ckpt_wire::ArtifactKind;
use std::path::{Path, PathBuf};

use super::LoraError;
use crate::formats::manifest::{self, Manifest};
use crate::formats::source::GlobalTensor;

/// The names and recorded digest a base is known by.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    /// The base directory.
    pub dir: PathBuf,
    /// Names the base declares, with where each comes from.
    pub declared: Vec<(String, String)>,
    /// The directory's own name.
    pub dir_name: Option<String>,
    /// The cache snapshot commit and the refs that name it, when the base sits in
    /// the Hugging Face cache.
    pub revision: Option<(String, Vec<String>)>,
    /// The weights digest our manifest in the base records.
    pub manifest_digest: Option<String>,
}

/// The last path component of a model name or path, lowercased, without `@rev`.
pub fn short_name(name: &str) -> String {
    let name = name.trim().trim_end_matches('/');
    let name = name.split('@').next().unwrap_or(name);
    let last = name.rsplit('/').next().unwrap_or(name);
    let last = match last.strip_prefix("models--") {
        Some(cached) => cached.rsplit("--").next().unwrap_or(cached),
        None => last,
    };
    last.to_ascii_lowercase()
}

/// Reads our manifest in `dir`, when there is one of the expected kind.
pub fn manifest_of(dir: &Path, kind: ArtifactKind) -> Option<Manifest> {
    let m = Manifest::read(&dir.join(manifest::FILE_NAME)).ok()?;
    (m.output.kind == kind).then_some(m)
}

impl Identity {
    /// The identity of an HF base directory.
    pub fn of_hf(dir: &Path, config: Option<&serde_json::Value>) -> Identity {
        let mut id = Identity {
            dir: dir.to_owned(),
            dir_name: dir.file_name().map(|n| n.to_string_lossy().into_owned()),
            ..Identity::default()
        };
        // <cache>/models--org--name/snapshots/<commit>
        let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned());
        if let (Some(snapshots), Some(commit)) = (canonical.parent(), canonical.file_name())
            && snapshots.file_name().is_some_and(|n| n == "snapshots")
            && let Some(repo_dir) = snapshots.parent()
            && let Some(repo) = repo_dir
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("models--"))
        {
            id.declared.push((
                "its Hugging Face cache entry".into(),
                repo.replace("--", "/"),
            ));
            let commit = commit.to_string_lossy().into_owned();
            let refs = std::fs::read_dir(repo_dir.join("refs"))
                .map(|rd| {
                    rd.filter_map(Result::ok)
                        .filter(|e| {
                            crate::formats::file::read_text(
                                &e.path(),
                                crate::formats::file::limit::TRACKER,
                            )
                            .is_ok_and(|t| t.trim() == commit)
                        })
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            id.revision = Some((commit, refs));
        }
        if let Some(n) = config
            .and_then(|c| c.get("_name_or_path"))
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
        {
            id.declared
                .push(("_name_or_path in its config.json".into(), n.to_owned()));
        }
        if let Some(m) = manifest_of(dir, ArtifactKind::CheckpointHf) {
            id.add_manifest(&m);
        }
        id
    }

    /// The identity of a Megatron base iteration directory; `hf_model_id` is the
    /// `model.hf_model_id` of its `run_config.yaml`.
    pub fn of_megatron(dir: &Path, hf_model_id: Option<&str>) -> Identity {
        let mut id = Identity {
            dir: dir.to_owned(),
            dir_name: dir
                .parent()
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned()),
            ..Identity::default()
        };
        if let Some(h) = hf_model_id.filter(|s| !s.is_empty()) {
            id.declared
                .push(("model.hf_model_id in its run_config.yaml".into(), h.into()));
        }
        if let Some(m) = manifest_of(dir, ArtifactKind::CheckpointMegatron) {
            id.add_manifest(&m);
        }
        id
    }

    fn add_manifest(&mut self, m: &Manifest) {
        self.manifest_digest = Some(m.output.weights_digest.clone());
        if let Some(h) = m.parameters.get("hf_model_id").filter(|s| !s.is_empty()) {
            self.declared.push((
                format!("hf_model_id in its {}", manifest::FILE_NAME),
                h.clone(),
            ));
        }
    }
}

/// What the adapter says its base was.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claim {
    /// The file that says it.
    pub file: PathBuf,
    /// The field (`base_model_name_or_path`, `model.hf_model_id`).
    pub field: String,
    /// The name or path.
    pub name: Option<String>,
    /// The revision.
    pub revision: Option<String>,
}

/// The outcome of the name check when it does not refuse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NameCheck {
    /// A name or path agrees (what agreed).
    Agrees(String),
    /// Nothing to compare, or only the directory name: a note for the report.
    Unconfirmed(String),
    /// A declared name differs and `allow_base_mismatch` let it through: a warning.
    Allowed(String),
}

/// Compares the adapter's claim with the base's names (see the module docs).
///
/// # Errors
/// [`LoraError::WrongBase`] when a declared name or the cache revision clearly
/// differs and `allow` is false.
pub fn check_name(
    claim: &Claim,
    base: &Identity,
    base_param: &str,
    allow: bool,
) -> Result<NameCheck, LoraError> {
    let Some(name) = claim.name.as_deref() else {
        return Ok(NameCheck::Unconfirmed(format!(
            "{} names no base model ({} is empty), so the base is checked by shapes only",
            claim.file.display(),
            claim.field
        )));
    };
    let refuse_or_allow = |why: String| -> Result<NameCheck, LoraError> {
        if allow {
            Ok(NameCheck::Allowed(format!(
                "{why} (allowed by allow_base_mismatch=true)"
            )))
        } else {
            Err(LoraError::WrongBase {
                why: format!(
                    "{why}; merging an adapter into another model gives wrong weights even when the architecture matches. If {} really is the model the adapter was trained on (a copy under another name), pass allow_base_mismatch=true",
                    base.dir.display()
                ),
            })
        }
    };
    // The same directory, however spelled.
    let local = Path::new(name);
    if local.is_dir() && crate::paths::normalize(local) == crate::paths::normalize(&base.dir) {
        return Ok(NameCheck::Agrees(format!(
            "{} {name} is {base_param} itself",
            claim.field
        )));
    }
    let wanted = short_name(name);
    let mut names: Vec<(String, String)> = base.declared.clone();
    if let Some(d) = &base.dir_name {
        names.push(("its directory name".into(), d.clone()));
    }
    if let Some((src, n)) = names.iter().find(|(_, n)| short_name(n) == wanted) {
        if let (Some(rev), Some((commit, refs))) = (claim.revision.as_deref(), &base.revision) {
            let same = rev == commit
                || (rev.len() >= 7 && commit.starts_with(rev))
                || refs.iter().any(|r| r == rev);
            if !same {
                return refuse_or_allow(format!(
                    "{} says revision {rev:?} of {name}, but {base_param}={} is the cache snapshot {commit} (refs: {})",
                    claim.file.display(),
                    base.dir.display(),
                    if refs.is_empty() {
                        "none".into()
                    } else {
                        refs.join(", ")
                    }
                ));
            }
        }
        return Ok(NameCheck::Agrees(format!(
            "{} {name} matches {src} ({n})",
            claim.field
        )));
    }
    if base.declared.is_empty() {
        return Ok(NameCheck::Unconfirmed(format!(
            "{} says the base was {name}; {base_param}={} declares no model name (only its directory name {:?}), so the name could not be confirmed; the base is checked by shapes{}",
            claim.file.display(),
            base.dir.display(),
            base.dir_name.as_deref().unwrap_or(""),
            if base.manifest_digest.is_some() {
                " and digests"
            } else {
                ""
            }
        )));
    }
    let known = base
        .declared
        .iter()
        .map(|(src, n)| format!("{n} ({src})"))
        .collect::<Vec<_>>()
        .join(", ");
    refuse_or_allow(format!(
        "{} says the adapter was trained on {name}, but {base_param}={} is {known}",
        claim.file.display(),
        base.dir.display()
    ))
}

/// The line of one stored chunk in a weights digest: `name|dtype|shape|xxh3`, the
/// name with the chunk's box when it is not the whole tensor.
pub fn digest_line(t: &GlobalTensor, chunk: usize, xxh3: u128) -> String {
    let c = &t.chunks[chunk];
    let name = if c.sizes == t.shape {
        t.name.clone()
    } else {
        format!(
            "{}[{}]",
            t.name,
            crate::plan::box_text(&c.offsets, &c.sizes)
        )
    };
    format!(
        "{name}|{}|{:?}|{}\n",
        t.dtype,
        c.sizes,
        crate::formats::digest::format_digest(xxh3)
    )
}

/// A digest given by the user, checked for form.
///
/// # Errors
/// A message when it is not 32 hexadecimal digits.
pub fn parse_digest(text: &str) -> Result<String, String> {
    let t = text.trim().to_ascii_lowercase();
    let t = t.strip_prefix("xxh3:").unwrap_or(&t).to_owned();
    if t.len() == 32 && t.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(t)
    } else {
        Err(
            "32 hexadecimal digits (the weights_digest of a ckpt-convert report or manifest)"
                .into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names() {
        assert_eq!(short_name("meta-llama/Llama-3.2-1B"), "llama-3.2-1b");
        assert_eq!(short_name("/models/Llama-3.2-1B/"), "llama-3.2-1b");
        assert_eq!(short_name("org/name@main"), "name");
        assert_eq!(short_name("models--Qwen--Qwen2-0.5B"), "qwen2-0.5b");
    }

    fn claim(name: &str) -> Claim {
        Claim {
            file: "adapter_config.json".into(),
            field: "base_model_name_or_path".into(),
            name: Some(name.into()),
            revision: None,
        }
    }

    #[test]
    fn declared_names_decide_and_directory_names_only_warn() {
        let mut base = Identity {
            dir: "/nonexistent/base".into(),
            dir_name: Some("base".into()),
            ..Identity::default()
        };
        // Only a directory name: never a refusal.
        assert!(matches!(
            check_name(&claim("org/other"), &base, "base_hf_path", false),
            Ok(NameCheck::Unconfirmed(_))
        ));
        base.declared.push(("x".into(), "org/Model-A".into()));
        assert!(matches!(
            check_name(&claim("Org/model-a"), &base, "base_hf_path", false),
            Ok(NameCheck::Agrees(_))
        ));
        let e = check_name(&claim("org/model-b"), &base, "base_hf_path", false).unwrap_err();
        assert!(e.to_string().contains("allow_base_mismatch=true"), "{e}");
        assert!(matches!(
            check_name(&claim("org/model-b"), &base, "base_hf_path", true),
            Ok(NameCheck::Allowed(_))
        ));
        // A revision that is not the snapshot's.
        base.revision = Some(("abcdef0123456789".into(), vec!["main".into()]));
        let mut c = claim("org/model-a");
        c.revision = Some("main".into());
        assert!(check_name(&c, &base, "base_hf_path", false).is_ok());
        c.revision = Some("abcdef0".into());
        assert!(check_name(&c, &base, "base_hf_path", false).is_ok());
        c.revision = Some("v2.0".into());
        assert!(check_name(&c, &base, "base_hf_path", false).is_err());
    }

    #[test]
    fn digests_are_checked_for_form() {
        assert_eq!(
            parse_digest("99AA06D3014798D86001C324468D497F").unwrap(),
            "99aa06d3014798d86001c324468d497f"
        );
        assert!(parse_digest("1234").is_err());
    }
}
