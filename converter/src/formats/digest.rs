//! Digests: XXH3-128 for everything we record (files, tensors, source chunks).
//!
//! They guard integrity (truncation, bit rot, a changed or swapped file) and
//! identify weights; they are not meant to resist forgery. XXH3 runs at memory
//! speed, so digesting every byte we write and read stays off the conversion's
//! critical path. Hex strings are the canonical form `xxhsum -H2` prints.

use std::path::Path;

use xxhash_rust::xxh3::{Xxh3, xxh3_128};

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
    const WINDOW: u64 = 64 << 20;
    let map = MappedFile::open(path).map_err(|e| match e {
        crate::formats::FormatError::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    })?;
    let mut h = Xxh3::new();
    let len = map.len();
    let mut at = 0u64;
    while at < len {
        let n = WINDOW.min(len - at);
        map.will_need(at, n);
        h.update(&map.bytes()[at as usize..(at + n) as usize]);
        map.release(at, n);
        at += n;
    }
    Ok((len, format_digest(h.digest128())))
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
}
