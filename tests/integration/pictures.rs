//! From tokens to pictures: the VQ decoder against the upstream fixture, PNG and GIF output,
//! `narx decode`, and their bad inputs.

use std::path::{Path, PathBuf};

use narx_export::checkpoint::open_checkpoint;
use narx_export::model_dir::{export, ExportRequest, VqRequest};
use narx_graphs::vq::VqConfig;
use narx_graphs::DType;
use narx_runtime::backend::{Engine, GraphKind, HostTensor};
use narx_runtime::picture::{generated_after, greyed, to_pixels, trace_frames};
use narx_runtime::scheduler::WavefrontPlan;

use crate::common::{
    assert_bad_input, fixture, gif_frames, model_config, narx, ort_engine, reference_json, stderr,
    tract_engine, Reference,
};

fn vq_config() -> VqConfig {
    serde_json::from_value(reference_json("vq16-tiny")["config"].clone()).unwrap()
}

/// The c2i fixture (vocabulary 256) with the VQ fixture (codebook 256) as its tokenizer.
fn export_with_decoder(dir: &Path) {
    let nar = open_checkpoint(&fixture("nar-c2i-tiny").join("model.pt")).unwrap();
    let vq = open_checkpoint(&fixture("vq16-tiny").join("model.safetensors")).unwrap();
    export(&ExportRequest {
        source: nar.as_ref(),
        config: model_config("nar-c2i-tiny"),
        grid: None,
        dtype: DType::F32,
        output: dir.to_path_buf(),
        force: false,
        vq: Some(VqRequest {
            source: vq.as_ref(),
            config: vq_config(),
        }),
        larp: None,
    })
    .unwrap();
}

fn decode_raw<E: Engine>(engine: &mut E, codes: (Vec<usize>, Vec<i64>)) -> (Vec<usize>, Vec<f32>) {
    let input = engine.upload(HostTensor::I64(codes.0, codes.1)).unwrap();
    let mut out = engine
        .run(GraphKind::Decoder, vec![("codes".into(), input)])
        .unwrap();
    engine.download_f32(&out.remove("image").unwrap()).unwrap()
}

#[test]
fn vq_decoder_matches_upstream_on_tract_and_onnxruntime() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("model");
    export_with_decoder(&dir);
    let reference = Reference::load("vq16-tiny");
    let codes = reference.i64("codes");
    let (shape, expected) = reference.f32("image");
    let (_, pixel_bytes) = match reference.get("pixels") {
        Some(x) => x,
        None => panic!("fixture has no pixels"),
    };
    let crate::common::Data::U8(expected_pixels) = pixel_bytes else {
        panic!("pixels are uint8")
    };
    for (backend, (got_shape, got)) in [
        ("tract", decode_raw(&mut tract_engine(&dir), codes.clone())),
        (
            "onnxruntime",
            decode_raw(&mut ort_engine(&dir), codes.clone()),
        ),
    ] {
        assert_eq!(got_shape, shape, "{backend}");
        let worst = got
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-3, "{backend}: image differs by up to {worst}");
        let pictures = to_pixels(&got, shape.clone().try_into().unwrap()).unwrap();
        let ours: Vec<u8> = pictures.iter().flat_map(|p| p.as_raw().clone()).collect();
        assert_eq!(ours.len(), expected_pixels.len());
        let off = ours
            .iter()
            .zip(&expected_pixels)
            .filter(|(a, b)| a != b)
            .count();
        let worst = ours
            .iter()
            .zip(&expected_pixels)
            .map(|(&a, &b)| (a as i32 - b as i32).abs())
            .max()
            .unwrap();
        assert!(worst <= 1, "{backend}: pixels differ by {worst} levels");
        assert!(
            off * 1000 <= ours.len(),
            "{backend}: {off} of {} pixels are off by one",
            ours.len()
        );
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn run_writes_pictures_contact_sheet_and_trace() {
    let temp = tempfile::tempdir().unwrap();
    let t = temp.path();
    let dir = t.join("model");
    export_with_decoder(&dir);
    let out = t.join("out.png");
    let sheet = t.join("sheet.png");
    let trace = t.join("trace.gif");
    let tokens = t.join("tokens.json");
    let output = narx(&[
        "run",
        path_str(&dir),
        "--provider",
        "tract",
        "--class",
        "0",
        "--class",
        "4",
        "--greedy",
        "-o",
        path_str(&out),
        "--grid-image",
        path_str(&sheet),
        "--trace",
        path_str(&trace),
        "--tokens-out",
        path_str(&tokens),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let first = image::open(t.join("out-0.png")).unwrap().to_rgb8();
    let second = image::open(t.join("out-1.png")).unwrap().to_rgb8();
    assert_eq!(first.dimensions(), (128, 128));
    assert_eq!(second.dimensions(), (128, 128));
    assert!(!out.exists(), "several images are numbered");
    // Two images side by side with 2-px padding, as upstream's save_image.
    let sheet = image::open(&sheet).unwrap().to_rgb8();
    assert_eq!(sheet.dimensions(), (2 * 130 + 2, 130 + 2));
    assert_eq!(sheet.get_pixel(2, 2), first.get_pixel(0, 0));

    // The trace: one frame per model call plus the empty start, each showing exactly the
    // cells generated by then. GIF stores 256 colours per frame, so the pictures are compared
    // loosely; what must hold exactly is which cells are in colour and which are grey.
    let frames = gif_frames(&trace);
    let plan = WavefrontPlan::new(&[8, 8], &[1, 0]).unwrap();
    assert_eq!(frames.len(), plan.calls().len() + 1);
    for (k, got) in frames.iter().enumerate() {
        assert_eq!(got.dimensions(), (128, 128));
        let generated = generated_after(&plan, k);
        assert_eq!(generated.iter().filter(|&&g| g).count(), cells_by(&plan, k));
        for (cell, &done) in generated.iter().enumerate() {
            let shown = cell_difference(got, &first, cell, false);
            let greyed = cell_difference(got, &first, cell, true);
            let (right, wrong) = if done {
                (shown, greyed)
            } else {
                (greyed, shown)
            };
            assert!(
                right < wrong && right < 40.0,
                "frame {k}, cell {cell} (generated: {done}): {right} from what it should \
                 show, {wrong} from the other"
            );
        }
    }
    assert_eq!(trace_frames(&first, &plan, 16).unwrap().len(), frames.len());

    // `narx decode` of the written tokens gives the same pictures.
    let decoded = t.join("decoded.png");
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
    let again = image::open(t.join("decoded-0.png")).unwrap().to_rgb8();
    let worst = again
        .as_raw()
        .iter()
        .zip(first.as_raw())
        .map(|(&a, &b)| (a as i32 - b as i32).abs())
        .max()
        .unwrap();
    assert!(
        worst <= 1,
        "decode on ONNX Runtime differs from run on tract by {worst}"
    );
}

fn cells_by(plan: &WavefrontPlan, frame: usize) -> usize {
    plan.calls()[..frame].iter().map(|c| c.output_len()).sum()
}

/// Mean absolute channel difference over the inside of a 16×16 cell (outline excluded)
/// between `frame` and the final picture, shown as is or greyed out.
fn cell_difference(
    frame: &image::RgbImage,
    picture: &image::RgbImage,
    cell: usize,
    grey: bool,
) -> f32 {
    let (x0, y0) = ((cell % 8) as u32 * 16, (cell / 8) as u32 * 16);
    let mut total = 0f32;
    for y in y0 + 1..y0 + 15 {
        for x in x0 + 1..x0 + 15 {
            let want = if grey {
                greyed(*picture.get_pixel(x, y))
            } else {
                *picture.get_pixel(x, y)
            };
            for c in 0..3 {
                total += (frame.get_pixel(x, y)[c] as f32 - want[c] as f32).abs();
            }
        }
    }
    total / (14.0 * 14.0 * 3.0)
}

fn tokens_file(t: &Path, name: &str, body: &str) -> PathBuf {
    let path = t.join(name);
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn pictures_bad_input() {
    let temp = tempfile::tempdir().unwrap();
    let t = temp.path();
    let dir = t.join("model");
    export_with_decoder(&dir);
    let out = t.join("out.png");
    let decode = |tokens: &Path| {
        narx(&[
            "decode",
            path_str(&dir),
            "--tokens",
            path_str(tokens),
            "-o",
            path_str(&out),
        ])
    };
    let mut grid: Vec<u32> = vec![1; 64];
    grid[10] = 300;
    let body = serde_json::json!({ "tokens": [grid], "grid": [8, 8] }).to_string();
    assert_bad_input(
        &decode(&tokens_file(t, "range.json", &body)),
        &["token 300", "cell 10", "codebook 0..255"],
    );
    let body = serde_json::json!({ "tokens": [vec![1; 60]], "grid": [8, 8] }).to_string();
    assert_bad_input(
        &decode(&tokens_file(t, "short.json", &body)),
        &["60 tokens", "needs 64"],
    );
    assert_bad_input(
        &decode(&tokens_file(t, "junk.json", "{\"tokens\": 3")),
        &["junk.json"],
    );
    assert!(!out.exists(), "a failed decode wrote {}", out.display());

    let good = serde_json::json!({ "tokens": [vec![1; 64]] }).to_string();
    let good = tokens_file(t, "good.json", &good);
    let unwritable = t.join("no/such/dir/out.png");
    let output = narx(&[
        "decode",
        path_str(&dir),
        "--tokens",
        path_str(&good),
        "-o",
        path_str(&unwritable),
    ]);
    assert_bad_input(&output, &["no/such/dir/out.png"]);

    // A tokenizer checkpoint that does not fit its configuration.
    let config = t.join("vq.json");
    let mut wrong = reference_json("vq16-tiny")["config"].clone();
    wrong["z_channels"] = 128.into();
    std::fs::write(&config, wrong.to_string()).unwrap();
    let nar_config = t.join("nar.json");
    std::fs::write(
        &nar_config,
        reference_json("nar-c2i-tiny")["config"].to_string(),
    )
    .unwrap();
    let target = t.join("mismatch");
    let output = narx(&[
        "export",
        "--checkpoint",
        path_str(&fixture("nar-c2i-tiny").join("model.safetensors")),
        "--config",
        path_str(&nar_config),
        "--vq-checkpoint",
        path_str(&fixture("vq16-tiny").join("model.safetensors")),
        "--vq-config",
        path_str(&config),
        "-o",
        path_str(&target),
    ]);
    assert_bad_input(
        &output,
        &["post_quant_conv.weight", "expected [128, 8, 1, 1]"],
    );
    assert!(!target.exists());

    // Pictures from a model without a decoder.
    let plain = t.join("plain");
    crate::common::export_fixture("nar-c2i-tiny", "model.safetensors", &plain, DType::F32);
    let output = narx(&[
        "run",
        path_str(&plain),
        "--class",
        "1",
        "-o",
        path_str(&out),
    ]);
    assert_bad_input(&output, &["has no decoder", "--vq-checkpoint"]);
    assert!(!out.exists());
}
