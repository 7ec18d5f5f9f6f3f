//! The command line: one file per subcommand.

mod backend;
mod bench;
mod calibrate;
mod check;
mod decode;
mod demo;
mod export;
mod inspect;
mod output;
mod package;
mod run;

use clap::{Parser, Subcommand};

use narx_calibration::CalibrationError;
use narx_export::checkpoint::CheckpointError;
use narx_export::ExportError;
use narx_graphs::GraphError;
use narx_runtime::RuntimeError;

#[derive(Parser)]
#[command(
    name = "narx",
    version,
    about = "Export NAR visual generators to ONNX and run them fast"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Export a NAR checkpoint to a model directory (ONNX graphs + manifest).
    Export(export::ExportArgs),
    /// Generate token grids with an exported model.
    Run(run::RunArgs),
    /// Measure generation speed: seconds per image, GFLOP/s, memory.
    Bench(bench::BenchArgs),
    /// INT8 ranges from generations on calibration prompts: TensorRT and ONNX Runtime tables.
    Calibrate(calibrate::CalibrateArgs),
    /// Check a model directory against what TensorRT's ONNX parser accepts.
    Check(check::CheckArgs),
    /// Decode tokens (from `narx run --tokens-out`) into pictures or video clips.
    Decode(decode::DecodeArgs),
    /// Show what a model directory holds.
    Inspect(inspect::InspectArgs),
    /// Bundle a model directory for a board: graphs, weights, TensorRT engines, a README.
    Package(package::PackageArgs),
    /// Build a small random-weight model, export it and generate: the whole pipeline with
    /// nothing downloaded.
    Demo(demo::DemoArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Export(args) => export::run(args),
        Command::Run(args) => run::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Calibrate(args) => calibrate::run(args),
        Command::Check(args) => check::run(args),
        Command::Decode(args) => decode::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Package(args) => package::run(args),
        Command::Demo(args) => demo::run(args),
    }
}

/// An error in what the user asked for (flags, files, values): exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

/// 2 when the user's input is at fault, 1 when something failed on the way.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        let bad = if cause.is::<BadInput>() {
            true
        } else if let Some(e) = cause.downcast_ref::<ExportError>() {
            e.is_bad_input()
        } else if let Some(e) = cause.downcast_ref::<RuntimeError>() {
            e.is_bad_input()
        } else if let Some(e) = cause.downcast_ref::<CalibrationError>() {
            e.is_bad_input()
        } else if let Some(e) = cause.downcast_ref::<GraphError>() {
            !matches!(e, GraphError::Io { .. })
        } else {
            cause
                .downcast_ref::<CheckpointError>()
                .is_some_and(CheckpointError::is_bad_input)
        };
        if bad {
            return 2;
        }
    }
    1
}
