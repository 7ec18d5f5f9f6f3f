//! Named model shapes (NAR-SPEC §1.2 and §7) so users need no config file for released
//! checkpoints.

use narx_graphs::nar::{ModelArgs, ModelConfig, VideoArgs};

/// `(name, n_layer, n_head, dim, text-conditional)`.
const PRESETS: [(&str, usize, usize, usize, bool); 6] = [
    ("nar-b", 12, 12, 768, false),
    ("nar-m", 18, 16, 1024, false),
    ("nar-l", 24, 16, 1024, false),
    ("nar-xl", 36, 20, 1280, false),
    ("nar-xxl", 48, 24, 1536, false),
    ("nar-xl-t2i", 36, 20, 1280, true),
];

/// LlamaGen c2i backbones of the NAR image presets (no extra block, no down head), for the
/// raster-order baseline, `(name, n_layer, n_head, dim)`.
const LLAMAGEN_PRESETS: [(&str, usize, usize, usize); 5] = [
    ("llamagen-b", 12, 12, 768),
    ("llamagen-l", 24, 16, 1024),
    ("llamagen-xl", 36, 20, 1280),
    ("llamagen-xxl", 48, 24, 1536),
    ("llamagen-3b", 24, 32, 3200),
];

/// Upstream's `llama-abs-*` video models, `(name, n_layer, n_head, dim)`; the released
/// configs use LP.
const VIDEO_PRESETS: [(&str, usize, usize, usize); 7] = [
    ("nar-video-s", 12, 6, 384),
    ("nar-video-b", 12, 12, 768),
    ("nar-video-l", 24, 16, 1024),
    ("nar-video-lp", 30, 20, 1280),
    ("nar-video-xl", 36, 20, 1280),
    ("nar-video-xxl", 48, 24, 1536),
    ("nar-video-xxxl", 48, 40, 2560),
];

/// Names of all presets, for help texts and error messages.
pub fn preset_names() -> Vec<&'static str> {
    PRESETS
        .iter()
        .map(|p| p.0)
        .chain(LLAMAGEN_PRESETS.iter().map(|p| p.0))
        .chain(VIDEO_PRESETS.iter().map(|p| p.0))
        .collect()
}

/// The arguments of a preset: c2i at 384 px (24×24 grid) as `sample_c2i.py` samples, t2i
/// at 512 px (32×32) with 120 caption tokens as `sample_t2i.py`, LlamaGen c2i on the same
/// grid, video on UCF-101's `(4, 16, 16)` grid with upstream's video defaults.
pub fn preset(name: &str) -> Option<ModelConfig> {
    if let Some(&(_, n_layer, n_head, dim)) = VIDEO_PRESETS.iter().find(|p| p.0 == name) {
        return Some(ModelConfig::Video(VideoArgs {
            n_layer,
            n_head,
            dim,
            ..VideoArgs::default()
        }));
    }
    if let Some(&(_, n_layer, n_head, dim)) = LLAMAGEN_PRESETS.iter().find(|p| p.0 == name) {
        return Some(ModelConfig::Image(ModelArgs {
            n_layer,
            n_head,
            dim,
            medusa_attention_num: 0,
            block_size: 24 * 24,
            ..ModelArgs::default()
        }));
    }
    image_preset(name).map(ModelConfig::Image)
}

fn image_preset(name: &str) -> Option<ModelArgs> {
    let &(_, n_layer, n_head, dim, t2i) = PRESETS.iter().find(|p| p.0 == name)?;
    let base = ModelArgs {
        n_layer,
        n_head,
        dim,
        ..ModelArgs::default()
    };
    Some(if t2i {
        ModelArgs {
            model_type: "t2i".into(),
            cls_token_num: 120,
            block_size: 32 * 32,
            ..base
        }
    } else {
        ModelArgs {
            block_size: 24 * 24,
            ..base
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_published_sizes() {
        let count = |n: &str| preset(n).map(|a| a.parameter_count());
        assert_eq!(count("nar-video-lp"), Some(693_588_480));
        assert_eq!(count("llamagen-b"), Some(110_888_448));
        assert_eq!(count("llamagen-3b"), Some(3_096_659_200));
        assert_eq!(count("nar-b"), Some(130_551_552));
        assert_eq!(count("nar-m"), Some(295_453_696));
        assert_eq!(count("nar-l"), Some(372_536_320));
        assert_eq!(count("nar-xl"), Some(815_991_040));
        assert_eq!(count("nar-xxl"), Some(1_464_454_656));
        assert_eq!(count("nar-xl-t2i"), Some(818_969_600));
        assert_eq!(
            image_preset("nar-xl-t2i").and_then(|a| a.default_grid()),
            Some(32)
        );
        assert_eq!(
            image_preset("nar-b").and_then(|a| a.default_grid()),
            Some(24)
        );
        for name in preset_names() {
            preset(name).unwrap().validate().unwrap();
        }
        assert!(preset("nar-q").is_none());
    }
}
