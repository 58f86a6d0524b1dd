//! A protocol-2 pickle emitter for the few object graphs we write (the DCP
//! `.metadata`, a tensor's `data.pkl`, `common.pt`).
//!
//! Protocol 2 with text `GLOBAL`s and no memo is what every torch version from 2.3
//! on reads (`docs/megatron-torch-dist.md#writing-the-metadata`); so we never emit newer opcodes.

/// A Python value to be pickled.
#[derive(Debug, Clone, PartialEq)]
pub enum Py {
    /// `None`.
    None,
    /// `True`/`False`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A `str`.
    Str(String),
    /// A tuple.
    Tuple(Vec<Py>),
    /// A list.
    List(Vec<Py>),
    /// A dict, in insertion order.
    Dict(Vec<(Py, Py)>),
    /// `module.name`.
    Global(String, String),
    /// `callable(*args)`, emitted as `REDUCE`.
    Reduce(Box<Py>, Vec<Py>),
    /// `cls.__new__(cls)` then `BUILD state` (how dataclasses pickle); `state` is
    /// omitted when `None`.
    NewObj(Box<Py>, Option<Box<Py>>),
    /// A persistent id (`BINPERSID`).
    PersId(Box<Py>),
}

impl Py {
    /// A `str`.
    pub fn str(s: impl Into<String>) -> Py {
        Py::Str(s.into())
    }

    /// A `module.name` global.
    pub fn global(module: &str, name: &str) -> Py {
        Py::Global(module.to_owned(), name.to_owned())
    }

    /// `callable(*args)`.
    pub fn reduce(callable: Py, args: Vec<Py>) -> Py {
        Py::Reduce(Box::new(callable), args)
    }

    /// A dataclass instance: `NEWOBJ` with no arguments, then `BUILD` with `state`.
    pub fn dataclass(module: &str, name: &str, state: Py) -> Py {
        Py::NewObj(Box::new(Py::global(module, name)), Some(Box::new(state)))
    }

    /// `torch.Size((d0, d1, ...))`.
    pub fn torch_size(dims: &[u64]) -> Py {
        Py::reduce(
            Py::global("torch", "Size"),
            vec![Py::Tuple(dims.iter().map(|&d| Py::Int(d as i64)).collect())],
        )
    }

    /// A dict with string keys.
    pub fn str_dict<'a>(items: impl IntoIterator<Item = (&'a str, Py)>) -> Py {
        Py::Dict(items.into_iter().map(|(k, v)| (Py::str(k), v)).collect())
    }
}

/// Pickles `value` with protocol 2.
pub fn to_bytes(value: &Py) -> Vec<u8> {
    let mut out = vec![0x80, 0x02];
    emit(value, &mut out);
    out.push(b'.');
    out
}

fn emit(value: &Py, out: &mut Vec<u8>) {
    match value {
        Py::None => out.push(b'N'),
        Py::Bool(true) => out.push(0x88),
        Py::Bool(false) => out.push(0x89),
        Py::Int(v) => emit_int(*v, out),
        Py::Float(v) => {
            out.push(b'G');
            out.extend_from_slice(&v.to_be_bytes());
        }
        Py::Str(s) => {
            out.push(b'X');
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        // MARK..TUPLE for every size, as the verified recipe does (TUPLE1-3 would
        // also load; this keeps our bytes equal to the recipe's golden vector).
        Py::Tuple(items) if items.is_empty() => out.push(b')'),
        Py::Tuple(items) => {
            out.push(b'(');
            for item in items {
                emit(item, out);
            }
            out.push(b't');
        }
        Py::List(items) => {
            out.push(b']');
            if !items.is_empty() {
                out.push(b'(');
                for item in items {
                    emit(item, out);
                }
                out.push(b'e');
            }
        }
        Py::Dict(items) => {
            out.push(b'}');
            if !items.is_empty() {
                out.push(b'(');
                for (k, v) in items {
                    emit(k, out);
                    emit(v, out);
                }
                out.push(b'u');
            }
        }
        Py::Global(module, name) => {
            out.push(b'c');
            out.extend_from_slice(module.as_bytes());
            out.push(b'\n');
            out.extend_from_slice(name.as_bytes());
            out.push(b'\n');
        }
        Py::Reduce(callable, args) => {
            emit(callable, out);
            emit(&Py::Tuple(args.clone()), out);
            out.push(b'R');
        }
        Py::NewObj(class, state) => {
            emit(class, out);
            out.push(b')');
            out.push(0x81);
            if let Some(state) = state {
                emit(state, out);
                out.push(b'b');
            }
        }
        Py::PersId(pid) => {
            emit(pid, out);
            out.push(b'Q');
        }
    }
}

fn emit_int(v: i64, out: &mut Vec<u8>) {
    if (0..=0xff).contains(&v) {
        out.push(b'K');
        out.push(v as u8);
    } else if (0..=0xffff).contains(&v) {
        out.push(b'M');
        out.extend_from_slice(&(v as u16).to_le_bytes());
    } else if i64::from(i32::MIN) <= v && v <= i64::from(i32::MAX) {
        out.push(b'J');
        out.extend_from_slice(&(v as i32).to_le_bytes());
    } else {
        // LONG1: minimal little-endian two's complement (offsets past 2 GiB need it).
        let bytes = v.to_le_bytes();
        let mut n = 8;
        while n > 1 {
            let top = bytes[n - 1];
            let next_sign = bytes[n - 2] & 0x80;
            if (top == 0 && next_sign == 0) || (top == 0xff && next_sign != 0) {
                n -= 1;
            } else {
                break;
            }
        }
        out.push(0x8a);
        out.push(n as u8);
        out.extend_from_slice(&bytes[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long1_is_minimal_twos_complement() {
        let mut out = Vec::new();
        emit_int(1 << 31, &mut out);
        // 2^31 needs 5 bytes: 00 00 00 80 00.
        assert_eq!(out, vec![0x8a, 5, 0, 0, 0, 0x80, 0]);
        out.clear();
        emit_int(-(1 << 40), &mut out);
        assert_eq!(out, vec![0x8a, 6, 0, 0, 0, 0, 0, 0xff]);
    }
}
