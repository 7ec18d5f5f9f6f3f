//! From checkpoints to model directories: checkpoint readers (safetensors, PyTorch `.pt`),
//! presets, `narx export`, which writes the ONNX graphs, one weight file and the manifest,
//! and `narx package`, which bundles a model directory for a deployment target.

pub mod checkpoint;
pub mod model_dir;
pub mod package;
pub mod presets;
pub mod random;

use narx_graphs::GraphError;

use checkpoint::CheckpointError;

/// Errors of `narx export`.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("{origin} does not fit the model:\n  {}", problems.join("\n  "))]
    Parameters {
        origin: String,
        problems: Vec<String>,
    },
    #[error("{0}")]
    Usage(String),
    /// The output path the user gave cannot be written as asked (exit code 2).
    #[error("output {path}: {message}")]
    Output { path: String, message: String },
    /// Writing the output failed for a reason that is not the user's input, such as a full
    /// disk (exit code 1).
    #[error("output {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl ExportError {
    /// Whether the user's input is at fault (exit code 2) rather than the machine (1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            ExportError::Graph(GraphError::Io { .. }) | ExportError::Io { .. } => false,
            ExportError::Checkpoint(e) => e.is_bad_input(),
            _ => true,
        }
    }
}
