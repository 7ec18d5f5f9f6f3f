//! Bad input: a clear message naming the problem, exit code 2, and no partial output.

use std::io::Write;
use std::path::Path;

use crate::common::{assert_bad_input, fixture, narx, reference_json};

fn config_file(dir: &Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut config = reference_json(name)["config"].clone();
    edit(&mut config);
    let path = dir.join(format!("{name}-config.json"));
    std::fs::write(&path, config.to_string()).unwrap();
    path.to_str().unwrap().to_string()
}

/// Runs `narx export` expecting failure; checks the output directory was not created.
fn export_fails(checkpoint: &Path, config: &str, out: &Path, needles: &[&str]) {
    let output = narx(&[
        "export",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--config",
        config,
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_bad_input(&output, needles);
    assert!(!out.exists(), "a failed export left {}", out.display());
    let parent = out.parent().unwrap();
    for entry in std::fs::read_dir(parent).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        assert!(
            !name.contains("narx-partial"),
            "a failed export left {name}"
        );
    }
}

fn truncated_copy(src: &Path, dst: &Path, keep: f64) {
    let bytes = std::fs::read(src).unwrap();
    std::fs::write(dst, &bytes[..(bytes.len() as f64 * keep) as usize]).unwrap();
}

#[test]
fn broken_checkpoints_are_refused_with_their_names() {
    let temp = tempfile::tempdir().unwrap();
    let t = temp.path();
    let config = config_file(t, "nar-c2i-tiny", |_| {});
    let out = t.join("out");
    let fx = fixture("nar-c2i-tiny");

    let truncated_pt = t.join("truncated.pt");
    truncated_copy(&fx.join("model.pt"), &truncated_pt, 0.6);
    export_fails(&truncated_pt, &config, &out, &["truncated.pt"]);

    let truncated_st = t.join("truncated.safetensors");
    truncated_copy(&fx.join("model.safetensors"), &truncated_st, 0.6);
    export_fails(&truncated_st, &config, &out, &["truncated.safetensors"]);

    let garbage = t.join("garbage.bin");
    std::fs::write(&garbage, b"this is not a checkpoint at all, just text").unwrap();
    export_fails(&garbage, &config, &out, &["garbage.bin", "safetensors"]);

    // A pickle that names os.system: refused without running anything.
    let evil = t.join("evil.pt");
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&evil).unwrap());
    let stored =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    zip.write_all(b"\x80\x02cos\nsystem\nq\x00X\x0b\x00\x00\x00touch /tmp/xq\x01\x85q\x02Rq\x03.")
        .unwrap();
    zip.finish().unwrap();
    export_fails(&evil, &config, &out, &["os.system", "evil.pt"]);
}

#[test]
fn checkpoints_that_do_not_fit_the_model_name_the_tensor() {
    let temp = tempfile::tempdir().unwrap();
    let t = temp.path();
    let out = t.join("out");
    let checkpoint = fixture("nar-c2i-tiny").join("model.safetensors");
    // One more layer than the checkpoint has: its tensors are missing.
    let deeper = config_file(t, "nar-c2i-tiny", |c| c["n_layer"] = 3.into());
    export_fails(
        &checkpoint,
        &deeper,
        &out,
        &["missing tensor layers.3.attention.wqkv.weight"],
    );
    // A different vocabulary: the embedding has the wrong shape.
    let vocab = config_file(t, "nar-c2i-tiny", |c| c["vocab_size"] = 512.into());
    export_fails(
        &checkpoint,
        &vocab,
        &out,
        &["tok_embeddings.weight has shape [256, 96], expected [512, 96]"],
    );
    let output = narx(&[
        "export",
        "--checkpoint",
        checkpoint.to_str().unwrap(),
        "--preset",
        "nar-huge",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_bad_input(&output, &["unknown preset \"nar-huge\"", "nar-b"]);
    assert!(!out.exists());
    let bad_json = t.join("bad.json");
    std::fs::write(&bad_json, "{\"dim\": 96, \"n_layers\": 2}").unwrap();
    export_fails(&checkpoint, bad_json.to_str().unwrap(), &out, &["n_layers"]);
}

fn exported(t: &Path, name: &str) -> std::path::PathBuf {
    let dir = t.join(name);
    crate::common::export_fixture(name, "model.safetensors", &dir, narx_graphs::DType::F32);
    dir
}

#[test]
fn run_rejects_bad_prompts_and_keeps_outputs_clean() {
    let temp = tempfile::tempdir().unwrap();
    let t = temp.path();
    let c2i = exported(t, "nar-c2i-tiny");
    let d = c2i.to_str().unwrap();
    let tokens_out = t.join("tokens.json");
    let out = tokens_out.to_str().unwrap();
    let output = narx(&["run", d, "--class", "10", "--tokens-out", out]);
    assert_bad_input(&output, &["class 10 is out of range", "0..9"]);
    let output = narx(&["run", d, "--class", "-1", "--tokens-out", out]);
    assert_bad_input(&output, &["class -1"]);
    let output = narx(&["run", d, "--tokens-out", out]);
    assert_bad_input(&output, &["--class"]);
    assert!(
        !tokens_out.exists(),
        "a failed run wrote {}",
        tokens_out.display()
    );
    let unwritable = t.join("no/such/dir/tokens.json");
    let output = narx(&[
        "run",
        d,
        "--class",
        "1",
        "--tokens-out",
        unwritable.to_str().unwrap(),
    ]);
    assert_bad_input(&output, &["no/such/dir/tokens.json"]);

    let t2i = exported(t, "nar-t2i-tiny");
    let wrong = t.join("wrong-captions.safetensors");
    // Caption features of the wrong width: (1, 120, 16) for a model that reads 32.
    let data = vec![0u8; 120 * 16 * 4];
    let mask = vec![0u8; 120 * 4];
    let tensors = [
        (
            "caption_embeddings",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 120, 16], &data)
                .unwrap(),
        ),
        (
            "caption_mask",
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 120], &mask)
                .unwrap(),
        ),
    ];
    safetensors::serialize_to_file(tensors, None, &wrong).unwrap();
    let output = narx(&[
        "run",
        t2i.to_str().unwrap(),
        "--caption-embeddings",
        wrong.to_str().unwrap(),
        "--tokens-out",
        out,
    ]);
    assert_bad_input(&output, &["[1, 120, 16]", "(B, 120, 32)"]);
    let output = narx(&["run", t2i.to_str().unwrap(), "--class", "3"]);
    assert_bad_input(&output, &["text-conditional"]);
    assert!(!tokens_out.exists());
}

#[test]
fn broken_model_directories_are_refused() {
    let temp = tempfile::tempdir().unwrap();
    let t = temp.path();
    let dir = exported(t, "nar-c2i-tiny");
    let d = dir.to_str().unwrap();
    let manifest_path = dir.join("narx.json");
    let original = std::fs::read_to_string(&manifest_path).unwrap();

    let mut future: serde_json::Value = serde_json::from_str(&original).unwrap();
    future["format_version"] = 99.into();
    std::fs::write(&manifest_path, future.to_string()).unwrap();
    for cmd in ["run", "inspect"] {
        let output = narx(&[cmd, d, "--class", "1"][..if cmd == "run" { 4 } else { 2 }]);
        assert_bad_input(&output, &["narx.json", "format version 99 is newer"]);
    }

    std::fs::write(&manifest_path, &original[..original.len() / 2]).unwrap();
    assert_bad_input(&narx(&["inspect", d]), &["narx.json", "not valid JSON"]);

    std::fs::write(&manifest_path, &original).unwrap();
    let weights = dir.join("weights.bin");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    assert_bad_input(
        &narx(&["run", d, "--class", "1"]),
        &["weights.bin", "truncated"],
    );

    std::fs::remove_file(&manifest_path).unwrap();
    assert_bad_input(
        &narx(&["run", d, "--class", "1"]),
        &["narx.json", "missing"],
    );
    assert_bad_input(
        &narx(&["inspect", t.join("nowhere").to_str().unwrap()]),
        &["nowhere"],
    );
}

/// A named edit of a manifest, and what the refusal must say.
type Edit = (
    &'static str,
    fn(&mut serde_json::Value),
    &'static [&'static str],
);

#[test]
fn manifests_that_contradict_their_config_are_refused_by_run_and_bench() {
    let temp = tempfile::tempdir().unwrap();
    let t = temp.path();
    let dir = exported(t, "nar-c2i-tiny");
    let d = dir.to_str().unwrap();
    let manifest_path = dir.join("narx.json");
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    let edits: [Edit; 5] = [
        // Each of these used to reach a division by zero or an overflow in the runtime.
        ("n_head", |m| m["config"]["n_head"] = 0.into(), &["n_head"]),
        (
            "multiple_of",
            |m| m["config"]["multiple_of"] = 0.into(),
            &["multiple_of"],
        ),
        (
            "capacity",
            |m| m["kv_cache"]["capacity"] = u64::MAX.into(),
            &["kv_cache.capacity", "implies"],
        ),
        (
            "family",
            |m| m["family"] = "nar-t2i".into(),
            &["family nar-t2i", "nar-c2i"],
        ),
        (
            "qdq model",
            |m| {
                m["calibration"] = serde_json::json!({
                    "method": "max", "generations": 1, "tensors": 1,
                    "ranges": "ranges.json", "trt_cache": "calibration.cache",
                    "trt_version": "TRT-100000", "ort_table": "calibration.flatbuffers",
                    "qdq_model": "../elsewhere", "quality": "quality.json"
                })
            },
            &["calibration.qdq_model", "plain name"],
        ),
    ];
    for (what, edit, needles) in edits {
        let mut manifest = original.clone();
        edit(&mut manifest);
        std::fs::write(&manifest_path, manifest.to_string()).unwrap();
        let mut expected = vec!["narx.json"];
        expected.extend_from_slice(needles);
        eprintln!("{what}");
        assert_bad_input(&narx(&["run", d, "--class", "1"]), &expected);
        assert_bad_input(&narx(&["bench", d, "--repeat", "1"]), &expected);
    }
}
