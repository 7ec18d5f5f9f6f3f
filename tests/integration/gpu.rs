//! The GPU paths as far as a machine without a GPU can take them: the TensorRT profile
//! strings and settings a real export produces, and the errors when a GPU provider is asked
//! for where there is none. (`scripts/gpu-check.sh` runs the rest on a GPU.)

use narx_graphs::manifest::Manifest;
use narx_graphs::DType;
use narx_runtime::backend::providers::ProfileShapes;
use narx_runtime::load::GpuOptions;

use crate::common::{export_fixture, narx, stderr};

#[test]
fn exports_carry_tensorrt_profiles_covering_every_dynamic_input() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("model");
    let manifest = export_fixture("nar-c2i-tiny", "model.safetensors", &dir, DType::F32);
    let step = &manifest.tensorrt_profiles["step"];
    for input in &manifest.graphs.step.inputs {
        let dynamic = input
            .shape
            .iter()
            .any(|d| matches!(d, narx_graphs::Dim::Named(_)));
        assert_eq!(step.contains_key(&input.name), dynamic, "{}", input.name);
    }
    // 8×8 grid, 1 condition token, up to 8 prompts with guidance: batch 1..16, width 1..8,
    // cache 1..64 positions.
    let shapes = ProfileShapes::from_manifest(step).unwrap();
    assert!(shapes.min.contains("tokens:1x1"), "{}", shapes.min);
    assert!(shapes.max.contains("tokens:16x8"), "{}", shapes.max);
    assert!(shapes.min.contains("past.0.key:1x4x1x24"), "{}", shapes.min);
    assert!(
        shapes.max.contains("past.2.value:16x4x64x24"),
        "{}",
        shapes.max
    );
    assert!(shapes.max.contains("positions:8"), "{}", shapes.max);

    // The manifest's TensorRT settings, resolved against the directory and overridden.
    let trt = GpuOptions::default().tensorrt(&manifest.tensorrt, &dir);
    assert_eq!(trt.engine_cache, Some(dir.join("trt-cache")));
    assert_eq!(trt.builder_optimization_level, 3);
    assert!(!trt.fp16);
    let flags = GpuOptions {
        device_id: 2,
        fp16: Some(true),
        builder_optimization_level: Some(5),
        no_cache: true,
        ..GpuOptions::default()
    };
    let trt = flags.tensorrt(&manifest.tensorrt, &dir);
    assert_eq!(
        (trt.device_id, trt.fp16, trt.builder_optimization_level),
        (2, true, 5)
    );
    assert_eq!((trt.engine_cache, trt.timing_cache), (None, None));
    let reloaded = Manifest::load(&dir).unwrap();
    assert_eq!(reloaded.tensorrt, manifest.tensorrt);
}

#[test]
fn gpu_providers_without_a_gpu_build_fail_with_what_is_missing() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("model");
    export_fixture("nar-c2i-tiny", "model.safetensors", &dir, DType::F32);
    let dir_arg = dir.to_str().unwrap();
    for (provider, name) in [
        ("cuda", "CUDAExecutionProvider"),
        ("tensorrt", "TensorrtExecutionProvider"),
    ] {
        let output = narx(&["run", dir_arg, "--class", "1", "--provider", provider]);
        let err = stderr(&output);
        assert_eq!(output.status.code(), Some(1), "{provider}: {err}");
        for needle in [name, "onnxruntime-gpu", "--ort-lib"] {
            assert!(err.contains(needle), "{provider}: no {needle:?} in:\n{err}");
        }
    }
    // Nothing was written into the model directory on the way.
    assert!(!dir.join("trt-cache").exists());
    // An out-of-range TensorRT setting is the user's mistake.
    let output = narx(&[
        "run",
        dir_arg,
        "--class",
        "1",
        "--provider",
        "tensorrt",
        "--trt-opt-level",
        "9",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("optimisation level 9"));
    // auto on a CPU-only ONNX Runtime runs on its CPU provider and says so.
    let output = narx(&["run", dir_arg, "--class", "1"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("using the cpu provider of ONNX Runtime"));
}
