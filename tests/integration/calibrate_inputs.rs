//! `narx calibrate` on inputs the review of its first version got wrong: an input that is
//! itself calibrated, flags that can only fail, and a float16 model of another shape.

use std::path::Path;

use narx_calibration::quality::check_comparable;
use narx_graphs::manifest::Manifest;
use narx_graphs::DType;

use crate::common::{assert_bad_input, export_fixture, narx, stderr, stdout};

/// `narx calibrate model --classes CLASSES -o output` on tract (no `--classes` when CLASSES
/// is empty), quickly (`--method max` unless `extra` names one).
fn calibrate(model: &Path, classes: &str, output: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["calibrate", model.to_str().unwrap()];
    if !classes.is_empty() {
        args.extend(["--classes", classes]);
    }
    args.extend([
        "--batch",
        "4",
        "--provider",
        "tract",
        "-o",
        output.to_str().unwrap(),
    ]);
    args.extend(extra);
    if !extra.contains(&"--method") {
        args.extend(["--method", "max"]);
    }
    narx(&args)
}

fn quality(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("quality.json")).unwrap()).unwrap()
}

#[test]
fn calibrating_a_calibrated_directory_leaves_it_untouched() {
    let temp = tempfile::tempdir().unwrap();
    let t = temp.path();
    let model = t.join("model");
    export_fixture("nar-c2i-tiny", "model.safetensors", &model, DType::F32);

    // Every class calibrated on: nothing is held out, and the report says so.
    let first = t.join("first");
    let output = calibrate(&model, "0..10", &first, &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(quality(&first)["held_out"], false);
    assert!(
        stdout(&output).contains("on calibration prompts") && stdout(&output).contains("note:"),
        "{}",
        stdout(&output)
    );
    let manifest = Manifest::load(&first).unwrap();
    let calibration = manifest.calibration.clone().unwrap();
    let tables = [
        &calibration.ranges,
        &calibration.trt_cache,
        &calibration.ort_table,
        &calibration.quality,
    ];
    let before: Vec<Vec<u8>> = tables
        .iter()
        .map(|f| std::fs::read(first.join(f)).unwrap())
        .collect();

    // Calibrated again on other classes (other ranges, another quality report), into a new
    // directory: the first one's files are not written through links.
    let second = t.join("second");
    let output = calibrate(&first, "0..3", &second, &["--trt-version", "8601"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(quality(&second)["held_out"], true);
    assert!(!stdout(&output).contains("note:"), "{}", stdout(&output));
    for (file, bytes) in tables.iter().zip(&before) {
        assert_eq!(&std::fs::read(first.join(file)).unwrap(), bytes, "{file}");
    }
    let cache = std::fs::read_to_string(second.join(&calibration.trt_cache)).unwrap();
    assert!(cache.starts_with("TRT-8601-"), "{cache}");
    assert!(Manifest::load(&first).is_ok());
}

#[test]
fn flags_that_cannot_work_are_refused_before_anything_runs() {
    let temp = tempfile::tempdir().unwrap();
    let t = temp.path();
    let model = t.join("model");
    export_fixture("nar-c2i-tiny", "model.safetensors", &model, DType::F32);
    let captioned = t.join("captioned");
    export_fixture("nar-t2i-tiny", "model.safetensors", &captioned, DType::F32);
    let out = t.join("out");
    let captions = t.join("captions.safetensors");
    let cases: [(&Path, &str, &[&str], &str); 8] = [
        (
            &model,
            "0..3",
            &["--method", "percentile", "--percentile", "0"],
            "--percentile 0 is outside (0, 100]",
        ),
        (
            &model,
            "0..3",
            &["--trt-version", "10"],
            "NV_TENSORRT_VERSION",
        ),
        (&model, "5..3", &[], "--classes: 5..3 is empty"),
        (&model, "3..3", &[], "--classes: 3..3 is empty"),
        (
            &model,
            "0..3",
            &["--holdout-classes", "9,10"],
            "--holdout-classes: class 10 is out of range",
        ),
        (
            &model,
            "",
            &["--captions", captions.to_str().unwrap()],
            "is class-conditional",
        ),
        (
            &model,
            "0..3",
            &["--fp16-model", captioned.to_str().unwrap()],
            "is not an export of the same model",
        ),
        (&captioned, "0..3", &[], "is text-conditional"),
    ];
    for (dir, classes, extra, needle) in cases {
        assert_bad_input(&calibrate(dir, classes, &out, extra), &[needle]);
        assert!(!out.exists(), "{needle}");
    }
    let left: Vec<String> = std::fs::read_dir(t)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(left.iter().all(|name| !name.starts_with('.')), "{left:?}");
}

#[test]
fn a_float16_model_must_have_the_same_grid_vocabulary_and_heads() {
    let temp = tempfile::tempdir().unwrap();
    let model = temp.path().join("model");
    let reference = export_fixture("nar-c2i-tiny", "model.safetensors", &model, DType::F32);
    let dir = Path::new("fp16");
    assert!(check_comparable(&reference, &reference.clone(), dir).is_ok());
    let mut other = reference.clone();
    other.grid = vec![4, 4];
    other.vocab_size += 1;
    other.heads.truncate(1);
    let err = check_comparable(&reference, &other, dir).unwrap_err();
    assert!(err.is_bad_input());
    let err = err.to_string();
    for needle in [
        "fp16 is not an export of the same model",
        "grid [4, 4], expected [8, 8]",
        "vocabulary 257, expected 256",
        "dimension heads (axes) [1], expected [1, 0]",
    ] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
}
