//! The pickle subset that checkpoints use, read without executing anything.
//!
//! Threat model: a `.metadata`, `data.pkl` or `common.pt` may come from anyone. The
//! reader is a stack machine that builds an inert object graph in an arena; a
//! `GLOBAL` is accepted only if the caller's allow-list names it, and it is never
//! called: `REDUCE`, `NEWOBJ` and `BUILD` only record "this class, these arguments,
//! this state". Every length read from the file is checked against the bytes left
//! before anything is allocated, and the arena cannot grow past one node per input
//! byte, so a file cannot make us allocate more than a small multiple of its size.
//!
//! Memo references share arena nodes, exactly like Python's object identity, so a
//! container memoized before it is filled (what CPython emits) is seen filled.

mod writer;

pub use writer::{Py, to_bytes as write_pickle};

use std::collections::HashMap;

/// Index of a node in a [`Pickle`]'s arena.
pub type Id = usize;

/// A `module.name` reference from a pickle.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Global {
    /// The module (`torch.distributed.checkpoint.metadata`).
    pub module: String,
    /// The qualified name inside the module (`TensorStorageMetadata`).
    pub name: String,
}

impl std::fmt::Display for Global {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.module, self.name)
    }
}

/// One value of the object graph.
#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// `None`.
    None,
    /// `True`/`False`.
    Bool(bool),
    /// An integer that fits in 64 bits (larger ones are refused).
    Int(i64),
    /// A float.
    Float(f64),
    /// A `str`.
    Str(String),
    /// `bytes` or `bytearray` (or a protocol-0/1 `str`).
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Id>),
    /// A list.
    List(Vec<Id>),
    /// A dict; keys may be any value, so it is a list of pairs in insertion order.
    Dict(Vec<(Id, Id)>),
    /// A set or frozenset.
    Set(Vec<Id>),
    /// A reference to an allow-listed class or function.
    Global(Global),
    /// `callable(*args)` recorded, not performed: the result of `REDUCE`, `NEWOBJ`,
    /// `OBJ` or `INST`. `state` is what `BUILD` later attached, if anything.
    Object {
        /// The class or function.
        callable: Global,
        /// The argument tuple.
        args: Vec<Id>,
        /// Keyword arguments (`NEWOBJ_EX`).
        kwargs: Vec<(Id, Id)>,
        /// The `BUILD` state.
        state: Option<Id>,
    },
    /// A persistent id (`BINPERSID`): in `torch.save` archives, a storage reference.
    PersistentId(Id),
}

/// Why a pickle was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PickleError {
    /// The input ended inside an opcode.
    #[error("pickle truncated at byte {at}: {what} needs {needed} more bytes, {left} left")]
    Truncated {
        /// Offset of the opcode.
        at: usize,
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes left.
        left: usize,
    },
    /// A global not on the caller's allow-list.
    #[error("pickle names the global {0}, which is not on the allow-list; refusing to load it")]
    ForbiddenGlobal(String),
    /// An opcode the reader does not support.
    #[error("pickle opcode 0x{opcode:02x} at byte {at} is not supported")]
    UnsupportedOpcode {
        /// The opcode.
        opcode: u8,
        /// Its offset.
        at: usize,
    },
    /// Structurally invalid input (stack underflow, bad memo key, ...).
    #[error("malformed pickle at byte {at}: {why}")]
    Malformed {
        /// Offset of the opcode.
        at: usize,
        /// What was wrong.
        why: String,
    },
    /// Persistent ids appear where none are expected.
    #[error("pickle at byte {at} uses a persistent id, which this file type must not contain")]
    UnexpectedPersistentId {
        /// Offset of the opcode.
        at: usize,
    },
    /// The graph grew past its budget.
    #[error("pickle builds more than {0} objects; refusing")]
    TooLarge(usize),
}

/// Which globals a reader accepts, and whether persistent ids may appear.
#[derive(Debug, Clone)]
pub struct AllowList {
    exact: Vec<(&'static str, &'static str)>,
    modules: Vec<&'static str>,
    persistent_ids: bool,
}

impl AllowList {
    /// Accepts exactly these `(module, name)` pairs.
    pub fn new(exact: &[(&'static str, &'static str)]) -> Self {
        AllowList {
            exact: exact.to_vec(),
            modules: Vec::new(),
            persistent_ids: false,
        }
    }

    /// Also accepts every name in these modules (for inert data classes only).
    pub fn with_modules(mut self, modules: &[&'static str]) -> Self {
        self.modules.extend_from_slice(modules);
        self
    }

    /// Also accepts the given pairs.
    pub fn with(mut self, more: &[(&'static str, &'static str)]) -> Self {
        self.exact.extend_from_slice(more);
        self
    }

    /// Allows `BINPERSID`/`PERSID` (storage references in `torch.save` archives).
    pub fn with_persistent_ids(mut self) -> Self {
        self.persistent_ids = true;
        self
    }

    fn allows(&self, module: &str, name: &str) -> bool {
        self.exact.iter().any(|(m, n)| *m == module && *n == name) || self.modules.contains(&module)
    }
}

/// A parsed pickle: an arena of nodes and the root.
#[derive(Debug, Clone)]
pub struct Pickle {
    nodes: Vec<Node>,
    root: Id,
}

impl Pickle {
    /// Runs the pickle machine over `data`, accepting only the globals in `allow`.
    ///
    /// # Errors
    /// Any [`PickleError`]: truncation, a forbidden global, an unsupported opcode, a
    /// malformed stream, or a graph larger than the input could honestly encode.
    pub fn parse(data: &[u8], allow: &AllowList) -> Result<Pickle, PickleError> {
        Machine::new(data, allow).run()
    }

    /// The root value.
    pub fn root(&self) -> Id {
        self.root
    }

    /// Every node built, reachable from the root or not.
    pub fn ids(&self) -> std::ops::Range<Id> {
        0..self.nodes.len()
    }

    /// The node behind an id.
    pub fn node(&self, id: Id) -> &Node {
        &self.nodes[id]
    }

    /// The string behind `id`, if it is one.
    pub fn as_str(&self, id: Id) -> Option<&str> {
        match self.node(id) {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The integer behind `id`, if it is one (`bool` counts, as in Python).
    pub fn as_int(&self, id: Id) -> Option<i64> {
        match self.node(id) {
            Node::Int(v) => Some(*v),
            Node::Bool(b) => Some(i64::from(*b)),
            _ => None,
        }
    }

    /// The items of a tuple or list.
    pub fn as_seq(&self, id: Id) -> Option<&[Id]> {
        match self.node(id) {
            Node::Tuple(v) | Node::List(v) => Some(v),
            _ => None,
        }
    }

    /// The pairs of a dict.
    pub fn as_dict(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.node(id) {
            Node::Dict(v) => Some(v),
            _ => None,
        }
    }

    /// Looks up a string key in a dict.
    pub fn dict_get(&self, dict: Id, key: &str) -> Option<Id> {
        self.as_dict(dict)?
            .iter()
            .find(|(k, _)| self.as_str(*k) == Some(key))
            .map(|(_, v)| *v)
    }

    /// If `id` is an object built from `callable`, returns the callable, args and state.
    pub fn as_object(&self, id: Id) -> Option<(&Global, &[Id], Option<Id>)> {
        match self.node(id) {
            Node::Object {
                callable,
                args,
                state,
                ..
            } => Some((callable, args, *state)),
            _ => None,
        }
    }

    /// Reads a `torch.Size((d0, d1, ...))` (or a plain tuple of ints) as dimensions.
    pub fn as_dims(&self, id: Id) -> Option<Vec<u64>> {
        let tuple = match self.as_object(id) {
            Some((g, args, _)) if g.module == "torch" && g.name == "Size" => {
                if args.len() != 1 {
                    return None;
                }
                args[0]
            }
            Some(_) => return None,
            None => id,
        };
        self.as_seq(tuple)?
            .iter()
            .map(|&d| self.as_int(d).and_then(|v| u64::try_from(v).ok()))
            .collect()
    }

    /// A short rendering of a value, for `inspect` and error messages.
    pub fn describe(&self, id: Id, depth: usize) -> String {
        if depth == 0 {
            return "…".into();
        }
        match self.node(id) {
            Node::None => "None".into(),
            Node::Bool(b) => if *b { "True" } else { "False" }.into(),
            Node::Int(v) => v.to_string(),
            Node::Float(v) => v.to_string(),
            Node::Str(s) => format!("{s:?}"),
            Node::Bytes(b) => format!("<{} bytes>", b.len()),
            Node::Tuple(v) | Node::List(v) | Node::Set(v) => {
                let items: Vec<String> = v
                    .iter()
                    .take(8)
                    .map(|&i| self.describe(i, depth - 1))
                    .collect();
                let more = if v.len() > 8 { ", …" } else { "" };
                format!("[{}{more}]", items.join(", "))
            }
            Node::Dict(v) => {
                let items: Vec<String> = v
                    .iter()
                    .take(8)
                    .map(|&(k, val)| {
                        format!(
                            "{}: {}",
                            self.describe(k, depth - 1),
                            self.describe(val, depth - 1)
                        )
                    })
                    .collect();
                let more = if v.len() > 8 { ", …" } else { "" };
                format!("{{{}{more}}}", items.join(", "))
            }
            Node::Global(g) => g.to_string(),
            Node::Object { callable, .. } => format!("<{callable}>"),
            Node::PersistentId(_) => "<persistent id>".into(),
        }
    }
}

/// Opcodes (pickletools names).
mod op {
    pub const MARK: u8 = b'(';
    pub const STOP: u8 = b'.';
    pub const POP: u8 = b'0';
    pub const POP_MARK: u8 = b'1';
    pub const DUP: u8 = b'2';
    pub const FLOAT: u8 = b'F';
    pub const INT: u8 = b'I';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const PERSID: u8 = b'P';
    pub const BINPERSID: u8 = b'Q';
    pub const REDUCE: u8 = b'R';
    pub const STRING: u8 = b'S';
    pub const BINSTRING: u8 = b'T';
    pub const SHORT_BINSTRING: u8 = b'U';
    pub const UNICODE: u8 = b'V';
    pub const BINUNICODE: u8 = b'X';
    pub const APPEND: u8 = b'a';
    pub const BUILD: u8 = b'b';
    pub const GLOBAL: u8 = b'c';
    pub const DICT: u8 = b'd';
    pub const EMPTY_DICT: u8 = b'}';
    pub const APPENDS: u8 = b'e';
    pub const GET: u8 = b'g';
    pub const BINGET: u8 = b'h';
    pub const INST: u8 = b'i';
    pub const LONG_BINGET: u8 = b'j';
    pub const LIST: u8 = b'l';
    pub const EMPTY_LIST: u8 = b']';
    pub const OBJ: u8 = b'o';
    pub const PUT: u8 = b'p';
    pub const BINPUT: u8 = b'q';
    pub const LONG_BINPUT: u8 = b'r';
    pub const SETITEM: u8 = b's';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const SETITEMS: u8 = b'u';
    pub const BINFLOAT: u8 = b'G';
    pub const PROTO: u8 = 0x80;
    pub const NEWOBJ: u8 = 0x81;
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const LONG1: u8 = 0x8a;
    pub const LONG4: u8 = 0x8b;
    pub const BINBYTES: u8 = b'B';
    pub const SHORT_BINBYTES: u8 = b'C';
    pub const SHORT_BINUNICODE: u8 = 0x8c;
    pub const BINUNICODE8: u8 = 0x8d;
    pub const BINBYTES8: u8 = 0x8e;
    pub const EMPTY_SET: u8 = 0x8f;
    pub const ADDITEMS: u8 = 0x90;
    pub const FROZENSET: u8 = 0x91;
    pub const NEWOBJ_EX: u8 = 0x92;
    pub const STACK_GLOBAL: u8 = 0x93;
    pub const MEMOIZE: u8 = 0x94;
    pub const FRAME: u8 = 0x95;
    pub const BYTEARRAY8: u8 = 0x96;
}

/// Hard cap on arena nodes, whatever the input size.
const MAX_NODES: usize = 50_000_000;

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    op_at: usize,
    allow: &'a AllowList,
    nodes: Vec<Node>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8], allow: &'a AllowList) -> Self {
        Machine {
            data,
            pos: 0,
            op_at: 0,
            allow,
            nodes: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn malformed(&self, why: impl Into<String>) -> PickleError {
        PickleError::Malformed {
            at: self.op_at,
            why: why.into(),
        }
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], PickleError> {
        let left = self.data.len() - self.pos;
        if n > left as u64 {
            return Err(PickleError::Truncated {
                at: self.op_at,
                what,
                needed: n,
                left,
            });
        }
        let n = n as usize;
        let out = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, PickleError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, PickleError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, PickleError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, PickleError> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn line(&mut self, what: &'static str) -> Result<&'a [u8], PickleError> {
        let rest = &self.data[self.pos..];
        match rest.iter().position(|&b| b == b'\n') {
            Some(n) => {
                self.pos += n + 1;
                Ok(&rest[..n])
            }
            None => Err(PickleError::Truncated {
                at: self.op_at,
                what,
                needed: 1,
                left: 0,
            }),
        }
    }

    fn push_node(&mut self, node: Node) -> Result<Id, PickleError> {
        // Each opcode creates at most one node and takes at least one byte, so the
        // arena is bounded by the input; the cap guards the absolute size.
        if self.nodes.len() >= MAX_NODES {
            return Err(PickleError::TooLarge(MAX_NODES));
        }
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    fn push(&mut self, node: Node) -> Result<(), PickleError> {
        let id = self.push_node(node)?;
        self.stack.push(id);
        Ok(())
    }

    fn pop(&mut self) -> Result<Id, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.malformed("stack underflow"));
        }
        Ok(self.stack.pop().expect("checked above"))
    }

    fn top(&self) -> Result<Id, PickleError> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.malformed("stack underflow"));
        }
        Ok(*self.stack.last().expect("checked above"))
    }

    fn pop_mark(&mut self) -> Result<Vec<Id>, PickleError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.malformed("no MARK on the stack"))?;
        Ok(self.stack.split_off(mark))
    }

    fn str_node(&mut self, bytes: &[u8]) -> Result<(), PickleError> {
        let s = std::str::from_utf8(bytes)
            .map_err(|_| self.malformed("string is not valid UTF-8"))?
            .to_owned();
        self.push(Node::Str(s))
    }

    fn global(&mut self, module: &str, name: &str) -> Result<(), PickleError> {
        if !self.allow.allows(module, name) {
            return Err(PickleError::ForbiddenGlobal(format!("{module}.{name}")));
        }
        self.push(Node::Global(Global {
            module: module.to_owned(),
            name: name.to_owned(),
        }))
    }

    fn callable_of(&self, id: Id) -> Result<Global, PickleError> {
        match &self.nodes[id] {
            Node::Global(g) => Ok(g.clone()),
            other => Err(self.malformed(format!("expected a class or function, found {other:?}"))),
        }
    }

    fn tuple_items(&self, id: Id) -> Result<Vec<Id>, PickleError> {
        match &self.nodes[id] {
            Node::Tuple(v) => Ok(v.clone()),
            _ => Err(self.malformed("expected an argument tuple")),
        }
    }

    fn memo_put(&mut self, key: u64) -> Result<(), PickleError> {
        let top = self.top()?;
        self.memo.insert(key, top);
        Ok(())
    }

    fn memo_get(&mut self, key: u64) -> Result<(), PickleError> {
        let id = *self
            .memo
            .get(&key)
            .ok_or_else(|| self.malformed(format!("memo key {key} was never stored")))?;
        self.stack.push(id);
        Ok(())
    }

    fn int_from_le(&self, bytes: &[u8]) -> Result<i64, PickleError> {
        if bytes.is_empty() {
            return Ok(0);
        }
        if bytes.len() > 8 {
            // Sign-extension bytes beyond 8 are allowed if they carry no information.
            let (low, high) = bytes.split_at(8);
            let negative = low[7] & 0x80 != 0;
            let fill = if negative { 0xff } else { 0 };
            if high.iter().any(|&b| b != fill) {
                return Err(self.malformed("integer does not fit in 64 bits"));
            }
            return self.int_from_le(low);
        }
        let negative = bytes[bytes.len() - 1] & 0x80 != 0;
        let mut buf = if negative { [0xffu8; 8] } else { [0u8; 8] };
        buf[..bytes.len()].copy_from_slice(bytes);
        Ok(i64::from_le_bytes(buf))
    }

    fn run(mut self) -> Result<Pickle, PickleError> {
        loop {
            self.op_at = self.pos;
            let opcode = self.u8("opcode")?;
            match opcode {
                op::PROTO => {
                    let v = self.u8("protocol")?;
                    if v > 5 {
                        return Err(self.malformed(format!("unknown protocol {v}")));
                    }
                }
                op::FRAME => {
                    // Frames only group opcodes; the size is checked, not used.
                    let n = self.u64("frame size")?;
                    if n > (self.data.len() - self.pos) as u64 {
                        return Err(PickleError::Truncated {
                            at: self.op_at,
                            what: "frame",
                            needed: n,
                            left: self.data.len() - self.pos,
                        });
                    }
                }
                op::STOP => {
                    let root = self.pop()?;
                    return Ok(Pickle {
                        nodes: self.nodes,
                        root,
                    });
                }
                op::MARK => self.marks.push(self.stack.len()),
                op::POP => {
                    if self.stack.len() > self.marks.last().copied().unwrap_or(0) {
                        self.stack.pop();
                    } else if self.marks.pop().is_none() {
                        return Err(self.malformed("stack underflow"));
                    }
                }
                op::POP_MARK => {
                    self.pop_mark()?;
                }
                op::DUP => {
                    let top = self.top()?;
                    self.stack.push(top);
                }
                op::NONE => self.push(Node::None)?,
                op::NEWTRUE => self.push(Node::Bool(true))?,
                op::NEWFALSE => self.push(Node::Bool(false))?,
                op::BININT => {
                    let v = self.u32("BININT")? as i32;
                    self.push(Node::Int(i64::from(v)))?
                }
                op::BININT1 => {
                    let v = self.u8("BININT1")?;
                    self.push(Node::Int(i64::from(v)))?
                }
                op::BININT2 => {
                    let v = self.u16("BININT2")?;
                    self.push(Node::Int(i64::from(v)))?
                }
                op::INT | op::LONG => {
                    let line = self.line("INT")?;
                    let text = std::str::from_utf8(line)
                        .map_err(|_| self.malformed("INT is not ASCII"))?
                        .trim_end_matches('L');
                    let node = match text {
                        "00" => Node::Bool(false),
                        "01" => Node::Bool(true),
                        t => Node::Int(
                            t.parse()
                                .map_err(|_| self.malformed(format!("bad INT {t:?}")))?,
                        ),
                    };
                    self.push(node)?
                }
                op::LONG1 => {
                    let n = self.u8("LONG1 length")?;
                    let bytes = self.take(u64::from(n), "LONG1")?;
                    let v = self.int_from_le(bytes)?;
                    self.push(Node::Int(v))?
                }
                op::LONG4 => {
                    let n = self.u32("LONG4 length")?;
                    let bytes = self.take(u64::from(n), "LONG4")?;
                    let v = self.int_from_le(bytes)?;
                    self.push(Node::Int(v))?
                }
                op::BINFLOAT => {
                    let b = self.take(8, "BINFLOAT")?;
                    let v = f64::from_be_bytes(b.try_into().expect("8 bytes"));
                    self.push(Node::Float(v))?
                }
                op::FLOAT => {
                    let line = self.line("FLOAT")?;
                    let v = std::str::from_utf8(line)
                        .ok()
                        .and_then(|t| t.parse().ok())
                        .ok_or_else(|| self.malformed("bad FLOAT"))?;
                    self.push(Node::Float(v))?
                }
                op::BINUNICODE => {
                    let n = self.u32("BINUNICODE length")?;
                    let b = self.take(u64::from(n), "BINUNICODE")?;
                    self.str_node(b)?
                }
                op::SHORT_BINUNICODE => {
                    let n = self.u8("SHORT_BINUNICODE length")?;
                    let b = self.take(u64::from(n), "SHORT_BINUNICODE")?;
                    self.str_node(b)?
                }
                op::BINUNICODE8 => {
                    let n = self.u64("BINUNICODE8 length")?;
                    let b = self.take(n, "BINUNICODE8")?;
                    self.str_node(b)?
                }
                op::UNICODE => {
                    let b = self.line("UNICODE")?;
                    self.str_node(b)?
                }
                op::BINSTRING => {
                    let n = self.u32("BINSTRING length")?;
                    let b = self.take(u64::from(n), "BINSTRING")?.to_vec();
                    self.push(Node::Bytes(b))?
                }
                op::SHORT_BINSTRING => {
                    let n = self.u8("SHORT_BINSTRING length")?;
                    let b = self.take(u64::from(n), "SHORT_BINSTRING")?.to_vec();
                    self.push(Node::Bytes(b))?
                }
                op::BINBYTES => {
                    let n = self.u32("BINBYTES length")?;
                    let b = self.take(u64::from(n), "BINBYTES")?.to_vec();
                    self.push(Node::Bytes(b))?
                }
                op::SHORT_BINBYTES => {
                    let n = self.u8("SHORT_BINBYTES length")?;
                    let b = self.take(u64::from(n), "SHORT_BINBYTES")?.to_vec();
                    self.push(Node::Bytes(b))?
                }
                op::BINBYTES8 | op::BYTEARRAY8 => {
                    let n = self.u64("BINBYTES8 length")?;
                    let b = self.take(n, "BINBYTES8")?.to_vec();
                    self.push(Node::Bytes(b))?
                }
                op::EMPTY_TUPLE => self.push(Node::Tuple(Vec::new()))?,
                op::TUPLE1 => {
                    let a = self.pop()?;
                    self.push(Node::Tuple(vec![a]))?
                }
                op::TUPLE2 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.push(Node::Tuple(vec![a, b]))?
                }
                op::TUPLE3 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.push(Node::Tuple(vec![a, b, c]))?
                }
                op::TUPLE => {
                    let items = self.pop_mark()?;
                    self.push(Node::Tuple(items))?
                }
                op::EMPTY_LIST => self.push(Node::List(Vec::new()))?,
                op::LIST => {
                    let items = self.pop_mark()?;
                    self.push(Node::List(items))?
                }
                op::APPEND => {
                    let item = self.pop()?;
                    let list = self.top()?;
                    match &mut self.nodes[list] {
                        Node::List(v) => v.push(item),
                        _ => return Err(self.malformed("APPEND to a non-list")),
                    }
                }
                op::APPENDS => {
                    let items = self.pop_mark()?;
                    let list = self.top()?;
                    match &mut self.nodes[list] {
                        Node::List(v) => v.extend(items),
                        _ => return Err(self.malformed("APPENDS to a non-list")),
                    }
                }
                op::EMPTY_DICT => self.push(Node::Dict(Vec::new()))?,
                op::DICT => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.malformed("DICT with an odd number of items"));
                    }
                    let pairs = items.chunks_exact(2).map(|p| (p[0], p[1])).collect();
                    self.push(Node::Dict(pairs))?
                }
                op::SETITEM => {
                    let value = self.pop()?;
                    let key = self.pop()?;
                    let dict = self.top()?;
                    self.dict_insert(dict, vec![(key, value)])?
                }
                op::SETITEMS => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.malformed("SETITEMS with an odd number of items"));
                    }
                    let dict = self.top()?;
                    let pairs = items.chunks_exact(2).map(|p| (p[0], p[1])).collect();
                    self.dict_insert(dict, pairs)?
                }
                op::EMPTY_SET => self.push(Node::Set(Vec::new()))?,
                op::ADDITEMS => {
                    let items = self.pop_mark()?;
                    let set = self.top()?;
                    match &mut self.nodes[set] {
                        Node::Set(v) => v.extend(items),
                        _ => return Err(self.malformed("ADDITEMS to a non-set")),
                    }
                }
                op::FROZENSET => {
                    let items = self.pop_mark()?;
                    self.push(Node::Set(items))?
                }
                op::GLOBAL => {
                    let module = self.line("GLOBAL module")?;
                    let name = self.line("GLOBAL name")?;
                    let module = std::str::from_utf8(module)
                        .map_err(|_| self.malformed("GLOBAL module is not UTF-8"))?;
                    let name = std::str::from_utf8(name)
                        .map_err(|_| self.malformed("GLOBAL name is not UTF-8"))?;
                    self.global(module, name)?
                }
                op::STACK_GLOBAL => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Node::Str(module), Node::Str(name)) =
                        (self.nodes[module].clone(), self.nodes[name].clone())
                    else {
                        return Err(self.malformed("STACK_GLOBAL needs two strings"));
                    };
                    self.global(&module, &name)?
                }
                op::INST => {
                    let module = self.line("INST module")?;
                    let name = self.line("INST name")?;
                    let module = String::from_utf8_lossy(module).into_owned();
                    let name = String::from_utf8_lossy(name).into_owned();
                    if !self.allow.allows(&module, &name) {
                        return Err(PickleError::ForbiddenGlobal(format!("{module}.{name}")));
                    }
                    let args = self.pop_mark()?;
                    self.push(Node::Object {
                        callable: Global { module, name },
                        args,
                        kwargs: Vec::new(),
                        state: None,
                    })?
                }
                op::OBJ => {
                    let mut items = self.pop_mark()?;
                    if items.is_empty() {
                        return Err(self.malformed("OBJ without a class"));
                    }
                    let class = items.remove(0);
                    let callable = self.callable_of(class)?;
                    self.push(Node::Object {
                        callable,
                        args: items,
                        kwargs: Vec::new(),
                        state: None,
                    })?
                }
                op::REDUCE | op::NEWOBJ => {
                    let args = self.pop()?;
                    let func = self.pop()?;
                    let callable = self.callable_of(func)?;
                    let args = self.tuple_items(args)?;
                    self.push(Node::Object {
                        callable,
                        args,
                        kwargs: Vec::new(),
                        state: None,
                    })?
                }
                op::NEWOBJ_EX => {
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let class = self.pop()?;
                    let callable = self.callable_of(class)?;
                    let args = self.tuple_items(args)?;
                    let kwargs = match &self.nodes[kwargs] {
                        Node::Dict(v) => v.clone(),
                        _ => return Err(self.malformed("NEWOBJ_EX kwargs is not a dict")),
                    };
                    self.push(Node::Object {
                        callable,
                        args,
                        kwargs,
                        state: None,
                    })?
                }
                op::BUILD => {
                    let state = self.pop()?;
                    let obj = self.top()?;
                    match &mut self.nodes[obj] {
                        Node::Object { state: slot, .. } => *slot = Some(state),
                        _ => return Err(self.malformed("BUILD on something that is not an object")),
                    }
                }
                op::BINPERSID | op::PERSID => {
                    if !self.allow.persistent_ids {
                        return Err(PickleError::UnexpectedPersistentId { at: self.op_at });
                    }
                    let pid = if opcode == op::BINPERSID {
                        self.pop()?
                    } else {
                        let line = self.line("PERSID")?;
                        let s = String::from_utf8_lossy(line).into_owned();
                        self.push_node(Node::Str(s))?
                    };
                    self.push(Node::PersistentId(pid))?
                }
                op::PUT => {
                    let line = self.line("PUT")?;
                    let key = std::str::from_utf8(line)
                        .ok()
                        .and_then(|t| t.parse().ok())
                        .ok_or_else(|| self.malformed("bad PUT key"))?;
                    self.memo_put(key)?
                }
                op::BINPUT => {
                    let key = self.u8("BINPUT")?;
                    self.memo_put(u64::from(key))?
                }
                op::LONG_BINPUT => {
                    let key = self.u32("LONG_BINPUT")?;
                    self.memo_put(u64::from(key))?
                }
                op::MEMOIZE => {
                    let key = self.memo.len() as u64;
                    self.memo_put(key)?
                }
                op::GET => {
                    let line = self.line("GET")?;
                    let key = std::str::from_utf8(line)
                        .ok()
                        .and_then(|t| t.parse().ok())
                        .ok_or_else(|| self.malformed("bad GET key"))?;
                    self.memo_get(key)?
                }
                op::BINGET => {
                    let key = self.u8("BINGET")?;
                    self.memo_get(u64::from(key))?
                }
                op::LONG_BINGET => {
                    let key = self.u32("LONG_BINGET")?;
                    self.memo_get(u64::from(key))?
                }
                op::STRING => {
                    return Err(PickleError::UnsupportedOpcode {
                        opcode,
                        at: self.op_at,
                    });
                }
                _ => {
                    return Err(PickleError::UnsupportedOpcode {
                        opcode,
                        at: self.op_at,
                    });
                }
            }
        }
    }

    fn dict_insert(&mut self, dict: Id, pairs: Vec<(Id, Id)>) -> Result<(), PickleError> {
        // Keys compare by value for the scalar types Python dicts hold in checkpoints;
        // a repeated key replaces the earlier value, as in Python.
        for (k, v) in pairs {
            let existing = match &self.nodes[dict] {
                Node::Dict(items) => items
                    .iter()
                    .position(|(old, _)| scalar_eq(&self.nodes, *old, k)),
                _ => return Err(self.malformed("SETITEM on a non-dict")),
            };
            let Node::Dict(items) = &mut self.nodes[dict] else {
                unreachable!("checked above")
            };
            match existing {
                Some(i) => items[i].1 = v,
                None => items.push((k, v)),
            }
        }
        Ok(())
    }
}

fn scalar_eq(nodes: &[Node], a: Id, b: Id) -> bool {
    if a == b {
        return true;
    }
    match (&nodes[a], &nodes[b]) {
        (Node::Str(x), Node::Str(y)) => x == y,
        (Node::Int(x), Node::Int(y)) => x == y,
        (Node::Bytes(x), Node::Bytes(y)) => x == y,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow_all_torch() -> AllowList {
        AllowList::new(&[("torch", "Size"), ("collections", "OrderedDict")])
    }

    #[test]
    fn reads_what_it_writes() {
        let value = Py::Dict(vec![
            (Py::str("a"), Py::Int(1)),
            (Py::str("big"), Py::Int(1 << 40)),
            (Py::str("neg"), Py::Int(-5)),
            (Py::str("f"), Py::Float(3.0)),
            (
                Py::str("size"),
                Py::reduce(
                    Py::global("torch", "Size"),
                    vec![Py::Tuple(vec![Py::Int(2), Py::Int(3)])],
                ),
            ),
            (Py::str("l"), Py::List(vec![Py::None, Py::Bool(true)])),
        ]);
        let bytes = write_pickle(&value);
        let p = Pickle::parse(&bytes, &allow_all_torch()).unwrap();
        let root = p.root();
        assert_eq!(p.as_int(p.dict_get(root, "a").unwrap()), Some(1));
        assert_eq!(p.as_int(p.dict_get(root, "big").unwrap()), Some(1 << 40));
        assert_eq!(p.as_int(p.dict_get(root, "neg").unwrap()), Some(-5));
        assert_eq!(
            p.as_dims(p.dict_get(root, "size").unwrap()),
            Some(vec![2, 3])
        );
        assert_eq!(p.as_seq(p.dict_get(root, "l").unwrap()).unwrap().len(), 2);
    }

    #[test]
    fn refuses_globals_off_the_list() {
        // cos\nsystem\n(S'echo hi'\ntR.
        let evil = b"cos\nsystem\n(X\x07\x00\x00\x00echo hitR.";
        let err = Pickle::parse(evil, &allow_all_torch()).unwrap_err();
        assert_eq!(err, PickleError::ForbiddenGlobal("os.system".into()));
        // The same through STACK_GLOBAL (protocol 4).
        let evil4 = b"\x80\x04\x8c\x02os\x8c\x06system\x93.";
        let err = Pickle::parse(evil4, &allow_all_torch()).unwrap_err();
        assert_eq!(err, PickleError::ForbiddenGlobal("os.system".into()));
    }

    #[test]
    fn lengths_are_checked_before_allocation() {
        // BINUNICODE8 claiming 2^60 bytes.
        let mut evil = vec![0x80, 4, 0x8d];
        evil.extend_from_slice(&(1u64 << 60).to_le_bytes());
        let err = Pickle::parse(&evil, &allow_all_torch()).unwrap_err();
        assert!(matches!(err, PickleError::Truncated { needed, .. } if needed == 1 << 60));
    }

    #[test]
    fn memo_shares_containers_filled_after_memoize() {
        // [ d ] where d = {} is memoized empty, then filled, then fetched again.
        // ( } q\x00 X.. K\x01 s h\x00 l .
        let bytes = b"\x80\x02(}q\x00X\x01\x00\x00\x00aK\x01sh\x00l.";
        let p = Pickle::parse(bytes, &allow_all_torch()).unwrap();
        let items = p.as_seq(p.root()).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(p.as_int(p.dict_get(items[1], "a").unwrap()), Some(1));
    }

    #[test]
    fn persistent_ids_need_permission() {
        let bytes = b"\x80\x02X\x01\x00\x00\x000Q.";
        assert!(matches!(
            Pickle::parse(bytes, &allow_all_torch()),
            Err(PickleError::UnexpectedPersistentId { .. })
        ));
        assert!(Pickle::parse(bytes, &allow_all_torch().with_persistent_ids()).is_ok());
    }

    #[test]
    fn underflow_and_bad_memo_are_errors_not_panics() {
        for bad in [&b"t."[..], b"h\x05.", b"\x85.", b"(u.", b"a.", b"b."] {
            assert!(Pickle::parse(bad, &allow_all_torch()).is_err(), "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = Pickle::parse(&data, &allow_all_torch().with_persistent_ids());
        }
    }
}
