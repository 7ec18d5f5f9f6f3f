//! `narx package`: a model directory → a bundle for a board (`.tar` or a directory).

use std::path::PathBuf;

use clap::Args;

use narx_export::package::package;

#[derive(Args)]
pub struct PackageArgs {
    /// Model directory written by `narx export` (and run, if its TensorRT engines should go
    /// along).
    model: PathBuf,
    /// The bundle: `NAME.tar` for an archive, anything else for a directory.
    #[arg(short, long)]
    output: PathBuf,
    /// Replace an existing bundle.
    #[arg(long)]
    force: bool,
}

pub fn run(args: PackageArgs) -> anyhow::Result<()> {
    let bundle = package(&args.model, &args.output, args.force)?;
    println!(
        "packaged {} files ({:.1} MiB) into {}",
        bundle.files.len(),
        bundle.bytes as f64 / f64::from(1u32 << 20),
        args.output.display()
    );
    for file in &bundle.files {
        println!("  {file}");
    }
    Ok(())
}
