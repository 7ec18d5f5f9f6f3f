//! Running exported NAR models: backends, the wavefront scheduler, guidance and sampling, and
//! the generation loop that ties them together, and what turns tokens into pictures and clips.

pub mod backend;
pub mod decode;
pub mod flops;
pub mod generate;
pub mod guidance;
pub mod load;
pub mod memory;
pub mod picture;
pub mod sampling;
pub mod scheduler;
pub mod video;

/// Errors while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The ONNX Runtime shared library could not be found or loaded.
    #[error("ONNX Runtime library not available: {0}")]
    OrtLibrary(String),
    /// An execution provider is missing from ONNX Runtime or cannot start (no GPU, a CUDA,
    /// cuDNN or TensorRT library missing): the machine, not the input, is at fault.
    #[error("{0}")]
    Provider(String),
    /// A backend failed to load or run a graph.
    #[error("{backend}: {message}")]
    Backend { backend: String, message: String },
    /// The user asked for something the model cannot do (bad class, wrong caption shape, ...).
    #[error("{0}")]
    BadInput(String),
    #[error(transparent)]
    Plan(#[from] scheduler::PlanError),
    #[error(transparent)]
    Guidance(#[from] guidance::GuidanceError),
    #[error(transparent)]
    Sampling(#[from] sampling::SamplingError),
    #[error(transparent)]
    Manifest(#[from] narx_graphs::GraphError),
}

impl RuntimeError {
    /// Whether the user's input is at fault (exit code 2) rather than the machine (1).
    pub fn is_bad_input(&self) -> bool {
        match self {
            RuntimeError::BadInput(_) | RuntimeError::OrtLibrary(_) => true,
            RuntimeError::Guidance(e) => matches!(e, guidance::GuidanceError::InvalidScale(_)),
            // The settings are the user's; a row the model made non-finite, or a worker
            // that died, is not.
            RuntimeError::Sampling(e) => matches!(
                e,
                sampling::SamplingError::InvalidTemperature(_)
                    | sampling::SamplingError::InvalidTopP(_)
            ),
            RuntimeError::Manifest(e) => !matches!(e, narx_graphs::GraphError::Io { .. }),
            RuntimeError::Backend { .. } | RuntimeError::Plan(_) | RuntimeError::Provider(_) => {
                false
            }
        }
    }

    pub fn backend(backend: &str, message: impl std::fmt::Display) -> Self {
        RuntimeError::Backend {
            backend: backend.to_string(),
            message: message.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_the_users_fault_and_model_faults_are_not() {
        let bad_settings = [
            RuntimeError::from(sampling::SamplingError::InvalidTopP(2.0)),
            RuntimeError::from(sampling::SamplingError::InvalidTemperature(-1.0)),
            RuntimeError::from(guidance::GuidanceError::InvalidScale(f32::NAN)),
        ];
        assert!(bad_settings.iter().all(RuntimeError::is_bad_input));
        let failures = [
            RuntimeError::from(sampling::SamplingError::NonFiniteLogit {
                index: 3,
                value: f32::NAN,
            }),
            RuntimeError::from(sampling::SamplingError::WorkerPanicked),
            RuntimeError::from(guidance::GuidanceError::LengthMismatch {
                what: "uncond logits",
                expected: 2,
                got: 1,
            }),
        ];
        assert!(!failures.iter().any(RuntimeError::is_bad_input));
    }
}
