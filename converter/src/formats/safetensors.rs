//! safetensors files: headers parsed and validated by the `safetensors` crate over a
//! memory map, tensors handed out as byte ranges of that map; headers for output
//! files laid out exactly as the reference serializer lays them out.

use std::collections::HashMap;
use std::path::Path;

use safetensors::SafeTensors;
use safetensors::tensor::{Metadata, TensorInfo};

use super::FormatError;
use crate::formats::dtype::DType;
use crate::formats::source::{ByteRef, ChunkData, FileId, Files, GlobalTensor, TensorChunk};

/// The tensors of one safetensors file.
#[derive(Debug)]
pub struct SafetensorsFile {
    /// Tensors in offset order.
    pub tensors: Vec<GlobalTensor>,
    /// The `__metadata__` map.
    pub metadata: HashMap<String, String>,
    /// Length of the 8-byte length prefix plus the header.
    pub header_len: u64,
}

/// Reads the header of a mapped safetensors file and lists its tensors.
///
/// # Errors
/// [`FormatError::Safetensors`] naming the file when the header is truncated, too
/// large, not JSON, has offsets that overlap, leave holes or run past the end, or
/// uses a dtype a checkpoint converter cannot carry.
pub fn read(files: &Files, id: FileId) -> Result<SafetensorsFile, FormatError> {
    let file = files.get(id);
    parse(file.bytes(), &file.path, id)
}

/// Reads the header of the safetensors file `bytes` (file `id`, at `path`, for
/// the ranges and messages) and lists its tensors; see [`read`].
///
/// # Errors
/// As [`read`].
pub fn parse(bytes: &[u8], path: &Path, id: FileId) -> Result<SafetensorsFile, FormatError> {
    let path = &path.to_path_buf();
    let st_err = |source: safetensors::SafeTensorError| FormatError::Safetensors {
        path: path.clone(),
        why: describe(&source, bytes.len()),
    };
    let (n, meta) = SafeTensors::read_metadata(bytes).map_err(st_err)?;
    let data_start = 8 + n as u64;
    let mut tensors = Vec::new();
    for name in meta.offset_keys() {
        let info = meta.info(&name).expect("offset_keys lists known tensors");
        let dtype = DType::from_safetensors(info.dtype).ok_or_else(|| FormatError::Tensor {
            path: path.clone(),
            tensor: name.clone(),
            why: format!("dtype {:?} is not supported by this converter", info.dtype),
        })?;
        let (begin, end) = info.data_offsets;
        let shape: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
        tensors.push(GlobalTensor {
            name: name.clone(),
            dtype,
            chunks: vec![TensorChunk {
                offsets: vec![0; shape.len()],
                sizes: shape.clone(),
                data: ChunkData::Contiguous(ByteRef {
                    file: id,
                    offset: data_start + begin as u64,
                    len: (end - begin) as u64,
                }),
                checksum: None,
            }],
            shape,
        });
    }
    Ok(SafetensorsFile {
        tensors,
        metadata: meta.metadata().clone().unwrap_or_default(),
        header_len: data_start,
    })
}

fn describe(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => {
            format!("file is {file_len} bytes, shorter than the 8-byte header length")
        }
        E::HeaderTooLarge => {
            "header length is larger than 100 MB (or the file is not safetensors)".into()
        }
        E::InvalidHeaderLength => {
            format!("header length points past the end of the {file_len}-byte file")
        }
        E::InvalidHeader(_) => "header is not valid UTF-8".into(),
        E::InvalidHeaderDeserialization(err) => {
            format!("header is not a valid safetensors JSON header: {err}")
        }
        E::InvalidOffset(name) => format!(
            "tensor {name:?}: data offsets overlap or leave a hole (each tensor must start where the previous one ended)"
        ),
        E::TensorInvalidInfo => "a tensor's byte length does not match its shape and dtype".into(),
        E::MetadataIncompleteBuffer => format!(
            "the tensors' data does not end exactly at the end of the {file_len}-byte file (truncated, or offsets beyond the file)"
        ),
        E::ValidationOverflow => "a tensor's shape overflows".into(),
        other => other.to_string(),
    }
}

/// A planned output file: its header and where each tensor's data goes.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Length prefix plus padded JSON header.
    pub header: Vec<u8>,
    /// Absolute file offset of each tensor's data, by name.
    pub offsets: HashMap<String, u64>,
    /// Total file length.
    pub file_len: u64,
}

/// Lays out a file for `tensors` the way the reference serializer does: ordered by
/// dtype, widest first, then by name; `__metadata__` first; the header padded with
/// spaces to a multiple of 8 so the data starts aligned.
///
/// # Errors
/// [`FormatError::Internal`] if the crate rejects the layout (which would be a bug).
pub fn layout(
    tensors: &[(String, DType, Vec<u64>)],
    metadata: &HashMap<String, String>,
) -> Result<Layout, FormatError> {
    let mut order: Vec<&(String, DType, Vec<u64>)> = tensors.iter().collect();
    order.sort_by(|a, b| {
        b.1.to_safetensors()
            .cmp(&a.1.to_safetensors())
            .then_with(|| a.0.cmp(&b.0))
    });
    let mut infos = Vec::with_capacity(order.len());
    let mut offset = 0usize;
    for (name, dtype, shape) in order {
        let n = shape.iter().product::<u64>() as usize * dtype.size();
        infos.push((
            name.clone(),
            TensorInfo {
                dtype: dtype.to_safetensors(),
                shape: shape.iter().map(|&d| d as usize).collect(),
                data_offsets: (offset, offset + n),
            },
        ));
        offset += n;
    }
    let meta_map = if metadata.is_empty() {
        None
    } else {
        Some(metadata.clone().into_iter().collect())
    };
    let meta = Metadata::new(meta_map, infos.clone())
        .map_err(|e| FormatError::Internal(format!("safetensors layout rejected: {e}")))?;
    let mut json = serde_json::to_vec(&meta).map_err(|e| FormatError::Internal(e.to_string()))?;
    let padded = json.len().next_multiple_of(8);
    json.resize(padded, b' ');
    let mut header = (padded as u64).to_le_bytes().to_vec();
    header.extend_from_slice(&json);
    let start = header.len() as u64;
    let offsets = infos
        .into_iter()
        .map(|(name, info)| (name, start + info.data_offsets.0 as u64))
        .collect();
    Ok(Layout {
        header,
        offsets,
        file_len: start + offset as u64,
    })
}

/// `{"format": "pt"}`, the metadata `save_pretrained` writes in every shard.
pub fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_owned(), "pt".to_owned())])
}

/// Opens and reads one file (convenience for tests and `inspect`).
///
/// # Errors
/// As [`read`], plus the I/O error of mapping the file.
pub fn open(files: &mut Files, path: &Path) -> Result<(FileId, SafetensorsFile), FormatError> {
    let id = files.add(path)?;
    Ok((id, read(files, id)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_matches_the_reference_serializer() {
        let tensors = vec![
            ("b".to_owned(), DType::F32, vec![2u64, 2]),
            ("a".to_owned(), DType::BF16, vec![3]),
            ("layers.10".to_owned(), DType::F32, vec![1]),
            ("layers.2".to_owned(), DType::F32, vec![1]),
        ];
        let ours = layout(&tensors, &pt_metadata()).unwrap();
        // The crate's own serializer, with the same tensors.
        let data: Vec<(String, safetensors::tensor::TensorView<'static>)> = tensors
            .iter()
            .map(|(n, d, s)| {
                let len = s.iter().product::<u64>() as usize * d.size();
                let buf: &'static [u8] = Box::leak(vec![0u8; len].into_boxed_slice());
                (
                    n.clone(),
                    safetensors::tensor::TensorView::new(
                        d.to_safetensors(),
                        s.iter().map(|&x| x as usize).collect(),
                        buf,
                    )
                    .unwrap(),
                )
            })
            .collect();
        let reference = safetensors::serialize(data, Some(pt_metadata())).unwrap();
        assert_eq!(&reference[..ours.header.len()], &ours.header[..]);
        assert_eq!(reference.len() as u64, ours.file_len);
        // Width first, then byte-wise name order: layers.10 before layers.2.
        assert!(ours.offsets["layers.10"] < ours.offsets["layers.2"]);
        assert!(ours.offsets["b"] < ours.offsets["a"]);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn dtype() -> impl Strategy<Value = DType> {
        prop::sample::select(vec![
            DType::BF16,
            DType::F16,
            DType::F32,
            DType::I64,
            DType::U8,
            DType::Bool,
        ])
    }

    proptest! {
        /// Files laid out by `layout` read back through the crate's validating reader
        /// with every tensor where the layout put it.
        #[test]
        fn layout_round_trips(specs in proptest::collection::btree_map("[a-z.]{1,12}", (dtype(), proptest::collection::vec(0u64..5, 0..3)), 0..8)) {
            let tensors: Vec<(String, DType, Vec<u64>)> = specs.into_iter().map(|(n, (d, s))| (n, d, s)).collect();
            let l = layout(&tensors, &pt_metadata()).unwrap();
            let mut bytes = l.header.clone();
            bytes.resize(l.file_len as usize, 0);
            for (name, dtype, shape) in &tensors {
                let n = shape.iter().product::<u64>() as usize * dtype.size();
                let at = l.offsets[name] as usize;
                for (i, b) in bytes[at..at + n].iter_mut().enumerate() {
                    *b = (i as u8).wrapping_add(name.len() as u8);
                }
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("x.safetensors");
            std::fs::write(&path, &bytes).unwrap();
            let mut files = Files::default();
            let (_, file) = open(&mut files, &path).unwrap();
            prop_assert_eq!(file.metadata.get("format").map(String::as_str), Some("pt"));
            prop_assert_eq!(file.tensors.len(), tensors.len());
            for t in &file.tensors {
                let (_, dtype, shape) = tensors.iter().find(|(n, _, _)| *n == t.name).unwrap();
                prop_assert_eq!((t.dtype, &t.shape), (*dtype, shape));
                let data = files.slice(t.chunks[0].footprint());
                prop_assert!(data.iter().enumerate().all(|(i, b)| *b == (i as u8).wrapping_add(t.name.len() as u8)));
            }
        }
    }
}
