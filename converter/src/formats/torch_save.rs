//! `torch.save` archives: what a `.distcp` tensor item, a bytes item, `common.pt`
//! and `train_state.pt` hold.
//!
//! An archive is a zip ([`super::torch_zip`]) with `<prefix>/data.pkl` (a pickle
//! whose tensors are `_rebuild_tensor_v2(storage, offset, size, stride, ...)` calls
//! and whose storages are persistent ids naming `<prefix>/data/<key>` records),
//! `byteorder` and `version`.

use super::pickle::{AllowList, Id, Node, Pickle, PickleError, Py, write_pickle};
use super::torch_zip::{self, RecordBody, ZipError, ZipRecord};
use crate::formats::dtype::DType;

/// Why an archive could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum TorchSaveError {
    /// The zip container is broken.
    #[error(transparent)]
    Zip(#[from] ZipError),
    /// `data.pkl` is refused.
    #[error("data.pkl: {0}")]
    Pickle(#[from] PickleError),
    /// A record the format requires is missing.
    #[error("torch archive has no {0} record")]
    MissingRecord(String),
    /// The pickle does not describe what it should.
    #[error("torch archive: {0}")]
    Unexpected(String),
}

/// Globals a tensor pickle may name. Storages are inert markers; the rebuild
/// functions are interpreted, never called.
pub fn tensor_allow_list() -> AllowList {
    let mut exact: Vec<(&'static str, &'static str)> = vec![
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch.storage", "UntypedStorage"),
        ("torch", "UntypedStorage"),
        ("collections", "OrderedDict"),
        ("torch", "Size"),
    ];
    for d in DType::ALL {
        if let Some(class) = d.torch_storage_class() {
            exact.push(("torch", class));
        }
        exact.push(("torch", d.torch_name()));
    }
    AllowList::new(&exact).with_persistent_ids()
}

/// A tensor found in an archive: where its elements are and how they are laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    /// Element type.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<u64>,
    /// Strides in elements.
    pub stride: Vec<u64>,
    /// Offset into the storage, in elements.
    pub storage_offset: u64,
    /// The storage record: where its bytes are, relative to the archive start.
    pub storage: ZipRecord,
}

impl TensorRef {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }

    /// True when the elements are one dense row-major run in the storage.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1u64;
        for (&dim, &stride) in self.shape.iter().zip(&self.stride).rev() {
            if dim != 1 && stride != expected {
                return false;
            }
            expected = expected.saturating_mul(dim);
        }
        true
    }

    /// Byte range of a contiguous tensor's elements, relative to the archive start.
    pub fn contiguous_range(&self) -> Option<(u64, u64)> {
        if !self.is_contiguous() {
            return None;
        }
        let es = self.dtype.size() as u64;
        Some((
            self.storage.data_offset + self.storage_offset * es,
            self.numel() * es,
        ))
    }
}

/// An archive opened for reading.
#[derive(Debug)]
pub struct Archive<'a> {
    buf: &'a [u8],
    records: Vec<ZipRecord>,
    prefix: String,
}

impl<'a> Archive<'a> {
    /// Opens the archive in `buf` (checks the container only).
    ///
    /// # Errors
    /// [`TorchSaveError`] when the zip is broken or has no `data.pkl`.
    pub fn open(buf: &'a [u8]) -> Result<Self, TorchSaveError> {
        let records = torch_zip::read_records(buf)?;
        let pkl = records
            .iter()
            .find(|r| r.name == "data.pkl" || r.name.ends_with("/data.pkl"))
            .ok_or_else(|| TorchSaveError::MissingRecord("data.pkl".into()))?;
        let prefix = pkl.name.trim_end_matches("data.pkl").to_owned();
        Ok(Archive {
            buf,
            records,
            prefix,
        })
    }

    fn record(&self, name: &str) -> Option<&ZipRecord> {
        let full = format!("{}{}", self.prefix, name);
        self.records.iter().find(|r| r.name == full)
    }

    /// The bytes of a record.
    pub fn record_bytes(&self, record: &ZipRecord) -> &'a [u8] {
        &self.buf[record.data_offset as usize..(record.data_offset + record.size) as usize]
    }

    /// Parses `data.pkl` with `allow` (which must permit persistent ids if tensors
    /// may appear).
    ///
    /// # Errors
    /// A [`TorchSaveError::Pickle`] when the pickle is refused.
    pub fn pickle(&self, allow: &AllowList) -> Result<Pickle, TorchSaveError> {
        let rec = self
            .record("data.pkl")
            .ok_or_else(|| TorchSaveError::MissingRecord("data.pkl".into()))?;
        Ok(Pickle::parse(self.record_bytes(rec), allow)?)
    }

    /// Interprets `id` as a tensor (`_rebuild_tensor_v2/v3`), resolving its storage.
    ///
    /// # Errors
    /// [`TorchSaveError::Unexpected`] when `id` is not a tensor or its storage is
    /// missing or too small for the shape and strides.
    pub fn tensor(&self, p: &Pickle, id: Id) -> Result<TensorRef, TorchSaveError> {
        let bad = |why: String| TorchSaveError::Unexpected(why);
        let (callable, args, _) = p
            .as_object(id)
            .ok_or_else(|| bad(format!("expected a tensor, found {}", p.describe(id, 2))))?;
        let (callable, args) = if callable.name == "_rebuild_parameter" {
            // Parameters wrap a tensor: _rebuild_parameter(tensor, requires_grad, hooks).
            let inner = *args
                .first()
                .ok_or_else(|| bad("empty _rebuild_parameter".into()))?;
            let (c, a, _) = p
                .as_object(inner)
                .ok_or_else(|| bad("_rebuild_parameter without a tensor".into()))?;
            (c, a)
        } else {
            (callable, args)
        };
        let v3 = match callable.name.as_str() {
            "_rebuild_tensor_v2" => false,
            "_rebuild_tensor_v3" => true,
            other => return Err(bad(format!("expected _rebuild_tensor_v2, found {other}"))),
        };
        if args.len() < 4 {
            return Err(bad("tensor rebuild call has too few arguments".into()));
        }
        let Node::PersistentId(pid) = p.node(args[0]) else {
            return Err(bad("tensor storage is not a persistent id".into()));
        };
        let pid = p
            .as_seq(*pid)
            .ok_or_else(|| bad("storage persistent id is not a tuple".into()))?;
        if pid.len() < 5 || p.as_str(pid[0]) != Some("storage") {
            return Err(bad(
                "storage persistent id is not ('storage', class, key, location, numel)".into(),
            ));
        }
        let Node::Global(class) = p.node(pid[1]) else {
            return Err(bad("storage class is not a global".into()));
        };
        let key = p
            .as_str(pid[2])
            .ok_or_else(|| bad("storage key is not a string".into()))?;
        let storage_numel = p
            .as_int(pid[4])
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| bad("storage size is not a non-negative integer".into()))?;
        let dtype = if v3 {
            let dt = args
                .get(6)
                .ok_or_else(|| bad("_rebuild_tensor_v3 without dtype".into()))?;
            match p.node(*dt) {
                Node::Global(g) if g.module == "torch" => DType::from_torch_name(&g.name)
                    .ok_or_else(|| bad(format!("unsupported dtype torch.{}", g.name)))?,
                _ => return Err(bad("_rebuild_tensor_v3 dtype is not torch.<dtype>".into())),
            }
        } else {
            DType::from_torch_storage_class(&class.name)
                .ok_or_else(|| bad(format!("unsupported storage class {class}")))?
        };
        let storage_offset = p
            .as_int(args[1])
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| bad("storage offset is not a non-negative integer".into()))?;
        let shape = p
            .as_dims(args[2])
            .ok_or_else(|| bad("tensor size is not a tuple of ints".into()))?;
        let stride = p
            .as_dims(args[3])
            .ok_or_else(|| bad("tensor stride is not a tuple of ints".into()))?;
        if shape.len() != stride.len() {
            return Err(bad("tensor size and stride differ in rank".into()));
        }
        let storage = self
            .record(&format!("data/{key}"))
            .ok_or_else(|| TorchSaveError::MissingRecord(format!("{}data/{key}", self.prefix)))?
            .clone();
        // Storage numel counts elements for typed storages and bytes for untyped ones.
        let es = dtype.size() as u64;
        let storage_bytes = if v3 {
            storage_numel
        } else {
            storage_numel.saturating_mul(es)
        };
        if storage_bytes > storage.size {
            return Err(bad(format!(
                "storage data/{key} claims {storage_bytes} bytes but the record holds {}",
                storage.size
            )));
        }
        // The highest element the view touches must lie inside the record.
        let numel: u64 = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad("tensor size overflows".into()))?;
        if numel > 0 {
            let last = shape
                .iter()
                .zip(&stride)
                .try_fold(storage_offset, |acc, (&d, &s)| {
                    (d - 1).checked_mul(s).and_then(|x| acc.checked_add(x))
                })
                .ok_or_else(|| bad("tensor extent overflows".into()))?;
            let end = last
                .checked_add(1)
                .and_then(|e| e.checked_mul(es))
                .ok_or_else(|| bad("tensor extent overflows".into()))?;
            if end > storage.size {
                return Err(bad(format!(
                    "tensor of shape {shape:?} needs {end} bytes of storage data/{key}, which holds {}",
                    storage.size
                )));
            }
        }
        Ok(TensorRef {
            dtype,
            shape,
            stride,
            storage_offset,
            storage,
        })
    }
}

/// The records of a one-tensor archive, with the payload deferred: what a `.distcp`
/// tensor item holds. The payload is the tensor's contiguous little-endian elements.
pub fn tensor_archive_records(
    dtype: DType,
    shape: &[u64],
    payload_len: u64,
) -> Vec<(&'static str, RecordBody)> {
    vec![
        (
            "archive/data.pkl",
            RecordBody::Bytes(tensor_pickle(dtype, shape)),
        ),
        ("archive/byteorder", RecordBody::Bytes(b"little".to_vec())),
        ("archive/data/0", RecordBody::Deferred(payload_len)),
        ("archive/version", RecordBody::Bytes(b"3\n".to_vec())),
    ]
}

/// Row-major strides for `shape`.
pub fn contiguous_strides(shape: &[u64]) -> Vec<u64> {
    let mut strides = vec![1u64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    strides
}

/// A `torch.save`d tensor (a `_rebuild_tensor_v2` call) over storage key `"0"`.
pub fn tensor_py(dtype: DType, shape: &[u64], storage_key: &str) -> Py {
    let numel: u64 = shape.iter().product();
    let dims = |v: &[u64]| Py::Tuple(v.iter().map(|&d| Py::Int(d as i64)).collect());
    let hooks = Py::reduce(Py::global("collections", "OrderedDict"), vec![]);
    match dtype.torch_storage_class() {
        Some(class) => {
            let pid = Py::Tuple(vec![
                Py::str("storage"),
                Py::global("torch", class),
                Py::str(storage_key),
                Py::str("cpu"),
                Py::Int(numel as i64),
            ]);
            Py::reduce(
                Py::global("torch._utils", "_rebuild_tensor_v2"),
                vec![
                    Py::PersId(Box::new(pid)),
                    Py::Int(0),
                    dims(shape),
                    dims(&contiguous_strides(shape)),
                    Py::Bool(false),
                    hooks,
                ],
            )
        }
        None => {
            // Newer dtypes have no typed storage: untyped storage sized in bytes.
            let pid = Py::Tuple(vec![
                Py::str("storage"),
                Py::global("torch.storage", "UntypedStorage"),
                Py::str(storage_key),
                Py::str("cpu"),
                Py::Int((numel * dtype.size() as u64) as i64),
            ]);
            Py::reduce(
                Py::global("torch._utils", "_rebuild_tensor_v3"),
                vec![
                    Py::PersId(Box::new(pid)),
                    Py::Int(0),
                    dims(shape),
                    dims(&contiguous_strides(shape)),
                    Py::Bool(false),
                    hooks,
                    Py::global("torch", dtype.torch_name()),
                ],
            )
        }
    }
}

/// `data.pkl` of a one-tensor archive.
pub fn tensor_pickle(dtype: DType, shape: &[u64]) -> Vec<u8> {
    write_pickle(&tensor_py(dtype, shape, "0"))
}

/// `torch.save(value)` for a value whose tensors are given as `(key, bytes)` storages
/// referenced by `tensor_py(.., key)` inside `value`.
pub fn save(value: &Py, storages: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut records: Vec<(String, Vec<u8>)> = vec![
        ("archive/data.pkl".into(), write_pickle(value)),
        ("archive/byteorder".into(), b"little".to_vec()),
    ];
    for (key, bytes) in storages {
        records.push((format!("archive/data/{key}"), bytes.clone()));
    }
    records.push(("archive/version".into(), b"3\n".to_vec()));
    let refs: Vec<(&str, Vec<u8>)> = records
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    torch_zip::write_archive(&refs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_archive_round_trip() {
        for dtype in [DType::BF16, DType::F32, DType::F8E4M3, DType::I64] {
            let shape = [2u64, 3];
            let payload: Vec<u8> = (0..6 * dtype.size()).map(|i| i as u8).collect();
            let layout = torch_zip::layout_archive(
                &tensor_archive_records(dtype, &shape, payload.len() as u64),
                crc32fast::hash(&payload),
            );
            let mut archive = layout.prefix.clone();
            archive.extend_from_slice(&payload);
            archive.extend_from_slice(&layout.suffix);
            let a = Archive::open(&archive).unwrap();
            let p = a.pickle(&tensor_allow_list()).unwrap();
            let t = a.tensor(&p, p.root()).unwrap();
            assert_eq!(t.dtype, dtype);
            assert_eq!(t.shape, shape);
            let (off, len) = t.contiguous_range().unwrap();
            assert_eq!(&archive[off as usize..(off + len) as usize], &payload[..]);
        }
    }

    #[test]
    fn storage_smaller_than_view_is_refused() {
        // A pickle claiming shape [4, 4] over a 6-element storage.
        let value = tensor_py(DType::F32, &[4, 4], "0");
        let archive = save(&value, &[("0".into(), vec![0u8; 24])]);
        let a = Archive::open(&archive).unwrap();
        let p = a.pickle(&tensor_allow_list()).unwrap();
        let err = a.tensor(&p, p.root()).unwrap_err();
        assert!(err.to_string().contains("claims 64 bytes"), "{err}");
    }

    #[test]
    fn strides() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<u64>::new());
    }
}
