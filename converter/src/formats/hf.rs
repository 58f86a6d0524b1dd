//! Hugging Face model directories: sharded or single-file safetensors weights, the
//! index, and the side files (config, generation config, tokenizer, chat template)
//! that must travel with the weights.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::{FormatError, file, natural_cmp, safetensors};
use crate::formats::dtype::DType;
use crate::formats::source::{Files, GlobalTensor};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// An HF checkpoint opened for reading.
#[derive(Debug)]
pub struct HfCheckpoint {
    /// The directory.
    pub root: PathBuf,
    /// The mapped weight files.
    pub files: Files,
    /// Every tensor, in shard order then natural name order.
    pub tensors: Vec<GlobalTensor>,
    /// Tensor name → index in `tensors`.
    pub by_name: HashMap<String, usize>,
    /// Tensor name → shard file name.
    pub shard_of: HashMap<String, String>,
    /// Shard file names, in order.
    pub shards: Vec<String>,
    /// The index's `metadata` object, when there is an index.
    pub index_metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Bytes of the safetensors headers (for provenance digests), by shard.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl HfCheckpoint {
    /// Opens the weights of the HF directory `root`.
    ///
    /// # Errors
    /// [`FormatError`] naming the file: no safetensors weights (or only pickled
    /// `pytorch_model.bin`), an unreadable index, a shard the index names that does
    /// not exist, a tensor the index places in a shard that lacks it, a tensor in two
    /// shards, or any safetensors header problem.
    pub fn open(root: &Path) -> Result<HfCheckpoint, FormatError> {
        if !root.is_dir() {
            return Err(FormatError::NotACheckpoint {
                path: root.to_owned(),
                why: if root.exists() {
                    "expected a Hugging Face model directory, found a file".into()
                } else {
                    "does not exist (expected a Hugging Face model directory)".into()
                },
            });
        }
        let index_path = root.join(INDEX_FILE);
        let (shards, weight_map, index_metadata) = if present(&index_path) {
            let (map, meta) = read_index(&index_path)?;
            let mut shards: Vec<String> = map.values().cloned().collect();
            shards.sort_by(|a, b| natural_cmp(a, b));
            shards.dedup();
            (shards, Some(map), Some(meta))
        } else if present(&root.join(SINGLE_FILE)) {
            (vec![SINGLE_FILE.to_owned()], None, None)
        } else {
            let mut found: Vec<String> = std::fs::read_dir(root)
                .map_err(|e| FormatError::io(root, e))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".safetensors") && !n.starts_with("adapter_model"))
                .collect();
            found.sort_by(|a, b| natural_cmp(a, b));
            if found.is_empty() {
                let pickled = root.join("pytorch_model.bin").exists()
                    || root.join("pytorch_model.bin.index.json").exists();
                let why = if pickled {
                    "expected safetensors weights, found only pickled pytorch_model.bin, which is not read (it can execute code); convert it to safetensors first".to_owned()
                } else {
                    format!("expected {SINGLE_FILE} or {INDEX_FILE}, found neither")
                };
                return Err(FormatError::NotACheckpoint {
                    path: root.to_owned(),
                    why,
                });
            }
            (found, None, None)
        };

        let mut files = Files::default();
        let mut tensors: Vec<GlobalTensor> = Vec::new();
        let mut by_name = HashMap::new();
        let mut shard_of = HashMap::new();
        let mut headers = Vec::new();
        for shard in &shards {
            let path = root.join(shard);
            if !present(&path) {
                let example = weight_map
                    .as_ref()
                    .and_then(|m| m.iter().find(|(_, s)| *s == shard).map(|(t, _)| t.clone()))
                    .unwrap_or_default();
                return Err(FormatError::File {
                    path: index_path.clone(),
                    why: format!(
                        "shard {shard:?} named in the index (for tensor {example:?}) does not exist"
                    ),
                });
            }
            let (id, file) = safetensors::open(&mut files, &path)?;
            headers.push((
                shard.clone(),
                files.get(id).bytes()[..file.header_len as usize].to_vec(),
            ));
            let mut in_file = file.tensors;
            in_file.sort_by(|a, b| natural_cmp(&a.name, &b.name));
            for t in in_file {
                if let Some(prev) = shard_of.get(&t.name) {
                    return Err(FormatError::Tensor {
                        path: path.clone(),
                        tensor: t.name.clone(),
                        why: format!("also present in {prev}"),
                    });
                }
                if let Some(map) = &weight_map
                    && map.get(&t.name).is_some_and(|s| s != shard)
                {
                    tracing::warn!(tensor = %t.name, shard = %shard, "tensor is in a shard the index does not name for it");
                }
                shard_of.insert(t.name.clone(), shard.clone());
                by_name.insert(t.name.clone(), tensors.len());
                tensors.push(t);
            }
        }
        if let Some(map) = &weight_map {
            for (tensor, shard) in map {
                if !by_name.contains_key(tensor) {
                    return Err(FormatError::Tensor {
                        path: root.join(shard),
                        tensor: tensor.clone(),
                        why: format!("the index places it in {shard}, which does not contain it"),
                    });
                }
            }
        }
        Ok(HfCheckpoint {
            root: root.to_owned(),
            files,
            tensors,
            by_name,
            shard_of,
            shards,
            index_metadata,
            headers,
        })
    }

    /// Looks up a tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&GlobalTensor> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(GlobalTensor::nbytes).sum()
    }
}

/// True when something is at `path` (a FIFO or a dangling link too, which the
/// reader then refuses by name rather than passing over).
fn present(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// The index's weight map and its `metadata` object.
pub type Index = (
    BTreeMap<String, String>,
    serde_json::Map<String, serde_json::Value>,
);

fn read_index(path: &Path) -> Result<Index, FormatError> {
    parse_index(&file::read_text(path, file::limit::INDEX)?, path)
}

/// Parses the text of an index (`path` names it in errors): its weight map,
/// every shard a plain file name, and its `metadata` object.
///
/// # Errors
/// [`FormatError::File`] when it is not JSON, has no weight map, or names a
/// shard outside the directory.
pub fn parse_index(text: &str, path: &Path) -> Result<Index, FormatError> {
    let json: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| FormatError::file(path, format!("not valid JSON: {e}")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| FormatError::file(path, "expected a \"weight_map\" object"))?;
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let shard = v.as_str().ok_or_else(|| {
            FormatError::file(path, format!("weight_map[{k:?}] is not a file name"))
        })?;
        if shard.contains('/') || shard.contains("..") {
            return Err(FormatError::file(
                path,
                format!("weight_map[{k:?}] = {shard:?} leaves the directory"),
            ));
        }
        out.insert(k.clone(), shard.to_owned());
    }
    let meta = json
        .get("metadata")
        .and_then(|m| m.as_object())
        .cloned()
        .unwrap_or_default();
    Ok((out, meta))
}

/// What a side file is, for provenance and validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SideFileKind {
    /// `config.json`.
    Config,
    /// `generation_config.json`.
    GenerationConfig,
    /// Tokenizer files.
    Tokenizer,
    /// A chat template (`chat_template.jinja`, `additional_chat_templates/*`,
    /// `chat_template.json`).
    ChatTemplate,
    /// Processor configuration.
    Processor,
    /// Custom modeling code (`*.py`, for `auto_map`).
    Code,
}

const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
];

/// Classifies a file of a model directory, by its path relative to the directory;
/// `None` for files that do not travel (weights, indexes, adapters, training state,
/// our own reports).
pub fn side_file_kind(rel: &str) -> Option<SideFileKind> {
    let name = rel.rsplit('/').next().unwrap_or(rel);
    if rel.starts_with("additional_chat_templates/") && name.ends_with(".jinja") {
        return Some(SideFileKind::ChatTemplate);
    }
    if rel.contains('/') {
        return None;
    }
    match name {
        "config.json" => Some(SideFileKind::Config),
        "generation_config.json" => Some(SideFileKind::GenerationConfig),
        "chat_template.jinja" | "chat_template.json" => Some(SideFileKind::ChatTemplate),
        "preprocessor_config.json" | "processor_config.json" => Some(SideFileKind::Processor),
        n if TOKENIZER_FILES.contains(&n) => Some(SideFileKind::Tokenizer),
        n if n.ends_with(".py") => Some(SideFileKind::Code),
        _ => None,
    }
}

/// A side file found in a model directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideFile {
    /// Path relative to the model directory.
    pub rel: String,
    /// What it is.
    pub kind: SideFileKind,
    /// Absolute path.
    pub path: PathBuf,
}

/// Lists the side files of a model directory (config, tokenizer, chat templates,
/// custom code), sorted by relative path.
///
/// # Errors
/// The I/O error of listing the directory; [`FormatError::File`] for a side file
/// that is not a regular file or is a link leaving the source ([`file::open`]).
pub fn side_files(root: &Path) -> Result<Vec<SideFile>, FormatError> {
    let mut out = Vec::new();
    let mut visit = |dir: &Path, prefix: &str| -> Result<(), FormatError> {
        if !dir.is_dir() {
            return Ok(());
        }
        for entry in std::fs::read_dir(dir).map_err(|e| FormatError::io(dir, e))? {
            let entry = entry.map_err(|e| FormatError::io(dir, e))?;
            let rel = format!("{prefix}{}", entry.file_name().to_string_lossy());
            if side_file_kind(&rel).is_none() || entry.path().is_dir() {
                continue;
            }
            // Links are followed only where they stay inside the source (HF cache
            // snapshots are links into the repository's blobs/); what travels must
            // be a regular file.
            file::check(&entry.path())?;
            if let Some(kind) = side_file_kind(&rel) {
                out.push(SideFile {
                    rel,
                    kind,
                    path: entry.path(),
                });
            }
        }
        Ok(())
    };
    visit(root, "")?;
    visit(
        &root.join("additional_chat_templates"),
        "additional_chat_templates/",
    )?;
    out.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(out)
}

/// Reads `config.json` of an HF directory, if present.
///
/// # Errors
/// [`FormatError`] when it exists but cannot be read ([`file::read`]) or is not
/// JSON.
pub fn read_config(dir: &Path) -> Result<Option<serde_json::Value>, FormatError> {
    read_json_opt(&dir.join("config.json"))
}

/// Reads a JSON configuration file (at most [`file::limit::CONFIG`] bytes), or
/// `None` when it does not exist.
///
/// # Errors
/// [`FormatError`] when it exists but cannot be read or is not JSON.
pub fn read_json_opt(path: &Path) -> Result<Option<serde_json::Value>, FormatError> {
    file::read_text_opt(path, file::limit::CONFIG)?
        .map(|text| {
            serde_json::from_str(&text)
                .map_err(|e| FormatError::file(path, format!("not valid JSON: {e}")))
        })
        .transpose()
}

/// Resolves `hf_model_id`: a local directory, or a model id looked up offline in the
/// Hugging Face cache (`HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `~/.cache/huggingface/hub`), at `refs/main` (or the only snapshot).
///
/// # Errors
/// [`FormatError::NotACheckpoint`] saying where it looked.
pub fn resolve_model(id: &str) -> Result<PathBuf, FormatError> {
    let local = Path::new(id);
    if local.is_dir() {
        return Ok(local.to_owned());
    }
    let not_found = |why: String| FormatError::NotACheckpoint {
        path: local.to_owned(),
        why,
    };
    if local.exists() {
        return Err(not_found(
            "expected a Hugging Face model directory, found a file".into(),
        ));
    }
    // One name component is a plain file or directory name: no separators, no `..`.
    let plain = |s: &str| !s.is_empty() && s != "." && s != ".." && !s.contains('/');
    let (repo, revision) = id.split_once('@').unwrap_or((id, "main"));
    let looks_like_id =
        repo.split('/').count() == 2 && repo.split('/').all(plain) && plain(revision);
    if !looks_like_id {
        return Err(not_found(
            "does not exist (expected a Hugging Face model directory, or a model id org/name in the cache)"
                .into(),
        ));
    }
    let cache = std::env::var_os("HF_HUB_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
        });
    let Some(cache) = cache else {
        return Err(not_found(
            "does not exist as a local directory, and no Hugging Face cache is configured".into(),
        ));
    };
    let model_dir = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshots = model_dir.join("snapshots");
    let by_ref = file::read_text_opt(&model_dir.join("refs").join(revision), file::limit::TRACKER)?
        .map(|commit| commit.trim().to_owned())
        .filter(|commit| plain(commit))
        .map(|commit| snapshots.join(commit));
    if let Some(dir) = by_ref.filter(|d| d.is_dir()) {
        return Ok(dir);
    }
    if snapshots.join(revision).is_dir() {
        return Ok(snapshots.join(revision));
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    match entries.as_slice() {
        [only] => Ok(only.clone()),
        [] => Err(not_found(format!(
            "does not exist as a local directory, nor in the Hugging Face cache at {} (downloads are never attempted)",
            model_dir.display()
        ))),
        _ => Err(not_found(format!(
            "{} has several snapshots and no refs/{revision}; name one as {repo}@<commit>",
            model_dir.display()
        ))),
    }
}

/// Parses a `save_pretrained`-style size: `5GB`, `500MB`, `2GiB`, or bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        "TIB" => 1024f64.powi(4),
        _ => return None,
    };
    let v = num * mult;
    (v.is_finite() && v >= 1.0).then_some(v as u64)
}

/// Assigns tensors, given in state-dict order with their byte sizes, to shards the
/// way `huggingface_hub.split_torch_state_dict_into_shards` does: greedy, a tensor
/// larger than the limit alone in its own shard.
pub fn assign_shards(sizes: &[u64], max_shard_size: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    for (i, &size) in sizes.iter().enumerate() {
        if size > max_shard_size {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max_shard_size && !current.is_empty() {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// File name of shard `i` (0-based) of `n`, as `save_pretrained` names them.
pub fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        SINGLE_FILE.to_owned()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// The index JSON `save_pretrained` writes: sorted keys, two-space indent, newline.
pub fn index_json(
    weight_map: &BTreeMap<String, String>,
    total_size: u64,
    total_parameters: u64,
) -> String {
    let value = serde_json::json!({
        "metadata": {
            "total_parameters": total_parameters,
            "total_size": total_size,
        },
        "weight_map": weight_map,
    });
    // serde_json with preserve_order keeps insertion order; json! inserts in the
    // order written above, which is already sorted; BTreeMap sorts the weight map.
    let mut text = serde_json::to_string_pretty(&value).expect("JSON of strings and numbers");
    text.push('\n');
    text
}

/// Bytes of a tensor of `dtype` and `shape`.
pub fn nbytes(dtype: DType, shape: &[u64]) -> u64 {
    shape.iter().product::<u64>() * dtype.size() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharding_follows_huggingface_hub() {
        // max 10: [4, 4] [8] [12 alone] [3, 5] ; the oversized tensor goes before the
        // current shard is closed, exactly as huggingface_hub does.
        let shards = assign_shards(&[4, 4, 8, 12, 3, 5], 10);
        assert_eq!(shards, vec![vec![0, 1], vec![3], vec![2], vec![4, 5]]);
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(parse_size("500MB"), Some(500_000_000));
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("1234"), Some(1234));
        assert_eq!(parse_size("lots"), None);
    }

    #[test]
    fn index_is_sorted_and_indented() {
        let mut map = BTreeMap::new();
        map.insert(
            "b".to_owned(),
            "model-00002-of-00002.safetensors".to_owned(),
        );
        map.insert(
            "a".to_owned(),
            "model-00001-of-00002.safetensors".to_owned(),
        );
        let text = index_json(&map, 10, 5);
        assert_eq!(
            text,
            "{\n  \"metadata\": {\n    \"total_parameters\": 5,\n    \"total_size\": 10\n  },\n  \"weight_map\": {\n    \"a\": \"model-00001-of-00002.safetensors\",\n    \"b\": \"model-00002-of-00002.safetensors\"\n  }\n}\n"
        );
    }

    #[test]
    fn side_files_are_classified() {
        assert_eq!(side_file_kind("config.json"), Some(SideFileKind::Config));
        assert_eq!(
            side_file_kind("chat_template.jinja"),
            Some(SideFileKind::ChatTemplate)
        );
        assert_eq!(
            side_file_kind("additional_chat_templates/tool.jinja"),
            Some(SideFileKind::ChatTemplate)
        );
        assert_eq!(
            side_file_kind("tokenizer.json"),
            Some(SideFileKind::Tokenizer)
        );
        assert_eq!(side_file_kind("model.safetensors"), None);
        assert_eq!(side_file_kind("adapter_config.json"), None);
        assert_eq!(side_file_kind("training_args.bin"), None);
    }
}
