//! Which tensors calibration observes, and the calibration build of a graph that hands them
//! out: every activation (an input that is neither a weight nor a graph input, such as the
//! heads' row mix) of a MatMul, Gemm or Conv node, added as an extra graph output, so the
//! engine returns it at every call.

use std::collections::{BTreeMap, HashSet};

use narx_graphs::onnx::{type_proto, ModelProto, TypeProto, ValueInfoProto};
use narx_graphs::DType;

use crate::histogram::AbsHistogram;
use crate::CalibrationError;

/// The operators whose inputs INT8 quantises.
const QUANTISED_OPS: [&str; 3] = ["MatMul", "Gemm", "Conv"];

/// The activation inputs of the quantised operators, in graph order, each once.
pub fn activation_inputs(model: &ModelProto) -> Vec<String> {
    let Some(graph) = &model.graph else {
        return Vec::new();
    };
    let not_activations: HashSet<&str> = graph
        .initializer
        .iter()
        .filter_map(|t| t.name.as_deref())
        .chain(graph.input.iter().filter_map(|i| i.name.as_deref()))
        .collect();
    let mut seen = HashSet::new();
    graph
        .node
        .iter()
        .filter(|n| QUANTISED_OPS.contains(&n.op_type.as_deref().unwrap_or("")))
        .flat_map(|n| n.input.iter().take(2))
        .filter(|name| !name.is_empty() && !not_activations.contains(name.as_str()))
        .filter(|name| seen.insert(name.to_string()))
        .cloned()
        .collect()
}

/// Adds `tensors` to the graph's outputs as float32 of unknown shape.
pub(crate) fn expose(model: &mut ModelProto, tensors: &[String]) {
    let Some(graph) = &mut model.graph else {
        return;
    };
    for name in tensors {
        if graph.output.iter().any(|o| o.name.as_deref() == Some(name)) {
            continue;
        }
        graph.output.push(ValueInfoProto {
            name: Some(name.clone()),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: Some(DType::F32.onnx() as i32),
                    shape: None,
                })),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
}

/// One histogram per observed tensor; memory stays bounded however much is observed.
#[derive(Debug, Default)]
pub(crate) struct Observations {
    histograms: BTreeMap<String, AbsHistogram>,
}

impl Observations {
    /// Starts a histogram for each tensor, so one never observed is reported rather than
    /// silently missing.
    pub(crate) fn expecting(tensors: impl IntoIterator<Item = String>) -> Self {
        Observations {
            histograms: tensors
                .into_iter()
                .map(|t| (t, AbsHistogram::default()))
                .collect(),
        }
    }

    /// Adds the values of a tensor this observer expects; others are ignored.
    pub(crate) fn observe(&mut self, tensor: &str, values: &[f32]) -> Result<(), CalibrationError> {
        match self.histograms.get_mut(tensor) {
            Some(histogram) => histogram
                .add(values)
                .map_err(|e| CalibrationError::BadInput(format!("{tensor}: {e}"))),
            None => Ok(()),
        }
    }

    pub(crate) fn histograms(&self) -> &BTreeMap<String, AbsHistogram> {
        &self.histograms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use narx_graphs::onnx::{GraphProto, NodeProto, TensorProto};

    fn node(op: &str, inputs: &[&str], output: &str) -> NodeProto {
        NodeProto {
            op_type: Some(op.into()),
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.into()],
            ..Default::default()
        }
    }

    #[test]
    fn activations_of_quantised_ops_are_found_once() {
        let mut model = ModelProto {
            graph: Some(GraphProto {
                node: vec![
                    node("MatMul", &["x", "w.T"], "y"),
                    node("Add", &["y", "bias"], "z"),
                    node("MatMul", &["q", "k"], "scores"),
                    node("MatMul", &["mix", "rows"], "mixed"),
                    node("Gemm", &["x", "w2", "c"], "g"),
                    node("Conv", &["img", "kernel", "kernel_bias"], "c1"),
                ],
                initializer: ["w.T", "w2", "c", "kernel", "kernel_bias"]
                    .iter()
                    .map(|n| TensorProto {
                        name: Some(n.to_string()),
                        ..Default::default()
                    })
                    .collect(),
                input: vec![ValueInfoProto {
                    name: Some("mix".into()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        };
        let tensors = activation_inputs(&model);
        assert_eq!(tensors, ["x", "q", "k", "rows", "img"]);
        expose(&mut model, &tensors);
        expose(&mut model, &tensors);
        let outputs: Vec<_> = model
            .graph
            .as_ref()
            .unwrap()
            .output
            .iter()
            .map(|o| o.name.clone().unwrap())
            .collect();
        assert_eq!(outputs, ["x", "q", "k", "rows", "img"]);
    }

    #[test]
    fn observations_keep_only_expected_tensors() {
        let mut seen = Observations::expecting(["a".to_string()]);
        seen.observe("a", &[1.0, -2.0]).unwrap();
        seen.observe("other", &[5.0]).unwrap();
        assert_eq!(seen.histograms().len(), 1);
        assert_eq!(seen.histograms()["a"].max(), 2.0);
        assert!(seen.observe("a", &[f32::NAN]).is_err());
    }
}
