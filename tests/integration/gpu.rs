//! The GPU paths as far as a machine without a GPU can take them: the TensorRT profile
//! strings and settings a real export produces, and the errors when a GPU provider is asked
//! for where there is none, and bundles for boards. (`scripts/gpu-check.sh` runs the rest on
//! a GPU.)

use narx_graphs::manifest::{CacheLayout, Manifest};
use narx_graphs::DType;
use narx_runtime::backend::providers::ProfileShapes;
use narx_runtime::load::{resident_outputs, GpuOptions};

use crate::common::{
    assert_bad_input, assert_cpu_only_onnxruntime, export_fixture, export_fixture_as, narx, stderr,
    stdout,
};

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
    // Engines go in a folder of `trt-cache/` per precision and model files.
    let trt = GpuOptions::default().tensorrt(&manifest, &dir).unwrap();
    let engines = trt.engine_cache.clone().unwrap();
    assert_eq!(engines.parent(), Some(dir.join("trt-cache").as_path()));
    assert_eq!(trt.timing_cache, Some(dir.join("trt-cache")));
    // EP-context models go with the engines; a graph's is used once a run has written it.
    assert_eq!(trt.ep_context, Some(engines.clone()));
    let step = dir.join(&manifest.graphs.step.file);
    assert_eq!(trt.ep_context_model(&step), None);
    std::fs::create_dir_all(&engines).unwrap();
    std::fs::write(engines.join("step_ctx.onnx"), b"").unwrap();
    assert_eq!(
        trt.ep_context_model(&step),
        Some(engines.join("step_ctx.onnx"))
    );
    std::fs::remove_dir_all(dir.join("trt-cache")).unwrap();
    // Another precision does not load those engines.
    let fp16 = GpuOptions {
        fp16: Some(true),
        ..GpuOptions::default()
    };
    assert_ne!(
        fp16.tensorrt(&manifest, &dir).unwrap().engine_cache,
        Some(engines)
    );
    assert_eq!(trt.builder_optimization_level, 3);
    assert!(!trt.fp16);
    let flags = GpuOptions {
        device_id: 2,
        fp16: Some(true),
        builder_optimization_level: Some(5),
        no_cache: true,
        ..GpuOptions::default()
    };
    let trt = flags.tensorrt(&manifest, &dir).unwrap();
    assert_eq!(
        (trt.device_id, trt.fp16, trt.builder_optimization_level),
        (2, true, 5)
    );
    assert_eq!(
        (trt.engine_cache, trt.timing_cache, trt.ep_context),
        (None, None, None)
    );
    let reloaded = Manifest::load(&dir).unwrap();
    assert_eq!(reloaded.tensorrt, manifest.tensorrt);

    // The KV cache stays on the GPU from call to call; the head logits too when the
    // selection graph runs there.
    let kept = resident_outputs(&manifest, false);
    assert_eq!(kept.len(), 2 * manifest.kv_cache.layers);
    assert!(
        kept.iter().any(|o| o == "present.0.key") && kept.iter().any(|o| o == "present.2.value")
    );
    let with_heads = resident_outputs(&manifest, true);
    assert!(manifest
        .heads
        .iter()
        .all(|h| with_heads.contains(&h.output)));
}

#[test]
fn gpu_providers_without_a_gpu_build_fail_with_what_is_missing() {
    assert_cpu_only_onnxruntime();
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

/// `auto` passes over an ONNX Runtime it found that does not load (too old, broken) and
/// generates on tract; one the user named must load.
#[test]
fn auto_passes_over_a_broken_library_it_found_but_not_one_named() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("model");
    export_fixture("nar-c2i-tiny", "model.safetensors", &dir, DType::F32);
    let libs = temp.path().join("lib");
    std::fs::create_dir(&libs).unwrap();
    let broken = libs.join("libonnxruntime.so");
    std::fs::write(&broken, "not a library").unwrap();
    let run = |named: Option<&std::path::Path>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_narx"));
        command
            .args(["run", dir.to_str().unwrap(), "--class", "1"])
            .env("LD_LIBRARY_PATH", &libs)
            .env_remove("ORT_DYLIB_PATH");
        if let Some(named) = named {
            command.arg("--ort-lib").arg(named);
        }
        command.output().unwrap()
    };
    let found = run(None);
    let err = stderr(&found);
    assert!(found.status.success(), "{err}");
    assert!(
        err.contains("using tract") && err.contains("libonnxruntime.so"),
        "{err}"
    );
    let named = run(Some(&broken));
    assert_bad_input(&named, &["libonnxruntime.so"]);
}

#[test]
fn cuda_graphs_replay_static_exports_on_gpu_providers_only() {
    assert_cpu_only_onnxruntime();
    let temp = tempfile::tempdir().unwrap();
    let fixed = temp.path().join("static");
    let growing = temp.path().join("append");
    let static_manifest = export_fixture_as(
        "nar-c2i-tiny",
        "model.safetensors",
        &fixed,
        DType::F32,
        CacheLayout::Static,
    );
    let append_manifest = export_fixture("nar-c2i-tiny", "model.safetensors", &growing, DType::F32);
    // Static shapes allow CUDA graphs, so a static export turns them on; flags override.
    assert!(static_manifest.cuda_graph && !append_manifest.cuda_graph);
    let default = GpuOptions::default();
    assert!(default.cuda(&static_manifest).unwrap().cuda_graph);
    assert!(!default.cuda(&append_manifest).unwrap().cuda_graph);
    let off = GpuOptions {
        cuda_graph: Some(false),
        ..GpuOptions::default()
    };
    assert!(!off.cuda(&static_manifest).unwrap().cuda_graph);
    let on = GpuOptions {
        cuda_graph: Some(true),
        ..GpuOptions::default()
    };
    let message = on.cuda(&append_manifest).unwrap_err().to_string();
    assert!(message.contains("--static"), "{message}");

    let (fixed_arg, growing_arg) = (fixed.to_str().unwrap(), growing.to_str().unwrap());
    let run = |args: &[&str]| narx(&[&["run", "--class", "1"], args].concat());
    // Asked of shapes that change from call to call, or of the CPU: the user's mistake.
    let output = run(&[growing_arg, "--provider", "cuda", "--cuda-graph"]);
    assert_bad_input(&output, &["narx export --static"]);
    // TensorRT keeps one captured graph per session; the step needs two.
    for provider in ["cpu", "tensorrt", "auto"] {
        let output = run(&[fixed_arg, "--provider", provider, "--cuda-graph"]);
        assert_bad_input(&output, &["--provider cuda"]);
    }
    let output = run(&[fixed_arg, "--cuda-graph", "--no-cuda-graph"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    // The manifest's default does not stop the CPU, which has no graphs to capture.
    let output = run(&[fixed_arg, "--provider", "cpu"]);
    assert!(output.status.success(), "{}", stderr(&output));
    // On a machine without a GPU the provider is what is missing, graphs or not.
    for flag in ["--cuda-graph", "--no-cuda-graph"] {
        let output = run(&[fixed_arg, "--provider", "cuda", flag]);
        assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
        assert!(stderr(&output).contains("CUDAExecutionProvider"));
    }
    let output = narx(&["inspect", fixed_arg]);
    assert!(stdout(&output).contains("CUDA graphs on the cuda provider: on"));
    // A bundle of it tells the board what CUDA graphs need.
    let bundle = temp.path().join("static.tar");
    let output = narx(&["package", fixed_arg, "-o", bundle.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let mut archive = tar::Archive::new(std::fs::File::open(&bundle).unwrap());
    let mut readme = String::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.path().unwrap().ends_with("README.md") {
            std::io::Read::read_to_string(&mut entry, &mut readme).unwrap();
        }
    }
    assert!(
        readme.contains("## CUDA graphs")
            && readme.contains("1.18")
            && readme.contains("--no-cuda-graph"),
        "{readme}"
    );

    // A manifest that claims CUDA graphs for growing shapes is refused.
    let path = Manifest::path(&growing);
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text.replace("\"cuda_graph\": false", "\"cuda_graph\": true");
    assert_ne!(text, edited);
    std::fs::write(&path, edited).unwrap();
    let output = narx(&["inspect", growing_arg]);
    assert_bad_input(&output, &["cuda_graph", "static"]);
}

#[test]
fn packages_are_complete_bundles_that_run() {
    let temp = tempfile::tempdir().unwrap();
    let t = temp.path();
    let dir = t.join("model");
    export_fixture("nar-c2i-tiny", "model.safetensors", &dir, DType::F32);
    // An engine a GPU run left behind goes along.
    std::fs::create_dir(dir.join("trt-cache")).unwrap();
    std::fs::write(dir.join("trt-cache/step_sm90.engine"), b"engine bytes").unwrap();

    let tar_path = t.join("board.tar");
    let output = narx(&[
        "package",
        dir.to_str().unwrap(),
        "-o",
        tar_path.to_str().unwrap(),
    ]);
    assert!(output.status.success(), "{}", stderr(&output));
    let mut archive = tar::Archive::new(std::fs::File::open(&tar_path).unwrap());
    let mut names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "board/README.md",
            "board/narx.json",
            "board/prefill.onnx",
            "board/select.onnx",
            "board/step.onnx",
            "board/trt-cache/step_sm90.engine",
            "board/weights.bin",
        ]
    );

    // Unpacked, it is a model directory that runs; its README names the runtime it expects.
    let unpacked = t.join("unpacked");
    tar::Archive::new(std::fs::File::open(&tar_path).unwrap())
        .unpack(&unpacked)
        .unwrap();
    let bundle = unpacked.join("board");
    let readme = std::fs::read_to_string(bundle.join("README.md")).unwrap();
    for needle in [
        "1.17 or newer",
        "onnxruntime-gpu",
        "JetPack",
        "Prebuilt TensorRT engines",
    ] {
        assert!(
            readme.contains(needle),
            "README lacks {needle:?}:\n{readme}"
        );
    }
    assert!(!readme.contains("CUDA graphs"), "{readme}");
    let output = narx(&[
        "run",
        bundle.to_str().unwrap(),
        "--class",
        "3",
        "--provider",
        "tract",
    ]);
    assert!(output.status.success(), "{}", stderr(&output));

    // A directory bundle holds the same files; an existing bundle is replaced with --force
    // and kept without it.
    let as_dir = t.join("board-dir");
    for extra in [&[][..], &["--force"][..]] {
        let mut args = vec![
            "package",
            dir.to_str().unwrap(),
            "-o",
            as_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let output = narx(&args);
        assert!(output.status.success(), "{}", stderr(&output));
    }
    assert!(as_dir.join("trt-cache/step_sm90.engine").is_file());
    let output = narx(&[
        "package",
        dir.to_str().unwrap(),
        "-o",
        as_dir.to_str().unwrap(),
    ]);
    assert_bad_input(&output, &["--force"]);
    let again = narx(&[
        "package",
        dir.to_str().unwrap(),
        "-o",
        tar_path.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(stderr(&again).contains("--force"));

    // A truncated weights file is refused before anything is written.
    let broken = t.join("broken");
    std::fs::create_dir(&broken).unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), broken.join(entry.file_name())).unwrap();
        }
    }
    let weights = std::fs::OpenOptions::new()
        .write(true)
        .open(broken.join("weights.bin"))
        .unwrap();
    weights.set_len(100).unwrap();
    let out = t.join("broken.tar");
    let output = narx(&[
        "package",
        broken.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
    assert!(stderr(&output).contains("weights.bin"));
    assert!(!out.exists());
    assert!(std::fs::read_dir(t).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("partial")));
}

#[test]
fn narx_check_passes_our_exports_and_catches_planted_problems() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("model");
    export_fixture("nar-video-tiny", "model.safetensors", &dir, DType::F32);
    let dir_arg = dir.to_str().unwrap();
    for version in ["10", "8.6"] {
        let output = narx(&[
            "check",
            dir_arg,
            "--target",
            "tensorrt",
            "--trt-version",
            version,
        ]);
        let text = crate::common::stdout(&output);
        assert!(
            output.status.success(),
            "{version}: {text}{}",
            stderr(&output)
        );
        assert!(!text.contains("error:"), "{version}: {text}");
    }

    // A computation TensorRT does not do in INT64 (a MatMul on the positions), and a dynamic
    // input whose profile was dropped from the manifest.
    let step_path = dir.join("step.onnx");
    let mut step = narx_graphs::decode_model(&std::fs::read(&step_path).unwrap()).unwrap();
    let graph = step.graph.as_mut().unwrap();
    graph.node.push(narx_graphs::onnx::NodeProto {
        name: Some("/planted/MatMul".into()),
        op_type: Some("MatMul".into()),
        input: vec!["positions".into(), "positions".into()],
        output: vec!["planted".into()],
        ..Default::default()
    });
    std::fs::write(&step_path, narx_graphs::encode_model(&step)).unwrap();
    let manifest_path = dir.join("narx.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    let removed = manifest["tensorrt_profiles"]["step"]
        .as_object_mut()
        .unwrap()
        .remove("tokens");
    assert!(removed.is_some());
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();

    let output = narx(&["check", dir_arg, "--target", "tensorrt"]);
    let text = crate::common::stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{text}{}", stderr(&output));
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("error")).collect();
    assert!(
        errors.iter().any(|l| l.contains("step.onnx")
            && l.contains("/planted/MatMul")
            && l.contains("INT64")),
        "{text}"
    );
    assert!(
        errors
            .iter()
            .any(|l| l.contains("step.onnx") && l.contains("input tokens")),
        "{text}"
    );
    assert!(stderr(&output).contains("error(s)"));
    let output = narx(&["check", dir_arg, "--trt-version", "7"]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));
}
