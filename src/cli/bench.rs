//! `narx bench`: end-to-end generation speed, measured honestly — warm-up first, then the
//! median and the best of several repeats, with the time split between model calls and
//! sampling, achieved GFLOP/s and peak resident memory. Start-up (opening the sessions, the
//! first generation) is reported apart: a server pays it once, not per image.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use narx_export::model_dir::{export, ExportRequest};
use narx_export::random::random_weights;
use narx_graphs::manifest::CacheLayout;
use narx_graphs::nar::ModelConfig;
use narx_graphs::DType;
use narx_runtime::flops::generation_flops;
use narx_runtime::generate::{Generation, Prompts};
use narx_runtime::guidance::model_rows;
use narx_runtime::load::{AnyGenerator, Purpose};

use super::backend::BackendArgs;
use super::export::model_config;
use super::run::{OrderArg, SamplingArgs};
use super::BadInput;

#[derive(Args)]
pub struct BenchArgs {
    /// Model directory written by `narx export` (or use --preset with --random-weights).
    #[arg(required_unless_present = "preset")]
    model: Option<PathBuf>,
    /// Benchmark a preset shape (nar-b, ...) exported with seeded random weights.
    #[arg(long, requires = "random_weights", conflicts_with = "model")]
    preset: Option<String>,
    /// Required with --preset: says plainly that the weights are random.
    #[arg(long)]
    random_weights: bool,
    /// Grid side for --preset (default 16).
    #[arg(long, requires = "preset")]
    grid: Option<usize>,
    /// Images generated together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Timed repeats after one warm-up run.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Generation order: nar, or raster (one token per call, LlamaGen's; the baseline).
    /// Default: the model's own.
    #[arg(long, value_enum)]
    order: Option<OrderArg>,
    /// Print one JSON object on the last line of stdout.
    #[arg(long)]
    json: bool,
}

/// One timed generation.
struct Timing {
    seconds: f64,
    model: f64,
    sampling: f64,
}

fn timed(
    generator: &mut AnyGenerator,
    prompts: &Prompts,
    options: &narx_runtime::generate::GenerateOptions,
) -> anyhow::Result<(Timing, Generation)> {
    let (mut model, mut sampling) = (0.0, 0.0);
    let started = Instant::now();
    let generation = generator.generate(prompts, options, &mut |r| {
        model += r.model_seconds;
        sampling += r.sampling_seconds;
    })?;
    let timing = Timing {
        seconds: started.elapsed().as_secs_f64(),
        model,
        sampling,
    };
    Ok((timing, generation))
}

/// The high-water mark of resident memory (Linux), in bytes.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.batch == 0 || args.repeat == 0 {
        return Err(BadInput("--batch and --repeat must be at least 1".into()).into());
    }
    args.backend.check()?;
    args.sampling.check()?;
    let temp = tempfile::tempdir().map_err(|e| BadInput(format!("temporary directory: {e}")))?;
    let dir = match (&args.model, &args.preset) {
        (Some(dir), _) => dir.clone(),
        (None, Some(name)) => {
            let model = model_config(Some(name), None)?;
            // The image grid is a bench setting; a video model's is its latent_shape.
            let grid = match model {
                ModelConfig::Image(_) => Some(args.grid.unwrap_or(16)),
                ModelConfig::Video(_) => args.grid,
            };
            let dir = temp.path().join(name);
            eprintln!("narx: exporting {name} with random weights (speed only: output is noise)");
            export(&ExportRequest {
                source: &random_weights(&model.parameters(), 0),
                config: model,
                grid,
                dtype: DType::F32,
                layout: CacheLayout::Append,
                output: dir.clone(),
                force: false,
                vq: None,
                larp: None,
            })?;
            dir
        }
        (None, None) => return Err(BadInput("give a model directory or --preset".into()).into()),
    };
    let order = args.order.map(OrderArg::order);
    let opening = Instant::now();
    let mut generator = args.backend.open(&dir, Purpose::Generate, order)?;
    let open_s = opening.elapsed().as_secs_f64();
    let manifest = generator.manifest().clone();
    let options = args.sampling.options(&manifest)?;
    let prompts = match &manifest.condition {
        narx_graphs::manifest::Condition::Class { num_classes, .. } => Prompts::Classes(
            (0..args.batch)
                .map(|i| ((i * 97 + 207) % num_classes) as i64)
                .collect(),
        ),
        narx_graphs::manifest::Condition::Caption { tokens, dim } => Prompts::Captions {
            embeddings: vec![0.01; args.batch * tokens * dim],
            mask: vec![1.0; args.batch * tokens],
            count: args.batch,
        },
    };
    let rows = model_rows(args.batch, options.cfg_scale);
    let head_rows = generator.head_rows(args.batch, &options);
    let (warm_up, _) = timed(&mut generator, &prompts, &options)?;
    let mut runs = Vec::new();
    let mut calls = 0;
    for _ in 0..args.repeat {
        let (timing, generation) = timed(&mut generator, &prompts, &options)?;
        calls = generation.calls;
        runs.push(timing);
    }
    let mut seconds: Vec<f64> = runs.iter().map(|r| r.seconds).collect();
    let median_s = median(&mut seconds);
    let best_s = seconds[0];
    let images = args.batch as f64;
    let flops = generation_flops(&manifest.config, generator.plan(), rows, head_rows);
    let cells: usize = manifest.grid.iter().product();
    let model = median(&mut runs.iter().map(|r| r.model).collect::<Vec<_>>());
    let sampling = median(&mut runs.iter().map(|r| r.sampling).collect::<Vec<_>>());
    let result = serde_json::json!({
        "provider": generator.engine_name(),
        "order": generator.order().name(),
        "batch": args.batch,
        "grid": manifest.grid,
        "calls": calls,
        "repeats": args.repeat,
        "seconds_per_image": median_s / images,
        "best_seconds_per_image": best_s / images,
        "images_per_s": images / median_s,
        "tokens_per_s": images * cells as f64 / median_s,
        "gflop_per_generation": flops / 1e9,
        "gflops_per_s": flops / 1e9 / median_s,
        "model_seconds": model,
        "sampling_seconds": sampling,
        "other_seconds": (median_s - model - sampling).max(0.0),
        "peak_rss_bytes": peak_rss_bytes(),
        "open_seconds": open_s,
        "first_generation_seconds": warm_up.seconds,
        "weights_bytes": manifest.weights.bytes,
        "parameters": manifest.parameters,
    });
    println!(
        "{} in {} order on {}: batch {}, {} calls, {:.3} s/image median ({:.3} best), \
         {:.2} images/s, {:.0} tokens/s",
        manifest.family,
        generator.order().name(),
        generator.engine_name(),
        args.batch,
        calls,
        median_s / images,
        best_s / images,
        images / median_s,
        images * cells as f64 / median_s
    );
    println!(
        "  per generation: {:.1} GFLOP at {:.1} GFLOP/s; model calls {:.3} s, sampling {:.3} s, \
         other {:.3} s",
        flops / 1e9,
        flops / 1e9 / median_s,
        model,
        sampling,
        (median_s - model - sampling).max(0.0)
    );
    println!(
        "  start-up: model opened in {open_s:.2} s, first generation (warm-up) {:.3} s",
        warm_up.seconds
    );
    if let Some(rss) = peak_rss_bytes() {
        println!(
            "  peak resident memory {:.0} MiB (weights {:.0} MiB)",
            rss as f64 / (1u64 << 20) as f64,
            manifest.weights.bytes as f64 / (1u64 << 20) as f64
        );
    }
    if args.json {
        println!("{result}");
    }
    Ok(())
}
