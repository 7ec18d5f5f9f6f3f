//! Video clips: the LARP decoder's output as 8-bit frames, and the files they are written to
//! (an animated GIF per clip or per batch, one PNG per frame).
//!
//! Pixel mapping as upstream's video sampler writes its clips: clamp to [0, 1], ×255,
//! truncate (NAR-SPEC §7).

use std::path::{Path, PathBuf};

use image::RgbImage;

use crate::picture::{check_rgb_output, contact_sheet, interleave, write_gif, write_png};
use crate::RuntimeError;

/// Frame rate upstream writes its clips at.
pub const DEFAULT_FPS: u32 = 25;

/// The fastest frame rate a GIF can show: its delays are hundredths of a second.
pub const MAX_FPS: u32 = 100;

/// One clip: its frames in time order, all the same size.
pub type Clip = Vec<RgbImage>;

/// One float to 8 bits as upstream's video sampler: clamp to [0, 1], ×255, truncate. NaN
/// truncates to 0.
pub fn to_u8(x: f32) -> u8 {
    (x.clamp(0.0, 1.0) * 255.0) as u8
}

/// Turns decoder output `(batch, 3, frames, height, width)` float32 into clips.
///
/// A wrong length or channel count means the decoder graph produced something other than
/// what it was exported to, so it is reported as a backend error, not bad user input.
pub fn to_clips(video: &[f32], shape: [usize; 5]) -> Result<Vec<Clip>, RuntimeError> {
    let (w, h) = check_rgb_output("video decoder output", video.len(), &shape)?;
    let bad = |message: String| RuntimeError::backend("video decoder output", message);
    let [_, _, frames, height, width] = shape;
    let plane = height * width;
    let channel = frames * plane;
    video
        .chunks_exact(3 * channel)
        .map(|item| {
            (0..frames)
                .map(|f| {
                    let at = |c: usize| &item[c * channel + f * plane..][..plane];
                    interleave([at(0), at(1), at(2)], w, h, to_u8)
                })
                .collect::<Option<Clip>>()
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| bad(format!("shape {shape:?} does not form frames")))
}

/// Checks a frame rate for GIF writing.
pub fn check_fps(fps: u32) -> Result<(), RuntimeError> {
    if fps == 0 || fps > MAX_FPS {
        return Err(RuntimeError::BadInput(format!(
            "frame rate {fps} is out of range: a GIF shows 1 to {MAX_FPS} frames per second"
        )));
    }
    Ok(())
}

/// Writes one clip as a looping GIF at `fps` frames per second (every frame shown equally
/// long; GIF rounds the delay down to 10 ms).
pub fn write_clip_gif(path: &Path, clip: &[RgbImage], fps: u32) -> Result<(), RuntimeError> {
    check_fps(fps)?;
    write_gif(path, clip, 1000 / fps, 1)
}

/// Tiles the clips of a batch frame by frame, as the picture contact sheet tiles images.
pub fn clip_sheet(clips: &[Clip], columns: usize) -> Result<Clip, RuntimeError> {
    let frames = clips.first().map_or(0, Vec::len);
    if clips.iter().any(|c| c.len() != frames) {
        return Err(RuntimeError::BadInput(
            "clips of different lengths cannot share a sheet".into(),
        ));
    }
    (0..frames)
        .map(|f| {
            let tiles: Vec<RgbImage> = clips.iter().map(|c| c[f].clone()).collect();
            contact_sheet(&tiles, columns)
        })
        .collect()
}

/// Writes every frame of every clip as `dir/clip-{i}-frame-{f}.png` (numbers zero-padded
/// so the names sort in time order); creates `dir` if needed. Returns the files written.
/// When one frame cannot be written, the frames written before it are removed again, so a
/// failed run leaves no partial clip behind.
pub fn write_frames(dir: &Path, clips: &[Clip]) -> Result<Vec<PathBuf>, RuntimeError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| RuntimeError::BadInput(format!("cannot create {}: {e}", dir.display())))?;
    let mut written = Vec::new();
    for (i, clip) in clips.iter().enumerate() {
        for (f, frame) in clip.iter().enumerate() {
            let path = dir.join(format!("clip-{i}-frame-{f:03}.png"));
            if let Err(e) = write_png(&path, frame) {
                for path in &written {
                    // Best effort: the error that matters is the one returned.
                    let _ = std::fs::remove_file(path);
                }
                return Err(e);
            }
            written.push(path);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pixels_clamp_scale_and_truncate() {
        assert_eq!(to_u8(-0.5), 0);
        assert_eq!(to_u8(0.0), 0);
        assert_eq!(to_u8(0.999), 254);
        assert_eq!(to_u8(1.0), 255);
        assert_eq!(to_u8(7.0), 255);
        assert_eq!(to_u8(f32::NAN), 0);
        // Truncation, not rounding: 0.5 · 255 = 127.5 → 127.
        assert_eq!(to_u8(0.5), 127);
    }

    #[test]
    fn clips_are_laid_out_channel_then_frame() {
        // batch 1, 3 channels, 2 frames of 1×2: value = channel·0.25 + frame·0.5 + x·0.1.
        let shape = [1, 3, 2, 1, 2];
        let mut video = Vec::new();
        for c in 0..3 {
            for f in 0..2 {
                for x in 0..2 {
                    video.push(c as f32 * 0.25 + f as f32 * 0.5 + x as f32 * 0.1);
                }
            }
        }
        let clips = to_clips(&video, shape).unwrap();
        assert_eq!(clips.len(), 1);
        assert_eq!(clips[0].len(), 2);
        let px = |f: usize, x: u32| clips[0][f].get_pixel(x, 0).0;
        assert_eq!(px(0, 0), [to_u8(0.0), to_u8(0.25), to_u8(0.5)]);
        assert_eq!(px(1, 1), [to_u8(0.6), to_u8(0.85), to_u8(1.1)]);
        assert!(to_clips(&video[1..], shape).is_err());
        assert!(to_clips(&video, [1, 2, 3, 1, 2]).is_err());
    }

    #[test]
    fn frame_rates_are_checked() {
        assert!(check_fps(25).is_ok());
        assert!(check_fps(MAX_FPS).is_ok());
        assert!(matches!(check_fps(0), Err(RuntimeError::BadInput(_))));
        assert!(matches!(check_fps(101), Err(RuntimeError::BadInput(_))));
    }

    #[test]
    fn a_failed_frame_removes_the_frames_before_it() {
        let dir = tempfile::tempdir().unwrap();
        // A directory where the second frame goes: its rename fails.
        std::fs::create_dir(dir.path().join("clip-0-frame-001.png")).unwrap();
        let clip: Clip = vec![RgbImage::new(2, 2); 3];
        let error = write_frames(dir.path(), &[clip]).unwrap_err().to_string();
        assert!(error.contains("clip-0-frame-001.png"), "{error}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["clip-0-frame-001.png"]);
    }
}
