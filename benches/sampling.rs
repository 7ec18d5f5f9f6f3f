//! The host-side work around the model calls, alone, at NAR's real sizes: planning a
//! generation and placing each call's tokens (the scheduler), sampling a token from 16384
//! guided logits, sampling a whole wavefront, merging the two heads' logits
//! (`Call::assemble`) and classifier-free guidance (`CfgSchedule::apply`).
//!
//! None of this touches a model, so it shows whether the runtime's own code is ever worth
//! optimising next to the model calls (`benches/model_call.rs`).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use narx_runtime::guidance::CfgSchedule;
use narx_runtime::sampling::{sample_block, sample_row, ImageRng, SamplingParams};
use narx_runtime::scheduler::WavefrontPlan;

/// VQ-16's codebook: the vocabulary of every released NAR model.
const VOCAB: usize = 16384;
/// The 16×16 latent grid of 256 px images; its widest wavefront has 16 cells.
const GRID: usize = 16;
/// Prompts per batch (upstream's sample scripts draw 8 images per class sheet).
const BATCH: usize = 8;
/// Upstream's default guidance scale for c2i models.
const CFG_SCALE: f32 = 4.0;

/// Reproducible pseudo-random numbers (SplitMix64), so the benches need no extra crate.
struct Noise(u64);

impl Noise {
    fn unit(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Roughly normal values with standard deviation `std` (a sum of four uniforms).
    fn normal(&mut self, std: f32) -> f32 {
        let sum: f32 = (0..4).map(|_| self.unit()).sum();
        (sum - 2.0) * std * 3f32.sqrt()
    }

    fn logits(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.normal(2.0)).collect()
    }
}

/// `len` guided logits, `uncond + (cond − uncond)·4` as the sampler sees them at scale 4:
/// a wider spread than raw logits, which is what top-k and top-p then cut.
fn guided_logits(noise: &mut Noise, len: usize) -> Vec<f32> {
    let cond = noise.logits(len);
    let uncond = noise.logits(len);
    cond.iter()
        .zip(&uncond)
        .map(|(c, u)| u + (c - u) * CFG_SCALE)
        .collect()
}

/// The sampling settings measured: greedy, upstream's default (top-k 2000 at temperature 1),
/// top-p 0.9 alone (a full sort of the vocabulary) and both filters together.
fn settings() -> [(&'static str, SamplingParams); 4] {
    let base = SamplingParams::default();
    [
        (
            "greedy",
            SamplingParams {
                greedy: true,
                ..base
            },
        ),
        (
            "top_k_2000",
            SamplingParams {
                top_k: 2000,
                ..base
            },
        ),
        ("top_p_0.9", SamplingParams { top_p: 0.9, ..base }),
        (
            "top_k_2000_top_p_0.9",
            SamplingParams {
                top_k: 2000,
                top_p: 0.9,
                ..base
            },
        ),
    ]
}

/// One token from one row of 16384 guided logits.
fn bench_sample_row(c: &mut Criterion) {
    let row = guided_logits(&mut Noise(1), VOCAB);
    let mut group = c.benchmark_group("sample_row");
    group.throughput(Throughput::Elements(1));
    for (name, params) in settings() {
        let mut rng = ImageRng::new(0, 0);
        group.bench_function(name, |b| {
            b.iter(|| sample_row(black_box(&row), &params, &mut rng).unwrap())
        });
    }
    group.finish();
}

/// The widest wavefront (16 cells) of 8 images, as `generate` samples it after each call.
fn bench_sample_block(c: &mut Criterion) {
    let cells = GRID * BATCH;
    let logits = guided_logits(&mut Noise(2), cells * VOCAB);
    let mut group = c.benchmark_group("sample_block");
    // Up to a few hundred milliseconds per block: fewer samples, one block each.
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .throughput(Throughput::Elements(cells as u64));
    for (name, params) in settings() {
        let mut rngs: Vec<ImageRng> = (0..BATCH as u64).map(|i| ImageRng::new(0, i)).collect();
        let mut tokens = vec![0u32; cells];
        group.bench_function(format!("w{GRID}_b{BATCH}/{name}"), |b| {
            b.iter(|| {
                sample_block(black_box(&logits), VOCAB, &params, &mut rngs, &mut tokens).unwrap()
            })
        });
    }
    group.finish();
}

/// Merging the right and down heads' logits for the call that feeds the widest wavefront:
/// 16 inputs per row, 15 produced cells (14 of them averaged from two heads), 16 rows (8
/// prompts with their unconditional half).
fn bench_assemble(c: &mut Criterion) {
    let plan = WavefrontPlan::new(&[GRID, GRID], &[1, 0]).unwrap();
    let call = plan
        .calls()
        .iter()
        .find(|call| !call.is_prefill() && call.input_len() == GRID)
        .unwrap();
    let rows = 2 * BATCH;
    let mut noise = Noise(3);
    let heads: Vec<Vec<f32>> = (0..2)
        .map(|_| noise.logits(rows * call.input_len() * VOCAB))
        .collect();
    let head_refs: Vec<&[f32]> = heads.iter().map(Vec::as_slice).collect();
    let mut out = vec![0f32; rows * call.output_len() * VOCAB];
    let mut group = c.benchmark_group("assemble");
    group.throughput(Throughput::Elements((rows * call.output_len()) as u64));
    group.bench_function(format!("w{GRID}_rows{rows}"), |b| {
        b.iter(|| {
            call.assemble(black_box(&head_refs), rows, VOCAB, &mut out)
                .unwrap()
        })
    });
    group.finish();
}

/// Classifier-free guidance over the same call's assembled logits: `[cond; uncond]` of 16
/// rows in, the 8 guided rows out.
fn bench_cfg_apply(c: &mut Criterion) {
    let cells = GRID * BATCH;
    let logits = Noise(4).logits(2 * cells * VOCAB);
    let mut out = vec![0f32; cells * VOCAB];
    let schedule = CfgSchedule::new(CFG_SCALE, None).unwrap();
    let mut group = c.benchmark_group("cfg_apply");
    group.throughput(Throughput::Elements(cells as u64));
    group.bench_function(format!("w{GRID}_b{BATCH}"), |b| {
        b.iter(|| schedule.apply(0, black_box(&logits), &mut out).unwrap())
    });
    group.finish();
}

/// The scheduler: planning the image generation (16×16, two heads), the video one
/// (4×16×16, three heads: NAR-SPEC §7) and LlamaGen's raster order, each once per
/// generation; and placing the widest call's tokens for 8 images into their grids, once per
/// call.
fn bench_scheduler(c: &mut Criterion) {
    let mut group = c.benchmark_group("scheduler");
    group.bench_function("plan/nar_16x16", |b| {
        b.iter(|| WavefrontPlan::new(black_box(&[GRID, GRID]), &[1, 0]).unwrap())
    });
    group.bench_function("plan/nar_video_4x16x16", |b| {
        b.iter(|| WavefrontPlan::new(black_box(&[4, GRID, GRID]), &[2, 1, 0]).unwrap())
    });
    group.bench_function("plan/raster_16x16", |b| {
        b.iter(|| WavefrontPlan::raster(black_box(&[GRID, GRID]), 1).unwrap())
    });
    let plan = WavefrontPlan::new(&[GRID, GRID], &[1, 0]).unwrap();
    let call = plan
        .calls()
        .iter()
        .max_by_key(|call| call.output_len())
        .unwrap();
    let tokens: Vec<u32> = (0..(BATCH * call.output_len()) as u32).collect();
    let mut grid = vec![0u32; BATCH * plan.cell_count()];
    group.bench_function(format!("place/w{}_b{BATCH}", call.output_len()), |b| {
        b.iter(|| call.place(black_box(&tokens), BATCH, &mut grid).unwrap())
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_scheduler,
    bench_sample_row,
    bench_sample_block,
    bench_assemble,
    bench_cfg_apply
);
criterion_main!(benches);
