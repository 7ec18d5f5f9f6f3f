//! ONNX graphs for narx: the protobuf types, a typed graph builder, the NAR graphs and the
//! manifest (`narx.json`) that is the contract between export and run.
//!
//! This crate has no inference engine in it: export needs only this, and it compiles fast.

pub mod builder;
pub mod check;
pub mod larp;
pub mod manifest;
pub mod nar;
mod ops;
pub mod qdq;
pub mod select;
pub mod vq;
pub mod weights;

/// ONNX protobuf messages, generated from `protos/onnx.proto` by `protogen/` (committed; no
/// `protoc` at build time).
#[allow(clippy::all)]
#[rustfmt::skip]
pub mod onnx;

use std::path::Path;

pub use builder::{DType, Dim, GraphBuilder, Value};

/// Errors while building graphs or reading manifests.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error("graph construction: {0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Param(String),
    #[error("manifest {path}: {message}")]
    Manifest { path: String, message: String },
}

impl GraphError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        GraphError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Serialises a model to ONNX protobuf bytes.
pub fn encode_model(model: &onnx::ModelProto) -> Vec<u8> {
    prost::Message::encode_to_vec(model)
}

/// Parses ONNX protobuf bytes (used to inspect and check written graphs).
pub fn decode_model(bytes: &[u8]) -> Result<onnx::ModelProto, GraphError> {
    prost::Message::decode(bytes)
        .map_err(|e| GraphError::Invalid(format!("not an ONNX model: {e}")))
}
