//! From tokens to pictures or clips with a model directory's decoder graph: the VQ decoder
//! for images, the LARP decoder for video.

use image::RgbImage;

use narx_graphs::manifest::Manifest;
use narx_graphs::{larp, vq};

use crate::backend::{Engine, GraphKind, HostTensor};
use crate::picture::to_pixels;
use crate::video::{to_clips, Clip};
use crate::RuntimeError;

/// What a decoder made.
pub enum Decoded {
    Pictures(Vec<RgbImage>),
    Clips(Vec<Clip>),
}

/// Checks token grids before they reach the decoder: every grid has the grid's number of
/// cells, every token is a codebook row.
fn check_tokens(tokens: &[Vec<u32>], grid: &[usize], codebook: usize) -> Result<(), RuntimeError> {
    let bad = |m: String| Err(RuntimeError::BadInput(m));
    if tokens.is_empty() {
        return bad("no token grids to decode".into());
    }
    let cells: usize = grid.iter().product();
    let shape = grid
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("×");
    for (i, image) in tokens.iter().enumerate() {
        if image.len() != cells {
            return bad(format!(
                "token grid {i} has {} tokens; a {shape} grid needs {cells}",
                image.len(),
            ));
        }
        if let Some((cell, &token)) = image
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= codebook)
        {
            return bad(format!(
                "token {token} (grid {i}, cell {cell}) is outside the codebook 0..{}",
                codebook - 1
            ));
        }
    }
    Ok(())
}

/// Decodes token grids (raster order) with the directory's decoder: pictures for an image
/// model, clips for a video model. The grid must be the one the decoder was exported for.
pub fn decode<E: Engine>(
    engine: &mut E,
    manifest: &Manifest,
    tokens: &[Vec<u32>],
    grid: &[usize],
) -> Result<Decoded, RuntimeError> {
    if let Some(decoder) = &manifest.vq_decoder {
        let [rows, cols] = grid else {
            return Err(RuntimeError::BadInput(format!(
                "the VQ decoder needs a 2-D grid, not {grid:?}"
            )));
        };
        check_tokens(tokens, grid, decoder.config.codebook_size)?;
        let shape = vec![tokens.len(), *rows, *cols];
        let image = run_decoder(engine, tokens, shape, vq::CODES, vq::IMAGE)?;
        let shape = image.0.try_into().map_err(|s: Vec<usize>| {
            RuntimeError::backend(&engine.name(), format!("decoder image has shape {s:?}"))
        })?;
        return Ok(Decoded::Pictures(to_pixels(&image.1, shape)?));
    }
    if let Some(decoder) = &manifest.larp_decoder {
        if grid != manifest.grid.as_slice() {
            return Err(RuntimeError::BadInput(format!(
                "the LARP decoder reads {:?} grids, not {grid:?}",
                manifest.grid
            )));
        }
        check_tokens(tokens, grid, decoder.config.codebook_size())?;
        let shape = vec![tokens.len(), grid.iter().product()];
        let video = run_decoder(engine, tokens, shape, larp::CODES, larp::VIDEO)?;
        let shape = video.0.try_into().map_err(|s: Vec<usize>| {
            RuntimeError::backend(&engine.name(), format!("decoder video has shape {s:?}"))
        })?;
        return Ok(Decoded::Clips(to_clips(&video.1, shape)?));
    }
    Err(RuntimeError::BadInput(
        "this model directory has no decoder (export with --vq-checkpoint or --larp-checkpoint)"
            .into(),
    ))
}

/// Runs the decoder graph on `tokens` laid out as `shape`; returns its float output.
fn run_decoder<E: Engine>(
    engine: &mut E,
    tokens: &[Vec<u32>],
    shape: Vec<usize>,
    input: &str,
    output: &str,
) -> Result<(Vec<usize>, Vec<f32>), RuntimeError> {
    let codes: Vec<i64> = tokens.iter().flatten().map(|&t| i64::from(t)).collect();
    let codes = engine.upload(HostTensor::I64(shape, codes))?;
    let mut outputs = engine.run(GraphKind::Decoder, vec![(input.to_string(), codes)])?;
    let value = outputs.remove(output).ok_or_else(|| {
        RuntimeError::backend(&engine.name(), format!("decoder gave no {output}"))
    })?;
    engine.download_f32(&value)
}
