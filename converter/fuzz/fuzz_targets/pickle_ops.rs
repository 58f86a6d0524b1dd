#![no_main]
//! Structure-aware pickle: a sequence of well-formed opcodes (globals drawn from
//! the allow-lists and from what attackers use), rendered to a pickle stream and
//! fed to the pickle machine, and as `data.pkl` of a torch archive to the tensor
//! reader. Feeds `ckpt_convert::fuzz::{pickle, torch_save}`.

use arbitrary::Arbitrary;

#[derive(Arbitrary, Debug)]
enum Name {
    RebuildV2,
    RebuildV3,
    RebuildParameter,
    Storage(u8),
    Size,
    OrderedDict,
    Metadata(u8),
    BytesIo,
    CodecsEncode,
    OsSystem,
    Eval,
    Custom(String, String),
}

impl Name {
    fn pair(&self) -> (String, String) {
        let s = |m: &str, n: &str| (m.to_owned(), n.to_owned());
        match self {
            Name::RebuildV2 => s("torch._utils", "_rebuild_tensor_v2"),
            Name::RebuildV3 => s("torch._utils", "_rebuild_tensor_v3"),
            Name::RebuildParameter => s("torch._utils", "_rebuild_parameter"),
            Name::Storage(i) => {
                let c = [
                    "BFloat16Storage",
                    "FloatStorage",
                    "HalfStorage",
                    "LongStorage",
                    "ByteStorage",
                    "BoolStorage",
                    "UntypedStorage",
                ];
                s("torch", c[*i as usize % c.len()])
            }
            Name::Size => s("torch", "Size"),
            Name::OrderedDict => s("collections", "OrderedDict"),
            Name::Metadata(i) => {
                let c = [
                    "Metadata",
                    "TensorStorageMetadata",
                    "BytesStorageMetadata",
                    "ChunkStorageMetadata",
                    "TensorProperties",
                    "MetadataIndex",
                ];
                s(
                    "torch.distributed.checkpoint.metadata",
                    c[*i as usize % c.len()],
                )
            }
            Name::BytesIo => s("_io", "BytesIO"),
            Name::CodecsEncode => s("_codecs", "encode"),
            Name::OsSystem => s("posix", "system"),
            Name::Eval => s("builtins", "eval"),
            Name::Custom(m, n) => (m.clone(), n.clone()),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Proto(u8),
    Frame(u16),
    Mark,
    Stop,
    Pop,
    PopMark,
    Dup,
    None,
    True,
    False,
    BinInt(i32),
    BinInt1(u8),
    BinInt2(u16),
    Long1(Vec<u8>),
    BinFloat(f64),
    Unicode(String),
    ShortBytes(Vec<u8>),
    EmptyTuple,
    Tuple,
    Tuple1,
    Tuple2,
    Tuple3,
    EmptyList,
    Append,
    Appends,
    List,
    EmptyDict,
    SetItem,
    SetItems,
    Dict,
    EmptySet,
    AddItems,
    FrozenSet,
    Global(Name),
    StackGlobal,
    Reduce,
    Build,
    NewObj,
    NewObjEx,
    BinPersId,
    BinPut(u8),
    BinGet(u8),
    LongBinPut(u32),
    LongBinGet(u32),
    Memoize,
    Raw(u8),
}

fn render(ops: &[Op]) -> Vec<u8> {
    let mut o = Vec::new();
    for op in ops {
        match op {
            Op::Proto(v) => o.extend([0x80, *v % 7]),
            Op::Frame(n) => {
                o.push(0x95);
                o.extend(u64::from(*n).to_le_bytes());
            }
            Op::Mark => o.push(b'('),
            Op::Stop => o.push(b'.'),
            Op::Pop => o.push(b'0'),
            Op::PopMark => o.push(b'1'),
            Op::Dup => o.push(b'2'),
            Op::None => o.push(b'N'),
            Op::True => o.push(0x88),
            Op::False => o.push(0x89),
            Op::BinInt(v) => {
                o.push(b'J');
                o.extend(v.to_le_bytes());
            }
            Op::BinInt1(v) => o.extend([b'K', *v]),
            Op::BinInt2(v) => {
                o.push(b'M');
                o.extend(v.to_le_bytes());
            }
            Op::Long1(b) => {
                let b = &b[..b.len().min(255)];
                o.extend([0x8a, b.len() as u8]);
                o.extend(b);
            }
            Op::BinFloat(v) => {
                o.push(b'G');
                o.extend(v.to_be_bytes());
            }
            Op::Unicode(s) => {
                o.push(b'X');
                o.extend((s.len() as u32).to_le_bytes());
                o.extend(s.as_bytes());
            }
            Op::ShortBytes(b) => {
                let b = &b[..b.len().min(255)];
                o.extend([b'C', b.len() as u8]);
                o.extend(b);
            }
            Op::EmptyTuple => o.push(b')'),
            Op::Tuple => o.push(b't'),
            Op::Tuple1 => o.push(0x85),
            Op::Tuple2 => o.push(0x86),
            Op::Tuple3 => o.push(0x87),
            Op::EmptyList => o.push(b']'),
            Op::Append => o.push(b'a'),
            Op::Appends => o.push(b'e'),
            Op::List => o.push(b'l'),
            Op::EmptyDict => o.push(b'}'),
            Op::SetItem => o.push(b's'),
            Op::SetItems => o.push(b'u'),
            Op::Dict => o.push(b'd'),
            Op::EmptySet => o.push(0x8f),
            Op::AddItems => o.push(0x90),
            Op::FrozenSet => o.push(0x91),
            Op::Global(n) => {
                let (m, n) = n.pair();
                o.push(b'c');
                o.extend(m.as_bytes());
                o.push(b'\n');
                o.extend(n.as_bytes());
                o.push(b'\n');
            }
            Op::StackGlobal => o.push(0x93),
            Op::Reduce => o.push(b'R'),
            Op::Build => o.push(b'b'),
            Op::NewObj => o.push(0x81),
            Op::NewObjEx => o.push(0x92),
            Op::BinPersId => o.push(b'Q'),
            Op::BinPut(k) => o.extend([b'q', *k]),
            Op::BinGet(k) => o.extend([b'h', *k]),
            Op::LongBinPut(k) => {
                o.push(b'r');
                o.extend(k.to_le_bytes());
            }
            Op::LongBinGet(k) => {
                o.push(b'j');
                o.extend(k.to_le_bytes());
            }
            Op::Memoize => o.push(0x94),
            Op::Raw(b) => o.push(*b),
        }
    }
    o
}

libfuzzer_sys::fuzz_target!(|ops: Vec<Op>| {
    let pkl = render(&ops);
    ckpt_convert_fuzz::keep("pickle", &pkl);
    ckpt_convert::fuzz::pickle(&pkl);
    let archive = ckpt_convert::formats::torch_zip::write_archive(&[
        ("archive/data.pkl", pkl),
        ("archive/byteorder", b"little".to_vec()),
        ("archive/data/0", vec![0u8; 64]),
        ("archive/version", b"3\n".to_vec()),
    ]);
    ckpt_convert_fuzz::keep("torch_save", &archive);
    ckpt_convert::fuzz::torch_save(&archive);
});
