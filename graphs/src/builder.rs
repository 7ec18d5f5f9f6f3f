//! A typed ONNX graph builder.
//!
//! Values are handles ([`Value`]) that carry their element type, never strings; nodes get
//! scoped, hierarchical names (`/layers.3/attn/MatMul`) that read well in Netron; small
//! constants are pooled so a graph holds each one once; large tensors (weights) go through a
//! [`WeightStore`] that writes each of them once, even when several graphs share it.
//! Everything that can go wrong returns a [`GraphError`], a handle from another builder
//! included; nothing panics.
//!
//! The operator helpers (`matmul`, `reshape`, ...) live in `ops.rs`; this file is the core:
//! values, scopes, nodes, inputs, outputs, constants and the final `ModelProto`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::onnx::{
    self, attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::weights::WeightStore;
use crate::GraphError;

/// The opset every narx graph targets: TensorRT 8.5+ (JetPack 5) and every ONNX Runtime
/// parse it.
pub const OPSET: i64 = 17;
/// IR version 8 pairs with opset 17.
const IR_VERSION: i64 = 8;

/// Element types narx graphs use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F32,
    F16,
    I64,
    Bool,
    /// Quantised weights (QDQ models).
    I8,
}

impl DType {
    pub fn onnx(self) -> DataType {
        match self {
            DType::F32 => DataType::Float,
            DType::F16 => DataType::Float16,
            DType::I64 => DataType::Int64,
            DType::Bool => DataType::Bool,
            DType::I8 => DataType::Int8,
        }
    }

    pub fn from_onnx(code: i32) -> Option<DType> {
        match DataType::try_from(code).ok()? {
            DataType::Float => Some(DType::F32),
            DataType::Float16 => Some(DType::F16),
            DataType::Int64 => Some(DType::I64),
            DataType::Bool => Some(DType::Bool),
            DataType::Int8 => Some(DType::I8),
            _ => None,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16)
    }
}

/// A dimension of a graph input or output: fixed, or named and bound at run time.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum Dim {
    Fixed(usize),
    Named(String),
}

impl Dim {
    pub fn named(name: &str) -> Dim {
        Dim::Named(name.to_string())
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::Fixed(n)
    }
}

/// A typed handle to a value of the graph under construction. It remembers which builder
/// made it, so a handle from another graph is refused instead of naming an unrelated value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Value {
    builder: u64,
    index: usize,
    dtype: DType,
}

impl Value {
    pub fn dtype(self) -> DType {
        self.dtype
    }
}

/// An attribute value of a node.
#[derive(Clone, Debug)]
pub enum Attr {
    Int(i64),
    Ints(Vec<i64>),
    Float(f32),
    Tensor(Box<TensorProto>),
}

/// Host data of a constant, already in its element type.
#[derive(Clone, Debug, PartialEq)]
pub enum ConstData {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
}

impl ConstData {
    pub fn dtype(&self) -> DType {
        match self {
            ConstData::F32(_) => DType::F32,
            ConstData::F16(_) => DType::F16,
            ConstData::I64(_) => DType::I64,
            ConstData::Bool(_) => DType::Bool,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            ConstData::F32(v) => v.len(),
            ConstData::F16(v) => v.len(),
            ConstData::I64(v) => v.len(),
            ConstData::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Little-endian bytes, as ONNX `raw_data` stores them.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match self {
            ConstData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ConstData::F16(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ConstData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ConstData::Bool(v) => v.iter().map(|&b| b as u8).collect(),
        }
    }
}

/// Builds one ONNX graph. Weights go to the [`WeightStore`] it was given.
pub struct GraphBuilder<'w> {
    /// Distinguishes this builder's [`Value`]s from every other builder's.
    id: u64,
    name: String,
    value_names: Vec<String>,
    scopes: Vec<String>,
    node_name_counts: HashMap<String, usize>,
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    initializers: Vec<TensorProto>,
    constants: HashMap<(DType, Vec<usize>, Vec<u8>), Value>,
    weights: HashMap<String, Value>,
    store: &'w mut WeightStore,
}

impl<'w> GraphBuilder<'w> {
    pub fn new(name: &str, store: &'w mut WeightStore) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        GraphBuilder {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            value_names: Vec::new(),
            scopes: Vec::new(),
            node_name_counts: HashMap::new(),
            nodes: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            initializers: Vec::new(),
            constants: HashMap::new(),
            weights: HashMap::new(),
            store,
        }
    }

    /// Runs `f` with `segment` appended to the node-name scope (`/layers.3/attn/...`).
    pub fn scoped<T>(
        &mut self,
        segment: &str,
        f: impl FnOnce(&mut Self) -> Result<T, GraphError>,
    ) -> Result<T, GraphError> {
        self.scopes.push(segment.to_string());
        let result = f(self);
        self.scopes.pop();
        result
    }

    fn new_value(&mut self, name: String, dtype: DType) -> Value {
        self.value_names.push(name);
        Value {
            builder: self.id,
            index: self.value_names.len() - 1,
            dtype,
        }
    }

    /// The name a value has in the ONNX file; an error for a handle another builder made.
    pub fn name_of(&self, value: Value) -> Result<&str, GraphError> {
        match self.value_names.get(value.index) {
            Some(name) if value.builder == self.id => Ok(name),
            _ => Err(GraphError::Invalid(format!(
                "graph {}: value handle #{} belongs to another graph",
                self.name, value.index
            ))),
        }
    }

    /// Declares a graph input.
    pub fn input(&mut self, name: &str, dtype: DType, dims: &[Dim]) -> Value {
        self.inputs.push(value_info(name, dtype, dims));
        self.new_value(name.to_string(), dtype)
    }

    /// Declares `value` a graph output named `name`: the value is renamed if a node of this
    /// graph makes it, else (a graph input, a constant, a value already output under another
    /// name) an Identity node gives it the name.
    pub fn output(&mut self, name: &str, value: Value, dims: &[Dim]) -> Result<(), GraphError> {
        if self.outputs.iter().any(|o| o.name.as_deref() == Some(name)) {
            return Err(GraphError::Invalid(format!("output {name} declared twice")));
        }
        let old = self.name_of(value)?.to_string();
        let produced_here = self.nodes.iter().any(|n| n.output.contains(&old));
        let taken = self.value_names.iter().any(|n| n == name)
            || self.outputs.iter().any(|o| o.name.as_deref() == Some(&old));
        if old != name && produced_here && !taken {
            // Rename the value where it is made and used: an Identity would copy it at every
            // run (the whole KV cache, for the `present.*` outputs).
            for node in &mut self.nodes {
                for slot in node.input.iter_mut().chain(node.output.iter_mut()) {
                    if *slot == old {
                        *slot = name.to_string();
                    }
                }
            }
            self.value_names[value.index] = name.to_string();
        } else if old != name {
            let node_name = self.unique_node_name(&format!("output.{name}"));
            self.nodes.push(NodeProto {
                name: Some(node_name),
                op_type: Some("Identity".into()),
                input: vec![old],
                output: vec![name.to_string()],
                ..Default::default()
            });
        }
        self.outputs.push(value_info(name, value.dtype, dims));
        Ok(())
    }

    fn unique_node_name(&mut self, op: &str) -> String {
        let mut base = String::new();
        for scope in &self.scopes {
            base.push('/');
            base.push_str(scope);
        }
        base.push('/');
        base.push_str(op);
        let count = self.node_name_counts.entry(base.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            base
        } else {
            format!("{base}_{}", *count - 1)
        }
    }

    /// Adds a node with the given outputs' element types; returns its outputs.
    pub fn node(
        &mut self,
        op: &str,
        inputs: &[Value],
        attrs: &[(&str, Attr)],
        output_types: &[DType],
    ) -> Result<Vec<Value>, GraphError> {
        let input_names = inputs
            .iter()
            .map(|v| Ok(self.name_of(*v)?.to_string()))
            .collect::<Result<Vec<_>, GraphError>>()
            .map_err(|e| GraphError::Invalid(format!("{op}: {e}")))?;
        let node_name = self.unique_node_name(op);
        let outputs: Vec<Value> = output_types
            .iter()
            .enumerate()
            .map(|(i, &dtype)| self.new_value(format!("{node_name}_output_{i}"), dtype))
            .collect();
        let node = NodeProto {
            name: Some(node_name),
            op_type: Some(op.to_string()),
            input: input_names,
            output: outputs
                .iter()
                .map(|v| self.value_names[v.index].clone())
                .collect(),
            attribute: attrs.iter().map(|(k, a)| attribute(k, a)).collect(),
            ..Default::default()
        };
        self.nodes.push(node);
        Ok(outputs)
    }

    /// A node with one output.
    pub fn node1(
        &mut self,
        op: &str,
        inputs: &[Value],
        attrs: &[(&str, Attr)],
        output_type: DType,
    ) -> Result<Value, GraphError> {
        Ok(self.node(op, inputs, attrs, &[output_type])?[0])
    }

    /// A pooled constant: the same data and shape give the same value.
    pub fn constant(&mut self, data: ConstData, dims: &[usize]) -> Result<Value, GraphError> {
        check_len(data.len(), dims, "constant")?;
        let dtype = data.dtype();
        let bytes = data.to_le_bytes();
        let key = (dtype, dims.to_vec(), bytes);
        if let Some(&v) = self.constants.get(&key) {
            return Ok(v);
        }
        let name = format!("const.{}", self.constants.len());
        let tensor = TensorProto {
            name: Some(name.clone()),
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(dtype.onnx() as i32),
            raw_data: Some(key.2.clone()),
            ..Default::default()
        };
        self.initializers.push(tensor);
        let value = self.new_value(name, dtype);
        self.constants.insert(key, value);
        Ok(value)
    }

    pub fn const_i64(&mut self, values: &[i64]) -> Result<Value, GraphError> {
        self.constant(ConstData::I64(values.to_vec()), &[values.len()])
    }

    /// A scalar (rank-0) float constant in `dtype`.
    pub fn scalar(&mut self, x: f32, dtype: DType) -> Result<Value, GraphError> {
        match dtype {
            DType::F32 => self.constant(ConstData::F32(vec![x]), &[]),
            DType::F16 => self.constant(ConstData::F16(vec![half::f16::from_f32(x)]), &[]),
            other => Err(GraphError::Invalid(format!(
                "float scalar requested in {other:?}"
            ))),
        }
    }

    /// A named weight. `data` is called only if the store does not hold `name` yet, so a
    /// weight shared by several graphs is converted and written once.
    pub fn weight(
        &mut self,
        name: &str,
        dtype: DType,
        dims: &[usize],
        data: impl FnOnce() -> Result<ConstData, GraphError>,
    ) -> Result<Value, GraphError> {
        if let Some(&v) = self.weights.get(name) {
            return Ok(v);
        }
        let tensor = self.store.tensor(name, dtype, dims, || {
            let data = data()?;
            if data.dtype() != dtype {
                return Err(GraphError::Invalid(format!(
                    "weight {name}: data is {:?}, declared {dtype:?}",
                    data.dtype()
                )));
            }
            check_len(data.len(), dims, name)?;
            Ok(data.to_le_bytes())
        })?;
        self.initializers.push(tensor);
        let value = self.new_value(name.to_string(), dtype);
        self.weights.insert(name.to_string(), value);
        Ok(value)
    }

    /// The finished model.
    pub fn finish(self) -> ModelProto {
        ModelProto {
            ir_version: Some(IR_VERSION),
            opset_import: vec![OperatorSetIdProto {
                domain: Some(String::new()),
                version: Some(OPSET),
            }],
            producer_name: Some("narx".into()),
            producer_version: Some(env!("CARGO_PKG_VERSION").into()),
            graph: Some(GraphProto {
                name: Some(self.name),
                node: self.nodes,
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

fn check_len(len: usize, dims: &[usize], what: &str) -> Result<(), GraphError> {
    let expected: usize = dims.iter().product();
    if len != expected {
        return Err(GraphError::Invalid(format!(
            "{what}: {len} elements for shape {dims:?} ({expected} expected)"
        )));
    }
    Ok(())
}

fn value_info(name: &str, dtype: DType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| tensor_shape_proto::Dimension {
            value: match d {
                Dim::Fixed(n) => Some(tensor_shape_proto::dimension::Value::DimValue(*n as i64)),
                // An expression such as `past+width` is computed by the graph: left unnamed
                // in the file, so engines infer it instead of binding a new symbol.
                Dim::Named(s) if !s.chars().all(|c| c.is_alphanumeric() || c == '_') => None,
                Dim::Named(s) => Some(tensor_shape_proto::dimension::Value::DimParam(s.clone())),
            },
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(dtype.onnx() as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn attribute(name: &str, attr: &Attr) -> AttributeProto {
    let mut proto = AttributeProto {
        name: Some(name.to_string()),
        ..Default::default()
    };
    match attr {
        Attr::Int(i) => {
            proto.i = Some(*i);
            proto.r#type = Some(AttributeType::Int as i32);
        }
        Attr::Ints(v) => {
            proto.ints = v.clone();
            proto.r#type = Some(AttributeType::Ints as i32);
        }
        Attr::Float(f) => {
            proto.f = Some(*f);
            proto.r#type = Some(AttributeType::Float as i32);
        }
        Attr::Tensor(t) => {
            proto.t = Some((**t).clone());
            proto.r#type = Some(AttributeType::Tensor as i32);
        }
    }
    proto
}

/// Reads a graph input's or output's element type and dims back from a model, for manifests
/// and `narx inspect`.
pub fn describe_io(info: &onnx::ValueInfoProto) -> Option<(DType, Vec<Dim>)> {
    let type_proto::Value::TensorType(tensor) = info.r#type.as_ref()?.value.as_ref()? else {
        return None;
    };
    let dtype = DType::from_onnx(tensor.elem_type?)?;
    let dims = tensor
        .shape
        .as_ref()?
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(tensor_shape_proto::dimension::Value::DimValue(n)) => Dim::Fixed(*n as usize),
            Some(tensor_shape_proto::dimension::Value::DimParam(s)) => Dim::Named(s.clone()),
            None => Dim::Named("?".into()),
        })
        .collect();
    Some((dtype, dims))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handle_from_another_builder_is_refused() {
        let mut store = WeightStore::inline();
        let mut other = GraphBuilder::new("other", &mut store);
        let foreign = other.input("x", DType::F32, &[Dim::Fixed(1)]);
        let mut store = WeightStore::inline();
        let mut b = GraphBuilder::new("this", &mut store);
        // Same index, same type as the foreign handle: only the builder tells them apart.
        let own = b.input("y", DType::F32, &[Dim::Fixed(1)]);
        assert_eq!(b.name_of(own).unwrap(), "y");
        let err = b.name_of(foreign).unwrap_err().to_string();
        assert!(err.contains("belongs to another graph"), "{err}");
        let err = b.node1("Relu", &[foreign], &[], DType::F32).unwrap_err();
        assert!(err.to_string().contains("Relu"), "{err}");
        let err = b.output("z", foreign, &[Dim::Fixed(1)]).unwrap_err();
        assert!(err.to_string().contains("another graph"), "{err}");
    }
}
