//! Digests: XXH3-128 for everything we record (files, tensors, source chunks).
//!
//! They guard integrity (truncation, bit rot, a changed or swapped file) and
//! identify weights; they are not meant to resist forgery. XXH3 runs at memory
//! speed, so digesting every byte we write and read stays off the conversion's
//! critical path. Hex strings are the canonical form `xxhsum -H2` prints.

use std::path::Path;

use xxhash_rust::xxh3::{Xxh3, xxh3_128};

use crate::formats::dtype::{DType, count_non_finite};
use crate::formats::source::MappedFile;

/// The hex digest of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    format_digest(xxh3_128(bytes))
}

/// Formats a digest as 32 hex digits.
pub fn format_digest(d: u128) -> String {
    format!("{d:032x}")
}

/// The digest of a set of lines, sorted first so the result does not depend on the
/// order they were produced in.
pub fn of_lines(mut lines: Vec<String>) -> String {
    lines.sort();
    let mut h = Xxh3::new();
    for l in &lines {
        h.update(l.as_bytes());
    }
    format_digest(h.digest128())
}

/// Size and digest of a whole file, read through a map in windows that are released
/// after use (so digesting a large file does not grow resident memory).
///
/// # Errors
/// The I/O error of opening or mapping it (or one saying why it was refused:
/// not a regular file, a link leaving its directory).
pub fn file(path: &Path) -> std::io::Result<(u64, String)> {
    file_and_ranges(path, &[]).map(|(len, digest, _)| (len, digest))
}

/// A byte range inside a file: offset, length, and the dtype of its elements.
pub type Range = (u64, u64, DType);

/// What one range of [`file_and_ranges`] holds: its XXH3-128 and its count of
/// NaN and infinite values.
pub type RangeDigest = (u128, u64);

/// [`file`], and the digest and count of NaN and infinite values of each of
/// `ranges` (sorted by offset, not overlapping), from the same one read of the
/// file: a written output is read back once for its manifest and its checks.
///
/// # Errors
/// As [`file`].
///
/// # Panics
/// When `ranges` are not sorted and disjoint (a caller's bug).
pub fn file_and_ranges(
    path: &Path,
    ranges: &[Range],
) -> std::io::Result<(u64, String, Vec<RangeDigest>)> {
    read_in_windows(path, ranges, 64 << 20, BLOCK)
}

/// Bytes hashed and counted at once.
const BLOCK: u64 = 256 << 10;

/// [`file_and_ranges`], mapping `window` bytes at a time and reading them in
/// blocks of `block`.
fn read_in_windows(
    path: &Path,
    ranges: &[Range],
    window: u64,
    block: u64,
) -> std::io::Result<(u64, String, Vec<RangeDigest>)> {
    assert!(
        ranges.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0),
        "ranges are sorted and disjoint"
    );
    let map = MappedFile::open(path).map_err(|e| match e {
        crate::formats::FormatError::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    })?;
    let mut h = Xxh3::new();
    let mut parts: Vec<RangeReader> = ranges.iter().map(|r| RangeReader::new(r.2)).collect();
    let len = map.len();
    // The first range not yet read to its end.
    let mut open = 0;
    let mut at = 0u64;
    while at < len {
        let n = window.min(len - at);
        let end = at + n;
        map.will_need(at, n);
        // In blocks that stay in the core's cache between the file's hasher and
        // the ranges' (hash and count), so memory is read once.
        let mut b = at;
        while b < end {
            let b_end = (b + block).min(end);
            let block = &map.bytes()[b as usize..b_end as usize];
            h.update(block);
            for (i, &(offset, length, _)) in ranges.iter().enumerate().skip(open) {
                if offset >= b_end {
                    break;
                }
                let (lo, hi) = (offset.max(b), (offset + length).min(b_end));
                if lo < hi {
                    parts[i].feed(&block[(lo - b) as usize..(hi - b) as usize]);
                }
                if offset + length <= b_end && i == open {
                    open += 1;
                }
            }
            b = b_end;
        }
        map.release(at, n);
        at = end;
    }
    Ok((
        len,
        format_digest(h.digest128()),
        parts.into_iter().map(RangeReader::finish).collect(),
    ))
}

/// One range's digest and count of non-finite elements, fed in pieces that may
/// split an element (a range need not start at a multiple of its element size).
struct RangeReader {
    h: Xxh3,
    dtype: DType,
    bad: u64,
    /// The start of an element split by the last piece.
    carry: Vec<u8>,
}

impl RangeReader {
    fn new(dtype: DType) -> RangeReader {
        RangeReader {
            h: Xxh3::new(),
            dtype,
            bad: 0,
            carry: Vec::new(),
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        self.h.update(bytes);
        let size = self.dtype.size().max(1);
        if !self.carry.is_empty() {
            let take = (size - self.carry.len()).min(bytes.len());
            self.carry.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.carry.len() < size {
                return;
            }
            self.bad += count_non_finite(self.dtype, &self.carry);
            self.carry.clear();
        }
        let whole = bytes.len() / size * size;
        self.bad += count_non_finite(self.dtype, &bytes[..whole]);
        self.carry.extend_from_slice(&bytes[whole..]);
    }

    fn finish(self) -> RangeDigest {
        (self.h.digest128(), self.bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_equals_one_shot() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        assert_eq!(file(&p).unwrap(), (data.len() as u64, hex(&data)));
        // The canonical XXH3-128 of the empty input (xxhsum -H2 on an empty file).
        assert_eq!(hex(b""), "99aa06d3014798d86001c324468d497f");
    }

    #[test]
    fn ranges_read_with_the_file_equal_ranges_read_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        // bf16 ones with NaN and infinities, behind an odd header so elements start
        // at odd offsets; windows of 7 bytes split elements between windows.
        let mut data = vec![0xABu8; 5];
        for i in 0..1000u16 {
            let v: u16 = match i % 9 {
                0 => 0x7fc0,
                4 => 0xff80,
                _ => 0x3f80,
            };
            data.extend_from_slice(&v.to_le_bytes());
        }
        data.extend_from_slice(&[0x7f; 11]);
        std::fs::write(&p, &data).unwrap();
        let ranges = [
            (5, 600, DType::BF16),
            (605, 0, DType::BF16),
            (605, 1400, DType::BF16),
            (2005, 11, DType::U8),
        ];
        for (window, block) in [(7, 7), (64, 5), (4096, 3), (4096, 64), (1 << 20, BLOCK)] {
            let (len, digest, found) = read_in_windows(&p, &ranges, window, block).unwrap();
            assert_eq!(
                (len, digest.as_str()),
                (data.len() as u64, hex(&data).as_str())
            );
            for ((offset, length, dtype), (h, bad)) in ranges.iter().zip(&found) {
                let bytes = &data[*offset as usize..(offset + length) as usize];
                assert_eq!(*h, xxh3_128(bytes), "window {window}, range at {offset}");
                assert_eq!(*bad, count_non_finite(*dtype, bytes), "window {window}");
            }
            assert_eq!(found[0].1, 67, "window {window}");
        }
    }
}
