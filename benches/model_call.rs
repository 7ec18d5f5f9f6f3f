//! One model call, per backend: the step graph at several wavefront widths and batch sizes
//! on a KV cache of realistic length, and the VQ decoder turning one grid into a picture.
//!
//! The model is exported at start-up into a temporary directory, with seeded random weights
//! (the cost of a call does not depend on the weights' values). Its shape is NAR-B's (dim 768,
//! 12 heads, VQ-16's 16384 tokens, two dimension heads) with 4 layers instead of 12, on the
//! 16×16 grid of 256 px images: the full model would make one `cargo bench` take far too long
//! on a 2-core machine, and a layer's cost does not depend on how many follow it, so the
//! per-layer figures carry over. `narx bench` measures full NAR-B end to end.
//!
//! ONNX Runtime is benched when its shared library is found (`pip install onnxruntime`, or
//! `ORT_DYLIB_PATH`); otherwise a line says why its benches were not run.

use std::collections::HashMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, Criterion, SamplingMode, Throughput,
};
use narx_export::model_dir::{export, ExportRequest, VqRequest};
use narx_export::random::random_weights;
use narx_graphs::manifest::{CacheLayout, Condition, KvCache, Manifest};
use narx_graphs::nar::{names, ModelArgs};
use narx_graphs::vq::VqConfig;
use narx_graphs::DType;
use narx_runtime::backend::ort::{find_library, OrtEngine, OrtOptions};
use narx_runtime::backend::tract::TractEngine;
use narx_runtime::backend::{Engine, GraphKind, HostTensor};
use narx_runtime::decode::decode;
use narx_runtime::guidance::CfgSchedule;

/// Side of the latent grid (256 px images).
const GRID: usize = 16;
/// Wavefront widths measured: the first and last calls, a middle one, the widest.
const WIDTHS: [usize; 3] = [1, 8, 16];
/// Model batch rows: one prompt and eight, each with its unconditional (guidance) half.
const ROWS: [usize; 2] = [2, 16];

/// NAR-B's shape with 4 layers instead of 12 (see the module comment for why).
fn model_args() -> ModelArgs {
    ModelArgs {
        dim: 768,
        n_layer: 4,
        n_head: 12,
        vocab_size: 16384,
        block_size: GRID * GRID,
        ..ModelArgs::default()
    }
}

/// VQ-16's decoder layout with fewer channels (as `narx demo` uses): the full VQ-16 decoder
/// alone takes seconds per image on 2 cores.
fn tokenizer() -> VqConfig {
    VqConfig {
        ch: 32,
        z_channels: 64,
        ..VqConfig::vq16()
    }
}

/// Exports the bench model (step graphs and VQ decoder) into `dir`.
fn export_model(dir: &Path) -> Manifest {
    let args = model_args();
    let weights = random_weights(&args.parameters(), 0);
    let vq = tokenizer();
    let vq_weights = random_weights(&vq.parameters(), 1);
    export(&ExportRequest {
        source: &weights,
        config: args.into(),
        grid: None,
        dtype: DType::F32,
        layout: CacheLayout::Append,
        output: dir.to_path_buf(),
        force: false,
        vq: Some(VqRequest {
            source: &vq_weights,
            config: vq,
        }),
        larp: None,
    })
    .expect("exporting the bench model")
}

/// Every graph of the model directory, by kind, as the engines load them.
fn graph_files(dir: &Path, manifest: &Manifest) -> Vec<(GraphKind, PathBuf)> {
    let mut files = vec![
        (GraphKind::Prefill, dir.join(&manifest.graphs.prefill.file)),
        (GraphKind::Step, dir.join(&manifest.graphs.step.file)),
    ];
    if let Some(decoder) = manifest.decoder_graph() {
        files.push((GraphKind::Decoder, dir.join(&decoder.file)));
    }
    files
}

/// How a backend hands the same prefilled cache to every measured call: `Engine::run`
/// consumes its inputs, so each call needs its own copy, made outside the timing.
trait KeepCache: Engine {
    type Kept;
    fn keep(&self, cache: Vec<(String, Self::Value)>) -> Self::Kept;
    fn fresh(&self, kept: &Self::Kept) -> Vec<(String, Self::Value)>;
}

/// tract values are reference-counted: a copy is a pointer copy.
impl KeepCache for TractEngine {
    type Kept = Vec<(String, <TractEngine as Engine>::Value)>;

    fn keep(&self, cache: Vec<(String, Self::Value)>) -> Self::Kept {
        cache
    }

    fn fresh(&self, kept: &Self::Kept) -> Vec<(String, Self::Value)> {
        kept.clone()
    }
}

/// ONNX Runtime values cannot be cloned: the cache is kept on the host and uploaded anew.
impl KeepCache for OrtEngine {
    type Kept = Vec<(String, HostTensor)>;

    fn keep(&self, cache: Vec<(String, Self::Value)>) -> Self::Kept {
        cache
            .into_iter()
            .map(|(name, value)| {
                let (shape, data) = self.download_f32(&value).expect("cache download");
                (name, HostTensor::F32(shape, data))
            })
            .collect()
    }

    fn fresh(&self, kept: &Self::Kept) -> Vec<(String, Self::Value)> {
        kept.iter()
            .map(|(name, tensor)| (name.clone(), self.upload(tensor.clone()).unwrap()))
            .collect()
    }
}

/// Renames a call's `present.*` outputs to the next call's `past.*` inputs.
fn carry<V>(manifest: &Manifest, mut outputs: HashMap<String, V>) -> Vec<(String, V)> {
    let kv = &manifest.kv_cache;
    let mut pairs = vec![(kv.present_key_bias.clone(), kv.past_key_bias.clone())];
    for layer in 0..kv.layers {
        for (present, past) in [
            (&kv.present_key, &kv.past_key),
            (&kv.present_value, &kv.past_value),
        ] {
            pairs.push((KvCache::name(present, layer), KvCache::name(past, layer)));
        }
    }
    pairs
        .into_iter()
        .map(|(present, past)| (past, outputs.remove(&present).expect("cache output")))
        .collect()
}

/// The heads' mix for `rows` rows (prompts, then their unconditional half): each prompt's
/// guided row, as generations project it.
fn guided_mix<E: Engine>(engine: &E, rows: usize) -> (String, E::Value) {
    let mix = CfgSchedule::new(4.0, None).unwrap().head_mix(0, rows / 2);
    (
        names::HEAD_MIX.to_string(),
        engine
            .upload(HostTensor::F32(vec![rows / 2, rows], mix))
            .unwrap(),
    )
}

/// The step graph's token, position and head-mix inputs for `width` cells from raster index
/// `first`.
fn step_inputs<E: Engine>(
    engine: &E,
    rows: usize,
    first: usize,
    width: usize,
) -> Vec<(String, E::Value)> {
    let tokens = (0..rows * width).map(|i| (i * 37 % 16384) as i64).collect();
    // Class models have one condition position before the grid.
    let positions = (0..width).map(|i| (1 + first + i) as i64).collect();
    vec![
        (
            names::TOKENS.to_string(),
            engine
                .upload(HostTensor::I64(vec![rows, width], tokens))
                .unwrap(),
        ),
        (
            names::POSITIONS.to_string(),
            engine
                .upload(HostTensor::I64(vec![width], positions))
                .unwrap(),
        ),
        guided_mix(engine, rows),
    ]
}

/// The cache after half the grid: the prefill of `rows` rows (prompts, then as many null
/// classes), then one step feeding grid cells `0..n²/2`, so the cache holds the condition
/// and 128 cells, as it does in the middle of a generation.
fn half_grid_cache<E: Engine>(
    engine: &mut E,
    manifest: &Manifest,
    rows: usize,
) -> Vec<(String, E::Value)> {
    let Condition::Class {
        null_class: Some(null),
        ..
    } = manifest.condition
    else {
        panic!("the bench model is a class model with a null class");
    };
    let labels = (0..rows)
        .map(|row| {
            if row < rows / 2 {
                row as i64
            } else {
                null as i64
            }
        })
        .collect();
    let labels = engine.upload(HostTensor::I64(vec![rows], labels)).unwrap();
    let prefill = engine
        .run(
            GraphKind::Prefill,
            vec![
                (names::CLASS_LABELS.to_string(), labels),
                guided_mix(engine, rows),
            ],
        )
        .unwrap();
    let mut inputs = carry(manifest, prefill);
    inputs.extend(step_inputs(engine, rows, 0, GRID * GRID / 2));
    let step = engine.run(GraphKind::Step, inputs).unwrap();
    carry(manifest, step)
}

/// Benches the step graph on `engine` at every width and batch size of the bench.
fn bench_steps<E: KeepCache>(
    group: &mut BenchmarkGroup<WallTime>,
    engine: &mut E,
    manifest: &Manifest,
) {
    let backend = engine.name();
    for rows in ROWS {
        let cache = half_grid_cache(engine, manifest, rows);
        let kept = engine.keep(cache);
        for width in WIDTHS {
            group.throughput(Throughput::Elements((rows * width) as u64));
            group.bench_function(format!("{backend}/rows{rows}/w{width}"), |b| {
                // Only `run` is timed: the inputs are built before, the outputs dropped after.
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let mut inputs = engine.fresh(&kept);
                        inputs.extend(step_inputs(engine, rows, GRID * GRID / 2, width));
                        let started = Instant::now();
                        let outputs = engine.run(GraphKind::Step, black_box(inputs)).unwrap();
                        total += started.elapsed();
                        drop(black_box(outputs));
                    }
                    total
                })
            });
        }
    }
}

/// Decodes one 16×16 token grid into a 256×256 picture (upload, decoder graph, pixels).
fn bench_decode<E: Engine>(
    group: &mut BenchmarkGroup<WallTime>,
    engine: &mut E,
    manifest: &Manifest,
) {
    let codebook = manifest.vocab_size;
    let tokens = vec![(0..GRID * GRID)
        .map(|i| (i * 613 % codebook) as u32)
        .collect()];
    group.bench_function(engine.name(), |b| {
        b.iter(|| decode(engine, manifest, black_box(&tokens), &[GRID, GRID]).unwrap())
    });
}

fn benches(c: &mut Criterion) {
    let temp = tempfile::tempdir().expect("a temporary directory");
    let dir = temp.path().join("nar-bench");
    let manifest = export_model(&dir);
    let files = graph_files(&dir, &manifest);
    let paths: Vec<(GraphKind, &Path)> = files.iter().map(|(k, p)| (*k, p.as_path())).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());

    let mut tract = TractEngine::load(&paths, Some(threads)).expect("tract loads the model");
    let mut ort = find_library(None)
        .and_then(|library| {
            let options = OrtOptions {
                library: Some(library),
                intra_threads: Some(threads),
                ..OrtOptions::default()
            };
            OrtEngine::load(&paths, &options)
        })
        .inspect_err(|e| {
            eprintln!(
                "model_call: the ONNX Runtime benches were NOT run: {e} \
                 (pip install onnxruntime, or set ORT_DYLIB_PATH)"
            )
        })
        .ok();

    // Calls take milliseconds to a second: few samples of one call each.
    let mut group = c.benchmark_group("step");
    group.sampling_mode(SamplingMode::Flat).sample_size(10);
    bench_steps(&mut group, &mut tract, &manifest);
    if let Some(ort) = &mut ort {
        bench_steps(&mut group, ort, &manifest);
    }
    group.finish();

    let mut group = c.benchmark_group("decode");
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .throughput(Throughput::Elements((GRID * GRID) as u64));
    bench_decode(&mut group, &mut tract, &manifest);
    if let Some(ort) = &mut ort {
        bench_decode(&mut group, ort, &manifest);
    }
    group.finish();
}

// A call is slow enough that one second of warm-up is plenty (the default is three).
criterion_group! {
    name = model_call;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(model_call);
