//! Output layouts computed before any data moves: safetensors shards with their
//! headers and offsets, and `.distcp` files with every item's offset, so the
//! executor only fills holes with positioned writes.

use std::collections::{BTreeMap, HashMap};

use crate::formats::dcp::{BytesEntry, Chunk, DcpMetadata, StorageRef, TensorEntry};
use crate::formats::dtype::DType;
use crate::formats::hf::{INDEX_FILE, assign_shards, index_json, nbytes, shard_name};
use crate::formats::{FormatError, safetensors, torch_save, torch_zip};
use crate::plan::{Dest, Generated, OutFile};

/// An output tensor of an HF checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfTensorSpec {
    /// Name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
}

/// How tensors are spread over shard files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sharding {
    /// Greedy in tensor order with this maximum shard size in bytes, as
    /// `save_pretrained` does.
    MaxSize(u64),
    /// The shard file each tensor goes to, by name (to reproduce a source's layout);
    /// tensors not named fall back to the shard of the previous tensor.
    Assigned {
        /// Tensor name → shard file name.
        shard_of: HashMap<String, String>,
        /// Write an index even for a single file (the source had one).
        index: bool,
    },
}

/// The files of an HF checkpoint.
#[derive(Debug, Clone)]
pub struct HfLayout {
    /// Shard files (headers fixed, data to be written).
    pub files: Vec<OutFile>,
    /// Where each tensor goes, in the order given.
    pub dests: Vec<Dest>,
    /// The index, when one is written.
    pub index: Option<Generated>,
}

/// Lays out shards for `tensors` (in state-dict order). Output file indices start
/// at `file_base`.
///
/// # Errors
/// [`FormatError`] if a header cannot be laid out.
pub fn hf(
    tensors: &[HfTensorSpec],
    sharding: &Sharding,
    file_base: usize,
) -> Result<HfLayout, FormatError> {
    let (groups, names, with_index): (Vec<Vec<usize>>, Vec<String>, bool) = match sharding {
        Sharding::MaxSize(max) => {
            let sizes: Vec<u64> = tensors.iter().map(|t| nbytes(t.dtype, &t.shape)).collect();
            let groups = assign_shards(&sizes, *max);
            let n = groups.len().max(1);
            let names = (0..n).map(|i| shard_name(i, n)).collect();
            (groups, names, n > 1)
        }
        Sharding::Assigned { shard_of, index } => {
            let mut names: Vec<String> = Vec::new();
            let mut groups: Vec<Vec<usize>> = Vec::new();
            let mut last: Option<String> = None;
            for (i, t) in tensors.iter().enumerate() {
                let shard = shard_of
                    .get(&t.name)
                    .cloned()
                    .or_else(|| last.clone())
                    .unwrap_or_else(|| crate::formats::hf::SINGLE_FILE.to_owned());
                match names.iter().position(|n| *n == shard) {
                    Some(g) => groups[g].push(i),
                    None => {
                        names.push(shard.clone());
                        groups.push(vec![i]);
                    }
                }
                last = Some(shard);
            }
            let mut order: Vec<usize> = (0..names.len()).collect();
            order.sort_by(|&a, &b| crate::formats::natural_cmp(&names[a], &names[b]));
            let names2 = order.iter().map(|&i| names[i].clone()).collect();
            let groups2 = order.iter().map(|&i| groups[i].clone()).collect();
            (groups2, names2, *index || names.len() > 1)
        }
    };
    let mut files = Vec::new();
    let mut dests = vec![Dest::Raw { file: 0, offset: 0 }; tensors.len()];
    let mut weight_map = BTreeMap::new();
    for (g, group) in groups.iter().enumerate() {
        let specs: Vec<(String, DType, Vec<u64>)> = group
            .iter()
            .map(|&i| {
                (
                    tensors[i].name.clone(),
                    tensors[i].dtype,
                    tensors[i].shape.clone(),
                )
            })
            .collect();
        let l = safetensors::layout(&specs, &safetensors::pt_metadata())?;
        for &i in group {
            dests[i] = Dest::Raw {
                file: file_base + files.len(),
                offset: l.offsets[&tensors[i].name],
            };
            weight_map.insert(tensors[i].name.clone(), names[g].clone());
        }
        files.push(OutFile {
            rel: names[g].clone(),
            len: l.file_len,
            fixed: vec![(0, l.header)],
        });
    }
    let index = with_index.then(|| {
        let total_size = tensors.iter().map(|t| nbytes(t.dtype, &t.shape)).sum();
        let total_params = tensors
            .iter()
            .map(|t| t.shape.iter().product::<u64>())
            .sum();
        Generated {
            rel: INDEX_FILE.to_owned(),
            bytes: index_json(&weight_map, total_size, total_params).into_bytes(),
        }
    });
    Ok(HfLayout {
        files,
        dests,
        index,
    })
}

/// One chunk of a Megatron tensor to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcpChunkSpec {
    /// The DCP key.
    pub fqn: String,
    /// Element type.
    pub dtype: DType,
    /// Global shape of the key.
    pub global_shape: Vec<u64>,
    /// Chunk start.
    pub offsets: Vec<u64>,
    /// Chunk extent.
    pub sizes: Vec<u64>,
}

/// A bytes entry to write (`_extra_state`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DcpBytesSpec {
    /// The DCP key.
    pub fqn: String,
    /// The `torch.save` payload.
    pub payload: Vec<u8>,
}

/// The `.distcp` files and `.metadata` of a Megatron checkpoint.
#[derive(Debug, Clone)]
pub struct DcpLayout {
    /// Data files.
    pub files: Vec<OutFile>,
    /// Where each chunk goes, in the order given.
    pub dests: Vec<Dest>,
    /// The `.metadata` bytes.
    pub metadata: Vec<u8>,
}

/// Length of the archive holding one chunk.
pub fn tensor_item_len(dtype: DType, sizes: &[u64]) -> u64 {
    let payload = nbytes(dtype, sizes);
    torch_zip::layout_archive(
        &torch_save::tensor_archive_records(dtype, sizes, payload),
        0,
    )
    .len()
}

/// Lays out `chunks` and `bytes` over `nfiles` files named `__0_{i}.distcp`,
/// balancing bytes. Output file indices start at `file_base`.
pub fn dcp(
    chunks: &[DcpChunkSpec],
    bytes: &[DcpBytesSpec],
    nfiles: usize,
    file_base: usize,
) -> DcpLayout {
    let nfiles = nfiles.max(1);
    let mut files: Vec<OutFile> = (0..nfiles)
        .map(|i| OutFile {
            rel: format!("__0_{i}.distcp"),
            len: 0,
            fixed: Vec::new(),
        })
        .collect();
    let lightest = |files: &[OutFile]| {
        (0..files.len())
            .min_by_key(|&i| (files[i].len, i))
            .expect("nfiles >= 1")
    };
    let mut md = DcpMetadata::default();
    // Bytes items first, as torch and MCore write them.
    for b in bytes {
        let f = lightest(&files);
        let offset = files[f].len;
        files[f].fixed.push((offset, b.payload.clone()));
        files[f].len += b.payload.len() as u64;
        md.bytes.push(BytesEntry {
            fqn: b.fqn.clone(),
            storage: StorageRef {
                relative_path: files[f].rel.clone(),
                offset,
                length: b.payload.len() as u64,
            },
        });
    }
    let mut dests = Vec::with_capacity(chunks.len());
    let mut entry_of: HashMap<String, usize> = HashMap::new();
    for c in chunks {
        let f = lightest(&files);
        let offset = files[f].len;
        let len = tensor_item_len(c.dtype, &c.sizes);
        files[f].len += len;
        dests.push(Dest::DcpItem {
            file: file_base + f,
            offset,
        });
        let e = *entry_of.entry(c.fqn.clone()).or_insert_with(|| {
            md.tensors.push(TensorEntry {
                fqn: c.fqn.clone(),
                dtype: c.dtype,
                size: c.global_shape.clone(),
                chunks: Vec::new(),
            });
            md.tensors.len() - 1
        });
        md.tensors[e].chunks.push(Chunk {
            offsets: c.offsets.clone(),
            sizes: c.sizes.clone(),
            storage: StorageRef {
                relative_path: files[f].rel.clone(),
                offset,
                length: len,
            },
        });
    }
    DcpLayout {
        files,
        dests,
        metadata: md.to_bytes(),
    }
}
