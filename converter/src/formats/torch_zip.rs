//! The zip container of `torch.save` archives (PyTorch's "zip file format").
//!
//! A `.distcp` item, `common.pt` and `train_state.pt` are each one such archive.
//! Reading: we accept only STORED records (torch never compresses) and locate them
//! through the central directory, with every offset and size checked against the
//! archive before use, so a record can be handed out as a zero-copy slice.
//! Writing: STORED records, correct CRC-32s, the tensor record 64-byte aligned with
//! torch's `FB` padding field (so `torch.load(mmap=True)` works on standalone
//! archives), and zip64 fields only when a size or offset needs them.

/// A record found in an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZipRecord {
    /// The full name (`archive/data/0`).
    pub name: String,
    /// Where the record's bytes start, relative to the archive start.
    pub data_offset: u64,
    /// The record's length.
    pub size: u64,
    /// CRC-32 from the central directory.
    pub crc32: u32,
}

/// Why an archive was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ZipError {
    /// No end-of-central-directory record.
    #[error("not a zip archive: no end-of-central-directory record in the last {0} bytes")]
    NoEndRecord(usize),
    /// A structure points outside the archive.
    #[error(
        "zip {what} at offset {offset} (length {len}) lies outside the {archive_len}-byte archive"
    )]
    OutOfBounds {
        /// Which structure.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The archive length.
        archive_len: u64,
    },
    /// A signature did not match.
    #[error("zip {what} at offset {offset} has a bad signature")]
    BadSignature {
        /// Which structure.
        what: &'static str,
        /// Its offset.
        offset: u64,
    },
    /// A compressed record.
    #[error(
        "zip record {name:?} uses compression method {method}; torch archives store records uncompressed"
    )]
    Compressed {
        /// The record name.
        name: String,
        /// The method.
        method: u16,
    },
    /// Something else malformed.
    #[error("malformed zip archive: {0}")]
    Malformed(String),
}

const EOCD_SIG: u32 = 0x0605_4b50;
const EOCD64_SIG: u32 = 0x0606_4b50;
const EOCD64_LOCATOR_SIG: u32 = 0x0706_4b50;
const CENTRAL_SIG: u32 = 0x0201_4b50;
const LOCAL_SIG: u32 = 0x0403_4b50;

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn slice<'a>(
    buf: &'a [u8],
    offset: u64,
    len: u64,
    what: &'static str,
) -> Result<&'a [u8], ZipError> {
    let end = offset.checked_add(len);
    match end {
        Some(end) if end <= buf.len() as u64 => Ok(&buf[offset as usize..end as usize]),
        _ => Err(ZipError::OutOfBounds {
            what,
            offset,
            len,
            archive_len: buf.len() as u64,
        }),
    }
}

/// Lists the records of the archive in `buf`.
///
/// # Errors
/// A [`ZipError`] when the archive is truncated, points outside itself, or holds
/// compressed records.
pub fn read_records(buf: &[u8]) -> Result<Vec<ZipRecord>, ZipError> {
    // The end record is 22 bytes plus a comment of at most 65535 bytes.
    let search = buf.len().min(22 + 65535);
    let tail_start = buf.len() - search;
    let eocd = (tail_start..buf.len().saturating_sub(21))
        .rev()
        .find(|&i| le32(buf, i) == EOCD_SIG)
        .ok_or(ZipError::NoEndRecord(search))?;
    let mut entries = u64::from(le16(buf, eocd + 10));
    let mut cd_size = u64::from(le32(buf, eocd + 12));
    let mut cd_offset = u64::from(le32(buf, eocd + 16));
    if (entries == 0xffff || cd_size == 0xffff_ffff || cd_offset == 0xffff_ffff) && eocd >= 20 {
        let loc = eocd - 20;
        if le32(buf, loc) == EOCD64_LOCATOR_SIG {
            let rec_off = le64(buf, loc + 8);
            let rec = slice(buf, rec_off, 56, "zip64 end record")?;
            if le32(rec, 0) != EOCD64_SIG {
                return Err(ZipError::BadSignature {
                    what: "zip64 end record",
                    offset: rec_off,
                });
            }
            entries = le64(rec, 32);
            cd_size = le64(rec, 40);
            cd_offset = le64(rec, 48);
        }
    }
    let cd = slice(buf, cd_offset, cd_size, "central directory")?;
    // Each central entry takes at least 46 bytes: refuse counts the directory cannot hold.
    if entries > cd_size / 46 {
        return Err(ZipError::Malformed(format!(
            "{entries} entries cannot fit in a {cd_size}-byte central directory"
        )));
    }
    let mut records = Vec::with_capacity(entries as usize);
    let mut at = 0usize;
    for _ in 0..entries {
        let head = slice(cd, at as u64, 46, "central directory entry")?;
        if le32(head, 0) != CENTRAL_SIG {
            return Err(ZipError::BadSignature {
                what: "central directory entry",
                offset: cd_offset + at as u64,
            });
        }
        let method = le16(head, 10);
        let crc32 = le32(head, 16);
        let mut comp = u64::from(le32(head, 20));
        let mut size = u64::from(le32(head, 24));
        let name_len = u64::from(le16(head, 28));
        let extra_len = u64::from(le16(head, 30));
        let comment_len = u64::from(le16(head, 32));
        let mut local = u64::from(le32(head, 42));
        let name = slice(cd, at as u64 + 46, name_len, "record name")?;
        let name = String::from_utf8_lossy(name).into_owned();
        let extra = slice(cd, at as u64 + 46 + name_len, extra_len, "extra field")?;
        // zip64 extended information: the fields that overflowed, in order.
        let mut e = 0usize;
        while e + 4 <= extra.len() {
            let id = le16(extra, e);
            let len = le16(extra, e + 2) as usize;
            let body = extra
                .get(e + 4..e + 4 + len)
                .ok_or_else(|| ZipError::Malformed(format!("extra field of {name:?} overruns")))?;
            if id == 0x0001 {
                let mut f = 0usize;
                let mut next = |v: &mut u64| -> Result<(), ZipError> {
                    if *v == 0xffff_ffff {
                        let b = body.get(f..f + 8).ok_or_else(|| {
                            ZipError::Malformed(format!("zip64 field of {name:?} too short"))
                        })?;
                        *v = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                        f += 8;
                    }
                    Ok(())
                };
                next(&mut size)?;
                next(&mut comp)?;
                next(&mut local)?;
            }
            e += 4 + len;
        }
        if method != 0 {
            return Err(ZipError::Compressed { name, method });
        }
        if comp != size {
            return Err(ZipError::Malformed(format!(
                "stored record {name:?} has compressed size {comp} but size {size}"
            )));
        }
        let lh = slice(buf, local, 30, "local header")?;
        if le32(lh, 0) != LOCAL_SIG {
            return Err(ZipError::BadSignature {
                what: "local header",
                offset: local,
            });
        }
        let data_offset = local + 30 + u64::from(le16(lh, 26)) + u64::from(le16(lh, 28));
        slice(buf, data_offset, size, "record data")?;
        records.push(ZipRecord {
            name,
            data_offset,
            size,
            crc32,
        });
        at += 46 + (name_len + extra_len + comment_len) as usize;
    }
    Ok(records)
}

/// One record to write: a name and either bytes now or a length whose bytes the
/// caller writes later (the tensor payload, written in place by the engine).
#[derive(Debug, Clone)]
pub enum RecordBody {
    /// Small records written with the headers.
    Bytes(Vec<u8>),
    /// A payload of this many bytes at an aligned position, written by the caller.
    Deferred(u64),
}

/// The bytes of an archive around one deferred payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveLayout {
    /// Everything before the deferred payload.
    pub prefix: Vec<u8>,
    /// Everything after it.
    pub suffix: Vec<u8>,
    /// Payload length.
    pub payload_len: u64,
}

impl ArchiveLayout {
    /// Total archive length.
    pub fn len(&self) -> u64 {
        self.prefix.len() as u64 + self.payload_len + self.suffix.len() as u64
    }

    /// True for an archive of zero bytes (never produced).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Alignment of payload records inside an archive, as torch writes them.
pub const RECORD_ALIGNMENT: u64 = 64;

/// Lays out an archive with `records`; at most one may be [`RecordBody::Deferred`],
/// and `payload_crc` is its CRC-32 (any value gives the same lengths, so callers lay
/// out with 0 and rebuild with the real CRC once the payload is known).
pub fn layout_archive(records: &[(&str, RecordBody)], payload_crc: u32) -> ArchiveLayout {
    let mut prefix = Vec::new();
    let mut suffix = Vec::new();
    let mut central = Vec::new();
    let mut payload_len = 0u64;
    let mut seen_payload = false;
    let mut count = 0u64;
    for (name, body) in records {
        let offset = if seen_payload {
            prefix.len() as u64 + payload_len + suffix.len() as u64
        } else {
            prefix.len() as u64
        };
        let (size, crc) = match body {
            RecordBody::Bytes(b) => (b.len() as u64, crc32fast::hash(b)),
            RecordBody::Deferred(n) => (*n, payload_crc),
        };
        let deferred = matches!(body, RecordBody::Deferred(_));
        let zip64 = size >= 0xffff_ffff || offset >= 0xffff_ffff;
        // Local header.
        let mut local = Vec::new();
        local.extend_from_slice(&LOCAL_SIG.to_le_bytes());
        local.extend_from_slice(&(if zip64 { 45u16 } else { 20 }).to_le_bytes());
        local.extend_from_slice(&0u16.to_le_bytes()); // flags
        local.extend_from_slice(&0u16.to_le_bytes()); // method: stored
        local.extend_from_slice(&0u16.to_le_bytes()); // time
        local.extend_from_slice(&0x21u16.to_le_bytes()); // date: 1980-01-01
        local.extend_from_slice(&crc.to_le_bytes());
        let small = if zip64 { 0xffff_ffff } else { size as u32 };
        local.extend_from_slice(&small.to_le_bytes());
        local.extend_from_slice(&small.to_le_bytes());
        local.extend_from_slice(&(name.len() as u16).to_le_bytes());
        let mut extra = Vec::new();
        if zip64 {
            extra.extend_from_slice(&1u16.to_le_bytes());
            extra.extend_from_slice(&16u16.to_le_bytes());
            extra.extend_from_slice(&size.to_le_bytes());
            extra.extend_from_slice(&size.to_le_bytes());
        }
        if deferred {
            // Pad with torch's "FB" field so the payload starts 64-byte aligned.
            let before = offset + 30 + name.len() as u64 + extra.len() as u64 + 4;
            let pad = (RECORD_ALIGNMENT - before % RECORD_ALIGNMENT) % RECORD_ALIGNMENT;
            extra.extend_from_slice(&0x4246u16.to_le_bytes());
            extra.extend_from_slice(&(pad as u16).to_le_bytes());
            extra.extend(std::iter::repeat_n(b'Z', pad as usize));
        }
        local.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        local.extend_from_slice(name.as_bytes());
        local.extend_from_slice(&extra);
        // Central directory entry.
        central.extend_from_slice(&CENTRAL_SIG.to_le_bytes());
        let version = if zip64 { 45u16 } else { 20 };
        central.extend_from_slice(&version.to_le_bytes()); // made by
        central.extend_from_slice(&version.to_le_bytes()); // needed
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes());
        central.extend_from_slice(&0x21u16.to_le_bytes());
        central.extend_from_slice(&crc.to_le_bytes());
        central.extend_from_slice(&small.to_le_bytes());
        central.extend_from_slice(&small.to_le_bytes());
        central.extend_from_slice(&(name.len() as u16).to_le_bytes());
        let mut cextra = Vec::new();
        if zip64 {
            cextra.extend_from_slice(&1u16.to_le_bytes());
            cextra.extend_from_slice(&24u16.to_le_bytes());
            cextra.extend_from_slice(&size.to_le_bytes());
            cextra.extend_from_slice(&size.to_le_bytes());
            cextra.extend_from_slice(&offset.to_le_bytes());
        }
        central.extend_from_slice(&(cextra.len() as u16).to_le_bytes());
        central.extend_from_slice(&0u16.to_le_bytes()); // comment
        central.extend_from_slice(&0u16.to_le_bytes()); // disk
        central.extend_from_slice(&0u16.to_le_bytes()); // internal attrs
        central.extend_from_slice(&0u32.to_le_bytes()); // external attrs
        let small_off = if zip64 { 0xffff_ffff } else { offset as u32 };
        central.extend_from_slice(&small_off.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
        central.extend_from_slice(&cextra);

        let out = if seen_payload {
            &mut suffix
        } else {
            &mut prefix
        };
        out.extend_from_slice(&local);
        match body {
            RecordBody::Bytes(b) => out.extend_from_slice(b),
            RecordBody::Deferred(n) => {
                assert!(!seen_payload, "at most one deferred record per archive");
                seen_payload = true;
                payload_len = *n;
            }
        }
        count += 1;
    }
    let cd_offset = prefix.len() as u64 + payload_len + suffix.len() as u64;
    let cd_size = central.len() as u64;
    let tail = if seen_payload {
        &mut suffix
    } else {
        &mut prefix
    };
    tail.extend_from_slice(&central);
    let needs64 = cd_offset >= 0xffff_ffff || count >= 0xffff;
    if needs64 {
        let rec_offset = cd_offset + cd_size;
        tail.extend_from_slice(&EOCD64_SIG.to_le_bytes());
        tail.extend_from_slice(&44u64.to_le_bytes());
        tail.extend_from_slice(&45u16.to_le_bytes());
        tail.extend_from_slice(&45u16.to_le_bytes());
        tail.extend_from_slice(&0u32.to_le_bytes());
        tail.extend_from_slice(&0u32.to_le_bytes());
        tail.extend_from_slice(&count.to_le_bytes());
        tail.extend_from_slice(&count.to_le_bytes());
        tail.extend_from_slice(&cd_size.to_le_bytes());
        tail.extend_from_slice(&cd_offset.to_le_bytes());
        tail.extend_from_slice(&EOCD64_LOCATOR_SIG.to_le_bytes());
        tail.extend_from_slice(&0u32.to_le_bytes());
        tail.extend_from_slice(&rec_offset.to_le_bytes());
        tail.extend_from_slice(&1u32.to_le_bytes());
    }
    tail.extend_from_slice(&EOCD_SIG.to_le_bytes());
    tail.extend_from_slice(&0u16.to_le_bytes());
    tail.extend_from_slice(&0u16.to_le_bytes());
    let small_count = if needs64 { 0xffff } else { count as u16 };
    tail.extend_from_slice(&small_count.to_le_bytes());
    tail.extend_from_slice(&small_count.to_le_bytes());
    let small_size = if needs64 { 0xffff_ffff } else { cd_size as u32 };
    let small_off = if needs64 {
        0xffff_ffff
    } else {
        cd_offset as u32
    };
    tail.extend_from_slice(&small_size.to_le_bytes());
    tail.extend_from_slice(&small_off.to_le_bytes());
    tail.extend_from_slice(&0u16.to_le_bytes());
    ArchiveLayout {
        prefix,
        suffix,
        payload_len,
    }
}

/// Writes a complete archive whose records are all in memory.
pub fn write_archive(records: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let bodies: Vec<(&str, RecordBody)> = records
        .iter()
        .map(|(n, b)| (*n, RecordBody::Bytes(b.clone())))
        .collect();
    layout_archive(&bodies, 0).prefix
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_deferred_payload() {
        let payload: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let crc = crc32fast::hash(&payload);
        let records = [
            ("archive/data.pkl", RecordBody::Bytes(b"pickle".to_vec())),
            ("archive/data/0", RecordBody::Deferred(payload.len() as u64)),
            ("archive/version", RecordBody::Bytes(b"3\n".to_vec())),
        ];
        let layout = layout_archive(&records, crc);
        assert_eq!(layout.prefix.len() as u64 % RECORD_ALIGNMENT, 0);
        let mut archive = layout.prefix.clone();
        archive.extend_from_slice(&payload);
        archive.extend_from_slice(&layout.suffix);
        let found = read_records(&archive).unwrap();
        assert_eq!(found.len(), 3);
        let data = &found[1];
        assert_eq!(data.name, "archive/data/0");
        assert_eq!(data.crc32, crc);
        let start = data.data_offset as usize;
        assert_eq!(&archive[start..start + data.size as usize], &payload[..]);
        assert_eq!(&archive[found[2].data_offset as usize..][..2], b"3\n");
    }

    #[test]
    fn truncated_archives_are_refused() {
        let archive = write_archive(&[("archive/data.pkl", b"abc".to_vec())]);
        for cut in 0..archive.len() {
            assert!(read_records(&archive[..cut]).is_err(), "cut at {cut}");
        }
        assert!(read_records(&archive).is_ok());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = read_records(&data);
        }
    }
}
