//! `narx decode`: tokens (as `narx run --tokens-out` writes them) → pictures, without
//! generating.

use std::path::PathBuf;

use clap::Args;

use super::run::{require_decoder, BackendArgs, PictureArgs};
use super::BadInput;
use narx_graphs::manifest::Manifest;
use narx_runtime::load::Purpose;

#[derive(Args)]
pub struct DecodeArgs {
    /// Model directory exported with --vq-checkpoint.
    model: PathBuf,
    /// JSON file {"tokens": [[...], ...], "grid": [rows, cols]} (grid optional: the model's).
    #[arg(long)]
    tokens: PathBuf,
    #[command(flatten)]
    pictures: PictureArgs,
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
            .map_err(|e| bad(format!("\"grid\" must be [rows, cols] ({e})")))?,
        None => default_grid.to_vec(),
    };
    Ok((tokens, grid))
}

pub fn run(args: DecodeArgs) -> anyhow::Result<()> {
    if !args.pictures.wanted() {
        return Err(BadInput(
            "say where the pictures go: -o out.png and/or --grid-image F.png".into(),
        )
        .into());
    }
    let manifest = Manifest::load(&args.model)?;
    require_decoder(&manifest)?;
    let (tokens, grid) = read_tokens(&args.tokens, &manifest.grid)?;
    let mut generator = args.backend.open(&args.model, Purpose::Decode)?;
    let images = generator.decode(&tokens, &grid)?;
    for path in args.pictures.write(&images)? {
        eprintln!("narx: wrote {}", path.display());
    }
    Ok(())
}
