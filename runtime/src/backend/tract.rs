//! The embedded backend: tract, pure Rust, no native library. Graphs are optimised once at
//! load with their symbolic dimensions (`batch`, `width`, `past`) left open, so one plan
//! serves every wavefront width and cache length; matmuls run on tract's multi-threaded
//! executor.

use std::collections::HashMap;
use std::path::Path;

use narx_graphs::DType;
use tract_onnx::prelude::*;

use super::{Engine, GraphKind, GraphPaths, HostTensor};
use crate::RuntimeError;

const BACKEND: &str = "tract";

struct LoadedGraph {
    plan: Arc<TypedSimplePlan>,
    inputs: Vec<String>,
    outputs: Vec<String>,
}

/// A model's graphs, optimised by tract.
pub struct TractEngine {
    graphs: HashMap<GraphKind, LoadedGraph>,
}

impl TractEngine {
    /// Loads and optimises the graphs; `threads` sizes the matmul thread pool (default: the
    /// number of cores).
    pub fn load(paths: &GraphPaths, threads: Option<usize>) -> Result<Self, RuntimeError> {
        let threads = threads
            .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
            .unwrap_or(1)
            .max(1);
        let options = RunOptions {
            executor: Some(multithread::Executor::multithread(threads)),
            ..RunOptions::default()
        };
        let graphs = paths
            .iter()
            .map(|&(kind, path)| Ok((kind, load_graph(path, &options)?)))
            .collect::<Result<_, RuntimeError>>()?;
        Ok(TractEngine { graphs })
    }
}

fn load_graph(path: &Path, options: &RunOptions) -> Result<LoadedGraph, RuntimeError> {
    let fail = |stage: &str, e: TractError| {
        RuntimeError::backend(BACKEND, format!("{} ({stage}): {e:#}", path.display()))
    };
    let model = tract_onnx::onnx()
        .model_for_path(path)
        .map_err(|e| fail("load", e))?;
    let inputs = model
        .input_outlets()
        .map_err(|e| fail("inputs", e))?
        .iter()
        .map(|o| model.node(o.node).name.clone())
        .collect();
    let outputs = model
        .output_outlets()
        .map_err(|e| fail("outputs", e))?
        .iter()
        .map(|&o| {
            model
                .outlet_label(o)
                .map(str::to_string)
                .unwrap_or_else(|| model.node(o.node).name.clone())
        })
        .collect();
    let plan = model
        .into_optimized()
        .map_err(|e| fail("optimise", e))?
        .into_runnable_with_options(options)
        .map_err(|e| fail("plan", e))?;
    Ok(LoadedGraph {
        plan,
        inputs,
        outputs,
    })
}

impl Engine for TractEngine {
    type Value = TValue;

    fn name(&self) -> String {
        BACKEND.to_string()
    }

    fn upload(&self, tensor: HostTensor) -> Result<TValue, RuntimeError> {
        let tensor = match &tensor {
            HostTensor::F32(shape, data) => Tensor::from_shape(shape, data),
            HostTensor::I64(shape, data) => Tensor::from_shape(shape, data),
            HostTensor::Bool(shape, data) => Tensor::from_shape(shape, data),
            HostTensor::Empty(dtype, shape) => Tensor::zero_dt(datum_type(*dtype), shape),
        }
        .map_err(|e| RuntimeError::backend(BACKEND, format!("input tensor: {e:#}")))?;
        Ok(tensor.into_tvalue())
    }

    fn download_f32(&self, value: &TValue) -> Result<(Vec<usize>, Vec<f32>), RuntimeError> {
        let not_f32 = |e: TractError| {
            RuntimeError::backend(BACKEND, format!("output is not plain float32: {e:#}"))
        };
        let view = value.try_as_plain_ram().map_err(not_f32)?;
        let data = view.as_slice::<f32>().map_err(not_f32)?.to_vec();
        Ok((value.shape().to_vec(), data))
    }

    fn has(&self, graph: GraphKind) -> bool {
        self.graphs.contains_key(&graph)
    }

    fn run(
        &mut self,
        kind: GraphKind,
        inputs: Vec<(String, TValue)>,
    ) -> Result<HashMap<String, TValue>, RuntimeError> {
        let graph = self
            .graphs
            .get(&kind)
            .ok_or_else(|| super::not_loaded(BACKEND, kind))?;
        let mut by_name: HashMap<String, TValue> = inputs.into_iter().collect();
        let mut ordered = TVec::new();
        for name in &graph.inputs {
            let value = by_name.remove(name).ok_or_else(|| {
                RuntimeError::backend(BACKEND, format!("{kind} graph: input {name} not given"))
            })?;
            ordered.push(value);
        }
        if let Some(extra) = by_name.keys().next() {
            return Err(RuntimeError::backend(
                BACKEND,
                format!("{kind} graph has no input {extra}"),
            ));
        }
        let outputs = graph
            .plan
            .run(ordered)
            .map_err(|e| RuntimeError::backend(BACKEND, format!("{kind} graph: {e:#}")))?;
        Ok(graph.outputs.iter().cloned().zip(outputs).collect())
    }
}

fn datum_type(dtype: DType) -> DatumType {
    match dtype {
        DType::F32 => f32::datum_type(),
        DType::F16 => f16::datum_type(),
        DType::I64 => i64::datum_type(),
        DType::Bool => bool::datum_type(),
        DType::I8 => i8::datum_type(),
    }
}
