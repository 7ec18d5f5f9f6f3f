//! Explicit INT8 quantisation (QDQ), the path TensorRT 10 recommends and ONNX Runtime's CPU
//! provider runs with integer kernels: every MatMul whose second input is a weight gets
//!
//! ```text
//! x ─QuantizeLinear(s_x, 0)─DequantizeLinear(s_x, 0)─┐
//! W_int8 ────────────DequantizeLinear(s_W, 0, axis 1)─┴─MatMul─▶
//! ```
//!
//! Activations are symmetric per tensor (`s_x = amax / 127` from calibration), weights
//! symmetric per output channel (`s_W[n] = max_k |W[k, n]| / 127`, weights stored `(in, out)`
//! so the output channel is axis 1), zero points 0. The output heads, attention (both of
//! its MatMul inputs are activations), norms, softmax and rotary stay in float.

use std::collections::BTreeMap;

use crate::builder::DType;
use crate::onnx::{
    attribute_proto::AttributeType, AttributeProto, ModelProto, NodeProto, TensorProto,
};
use crate::weights::WeightStore;
use crate::GraphError;

/// Scopes whose MatMuls stay in float: the heads produce the logits.
const FLOAT_SCOPES: [&str; 1] = ["/head_"];

/// The largest INT8 magnitude used (symmetric: -127..=127).
const QMAX: f32 = 127.0;

/// Rewrites `model` into its QDQ form; `ranges` holds each activation's `amax` (`None`
/// quantises nothing and only moves the weights, for graphs that stay float such as the
/// decoders), `read` gives an initializer's bytes, and every external initializer of the
/// result goes to `store` (shared by all graphs of a model, so each weight is stored once).
pub fn quantize(
    model: &ModelProto,
    ranges: Option<&BTreeMap<String, f32>>,
    read: &dyn Fn(&TensorProto) -> Result<Vec<u8>, GraphError>,
    store: &mut WeightStore,
) -> Result<ModelProto, GraphError> {
    let mut model = model.clone();
    let graph = model
        .graph
        .as_mut()
        .ok_or_else(|| GraphError::Invalid("the model has no graph".into()))?;
    let originals: BTreeMap<String, TensorProto> = graph
        .initializer
        .drain(..)
        .filter_map(|t| Some((t.name.clone()?, t)))
        .collect();
    let mut quantised = BTreeMap::new();
    let mut nodes = Vec::with_capacity(graph.node.len());
    let mut missing = Vec::new();
    for mut node in std::mem::take(&mut graph.node) {
        let weight = node.input.get(1).and_then(|w| originals.get(w));
        let eligible = ranges.is_some()
            && node.op_type.as_deref() == Some("MatMul")
            && weight.is_some_and(|w| w.dims.len() == 2 && is_f32(w))
            && !FLOAT_SCOPES
                .iter()
                .any(|s| node.name.as_deref().unwrap_or("").contains(s));
        if !eligible {
            nodes.push(node);
            continue;
        }
        let activation = node.input[0].clone();
        let Some(&amax) = ranges.and_then(|r| r.get(&activation)) else {
            // Named once, in graph order, however many MatMuls read it.
            if !missing.contains(&activation) {
                missing.push(activation);
            }
            nodes.push(node);
            continue;
        };
        let weight = node.input[1].clone();
        let prefix = node.name.clone().unwrap_or_else(|| activation.clone());
        // The activation: quantise and dequantise with its calibrated scale.
        let scale = format!("{activation}.scale");
        let zero = format!("{activation}.zero_point");
        quantised
            .entry(scale.clone())
            .or_insert_with(|| inline_f32(&scale, &[], &[amax.max(f32::MIN_POSITIVE) / QMAX]));
        quantised
            .entry(zero.clone())
            .or_insert_with(|| inline_i8(&zero, &[], &[0]));
        let q = format!("{prefix}/input_quantized");
        let dq = format!("{prefix}/input_dequantized");
        nodes.push(qdq_node(
            "QuantizeLinear",
            &format!("{prefix}/QuantizeLinear"),
            [&activation, &scale, &zero],
            &q,
            None,
        ));
        nodes.push(qdq_node(
            "DequantizeLinear",
            &format!("{prefix}/DequantizeLinear"),
            [&q, &scale, &zero],
            &dq,
            None,
        ));
        // The weight, once per weight: INT8 per output channel.
        let w_int8 = format!("{weight}.int8");
        let w_scale = format!("{weight}.int8_scale");
        let w_zero = format!("{weight}.int8_zero_point");
        if !quantised.contains_key(&w_int8) {
            let original = &originals[&weight];
            let dims: Vec<usize> = original.dims.iter().map(|&d| d as usize).collect();
            let values = f32_values(&read(original)?, &weight)?;
            let (int8, scales) = quantise_per_column(&values, dims[0], dims[1]);
            let int8_bytes: Vec<u8> = int8.iter().map(|&v| v as u8).collect();
            quantised.insert(
                w_int8.clone(),
                store.tensor(&w_int8, DType::I8, &dims, || Ok(int8_bytes))?,
            );
            quantised.insert(w_scale.clone(), inline_f32(&w_scale, &[dims[1]], &scales));
            quantised.insert(
                w_zero.clone(),
                inline_i8(&w_zero, &[dims[1]], &vec![0; dims[1]]),
            );
        }
        let w_dq = format!("{weight}.dequantized");
        nodes.push(qdq_node(
            "DequantizeLinear",
            &format!("{prefix}/weight/DequantizeLinear"),
            [&w_int8, &w_scale, &w_zero],
            &w_dq,
            Some(1),
        ));
        node.input[0] = dq;
        node.input[1] = w_dq;
        nodes.push(node);
    }
    if !missing.is_empty() {
        return Err(GraphError::Invalid(format!(
            "the calibration table has no range for {}: it was made for a different model",
            missing.join(", ")
        )));
    }
    // Float initializers still used (embeddings, norms, heads) are carried over: inline ones
    // as they are (their names are only unique within a graph), external ones into `store`.
    let used: std::collections::HashSet<&str> = nodes
        .iter()
        .flat_map(|n| n.input.iter().map(String::as_str))
        .collect();
    let mut initializers = Vec::new();
    for (name, tensor) in &originals {
        if !used.contains(name.as_str()) {
            continue;
        }
        if tensor.external_data.is_empty() {
            initializers.push(tensor.clone());
        } else {
            let dims: Vec<usize> = tensor.dims.iter().map(|&d| d as usize).collect();
            let dtype =
                DType::from_onnx(tensor.data_type.unwrap_or_default()).ok_or_else(|| {
                    GraphError::Invalid(format!("initializer {name} has an unsupported type"))
                })?;
            initializers.push(store.tensor(name, dtype, &dims, || read(tensor))?);
        }
    }
    initializers.extend(quantised.into_values());
    graph.initializer = initializers;
    graph.node = nodes;
    Ok(model)
}

fn is_f32(tensor: &TensorProto) -> bool {
    tensor.data_type == Some(DType::F32.onnx() as i32)
}

fn f32_values(bytes: &[u8], name: &str) -> Result<Vec<f32>, GraphError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(GraphError::Invalid(format!("{name}: not float32 data")));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

/// Symmetric INT8 per column of a `(rows, cols)` row-major matrix: the values and one scale
/// per column (`max |column| / 127`; an all-zero column gets scale 1 and zeros).
fn quantise_per_column(values: &[f32], rows: usize, cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut scales = vec![0f32; cols];
    for row in values.chunks_exact(cols).take(rows) {
        for (s, v) in scales.iter_mut().zip(row) {
            *s = s.max(v.abs());
        }
    }
    scales
        .iter_mut()
        .for_each(|s| *s = if *s > 0.0 { *s / QMAX } else { 1.0 });
    let int8 = values
        .chunks_exact(cols)
        .flat_map(|row| {
            row.iter()
                .zip(&scales)
                .map(|(v, s)| (v / s).round().clamp(-QMAX, QMAX) as i8)
        })
        .collect();
    (int8, scales)
}

fn qdq_node(
    op: &str,
    name: &str,
    inputs: [&String; 3],
    output: &str,
    axis: Option<i64>,
) -> NodeProto {
    NodeProto {
        name: Some(name.to_string()),
        op_type: Some(op.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        attribute: axis
            .map(|a| AttributeProto {
                name: Some("axis".into()),
                r#type: Some(AttributeType::Int as i32),
                i: Some(a),
                ..Default::default()
            })
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

fn inline_f32(name: &str, dims: &[usize], values: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DType::F32.onnx() as i32),
        raw_data: Some(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        ..Default::default()
    }
}

fn inline_i8(name: &str, dims: &[usize], values: &[i8]) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: Some(DType::I8.onnx() as i32),
        raw_data: Some(values.iter().map(|&v| v as u8).collect()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_quantised_symmetrically() {
        // (2, 3): columns [1, -2], [0.5, 0.25], [0, 0].
        let values = [1.0, 0.5, 0.0, -2.0, 0.25, 0.0];
        let (int8, scales) = quantise_per_column(&values, 2, 3);
        assert_eq!(scales, [2.0 / 127.0, 0.5 / 127.0, 1.0]);
        assert_eq!(int8, [64, 127, 0, -127, 64, 0]);
    }

    /// An activation without a range is named once, even when the MatMuls that read it are
    /// not next to each other in the graph.
    #[test]
    fn missing_ranges_are_named_once() {
        use crate::builder::{ConstData, Dim, GraphBuilder};
        let mut store = WeightStore::inline();
        let mut b = GraphBuilder::new("t", &mut store);
        let dims = [Dim::Fixed(2), Dim::Fixed(2)];
        let x = b.input("x", DType::F32, &dims);
        let y = b.input("y", DType::F32, &dims);
        let weight = |b: &mut GraphBuilder, name: &str| {
            b.weight(name, DType::F32, &[2, 2], || {
                Ok(ConstData::F32(vec![1.0; 4]))
            })
            .unwrap()
        };
        let (w1, w2, w3) = (
            weight(&mut b, "w1"),
            weight(&mut b, "w2"),
            weight(&mut b, "w3"),
        );
        for (input, w) in [(x, w1), (y, w2), (x, w3)] {
            let out = b.matmul(input, w).unwrap();
            let name = b.name_of(out).unwrap().to_string();
            b.output(&format!("out_{name}"), out, &dims).unwrap();
        }
        let model = b.finish();
        let read = |t: &TensorProto| Ok(t.raw_data.clone().unwrap_or_default());
        let err = quantize(&model, Some(&BTreeMap::new()), &read, &mut store)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no range for x, y:"), "{err}");
    }
}
