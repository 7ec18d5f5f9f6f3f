//! `narx`: export NAR visual generators to ONNX and run them with ONNX Runtime or tract.

mod cli;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    narx_runtime::memory::keep_freed_blocks();
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            for cause in err.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(cli::exit_code(&err))
        }
    }
}
