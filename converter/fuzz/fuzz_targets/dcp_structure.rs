#![no_main]
//! Structure-aware DCP metadata: entries of any shape, chunking and storage
//! written by our `.metadata` writer, then read back. Whatever the reader
//! accepts must equal what was written; whatever is consistent (chunks inside
//! the tensor, covering it once, one entry per key, paths inside the directory)
//! must be accepted. Feeds `ckpt_convert::fuzz::dcp_metadata`.

use arbitrary::Arbitrary;
use ckpt_convert::formats::dcp::{self, BytesEntry, Chunk, DcpMetadata, StorageRef, TensorEntry};
use ckpt_convert::formats::dtype::DType;

#[derive(Arbitrary, Debug)]
struct Storage {
    file: u8,
    path: Option<String>,
    offset: u32,
    length: u32,
}

#[derive(Arbitrary, Debug)]
struct ChunkIn {
    offsets: Vec<u8>,
    sizes: Vec<u8>,
    storage: Storage,
}

#[derive(Arbitrary, Debug)]
struct TensorIn {
    fqn: String,
    dtype: u8,
    size: Vec<u8>,
    /// Split along axis 0 into this many chunks, unless `chunks` is given.
    split: u8,
    chunks: Option<Vec<ChunkIn>>,
    storage: Storage,
}

#[derive(Arbitrary, Debug)]
struct MetadataIn {
    tensors: Vec<TensorIn>,
    bytes: Vec<(String, Storage)>,
}

fn storage(s: &Storage) -> StorageRef {
    StorageRef {
        relative_path: s
            .path
            .clone()
            .unwrap_or_else(|| format!("__0_{}.distcp", s.file % 4)),
        offset: u64::from(s.offset),
        length: u64::from(s.length),
    }
}

fn build(m: &MetadataIn) -> DcpMetadata {
    let tensors = m
        .tensors
        .iter()
        .take(16)
        .map(|t| {
            let size: Vec<u64> = t.size.iter().take(4).map(|&d| u64::from(d % 16)).collect();
            let chunks = match &t.chunks {
                Some(cs) => cs
                    .iter()
                    .take(8)
                    .map(|c| Chunk {
                        offsets: c
                            .offsets
                            .iter()
                            .take(4)
                            .map(|&d| u64::from(d % 16))
                            .collect(),
                        sizes: c.sizes.iter().take(4).map(|&d| u64::from(d % 16)).collect(),
                        storage: storage(&c.storage),
                    })
                    .collect(),
                None => {
                    let rows = size.first().copied().unwrap_or(1);
                    let n = u64::from(t.split % 4).clamp(1, rows.max(1));
                    (0..n)
                        .map(|i| {
                            let (lo, hi) = (rows * i / n, rows * (i + 1) / n);
                            let mut offsets = vec![0; size.len()];
                            let mut sizes = size.clone();
                            if !size.is_empty() {
                                offsets[0] = lo;
                                sizes[0] = hi - lo;
                            }
                            Chunk {
                                offsets,
                                sizes,
                                storage: storage(&t.storage),
                            }
                        })
                        .collect()
                }
            };
            TensorEntry {
                fqn: t.fqn.clone(),
                dtype: DType::ALL[t.dtype as usize % DType::ALL.len()],
                size,
                chunks,
            }
        })
        .collect();
    let bytes = m
        .bytes
        .iter()
        .take(8)
        .map(|(fqn, s)| BytesEntry {
            fqn: fqn.clone(),
            storage: storage(s),
        })
        .collect();
    DcpMetadata { tensors, bytes }
}

fn consistent(md: &DcpMetadata) -> bool {
    let mut keys: Vec<&str> = md
        .tensors
        .iter()
        .map(|t| t.fqn.as_str())
        .chain(md.bytes.iter().map(|b| b.fqn.as_str()))
        .collect();
    let n = keys.len();
    keys.sort_unstable();
    keys.dedup();
    let paths_ok = md
        .tensors
        .iter()
        .flat_map(|t| t.chunks.iter().map(|c| &c.storage))
        .chain(md.bytes.iter().map(|b| &b.storage))
        .all(|s| !s.relative_path.contains("..") && !s.relative_path.starts_with('/'));
    keys.len() == n && paths_ok && md.tensors.iter().all(|t| dcp::check_coverage(t).is_ok())
}

libfuzzer_sys::fuzz_target!(|m: MetadataIn| {
    let md = build(&m);
    let bytes = md.to_bytes();
    ckpt_convert_fuzz::keep("dcp_metadata", &bytes);
    ckpt_convert::fuzz::dcp_metadata(&bytes);
    if consistent(&md) {
        let back = DcpMetadata::parse(&bytes);
        assert_eq!(
            back.as_ref().ok(),
            Some(&md),
            "consistent metadata not read back: {back:?}"
        );
    }
});
