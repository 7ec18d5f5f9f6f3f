//! INT8 calibration: what the activations feeding every MatMul, Gemm and Conv look like over
//! a calibration set, the clipping range each should be quantised with, and the tables
//! TensorRT and ONNX Runtime read those ranges from.
//!
//! - `histogram`: a streaming histogram of |x| (2048 bins) that stays exact as the range
//!   grows, so memory is bounded however many prompts are observed.
//! - [`ranges`]: the clipping range from a histogram: the maximum, a percentile, or
//!   TensorRT's entropy method.
//! - [`tables`]: TensorRT's native calibration cache and ONNX Runtime's TensorRT calibration
//!   table (`TrtTable` flatbuffers).
//! - [`observe`] and [`calibrate`]: the calibration build of the graphs (every MatMul, Gemm
//!   and Conv activation as an extra output), generations on calibration prompts, and the
//!   model directory with the tables.

pub mod calibrate;
mod histogram;
pub mod observe;
pub mod quality;
pub mod ranges;
pub mod tables;

/// Errors of calibration.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationError {
    /// The user's model, prompts or settings cannot be calibrated (exit code 2).
    #[error("{0}")]
    BadInput(String),
    #[error("calibration table: {0}")]
    Table(String),
    #[error("{0}")]
    Io(String),
    /// Running the model failed.
    #[error("{0}")]
    Run(String),
}

impl CalibrationError {
    pub fn is_bad_input(&self) -> bool {
        matches!(
            self,
            CalibrationError::BadInput(_) | CalibrationError::Table(_)
        )
    }
}
