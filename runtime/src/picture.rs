//! From decoder output to files: 8-bit pixels, the contact sheet, PNG/GIF writing and the
//! wavefront trace animation.
//!
//! Pixel conversion and the sheet follow upstream's sampler, `save_image(normalize=True,
//! value_range=(-1, 1), nrow=4)` (NAR-SPEC §6 "To 8-bit pixels"), so a sheet written here is
//! byte-for-byte what upstream would save for the same decoder output.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use image::codecs::gif::{GifEncoder, Repeat};
use image::codecs::png::PngEncoder;
use image::{Delay, ExtendedColorType, Frame, ImageEncoder, Rgb, RgbImage, Rgba, RgbaImage};

use crate::scheduler::WavefrontPlan;
use crate::RuntimeError;

/// Images per contact-sheet row in upstream's samplers (`nrow=4`).
pub const SHEET_COLUMNS: usize = 4;

/// Padding around and between contact-sheet tiles, in pixels (`make_grid`'s default).
pub const SHEET_PADDING: usize = 2;

/// Colour of the 1-px outline that marks the cells produced by the latest call in a trace
/// frame.
pub const OUTLINE: Rgb<u8> = Rgb([255, 255, 255]);

/// How long the last GIF frame is held, as a multiple of the frame delay, so the finished
/// image is visible before the loop restarts.
pub const LAST_FRAME_HOLD: u32 = 3;

/// NeuQuant speed for GIF palettes: the encoder's default (1) takes seconds per 512² frame;
/// 10 is the `gif` crate's recommended trade-off and looks the same at these sizes.
const GIF_SPEED: i32 = 10;

/// Converts one float to 8 bits exactly as `save_image(normalize=True, value_range=(-1, 1))`.
///
/// In f32 and in upstream's order: clamp to [-1, 1], `+1`, `/2`, `·255`, `+0.5`, clamp to
/// [0, 255], truncate. NaN survives both clamps (as in torch) and truncates to 0, which is
/// what torch's float→uint8 cast gives on CPU; ±∞ clamp to 255 and 0.
pub fn to_u8(x: f32) -> u8 {
    let normalized = (x.clamp(-1.0, 1.0) + 1.0) / 2.0;
    // `as` truncates toward zero and maps NaN to 0.
    (normalized * 255.0 + 0.5).clamp(0.0, 255.0) as u8
}

/// A `w × h` RGB image from its three float planes, each value converted by `to_u8`; `None`
/// when the planes do not hold `w × h` values.
pub(crate) fn interleave(
    [r, g, b]: [&[f32]; 3],
    w: u32,
    h: u32,
    to_u8: fn(f32) -> u8,
) -> Option<RgbImage> {
    let data = r
        .iter()
        .zip(g)
        .zip(b)
        .flat_map(|((&r, &g), &b)| [to_u8(r), to_u8(g), to_u8(b)])
        .collect();
    RgbImage::from_raw(w, h, data)
}

/// Turns decoder output (NCHW float32, nominally in [-1, 1]) into one RGB image per batch item.
///
/// A wrong length or channel count means the decoder graph produced something other than
/// what it was exported to, so it is reported as a backend error, not bad user input.
pub fn to_pixels(image: &[f32], shape: [usize; 4]) -> Result<Vec<RgbImage>, RuntimeError> {
    let (w, h) = check_rgb_output("decoder output", image.len(), &shape)?;
    let plane = shape[2] * shape[3];
    let bad = |message: String| RuntimeError::backend("decoder output", message);
    image
        .chunks_exact(3 * plane)
        .map(|item| {
            let (r, rest) = item.split_at(plane);
            let (g, b) = rest.split_at(plane);
            interleave([r, g, b], w, h, to_u8)
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad(format!("shape {shape:?} does not form images")))
}

/// Checks a decoder output laid out `(batch, 3, …, height, width)` against its data length:
/// three channels, the right number of values, non-empty items (an empty batch is fine) and
/// a frame size that fits an image. Returns `(width, height)`. A mismatch means the decoder graph produced something
/// other than what it was exported to, so it is a backend error.
pub(crate) fn check_rgb_output(
    what: &str,
    len: usize,
    shape: &[usize],
) -> Result<(u32, u32), RuntimeError> {
    let bad = |message: String| RuntimeError::backend(what, message);
    let (channels, height, width) = match shape {
        [_, c, .., h, w] => (*c, *h, *w),
        _ => {
            return Err(bad(format!(
                "shape {shape:?} is not (batch, 3, …, height, width)"
            )))
        }
    };
    if channels != 3 {
        return Err(bad(format!(
            "shape {shape:?} has {channels} channels, expected 3 (RGB)"
        )));
    }
    let expected = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
    if len != expected {
        return Err(bad(format!(
            "has {len} values, but shape {shape:?} needs {expected}"
        )));
    }
    if shape[1..].contains(&0) {
        // Items without pixels: a shape bug, and `chunks_exact(0)` would panic.
        return Err(bad(format!("shape {shape:?} has empty images")));
    }
    match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) => Ok((w, h)),
        _ => Err(bad(format!("shape {shape:?} is too large for an image"))),
    }
}

/// Tiles images into one sheet as torchvision's `make_grid(nrow=columns, padding=2)` does.
///
/// Upstream's geometry, including its two special cases: a row holds `min(columns, n)`
/// images (so 2 images with 4 columns give a 2-wide sheet), and a single image is returned
/// as is, without padding. Otherwise the sheet is `cols·(w+2)+2` by `rows·(h+2)+2` with
/// black (0, 0, 0) padding, tiles in row-major order, and unused tiles of the last row black.
pub fn contact_sheet(images: &[RgbImage], columns: usize) -> Result<RgbImage, RuntimeError> {
    let first = images
        .first()
        .ok_or_else(|| RuntimeError::BadInput("a contact sheet needs at least one image".into()))?;
    if columns == 0 {
        return Err(RuntimeError::BadInput(
            "a contact sheet needs at least one column".into(),
        ));
    }
    let (w, h) = first.dimensions();
    if let Some((i, other)) = images
        .iter()
        .enumerate()
        .find(|(_, im)| im.dimensions() != (w, h))
    {
        return Err(RuntimeError::BadInput(format!(
            "contact sheet images differ in size: image 0 is {w}×{h}, image {i} is {}×{}",
            other.width(),
            other.height()
        )));
    }
    if images.len() == 1 {
        return Ok(first.clone());
    }
    let cols = columns.min(images.len());
    let rows = images.len().div_ceil(cols);
    let pad = SHEET_PADDING as u32;
    let too_large = || {
        RuntimeError::BadInput(format!(
            "a {rows}×{cols} sheet of {w}×{h} images is too large"
        ))
    };
    let extent = |count: usize, size: u32| -> Option<u32> {
        u32::try_from(count)
            .ok()?
            .checked_mul(size.checked_add(pad)?)?
            .checked_add(pad)
    };
    let sheet_w = extent(cols, w).ok_or_else(too_large)?;
    let sheet_h = extent(rows, h).ok_or_else(too_large)?;
    // Bound the allocation the same way `to_pixels` does: 3 bytes per pixel must fit.
    (sheet_w as usize)
        .checked_mul(sheet_h as usize)
        .and_then(|p| p.checked_mul(3))
        .ok_or_else(too_large)?;
    let mut sheet = RgbImage::new(sheet_w, sheet_h);
    for (k, tile) in images.iter().enumerate() {
        // k < rows·cols, and both fit in u32 by the extent checks above.
        let x = (k % cols) as u32 * (w + pad) + pad;
        let y = (k / cols) as u32 * (h + pad) + pad;
        image::imageops::replace(&mut sheet, tile, i64::from(x), i64::from(y));
    }
    Ok(sheet)
}

/// Writes `image` as a PNG, atomically (see [`write_gif`]).
pub fn write_png(path: &Path, image: &RgbImage) -> Result<(), RuntimeError> {
    let mut bytes = Vec::new();
    PngEncoder::new(&mut bytes)
        .write_image(
            image.as_raw(),
            image.width(),
            image.height(),
            ExtendedColorType::Rgb8,
        )
        .map_err(|e| write_error(path, e))?;
    write_atomically(path, &bytes)
}

/// Writes an endlessly looping GIF: each frame shown `frame_delay_ms`, the last one
/// `last_frame_hold` times as long (the trace uses [`LAST_FRAME_HOLD`], clips 1).
///
/// GIF stores delays in hundredths of a second, so the delay is truncated to a multiple of
/// 10 ms. Each frame gets its own 256-colour palette. The file is encoded in memory, then
/// written to `.<name>.partial` beside `path` and renamed over it, so readers never see a
/// half-written file; on failure the temporary is removed and the error, a
/// [`RuntimeError::BadInput`], names `path`.
pub fn write_gif(
    path: &Path,
    frames: &[RgbImage],
    frame_delay_ms: u32,
    last_frame_hold: u32,
) -> Result<(), RuntimeError> {
    if frames.is_empty() {
        return Err(RuntimeError::BadInput(format!(
            "cannot write {}: an animation needs at least one frame",
            path.display()
        )));
    }
    let mut bytes = Vec::new();
    {
        // The encoder writes the GIF trailer when dropped, so it must go before `bytes` is used.
        let mut encoder = GifEncoder::new_with_speed(&mut bytes, GIF_SPEED);
        encoder
            .set_repeat(Repeat::Infinite)
            .map_err(|e| write_error(path, e))?;
        let last = frames.len() - 1;
        for (i, frame) in frames.iter().enumerate() {
            let ms = if i == last {
                frame_delay_ms.saturating_mul(last_frame_hold)
            } else {
                frame_delay_ms
            };
            let rgba = RgbaImage::from_fn(frame.width(), frame.height(), |x, y| {
                let [r, g, b] = frame.get_pixel(x, y).0;
                Rgba([r, g, b, 255])
            });
            let delay = Delay::from_numer_denom_ms(ms, 1);
            encoder
                .encode_frame(Frame::from_parts(rgba, 0, 0, delay))
                .map_err(|e| write_error(path, e))?;
        }
    }
    write_atomically(path, &bytes)
}

fn write_error(path: &Path, error: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::BadInput(format!("cannot write {}: {error}", path.display()))
}

/// The temporary sibling `.<name>.partial`, on the same filesystem so the rename is atomic.
fn partial_path(path: &Path) -> Result<PathBuf, RuntimeError> {
    let name = path
        .file_name()
        .ok_or_else(|| write_error(path, "the path does not name a file"))?;
    let mut partial = std::ffi::OsString::from(".");
    partial.push(name);
    partial.push(".partial");
    Ok(path.with_file_name(partial))
}

/// Writes `bytes` to a temporary sibling, syncs it and renames it over `path`, removing the
/// temporary if any step fails so a failed write leaves nothing behind. Errors are
/// [`RuntimeError::BadInput`] naming `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), RuntimeError> {
    let partial = partial_path(path)?;
    let result = File::create(&partial).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&partial, path)
    });
    result.map_err(|e| {
        // Best effort: the temporary may never have been created.
        let _ = std::fs::remove_file(&partial);
        write_error(path, e)
    })
}

/// Which cells a trace frame shows as generated: per raster cell, whether one of calls
/// `0..frame` produced it.
///
/// Frame 0 shows nothing generated and frame `calls().len()` shows everything; larger
/// frames are treated as the last. Works for any plan, though only 2-D plans can be traced.
pub fn generated_after(plan: &WavefrontPlan, frame: usize) -> Vec<bool> {
    let mut generated = vec![false; plan.cell_count()];
    for call in plan.calls().iter().take(frame) {
        for produced in call.produced() {
            if let Some(g) = generated.get_mut(produced.cell().raster()) {
                *g = true;
            }
        }
    }
    generated
}

/// The dim grey a not-yet-generated pixel is drawn in: `96 + luma/4` on all three channels,
/// with integer Rec. 601 luma `(299R + 587G + 114B)/1000`, truncated (range 96–159). It
/// keeps the image's structure readable while being clearly unlike the coloured region.
pub fn greyed(pixel: Rgb<u8>) -> Rgb<u8> {
    let [r, g, b] = pixel.0.map(u32::from);
    // At most 96 + 255000/4000 = 159, so the cast cannot truncate.
    let v = (96 + (299 * r + 587 * g + 114 * b) / 4000) as u8;
    Rgb([v, v, v])
}

/// Frames of the wavefront animation for a 2-D plan: `calls + 1` frames, frame `k` showing
/// the cells of [`generated_after`]`(plan, k)`.
///
/// In frame `k`, a pixel of a generated cell is its colour in `final_image`, except the
/// 1-px border of each cell produced by call `k − 1` (the newest wavefront), which is
/// [`OUTLINE`]; every pixel of a cell not yet generated is [`greyed`] from `final_image`.
/// Cell `(r, c)` covers rows `r·patch..(r+1)·patch` and columns `c·patch..(c+1)·patch`, so the
/// image must be exactly `cols·patch` wide and `rows·patch` tall.
pub fn trace_frames(
    final_image: &RgbImage,
    plan: &WavefrontPlan,
    patch: usize,
) -> Result<Vec<RgbImage>, RuntimeError> {
    let &[rows, cols] = plan.grid() else {
        return Err(RuntimeError::BadInput(format!(
            "a wavefront trace needs a 2-D latent grid, got {:?}",
            plan.grid()
        )));
    };
    if patch == 0 {
        return Err(RuntimeError::BadInput(
            "the patch size must be at least 1".into(),
        ));
    }
    let (w, h) = final_image.dimensions();
    let fits = |cells: usize, pixels: u32| {
        cells
            .checked_mul(patch)
            .is_some_and(|need| u32::try_from(need) == Ok(pixels))
    };
    if !fits(cols, w) || !fits(rows, h) {
        return Err(RuntimeError::BadInput(format!(
            "the image is {w}×{h} pixels, but a {rows}×{cols} grid of {patch}-pixel patches \
             needs {}×{}",
            cols.saturating_mul(patch),
            rows.saturating_mul(patch)
        )));
    }
    // The size checks make every pixel coordinate below fit in u32.
    let patch32 = patch as u32;
    let cell_of = |x: u32, y: u32| (y / patch32) as usize * cols + (x / patch32) as usize;
    let grey = RgbImage::from_fn(w, h, |x, y| greyed(*final_image.get_pixel(x, y)));

    let calls = plan.calls();
    let mut frames = Vec::with_capacity(calls.len() + 1);
    for k in 0..=calls.len() {
        let generated = generated_after(plan, k);
        let mut frame = RgbImage::from_fn(w, h, |x, y| {
            if generated[cell_of(x, y)] {
                *final_image.get_pixel(x, y)
            } else {
                *grey.get_pixel(x, y)
            }
        });
        if let Some(newest) = k.checked_sub(1).and_then(|i| calls.get(i)) {
            for produced in newest.produced() {
                if let &[r, c] = produced.cell().coords() {
                    outline(&mut frame, c as u32 * patch32, r as u32 * patch32, patch32);
                }
            }
        }
        frames.push(frame);
    }
    Ok(frames)
}

/// Paints the 1-px border of the `size`-pixel square whose top-left corner is `(x0, y0)`.
fn outline(frame: &mut RgbImage, x0: u32, y0: u32, size: u32) {
    let last = size - 1;
    for i in 0..size {
        for (dx, dy) in [(i, 0), (i, last), (0, i), (last, i)] {
            frame.put_pixel(x0 + dx, y0 + dy, OUTLINE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::AnimationDecoder;

    /// Whether pixel `(x, y)` lies on the 1-px border of its `patch`-pixel cell: the pixels that
    /// [`trace_frames`] may paint with [`OUTLINE`].
    fn on_cell_border(x: u32, y: u32, patch: u32) -> bool {
        patch != 0 && {
            let (px, py) = (x % patch, y % patch);
            px == 0 || py == 0 || px == patch - 1 || py == patch - 1
        }
    }

    const IMAGE_HEADS: [usize; 2] = [1, 0];

    #[test]
    fn pixel_mapping_hand_computed() {
        // -1 → 0·255 + 0.5 = 0.5 → 0; 1 → 255.5 → clamped 255; 0 → 127.5 + 0.5 = 128.
        assert_eq!(to_u8(-1.0), 0);
        assert_eq!(to_u8(1.0), 255);
        assert_eq!(to_u8(0.0), 128);
        // -0.5 → 63.75 + 0.5 = 64.25 → 64; 0.5 → 191.25 + 0.5 = 191.75 → 191 (truncation,
        // not rounding of the +0.5 sum).
        assert_eq!(to_u8(-0.5), 64);
        assert_eq!(to_u8(0.5), 191);
        // Around the 0↔1 step at (x+1)/2 = 0.5/255 and the 254↔255 step at 254.5/255.
        assert_eq!(to_u8(-1.0 + 0.9 / 255.0), 0);
        assert_eq!(to_u8(-1.0 + 1.1 / 255.0), 1);
        assert_eq!(to_u8(1.0 - 1.1 / 255.0), 254);
        assert_eq!(to_u8(1.0 - 0.9 / 255.0), 255);
        // Every level k is reached from the middle of its bin, (x+1)/2 = k/255.
        for k in 0..=255u8 {
            let x = f32::from(k) / 255.0 * 2.0 - 1.0;
            assert_eq!(to_u8(x), k, "x = {x}");
        }
    }

    #[test]
    fn pixel_mapping_out_of_range_and_nan() {
        assert_eq!(to_u8(1.5), 255);
        assert_eq!(to_u8(-7.0), 0);
        assert_eq!(to_u8(f32::INFINITY), 255);
        assert_eq!(to_u8(f32::NEG_INFINITY), 0);
        // torch.clamp propagates NaN and the uint8 cast of NaN gives 0.
        assert_eq!(to_u8(f32::NAN), 0);
        assert_eq!(to_u8(-f32::NAN), 0);
    }

    #[test]
    fn pixel_mapping_matches_a_wide_reference() {
        // f64 reference of the same formula; the f32 result may differ only where the exact
        // value sits within rounding distance of an integer.
        for i in -1200..=1200 {
            let x = i as f32 / 1000.0;
            let exact =
                ((f64::from(x).clamp(-1.0, 1.0) + 1.0) / 2.0 * 255.0 + 0.5).clamp(0.0, 255.0);
            if (exact - exact.round()).abs() > 1e-4 {
                assert_eq!(to_u8(x), exact as u8, "x = {x}");
            }
        }
    }

    #[test]
    fn to_pixels_lays_out_nchw() {
        // Two 1×2 images; channel planes R, G, B.
        let data = [
            -1.0,
            1.0, // item 0 R
            0.0,
            0.5, // item 0 G
            -0.5,
            f32::NAN, // item 0 B
            1.0,
            1.0, // item 1 R
            -1.0,
            -1.0, // item 1 G
            0.0,
            2.0, // item 1 B
        ];
        let images = to_pixels(&data, [2, 3, 1, 2]).unwrap();
        assert_eq!(images.len(), 2);
        assert_eq!(images[0].dimensions(), (2, 1));
        assert_eq!(images[0].get_pixel(0, 0), &Rgb([0, 128, 64]));
        assert_eq!(images[0].get_pixel(1, 0), &Rgb([255, 191, 0]));
        assert_eq!(images[1].get_pixel(0, 0), &Rgb([255, 0, 128]));
        assert_eq!(images[1].get_pixel(1, 0), &Rgb([255, 0, 255]));

        // Rows come before columns within a plane.
        let data: Vec<f32> = (0..3 * 2 * 2)
            .map(|i| if i == 2 { 1.0 } else { -1.0 })
            .collect();
        let images = to_pixels(&data, [1, 3, 2, 2]).unwrap();
        assert_eq!(images[0].get_pixel(0, 1), &Rgb([255, 0, 0]));
        assert_eq!(images[0].get_pixel(1, 0), &Rgb([0, 0, 0]));
    }

    #[test]
    fn to_pixels_rejects_bad_shapes() {
        let data = [0.0f32; 12];
        assert!(to_pixels(&data, [1, 3, 2, 2]).is_ok());
        for shape in [
            [1, 3, 2, 3],
            [2, 3, 2, 2],
            [1, 1, 3, 4],
            [3, 4, 1, 1],
            [usize::MAX, 3, 2, 2],
            [1, 3, usize::MAX, usize::MAX],
        ] {
            let err = to_pixels(&data, shape).unwrap_err();
            assert!(
                matches!(err, RuntimeError::Backend { .. }),
                "{shape:?}: {err}"
            );
        }
        assert!(to_pixels(&[], [0, 3, 4, 4]).unwrap().is_empty());
        assert!(to_pixels(&[], [2, 3, 0, 4]).is_err());
        assert!(to_pixels(&[], [usize::MAX, 3, 4, 0]).is_err());
    }

    fn solid(w: u32, h: u32, colour: [u8; 3]) -> RgbImage {
        RgbImage::from_pixel(w, h, Rgb(colour))
    }

    #[test]
    fn contact_sheet_geometry_and_padding() {
        let colours = [
            [10, 20, 30],
            [40, 50, 60],
            [70, 80, 90],
            [100, 110, 120],
            [130, 140, 150],
        ];
        let images: Vec<RgbImage> = colours.iter().map(|&c| solid(3, 2, c)).collect();
        let sheet = contact_sheet(&images, 4).unwrap();
        // 4 columns · (3 + 2) + 2 by 2 rows · (2 + 2) + 2.
        assert_eq!(sheet.dimensions(), (22, 10));
        for (x, y, p) in sheet.enumerate_pixels() {
            let tile_x = x.checked_sub(2).filter(|v| v % 5 < 3).map(|v| v / 5);
            let tile_y = y.checked_sub(2).filter(|v| v % 4 < 2).map(|v| v / 4);
            let want = match (tile_x, tile_y) {
                (Some(tx), Some(ty)) if tx < 4 && ty < 2 => {
                    let k = (ty * 4 + tx) as usize;
                    colours.get(k).copied().unwrap_or([0, 0, 0])
                }
                _ => [0, 0, 0],
            };
            assert_eq!(p.0, want, "pixel ({x}, {y})");
        }

        // Fewer images than columns: the row is only as wide as needed (make_grid's
        // min(nrow, n)); exactly one row.
        let sheet = contact_sheet(&images[..2], 4).unwrap();
        assert_eq!(sheet.dimensions(), (2 * 5 + 2, 4 + 2));
        // A single image comes back unpadded, as make_grid returns it.
        assert_eq!(contact_sheet(&images[..1], 4).unwrap(), images[0]);
        // Full rows.
        let sheet = contact_sheet(&images[..4], 2).unwrap();
        assert_eq!(sheet.dimensions(), (2 * 5 + 2, 2 * 4 + 2));
        assert_eq!(sheet.get_pixel(7, 6), &Rgb(colours[3]));
    }

    #[test]
    fn contact_sheet_rejects_bad_input() {
        assert!(matches!(
            contact_sheet(&[], 4),
            Err(RuntimeError::BadInput(_))
        ));
        let a = solid(2, 2, [1, 2, 3]);
        assert!(matches!(
            contact_sheet(&[a.clone(), a.clone()], 0),
            Err(RuntimeError::BadInput(_))
        ));
        assert!(matches!(
            contact_sheet(&[a.clone(), solid(2, 3, [1, 2, 3])], 4),
            Err(RuntimeError::BadInput(_))
        ));
    }

    /// A 6×6 image for a 3×3 grid with patch 2, every pixel a distinct saturated colour so
    /// that greyed and outline pixels are distinguishable from it.
    fn colourful(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            Rgb([200 - (x * 7) as u8, 10 + (y * 9) as u8, 40])
        })
    }

    /// Checks a trace frame against `generated_after`: generated cells in final colour
    /// (outline pixels excepted where the cell is in the newest wavefront), others greyed.
    fn check_frame(frame: &RgbImage, final_image: &RgbImage, plan: &WavefrontPlan, k: usize) {
        let patch = 2u32;
        let cols = plan.grid()[1];
        let generated = generated_after(plan, k);
        // The newest wavefront: generated by frame k but not by frame k − 1.
        let before = generated_after(plan, k.saturating_sub(1));
        for (x, y, p) in frame.enumerate_pixels() {
            let cell = (y / patch) as usize * cols + (x / patch) as usize;
            let want = *final_image.get_pixel(x, y);
            if !generated[cell] {
                assert_eq!(*p, greyed(want), "frame {k} pixel ({x}, {y})");
            } else if k > 0 && !before[cell] && on_cell_border(x, y, patch) {
                assert_eq!(*p, OUTLINE, "frame {k} pixel ({x}, {y})");
            } else {
                assert_eq!(*p, want, "frame {k} pixel ({x}, {y})");
            }
        }
    }

    #[test]
    fn trace_of_a_3x3_grid() {
        let plan = WavefrontPlan::new(&[3, 3], &IMAGE_HEADS).unwrap();
        let final_image = colourful(6, 6);
        let frames = trace_frames(&final_image, &plan, 2).unwrap();
        assert_eq!(frames.len(), 6);
        assert!(frames.iter().all(|f| f.dimensions() == (6, 6)));

        let cells = |k: usize| -> Vec<usize> {
            generated_after(&plan, k)
                .iter()
                .enumerate()
                .filter_map(|(i, &g)| g.then_some(i))
                .collect()
        };
        assert_eq!(cells(0), Vec::<usize>::new());
        assert_eq!(cells(1), vec![0]);
        assert_eq!(cells(2), vec![0, 1, 3]);
        assert_eq!(cells(3), vec![0, 1, 2, 3, 4, 6]);
        assert_eq!(cells(5), (0..9).collect::<Vec<_>>());
        assert_eq!(cells(99), (0..9).collect::<Vec<_>>());

        // Frame 0: everything grey, no outline.
        for (x, y, p) in frames[0].enumerate_pixels() {
            assert_eq!(*p, greyed(*final_image.get_pixel(x, y)));
        }
        for (k, frame) in frames.iter().enumerate() {
            check_frame(frame, &final_image, &plan, k);
        }
        // Frame 1: only (0, 0) coloured; with patch 2 the whole cell is its outline.
        for (x, y, p) in frames[1].enumerate_pixels() {
            let want = if x < 2 && y < 2 {
                OUTLINE
            } else {
                greyed(*final_image.get_pixel(x, y))
            };
            assert_eq!(*p, want, "({x}, {y})");
        }
        // Frame 2 adds (0, 1) and (1, 0), outlined; (0, 0) is back in full colour.
        for (x, y, p) in frames[2].enumerate_pixels() {
            let want = match ((y / 2), (x / 2)) {
                (0, 0) => *final_image.get_pixel(x, y),
                (0, 1) | (1, 0) => OUTLINE,
                _ => greyed(*final_image.get_pixel(x, y)),
            };
            assert_eq!(*p, want, "({x}, {y})");
        }
        // The last frame is the final image except the outline of the last cell (2, 2).
        for (x, y, p) in frames[5].enumerate_pixels() {
            if x >= 4 && y >= 4 {
                assert_eq!(*p, OUTLINE);
            } else {
                assert_eq!(p, final_image.get_pixel(x, y));
            }
        }
    }

    #[test]
    fn trace_outline_is_only_the_border() {
        // Patch 4: the outline is the 12 border pixels of each newest cell; the 2×2 interior
        // keeps its colour.
        let plan = WavefrontPlan::new(&[2, 3], &IMAGE_HEADS).unwrap();
        let final_image = colourful(12, 8);
        let frames = trace_frames(&final_image, &plan, 4).unwrap();
        assert_eq!(frames.len(), plan.calls().len() + 1);
        let last = frames.last().unwrap();
        let mut outlined = 0;
        for (x, y, p) in last.enumerate_pixels() {
            let in_last_cell = x >= 8 && y >= 4;
            if in_last_cell && on_cell_border(x, y, 4) {
                assert_eq!(*p, OUTLINE);
                outlined += 1;
            } else {
                assert_eq!(p, final_image.get_pixel(x, y));
            }
        }
        assert_eq!(outlined, 12);
    }

    #[test]
    fn trace_rejects_bad_input() {
        let plan = WavefrontPlan::new(&[3, 3], &IMAGE_HEADS).unwrap();
        for (w, h, patch) in [(6, 4, 2), (7, 6, 2), (6, 6, 0), (6, 6, 3)] {
            assert!(
                matches!(
                    trace_frames(&colourful(w, h), &plan, patch),
                    Err(RuntimeError::BadInput(_))
                ),
                "{w}×{h} patch {patch}"
            );
        }
        let video = WavefrontPlan::new(&[2, 2, 2], &[2, 1, 0]).unwrap();
        assert!(matches!(
            trace_frames(&colourful(4, 4), &video, 2),
            Err(RuntimeError::BadInput(_))
        ));
    }

    #[test]
    fn greyed_is_dim_and_uniform() {
        assert_eq!(greyed(Rgb([0, 0, 0])), Rgb([96, 96, 96]));
        assert_eq!(greyed(Rgb([255, 255, 255])), Rgb([159, 159, 159]));
        // 96 + (299·200 + 587·10 + 114·40)/4000 = 96 + 70230/4000 = 113.
        assert_eq!(greyed(Rgb([200, 10, 40])), Rgb([113, 113, 113]));
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn png_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        let image = colourful(5, 3);
        write_png(&path, &image).unwrap();
        let back = image::open(&path).unwrap().into_rgb8();
        assert_eq!(back, image);
        // Overwriting replaces the file and leaves no temporary.
        let other = solid(2, 2, [1, 2, 3]);
        write_png(&path, &other).unwrap();
        assert_eq!(image::open(&path).unwrap().into_rgb8(), other);
        assert_eq!(leftovers(dir.path()), ["out.png"]);
    }

    #[test]
    fn gif_is_written_and_loops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("trace.gif");
        let plan = WavefrontPlan::new(&[3, 3], &IMAGE_HEADS).unwrap();
        let frames = trace_frames(&colourful(6, 6), &plan, 2).unwrap();
        write_gif(&path, &frames, 100, LAST_FRAME_HOLD).unwrap();
        assert_eq!(leftovers(dir.path()), ["trace.gif"]);

        let bytes = std::fs::read(&path).unwrap();
        // The NETSCAPE2.0 application extension with loop count 0 means "loop forever".
        let netscape = b"NETSCAPE2.0\x03\x01\x00\x00";
        assert!(bytes.windows(netscape.len()).any(|w| w == netscape));

        let decoder = image::codecs::gif::GifDecoder::new(std::io::Cursor::new(bytes)).unwrap();
        let decoded = decoder.into_frames().collect_frames().unwrap();
        assert_eq!(decoded.len(), 6);
        for (i, frame) in decoded.iter().enumerate() {
            assert_eq!(frame.buffer().dimensions(), (6, 6));
            let want = if i == 5 { 300 } else { 100 };
            assert_eq!(frame.delay().numer_denom_ms(), (want, 1), "frame {i}");
        }
        // Few colours, so the palette is exact and the pixels survive.
        let first = &decoded[0].buffer();
        for (x, y, p) in frames[0].enumerate_pixels() {
            let [r, g, b] = p.0;
            assert_eq!(first.get_pixel(x, y).0, [r, g, b, 255]);
        }
    }

    #[test]
    fn unwritable_paths_are_bad_input() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no such dir").join("out.png");
        let err = write_png(&missing, &solid(2, 2, [0, 0, 0])).unwrap_err();
        assert!(matches!(err, RuntimeError::BadInput(_)), "{err}");
        assert!(err.to_string().contains("no such dir"), "{err}");
        let err = write_gif(
            &missing.with_extension("gif"),
            &[solid(2, 2, [0, 0, 0])],
            50,
            1,
        )
        .unwrap_err();
        assert!(matches!(err, RuntimeError::BadInput(_)), "{err}");
        assert!(err.to_string().contains("out.gif"), "{err}");
        assert!(matches!(
            write_gif(&dir.path().join("empty.gif"), &[], 50, 1),
            Err(RuntimeError::BadInput(_))
        ));
        assert!(matches!(
            write_png(Path::new("/"), &solid(1, 1, [0, 0, 0])),
            Err(RuntimeError::BadInput(_))
        ));
        assert_eq!(leftovers(dir.path()), Vec::<String>::new());
    }

    #[test]
    fn failed_writes_leave_no_file() {
        let dir = tempfile::tempdir().unwrap();
        // The rename fails (the target is a non-empty directory) after the temporary was
        // written: the temporary must be gone and the target untouched.
        let target = dir.path().join("taken.png");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"x").unwrap();
        let err = write_png(&target, &solid(2, 2, [0, 0, 0])).unwrap_err();
        assert!(matches!(err, RuntimeError::BadInput(_)), "{err}");
        assert!(err.to_string().contains("taken.png"), "{err}");
        assert_eq!(leftovers(dir.path()), ["taken.png"]);
        assert!(target.is_dir());

        // Encoding fails (GIF sizes are 16-bit): nothing is created at all.
        let path = dir.path().join("wide.gif");
        let err = write_gif(&path, &[solid(70_000, 1, [0, 0, 0])], 50, 1).unwrap_err();
        assert!(matches!(err, RuntimeError::BadInput(_)), "{err}");
        assert_eq!(leftovers(dir.path()), ["taken.png"]);
    }
}
