//! Operator helpers on [`GraphBuilder`]: one method per standard ONNX operator narx uses
//! (opset 17 signatures), each checking the element types it can check at build time, then
//! the few blocks built from them that several graphs share (Linear, normalisation,
//! attention).

use crate::builder::{Attr, ConstData, DType, GraphBuilder, Value};
use crate::nar::{f32_param, transposed, ParamSource};
use crate::GraphError;

impl GraphBuilder<'_> {
    /// Checks that `value`, the `role` input of `op`, has the one type ONNX allows there.
    fn require(&self, op: &str, role: &str, value: Value, dtype: DType) -> Result<(), GraphError> {
        if value.dtype() != dtype {
            return Err(GraphError::Invalid(format!(
                "{op}: {role} {} is {:?}, not {dtype:?}",
                self.name_of(value)?,
                value.dtype()
            )));
        }
        Ok(())
    }

    fn same_type(&self, op: &str, a: Value, b: Value) -> Result<DType, GraphError> {
        if a.dtype() != b.dtype() {
            return Err(GraphError::Invalid(format!(
                "{op}: operands {} ({:?}) and {} ({:?}) differ in type",
                self.name_of(a)?,
                a.dtype(),
                self.name_of(b)?,
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

    /// A logical operator: ONNX defines `And` and `Or` on bool tensors only.
    fn logical(&mut self, op: &str, a: Value, b: Value) -> Result<Value, GraphError> {
        self.require(op, "operand", a, DType::Bool)?;
        self.require(op, "operand", b, DType::Bool)?;
        self.node1(op, &[a, b], &[], DType::Bool)
    }

    pub fn and(&mut self, a: Value, b: Value) -> Result<Value, GraphError> {
        self.logical("And", a, b)
    }

    pub fn or(&mut self, a: Value, b: Value) -> Result<Value, GraphError> {
        self.logical("Or", a, b)
    }

    /// `Where(condition, a, b)`: `a` where true, `b` elsewhere (`where` is a Rust keyword).
    pub fn where_(&mut self, condition: Value, a: Value, b: Value) -> Result<Value, GraphError> {
        self.require("Where", "condition", condition, DType::Bool)?;
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
        self.reshape_to(x, shape)
    }

    /// `Reshape` to the run-time int64 `shape` (a [`Self::shape`], say), with the conventions
    /// of [`Self::reshape`].
    pub fn reshape_to(&mut self, x: Value, shape: Value) -> Result<Value, GraphError> {
        self.require("Reshape", "shape", shape, DType::I64)?;
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
        self.require("Expand", "shape", shape, DType::I64)?;
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
        self.require("Gather", "indices", indices, DType::I64)?;
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

    /// Float32 zeros shaped like `like` (any type), via `Shape` + `ConstantOfShape`.
    pub fn zeros_like(&mut self, like: Value) -> Result<Value, GraphError> {
        let shape = self.shape(like)?;
        let tensor = crate::onnx::TensorProto {
            dims: vec![1],
            data_type: Some(DType::F32.onnx() as i32),
            raw_data: Some(ConstData::F32(vec![0.0]).to_le_bytes()),
            ..Default::default()
        };
        self.node1(
            "ConstantOfShape",
            &[shape],
            &[("value", Attr::Tensor(Box::new(tensor)))],
            DType::F32,
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

/// Float32 values as a constant of the float `dtype` (float16 or float32).
pub(crate) fn float_data(values: Vec<f32>, dtype: DType) -> ConstData {
    match dtype {
        DType::F16 => ConstData::F16(values.into_iter().map(half::f16::from_f32).collect()),
        _ => ConstData::F32(values),
    }
}

impl GraphBuilder<'_> {
    /// `y = x Wᵀ` for an upstream `Linear(inputs → outputs)` weight `name` `(outputs, inputs)`,
    /// stored transposed as `{name}.T` `(inputs, outputs)` in the dtype of `x`, so the graph
    /// needs a plain MatMul.
    pub fn linear_transposed(
        &mut self,
        x: Value,
        params: &dyn ParamSource,
        name: &str,
        inputs: usize,
        outputs: usize,
    ) -> Result<Value, GraphError> {
        let dtype = x.dtype();
        let w = self.weight(&format!("{name}.T"), dtype, &[inputs, outputs], || {
            let values = params.read_f32_exact(name, outputs * inputs)?;
            Ok(float_data(transposed(&values, outputs, inputs), dtype))
        })?;
        self.matmul(x, w)
    }

    /// `(x − mean) / √(variance + eps)` with the statistics over `axes` (kept, biased
    /// variance): LayerNorm's and GroupNorm's normalisation from opset-17 operators.
    ///
    /// ```text
    /// x ─┬─ReduceMean─┐
    ///    └──────────Sub─┬─Mul(d,d)─ReduceMean─Add(ε)─Sqrt─Reciprocal─┐
    ///                   └───────────────────────────────────────────Mul─▶
    /// ```
    pub fn normalize(&mut self, x: Value, axes: &[i64], eps: f32) -> Result<Value, GraphError> {
        let mean = self.reduce_mean(x, axes)?;
        let centred = self.sub(x, mean)?;
        let square = self.mul(centred, centred)?;
        let variance = self.reduce_mean(square, axes)?;
        let eps = self.scalar(eps, x.dtype())?;
        let variance = self.add(variance, eps)?;
        let std = self.sqrt(variance)?;
        let inv = self.reciprocal(std)?;
        self.mul(centred, inv)
    }

    /// Scaled dot-product attention, `softmax(q·kᵀ/√head_dim + bias)·v` over the last two
    /// axes. Takes the keys already transposed (`keys_t`, one key per column): each caller
    /// folds that transpose into its own change of layout.
    ///
    /// ```text
    /// q ─Mul(head_dim^−½)─┐
    /// keys_t ───────────MatMul─[Add(bias)]─Softmax(−1)─┐
    /// v ──────────────────────────────────────────────MatMul─▶
    /// ```
    pub fn attention(
        &mut self,
        q: Value,
        keys_t: Value,
        v: Value,
        bias: Option<Value>,
        head_dim: usize,
    ) -> Result<Value, GraphError> {
        let scale = self.scalar(1.0 / (head_dim as f32).sqrt(), q.dtype())?;
        let q = self.mul(q, scale)?;
        let scores = self.matmul(q, keys_t)?;
        let scores = match bias {
            Some(bias) => self.add(scores, bias)?,
            None => scores,
        };
        let probs = self.softmax(scores, -1)?;
        self.matmul(probs, v)
    }

    /// A norm's affine step, `x · γ + β`, with γ and β the float32 `{name}.weight` and
    /// `{name}.bias` read as `dims` (which may add unit axes to broadcast over `x`).
    pub fn affine(
        &mut self,
        x: Value,
        params: &dyn ParamSource,
        name: &str,
        dims: &[usize],
    ) -> Result<Value, GraphError> {
        let gamma = f32_param(self, params, &format!("{name}.weight"), dims)?;
        let beta = f32_param(self, params, &format!("{name}.bias"), dims)?;
        let scaled = self.mul(x, gamma)?;
        self.add(scaled, beta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::WeightStore;

    #[test]
    fn logical_operators_take_bool_operands_only() {
        let mut store = WeightStore::inline();
        let mut b = GraphBuilder::new("t", &mut store);
        let flags = b.input("flags", DType::Bool, &[]);
        let values = b.input("values", DType::F32, &[]);
        assert!(b.and(flags, flags).is_ok());
        assert!(b.or(flags, flags).is_ok());
        let err = b.and(flags, values).unwrap_err().to_string();
        assert!(
            err.contains("And: operand values is F32, not Bool"),
            "{err}"
        );
        let err = b.or(values, values).unwrap_err().to_string();
        assert!(err.contains("Or: operand values is F32, not Bool"), "{err}");
    }

    #[test]
    fn shapes_are_int64() {
        let mut store = WeightStore::inline();
        let mut b = GraphBuilder::new("t", &mut store);
        let x = b.input("x", DType::F32, &[]);
        let shape = b.shape(x).unwrap();
        assert!(b.reshape_to(x, shape).is_ok());
        assert!(b.expand(x, shape).is_ok());
        let err = b.reshape_to(x, x).unwrap_err().to_string();
        assert!(err.contains("Reshape: shape x is F32, not I64"), "{err}");
        let err = b.expand(x, x).unwrap_err().to_string();
        assert!(err.contains("Expand: shape x is F32, not I64"), "{err}");
    }
}
