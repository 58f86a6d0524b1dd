//! One read of an output for validation: every mapped data file's digest (for the
//! manifest check), every tensor chunk's digest (for the weights digest the
//! manifest records) and its count of NaN and infinite values, as parallel tasks
//! over the mapped files, largest first, each window released after use.
//!
//! Why the weights digest is recomputed: execution records it from the bytes it
//! wrote, and checks that ran on those bytes as they were written (the merge
//! probe) hold for the published output only if the tensors read back are those
//! bytes. Recomputed here from the files through their reader, the digest ties
//! the one to the other (and names a layout mistake that moved bytes between
//! tensors without changing a file's length).
//!
//! What the run that wrote an output already read back once it was written
//! ([`Known`]: execution reads each file back once, for its digest and its
//! pieces'; the parts of a split run each their own files) is taken from there
//! instead of being read again; the tensors' names, shapes and places still come
//! from this reader, so a chunk it finds where execution did not read is read
//! here.

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;
use xxhash_rust::xxh3::Xxh3;

use crate::formats::digest::{format_digest, of_lines};
use crate::formats::dtype::{DType, count_non_finite};
use crate::formats::source::{self, ChunkData, Files, GlobalTensor};

/// Bytes read between releases.
const WINDOW: u64 = 4 << 20;

/// What one read of an output found.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Size and XXH3-128 of every mapped file, by path relative to the output.
    pub files: HashMap<String, (u64, String)>,
    /// Tensors with NaN or infinite values, one line each.
    pub non_finite: Vec<String>,
    /// The weights digest of the tensors as read: XXH3-128 over the sorted lines
    /// of every chunk ([`crate::lora::base::digest_line`], the lines execution
    /// digests).
    pub weights_digest: String,
    /// Files and chunks taken from [`Known`] rather than read here.
    pub known: (usize, usize),
    /// Chunks in all.
    pub chunks: usize,
}

/// Where a tensor's bytes lie: the file (relative to the output), offset,
/// length and element type.
pub type Range = (String, u64, u64, DType);

/// What was read back elsewhere: each file's size and XXH3-128, and each
/// range's XXH3-128 and count of NaN and infinite values.
#[derive(Debug, Clone, Default)]
pub struct Known {
    /// By path relative to the output.
    pub files: HashMap<String, (u64, String)>,
    /// By [`Range`].
    pub ranges: HashMap<Range, (u128, u64)>,
}

enum Task {
    File(usize),
    Chunk(usize, usize),
}

enum Found {
    File(String, u64, String),
    Chunk {
        tensor: usize,
        line: String,
        bad: u64,
        known: bool,
    },
}

/// Reads every file of `files` and every chunk of `tensors` once (files under
/// `dir`), except what `known` has; in parallel on the current pool.
pub fn scan(dir: &Path, files: &Files, tensors: &[GlobalTensor], known: &Known) -> Scan {
    let rel = |f: &source::MappedFile| {
        f.path
            .strip_prefix(dir)
            .unwrap_or(&f.path)
            .to_string_lossy()
            .into_owned()
    };
    let mut found: Vec<Found> = Vec::new();
    let mut tasks: Vec<(u64, Task)> = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let path = rel(f);
        match known.files.get(&path) {
            Some((size, digest)) => found.push(Found::File(path, *size, digest.clone())),
            None => tasks.push((f.len(), Task::File(i))),
        }
    }
    for (ti, t) in tensors.iter().enumerate() {
        for (ci, c) in t.chunks.iter().enumerate() {
            tasks.push((c.footprint().len, Task::Chunk(ti, ci)));
        }
    }
    tasks.sort_by_key(|t| std::cmp::Reverse(t.0));
    let chunks = tasks
        .iter()
        .filter(|(_, t)| matches!(t, Task::Chunk(..)))
        .count();
    found.par_extend(tasks.par_iter().map(|(_, task)| match *task {
        Task::File(i) => {
            let f = files.get(i);
            let mut h = Xxh3::new();
            windows(f, 0, f.len(), |w| h.update(w));
            Found::File(rel(f), f.len(), format_digest(h.digest128()))
        }
        Task::Chunk(ti, ci) => {
            let t = &tensors[ti];
            let c = &t.chunks[ci];
            let (digest, bad, known) = match &c.data {
                ChunkData::Contiguous(r) => {
                    let file = files.get(r.file);
                    match known.ranges.get(&(rel(file), r.offset, r.len, t.dtype)) {
                        Some(&(digest, bad)) => (digest, bad, true),
                        None => {
                            let (digest, bad) = read_range(file, r.offset, r.len, t.dtype);
                            (digest, bad, false)
                        }
                    }
                }
                ChunkData::Strided { .. } => {
                    let bytes = source::read_box(files, t, &c.offsets, &c.sizes);
                    let bad = count_non_finite(t.dtype, &bytes);
                    (xxhash_rust::xxh3::xxh3_128(&bytes), bad, false)
                }
            };
            let line = crate::lora::base::digest_line(t, ci, digest);
            Found::Chunk {
                tensor: ti,
                line,
                bad,
                known,
            }
        }
    }));
    let mut out = Scan {
        known: (files.iter().count() - (tasks.len() - chunks), 0),
        chunks,
        ..Scan::default()
    };
    let mut lines = Vec::new();
    let mut bad = vec![0u64; tensors.len()];
    for f in found {
        match f {
            Found::File(path, size, digest) => {
                out.files.insert(path, (size, digest));
            }
            Found::Chunk {
                tensor,
                line,
                bad: n,
                known,
            } => {
                lines.push(line);
                bad[tensor] += n;
                out.known.1 += usize::from(known);
            }
        }
    }
    out.weights_digest = of_lines(lines);
    out.non_finite = tensors
        .iter()
        .zip(&bad)
        .filter(|(_, n)| **n > 0)
        .map(|(t, n)| format!("{}: {n} NaN or infinite values", t.name))
        .collect();
    out
}

/// The XXH3-128 of `len` bytes of `file` from `offset`, and their count of NaN
/// and infinite values as elements of `dtype`.
pub fn read_range(file: &source::MappedFile, offset: u64, len: u64, dtype: DType) -> (u128, u64) {
    let mut h = Xxh3::new();
    let mut bad = 0u64;
    windows(file, offset, len, |w| {
        h.update(w);
        bad += count_non_finite(dtype, w);
    });
    (h.digest128(), bad)
}

/// Calls `f` on `len` bytes of `file` from `offset`, in windows whose offsets from
/// `offset` are multiples of [`WINDOW`] (so elements never straddle two), each
/// read ahead and released after.
fn windows(file: &source::MappedFile, offset: u64, len: u64, mut f: impl FnMut(&[u8])) {
    let bytes = file.bytes();
    let end = (offset + len).min(bytes.len() as u64);
    let mut at = offset.min(end);
    while at < end {
        let n = WINDOW.min(end - at);
        file.will_need(at, n);
        f(&bytes[at as usize..(at + n) as usize]);
        file.release(at, n);
        at += n;
    }
}
