//! Inference backends. Each implements [`Engine`]: run one of a model's graphs on named
//! inputs, with tensors that stay in the backend's own form between calls, so the KV cache
//! is handed from one call's outputs to the next call's inputs without a host copy.
//!
//! - `tract`: embedded, pure Rust, always available.
//! - `ort`: ONNX Runtime, loaded at run time from its shared library, on its CPU, CUDA or
//!   TensorRT execution provider (`providers`).

pub mod ort;
pub mod providers;
pub mod tract;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use narx_graphs::DType;

use crate::RuntimeError;

/// Which graph of a model directory to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GraphKind {
    Prefill,
    Step,
    /// Assembly, guidance and top-k of a call's logits (`narx_graphs::select`).
    Select,
    /// The tokenizer's decoder, VQ (pictures) or LARP (clips): tokens → pixels.
    Decoder,
}

impl fmt::Display for GraphKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GraphKind::Prefill => "prefill",
            GraphKind::Step => "step",
            GraphKind::Select => "select",
            GraphKind::Decoder => "decoder",
        })
    }
}

/// A host tensor fed to a graph.
#[derive(Clone, Debug, PartialEq)]
pub enum HostTensor {
    F32(Vec<usize>, Vec<f32>),
    I64(Vec<usize>, Vec<i64>),
    Bool(Vec<usize>, Vec<bool>),
    /// A tensor with a zero-length dimension, of any element type (an empty cache).
    Empty(DType, Vec<usize>),
}

impl HostTensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            HostTensor::F32(s, _)
            | HostTensor::I64(s, _)
            | HostTensor::Bool(s, _)
            | HostTensor::Empty(_, s) => s,
        }
    }
}

/// A model's graphs loaded on one backend.
pub trait Engine {
    /// A tensor in the backend's own form (on its device, where it has one).
    type Value;

    /// The backend and provider, for messages (`tract`, `onnxruntime-cpu`).
    fn name(&self) -> String;

    /// Moves a host tensor into the backend.
    fn upload(&self, tensor: HostTensor) -> Result<Self::Value, RuntimeError>;

    /// Copies a float32 tensor to the host: its shape and data.
    fn download_f32(&self, value: &Self::Value) -> Result<(Vec<usize>, Vec<f32>), RuntimeError>;

    /// Whether `graph` is loaded.
    fn has(&self, graph: GraphKind) -> bool;

    /// Runs `graph`; returns every graph output by name.
    fn run(
        &mut self,
        graph: GraphKind,
        inputs: Vec<(String, Self::Value)>,
    ) -> Result<HashMap<String, Self::Value>, RuntimeError>;
}

/// The graphs an engine loads: which graph is in which file.
pub type GraphPaths<'a> = [(GraphKind, &'a Path)];

/// The error for running a graph the engine did not load.
pub(crate) fn not_loaded(backend: &str, kind: GraphKind) -> RuntimeError {
    RuntimeError::backend(backend, format!("the {kind} graph is not loaded"))
}
