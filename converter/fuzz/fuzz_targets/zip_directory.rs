#![no_main]
//! Structure-aware zip directories: a torch archive of arbitrary records written
//! by our writer, then fields of its end record and central directory set to
//! arbitrary values (offsets, sizes, counts, name lengths, compression). Feeds
//! `ckpt_convert::fuzz::{torch_zip, torch_save}`.

use arbitrary::Arbitrary;

#[derive(Arbitrary, Debug)]
enum Field {
    EndEntries(u16),
    EndCdSize(u32),
    EndCdOffset(u32),
    EndCommentLen(u16),
    CentralMethod(u8, u16),
    CentralCompressed(u8, u32),
    CentralSize(u8, u32),
    CentralNameLen(u8, u16),
    CentralExtraLen(u8, u16),
    CentralLocalOffset(u8, u32),
    LocalNameLen(u8, u16),
    LocalExtraLen(u8, u16),
    Truncate(u16),
    Byte(u16, u8),
}

#[derive(Arbitrary, Debug)]
struct Archive {
    records: Vec<(String, Vec<u8>)>,
    with_data_pkl: bool,
    edits: Vec<Field>,
}

fn le16(b: &[u8], at: usize) -> usize {
    b.get(at..at + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]) as usize)
}
fn le32(b: &[u8], at: usize) -> usize {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
}
fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(s) = b.get_mut(at..at + v.len()) {
        s.copy_from_slice(v);
    }
}

/// Offsets of the central entries of our own (well-formed) archive.
fn central_entries(b: &[u8]) -> Vec<usize> {
    let end = b.len().saturating_sub(22);
    let (n, mut at) = (le16(b, end + 10), le32(b, end + 16));
    let mut out = Vec::new();
    for _ in 0..n {
        if at + 46 > b.len() {
            break;
        }
        out.push(at);
        at += 46 + le16(b, at + 28) + le16(b, at + 30) + le16(b, at + 32);
    }
    out
}

fn render(a: &Archive) -> Vec<u8> {
    let mut records: Vec<(&str, Vec<u8>)> = a
        .records
        .iter()
        .take(8)
        .map(|(n, d)| (n.as_str(), d.clone()))
        .collect();
    if a.with_data_pkl {
        records.insert(
            0,
            (
                "archive/data.pkl",
                ckpt_convert::formats::megatron::local_extra_state_payload(),
            ),
        );
    }
    let mut b = ckpt_convert::formats::torch_zip::write_archive(&records);
    let end = b.len().saturating_sub(22);
    let central = central_entries(&b);
    let entry = |i: u8| central.get(i as usize % central.len().max(1)).copied();
    for e in a.edits.iter().take(8) {
        match *e {
            Field::EndEntries(v) => put(&mut b, end + 10, &v.to_le_bytes()),
            Field::EndCdSize(v) => put(&mut b, end + 12, &v.to_le_bytes()),
            Field::EndCdOffset(v) => put(&mut b, end + 16, &v.to_le_bytes()),
            Field::EndCommentLen(v) => put(&mut b, end + 20, &v.to_le_bytes()),
            Field::CentralMethod(i, v) => entry(i)
                .into_iter()
                .for_each(|c| put(&mut b, c + 10, &v.to_le_bytes())),
            Field::CentralCompressed(i, v) => entry(i)
                .into_iter()
                .for_each(|c| put(&mut b, c + 20, &v.to_le_bytes())),
            Field::CentralSize(i, v) => entry(i)
                .into_iter()
                .for_each(|c| put(&mut b, c + 24, &v.to_le_bytes())),
            Field::CentralNameLen(i, v) => entry(i)
                .into_iter()
                .for_each(|c| put(&mut b, c + 28, &v.to_le_bytes())),
            Field::CentralExtraLen(i, v) => entry(i)
                .into_iter()
                .for_each(|c| put(&mut b, c + 30, &v.to_le_bytes())),
            Field::CentralLocalOffset(i, v) => entry(i)
                .into_iter()
                .for_each(|c| put(&mut b, c + 42, &v.to_le_bytes())),
            Field::LocalNameLen(i, v) => {
                if let Some(c) = entry(i) {
                    let local = le32(&b, c + 42);
                    put(&mut b, local + 26, &v.to_le_bytes());
                }
            }
            Field::LocalExtraLen(i, v) => {
                if let Some(c) = entry(i) {
                    let local = le32(&b, c + 42);
                    put(&mut b, local + 28, &v.to_le_bytes());
                }
            }
            Field::Truncate(n) => {
                let keep = b.len().saturating_sub(usize::from(n));
                b.truncate(keep);
            }
            Field::Byte(at, v) => {
                let at = usize::from(at);
                if at < b.len() {
                    b[at] = v;
                }
            }
        }
    }
    b
}

libfuzzer_sys::fuzz_target!(|a: Archive| {
    let bytes = render(&a);
    ckpt_convert_fuzz::keep("torch_zip", &bytes);
    ckpt_convert::fuzz::torch_zip(&bytes);
    ckpt_convert::fuzz::torch_save(&bytes);
});
