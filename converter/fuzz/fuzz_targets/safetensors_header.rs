#![no_main]
//! Structure-aware safetensors: a JSON header of tensors with real and unknown
//! dtypes, shapes and offsets that tile, overlap, leave holes or run past the
//! data, a length prefix that may lie, and data of the implied length. Feeds
//! `ckpt_convert::fuzz::safetensors`.

use arbitrary::Arbitrary;

#[derive(Arbitrary, Debug)]
enum Offsets {
    Tiled,
    Gap(u8),
    Overlap(u8),
    Raw(u64, u64),
}

#[derive(Arbitrary, Debug)]
struct Tensor {
    name: String,
    dtype: u8,
    custom_dtype: Option<String>,
    shape: Vec<u16>,
    huge_dim: Option<u64>,
    offsets: Offsets,
}

#[derive(Arbitrary, Debug)]
struct File {
    tensors: Vec<Tensor>,
    metadata: Option<Vec<(String, String)>>,
    metadata_not_strings: bool,
    length_delta: i8,
    data_delta: i16,
    pad: u8,
}

const DTYPES: &[(&str, u64)] = &[
    ("BOOL", 1),
    ("U8", 1),
    ("I8", 1),
    ("F8_E4M3", 1),
    ("F8_E5M2", 1),
    ("I16", 2),
    ("U16", 2),
    ("F16", 2),
    ("BF16", 2),
    ("I32", 4),
    ("U32", 4),
    ("F32", 4),
    ("F64", 8),
    ("I64", 8),
    ("U64", 8),
    ("F4", 1),
];

/// Data of more than this is not rendered (the header may still claim it).
const MAX_DATA: u64 = 1 << 20;

fn render(f: &File) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if let Some(m) = &f.metadata {
        let v: serde_json::Map<String, serde_json::Value> = m
            .iter()
            .map(|(k, v)| {
                let v = if f.metadata_not_strings {
                    serde_json::json!(1)
                } else {
                    serde_json::json!(v)
                };
                (k.clone(), v)
            })
            .collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(v));
    }
    let mut at = 0u64;
    for t in &f.tensors {
        let (name, size) = DTYPES[t.dtype as usize % DTYPES.len()];
        let dtype = t.custom_dtype.clone().unwrap_or_else(|| name.to_owned());
        let mut shape: Vec<u64> = t.shape.iter().map(|&d| u64::from(d % 64)).collect();
        if let Some(h) = t.huge_dim {
            shape.push(h);
        }
        let n = shape
            .iter()
            .try_fold(size, |a, &d| a.checked_mul(d))
            .unwrap_or(u64::MAX);
        let (b, e) = match t.offsets {
            Offsets::Tiled => (at, at.saturating_add(n)),
            Offsets::Gap(g) => {
                let b = at.saturating_add(u64::from(g));
                (b, b.saturating_add(n))
            }
            Offsets::Overlap(o) => {
                let b = at.saturating_sub(u64::from(o));
                (b, b.saturating_add(n))
            }
            Offsets::Raw(b, e) => (b, e),
        };
        at = e;
        header.insert(
            t.name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [b, e]}),
        );
    }
    let mut text = serde_json::to_vec(&header).expect("JSON of plain values");
    text.extend(std::iter::repeat_n(b' ', usize::from(f.pad % 8)));
    let len = (text.len() as i64 + i64::from(f.length_delta)).max(0) as u64;
    let data = at.saturating_add_signed(i64::from(f.data_delta));
    let mut out = len.to_le_bytes().to_vec();
    out.extend(text);
    out.resize(out.len() + data.min(MAX_DATA) as usize, 0);
    out
}

libfuzzer_sys::fuzz_target!(|f: File| {
    let bytes = render(&f);
    ckpt_convert_fuzz::keep("safetensors", &bytes);
    ckpt_convert::fuzz::safetensors(&bytes);
});
