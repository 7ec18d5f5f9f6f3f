//! Video: the LARP decoder against the upstream fixture, and the whole path from a video
//! checkpoint to GIF clips and PNG frames through the CLI, with its bad inputs. (The video
//! model's generation parity is in `parity.rs`.)

use std::path::Path;

use narx_export::checkpoint::open_checkpoint;
use narx_export::model_dir::{export, ExportRequest, LarpRequest};
use narx_graphs::larp::LarpConfig;
use narx_graphs::manifest::CacheLayout;
use narx_graphs::DType;
use narx_runtime::video::to_clips;

use crate::common::{
    assert_bad_input, decode_on_both_backends, fixture, gif_frames, max_abs_diff, model_config,
    narx, path_str, reference_json, stderr, stdout, write_fixture_config, Data, Reference,
};

fn larp_config() -> LarpConfig {
    serde_json::from_value(reference_json("larp-tiny")["config"].clone()).unwrap()
}

/// The video fixture (vocabulary 128, grid 3×4×4) with the LARP fixture (codebook 128,
/// 48 latent tokens) as its tokenizer.
fn export_with_decoder(dir: &Path) {
    let nar = open_checkpoint(&fixture("nar-video-tiny").join("model.pt")).unwrap();
    let larp = open_checkpoint(&fixture("larp-tiny").join("model.safetensors")).unwrap();
    export(&ExportRequest {
        source: nar.as_ref(),
        config: model_config("nar-video-tiny"),
        grid: None,
        dtype: DType::F32,
        layout: CacheLayout::Append,
        output: dir.to_path_buf(),
        force: false,
        vq: None,
        larp: Some(LarpRequest {
            source: larp.as_ref(),
            config: larp_config(),
        }),
    })
    .unwrap();
}

#[test]
fn larp_decoder_matches_upstream_on_tract_and_onnxruntime() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("model");
    export_with_decoder(&dir);
    let reference = Reference::load("larp-tiny");
    let codes = reference.i64("codes");
    let (shape, expected) = reference.f32("video");
    let Some((_, Data::U8(expected_pixels))) = reference.get("pixels") else {
        panic!("the fixture's pixels are uint8")
    };
    for (backend, (got_shape, got)) in decode_on_both_backends(&dir, codes, "video") {
        assert_eq!(got_shape, shape, "{backend}");
        let worst = max_abs_diff(&got, &expected);
        assert!(worst < 1e-3, "{backend}: video differs by up to {worst}");
        // Pixels: ours are frames of RGB; upstream's are (B, C, T, H, W).
        let [_, _, frames, height, width] = shape.clone().try_into().unwrap();
        let clips = to_clips(&got, [1, 3, frames, height, width]).unwrap();
        let mut worst = 0;
        for c in 0..3 {
            for (f, frame) in clips[0].iter().enumerate() {
                for (x, y, pixel) in frame.enumerate_pixels() {
                    let (x, y) = (x as usize, y as usize);
                    let upstream = expected_pixels[((c * frames + f) * height + y) * width + x];
                    worst = worst.max((pixel.0[c] as i32 - upstream as i32).abs());
                }
            }
        }
        assert!(worst <= 1, "{backend}: pixels differ by {worst} levels");
    }
}

/// `narx export` of the video fixture and its LARP tokenizer from config files.
fn export_cli(t: &Path, model_config: &Path, larp_config: &Path) -> std::process::Output {
    narx(&[
        "export",
        "--checkpoint",
        path_str(&fixture("nar-video-tiny").join("model.pt")),
        "--config",
        path_str(model_config),
        "--larp-checkpoint",
        path_str(&fixture("larp-tiny").join("model.safetensors")),
        "--larp-config",
        path_str(larp_config),
        "-o",
        path_str(&t.join("model")),
    ])
}

fn fixture_configs(t: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let model = t.join("video.json");
    let larp = t.join("larp.json");
    write_fixture_config("nar-video-tiny", &model);
    write_fixture_config("larp-tiny", &larp);
    (model, larp)
}

#[test]
fn video_from_checkpoint_to_gif_clips_and_frames() {
    let temp = tempfile::tempdir().unwrap();
    let t = temp.path();
    let (model_config, larp) = fixture_configs(t);
    let output = export_cli(t, &model_config, &larp);
    assert!(output.status.success(), "{}", stderr(&output));
    let dir = t.join("model");

    let output = narx(&["inspect", path_str(&dir)]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = stdout(&output);
    for needle in [
        "nar-video",
        "grid 3×4×4 → 9 model calls",
        "right (axis 2, logits_right), back (axis 0, logits_back), down (axis 1, logits_down)",
        "LARP video decoder: codebook 128, 48 tokens → 12 frames of 32×32",
    ] {
        assert!(text.contains(needle), "inspect lacks {needle:?}:\n{text}");
    }

    // Greedy generation from the CLI reproduces the fixture's tokens; clips come out as GIF
    // (one per clip), a side-by-side GIF, and PNG frames.
    let labels: Vec<String> = match Reference::load("nar-video-tiny").get("labels") {
        Some((_, Data::I64(l))) => l.iter().map(i64::to_string).collect(),
        _ => panic!("the fixture has labels"),
    };
    let tokens = t.join("tokens.json");
    let frames_dir = t.join("frames");
    let mut args = vec!["run", path_str(&dir), "--provider", "tract", "--greedy"];
    for label in &labels {
        args.extend(["--class", label]);
    }
    let clip = t.join("clip.gif");
    let sheet = t.join("sheet.gif");
    args.extend([
        "--tokens-out",
        path_str(&tokens),
        "-o",
        path_str(&clip),
        "--grid-image",
        path_str(&sheet),
        "--frames-dir",
        path_str(&frames_dir),
        "--fps",
        "10",
    ]);
    let output = narx(&args);
    assert!(output.status.success(), "{}", stderr(&output));
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tokens).unwrap()).unwrap();
    let (_, expected) = Reference::load("nar-video-tiny").i64("tokens");
    let got: Vec<i64> = serde_json::from_value::<Vec<Vec<i64>>>(written["tokens"].clone())
        .unwrap()
        .concat();
    assert_eq!(got, expected);
    assert_eq!(written["grid"], serde_json::json!([3, 4, 4]));

    assert!(!clip.exists(), "several clips are numbered");
    let first = gif_frames(&t.join("clip-0.gif"));
    assert_eq!(first.len(), 12);
    assert!(first.iter().all(|f| f.dimensions() == (32, 32)));
    assert_eq!(gif_frames(&t.join("clip-1.gif")).len(), 12);
    let sheet = gif_frames(&sheet);
    assert_eq!(sheet.len(), 12);
    assert_eq!(sheet[0].dimensions(), (2 * 34 + 2, 34 + 2));
    let mut pngs: Vec<String> = std::fs::read_dir(&frames_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    pngs.sort();
    assert_eq!(pngs.len(), 2 * 12);
    assert_eq!(pngs[0], "clip-0-frame-000.png");
    assert_eq!(pngs[23], "clip-1-frame-011.png");
    let frame = image::open(frames_dir.join("clip-1-frame-005.png"))
        .unwrap()
        .to_rgb8();
    assert_eq!(frame.dimensions(), (32, 32));

    // The GIF holds 10 fps: a 100 ms delay per frame.
    let bytes = std::fs::read(t.join("clip-0.gif")).unwrap();
    // The first graphic control extension (0x21 0xF9, 4 bytes: flags, delay, transparency).
    let delay = bytes
        .windows(3)
        .position(|w| w == [0x21, 0xF9, 4])
        .map(|at| u16::from_le_bytes([bytes[at + 4], bytes[at + 5]]));
    assert_eq!(delay, Some(10), "GIF delay in hundredths of a second");

    // The LARP fixture's own codes, decoded by the CLI into a GIF: 12 frames of 32×32.
    let codes = Reference::load("larp-tiny").i64("codes").1;
    let codes_file = t.join("codes.json");
    std::fs::write(
        &codes_file,
        serde_json::json!({ "tokens": [codes], "grid": [3, 4, 4] }).to_string(),
    )
    .unwrap();
    let fixture_gif = t.join("fixture.gif");
    let output = narx(&[
        "decode",
        path_str(&dir),
        "--tokens",
        path_str(&codes_file),
        "-o",
        path_str(&fixture_gif),
        "--provider",
        "tract",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let frames = gif_frames(&fixture_gif);
    assert_eq!(frames.len(), 12);
    assert!(frames.iter().all(|f| f.dimensions() == (32, 32)));

    // `narx decode` of the written tokens on ONNX Runtime gives the same frames.
    let decoded = t.join("decoded.gif");
    let output = narx(&[
        "decode",
        path_str(&dir),
        "--tokens",
        path_str(&tokens),
        "-o",
        path_str(&decoded),
        "--provider",
        "cpu",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let again = gif_frames(&t.join("decoded-0.gif"));
    assert_eq!(again.len(), first.len());
    for (a, b) in again.iter().zip(&first) {
        let worst = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(&x, &y)| (x as i32 - y as i32).abs())
            .max()
            .unwrap();
        // GIF palettes are built per frame, so a one-level decoder difference may move a
        // pixel to a neighbouring palette entry.
        assert!(worst <= 8, "decode differs from run by {worst}");
    }
}

#[test]
fn video_bad_inputs_are_named() {
    let temp = tempfile::tempdir().unwrap();
    let t = temp.path();
    let (model_config, larp) = fixture_configs(t);

    // An image checkpoint for a video model.
    let output = narx(&[
        "export",
        "--checkpoint",
        path_str(&fixture("nar-c2i-tiny").join("model.pt")),
        "--config",
        path_str(&model_config),
        "-o",
        path_str(&t.join("wrong-kind")),
    ]);
    assert_bad_input(&output, &["missing tensor norm_R.weight", "abs_pe"]);
    assert!(!t.join("wrong-kind").exists());

    // A grid that does not fit the position table.
    let mut config = reference_json("nar-video-tiny")["config"].clone();
    config["latent_shape"] = serde_json::json!([4, 4, 4]);
    let too_big = t.join("too-big.json");
    std::fs::write(&too_big, config.to_string()).unwrap();
    let output = narx(&[
        "export",
        "--checkpoint",
        path_str(&fixture("nar-video-tiny").join("model.pt")),
        "--config",
        path_str(&too_big),
        "-o",
        path_str(&t.join("too-big")),
    ]);
    assert_bad_input(&output, &["64 tokens", "max_seq_len 48"]);

    // A LARP tokenizer whose latent count is not the grid's.
    let mut config = reference_json("larp-tiny")["config"].clone();
    config["bottleneck_token_num"] = serde_json::json!(32);
    let other_larp = t.join("other-larp.json");
    std::fs::write(&other_larp, config.to_string()).unwrap();
    let output = export_cli(t, &model_config, &other_larp);
    assert_bad_input(&output, &["32 latent tokens", "48"]);
    assert!(!t.join("model").exists());

    // Output flags the video model cannot honour are refused before generating.
    let output = export_cli(t, &model_config, &larp);
    assert!(output.status.success(), "{}", stderr(&output));
    let dir = t.join("model");
    let run = |extra: &[&str]| {
        let mut args = vec!["run", path_str(&dir), "--class", "1", "--provider", "tract"];
        args.extend_from_slice(extra);
        narx(&args)
    };
    let png = t.join("clip.png");
    assert_bad_input(&run(&["-o", path_str(&png)]), &["must end in .gif"]);
    let gif = t.join("clip.gif");
    assert_bad_input(
        &run(&["-o", path_str(&gif), "--fps", "0"]),
        &["frame rate 0"],
    );
    assert_bad_input(&run(&["--trace", path_str(&gif)]), &["--trace", "video"]);
    assert_bad_input(&run(&["--class", "5"]), &["class 5 is out of range"]);
    assert!(!gif.exists() && !png.exists());
}
