//! The command line end to end: export, run on each provider, inspect, demo.

use crate::common::{
    assert_bad_input, fixture, narx, reference_json, stderr, stdout, write_fixture_config,
    Reference,
};

fn export_cli(name: &str, file: &str, out: &std::path::Path) {
    let temp_config = out.with_extension("config.json");
    write_fixture_config(name, &temp_config);
    let checkpoint = fixture(name).join(file);
    let output = narx(&[
        "export",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--config",
        temp_config.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "export failed:\n{}",
        stderr(&output)
    );
}

fn run_tokens(dir: &std::path::Path, provider: &str, extra: &[&str], name: &str) -> Vec<i64> {
    let json = reference_json(name);
    let tokens_out = dir.with_extension(format!("{provider}.tokens.json"));
    let cfg = json["cfg_scale"].to_string();
    let mut args = vec![
        "run",
        dir.to_str().unwrap(),
        "--provider",
        provider,
        "--greedy",
        "--cfg-scale",
        &cfg,
        "--tokens-out",
        tokens_out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let output = narx(&args);
    assert!(output.status.success(), "run failed:\n{}", stderr(&output));
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tokens_out).unwrap()).unwrap();
    assert_eq!(written["grid"], json["grid"]);
    written["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|t| t.as_i64().unwrap()))
        .collect()
}

#[test]
fn cli_export_and_run_reproduce_the_c2i_fixture_on_each_provider() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("c2i");
    export_cli("nar-c2i-tiny", "model.pt", &dir);
    let expected = Reference::load("nar-c2i-tiny").i64("tokens").1;
    for provider in ["tract", "cpu", "auto"] {
        let got = run_tokens(
            &dir,
            provider,
            &["--class", "0", "--class", "4"],
            "nar-c2i-tiny",
        );
        assert_eq!(got, expected, "provider {provider}");
    }
    let inspect = narx(&["inspect", dir.to_str().unwrap()]);
    assert!(inspect.status.success(), "{}", stderr(&inspect));
    let text = stdout(&inspect);
    let json = reference_json("nar-c2i-tiny");
    let calls = format!("grid 8×8 → {} model calls", json["steps"]);
    assert_eq!(json["grid"], serde_json::json!([8, 8]));
    for needle in ["nar-c2i", &calls, "past.0.key", "logits_down"] {
        assert!(text.contains(needle), "inspect lacks {needle:?}:\n{text}");
    }
}

#[test]
fn cli_runs_the_t2i_fixture_from_a_caption_file() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("t2i");
    export_cli("nar-t2i-tiny", "model.safetensors", &dir);
    // The fixture's reference file holds caption_embeddings and caption_mask as narx reads them.
    let captions = fixture("nar-t2i-tiny").join("reference.safetensors");
    let expected = Reference::load("nar-t2i-tiny").i64("tokens").1;
    let extra = ["--caption-embeddings", captions.to_str().unwrap()];
    assert_eq!(run_tokens(&dir, "cpu", &extra, "nar-t2i-tiny"), expected);
    assert_eq!(run_tokens(&dir, "tract", &extra, "nar-t2i-tiny"), expected);
}

#[test]
fn demo_runs_and_says_its_weights_are_random() {
    let temp = tempfile::tempdir().unwrap();
    let picture = temp.path().join("demo.png");
    let trace = temp.path().join("demo.gif");
    let output = narx(&[
        "demo",
        "--provider",
        "tract",
        "--picture",
        picture.to_str().unwrap(),
        "--trace",
        trace.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "demo failed:\n{}", stderr(&output));
    let text = stdout(&output);
    for needle in [
        "RANDOM weights",
        "31 model calls",
        "narx export --checkpoint",
        "noise",
    ] {
        assert!(
            text.contains(needle),
            "demo output lacks {needle:?}:\n{text}"
        );
    }
    let picture = image::open(&picture).unwrap();
    assert_eq!((picture.width(), picture.height()), (256, 256));
    assert!(trace.is_file());
}

#[test]
fn unknown_provider_and_bad_flags_are_usage_errors() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("c2i");
    export_cli("nar-c2i-tiny", "model.safetensors", &dir);
    let d = dir.to_str().unwrap();
    let output = narx(&["run", d, "--class", "1", "--provider", "quantum"]);
    assert_bad_input(&output, &["quantum"]);
    let output = narx(&["run", d, "--class", "1", "--top-p", "1.5"]);
    assert_bad_input(&output, &["--top-p 1.5"]);
    let output = narx(&["run", d, "--class", "1", "--temperature", "-1"]);
    assert_bad_input(&output, &["--temperature -1"]);
    // Prompts and flags are checked before the model is opened: on a machine without a GPU
    // opening it on cuda would fail first (exit 1), and under TensorRT build engines.
    let output = narx(&["run", d, "--class", "100000", "--provider", "cuda"]);
    assert_bad_input(&output, &["class 100000"]);
    let output = narx(&["run", d, "--provider", "cuda"]);
    assert_bad_input(&output, &["--class"]);
    // A preset is not exported for a bench whose flags are wrong.
    let output = narx(&[
        "bench",
        "--preset",
        "nar-b",
        "--random-weights",
        "--top-p",
        "0",
    ]);
    assert_bad_input(&output, &["--top-p 0"]);
    assert!(
        !stderr(&output).contains("exporting"),
        "{}",
        stderr(&output)
    );
    // The demo replaces a model directory only when told to.
    let output = narx(&["demo", "-o", d, "--provider", "tract"]);
    assert_bad_input(&output, &["--force"]);
    assert!(dir.join("narx.json").is_file());
    let output = narx(&[
        "run",
        d,
        "--class",
        "1",
        "--provider",
        "cpu",
        "--ort-lib",
        "/nonexistent/libonnxruntime.so",
    ]);
    assert_bad_input(&output, &["/nonexistent/libonnxruntime.so"]);
}

#[test]
fn bench_reports_speed_as_json() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("c2i");
    export_cli("nar-c2i-tiny", "model.safetensors", &dir);
    for provider in ["tract", "cpu"] {
        let output = narx(&[
            "bench",
            dir.to_str().unwrap(),
            "--provider",
            provider,
            "--batch",
            "2",
            "--repeat",
            "2",
            "--json",
        ]);
        assert!(output.status.success(), "{}", stderr(&output));
        let text = stdout(&output);
        let last = text.lines().last().unwrap();
        let json: serde_json::Value = serde_json::from_str(last).unwrap();
        for key in [
            "seconds_per_image",
            "images_per_s",
            "gflops_per_s",
            "peak_rss_bytes",
            "provider",
            "batch",
            "order",
        ] {
            assert!(
                !json[key].is_null(),
                "{provider}: bench JSON lacks {key}: {last}"
            );
        }
        assert_eq!(json["calls"], reference_json("nar-c2i-tiny")["steps"]);
        assert_eq!(json["batch"], 2);
        for key in [
            "seconds_per_image",
            "open_seconds",
            "first_generation_seconds",
        ] {
            let seconds = json[key].as_f64();
            assert!(
                seconds.is_some_and(|s| s > 0.0),
                "{provider}: {key}: {last}"
            );
        }
    }
    let output = narx(&["bench", dir.to_str().unwrap(), "--batch", "0"]);
    assert_bad_input(&output, &["--batch"]);
}
