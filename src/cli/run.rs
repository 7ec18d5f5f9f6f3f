//! `narx run`: generate token grids with an exported model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};

use narx_export::checkpoint::{SafetensorsFile, TensorSource};
use narx_graphs::manifest::{Condition, Manifest};
use narx_runtime::generate::{GenerateOptions, Generation, Prompts};
use narx_runtime::load::{AnyGenerator, Purpose};
use narx_runtime::sampling::{SamplingError, SamplingParams};

use super::backend::BackendArgs;
use super::output::{require_decoder, OutputArgs};
use super::BadInput;
use narx_runtime::decode::Decoded;
use narx_runtime::picture::{trace_frames, write_atomically, write_gif, LAST_FRAME_HOLD};
use narx_runtime::scheduler::Order;

#[derive(Args)]
pub struct RunArgs {
    /// Model directory written by `narx export`.
    model: PathBuf,
    /// Class label of an image (c2i); repeat for a batch.
    #[arg(long = "class", allow_negative_numbers = true)]
    classes: Vec<i64>,
    /// Safetensors file with `caption_embeddings` (B, tokens, dim) and `caption_mask`
    /// (B, tokens), left-padded as upstream's sampler prepares them (t2i).
    #[arg(long)]
    caption_embeddings: Option<PathBuf>,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Write the tokens as JSON: {"tokens": [[...], ...], "grid": [...]}, raster order.
    #[arg(long)]
    tokens_out: Option<PathBuf>,
    #[command(flatten)]
    outputs: OutputArgs,
    /// An animated GIF of the generation order of the first image: one frame per model call,
    /// cells not generated yet greyed out (image models).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Generation order: nar (one wavefront per call), or raster (one token per call, as
    /// LlamaGen; the baseline NAR is measured against). Default: the model's own.
    #[arg(long, value_enum)]
    order: Option<OrderArg>,
    /// Print results as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OrderArg {
    Nar,
    Raster,
}

impl OrderArg {
    pub fn order(self) -> Order {
        match self {
            OrderArg::Nar => Order::Nar,
            OrderArg::Raster => Order::Raster,
        }
    }
}

/// Guidance and sampling; unset values come from the manifest (upstream's sample scripts).
#[derive(Args)]
pub struct SamplingArgs {
    /// Classifier-free guidance scale (≤ 1 turns guidance off).
    #[arg(long, allow_negative_numbers = true)]
    cfg_scale: Option<f32>,
    /// Stop guiding once more than this many tokens exist (-1: never), as upstream counts.
    #[arg(long, allow_negative_numbers = true)]
    cfg_interval: Option<i64>,
    /// Divide the logits by this before filtering (upstream floors it at 1e-5).
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f32>,
    /// Keep the K most likely tokens (ties kept; 0 = off).
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling threshold in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    /// Arg-max instead of sampling (what the conformance fixtures use).
    #[arg(long)]
    greedy: bool,
    /// Seed; each image draws from its own stream, so results don't depend on the batch.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    /// Checks the flags given, before any work: each error names its flag.
    pub fn check(&self) -> anyhow::Result<()> {
        if let Some(s) = self.cfg_scale.filter(|s| !s.is_finite()) {
            return Err(BadInput(format!("--cfg-scale {s} is not a number")).into());
        }
        // The sampler's own rules, on the flags given (its defaults pass them).
        let defaults = SamplingParams::default();
        let given = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            ..defaults
        };
        given.validate().map_err(|e| {
            let flag = match e {
                SamplingError::InvalidTemperature(t) => format!("--temperature {t}"),
                SamplingError::InvalidTopP(p) => format!("--top-p {p}"),
                _ => "sampling flags".into(),
            };
            BadInput(format!("{flag}: {e}")).into()
        })
    }

    /// The flags given, the manifest's defaults for the rest.
    pub fn options(&self, manifest: &Manifest) -> anyhow::Result<GenerateOptions> {
        self.check()?;
        let defaults = &manifest.sampling;
        let cfg_scale = self.cfg_scale.unwrap_or(defaults.cfg_scale);
        if !cfg_scale.is_finite() {
            return Err(BadInput(format!(
                "the manifest's cfg_scale {cfg_scale} is not a number"
            ))
            .into());
        }
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.unwrap_or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            greedy: self.greedy,
        };
        sampling
            .validate()
            .map_err(|e| BadInput(format!("the manifest's sampling defaults: {e}")))?;
        Ok(GenerateOptions {
            cfg_scale,
            cfg_interval: self.cfg_interval.unwrap_or(defaults.cfg_interval),
            sampling,
            seed: self.seed,
            unguided_logits: false,
        })
    }
}

/// The prompts a run asks for, checked against the model's condition.
fn prompts(args: &RunArgs, manifest: &Manifest) -> anyhow::Result<Prompts> {
    match &manifest.condition {
        Condition::Class { num_classes, .. } => {
            if args.caption_embeddings.is_some() {
                return Err(BadInput(
                    "this model is class-conditional: use --class, not --caption-embeddings".into(),
                )
                .into());
            }
            if args.classes.is_empty() {
                return Err(BadInput(format!(
                    "give at least one --class N (0..{})",
                    num_classes - 1
                ))
                .into());
            }
            Ok(Prompts::Classes(args.classes.clone()))
        }
        Condition::Caption { tokens, dim } => {
            if !args.classes.is_empty() {
                return Err(BadInput(
                    "this model is text-conditional: use --caption-embeddings, not --class".into(),
                )
                .into());
            }
            let path = args.caption_embeddings.as_ref().ok_or_else(|| {
                BadInput(
                    "give --caption-embeddings F.safetensors for a text-conditional model".into(),
                )
            })?;
            read_captions(path, *tokens, *dim)
        }
    }
}

/// Reads `caption_embeddings` (B, tokens, dim) and `caption_mask` (B, tokens).
pub fn read_captions(path: &Path, tokens: usize, dim: usize) -> anyhow::Result<Prompts> {
    let file = SafetensorsFile::open(path)?;
    let shape = |name: &str| {
        file.shape(name)
            .ok_or_else(|| BadInput(format!("{}: no tensor {name}", path.display())))
    };
    let emb_shape = shape("caption_embeddings")?;
    let mask_shape = shape("caption_mask")?;
    let count = emb_shape.first().copied().unwrap_or(0);
    if emb_shape != [count, tokens, dim] || mask_shape != [count, tokens] || count == 0 {
        return Err(BadInput(format!(
            "{}: caption_embeddings is {emb_shape:?} and caption_mask {mask_shape:?}; this model \
             expects (B, {tokens}, {dim}) and (B, {tokens}) with B ≥ 1",
            path.display()
        ))
        .into());
    }
    Ok(Prompts::Captions {
        embeddings: file.read_f32("caption_embeddings")?,
        mask: file.read_f32("caption_mask")?,
        count,
    })
}

/// Runs a generation with a progress bar (one tick per model call) on stderr.
pub fn generate_with_progress(
    generator: &mut AnyGenerator,
    prompts: &Prompts,
    options: &GenerateOptions,
) -> anyhow::Result<Generation> {
    let bar = ProgressBar::new(generator.calls() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} calls {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(generator.engine_name());
    let result = generator.generate(prompts, options, &mut |_| bar.inc(1));
    bar.finish_and_clear();
    Ok(result?)
}

pub fn tokens_json(generation: &Generation) -> serde_json::Value {
    serde_json::json!({ "tokens": generation.tokens, "grid": generation.grid })
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    // Everything the flags and prompts can get wrong is refused before the model is opened
    // (which, under TensorRT, may build engines for minutes).
    let manifest = Manifest::load(&args.model)?;
    let prompts = prompts(&args, &manifest)?;
    let options = args.sampling.options(&manifest)?;
    prompts.check(&manifest, options.cfg_scale)?;
    args.outputs.check(&manifest)?;
    if args.trace.is_some() {
        require_decoder(&manifest)?;
        if manifest.larp_decoder.is_some() {
            return Err(BadInput("--trace draws 2-D image grids, not video".into()).into());
        }
    }
    let mut generator = args.backend.open(
        &args.model,
        Purpose::Generate,
        args.order.map(OrderArg::order),
    )?;
    let started = Instant::now();
    let generation = generate_with_progress(&mut generator, &prompts, &options)?;
    let seconds = started.elapsed().as_secs_f64();
    if let Some(path) = &args.tokens_out {
        write_atomically(
            path,
            serde_json::to_string(&tokens_json(&generation))?.as_bytes(),
        )?;
    }
    let mut written = Vec::new();
    if args.outputs.wanted() || args.trace.is_some() {
        let decoded = generator.decode(&generation.tokens, &generation.grid)?;
        written = args.outputs.write(&decoded)?;
        if let (Some(path), Decoded::Pictures(images)) = (&args.trace, &decoded) {
            write_trace(path, &images[0], &generator)?;
            written.push(path.clone());
        }
    }
    for path in &written {
        eprintln!("narx: wrote {}", path.display());
    }
    if args.json {
        let mut result = tokens_json(&generation);
        result["calls"] = generation.calls.into();
        result["seconds"] = seconds.into();
        result["backend"] = generator.engine_name().into();
        println!("{result}");
    } else {
        println!(
            "generated {} grid(s) of {} tokens in {} model calls, {:.2} s ({:.2} s/grid) on {}",
            generation.tokens.len(),
            super::export::grid_text(&generation.grid),
            generation.calls,
            seconds,
            seconds / generation.tokens.len() as f64,
            generator.engine_name()
        );
    }
    Ok(())
}

/// The wavefront trace of one generated image: calls + 1 frames.
pub fn write_trace(
    path: &Path,
    picture: &image::RgbImage,
    generator: &AnyGenerator,
) -> anyhow::Result<()> {
    let manifest = generator.manifest();
    let patch = manifest.vq_decoder.as_ref().map_or(16, |d| d.patch);
    // The plan the generation followed: NAR's wavefronts, or raster order.
    let frames = trace_frames(picture, generator.plan(), patch)?;
    write_gif(path, &frames, 150, LAST_FRAME_HOLD)?;
    Ok(())
}
