//! Where decoded output goes, for `narx run` and `narx decode`: pictures (PNG) from an image
//! model, clips (animated GIF, or PNG frames) from a video model.

use std::path::{Path, PathBuf};

use clap::Args;

use narx_graphs::manifest::Manifest;
use narx_runtime::decode::Decoded;
use narx_runtime::picture::{contact_sheet, write_png, SHEET_COLUMNS};
use narx_runtime::video::{check_fps, clip_sheet, write_clip_gif, write_frames, DEFAULT_FPS};

use super::BadInput;

#[derive(Args)]
pub struct OutputArgs {
    /// Pictures as PNG (`out.png`, or `out-0.png`, `out-1.png`, … for several); video clips as
    /// animated GIF (`clip.gif`, or `clip-0.gif`, …). Needs a model exported with a decoder.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// One file with the whole batch side by side: PNG for pictures, GIF for clips.
    #[arg(long)]
    grid_image: Option<PathBuf>,
    /// Video: one PNG per frame in this directory (`clip-0-frame-000.png`, …).
    #[arg(long)]
    frames_dir: Option<PathBuf>,
    /// Video: frames per second of the GIFs (1 to 100).
    #[arg(long, default_value_t = DEFAULT_FPS)]
    fps: u32,
}

impl OutputArgs {
    pub fn wanted(&self) -> bool {
        self.output.is_some() || self.grid_image.is_some() || self.frames_dir.is_some()
    }

    /// Refuses what the model cannot write, before any work is done.
    pub fn check(&self, manifest: &Manifest) -> anyhow::Result<()> {
        if !self.wanted() {
            return Ok(());
        }
        require_decoder(manifest)?;
        let video = manifest.larp_decoder.is_some();
        if !video && self.frames_dir.is_some() {
            return Err(BadInput("--frames-dir is for video models".into()).into());
        }
        if video {
            check_fps(self.fps)?;
            for path in self.output.iter().chain(&self.grid_image) {
                if path
                    .extension()
                    .is_none_or(|e| !e.eq_ignore_ascii_case("gif"))
                {
                    return Err(BadInput(format!(
                        "{}: video clips are written as GIF, so the name must end in .gif \
                         (or use --frames-dir for PNG frames)",
                        path.display()
                    ))
                    .into());
                }
            }
        }
        Ok(())
    }

    /// Writes what was asked for; returns the files written.
    pub fn write(&self, decoded: &Decoded) -> anyhow::Result<Vec<PathBuf>> {
        let mut written = Vec::new();
        match decoded {
            Decoded::Pictures(images) => {
                for (path, picture) in self.numbered_outputs(images) {
                    write_png(&path, picture)?;
                    written.push(path);
                }
                if let Some(path) = &self.grid_image {
                    write_png(path, &contact_sheet(images, SHEET_COLUMNS)?)?;
                    written.push(path.clone());
                }
            }
            Decoded::Clips(clips) => {
                for (path, clip) in self.numbered_outputs(clips) {
                    write_clip_gif(&path, clip, self.fps)?;
                    written.push(path);
                }
                if let Some(path) = &self.grid_image {
                    write_clip_gif(path, &clip_sheet(clips, SHEET_COLUMNS)?, self.fps)?;
                    written.push(path.clone());
                }
                if let Some(dir) = &self.frames_dir {
                    written.extend(write_frames(dir, clips)?);
                }
            }
        }
        Ok(written)
    }

    /// `-o out.ext` for each item: the name itself for one, `out-{i}.ext` for several.
    fn numbered_outputs<'a, T>(&self, items: &'a [T]) -> Vec<(PathBuf, &'a T)> {
        let Some(out) = &self.output else {
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let path = if items.len() == 1 {
                    out.clone()
                } else {
                    numbered(out, i)
                };
                (path, item)
            })
            .collect()
    }
}

/// `out.png` → `out-3.png`.
fn numbered(path: &Path, index: usize) -> PathBuf {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let name = match path.extension() {
        Some(ext) => format!("{stem}-{index}.{}", ext.to_string_lossy()),
        None => format!("{stem}-{index}"),
    };
    path.with_file_name(name)
}

/// Refuses output flags for a model without a decoder before any work is done.
pub fn require_decoder(manifest: &Manifest) -> anyhow::Result<()> {
    if manifest.decoder_graph().is_none() {
        return Err(BadInput(
            "this model directory has no decoder, so it cannot write pictures or clips; export \
             it with --vq-checkpoint (images) or --larp-checkpoint (video), or use --tokens-out \
             and `narx decode` later"
                .into(),
        )
        .into());
    }
    Ok(())
}
