//! `narx decode`: tokens (as `narx run --tokens-out` writes them) → pictures or clips,
//! without generating.

use std::path::PathBuf;

use clap::Args;

use super::backend::BackendArgs;
use super::output::OutputArgs;
use super::BadInput;
use narx_graphs::manifest::Manifest;
use narx_runtime::load::Purpose;

#[derive(Args)]
pub struct DecodeArgs {
    /// Model directory exported with --vq-checkpoint or --larp-checkpoint.
    model: PathBuf,
    /// JSON file {"tokens": [[...], ...], "grid": [rows, cols] or [T, H, W]} (grid optional:
    /// the model's).
    #[arg(long)]
    tokens: PathBuf,
    #[command(flatten)]
    outputs: OutputArgs,
    #[command(flatten)]
    backend: BackendArgs,
}

/// Reads a token file: the grids (raster order) and their grid shape.
fn read_tokens(
    path: &PathBuf,
    default_grid: &[usize],
) -> anyhow::Result<(Vec<Vec<u32>>, Vec<usize>)> {
    let bad = |m: String| BadInput(format!("{}: {m}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let tokens: Vec<Vec<u32>> = serde_json::from_value(value["tokens"].clone()).map_err(|e| {
        bad(format!(
            "\"tokens\" must be a list of lists of non-negative integers ({e})"
        ))
    })?;
    let grid = match value.get("grid") {
        Some(grid) => serde_json::from_value(grid.clone())
            .map_err(|e| bad(format!("\"grid\" must be a list of extents ({e})")))?,
        None => default_grid.to_vec(),
    };
    Ok((tokens, grid))
}

pub fn run(args: DecodeArgs) -> anyhow::Result<()> {
    if !args.outputs.wanted() {
        return Err(BadInput(
            "say where the output goes: -o out.png (pictures) or -o clip.gif (video), \
             --grid-image, or --frames-dir"
                .into(),
        )
        .into());
    }
    let manifest = Manifest::load(&args.model)?;
    args.outputs.check(&manifest)?;
    let (tokens, grid) = read_tokens(&args.tokens, &manifest.grid)?;
    let mut generator = args.backend.open(&args.model, Purpose::Decode, None)?;
    let decoded = generator.decode(&tokens, &grid)?;
    for path in args.outputs.write(&decoded)? {
        eprintln!("narx: wrote {}", path.display());
    }
    Ok(())
}
