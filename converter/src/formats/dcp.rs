//! The `.metadata` file of a `torch.distributed.checkpoint` (DCP) directory.
//!
//! Reading interprets the pickled `Metadata` graph by class name and dict keys and
//! ignores what we do not need (`planner_data`, `storage_meta`, `version`, MCore's
//! `mcore_data` and `all_local_plans`), so files from torch 2.3 to 2.15 and from
//! MCore 0.8 on all read. Writing follows the "safest emission" recipe of
//! `docs/megatron-torch-dist.md#writing-the-metadata`: protocol 2, 5-tuple `TensorProperties`, no
//! `storage_meta`, `planner_data` filled, which every torch from 2.3 on loads.

use std::collections::HashMap;

use super::pickle::{AllowList, Global, Id, Node, Pickle, PickleError, Py, write_pickle};
use crate::formats::dtype::DType;

const MD: &str = "torch.distributed.checkpoint.metadata";
const FS: &str = "torch.distributed.checkpoint.filesystem";
const PLANNER: &str = "torch.distributed.checkpoint.planner";
const MCORE: &str = "megatron.core.dist_checkpointing.strategies.torch";

/// Globals a `.metadata` may name (all inert data classes).
pub fn metadata_allow_list() -> AllowList {
    let mut exact: Vec<(&'static str, &'static str)> = vec![
        (MD, "Metadata"),
        (MD, "TensorStorageMetadata"),
        (MD, "BytesStorageMetadata"),
        (MD, "ChunkStorageMetadata"),
        (MD, "TensorProperties"),
        (MD, "_MEM_FORMAT_ENCODING"),
        (MD, "MetadataIndex"),
        (MD, "StorageMeta"),
        (FS, "_StorageInfo"),
        (PLANNER, "SavePlan"),
        (PLANNER, "WriteItem"),
        (PLANNER, "WriteItemType"),
        (PLANNER, "TensorWriteData"),
        (MCORE, "MCoreMetadata"),
        (MCORE, "MCoreSavePlan"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    ];
    for d in DType::ALL {
        exact.push(("torch", d.torch_name()));
    }
    AllowList::new(&exact)
}

/// Where an item's bytes are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRef {
    /// Data file, relative to the checkpoint directory.
    pub relative_path: String,
    /// Byte offset of the item in that file.
    pub offset: u64,
    /// Byte length of the item.
    pub length: u64,
}

/// One saved shard of a tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    /// Position of the chunk in the global tensor, in elements per axis.
    pub offsets: Vec<u64>,
    /// Extent of the chunk per axis.
    pub sizes: Vec<u64>,
    /// The `torch.save` item holding it.
    pub storage: StorageRef,
}

/// A tensor entry: its global shape and the chunks that cover it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    /// The DCP key.
    pub fqn: String,
    /// Element type of every chunk.
    pub dtype: DType,
    /// Global shape.
    pub size: Vec<u64>,
    /// Saved chunks.
    pub chunks: Vec<Chunk>,
}

/// A bytes entry (an MCore `ShardedObject`, e.g. `_extra_state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BytesEntry {
    /// The DCP key.
    pub fqn: String,
    /// The item.
    pub storage: StorageRef,
}

/// The parts of a DCP `.metadata` a converter needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DcpMetadata {
    /// Tensor entries, in file order.
    pub tensors: Vec<TensorEntry>,
    /// Bytes entries, in file order.
    pub bytes: Vec<BytesEntry>,
}

/// Why a `.metadata` was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DcpError {
    /// The pickle was refused.
    #[error(transparent)]
    Pickle(#[from] PickleError),
    /// The object graph is not a DCP `Metadata`.
    #[error("{0}")]
    Structure(String),
    /// An entry is inconsistent.
    #[error("tensor {fqn:?}: {why}")]
    Entry {
        /// The key.
        fqn: String,
        /// What is wrong.
        why: String,
    },
}

fn structure(why: impl Into<String>) -> DcpError {
    DcpError::Structure(why.into())
}

/// The `BUILD` state dict of a dataclass instance, or `None`.
fn state_of(p: &Pickle, id: Id) -> Option<(&Global, Id)> {
    let (g, _, state) = p.as_object(id)?;
    Some((g, state?))
}

fn class_is(g: &Global, name: &str) -> bool {
    g.name == name
}

impl DcpMetadata {
    /// Parses the bytes of a `.metadata` file.
    ///
    /// # Errors
    /// [`DcpError`] when the pickle is refused or does not describe a consistent
    /// checkpoint (chunks outside the tensor, overlapping or not covering it, items
    /// missing from `storage_data`, stream transforms we cannot undo).
    pub fn parse(bytes: &[u8]) -> Result<DcpMetadata, DcpError> {
        let p = Pickle::parse(bytes, &metadata_allow_list())?;
        let (g, state) = state_of(&p, p.root())
            .ok_or_else(|| structure("the pickle's root is not a DCP Metadata object"))?;
        if !g.name.ends_with("Metadata") {
            return Err(structure(format!(
                "the pickle's root is a {g}, not a DCP Metadata"
            )));
        }
        let sdm = p
            .dict_get(state, "state_dict_metadata")
            .ok_or_else(|| structure("Metadata has no state_dict_metadata"))?;
        let storage_data = p
            .dict_get(state, "storage_data")
            .ok_or_else(|| structure("Metadata has no storage_data"))?;
        let storage = parse_storage_data(&p, storage_data)?;

        let mut out = DcpMetadata::default();
        for &(k, v) in p
            .as_dict(sdm)
            .ok_or_else(|| structure("state_dict_metadata is not a dict"))?
        {
            let fqn = p
                .as_str(k)
                .ok_or_else(|| structure("a state_dict_metadata key is not a string"))?
                .to_owned();
            let (class, _, st) = p
                .as_object(v)
                .ok_or_else(|| structure(format!("{fqn:?}: entry is not an object")))?;
            if class_is(class, "BytesStorageMetadata") {
                let storage =
                    storage
                        .get(&(fqn.clone(), None))
                        .cloned()
                        .ok_or_else(|| DcpError::Entry {
                            fqn: fqn.clone(),
                            why: "bytes entry has no storage_data item".into(),
                        })?;
                out.bytes.push(BytesEntry { fqn, storage });
                continue;
            }
            if !class_is(class, "TensorStorageMetadata") {
                return Err(DcpError::Entry {
                    fqn,
                    why: format!("unexpected entry class {class}"),
                });
            }
            let st = st.ok_or_else(|| DcpError::Entry {
                fqn: fqn.clone(),
                why: "TensorStorageMetadata without state".into(),
            })?;
            out.tensors.push(parse_tensor(&p, &fqn, st, &storage)?);
        }
        Ok(out)
    }

    /// Looks up a tensor entry by key.
    pub fn tensor(&self, fqn: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.fqn == fqn)
    }

    /// Serializes with the safest-emission recipe.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut sdm = Vec::new();
        let mut planner = Vec::new();
        let mut storage = Vec::new();
        for t in &self.tensors {
            let properties = Py::NewObj(
                Box::new(Py::global(MD, "TensorProperties")),
                Some(Box::new(Py::Tuple(vec![
                    Py::global("torch", t.dtype.torch_name()),
                    Py::reduce(
                        Py::global("torch.serialization", "_get_layout"),
                        vec![Py::str("torch.strided")],
                    ),
                    Py::Bool(false),
                    Py::reduce(Py::global(MD, "_MEM_FORMAT_ENCODING"), vec![Py::Int(0)]),
                    Py::Bool(false),
                ]))),
            );
            let chunks = t
                .chunks
                .iter()
                .map(|c| {
                    Py::dataclass(
                        MD,
                        "ChunkStorageMetadata",
                        Py::str_dict([
                            ("offsets", Py::torch_size(&c.offsets)),
                            ("sizes", Py::torch_size(&c.sizes)),
                        ]),
                    )
                })
                .collect();
            sdm.push((
                Py::str(&t.fqn),
                Py::dataclass(
                    MD,
                    "TensorStorageMetadata",
                    Py::str_dict([
                        ("properties", properties),
                        ("size", Py::torch_size(&t.size)),
                        ("chunks", Py::List(chunks)),
                    ]),
                ),
            ));
            planner.push((Py::str(&t.fqn), Py::Tuple(vec![Py::str(&t.fqn)])));
            for (i, c) in t.chunks.iter().enumerate() {
                storage.push((
                    Py::dataclass(
                        MD,
                        "MetadataIndex",
                        Py::str_dict([
                            ("fqn", Py::str(&t.fqn)),
                            ("offset", Py::torch_size(&c.offsets)),
                            ("index", Py::Int(i as i64)),
                        ]),
                    ),
                    storage_info(&c.storage),
                ));
            }
        }
        for b in &self.bytes {
            sdm.push((
                Py::str(&b.fqn),
                Py::NewObj(
                    Box::new(Py::global(MD, "BytesStorageMetadata")),
                    Some(Box::new(Py::Dict(vec![]))),
                ),
            ));
            planner.push((Py::str(&b.fqn), Py::Tuple(vec![Py::str(&b.fqn)])));
            storage.push((
                Py::dataclass(
                    MD,
                    "MetadataIndex",
                    Py::str_dict([("fqn", Py::str(&b.fqn)), ("index", Py::None)]),
                ),
                storage_info(&b.storage),
            ));
        }
        let root = Py::dataclass(
            MD,
            "Metadata",
            Py::str_dict([
                ("state_dict_metadata", Py::Dict(sdm)),
                ("planner_data", Py::Dict(planner)),
                ("storage_data", Py::Dict(storage)),
            ]),
        );
        write_pickle(&root)
    }
}

fn storage_info(s: &StorageRef) -> Py {
    Py::dataclass(
        FS,
        "_StorageInfo",
        Py::str_dict([
            ("relative_path", Py::str(&s.relative_path)),
            ("offset", Py::Int(s.offset as i64)),
            ("length", Py::Int(s.length as i64)),
        ]),
    )
}

type StorageMap = HashMap<(String, Option<Vec<u64>>), StorageRef>;

fn parse_storage_data(p: &Pickle, dict: Id) -> Result<StorageMap, DcpError> {
    let mut map = HashMap::new();
    for &(k, v) in p
        .as_dict(dict)
        .ok_or_else(|| structure("storage_data is not a dict"))?
    {
        let (_, kst) =
            state_of(p, k).ok_or_else(|| structure("a storage_data key is not a MetadataIndex"))?;
        let fqn = p
            .dict_get(kst, "fqn")
            .and_then(|f| p.as_str(f))
            .ok_or_else(|| structure("MetadataIndex without fqn"))?
            .to_owned();
        let offset = match p.dict_get(kst, "offset") {
            None => None,
            Some(o) if matches!(p.node(o), Node::None) => None,
            Some(o) => Some(p.as_dims(o).ok_or_else(|| DcpError::Entry {
                fqn: fqn.clone(),
                why: "MetadataIndex offset is not a torch.Size".into(),
            })?),
        };
        let (_, vst) = state_of(p, v).ok_or_else(|| DcpError::Entry {
            fqn: fqn.clone(),
            why: "storage_data value is not a _StorageInfo".into(),
        })?;
        let field = |name: &str| p.dict_get(vst, name);
        let relative_path = field("relative_path")
            .and_then(|f| p.as_str(f))
            .ok_or_else(|| DcpError::Entry {
                fqn: fqn.clone(),
                why: "_StorageInfo without relative_path".into(),
            })?
            .to_owned();
        let int = |name: &str| -> Result<u64, DcpError> {
            field(name)
                .and_then(|f| p.as_int(f))
                .and_then(|v| u64::try_from(v).ok())
                .ok_or_else(|| DcpError::Entry {
                    fqn: fqn.clone(),
                    why: format!("_StorageInfo {name} is not a non-negative integer"),
                })
        };
        let (offset_b, length) = (int("offset")?, int("length")?);
        if let Some(td) = field("transform_descriptors")
            && p.as_seq(td).is_some_and(|s| !s.is_empty())
        {
            return Err(DcpError::Entry {
                fqn,
                why: "item is stored through stream transforms (transform_descriptors), which are not supported".into(),
            });
        }
        if relative_path.contains("..") || relative_path.starts_with('/') {
            return Err(DcpError::Entry {
                fqn,
                why: format!("relative_path {relative_path:?} leaves the checkpoint directory"),
            });
        }
        map.insert(
            (fqn, offset),
            StorageRef {
                relative_path,
                offset: offset_b,
                length,
            },
        );
    }
    Ok(map)
}

fn parse_tensor(
    p: &Pickle,
    fqn: &str,
    st: Id,
    storage: &StorageMap,
) -> Result<TensorEntry, DcpError> {
    let err = |why: String| DcpError::Entry {
        fqn: fqn.to_owned(),
        why,
    };
    let props = p
        .dict_get(st, "properties")
        .ok_or_else(|| err("no properties".into()))?;
    let (_, pstate) =
        state_of(p, props).ok_or_else(|| err("properties is not a TensorProperties".into()))?;
    // 5-tuple (torch <= 2.14) or 6-tuple with strides (2.15+); a dict in some builds.
    let dtype_id = match p.node(pstate) {
        Node::Tuple(items) if !items.is_empty() => items[0],
        Node::Dict(_) => p
            .dict_get(pstate, "dtype")
            .ok_or_else(|| err("TensorProperties without dtype".into()))?,
        _ => {
            return Err(err(
                "TensorProperties state is neither a tuple nor a dict".into()
            ));
        }
    };
    let dtype = match p.node(dtype_id) {
        Node::Global(g) if g.module == "torch" => DType::from_torch_name(&g.name)
            .ok_or_else(|| err(format!("unsupported dtype torch.{}", g.name)))?,
        _ => return Err(err("dtype is not a torch dtype".into())),
    };
    let size = p
        .dict_get(st, "size")
        .and_then(|s| p.as_dims(s))
        .ok_or_else(|| err("size is not a torch.Size".into()))?;
    let chunk_ids = p
        .dict_get(st, "chunks")
        .and_then(|c| p.as_seq(c))
        .ok_or_else(|| err("chunks is not a list".into()))?;
    let mut chunks = Vec::with_capacity(chunk_ids.len());
    for &c in chunk_ids {
        let (_, cst) =
            state_of(p, c).ok_or_else(|| err("a chunk is not a ChunkStorageMetadata".into()))?;
        let offsets = p
            .dict_get(cst, "offsets")
            .and_then(|o| p.as_dims(o))
            .ok_or_else(|| err("chunk offsets is not a torch.Size".into()))?;
        let sizes = p
            .dict_get(cst, "sizes")
            .and_then(|o| p.as_dims(o))
            .ok_or_else(|| err("chunk sizes is not a torch.Size".into()))?;
        let item = storage
            .get(&(fqn.to_owned(), Some(offsets.clone())))
            .cloned()
            .ok_or_else(|| {
                err(format!(
                    "chunk at offsets {offsets:?} has no storage_data item"
                ))
            })?;
        chunks.push(Chunk {
            offsets,
            sizes,
            storage: item,
        });
    }
    let entry = TensorEntry {
        fqn: fqn.to_owned(),
        dtype,
        size,
        chunks,
    };
    check_coverage(&entry).map_err(err)?;
    Ok(entry)
}

/// The elements of `shape`, when every partial product (as readers compute them,
/// left to right) and the byte count fit in 64 bits.
fn checked_numel(shape: &[u64], dtype: DType) -> Option<u64> {
    let n = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d))?;
    n.checked_mul(dtype.size() as u64).map(|_| n)
}

/// Checks that the chunks lie inside the tensor, do not overlap and cover it.
pub fn check_coverage(t: &TensorEntry) -> Result<(), String> {
    let total = checked_numel(&t.size, t.dtype)
        .ok_or_else(|| format!("shape {:?} has more elements than 64 bits count", t.size))?;
    let total = u128::from(total);
    let mut sum: u128 = 0;
    for c in &t.chunks {
        if c.offsets.len() != t.size.len() || c.sizes.len() != t.size.len() {
            return Err(format!(
                "chunk at {:?} has rank {} but the tensor has rank {}",
                c.offsets,
                c.offsets.len(),
                t.size.len()
            ));
        }
        for ((&o, &s), &d) in c.offsets.iter().zip(&c.sizes).zip(&t.size) {
            if o.checked_add(s).is_none_or(|end| end > d) {
                return Err(format!(
                    "chunk at {:?} of size {:?} lies outside the global shape {:?}",
                    c.offsets, c.sizes, t.size
                ));
            }
        }
        // Inside the tensor, so within its (checked) element count.
        sum += c.sizes.iter().map(|&d| u128::from(d)).product::<u128>();
    }
    // DCP finds a chunk's item by its offsets: two chunks at the same offsets
    // (an empty one beside a full one) would share one item.
    let mut starts: Vec<&Vec<u64>> = t.chunks.iter().map(|c| &c.offsets).collect();
    starts.sort();
    if let Some(w) = starts.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!(
            "two chunks at offsets {:?}: expected one chunk (and one storage item) per offset",
            w[0]
        ));
    }
    // Sweep along axis 0 so only chunks sharing rows are compared.
    if !t.size.is_empty() {
        let mut order: Vec<&Chunk> = t.chunks.iter().collect();
        order.sort_by_key(|c| c.offsets[0]);
        let mut active: Vec<&Chunk> = Vec::new();
        for c in order {
            active.retain(|a| a.offsets[0] + a.sizes[0] > c.offsets[0]);
            for a in &active {
                let overlaps = a
                    .offsets
                    .iter()
                    .zip(&a.sizes)
                    .zip(c.offsets.iter().zip(&c.sizes))
                    .all(|((&ao, &asz), (&co, &csz))| ao < co + csz && co < ao + asz);
                if overlaps && a.sizes.iter().chain(&c.sizes).all(|&s| s > 0) {
                    return Err(format!(
                        "chunks at {:?} and {:?} overlap",
                        a.offsets, c.offsets
                    ));
                }
            }
            active.push(c);
        }
    } else if t.chunks.len() > 1 {
        return Err("a 0-d tensor has more than one chunk".into());
    }
    if sum != total {
        return Err(format!(
            "chunks cover {sum} of the {total} elements of shape {:?}",
            t.size
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_tensor() -> DcpMetadata {
        DcpMetadata {
            tensors: vec![TensorEntry {
                fqn: "w".into(),
                dtype: DType::BF16,
                size: vec![2, 3],
                chunks: vec![Chunk {
                    offsets: vec![0, 0],
                    sizes: vec![2, 3],
                    storage: StorageRef {
                        relative_path: "__0_0.distcp".into(),
                        offset: 0,
                        length: 605,
                    },
                }],
            }],
            bytes: vec![],
        }
    }

    /// Element counts past 64 bits (the shape's product in any order readers
    /// compute it) are refused, not overflowed: [2^62, 2^62, 2^62] overflowed the
    /// 128-bit product, and [2^63, 2^63, 0] the 64-bit one downstream.
    #[test]
    fn shapes_beyond_64_bits_are_refused() {
        for size in [
            vec![1u64 << 62; 3],
            vec![1 << 63, 1 << 63, 0],
            vec![1 << 62, 8],
        ] {
            let mut md = one_tensor();
            md.tensors[0].size = size.clone();
            md.tensors[0].chunks[0].sizes = size.clone();
            md.tensors[0].chunks[0].offsets = vec![0; size.len()];
            let err = check_coverage(&md.tensors[0]).unwrap_err();
            assert!(err.contains("more elements than 64 bits count"), "{err}");
            assert!(DcpMetadata::parse(&md.to_bytes()).is_err());
        }
    }

    /// Found by the `dcp_structure` fuzz target: an empty chunk at the offsets of
    /// a full one passed the coverage check, and the reader then gave both the
    /// empty chunk's storage item.
    #[test]
    fn chunks_at_the_same_offsets_are_refused() {
        let mut md = one_tensor();
        let mut empty = md.tensors[0].chunks[0].clone();
        empty.sizes = vec![0, 3];
        empty.storage.offset = 9999;
        md.tensors[0].chunks.push(empty);
        let err = DcpMetadata::parse(&md.to_bytes()).unwrap_err().to_string();
        assert!(err.contains("two chunks at offsets [0, 0]"), "{err}");
    }

    #[test]
    fn matches_the_verified_golden_vector() {
        // docs/megatron-torch-dist.md#writing-the-metadata: 837 bytes, sha256 8b236c66…a4042c
        // (the spec gives the hash's ends; they pin every byte, the head shows where one differs).
        use sha2::Digest;
        let bytes = one_tensor().to_bytes();
        let head: [u8; 59] = [
            0x80, 0x02, 0x63, 0x74, 0x6f, 0x72, 0x63, 0x68, 0x2e, 0x64, 0x69, 0x73, 0x74, 0x72,
            0x69, 0x62, 0x75, 0x74, 0x65, 0x64, 0x2e, 0x63, 0x68, 0x65, 0x63, 0x6b, 0x70, 0x6f,
            0x69, 0x6e, 0x74, 0x2e, 0x6d, 0x65, 0x74, 0x61, 0x64, 0x61, 0x74, 0x61, 0x0a, 0x4d,
            0x65, 0x74, 0x61, 0x64, 0x61, 0x74, 0x61, 0x0a, 0x29, 0x81, 0x7d, 0x28, 0x58, 0x13,
            0x00, 0x00, 0x00,
        ];
        assert_eq!(&bytes[..head.len()], &head);
        assert_eq!(bytes.len(), 837);
        let hex: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(
            hex.starts_with("8b236c66") && hex.ends_with("a4042c"),
            "sha256 {hex}"
        );
    }

    #[test]
    fn round_trip() {
        let mut md = one_tensor();
        md.bytes.push(BytesEntry {
            fqn: "x._extra_state/shard_0_1".into(),
            storage: StorageRef {
                relative_path: "__0_0.distcp".into(),
                offset: 605,
                length: 10,
            },
        });
        md.tensors[0].chunks[0].storage.offset = 5 << 30; // needs LONG1
        assert_eq!(DcpMetadata::parse(&md.to_bytes()).unwrap(), md);
    }

    #[test]
    fn overlapping_and_partial_chunks_are_refused() {
        let mut md = one_tensor();
        let c = md.tensors[0].chunks[0].clone();
        md.tensors[0].chunks[0].sizes = vec![1, 3];
        assert!(
            check_coverage(&md.tensors[0])
                .unwrap_err()
                .contains("cover 3 of the 6")
        );
        md.tensors[0].chunks.push(Chunk {
            offsets: vec![0, 0],
            ..c.clone()
        });
        assert!(check_coverage(&md.tensors[0]).is_err());
        md.tensors[0].chunks = vec![Chunk {
            offsets: vec![1, 0],
            ..c
        }];
        assert!(
            check_coverage(&md.tensors[0])
                .unwrap_err()
                .contains("outside")
        );
    }

    #[test]
    fn non_allow_listed_globals_are_named() {
        let evil = write_pickle(&Py::reduce(
            Py::global("os", "system"),
            vec![Py::str("true")],
        ));
        let err = DcpMetadata::parse(&evil).unwrap_err();
        assert!(err.to_string().contains("os.system"), "{err}");
    }
}
