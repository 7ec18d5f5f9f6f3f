//! Operator helpers on [`GraphBuilder`]: one method per standard ONNX operator narx uses
//! (opset 17 signatures), each checking the element types it can check at build time.

use crate::builder::{Attr, DType, GraphBuilder, Value};
use crate::GraphError;

impl GraphBuilder<'_> {
    fn same_type(&self, op: &str, a: Value, b: Value) -> Result<DType, GraphError> {
        if a.dtype() != b.dtype() {
            return Err(GraphError::Invalid(format!(
                "{op}: operands {} ({:?}) and {} ({:?}) differ in type",
                self.name_of(a),
                a.dtype(),
                self.name_of(b),
                b.dtype()
            )));
        }
        Ok(a.dtype())
    }

    fn binary(&mut self, op: &str, a: Value, b: Value) -> Result<Value, GraphError> {
        let dtype = self.same_type(op, a, b)?;
        self.node1(op, &[a, b], &[], dtype)
    }

    fn unary(&mut self, op: &str, x: Value) -> Result<Value, GraphError> {
        self.node1(op, &[x], &[], x.dtype())
    }

    fn compare(&mut self, op: &str, a: Value, b: Value) -> Result<Value, GraphError> {
        self.same_type(op, a, b)?;
        self.node1(op, &[a, b], &[], DType::Bool)
    }

    pub fn add(&mut self, a: Value, b: Value) -> Result<Value, GraphError> {
        self.binary("Add", a, b)
    }

    pub fn sub(&mut self, a: Value, b: Value) -> Result<Value, GraphError> {
        self.binary("Sub", a, b)
    }

    pub fn mul(&mut self, a: Value, b: Value) -> Result<Value, GraphError> {
        self.binary("Mul", a, b)
    }

    pub fn div(&mut self, a: Value, b: Value) -> Result<Value, GraphError> {
        self.binary("Div", a, b)
    }

    pub fn pow(&mut self, a: Value, b: Value) -> Result<Value, GraphError> {
        self.binary("Pow", a, b)
    }

    pub fn matmul(&mut self, a: Value, b: Value) -> Result<Value, GraphError> {
        self.binary("MatMul", a, b)
    }

    pub fn sqrt(&mut self, x: Value) -> Result<Value, GraphError> {
        self.unary("Sqrt", x)
    }

    pub fn reciprocal(&mut self, x: Value) -> Result<Value, GraphError> {
        self.unary("Reciprocal", x)
    }

    pub fn sigmoid(&mut self, x: Value) -> Result<Value, GraphError> {
        self.unary("Sigmoid", x)
    }

    pub fn tanh(&mut self, x: Value) -> Result<Value, GraphError> {
        self.unary("Tanh", x)
    }

    /// The Gauss error function (for exact GELU; opset 17 has no `Gelu`).
    pub fn erf(&mut self, x: Value) -> Result<Value, GraphError> {
        self.unary("Erf", x)
    }

    pub fn greater(&mut self, a: Value, b: Value) -> Result<Value, GraphError> {
        self.compare("Greater", a, b)
    }

    pub fn and(&mut self, a: Value, b: Value) -> Result<Value, GraphError> {
        self.binary("And", a, b)
    }

    pub fn or(&mut self, a: Value, b: Value) -> Result<Value, GraphError> {
        self.binary("Or", a, b)
    }

    /// `Where(condition, a, b)`: `a` where true, `b` elsewhere.
    pub fn select(&mut self, condition: Value, a: Value, b: Value) -> Result<Value, GraphError> {
        if condition.dtype() != DType::Bool {
            return Err(GraphError::Invalid(format!(
                "Where: condition {} is not bool",
                self.name_of(condition)
            )));
        }
        let dtype = self.same_type("Where", a, b)?;
        self.node1("Where", &[condition, a, b], &[], dtype)
    }

    /// Casts to `dtype`; a no-op (no node) when `x` already has it.
    pub fn cast(&mut self, x: Value, dtype: DType) -> Result<Value, GraphError> {
        if x.dtype() == dtype {
            return Ok(x);
        }
        self.node1(
            "Cast",
            &[x],
            &[("to", Attr::Int(dtype.onnx() as i64))],
            dtype,
        )
    }

    /// `Reshape` with ONNX's conventions: 0 copies the input dim, -1 is inferred.
    pub fn reshape(&mut self, x: Value, shape: &[i64]) -> Result<Value, GraphError> {
        let shape = self.const_i64(shape)?;
        self.node1("Reshape", &[x, shape], &[], x.dtype())
    }

    pub fn transpose(&mut self, x: Value, perm: &[i64]) -> Result<Value, GraphError> {
        self.node1(
            "Transpose",
            &[x],
            &[("perm", Attr::Ints(perm.to_vec()))],
            x.dtype(),
        )
    }

    pub fn concat(&mut self, parts: &[Value], axis: i64) -> Result<Value, GraphError> {
        let first = *parts
            .first()
            .ok_or_else(|| GraphError::Invalid("Concat of nothing".into()))?;
        for &p in &parts[1..] {
            self.same_type("Concat", first, p)?;
        }
        self.node1("Concat", parts, &[("axis", Attr::Int(axis))], first.dtype())
    }

    /// Splits `x` along `axis` into pieces of the given sizes.
    pub fn split(&mut self, x: Value, axis: i64, sizes: &[i64]) -> Result<Vec<Value>, GraphError> {
        let split = self.const_i64(sizes)?;
        let types = vec![x.dtype(); sizes.len()];
        self.node("Split", &[x, split], &[("axis", Attr::Int(axis))], &types)
    }

    /// `x[..., start:end, ...]` on one axis.
    pub fn slice(
        &mut self,
        x: Value,
        axis: i64,
        start: i64,
        end: i64,
    ) -> Result<Value, GraphError> {
        let starts = self.const_i64(&[start])?;
        let ends = self.const_i64(&[end])?;
        let axes = self.const_i64(&[axis])?;
        self.node1("Slice", &[x, starts, ends, axes], &[], x.dtype())
    }

    /// The run-time shape of `x`, int64 `(rank,)`.
    pub fn shape(&mut self, x: Value) -> Result<Value, GraphError> {
        self.node1("Shape", &[x], &[], DType::I64)
    }

    /// Broadcasts `x` to the int64 `shape` (numpy rules; a dim of 1 in `shape` keeps `x`'s).
    pub fn expand(&mut self, x: Value, shape: Value) -> Result<Value, GraphError> {
        if shape.dtype() != DType::I64 {
            return Err(GraphError::Invalid(format!(
                "Expand: shape {} is not int64",
                self.name_of(shape)
            )));
        }
        self.node1("Expand", &[x, shape], &[], x.dtype())
    }

    pub fn unsqueeze(&mut self, x: Value, axes: &[i64]) -> Result<Value, GraphError> {
        let axes = self.const_i64(axes)?;
        self.node1("Unsqueeze", &[x, axes], &[], x.dtype())
    }

    /// Rows of `table` picked by `indices` along axis 0.
    pub fn gather(&mut self, table: Value, indices: Value) -> Result<Value, GraphError> {
        self.gather_axis(table, indices, 0)
    }

    /// `x` indexed by int64 `indices` along `axis`.
    pub fn gather_axis(
        &mut self,
        x: Value,
        indices: Value,
        axis: i64,
    ) -> Result<Value, GraphError> {
        if indices.dtype() != DType::I64 {
            return Err(GraphError::Invalid(format!(
                "Gather: indices {} are not int64",
                self.name_of(indices)
            )));
        }
        self.node1(
            "Gather",
            &[x, indices],
            &[("axis", Attr::Int(axis))],
            x.dtype(),
        )
    }

    pub fn softmax(&mut self, x: Value, axis: i64) -> Result<Value, GraphError> {
        self.node1("Softmax", &[x], &[("axis", Attr::Int(axis))], x.dtype())
    }

    /// Mean over `axes`, keeping them (opset 17 takes the axes as an attribute).
    pub fn reduce_mean(&mut self, x: Value, axes: &[i64]) -> Result<Value, GraphError> {
        self.node1(
            "ReduceMean",
            &[x],
            &[
                ("axes", Attr::Ints(axes.to_vec())),
                ("keepdims", Attr::Int(1)),
            ],
            x.dtype(),
        )
    }

    /// Float zeros shaped like `like` (any type), via `Shape` + `ConstantOfShape`.
    pub fn zeros_like(&mut self, like: Value, dtype: DType) -> Result<Value, GraphError> {
        let shape = self.node1("Shape", &[like], &[], DType::I64)?;
        let zero = crate::builder::ConstData::F32(vec![0.0]);
        let value = match dtype {
            DType::F32 => zero,
            other => {
                return Err(GraphError::Invalid(format!(
                    "zeros_like in {other:?} is not supported"
                )))
            }
        };
        let tensor = crate::onnx::TensorProto {
            dims: vec![1],
            data_type: Some(dtype.onnx() as i32),
            raw_data: Some(value.to_le_bytes()),
            ..Default::default()
        };
        self.node1(
            "ConstantOfShape",
            &[shape],
            &[("value", Attr::Tensor(Box::new(tensor)))],
            dtype,
        )
    }

    /// 2-D convolution with stride 1 and `pad` zeros on every side (`same` output size for an
    /// odd kernel of side `2·pad + 1`); `weight` is `(out, in, kh, kw)`, `bias` `(out,)`.
    pub fn conv2d(
        &mut self,
        x: Value,
        weight: Value,
        bias: Value,
        pad: i64,
    ) -> Result<Value, GraphError> {
        let dtype = self.same_type("Conv", x, weight)?;
        self.same_type("Conv", x, bias)?;
        self.node1(
            "Conv",
            &[x, weight, bias],
            &[("pads", Attr::Ints(vec![pad; 4]))],
            dtype,
        )
    }
}
