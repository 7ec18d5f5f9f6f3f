//! From tokens to pictures with a model directory's VQ decoder graph.

use image::RgbImage;

use narx_graphs::vq::{CODES, IMAGE};

use crate::backend::{Engine, GraphKind, HostTensor};
use crate::picture::to_pixels;
use crate::RuntimeError;

/// Checks token grids before they reach the decoder: every grid has `rows × cols` tokens,
/// every token is a codebook row.
pub fn check_tokens(
    tokens: &[Vec<u32>],
    grid: &[usize],
    codebook: usize,
) -> Result<(), RuntimeError> {
    let bad = |m: String| Err(RuntimeError::BadInput(m));
    let [rows, cols] = grid else {
        return bad(format!("the decoder needs a 2-D grid, not {grid:?}"));
    };
    if tokens.is_empty() {
        return bad("no token grids to decode".into());
    }
    for (i, image) in tokens.iter().enumerate() {
        if image.len() != rows * cols {
            return bad(format!(
                "token grid {i} has {} tokens; a {rows}×{cols} grid needs {}",
                image.len(),
                rows * cols
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

/// Decodes token grids (raster order) into 8-bit RGB images.
pub fn decode<E: Engine>(
    engine: &mut E,
    tokens: &[Vec<u32>],
    grid: &[usize],
    codebook: usize,
) -> Result<Vec<RgbImage>, RuntimeError> {
    check_tokens(tokens, grid, codebook)?;
    let codes: Vec<i64> = tokens.iter().flatten().map(|&t| i64::from(t)).collect();
    let shape = vec![tokens.len(), grid[0], grid[1]];
    let input = engine.upload(HostTensor::I64(shape, codes))?;
    let mut outputs = engine.run(GraphKind::Decoder, vec![(CODES.to_string(), input)])?;
    let image = outputs
        .remove(IMAGE)
        .ok_or_else(|| RuntimeError::backend(&engine.name(), "decoder gave no image"))?;
    let (shape, data) = engine.download_f32(&image)?;
    let shape: [usize; 4] = shape.try_into().map_err(|s: Vec<usize>| {
        RuntimeError::backend(&engine.name(), format!("decoder image has shape {s:?}"))
    })?;
    to_pixels(&data, shape)
}
