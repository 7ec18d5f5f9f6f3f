//! `narx check`: would this model directory deploy? A static check against what TensorRT's
//! ONNX parser accepts, listing each problem with the graph and node it is in.

use std::path::PathBuf;

use clap::{Args, ValueEnum};

use narx_graphs::check::{check_tensorrt, Severity, TensorRtTarget};

use super::BadInput;

#[derive(Args)]
pub struct CheckArgs {
    /// Model directory written by `narx export`.
    model: PathBuf,
    /// What to check against.
    #[arg(long, value_enum, default_value = "tensorrt")]
    target: Target,
    /// TensorRT version: 10 (JetPack 6.1+, current GPUs) or 8.6 (JetPack 6.0).
    #[arg(long, default_value = "10")]
    trt_version: String,
}

#[derive(Clone, Copy, ValueEnum)]
enum Target {
    Tensorrt,
}

/// Prints every problem; fails (exit 1) when any is an error.
pub fn run(args: CheckArgs) -> anyhow::Result<()> {
    let Target::Tensorrt = args.target;
    let target: TensorRtTarget = args
        .trt_version
        .parse()
        .map_err(|e| BadInput(format!("--trt-version: {e}")))?;
    let problems = check_tensorrt(&args.model, &target)?;
    for problem in &problems {
        println!("{problem}");
    }
    let errors = problems
        .iter()
        .filter(|p| p.severity == Severity::Error)
        .count();
    let warnings = problems.len() - errors;
    if errors > 0 {
        anyhow::bail!(
            "{}: {errors} error(s) and {warnings} warning(s) for {target}",
            args.model.display()
        );
    }
    println!(
        "{}: passes {target} ({warnings} warning(s))",
        args.model.display()
    );
    Ok(())
}
