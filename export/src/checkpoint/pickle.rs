//! A restricted unpickler for the `data.pkl` of `torch.save` archives.
//!
//! It interprets only the opcodes (protocols 2 to 5) that state dicts and training checkpoints
//! use and never imports or calls anything: globals resolve against a fixed allow-list to inert
//! markers, and the few allowed callables (`OrderedDict()`, the tensor rebuild functions,
//! `argparse.Namespace`) are interpreted here.
//!
//! Containers live in an arena and values refer to them by index. That keeps Python's sharing
//! semantics (a memoized dict that is filled later is the same dict everywhere it is referenced)
//! without reference counting, makes repeated references free, and means no value is nested in
//! another, so arbitrarily deep pickles cannot overflow the stack when dropped.

use std::collections::HashMap;
use std::rc::Rc;

use super::{Dtype, Float};

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer beyond 64 bits; state dicts have no use for its value.
    BigInt,
    Float(f64),
    Str(Rc<str>),
    Bytes(Rc<[u8]>),
    Global(Global),
    /// Index into [`Pickle`]'s object arena.
    Object(usize),
}

/// The allow-listed globals. They are markers: nothing is imported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Global {
    OrderedDict,
    Namespace,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    /// A typed storage class such as `torch.FloatStorage`.
    StorageClass(Dtype),
    /// A dtype object such as `torch.float32`.
    DtypeObject(Dtype),
}

#[derive(Debug)]
pub(crate) enum Object {
    Tuple(Vec<Value>),
    List(Vec<Value>),
    /// Entries in insertion order; a key set twice keeps both, and lookups take the last, which
    /// gives the same values as a Python dict.
    Dict(Vec<(Value, Value)>),
    Set(Vec<Value>),
    /// An `argparse.Namespace` record: the dicts BUILD gave it attributes from, by object id
    /// (copying them would let each three-byte BUILD copy a whole dict), never anything
    /// callable.
    Namespace(Vec<usize>),
    Storage(Box<Storage>),
    Tensor(Box<Tensor>),
}

/// The most dimensions a tensor may have (torch allows 64; state dicts use a handful). Each
/// `_rebuild_tensor_v2` copies its size and stride tuples, so a bound keeps that copy small.
const MAX_RANK: usize = 16;

/// Objects, container elements and memo entries the pickle may create per byte of its
/// length. Every such unit costs tens of bytes of memory, and a real state dict spends several
/// bytes of pickle on each (keys, storage records, memo puts), far below this.
const UNITS_PER_BYTE: usize = 1;

/// A storage referenced by a persistent id: its data is the archive entry `data/<key>`.
#[derive(Clone, Debug)]
pub(crate) struct Storage {
    pub dtype: Dtype,
    pub key: Rc<str>,
    pub numel: usize,
}

/// A tensor as `_rebuild_tensor_v2` describes it: a strided view into a storage.
#[derive(Clone, Debug)]
pub(crate) struct Tensor {
    pub storage: Storage,
    /// In elements.
    pub offset: usize,
    pub shape: Vec<usize>,
    /// In elements.
    pub strides: Vec<usize>,
}

#[derive(Debug, PartialEq)]
pub(crate) enum PickleError {
    Malformed { offset: usize, detail: String },
    Forbidden { offset: usize, global: String },
}

/// The result of unpickling: the root value and the objects it refers to.
pub(crate) struct Pickle {
    objects: Vec<Object>,
    root: Value,
}

impl Pickle {
    pub(crate) fn root(&self) -> &Value {
        &self.root
    }

    pub(crate) fn dict(&self, value: &Value) -> Option<&[(Value, Value)]> {
        match object(&self.objects, value) {
            Some(Object::Dict(entries)) => Some(entries),
            _ => None,
        }
    }

    pub(crate) fn tensor(&self, value: &Value) -> Option<&Tensor> {
        match object(&self.objects, value) {
            Some(Object::Tensor(tensor)) => Some(tensor),
            _ => None,
        }
    }

    /// A short description of a value for messages, never recursing into containers.
    pub(crate) fn describe(&self, value: &Value) -> String {
        describe(&self.objects, value)
    }
}

fn object<'o>(objects: &'o [Object], value: &Value) -> Option<&'o Object> {
    match value {
        Value::Object(id) => objects.get(*id),
        _ => None,
    }
}

/// The value stored under a string key, the last one if the key was set more than once.
pub(crate) fn lookup<'a>(entries: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    entries
        .iter()
        .rev()
        .find(|(k, _)| matches!(k, Value::Str(s) if &**s == key))
        .map(|(_, v)| v)
}

fn describe(objects: &[Object], value: &Value) -> String {
    match value {
        Value::None => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Int(i) => format!("the int {i}"),
        Value::BigInt => "an int beyond 64 bits".to_owned(),
        Value::Float(x) => format!("the float {x}"),
        Value::Str(s) if s.chars().count() > 40 => {
            format!("a str ({} characters)", s.chars().count())
        }
        Value::Str(s) => format!("the str {s:?}"),
        Value::Bytes(b) => format!("bytes ({} long)", b.len()),
        Value::Global(global) => global.describe(),
        Value::Object(_) => match object(objects, value) {
            Some(Object::Tuple(items)) => format!("a tuple of {} items", items.len()),
            Some(Object::List(items)) => format!("a list of {} items", items.len()),
            Some(Object::Dict(entries)) => format!("a dict of {} entries", entries.len()),
            Some(Object::Set(items)) => format!("a set of {} items", items.len()),
            Some(Object::Namespace(states)) => {
                let mut states = states.clone();
                states.sort_unstable();
                states.dedup();
                let attributes: usize = states
                    .iter()
                    .map(|&id| match objects.get(id) {
                        Some(Object::Dict(entries)) => entries.len(),
                        _ => 0,
                    })
                    .sum();
                format!("an argparse.Namespace of {attributes} attributes")
            }
            Some(Object::Storage(storage)) => format!("a {} storage", storage.dtype.name()),
            Some(Object::Tensor(tensor)) => {
                format!(
                    "a {} tensor {:?}",
                    tensor.storage.dtype.name(),
                    tensor.shape
                )
            }
            None => "a dangling object reference".to_owned(),
        },
    }
}

impl Global {
    fn describe(self) -> String {
        match self {
            Global::OrderedDict => "collections.OrderedDict".to_owned(),
            Global::Namespace => "argparse.Namespace".to_owned(),
            Global::RebuildTensorV2 => "torch._utils._rebuild_tensor_v2".to_owned(),
            Global::RebuildParameter => "torch._utils._rebuild_parameter".to_owned(),
            Global::RebuildParameterWithState => {
                "torch._utils._rebuild_parameter_with_state".to_owned()
            }
            Global::StorageClass(dtype) => format!("the torch {} storage class", dtype.name()),
            Global::DtypeObject(dtype) => format!("torch.{}", dtype.name()),
        }
    }
}

/// Resolves `module.name` against the allow-list.
fn resolve(module: &str, name: &str) -> Option<Global> {
    match (module, name) {
        ("collections", "OrderedDict") => Some(Global::OrderedDict),
        ("argparse", "Namespace") => Some(Global::Namespace),
        ("torch._utils", "_rebuild_tensor_v2") => Some(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Some(Global::RebuildParameter),
        ("torch._utils", "_rebuild_parameter_with_state") => {
            Some(Global::RebuildParameterWithState)
        }
        ("torch", name) => storage_class(name)
            .map(Global::StorageClass)
            .or_else(|| dtype_object(name).map(Global::DtypeObject)),
        _ => None,
    }
}

fn other(name: &'static str, size: usize) -> Option<Dtype> {
    Some(Dtype::Other { name, size })
}

fn storage_class(name: &str) -> Option<Dtype> {
    match name {
        "DoubleStorage" => Some(Dtype::Float(Float::F64)),
        "FloatStorage" => Some(Dtype::Float(Float::F32)),
        "HalfStorage" => Some(Dtype::Float(Float::F16)),
        "BFloat16Storage" => Some(Dtype::Float(Float::BF16)),
        "LongStorage" => other("int64", 8),
        "IntStorage" => other("int32", 4),
        "ShortStorage" => other("int16", 2),
        "CharStorage" => other("int8", 1),
        "ByteStorage" => other("uint8", 1),
        "BoolStorage" => other("bool", 1),
        _ => None,
    }
}

fn dtype_object(name: &str) -> Option<Dtype> {
    match name {
        "float64" | "double" => Some(Dtype::Float(Float::F64)),
        "float32" | "float" => Some(Dtype::Float(Float::F32)),
        "float16" | "half" => Some(Dtype::Float(Float::F16)),
        "bfloat16" => Some(Dtype::Float(Float::BF16)),
        "int64" | "long" => other("int64", 8),
        "int32" | "int" => other("int32", 4),
        "int16" | "short" => other("int16", 2),
        "int8" => other("int8", 1),
        "uint8" => other("uint8", 1),
        "bool" => other("bool", 1),
        _ => None,
    }
}

/// Runs the pickle in `data` up to its STOP opcode.
pub(crate) fn unpickle(data: &[u8]) -> Result<Pickle, PickleError> {
    let mut machine = Machine {
        data,
        pos: 0,
        op_start: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        objects: Vec::new(),
        units: 0,
    };
    loop {
        machine.op_start = machine.pos;
        if let Some(root) = machine.step()? {
            return Ok(Pickle {
                objects: machine.objects,
                root,
            });
        }
    }
}

struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    /// Offset of the opcode being executed, for messages.
    op_start: usize,
    stack: Vec<Value>,
    /// Stack heights at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    objects: Vec<Object>,
    /// Objects, container elements and memo entries made so far; see [`UNITS_PER_BYTE`].
    units: usize,
}

type Step<T> = Result<T, PickleError>;

impl<'a> Machine<'a> {
    fn error<T>(&self, detail: impl Into<String>) -> Step<T> {
        Err(PickleError::Malformed {
            offset: self.op_start,
            detail: detail.into(),
        })
    }

    /// Executes one opcode; returns the result at STOP.
    fn step(&mut self) -> Step<Option<Value>> {
        let op = self.take(1, "an opcode")?[0];
        match op {
            // PROTO
            0x80 => {
                let version = self.take(1, "the protocol version")?[0];
                if version > 5 {
                    return self.error(format!("unsupported pickle protocol {version}"));
                }
            }
            // FRAME: the whole pickle is in memory, so frames need no handling.
            0x95 => {
                self.take(8, "the frame length")?;
            }
            // STOP
            b'.' => return self.pop().map(Some),
            // MARK
            b'(' => self.marks.push(self.stack.len()),
            // POP: with nothing above the innermost mark, Python drops the mark.
            b'0' => {
                if self.stack.len() == self.floor() && !self.marks.is_empty() {
                    self.marks.pop();
                } else {
                    self.pop()?;
                }
            }
            // POP_MARK
            b'1' => {
                self.pop_mark()?;
            }
            // EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE, EMPTY_SET
            b'}' => self.push_object(Object::Dict(Vec::new()))?,
            b']' => self.push_object(Object::List(Vec::new()))?,
            b')' => self.push_object(Object::Tuple(Vec::new()))?,
            0x8f => self.push_object(Object::Set(Vec::new()))?,
            // TUPLE, TUPLE1, TUPLE2, TUPLE3
            b't' => {
                let items = self.pop_mark()?;
                self.push_object(Object::Tuple(items))?;
            }
            0x85..=0x87 => {
                let n = usize::from(op - 0x84);
                let items = self.pop_n(n)?;
                self.push_object(Object::Tuple(items))?;
            }
            // DICT, LIST, FROZENSET
            b'd' => {
                let items = self.pop_mark()?;
                let entries = self.pairs(items)?;
                self.push_object(Object::Dict(entries))?;
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push_object(Object::List(items))?;
            }
            0x91 => {
                let items = self.pop_mark()?;
                self.push_object(Object::Set(items))?;
            }
            // SETITEM, SETITEMS
            b's' => {
                let items = self.pop_n(2)?;
                let entries = self.pairs(items)?;
                self.extend_dict(entries)?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let entries = self.pairs(items)?;
                self.extend_dict(entries)?;
            }
            // APPEND, APPENDS, ADDITEMS
            b'a' => {
                let item = self.pop()?;
                self.extend_sequence(vec![item], false)?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.extend_sequence(items, false)?;
            }
            0x90 => {
                let items = self.pop_mark()?;
                self.extend_sequence(items, true)?;
            }
            // BINPUT, LONG_BINPUT, MEMOIZE
            b'q' => {
                let index = self.take(1, "a memo index")?[0];
                self.memo_put(u32::from(index))?;
            }
            b'r' => {
                let index = self.u32_le("a memo index")?;
                self.memo_put(index)?;
            }
            0x94 => match u32::try_from(self.memo.len()) {
                Ok(index) => self.memo_put(index)?,
                Err(_) => return self.error("the memo is full"),
            },
            // BINGET, LONG_BINGET
            b'h' => {
                let index = self.take(1, "a memo index")?[0];
                self.memo_get(u32::from(index))?;
            }
            b'j' => {
                let index = self.u32_le("a memo index")?;
                self.memo_get(index)?;
            }
            // BININT, BININT1, BININT2, LONG1, LONG4
            b'J' => {
                let bytes = self.take(4, "an int")?;
                let value = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                self.stack.push(Value::Int(i64::from(value)));
            }
            b'K' => {
                let value = self.take(1, "an int")?[0];
                self.stack.push(Value::Int(i64::from(value)));
            }
            b'M' => {
                let bytes = self.take(2, "an int")?;
                let value = u16::from_le_bytes([bytes[0], bytes[1]]);
                self.stack.push(Value::Int(i64::from(value)));
            }
            0x8a => {
                let len = usize::from(self.take(1, "a long's length")?[0]);
                let bytes = self.take(len, "a long")?;
                self.stack.push(decode_long(bytes));
            }
            0x8b => {
                let bytes = self.take(4, "a long's length")?;
                let len = i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                let Ok(len) = usize::try_from(len) else {
                    return self.error(format!("negative long length {len}"));
                };
                let bytes = self.take(len, "a long")?;
                self.stack.push(decode_long(bytes));
            }
            // BINFLOAT (big-endian)
            b'G' => {
                let bytes = self.take(8, "a float")?;
                let mut be = [0u8; 8];
                be.copy_from_slice(bytes);
                self.stack.push(Value::Float(f64::from_be_bytes(be)));
            }
            // NONE, NEWTRUE, NEWFALSE
            b'N' => self.stack.push(Value::None),
            0x88 => self.stack.push(Value::Bool(true)),
            0x89 => self.stack.push(Value::Bool(false)),
            // SHORT_BINUNICODE, BINUNICODE, BINUNICODE8
            0x8c => {
                let len = u64::from(self.take(1, "a string length")?[0]);
                self.push_str(len)?;
            }
            b'X' => {
                let len = self.u32_le("a string length")?;
                self.push_str(u64::from(len))?;
            }
            0x8d => {
                let len = self.u64_le("a string length")?;
                self.push_str(len)?;
            }
            // SHORT_BINBYTES, BINBYTES, BINBYTES8
            b'C' => {
                let len = u64::from(self.take(1, "a bytes length")?[0]);
                self.push_bytes(len)?;
            }
            b'B' => {
                let len = self.u32_le("a bytes length")?;
                self.push_bytes(u64::from(len))?;
            }
            0x8e => {
                let len = self.u64_le("a bytes length")?;
                self.push_bytes(len)?;
            }
            // GLOBAL, STACK_GLOBAL
            b'c' => {
                let module = self.line()?;
                let name = self.line()?;
                let global = self.resolve(&module, &name)?;
                self.stack.push(Value::Global(global));
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                let (Value::Str(module), Value::Str(name)) = (&module, &name) else {
                    return self.error(format!(
                        "STACK_GLOBAL needs two strings, found {} and {}",
                        self.describe(&module),
                        self.describe(&name)
                    ));
                };
                let global = self.resolve(module, name)?;
                self.stack.push(Value::Global(global));
            }
            // REDUCE, NEWOBJ
            b'R' | 0x81 => {
                let args = self.pop()?;
                let callable = self.pop()?;
                let result = self.call(&callable, &args)?;
                self.stack.push(result);
            }
            // BUILD
            b'b' => {
                let state = self.pop()?;
                self.build(state)?;
            }
            // BINPERSID
            b'Q' => {
                let pid = self.pop()?;
                let storage = self.persistent_load(&pid)?;
                self.push_object(Object::Storage(Box::new(storage)))?;
            }
            _ => {
                let printable = if op.is_ascii_graphic() {
                    format!(" ('{}')", char::from(op))
                } else {
                    String::new()
                };
                return self.error(format!(
                    "unsupported opcode 0x{op:02x}{printable}; only protocol 2-5 state-dict \
                     pickles are read"
                ));
            }
        }
        Ok(None)
    }

    fn describe(&self, value: &Value) -> String {
        describe(&self.objects, value)
    }

    /// The next `n` bytes; `what` says what they were to hold if the data ends early.
    fn take(&mut self, n: usize, what: &str) -> Step<&'a [u8]> {
        let remaining = self.data.len() - self.pos;
        if n > remaining {
            return self.error(format!(
                "truncated: {what} needs {n} bytes but only {remaining} remain"
            ));
        }
        let bytes = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(bytes)
    }

    fn u32_le(&mut self, what: &str) -> Step<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64_le(&mut self, what: &str) -> Step<u64> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    /// Bytes whose length came from the file: checked against what remains before use.
    fn take_len(&mut self, len: u64, what: &str) -> Step<&'a [u8]> {
        match usize::try_from(len) {
            Ok(len) => self.take(len, what),
            Err(_) => self.error(format!("absurd {what} length {len}")),
        }
    }

    fn push_str(&mut self, len: u64) -> Step<()> {
        let bytes = self.take_len(len, "a string")?;
        match std::str::from_utf8(bytes) {
            Ok(s) => {
                self.stack.push(Value::Str(s.into()));
                Ok(())
            }
            Err(e) => self.error(format!("string is not valid UTF-8 ({e})")),
        }
    }

    fn push_bytes(&mut self, len: u64) -> Step<()> {
        let bytes = self.take_len(len, "a bytes object")?;
        self.stack.push(Value::Bytes(bytes.into()));
        Ok(())
    }

    /// A newline-terminated line, as GLOBAL uses for module and name.
    fn line(&mut self) -> Step<String> {
        let rest = &self.data[self.pos..];
        let Some(len) = rest.iter().position(|&b| b == b'\n') else {
            return self.error("truncated: GLOBAL name has no terminating newline");
        };
        let line = &rest[..len];
        self.pos += len + 1;
        match std::str::from_utf8(line) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => self.error(format!("GLOBAL name is not valid UTF-8 ({e})")),
        }
    }

    fn resolve(&self, module: &str, name: &str) -> Step<Global> {
        resolve(module, name).ok_or_else(|| PickleError::Forbidden {
            offset: self.op_start,
            global: format!("{module}.{name}"),
        })
    }

    /// The lowest stack height the current opcode may pop to (the innermost mark).
    fn floor(&self) -> usize {
        self.marks.last().copied().unwrap_or(0)
    }

    fn pop(&mut self) -> Step<Value> {
        if self.stack.len() > self.floor() {
            if let Some(value) = self.stack.pop() {
                return Ok(value);
            }
        }
        self.error("stack underflow")
    }

    fn pop_n(&mut self, n: usize) -> Step<Vec<Value>> {
        if self.stack.len() < self.floor() + n {
            return self.error(format!("stack underflow: {n} values needed"));
        }
        Ok(self.stack.split_off(self.stack.len() - n))
    }

    fn pop_mark(&mut self) -> Step<Vec<Value>> {
        match self.marks.pop() {
            Some(mark) if mark <= self.stack.len() => Ok(self.stack.split_off(mark)),
            _ => self.error("no MARK to pop to"),
        }
    }

    /// Counts `n` new objects, elements or memo entries against the budget, which bounds the
    /// memory a small (or highly compressible) pickle can make the reader allocate.
    fn charge(&mut self, n: usize) -> Step<()> {
        let budget = self.data.len().saturating_mul(UNITS_PER_BYTE);
        match self.units.checked_add(n) {
            Some(units) if units <= budget => {
                self.units = units;
                Ok(())
            }
            _ => self.error(format!(
                "the pickle creates more objects, elements and memo entries than its {} bytes \
                 can describe in a state dict ({budget}); it is crafted or corrupt",
                self.data.len()
            )),
        }
    }

    fn new_object(&mut self, object: Object) -> Step<Value> {
        let elements = match &object {
            Object::Tuple(items) | Object::List(items) | Object::Set(items) => items.len(),
            Object::Dict(entries) => entries.len(),
            Object::Namespace(states) => states.len(),
            Object::Storage(_) | Object::Tensor(_) => 0,
        };
        self.charge(1 + elements)?;
        self.objects.push(object);
        Ok(Value::Object(self.objects.len() - 1))
    }

    fn push_object(&mut self, object: Object) -> Step<()> {
        let value = self.new_object(object)?;
        self.stack.push(value);
        Ok(())
    }

    fn pairs(&self, items: Vec<Value>) -> Step<Vec<(Value, Value)>> {
        if !items.len().is_multiple_of(2) {
            return self.error(format!("odd number of items ({}) for a dict", items.len()));
        }
        let mut items = items.into_iter();
        let mut entries = Vec::new();
        while let (Some(key), Some(value)) = (items.next(), items.next()) {
            entries.push((key, value));
        }
        Ok(entries)
    }

    /// The object on top of the stack, which SETITEMS, APPENDS and BUILD modify.
    fn target(&mut self) -> Step<&mut Object> {
        let id = match self.stack.last() {
            Some(Value::Object(id)) => *id,
            Some(other) => return self.error(format!("cannot modify {}", self.describe(other))),
            None => return self.error("stack underflow: nothing to modify"),
        };
        let offset = self.op_start;
        self.objects
            .get_mut(id)
            .ok_or_else(|| PickleError::Malformed {
                offset,
                detail: "dangling object reference".to_owned(),
            })
    }

    fn extend_dict(&mut self, entries: Vec<(Value, Value)>) -> Step<()> {
        self.charge(entries.len())?;
        match self.target()? {
            Object::Dict(dict) => {
                dict.extend(entries);
                Ok(())
            }
            _ => self.error("SETITEM(S) needs a dict"),
        }
    }

    fn extend_sequence(&mut self, items: Vec<Value>, set: bool) -> Step<()> {
        self.charge(items.len())?;
        match (self.target()?, set) {
            (Object::List(list), false) | (Object::Set(list), true) => {
                list.extend(items);
                Ok(())
            }
            _ if set => self.error("ADDITEMS needs a set"),
            _ => self.error("APPEND(S) needs a list"),
        }
    }

    fn memo_put(&mut self, index: u32) -> Step<()> {
        self.charge(1)?;
        match self.stack.last() {
            Some(top) => {
                self.memo.insert(index, top.clone());
                Ok(())
            }
            None => self.error("stack underflow: nothing to memoize"),
        }
    }

    fn memo_get(&mut self, index: u32) -> Step<()> {
        match self.memo.get(&index) {
            Some(value) => {
                self.stack.push(value.clone());
                Ok(())
            }
            None => self.error(format!("memo index {index} was never set")),
        }
    }

    fn object_of(&self, value: &Value) -> Option<&Object> {
        object(&self.objects, value)
    }

    fn tuple(&self, value: &Value) -> Option<&[Value]> {
        match self.object_of(value) {
            Some(Object::Tuple(items)) => Some(items),
            _ => None,
        }
    }

    /// Interprets REDUCE and NEWOBJ for the allow-listed callables.
    fn call(&mut self, callable: &Value, args: &Value) -> Step<Value> {
        let Value::Global(global) = callable else {
            return self.error(format!(
                "cannot call {}; only allow-listed globals are callable",
                self.describe(callable)
            ));
        };
        let Some(args) = self.tuple(args) else {
            return self.error(format!(
                "the arguments to {} are {}, expected a tuple",
                global.describe(),
                self.describe(args)
            ));
        };
        // No allowed callable takes more than 7 arguments; refusing first keeps a memoized
        // huge tuple from being copied.
        if args.len() > 7 {
            return self.error(format!(
                "cannot call {} with {} arguments",
                global.describe(),
                args.len()
            ));
        }
        let args = args.to_vec();
        match (global, args.as_slice()) {
            (Global::OrderedDict, []) => self.new_object(Object::Dict(Vec::new())),
            (Global::Namespace, []) => self.new_object(Object::Namespace(Vec::new())),
            (Global::RebuildTensorV2, [storage, offset, shape, strides, _, _])
            | (Global::RebuildTensorV2, [storage, offset, shape, strides, _, _, _]) => {
                let tensor = self.rebuild_tensor(storage, offset, shape, strides)?;
                self.new_object(Object::Tensor(Box::new(tensor)))
            }
            (Global::RebuildParameter, [tensor, _, _])
            | (Global::RebuildParameterWithState, [tensor, _, _, _]) => {
                match self.object_of(tensor) {
                    Some(Object::Tensor(_)) => Ok(tensor.clone()),
                    _ => self.error(format!(
                        "{} needs a tensor, found {}",
                        global.describe(),
                        self.describe(tensor)
                    )),
                }
            }
            _ => self.error(format!(
                "cannot call {} with {} arguments",
                global.describe(),
                args.len()
            )),
        }
    }

    fn rebuild_tensor(
        &self,
        storage: &Value,
        offset: &Value,
        shape: &Value,
        strides: &Value,
    ) -> Step<Tensor> {
        let Some(Object::Storage(storage)) = self.object_of(storage) else {
            return self.error(format!(
                "_rebuild_tensor_v2 needs a storage, found {}",
                self.describe(storage)
            ));
        };
        let offset = self.usize(offset, "storage offset")?;
        let shape = self.usizes(shape, "size")?;
        let strides = self.usizes(strides, "stride")?;
        if shape.len() != strides.len() {
            return self.error(format!(
                "tensor size {shape:?} and stride {strides:?} differ in length"
            ));
        }
        Ok(Tensor {
            storage: (**storage).clone(),
            offset,
            shape,
            strides,
        })
    }

    fn usize(&self, value: &Value, what: &str) -> Step<usize> {
        match value {
            Value::Int(i) => match usize::try_from(*i) {
                Ok(n) => Ok(n),
                Err(_) => self.error(format!("{what} is {i}, expected a non-negative int")),
            },
            _ => self.error(format!(
                "{what} is {}, expected a non-negative int",
                self.describe(value)
            )),
        }
    }

    fn usizes(&self, value: &Value, what: &str) -> Step<Vec<usize>> {
        match self.tuple(value) {
            Some(items) if items.len() > MAX_RANK => self.error(format!(
                "tensor {what} has {} dimensions, more than the {MAX_RANK} supported",
                items.len()
            )),
            Some(items) => items.iter().map(|item| self.usize(item, what)).collect(),
            None => self.error(format!(
                "tensor {what} is {}, expected a tuple of ints",
                self.describe(value)
            )),
        }
    }

    /// BUILD: a Namespace records the dict of attributes it was given; the state of an
    /// OrderedDict (its `_metadata` attribute) is irrelevant to the weights and dropped.
    fn build(&mut self, state: Value) -> Step<()> {
        let attributes = match (&state, self.object_of(&state)) {
            (Value::Object(id), Some(Object::Dict(_))) => Some(*id),
            _ => None,
        };
        let state_description = self.describe(&state);
        self.charge(1)?;
        match (self.target()?, attributes) {
            (Object::Namespace(states), Some(id)) => {
                states.push(id);
                Ok(())
            }
            (Object::Dict(_), _) => Ok(()),
            _ => self.error(format!(
                "BUILD with {state_description} applies only to an argparse.Namespace (with a \
                 dict) or an OrderedDict"
            )),
        }
    }

    /// BINPERSID: `('storage', storage_class, key, location, numel)` names the archive entry
    /// holding a storage's bytes.
    fn persistent_load(&self, pid: &Value) -> Step<Storage> {
        if let Some(
            [Value::Str(kind), Value::Global(Global::StorageClass(dtype)), Value::Str(key), Value::Str(_), numel],
        ) = self.tuple(pid)
        {
            if &**kind == "storage" {
                return Ok(Storage {
                    dtype: *dtype,
                    key: key.clone(),
                    numel: self.usize(numel, "storage size")?,
                });
            }
        }
        self.error(format!(
            "persistent id is {}, expected ('storage', storage class, key, location, size)",
            self.describe(pid)
        ))
    }
}

/// Decodes a little-endian two's-complement integer (LONG1, LONG4).
fn decode_long(bytes: &[u8]) -> Value {
    let negative = bytes.last().is_some_and(|&b| b & 0x80 != 0);
    let mut bytes = bytes;
    // Drop redundant sign bytes so that non-minimal encodings of small values still fit.
    while let [rest @ .., next, last] = bytes {
        let redundant = (*last == 0 && next & 0x80 == 0) || (*last == 0xff && next & 0x80 != 0);
        if bytes.len() <= 8 || !redundant {
            break;
        }
        bytes = &bytes[..rest.len() + 1];
    }
    if bytes.len() > 8 {
        return Value::BigInt;
    }
    let mut full = if negative { [0xff; 8] } else { [0; 8] };
    full[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(full))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny pickle assembler for hand-written test inputs.
    pub(crate) struct Assembler(pub Vec<u8>);

    impl Assembler {
        pub(crate) fn new() -> Self {
            Self(vec![0x80, 2])
        }
        pub(crate) fn op(&mut self, op: u8) -> &mut Self {
            self.0.push(op);
            self
        }
        pub(crate) fn str(&mut self, s: &str) -> &mut Self {
            self.0.push(b'X');
            self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        pub(crate) fn int(&mut self, i: i32) -> &mut Self {
            self.0.push(b'J');
            self.0.extend_from_slice(&i.to_le_bytes());
            self
        }
        pub(crate) fn global(&mut self, module: &str, name: &str) -> &mut Self {
            self.0.push(b'c');
            self.0
                .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
            self
        }
        /// A tuple of ints.
        pub(crate) fn ints(&mut self, values: &[usize]) -> &mut Self {
            self.op(b'(');
            for &v in values {
                self.int(v as i32);
            }
            self.op(b't')
        }
        /// `_rebuild_tensor_v2(storage(class, key, numel), offset, shape, strides, False, OrderedDict())`.
        pub(crate) fn tensor(
            &mut self,
            class: &str,
            key: &str,
            numel: usize,
            offset: usize,
            shape: &[usize],
            strides: &[usize],
        ) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2")
                .op(b'(')
                .op(b'(')
                .str("storage")
                .global("torch", class)
                .str(key)
                .str("cpu")
                .int(numel as i32)
                .op(b't')
                .op(b'Q')
                .int(offset as i32)
                .ints(shape)
                .ints(strides)
                .op(0x89)
                .global("collections", "OrderedDict")
                .op(b')')
                .op(b'R')
                .op(b't')
                .op(b'R')
        }
        pub(crate) fn bytes(&self) -> Vec<u8> {
            self.0.clone()
        }
    }

    fn malformed(data: &[u8]) -> (usize, String) {
        match unpickle(data) {
            Err(PickleError::Malformed { offset, detail }) => (offset, detail),
            Err(other) => panic!("expected a malformed-pickle error, got {other:?}"),
            Ok(_) => panic!("expected a malformed-pickle error"),
        }
    }

    #[test]
    fn reads_a_state_dict_with_shared_memo_entries() {
        let mut p = Assembler::new();
        // {"a": tensor, "b": same tensor via the memo, "c": [1, -2, 2**64]}
        p.op(b'}')
            .op(b'(')
            .str("a")
            .tensor("FloatStorage", "0", 6, 0, &[2, 3], &[3, 1]);
        p.op(b'q').op(0).str("b").op(b'h').op(0).str("c").op(b']');
        p.op(b'(').op(b'K').op(1).op(0x8a).op(1).op(0xfe);
        p.op(0x8a)
            .op(9)
            .0
            .extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p.op(b'e').op(b'u').op(b'.');
        let pickle = unpickle(&p.bytes()).unwrap();
        let dict = pickle.dict(pickle.root()).unwrap();
        let a = pickle.tensor(lookup(dict, "a").unwrap()).unwrap();
        assert_eq!(
            (a.offset, &a.shape[..], &a.strides[..]),
            (0, &[2, 3][..], &[3, 1][..])
        );
        assert_eq!((&*a.storage.key, a.storage.numel), ("0", 6));
        assert_eq!(a.storage.dtype, Dtype::Float(Float::F32));
        assert_eq!(lookup(dict, "a"), lookup(dict, "b"));
        let c = lookup(dict, "c").unwrap();
        assert_eq!(pickle.describe(c), "a list of 3 items");
        let Some(Object::List(items)) = object(&pickle.objects, c) else {
            panic!("not a list")
        };
        assert_eq!(items[..], [Value::Int(1), Value::Int(-2), Value::BigInt]);
    }

    #[test]
    fn memoized_containers_are_shared_after_mutation() {
        let mut p = Assembler::new();
        // inner = {}; memo; inner["k"] = 1; outer = [inner (memo)]
        p.op(b']')
            .op(b'}')
            .op(b'q')
            .op(3)
            .str("k")
            .op(b'K')
            .op(1)
            .op(b's');
        p.op(b'0').op(b'h').op(3).op(b'a').op(b'.');
        let pickle = unpickle(&p.bytes()).unwrap();
        let Some(Object::List(items)) = object(&pickle.objects, pickle.root()) else {
            panic!("not a list")
        };
        let inner = pickle.dict(&items[0]).unwrap();
        assert_eq!(lookup(inner, "k"), Some(&Value::Int(1)));
    }

    #[test]
    fn namespace_is_an_inert_record() {
        let mut p = Assembler::new();
        p.global("argparse", "Namespace").op(b')').op(0x81);
        p.op(b'}')
            .op(b'(')
            .str("lr")
            .op(b'G')
            .0
            .extend_from_slice(&0.5f64.to_be_bytes());
        p.str("name").op(0x8c).op(3).0.extend_from_slice(b"nar");
        p.op(b'u').op(b'b').op(b'.');
        let pickle = unpickle(&p.bytes()).unwrap();
        assert_eq!(
            pickle.describe(pickle.root()),
            "an argparse.Namespace of 2 attributes"
        );
    }

    #[test]
    fn deep_nesting_does_not_overflow() {
        let depth = 200_000;
        let mut data = vec![0x80, 2];
        data.extend(std::iter::repeat_n(b']', depth));
        data.extend(std::iter::repeat_n(b'a', depth - 1));
        data.push(b'.');
        let pickle = unpickle(&data).unwrap();
        assert_eq!(pickle.describe(pickle.root()), "a list of 1 items");
    }

    #[test]
    fn forbidden_globals_are_refused_before_anything_happens() {
        let mut p = Assembler::new();
        p.global("os", "system")
            .str("echo pwned")
            .op(0x85)
            .op(b'R')
            .op(b'.');
        assert_eq!(
            unpickle(&p.bytes()).err(),
            Some(PickleError::Forbidden {
                offset: 2,
                global: "os.system".to_owned()
            })
        );
        let mut p = Assembler::new();
        p.str("builtins").str("eval").op(0x93).op(b'.');
        let err = unpickle(&p.bytes()).err();
        assert!(
            matches!(&err, Some(PickleError::Forbidden { global, .. }) if global == "builtins.eval"),
            "{err:?}"
        );
    }

    #[test]
    fn allowed_globals_cannot_be_misused() {
        let mut p = Assembler::new();
        p.global("torch", "FloatStorage").op(b')').op(b'R').op(b'.');
        let (_, detail) = malformed(&p.bytes());
        assert!(
            detail.contains("cannot call the torch float32 storage class"),
            "{detail}"
        );
        let mut p = Assembler::new();
        p.str("echo").op(b')').op(b'R').op(b'.');
        let (_, detail) = malformed(&p.bytes());
        assert!(detail.contains("cannot call the str \"echo\""), "{detail}");
        let mut p = Assembler::new();
        p.global("torch._utils", "_rebuild_parameter");
        p.op(b'K')
            .op(1)
            .op(0x89)
            .op(b'}')
            .op(0x87)
            .op(b'R')
            .op(b'.');
        let (_, detail) = malformed(&p.bytes());
        assert!(
            detail.contains("needs a tensor, found the int 1"),
            "{detail}"
        );
    }

    #[test]
    fn malformed_input_is_reported_with_its_offset() {
        // Stack underflow.
        assert_eq!(
            malformed(&[0x80, 2, 0x85, b'.']),
            (2, "stack underflow: 1 values needed".into())
        );
        // Popping below a mark.
        let (offset, detail) = malformed(&[0x80, 2, b'N', b'(', b'.']);
        assert_eq!((offset, detail.as_str()), (4, "stack underflow"));
        // Bad memo index.
        let (offset, detail) = malformed(&[0x80, 2, b'h', 7, b'.']);
        assert_eq!(offset, 2);
        assert!(detail.contains("memo index 7"), "{detail}");
        // Truncated string.
        let (offset, detail) = malformed(&[0x80, 2, b'X', 100, 0, 0, 0, b'a', b'b']);
        assert_eq!(offset, 2);
        assert!(
            detail.contains("truncated") && detail.contains("100 bytes"),
            "{detail}"
        );
        // Absurd lengths.
        let mut data = vec![0x80, 2, 0x8d];
        data.extend_from_slice(&u64::MAX.to_le_bytes());
        let (_, detail) = malformed(&data);
        assert!(
            detail.contains("truncated") || detail.contains("absurd"),
            "{detail}"
        );
        let (_, detail) = malformed(&[0x80, 2, 0x8b, 0xff, 0xff, 0xff, 0xff]);
        assert!(detail.contains("negative long length"), "{detail}");
        // No STOP.
        let (offset, detail) = malformed(&[0x80, 2, b'N']);
        assert_eq!(offset, 3);
        assert!(detail.contains("truncated"), "{detail}");
        // Unsupported opcode and protocol.
        let (_, detail) = malformed(&[0x80, 2, b'I', b'1', b'\n', b'.']);
        assert!(detail.contains("0x49 ('I')"), "{detail}");
        let (_, detail) = malformed(&[0x80, 6, b'.']);
        assert!(detail.contains("protocol 6"), "{detail}");
        // Wrong container for SETITEM.
        let (_, detail) = malformed(&[0x80, 2, b']', b'N', b'N', b's', b'.']);
        assert!(detail.contains("needs a dict"), "{detail}");
        // GLOBAL without newline.
        let (_, detail) = malformed(b"\x80\x02ctorch");
        assert!(detail.contains("newline"), "{detail}");
        // Bad persistent id.
        let (_, detail) = malformed(&[0x80, 2, b'N', b'Q', b'.']);
        assert!(detail.contains("persistent id is None"), "{detail}");
    }

    #[test]
    fn repeated_builds_record_the_dict_once() {
        // ns = Namespace(); d = {0..1000: None} (memoized); BUILD(ns, d) 10 000 times: each
        // BUILD costs three bytes, so copying d each time would build ten million entries.
        let mut p = Assembler::new();
        p.global("argparse", "Namespace").op(b')').op(0x81);
        p.op(b'}').op(b'q').op(0).op(b'(');
        for key in 0..1000 {
            p.int(key).op(b'N');
        }
        p.op(b'u').op(b'b');
        for _ in 0..10_000 {
            p.op(b'h').op(0).op(b'b');
        }
        p.op(b'.');
        let pickle = unpickle(&p.bytes()).unwrap();
        assert_eq!(
            pickle.describe(pickle.root()),
            "an argparse.Namespace of 1000 attributes"
        );
    }

    #[test]
    fn ranks_beyond_sixteen_are_refused() {
        let mut p = Assembler::new();
        p.tensor("FloatStorage", "0", 1, 0, &[1; 16], &[1; 16])
            .op(b'.');
        assert!(unpickle(&p.bytes()).is_ok());
        let mut p = Assembler::new();
        p.tensor("FloatStorage", "0", 1, 0, &[1; 17], &[1; 17])
            .op(b'.');
        let (_, detail) = malformed(&p.bytes());
        assert!(
            detail.contains("17 dimensions, more than the 16"),
            "{detail}"
        );
    }

    #[test]
    fn calls_with_a_huge_argument_tuple_are_refused() {
        let mut p = Assembler::new();
        p.global("collections", "OrderedDict").op(b'(');
        for _ in 0..100 {
            p.op(b'N');
        }
        p.op(b't').op(b'R').op(b'.');
        let (_, detail) = malformed(&p.bytes());
        assert!(detail.contains("with 100 arguments"), "{detail}");
    }

    #[test]
    fn objects_beyond_the_budget_are_refused() {
        // Each TUPLE1 wraps the top of the stack in a new tuple: two units per byte.
        let mut data = vec![0x80, 2, b']'];
        data.extend(std::iter::repeat_n(0x85, 10_000));
        data.push(b'.');
        let (_, detail) = malformed(&data);
        assert!(detail.contains("crafted or corrupt"), "{detail}");
        // One unit per byte is within it: each MEMOIZE adds a memo entry.
        let mut data = vec![0x80, 4, b']'];
        data.extend(std::iter::repeat_n(0x94, 10_000));
        data.push(b'.');
        assert!(unpickle(&data).is_ok());
    }

    #[test]
    fn long_decoding() {
        assert_eq!(decode_long(&[]), Value::Int(0));
        assert_eq!(decode_long(&[0xff]), Value::Int(-1));
        assert_eq!(decode_long(&[0x00, 0x80, 0x00]), Value::Int(0x8000));
        assert_eq!(decode_long(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]), Value::Int(1));
        assert_eq!(
            decode_long(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]),
            Value::Int(-2)
        );
        assert_eq!(decode_long(&[0, 0, 0, 0, 0, 0, 0, 0x80, 0]), Value::BigInt);
    }
}
