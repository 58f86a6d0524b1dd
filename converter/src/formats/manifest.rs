//! `ckpt-manifest.json`: what was written and where it came from.
//!
//! Wire format (version 1), written last into the staging directory:
//! ```json
//! {"format": "ckpt-manifest", "version": 1,
//!  "tool": {"name": "ckpt-convert", "version": "0.1.0"},
//!  "created": "2026-11-29T12:00:00Z", "step": "convert/hf_to_megatron",
//!  "parameters": {"hf_model_id": "...", "dtype": "bfloat16"},
//!  "output": {"kind": "checkpoint_megatron", "iteration": 0,
//!             "tensors": 291, "tensor_bytes": 6425673728, "weights_digest": "…"},
//!  "files": [{"path": "__0_0.distcp", "size": 1234, "xxh3": "…"}],
//!  "provenance": {"sources": [{"role": "hf_model_id", "path": "…", "kind": "checkpoint_hf",
//!                              "weights_digest": "…", "files": [{"path": "…", "size": 1, "header_xxh3": "…"}]}],
//!                 "side_files": [{"path": "tokenizer/tokenizer.json", "kind": "tokenizer",
//!                                 "from": "…", "xxh3": "…"}]}}
//! ```
//! Digests are XXH3-128 ([`crate::formats::digest`]); `xxh3` is of the whole file
//! (`xxhsum -H2`), `weights_digest` is layout independent (see
//! [`crate::execute::Outcome::weights_digest`]).

use ckpt_wire::ArtifactKind;
use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One written file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FileRecord {
    /// Path relative to the output root.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// XXH3-128 of the whole file (hex), as `xxhsum -H2` prints it.
    pub xxh3: String,
}

/// The manifest file name.
pub const FILE_NAME: &str = "ckpt-manifest.json";

/// The tool that wrote a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tool {
    /// `ckpt-convert`.
    pub name: String,
    /// Its version.
    pub version: String,
}

/// What was produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Output {
    /// `checkpoint_hf` or `checkpoint_megatron`.
    pub kind: ArtifactKind,
    /// The Megatron iteration, for Megatron outputs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub iteration: Option<u64>,
    /// Tensors (pieces) written.
    pub tensors: usize,
    /// Tensor bytes written.
    pub tensor_bytes: u64,
    /// Layout-independent digest of the written tensors.
    pub weights_digest: String,
}

/// A source file's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Path.
    pub path: String,
    /// Size.
    pub size: u64,
    /// Digest of its header or metadata (the part that names and places tensors),
    /// or of the whole file for small side files.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub header_xxh3: Option<String>,
}

/// One input of the step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    /// The parameter that named it (`hf_model_id`, `megatron_path`).
    pub role: String,
    /// Its path.
    pub path: String,
    /// `checkpoint_hf`, `checkpoint_megatron`, `checkpoint_lora`.
    pub kind: ArtifactKind,
    /// Digest of the tensors read from it (same scheme as the output's).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub weights_digest: Option<String>,
    /// Its files.
    pub files: Vec<SourceFile>,
}

/// A copied side file (config, tokenizer, chat template).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SideFile {
    /// Path in the output.
    pub path: String,
    /// What it is.
    pub kind: String,
    /// Where it was copied from.
    pub from: String,
    /// Digest of the file.
    pub xxh3: String,
}

/// Where the output came from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Provenance {
    /// The inputs.
    pub sources: Vec<Source>,
    /// Copied side files.
    pub side_files: Vec<SideFile>,
}

/// The manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always `ckpt-manifest`.
    pub format: String,
    /// Format version (1).
    pub version: u32,
    /// The writer.
    pub tool: Tool,
    /// UTC time of writing, RFC 3339.
    pub created: String,
    /// The step (`convert/hf_to_megatron`).
    pub step: String,
    /// The step's parameters, as given.
    pub parameters: BTreeMap<String, String>,
    /// What was produced.
    pub output: Output,
    /// Every file of the output except the manifest.
    pub files: Vec<FileRecord>,
    /// Where it came from.
    pub provenance: Provenance,
}

impl Manifest {
    /// Reads a manifest.
    ///
    /// # Errors
    /// A message naming the file when it is missing or not a manifest.
    pub fn read(path: &Path) -> Result<Manifest, String> {
        let text = crate::formats::file::read_text(path, crate::formats::file::limit::INDEX)
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&text)
            .map_err(|e| format!("{}: not a ckpt manifest: {e}", path.display()))
    }

    /// Serializes as indented JSON with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).expect("manifest serializes");
        s.push('\n');
        s
    }
}

impl<'de> Deserialize<'de> for FileRecord {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Raw {
            path: String,
            size: u64,
            xxh3: String,
        }
        let r = Raw::deserialize(d)?;
        Ok(FileRecord {
            path: r.path,
            size: r.size,
            xxh3: r.xxh3,
        })
    }
}

/// The tool's identity.
pub fn tool() -> Tool {
    Tool {
        name: "ckpt-convert".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    }
}

/// Now, as an RFC 3339 UTC timestamp to the second.
pub fn now_rfc3339() -> String {
    rfc3339(jiff::Timestamp::now().as_second())
}

/// Formats seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (the epoch itself
/// for a time outside the calendar's range).
pub fn rfc3339(secs: i64) -> String {
    jiff::Timestamp::from_second(secs)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_000_000), "2026-11-30T00:53:20Z");
    }
}

/// The result of checking an output against its manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verification {
    /// Files checked.
    pub files: usize,
    /// Bytes read.
    pub bytes: u64,
    /// Problems found, one line each (empty when the output matches).
    pub problems: Vec<String>,
}

/// Re-reads every file the manifest of `dir` lists and compares size and digest.
///
/// # Errors
/// A message when the manifest itself is missing or unreadable.
pub fn verify(dir: &Path) -> Result<Verification, String> {
    verify_known(dir, &std::collections::HashMap::new())
}

/// [`verify`], with the size and digest of some files (by path relative to `dir`)
/// read back by the caller; the others are read here.
///
/// # Errors
/// A message when the manifest itself is missing or unreadable.
pub fn verify_known(
    dir: &Path,
    known: &std::collections::HashMap<String, (u64, String)>,
) -> Result<Verification, String> {
    let m = Manifest::read(&dir.join(FILE_NAME))?;
    let mut v = Verification::default();
    for f in &m.files {
        let path = dir.join(&f.path);
        v.files += 1;
        let found = match known.get(&f.path) {
            Some(k) => Ok(k.clone()),
            None => crate::formats::digest::file(&path),
        };
        match found {
            Err(e) => v.problems.push(format!("{}: {e}", f.path)),
            Ok((size, digest)) => {
                v.bytes += size;
                if size != f.size {
                    v.problems.push(format!(
                        "{}: expected {} bytes (manifest), found {size}",
                        f.path, f.size
                    ));
                } else if digest != f.xxh3 {
                    v.problems.push(format!(
                        "{}: content differs from the manifest (xxh3 {digest}, expected {})",
                        f.path, f.xxh3
                    ));
                }
            }
        }
    }
    Ok(v)
}
