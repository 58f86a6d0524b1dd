//! Megatron-Core `torch_dist` iteration directories (`iter_0000100/`).
//!
//! Read: `metadata.json` marks the backend, `.metadata` lists tensors and their
//! chunks, each chunk a `torch.save` item inside a `.distcp` file; every item is
//! located, bounds-checked and its `data.pkl` interpreted when the directory is
//! opened, but no tensor data is read until a plan asks for a region. Optimizer
//! and RNG entries are skipped. Common state comes from `common.pt` or the in-DCP
//! `common_state` item.
//!
//! Write helpers produce the side files of a weights-only checkpoint as
//! Megatron-Bridge's import writes them (`docs/megatron-torch-dist.md#weights-only-checkpoints`).

use std::path::{Path, PathBuf};

use super::dcp::{DcpMetadata, StorageRef};
use super::pickle::{AllowList, Id, Node, Pickle, Py};
use super::torch_save::{self, Archive, tensor_allow_list};
use super::{FormatError, file, natural_cmp};
use crate::formats::dtype::DType;
use crate::formats::source::{ByteRef, ChunkData, Files, GlobalTensor, TensorChunk};

/// The tracker file in a run directory.
pub const TRACKER: &str = "latest_checkpointed_iteration.txt";

/// The `metadata.json` MCore ≤ 0.18 writes, accepted by every version
/// (`docs/megatron-torch-dist.md#backend-marker`).
pub const METADATA_JSON: &str = r#"{"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch", "common_backend_version": 1}"#;

/// Name of an iteration directory.
pub fn iter_dir_name(iteration: u64) -> String {
    format!("iter_{iteration:07}")
}

/// Parses `iter_0000100` (or `release`) into an iteration number.
pub fn parse_iter_dir_name(name: &str) -> Option<u64> {
    name.strip_prefix("iter_")?.parse().ok()
}

/// The iteration directory `path` (parameter `param`, holding `what`) leads to,
/// as Megatron-Core's loader picks it: `path` itself when it holds `.metadata`;
/// in a run directory, the iteration its tracker names, else the highest
/// `iter_*` directory holding `.metadata`. Returns the directory and, when it was
/// resolved, a note saying how.
///
/// # Errors
/// Why `path` leads to no iteration.
pub fn resolve_iteration(
    path: &Path,
    param: &str,
    what: &str,
) -> Result<(PathBuf, Option<String>), String> {
    if path.join(".metadata").is_file() {
        return Ok((path.to_owned(), None));
    }
    if !path.is_dir() {
        return Err(format!(
            "does not exist: expected {what} (an iter_* directory or its run directory)"
        ));
    }
    let chosen = match read_tracker(path) {
        Some(Ok(Some(n))) => Some((
            path.join(iter_dir_name(n)),
            format!("its {TRACKER} names iteration {n}"),
        )),
        Some(Ok(None)) => Some((path.join("release"), format!("its {TRACKER} names release"))),
        Some(Err(e)) => return Err(e),
        None => {
            let mut iters: Vec<(u64, PathBuf)> = std::fs::read_dir(path)
                .map(|rd| {
                    rd.filter_map(Result::ok)
                        .filter_map(|e| {
                            let n = parse_iter_dir_name(&e.file_name().to_string_lossy())?;
                            Some((n, e.path()))
                        })
                        .filter(|(_, p)| p.join(".metadata").is_file())
                        .collect()
                })
                .unwrap_or_default();
            iters.sort();
            let count = iters.len();
            iters.pop().map(|(n, p)| {
                (
                    p,
                    format!("iteration {n} is the highest of {count} iter_* directories"),
                )
            })
        }
    };
    match chosen {
        Some((dir, why)) if dir.join(".metadata").is_file() => {
            let note = format!(
                "{param}={} resolved to {} ({why})",
                path.display(),
                dir.display()
            );
            Ok((dir, Some(note)))
        }
        Some((dir, why)) => Err(format!("{why}, but {} holds no .metadata", dir.display())),
        None => Err(format!(
            "expected {what}: an iter_* directory with .metadata, or a run directory holding them; found neither"
        )),
    }
}

/// Reads a run directory's tracker: the latest iteration, or `None` for `release`;
/// `None` when there is no tracker.
pub fn read_tracker(run_dir: &Path) -> Option<Result<Option<u64>, String>> {
    let text = match file::read_text_opt(&run_dir.join(TRACKER), file::limit::TRACKER) {
        Ok(t) => t?,
        Err(e) => return Some(Err(e.to_string())),
    };
    let t = text.trim();
    Some(if t == "release" {
        Ok(None)
    } else {
        t.parse::<u64>()
            .map(Some)
            .map_err(|_| format!("{TRACKER} holds {t:?}, not an iteration number"))
    })
}

/// A bytes entry (an MCore `ShardedObject` such as `_extra_state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ByteItem {
    /// The DCP key.
    pub fqn: String,
    /// Where its `torch.save` payload is.
    pub data: ByteRef,
    /// Why it may not be carried into an output ([`check_carried`]), if so.
    pub refused: Option<String>,
}

/// The common (non-sharded) state, as far as conversion needs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CommonState {
    /// Where it came from (`common.pt`, `common_state/shard_0_1`), if present.
    pub source: Option<String>,
    /// `iteration`.
    pub iteration: Option<i64>,
    /// `checkpoint_version`.
    pub checkpoint_version: Option<f64>,
    /// A rendering of `content_metadata`.
    pub content_metadata: Option<String>,
    /// Top-level keys.
    pub keys: Vec<String>,
}

/// A Megatron iteration directory opened for reading.
#[derive(Debug)]
pub struct MegatronCheckpoint {
    /// The iteration directory.
    pub dir: PathBuf,
    /// The iteration, from the directory name or the common state.
    pub iteration: Option<u64>,
    /// Mapped `.distcp` files.
    pub files: Files,
    /// Model tensors (optimizer and RNG state skipped), in natural key order.
    pub tensors: Vec<GlobalTensor>,
    /// Model bytes entries (`_extra_state`), in natural key order.
    pub byte_items: Vec<ByteItem>,
    /// Keys skipped because they are not model weights.
    pub skipped: Vec<String>,
    /// Common state.
    pub common: CommonState,
    /// `metadata.json`, when present.
    pub metadata_json: Option<serde_json::Value>,
    /// The raw `.metadata` (for provenance digests).
    pub metadata_bytes: Vec<u8>,
    /// `run_config.yaml`, when present.
    pub run_config: Option<PathBuf>,
}

/// True for DCP keys that are not model weights.
pub fn is_non_model_key(fqn: &str) -> bool {
    fqn.starts_with("optimizer.")
        || fqn.starts_with("optimizer/")
        || fqn.starts_with("rng_state")
        || fqn.starts_with("rerun_state_machine")
        || fqn.starts_with("common_state/")
}

/// Explains why `dir` is not an iteration directory, naming the latest iteration
/// when it is a run directory.
pub fn not_an_iteration_dir(dir: &Path) -> FormatError {
    let why = match read_tracker(dir) {
        Some(Ok(Some(n))) => {
            let name = iter_dir_name(n);
            format!(
                "is a run directory: expected an iter_* directory, found {TRACKER} naming {n} (use megatron_path={})",
                dir.join(name).display()
            )
        }
        Some(Ok(None)) => format!(
            "is a run directory: expected an iter_* directory, found {TRACKER} naming release (use megatron_path={})",
            dir.join("release").display()
        ),
        Some(Err(e)) => format!("is a run directory with an unreadable tracker: {e}"),
        None => {
            let mut iters: Vec<String> = std::fs::read_dir(dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| parse_iter_dir_name(n).is_some())
                        .collect()
                })
                .unwrap_or_default();
            iters.sort_by(|a, b| natural_cmp(a, b));
            match iters.last() {
                Some(last) => format!(
                    "expected an iter_* directory with .metadata and metadata.json, found a directory holding {} (use megatron_path={})",
                    iters.join(", "),
                    dir.join(last).display()
                ),
                None if std::fs::read_dir(dir).is_ok_and(|mut rd| rd.next().is_none()) => {
                    // What a source that does not exist looks like in a pod: the
                    // kubelet creates a missing subPath as an empty directory.
                    "is an empty directory: expected an iter_* directory holding .metadata and metadata.json (the checkpoint does not exist there)".into()
                }
                None => "expected an iter_* directory holding .metadata and metadata.json, found neither".into(),
            }
        }
    };
    FormatError::NotACheckpoint {
        path: dir.to_owned(),
        why,
    }
}

/// Common-state pickles may carry these inert data classes besides tensors.
fn common_allow_list() -> AllowList {
    tensor_allow_list()
        .with(&[
            ("argparse", "Namespace"),
            ("types", "SimpleNamespace"),
            ("pathlib", "PosixPath"),
            ("pathlib", "PurePosixPath"),
            ("builtins", "set"),
            ("builtins", "frozenset"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
            ("io", "BytesIO"),
        ])
        .with_modules(&[
            "megatron.core.rerun_state_machine",
            "megatron.core.enums",
            "megatron.core.transformer.enums",
            "megatron.core.optimizer.optimizer_config",
        ])
}

impl MegatronCheckpoint {
    /// Opens the iteration directory `dir`.
    ///
    /// # Errors
    /// [`FormatError`] naming the file and tensor: a run directory given instead of
    /// an iteration (naming the latest iteration), a backend other than `torch_dist`,
    /// a refused `.metadata`, a `.distcp` file missing or shorter than an item, an
    /// item whose archive or `data.pkl` is broken or disagrees with `.metadata`.
    pub fn open(dir: &Path) -> Result<MegatronCheckpoint, FormatError> {
        let md_path = dir.join(".metadata");
        if !dir.is_dir() {
            return Err(FormatError::NotACheckpoint {
                path: dir.to_owned(),
                why: if dir.exists() {
                    "expected an iter_* directory, found a file".into()
                } else {
                    "does not exist (expected an iter_* directory)".into()
                },
            });
        }
        if std::fs::symlink_metadata(&md_path).is_err() {
            return Err(not_an_iteration_dir(dir));
        }
        let metadata_json =
            match file::read_text_opt(&dir.join("metadata.json"), file::limit::CONFIG)? {
                Some(text) => {
                    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                        FormatError::file(
                            &dir.join("metadata.json"),
                            format!("not valid JSON: {e}"),
                        )
                    })?;
                    let backend = v
                        .get("sharded_backend")
                        .and_then(|b| b.as_str())
                        .unwrap_or("");
                    if backend != "torch_dist" {
                        return Err(FormatError::file(
                            &dir.join("metadata.json"),
                            format!("expected sharded_backend \"torch_dist\", found {backend:?}"),
                        ));
                    }
                    Some(v)
                }
                None => None,
            };
        let metadata_bytes = file::read(&md_path, file::limit::DCP_METADATA)?;
        let md = DcpMetadata::parse(&metadata_bytes).map_err(|source| FormatError::Dcp {
            path: md_path.clone(),
            source,
        })?;

        let mut files = Files::default();
        let item_ref = |files: &mut Files,
                        fqn: &str,
                        s: &StorageRef|
         -> Result<ByteRef, FormatError> {
            let path = dir.join(&s.relative_path);
            if std::fs::symlink_metadata(&path).is_err() {
                return Err(FormatError::Tensor {
                    path: md_path.clone(),
                    tensor: fqn.to_owned(),
                    why: format!("its data file {} does not exist", s.relative_path),
                });
            }
            let id = files.add(&path)?;
            let len = files.get(id).len();
            if s.offset.checked_add(s.length).is_none_or(|end| end > len) {
                return Err(FormatError::Tensor {
                    path,
                    tensor: fqn.to_owned(),
                    why: format!(
                        "item at offset {} of length {} runs past the end of the {len}-byte file (truncated?)",
                        s.offset, s.length
                    ),
                });
            }
            Ok(ByteRef {
                file: id,
                offset: s.offset,
                len: s.length,
            })
        };

        let mut tensors = Vec::new();
        let mut skipped = Vec::new();
        let allow = tensor_allow_list();
        for entry in &md.tensors {
            if is_non_model_key(&entry.fqn) {
                skipped.push(entry.fqn.clone());
                continue;
            }
            let mut chunks = Vec::with_capacity(entry.chunks.len());
            for c in &entry.chunks {
                let item = item_ref(&mut files, &entry.fqn, &c.storage)?;
                let file = files.get(item.file);
                let item_err = |why: String| FormatError::Tensor {
                    path: file.path.clone(),
                    tensor: entry.fqn.clone(),
                    why: format!(
                        "chunk at {:?} (item at offset {}): {why}",
                        c.offsets, item.offset
                    ),
                };
                let bytes = files.slice(item);
                let archive = Archive::open(bytes).map_err(|e| item_err(e.to_string()))?;
                let p = archive
                    .pickle(&allow)
                    .map_err(|e| item_err(e.to_string()))?;
                let t = archive
                    .tensor(&p, p.root())
                    .map_err(|e| item_err(e.to_string()))?;
                if t.dtype != entry.dtype {
                    return Err(item_err(format!(
                        "item holds {} but .metadata says {}",
                        t.dtype, entry.dtype
                    )));
                }
                if t.shape != c.sizes {
                    return Err(item_err(format!(
                        "item has shape {:?} but .metadata says the chunk is {:?}",
                        t.shape, c.sizes
                    )));
                }
                let storage = ByteRef {
                    file: item.file,
                    offset: item.offset + t.storage.data_offset,
                    len: t.storage.size,
                };
                let data = match t.contiguous_range() {
                    Some((off, len)) => ChunkData::Contiguous(ByteRef {
                        file: item.file,
                        offset: item.offset + off,
                        len,
                    }),
                    None => ChunkData::Strided {
                        storage,
                        storage_offset: t.storage_offset,
                        strides: t.stride.clone(),
                    },
                };
                chunks.push(TensorChunk {
                    offsets: c.offsets.clone(),
                    sizes: c.sizes.clone(),
                    data,
                    checksum: Some((storage, t.storage.crc32)),
                });
            }
            tensors.push(GlobalTensor {
                name: entry.fqn.clone(),
                dtype: entry.dtype,
                shape: entry.size.clone(),
                chunks,
            });
        }
        tensors.sort_by(|a, b| natural_cmp(&a.name, &b.name));

        let mut byte_items = Vec::new();
        let mut common_item = None;
        for b in &md.bytes {
            if b.fqn.starts_with("common_state/") {
                common_item = Some(item_ref(&mut files, &b.fqn, &b.storage)?);
                continue;
            }
            if is_non_model_key(&b.fqn) {
                skipped.push(b.fqn.clone());
                continue;
            }
            let data = item_ref(&mut files, &b.fqn, &b.storage)?;
            byte_items.push(ByteItem {
                fqn: b.fqn.clone(),
                data,
                refused: check_carried(files.slice(data), 0).err(),
            });
        }
        byte_items.sort_by(|a, b| natural_cmp(&a.fqn, &b.fqn));

        let common_pt = dir.join("common.pt");
        let common = if let Some(bytes) = file::read_opt(&common_pt, file::limit::COMMON)? {
            read_common(&bytes, false).map_err(|why| FormatError::file(&common_pt, why))?
        } else if let Some(item) = common_item {
            read_common(files.slice(item), true).map_err(|why| FormatError::Tensor {
                path: files.get(item.file).path.clone(),
                tensor: "common_state/shard_0_1".into(),
                why,
            })?
        } else {
            CommonState::default()
        };
        let iteration = dir
            .file_name()
            .and_then(|n| parse_iter_dir_name(&n.to_string_lossy()))
            .or_else(|| common.iteration.and_then(|i| u64::try_from(i).ok()));
        let run_config = Some(dir.join("run_config.yaml"))
            .filter(|p| std::fs::symlink_metadata(p).is_ok())
            .map(|p| file::check(&p).map(|()| p))
            .transpose()?;
        Ok(MegatronCheckpoint {
            dir: dir.to_owned(),
            iteration,
            files,
            tensors,
            byte_items,
            skipped,
            common,
            metadata_json,
            metadata_bytes,
            run_config,
        })
    }

    /// Looks up a model tensor by key.
    pub fn tensor(&self, fqn: &str) -> Option<&GlobalTensor> {
        self.tensors.iter().find(|t| t.name == fqn)
    }

    /// Total bytes of model tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(GlobalTensor::nbytes).sum()
    }

    /// The bytes items with their payloads, to be carried into an output
    /// verbatim: a loader will unpickle them, so each must have passed the same
    /// allow-list as what we read ([`check_carried`]).
    ///
    /// # Errors
    /// [`FormatError::Tensor`] naming the data file, the first refused item and
    /// the global its pickle names.
    pub fn carried_bytes(&self) -> Result<Vec<(&ByteItem, &[u8])>, FormatError> {
        self.byte_items
            .iter()
            .map(|b| match &b.refused {
                Some(why) => Err(FormatError::Tensor {
                    path: self.files.get(b.data.file).path.clone(),
                    tensor: b.fqn.clone(),
                    why: format!(
                        "bytes item (module state) cannot be carried into the output: {why}"
                    ),
                }),
                None => Ok((b, self.files.slice(b.data))),
            })
            .collect()
    }
}

/// Globals a bytes item (`_extra_state`) may name: tensors, and the `io.BytesIO`
/// older TransformerEngine versions saved (built from `_codecs.encode(text,
/// "latin1")`).
fn carried_allow_list() -> AllowList {
    tensor_allow_list().with(&[("_io", "BytesIO"), ("io", "BytesIO"), ("_codecs", "encode")])
}

/// How deep `BytesIO` payloads may nest archives.
const MAX_CARRIED_DEPTH: usize = 2;

/// Checks a `torch.save` payload that is copied into an output, where a loader
/// will unpickle it with `weights_only=False` or `pickle.loads`: its `data.pkl`
/// passes [`carried_allow_list`], and so does every pickle nested inside it. A
/// non-empty `uint8` tensor is what TransformerEngine `pickle.loads` (its FP8
/// metadata): it must be a pickle of plain data. A non-empty `BytesIO` is what
/// older TransformerEngine `torch.load`s: it must be a `torch.save` archive that
/// passes this same check.
///
/// # Errors
/// What was refused, naming the global or the nested payload.
pub fn check_carried(bytes: &[u8], depth: usize) -> Result<(), String> {
    let archive = Archive::open(bytes).map_err(|e| e.to_string())?;
    let p = archive
        .pickle(&carried_allow_list())
        .map_err(|e| e.to_string())?;
    for id in p.ids() {
        let Some((callable, args, state)) = p.as_object(id) else {
            continue;
        };
        match (callable.module.as_str(), callable.name.as_str()) {
            ("torch._utils", _) => {
                let t = archive.tensor(&p, id).map_err(|e| e.to_string())?;
                if t.dtype != DType::U8 || t.numel() == 0 {
                    continue;
                }
                let (off, len) = t
                    .contiguous_range()
                    .ok_or("a uint8 tensor that is not contiguous")?;
                let data = bytes
                    .get(off as usize..(off + len) as usize)
                    .ok_or("a uint8 tensor outside its archive")?;
                Pickle::parse(data, &AllowList::new(&[])).map_err(|e| {
                    format!("its uint8 tensor of {len} bytes (unpickled by TransformerEngine): {e}")
                })?;
            }
            ("_codecs", "encode") => {
                let enc = args.get(1).and_then(|&a| p.as_str(a));
                if !matches!(enc, Some("latin1" | "latin-1")) || args.len() != 2 {
                    return Err(format!(
                        "_codecs.encode called with {}: expected (text, \"latin1\")",
                        p.describe(id, 3)
                    ));
                }
            }
            (_, "BytesIO") => {
                let content = state
                    .and_then(|s| p.as_seq(s))
                    .and_then(|s| s.first().copied())
                    .map(|c| carried_bytes(&p, c))
                    .unwrap_or(Some(Vec::new()))
                    .ok_or("a BytesIO whose content is not bytes")?;
                if content.is_empty() {
                    continue;
                }
                if depth >= MAX_CARRIED_DEPTH {
                    return Err("BytesIO payloads nested too deep".into());
                }
                check_carried(&content, depth + 1)
                    .map_err(|e| format!("its BytesIO of {} bytes: {e}", content.len()))?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// The bytes a `BytesIO` state holds: `bytes`, or `_codecs.encode(text, "latin1")`.
fn carried_bytes(p: &Pickle, id: Id) -> Option<Vec<u8>> {
    match p.node(id) {
        Node::Bytes(b) => Some(b.clone()),
        Node::Object { callable, args, .. } if callable.name == "encode" => {
            let text = p.as_str(*args.first()?)?;
            text.chars()
                .map(|c| u8::try_from(u32::from(c)).ok())
                .collect()
        }
        _ => None,
    }
}

/// Reads the common-state dict from `common.pt`, or from the `[dict]` payload of
/// the in-DCP `common_state` item when `wrapped`.
fn read_common(bytes: &[u8], wrapped: bool) -> Result<CommonState, String> {
    let archive = Archive::open(bytes).map_err(|e| e.to_string())?;
    let p = archive
        .pickle(&common_allow_list())
        .map_err(|e| e.to_string())?;
    let mut root = p.root();
    if wrapped {
        root = p
            .as_seq(root)
            .and_then(|s| s.first().copied())
            .ok_or("common_state payload is not a one-element list")?;
    }
    let dict = p.as_dict(root).ok_or("common state is not a dict")?;
    let keys = dict
        .iter()
        .filter_map(|(k, _)| p.as_str(*k).map(str::to_owned))
        .collect();
    let number = |id: Id| match p.node(id) {
        Node::Float(f) => Some(*f),
        Node::Int(i) => Some(*i as f64),
        _ => None,
    };
    Ok(CommonState {
        source: Some(
            if wrapped {
                "common_state/shard_0_1"
            } else {
                "common.pt"
            }
            .into(),
        ),
        iteration: p.dict_get(root, "iteration").and_then(|i| p.as_int(i)),
        checkpoint_version: p.dict_get(root, "checkpoint_version").and_then(number),
        content_metadata: p
            .dict_get(root, "content_metadata")
            .map(|c| p.describe(c, 3)),
        keys,
    })
}

/// `common.pt` for a weights-only checkpoint (`docs/megatron-torch-dist.md#common-state`).
pub fn common_pt(iteration: u64) -> Vec<u8> {
    let value = Py::str_dict([
        ("checkpoint_version", Py::Float(3.0)),
        ("iteration", Py::Int(iteration as i64)),
        (
            "content_metadata",
            Py::str_dict([
                ("singleton_local_shards", Py::Bool(false)),
                ("chained_optim_avoid_prefix", Py::Bool(true)),
            ]),
        ),
    ]);
    torch_save::save(&value, &[])
}

/// `train_state.pt`: Megatron-Bridge's eight 0-d tensors
/// (`docs/megatron-torch-dist.md#train-state`).
pub fn train_state_pt(step: u64) -> Vec<u8> {
    let mut items = Vec::new();
    let mut storages = Vec::new();
    let fields: [(&str, DType, Vec<u8>); 8] = [
        ("step", DType::I64, (step as i64).to_le_bytes().to_vec()),
        (
            "consumed_train_samples",
            DType::I64,
            0i64.to_le_bytes().to_vec(),
        ),
        (
            "skipped_train_samples",
            DType::I64,
            0i64.to_le_bytes().to_vec(),
        ),
        (
            "consumed_valid_samples",
            DType::I64,
            0i64.to_le_bytes().to_vec(),
        ),
        (
            "floating_point_operations_so_far",
            DType::F32,
            0f32.to_le_bytes().to_vec(),
        ),
        ("do_train", DType::Bool, vec![0]),
        ("do_valid", DType::Bool, vec![0]),
        ("do_test", DType::Bool, vec![0]),
    ];
    for (i, (name, dtype, bytes)) in fields.into_iter().enumerate() {
        let key = i.to_string();
        items.push((Py::str(name), torch_save::tensor_py(dtype, &[], &key)));
        storages.push((key, bytes));
    }
    torch_save::save(&Py::Dict(items), &storages)
}

/// The `_extra_state` payload of a TransformerEngine module without FP8:
/// `torch.save([torch.empty(0, dtype=torch.uint8)])`.
pub fn te_extra_state_payload() -> Vec<u8> {
    let value = Py::List(vec![torch_save::tensor_py(DType::U8, &[0], "0")]);
    torch_save::save(&value, &[("0".into(), Vec::new())])
}

/// The `_extra_state` payload of a non-TE (local spec) module: `torch.save([None])`.
pub fn local_extra_state_payload() -> Vec<u8> {
    torch_save::save(&Py::List(vec![Py::None]), &[])
}

/// Reads what a bytes item holds, for `inspect`: a short description (it says
/// when the item could not be carried into an output).
pub fn describe_bytes_item(bytes: &[u8]) -> String {
    let Ok(archive) = Archive::open(bytes) else {
        return format!("{} bytes (not a torch.save archive)", bytes.len());
    };
    match archive.pickle(&common_allow_list()) {
        Ok(p) => describe_payload(&archive, &p, p.root(), 4),
        Err(e) => format!("{} bytes ({e})", bytes.len()),
    }
}

/// Describes `id` to `depth` levels (a pickle's memo can make a list contain
/// itself, so the depth is what ends the walk).
fn describe_payload(archive: &Archive<'_>, p: &Pickle, id: Id, depth: usize) -> String {
    if let Ok(t) = archive.tensor(p, id) {
        return format!("tensor {} {:?}", t.dtype, t.shape);
    }
    match p.node(id) {
        Node::List(_) | Node::Tuple(_) if depth == 0 => "[…]".into(),
        Node::List(items) | Node::Tuple(items) => {
            let inner: Vec<String> = items
                .iter()
                .take(4)
                .map(|&i| describe_payload(archive, p, i, depth - 1))
                .collect();
            format!("[{}]", inner.join(", "))
        }
        _ => p.describe(id, 3),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn side_payloads_parse_back() {
        let common = read_common(&common_pt(7), false).unwrap();
        assert_eq!(common.iteration, Some(7));
        assert_eq!(common.checkpoint_version, Some(3.0));
        assert!(
            common
                .content_metadata
                .unwrap()
                .contains("singleton_local_shards")
        );
        assert_eq!(
            describe_bytes_item(&te_extra_state_payload()),
            "[tensor uint8 [0]]"
        );
        assert_eq!(describe_bytes_item(&local_extra_state_payload()), "[None]");
        let ts = train_state_pt(3);
        let archive = Archive::open(&ts).unwrap();
        let p = archive.pickle(&tensor_allow_list()).unwrap();
        let step = p.dict_get(p.root(), "step").unwrap();
        let t = archive.tensor(&p, step).unwrap();
        assert_eq!((t.dtype, t.shape.len()), (DType::I64, 0));
        let (off, len) = t.contiguous_range().unwrap();
        assert_eq!(&ts[off as usize..(off + len) as usize], &3i64.to_le_bytes());
    }

    /// Real `torch.save` payloads (tests/data/hostile/make.py): what loaders would
    /// unpickle is refused by name when it calls anything, accepted when inert.
    #[test]
    fn carried_payloads_are_vetted_like_what_we_read() {
        macro_rules! data {
            ($f:literal) => {
                &include_bytes!(concat!("../../tests/data/hostile/", $f))[..]
            };
        }
        for (name, bytes, says) in [
            (
                "plain",
                data!("extra_state_os_system.pt"),
                "the global posix.system",
            ),
            (
                "uint8",
                data!("extra_state_uint8_os_system.pt"),
                "uint8 tensor of",
            ),
            (
                "BytesIO",
                data!("extra_state_bytesio_os_system.pt"),
                "its BytesIO of",
            ),
        ] {
            let err = check_carried(bytes, 0).unwrap_err();
            assert!(
                err.contains(says) && err.contains("posix.system"),
                "{name}: {err}"
            );
        }
        for ok in [
            data!("extra_state_te_empty.pt"),
            data!("extra_state_none.pt"),
            data!("extra_state_bytesio_tensors.pt"),
            data!("extra_state_uint8_plain.pt"),
        ] {
            check_carried(ok, 0).unwrap();
        }
        check_carried(&te_extra_state_payload(), 0).unwrap();
        check_carried(&local_extra_state_payload(), 0).unwrap();
    }

    /// Found by the `pickle_ops` fuzz target: a list that contains itself (a memo
    /// reference appended to the list it names) made the description recurse
    /// until the stack overflowed (`inspect` of such a checkpoint crashed).
    #[test]
    fn a_list_containing_itself_is_described() {
        // PROTO 2, EMPTY_LIST, BINPUT 0, BINGET 0, APPEND, STOP.
        let pkl = vec![0x80, 2, b']', b'q', 0, b'h', 0, b'a', b'.'];
        let archive = crate::formats::torch_zip::write_archive(&[("archive/data.pkl", pkl)]);
        assert_eq!(describe_bytes_item(&archive), "[[[[[…]]]]]");
    }

    #[test]
    fn iteration_names() {
        assert_eq!(iter_dir_name(100), "iter_0000100");
        assert_eq!(parse_iter_dir_name("iter_0000100"), Some(100));
        assert_eq!(parse_iter_dir_name("release"), None);
    }
}
