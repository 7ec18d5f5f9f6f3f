//! Shared test helpers: fixture paths and tensors, the narx binary, backends.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use narx_export::checkpoint::open_checkpoint;
use narx_export::model_dir::{export, ExportRequest};
use narx_graphs::manifest::{CacheLayout, Manifest};
use narx_graphs::nar::ModelConfig;
use narx_graphs::DType;
use narx_runtime::backend::ort::{find_library, OrtEngine, OrtOptions};
use narx_runtime::backend::tract::TractEngine;
use narx_runtime::backend::{Engine, GraphKind, HostTensor};
use narx_runtime::generate::Generator;
use narx_runtime::load::{graph_files, GraphChoice, Purpose};

/// The heads' mix input that keeps every one of `rows` rows (for graphs run by hand).
pub fn every_row<E: Engine>(engine: &E, rows: usize) -> (String, E::Value) {
    let mix = HostTensor::F32(vec![rows, rows], narx_runtime::guidance::identity_mix(rows));
    (
        narx_graphs::nar::names::HEAD_MIX.into(),
        engine.upload(mix).unwrap(),
    )
}

/// Greedy generation that reports every row's logits before guidance.
pub fn greedy_unguided_logits(cfg_scale: f32) -> narx_runtime::generate::GenerateOptions {
    narx_runtime::generate::GenerateOptions {
        cfg_scale,
        cfg_interval: -1,
        sampling: narx_runtime::sampling::SamplingParams {
            greedy: true,
            ..Default::default()
        },
        seed: 0,
        unguided_logits: true,
    }
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures")
}

pub fn fixture(name: &str) -> PathBuf {
    let dir = fixtures().join(name);
    assert!(
        dir.is_dir(),
        "fixture {} is missing: the tests need ../shared/fixtures beside the project",
        dir.display()
    );
    dir
}

/// `reference.json` of a fixture.
pub fn reference_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn model_config(name: &str) -> ModelConfig {
    serde_json::from_value(reference_json(name)["config"].clone()).unwrap()
}

/// The tensors of a fixture's `reference.safetensors`.
pub struct Reference {
    bytes: Vec<u8>,
}

pub enum Data {
    F32(Vec<f32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

impl Reference {
    pub fn load(name: &str) -> Self {
        Reference {
            bytes: std::fs::read(fixture(name).join("reference.safetensors")).unwrap(),
        }
    }

    pub fn get(&self, tensor: &str) -> Option<(Vec<usize>, Data)> {
        let st = safetensors::SafeTensors::deserialize(&self.bytes).unwrap();
        let view = st.tensor(tensor).ok()?;
        let shape = view.shape().to_vec();
        let data = view.data();
        let data = match view.dtype() {
            safetensors::Dtype::F32 => Data::F32(
                data.chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            ),
            safetensors::Dtype::I64 => Data::I64(
                data.chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            ),
            safetensors::Dtype::U8 => Data::U8(data.to_vec()),
            other => panic!("{tensor}: unexpected dtype {other:?}"),
        };
        Some((shape, data))
    }

    pub fn f32(&self, tensor: &str) -> (Vec<usize>, Vec<f32>) {
        match self.get(tensor) {
            Some((s, Data::F32(v))) => (s, v),
            _ => panic!("reference has no float tensor {tensor}"),
        }
    }

    pub fn i64(&self, tensor: &str) -> (Vec<usize>, Vec<i64>) {
        match self.get(tensor) {
            Some((s, Data::I64(v))) => (s, v),
            _ => panic!("reference has no int64 tensor {tensor}"),
        }
    }
}

/// Exports `checkpoint` (a fixture file) into `dir` with the fixture's config.
pub fn export_fixture(name: &str, file: &str, dir: &Path, dtype: DType) -> Manifest {
    export_fixture_as(name, file, dir, dtype, CacheLayout::Append)
}

/// [`export_fixture`] with the cache in `layout`.
pub fn export_fixture_as(
    name: &str,
    file: &str,
    dir: &Path,
    dtype: DType,
    layout: CacheLayout,
) -> Manifest {
    let source = open_checkpoint(&fixture(name).join(file)).unwrap();
    export(&ExportRequest {
        source: source.as_ref(),
        config: model_config(name),
        grid: None,
        dtype,
        layout,
        output: dir.to_path_buf(),
        force: false,
        vq: None,
        larp: None,
    })
    .unwrap()
}

/// The graph files `narx run` loads for generation; `step_runs_prefill` as on ONNX Runtime's
/// CPU provider (see [`graph_files`]).
pub struct Files(Vec<(GraphKind, PathBuf)>);

impl Files {
    pub fn as_paths(&self) -> Vec<(GraphKind, &Path)> {
        self.0.iter().map(|(k, p)| (*k, p.as_path())).collect()
    }
}

pub fn graph_paths(dir: &Path, step_runs_prefill: bool) -> Files {
    chosen_graphs(
        dir,
        GraphChoice {
            step_runs_prefill,
            select: false,
        },
    )
}

pub fn chosen_graphs(dir: &Path, choice: GraphChoice) -> Files {
    let manifest = Manifest::load(dir).unwrap();
    Files(graph_files(dir, &manifest, Purpose::Generate, choice))
}

/// tract with the graphs `narx run` loads (class-conditional models run the prefill through
/// the step graph).
pub fn tract_engine(dir: &Path) -> TractEngine {
    TractEngine::load(&graph_paths(dir, true).as_paths(), Some(2)).unwrap()
}

/// tract with the prefill graph too, for tests that run it.
pub fn tract_engine_with_prefill(dir: &Path) -> TractEngine {
    TractEngine::load(&graph_paths(dir, false).as_paths(), Some(2)).unwrap()
}

/// The ONNX Runtime library; a test that needs it fails with instructions when it is absent.
pub fn ort_library() -> PathBuf {
    find_library(None).unwrap_or_else(|e| {
        panic!("{e}\n(run the tests through `bash .ci/run`, which installs onnxruntime)")
    })
}

/// ONNX Runtime on its CPU provider, with the graphs `narx run` loads there (class-conditional
/// models run the prefill through the step graph).
pub fn ort_engine(dir: &Path) -> OrtEngine {
    load_ort(dir, true)
}

/// ONNX Runtime on its CPU provider with the prefill graph too, for tests that run it.
pub fn ort_engine_with_prefill(dir: &Path) -> OrtEngine {
    load_ort(dir, false)
}

fn load_ort(dir: &Path, step_runs_prefill: bool) -> OrtEngine {
    load_ort_with(dir, step_runs_prefill, OrtOptions::default())
}

fn load_ort_with(dir: &Path, step_runs_prefill: bool, options: OrtOptions) -> OrtEngine {
    let options = OrtOptions {
        library: Some(ort_library()),
        intra_threads: Some(2),
        ..options
    };
    OrtEngine::load(&graph_paths(dir, step_runs_prefill).as_paths(), &options).unwrap()
}

/// A generator on ONNX Runtime's CPU provider whose step runs on buffers at fixed
/// addresses, as under CUDA graphs (the CPU provider ignores the graph ids).
pub fn ort_generator_on_fixed_buffers(dir: &Path) -> Generator<OrtEngine> {
    let manifest = Manifest::load(dir).unwrap();
    let options = OrtOptions {
        fixed_step_buffers: Some(manifest.kv_cache.carried()),
        ..OrtOptions::default()
    };
    Generator::new(manifest, load_ort_with(dir, true, options)).unwrap()
}

pub fn tract_generator(dir: &Path) -> Generator<TractEngine> {
    Generator::new(Manifest::load(dir).unwrap(), tract_engine(dir)).unwrap()
}

pub fn ort_generator(dir: &Path) -> Generator<OrtEngine> {
    Generator::new(Manifest::load(dir).unwrap(), ort_engine(dir)).unwrap()
}

/// Runs the narx binary.
pub fn narx(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_narx"))
        .args(args)
        .env("ORT_DYLIB_PATH", ort_library())
        .output()
        .expect("narx binary runs")
}

/// Asserts that the ONNX Runtime under test has no GPU providers (the CPU-only `onnxruntime`
/// wheel CI installs): tests of what a CPU-only machine answers to GPU requests need it, and
/// say so instead of failing obscurely against a GPU build.
pub fn assert_cpu_only_onnxruntime() {
    use narx_runtime::backend::ort::{init, provider_available};
    use narx_runtime::backend::providers::{CudaOptions, ExecutionProvider, TensorRtOptions};
    init(&ort_library()).unwrap();
    for provider in [
        ExecutionProvider::Cuda(CudaOptions::default()),
        ExecutionProvider::TensorRt(TensorRtOptions::default()),
    ] {
        assert!(
            !provider_available(&provider).unwrap(),
            "this test needs a CPU-only ONNX Runtime, and {} has {provider}; run it with the \
             `onnxruntime` wheel's library (scripts/gpu-check.sh covers GPU builds)",
            ort_library().display()
        );
    }
}

/// A path as a command-line argument.
pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// Asserts a bad-input failure: exit code 2 and a message containing every `needle`.
pub fn assert_bad_input(output: &Output, needles: &[&str]) {
    let err = stderr(output);
    assert_eq!(
        output.status.code(),
        Some(2),
        "expected exit 2, stderr:\n{err}"
    );
    for needle in needles {
        assert!(err.contains(needle), "stderr lacks {needle:?}:\n{err}");
    }
}

/// The frames of an animated GIF.
pub fn gif_frames(path: &Path) -> Vec<image::RgbImage> {
    use image::AnimationDecoder;
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    image::codecs::gif::GifDecoder::new(file)
        .unwrap()
        .into_frames()
        .map(|f| image::DynamicImage::ImageRgba8(f.unwrap().into_buffer()).to_rgb8())
        .collect()
}

/// Writes `reference.json`'s `config` of a fixture to `path`, for `--config` flags.
pub fn write_fixture_config(name: &str, path: &Path) {
    let config = reference_json(name)["config"].clone();
    std::fs::write(path, serde_json::to_string(&config).unwrap()).unwrap();
}

/// Runs the decoder graph on `codes` and returns its float output `output` (`image` for the
/// VQ decoder, `video` for LARP).
fn decode_raw<E: Engine>(engine: &mut E, codes: (Vec<usize>, Vec<i64>), output: &str) -> Tensor {
    let input = engine.upload(HostTensor::I64(codes.0, codes.1)).unwrap();
    let mut out = engine
        .run(GraphKind::Decoder, vec![("codes".into(), input)])
        .unwrap();
    engine.download_f32(&out.remove(output).unwrap()).unwrap()
}

/// A float tensor: its shape and values.
pub type Tensor = (Vec<usize>, Vec<f32>);

/// The decoder's float output for `codes` on tract and on ONNX Runtime, by backend.
pub fn decode_on_both_backends(
    dir: &Path,
    codes: (Vec<usize>, Vec<i64>),
    output: &str,
) -> [(&'static str, Tensor); 2] {
    [
        (
            "tract",
            decode_raw(&mut tract_engine(dir), codes.clone(), output),
        ),
        (
            "onnxruntime",
            decode_raw(&mut ort_engine(dir), codes, output),
        ),
    ]
}

/// The largest absolute difference between two equally long float slices.
/// The largest |a − b|; two slices of different lengths fail (a truncated output must not
/// pass as a close one).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared slices differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}
