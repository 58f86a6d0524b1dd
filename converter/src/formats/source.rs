//! Tensors as the readers find them: global tensors made of chunks that live in
//! memory-mapped files, read by region without copying when a region is one run.
//!
//! A Hugging Face tensor is one chunk covering the whole tensor; a Megatron tensor
//! has one chunk per saved shard (layer, TP rank, SwiGLU half, expert). Both look
//! the same to the planner, which asks for boxes of the global tensor.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapOptions, UncheckedAdvice};

use crate::formats::FormatError;
use crate::formats::dtype::DType;
use crate::formats::file::Identity;

/// Index of a file in a [`Files`] set.
pub type FileId = usize;

/// A read-only memory map of a source file.
#[derive(Debug)]
pub struct MappedFile {
    /// The file's path.
    pub path: PathBuf,
    map: Option<Mmap>,
    identity: Identity,
}

impl MappedFile {
    /// Maps `path` read-only: a regular file inside its directory
    /// ([`crate::formats::file::open`]).
    ///
    /// # Errors
    /// [`FormatError`] naming the file: it cannot be opened or mapped, is not a
    /// regular file, or resolves outside its directory.
    pub fn open(path: &Path) -> Result<MappedFile, FormatError> {
        let (file, meta) = crate::formats::file::open(path)?;
        let len = meta.len();
        // An empty file cannot be mapped; keep it as an empty slice.
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the map is read-only and sources are never written while we run
            // (they are inputs, opened read-only, and on Kubernetes mounted read-only).
            // A concurrent writer outside our control could change bytes under us:
            // the file's identity is checked again before anything is published
            // (`check_unchanged`), and a read past a truncation raises SIGBUS, which
            // the binary turns into a failed run.
            Some(unsafe { MmapOptions::new().map(&file) }.map_err(|e| FormatError::io(path, e))?)
        };
        Ok(MappedFile {
            path: path.to_owned(),
            map,
            identity: Identity::of(&meta),
        })
    }

    /// Checks that the file is still the one mapped, unchanged.
    ///
    /// # Errors
    /// [`FormatError::Changed`] saying what changed.
    pub fn check_unchanged(&self) -> Result<(), FormatError> {
        self.identity.check(&self.path)
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The file length.
    pub fn len(&self) -> u64 {
        self.bytes().len() as u64
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Asks the kernel to read a range ahead.
    pub fn will_need(&self, offset: u64, len: u64) {
        if let Some(map) = &self.map
            && let Some((start, n)) = page_range(offset, len, map.len())
        {
            let _ = map.advise_range(memmap2::Advice::WillNeed, start, n);
        }
    }

    /// Drops a range from our resident set after use, so peak memory follows the
    /// tensors in flight, not the model. The page cache keeps the data.
    pub fn release(&self, offset: u64, len: u64) {
        if let Some(map) = &self.map
            && let Some((start, n)) = page_range(offset, len, map.len())
        {
            // SAFETY: the map is a private read-only file mapping; DONTNEED only drops
            // our page-table entries, and a later read faults the same file bytes back.
            let _ = unsafe { map.unchecked_advise_range(UncheckedAdvice::DontNeed, start, n) };
        }
    }
}

fn page_range(offset: u64, len: u64, map_len: usize) -> Option<(usize, usize)> {
    const PAGE: u64 = 4096;
    let start = offset / PAGE * PAGE;
    let end = offset.checked_add(len)?.min(map_len as u64);
    if end <= start {
        return None;
    }
    Some((start as usize, (end - start) as usize))
}

/// A byte range in a mapped file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRef {
    /// The file.
    pub file: FileId,
    /// Start offset.
    pub offset: u64,
    /// Length.
    pub len: u64,
}

/// How a chunk's elements are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkData {
    /// One dense row-major run.
    Contiguous(ByteRef),
    /// A strided view into a storage (torch archives may save views).
    Strided {
        /// The storage record.
        storage: ByteRef,
        /// Offset into the storage, in elements.
        storage_offset: u64,
        /// Strides, in elements.
        strides: Vec<u64>,
    },
}

/// A saved piece of a global tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorChunk {
    /// Position in the global tensor.
    pub offsets: Vec<u64>,
    /// Extent.
    pub sizes: Vec<u64>,
    /// Where the elements are.
    pub data: ChunkData,
    /// The whole record holding the chunk and its CRC-32, when the format has one.
    pub checksum: Option<(ByteRef, u32)>,
}

impl TensorChunk {
    /// The byte ranges a read of this chunk touches.
    pub fn footprint(&self) -> ByteRef {
        match &self.data {
            ChunkData::Contiguous(r) => *r,
            ChunkData::Strided { storage, .. } => *storage,
        }
    }
}

/// A tensor as its source holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalTensor {
    /// Name (HF name or DCP key).
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Global shape.
    pub shape: Vec<u64>,
    /// Chunks, covering the shape exactly once.
    pub chunks: Vec<TensorChunk>,
}

impl GlobalTensor {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Size in bytes.
    pub fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }
}

/// The mapped files of one source.
#[derive(Debug, Default)]
pub struct Files {
    files: Vec<MappedFile>,
}

impl Files {
    /// Maps a file and returns its id.
    ///
    /// # Errors
    /// As [`MappedFile::open`].
    pub fn add(&mut self, path: &Path) -> Result<FileId, FormatError> {
        if let Some(i) = self.files.iter().position(|f| f.path == path) {
            return Ok(i);
        }
        self.files.push(MappedFile::open(path)?);
        Ok(self.files.len() - 1)
    }

    /// A mapped file.
    pub fn get(&self, id: FileId) -> &MappedFile {
        &self.files[id]
    }

    /// All mapped files.
    pub fn iter(&self) -> impl Iterator<Item = &MappedFile> {
        self.files.iter()
    }

    /// Checks that no mapped file changed since it was opened.
    ///
    /// # Errors
    /// [`FormatError::Changed`] naming the first that did.
    pub fn check_unchanged(&self) -> Result<(), FormatError> {
        self.files.iter().try_for_each(MappedFile::check_unchanged)
    }

    /// The bytes of a range (checked when the range was created).
    pub fn slice(&self, r: ByteRef) -> &[u8] {
        &self.files[r.file].bytes()[r.offset as usize..(r.offset + r.len) as usize]
    }
}

/// Reads the box `offsets`/`sizes` of `t` as row-major bytes: borrowed from the
/// map when the box is one run of one chunk, assembled otherwise.
pub fn read_box<'a>(
    files: &'a Files,
    t: &GlobalTensor,
    offsets: &[u64],
    sizes: &[u64],
) -> Cow<'a, [u8]> {
    let es = t.dtype.size() as u64;
    for c in &t.chunks {
        if let ChunkData::Contiguous(r) = &c.data
            && contains(&c.offsets, &c.sizes, offsets, sizes)
        {
            let rel: Vec<u64> = offsets
                .iter()
                .zip(&c.offsets)
                .map(|(o, co)| o - co)
                .collect();
            if let Some((start, n)) = contiguous_run(&c.sizes, &rel, sizes) {
                let bytes = files.slice(*r);
                return Cow::Borrowed(&bytes[(start * es) as usize..((start + n) * es) as usize]);
            }
        }
    }
    let numel: u64 = sizes.iter().product();
    let mut out = vec![0u8; (numel * es) as usize];
    for c in &t.chunks {
        let Some((lo, hi)) = intersect(&c.offsets, &c.sizes, offsets, sizes) else {
            continue;
        };
        let extent: Vec<u64> = lo.iter().zip(&hi).map(|(l, h)| h - l).collect();
        let src_at: Vec<u64> = lo.iter().zip(&c.offsets).map(|(l, o)| l - o).collect();
        let dst_at: Vec<u64> = lo.iter().zip(offsets).map(|(l, o)| l - o).collect();
        match &c.data {
            ChunkData::Contiguous(r) => {
                let strides = crate::formats::torch_save::contiguous_strides(&c.sizes);
                copy_box(
                    files.slice(*r),
                    0,
                    &strides,
                    &src_at,
                    &mut out,
                    sizes,
                    &dst_at,
                    &extent,
                    es,
                );
            }
            ChunkData::Strided {
                storage,
                storage_offset,
                strides,
            } => {
                copy_box(
                    files.slice(*storage),
                    *storage_offset,
                    strides,
                    &src_at,
                    &mut out,
                    sizes,
                    &dst_at,
                    &extent,
                    es,
                );
            }
        }
    }
    Cow::Owned(out)
}

fn contains(c_off: &[u64], c_size: &[u64], off: &[u64], size: &[u64]) -> bool {
    c_off
        .iter()
        .zip(c_size)
        .zip(off.iter().zip(size))
        .all(|((&co, &cs), (&o, &s))| co <= o && o + s <= co + cs)
}

fn intersect(
    c_off: &[u64],
    c_size: &[u64],
    off: &[u64],
    size: &[u64],
) -> Option<(Vec<u64>, Vec<u64>)> {
    let mut lo = Vec::with_capacity(off.len());
    let mut hi = Vec::with_capacity(off.len());
    for ((&co, &cs), (&o, &s)) in c_off.iter().zip(c_size).zip(off.iter().zip(size)) {
        let l = co.max(o);
        let h = (co + cs).min(o + s);
        if h <= l {
            return None;
        }
        lo.push(l);
        hi.push(h);
    }
    Some((lo, hi))
}

/// If the box `rel`/`size` inside a row-major array of `shape` is one run, its start
/// and length in elements.
pub fn contiguous_run(shape: &[u64], rel: &[u64], size: &[u64]) -> Option<(u64, u64)> {
    // Axes after the first partial one must be full; axes before it must be 1 wide.
    let n = shape.len();
    let mut k = n;
    for i in (0..n).rev() {
        if size[i] != shape[i] {
            k = i;
            break;
        }
    }
    if k < n && (0..k).any(|i| size[i] != 1) {
        return None;
    }
    let strides = crate::formats::torch_save::contiguous_strides(shape);
    let start: u64 = rel.iter().zip(&strides).map(|(r, s)| r * s).sum();
    Some((start, size.iter().product()))
}

/// Copies the box `extent` from a strided source at `src_at` to a row-major
/// destination of shape `dst_shape` at `dst_at`. Element size `es` bytes.
#[allow(clippy::too_many_arguments)]
pub fn copy_box(
    src: &[u8],
    src_base: u64,
    src_strides: &[u64],
    src_at: &[u64],
    dst: &mut [u8],
    dst_shape: &[u64],
    dst_at: &[u64],
    extent: &[u64],
    es: u64,
) {
    let n = extent.len();
    if extent.contains(&0) {
        return;
    }
    if n == 0 {
        let s = (src_base * es) as usize;
        dst[..es as usize].copy_from_slice(&src[s..s + es as usize]);
        return;
    }
    let dst_strides = crate::formats::torch_save::contiguous_strides(dst_shape);
    // The innermost axis is copied as one run when both sides are dense along it.
    let inner_dense = src_strides[n - 1] == 1;
    let run = if inner_dense { extent[n - 1] } else { 1 };
    let outer_axes = if inner_dense { n - 1 } else { n };
    let mut idx = vec![0u64; outer_axes];
    loop {
        let mut s = src_base;
        let mut d = 0u64;
        for a in 0..n {
            let i = if a < outer_axes { idx[a] } else { 0 };
            s += (src_at[a] + i) * src_strides[a];
            d += (dst_at[a] + i) * dst_strides[a];
        }
        let (s, d, len) = ((s * es) as usize, (d * es) as usize, (run * es) as usize);
        dst[d..d + len].copy_from_slice(&src[s..s + len]);
        // Odometer increment over the outer axes.
        let mut a = outer_axes;
        loop {
            if a == 0 {
                return;
            }
            a -= 1;
            idx[a] += 1;
            if idx[a] < extent[a] {
                break;
            }
            idx[a] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs() {
        assert_eq!(
            contiguous_run(&[2, 16, 8], &[1, 0, 0], &[1, 16, 8]),
            Some((128, 128))
        );
        assert_eq!(
            contiguous_run(&[2, 16, 8], &[1, 4, 0], &[1, 4, 8]),
            Some((160, 32))
        );
        assert_eq!(contiguous_run(&[2, 16, 8], &[0, 0, 0], &[2, 4, 8]), None);
        assert_eq!(contiguous_run(&[2, 16, 8], &[0, 0, 4], &[1, 16, 4]), None);
        assert_eq!(contiguous_run(&[], &[], &[]), Some((0, 1)));
    }

    #[test]
    fn copy_box_transposes_strided_sources() {
        // Source: a 2x3 matrix stored transposed (strides [1, 2]).
        let src: Vec<u8> = vec![0, 3, 1, 4, 2, 5];
        let mut dst = vec![9u8; 6];
        copy_box(
            &src,
            0,
            &[1, 2],
            &[0, 0],
            &mut dst,
            &[2, 3],
            &[0, 0],
            &[2, 3],
            1,
        );
        assert_eq!(dst, vec![0, 1, 2, 3, 4, 5]);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Reading any box of a tensor split into any row-chunking gives the same
        /// bytes as slicing the whole tensor.
        #[test]
        fn boxes_of_chunked_tensors(rows in 1u64..12, cols in 1u64..6, cuts in proptest::collection::btree_set(1u64..12, 0..4),
                                    r0 in 0u64..12, nr in 1u64..12, c0 in 0u64..6, nc in 1u64..6) {
            let (r0, c0) = (r0 % rows, c0 % cols);
            let (nr, nc) = (nr.min(rows - r0), nc.min(cols - c0));
            let whole: Vec<u8> = (0..rows * cols).map(|i| i as u8).collect();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("data");
            std::fs::write(&path, &whole).unwrap();
            let mut files = Files::default();
            let id = files.add(&path).unwrap();
            let mut bounds: Vec<u64> = cuts.into_iter().filter(|&c| c < rows).collect();
            bounds.insert(0, 0);
            bounds.push(rows);
            let chunks = bounds.windows(2).map(|w| TensorChunk {
                offsets: vec![w[0], 0],
                sizes: vec![w[1] - w[0], cols],
                data: ChunkData::Contiguous(ByteRef { file: id, offset: w[0] * cols, len: (w[1] - w[0]) * cols }),
                checksum: None,
            }).collect();
            let t = GlobalTensor { name: "t".into(), dtype: DType::U8, shape: vec![rows, cols], chunks };
            let got = read_box(&files, &t, &[r0, c0], &[nr, nc]);
            let expected: Vec<u8> = (r0..r0 + nr).flat_map(|r| (c0..c0 + nc).map(move |c| (r * cols + c) as u8)).collect();
            prop_assert_eq!(got.as_ref(), &expected[..]);
        }
    }
}
