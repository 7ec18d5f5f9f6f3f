//! `narx demo`: the whole pipeline on a fresh machine — a small NAR model with seeded random
//! weights is exported and generates, so a user sees narx work before downloading anything.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use narx_export::model_dir::{export, ExportRequest, VqRequest};
use narx_export::random::random_weights;
use narx_graphs::manifest::CacheLayout;
use narx_graphs::nar::{ModelArgs, ModelConfig};
use narx_graphs::vq::VqConfig;
use narx_graphs::DType;
use narx_runtime::decode::Decoded;
use narx_runtime::generate::Prompts;
use narx_runtime::load::Purpose;
use narx_runtime::picture::write_png;

use super::backend::BackendArgs;
use super::run::{generate_with_progress, write_trace, SamplingArgs};
use super::BadInput;

#[derive(Args)]
pub struct DemoArgs {
    /// Keep the exported model here (default: a temporary directory, removed afterwards).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Replace the model directory at --output if there is one.
    #[arg(long, requires = "output")]
    force: bool,
    /// Where the (noise) picture goes.
    #[arg(long, default_value = "narx-demo.png")]
    picture: PathBuf,
    /// Where the animated trace of the generation order goes.
    #[arg(long, default_value = "narx-demo-trace.gif")]
    trace: PathBuf,
    /// Class label to generate.
    #[arg(long = "class", default_value_t = 207)]
    class: i64,
    #[command(flatten)]
    backend: BackendArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// A small VQ-16-shaped decoder (VQ-16 codebook and layout, fewer channels).
fn demo_tokenizer() -> VqConfig {
    VqConfig {
        ch: 32,
        z_channels: 64,
        ..VqConfig::vq16()
    }
}

/// A NAR-shaped c2i model small enough to export and run in seconds on two cores.
fn demo_model() -> ModelArgs {
    ModelArgs {
        dim: 256,
        n_layer: 4,
        n_head: 4,
        block_size: 16 * 16,
        ..ModelArgs::default()
    }
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    args.backend.check()?;
    args.sampling.check()?;
    println!("narx demo: a NAR c2i model with RANDOM weights. It generates noise, not pictures —");
    println!("the point is to show the pipeline (export → ONNX → wavefront generation) working.");
    let temp;
    let dir = match &args.output {
        Some(dir) => dir.clone(),
        None => {
            temp =
                tempfile::tempdir().map_err(|e| BadInput(format!("temporary directory: {e}")))?;
            temp.path().join("nar-demo")
        }
    };
    let model = ModelConfig::from(demo_model());
    let weights = random_weights(&model.parameters(), 0);
    let tokenizer = demo_tokenizer();
    let tokenizer_weights = random_weights(&tokenizer.parameters(), 1);
    let started = Instant::now();
    let manifest = export(&ExportRequest {
        source: &weights,
        config: model,
        grid: None,
        dtype: DType::F32,
        layout: CacheLayout::Append,
        output: dir.clone(),
        force: args.force,
        vq: Some(VqRequest {
            source: &tokenizer_weights,
            config: tokenizer,
        }),
        larp: None,
    })?;
    println!(
        "exported {} parameters to {} in {:.1} s",
        manifest.parameters,
        dir.display(),
        started.elapsed().as_secs_f64()
    );
    let mut generator = args.backend.open(&dir, Purpose::Generate, None)?;
    let options = args.sampling.options(&manifest)?;
    let started = Instant::now();
    let generation = generate_with_progress(
        &mut generator,
        &Prompts::Classes(vec![args.class]),
        &options,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let (n, cells) = (manifest.grid[0], generation.tokens[0].len());
    println!(
        "generated {n}×{n} = {cells} tokens in {} model calls (not {cells}: one call per \
         anti-diagonal) in {seconds:.2} s on {}",
        generation.calls,
        generator.engine_name()
    );
    let Decoded::Pictures(images) = generator.decode(&generation.tokens, &generation.grid)? else {
        anyhow::bail!("the demo model's decoder made no pictures");
    };
    write_png(&args.picture, &images[0])?;
    write_trace(&args.trace, &images[0], &generator)?;
    println!(
        "wrote {} (random weights: noise) and {} (the {} calls filling the grid along \
         anti-diagonals)",
        args.picture.display(),
        args.trace.display(),
        generation.calls
    );
    println!();
    println!("With a real checkpoint (upstream ThisisBillhe/NAR):");
    println!("  narx export --checkpoint nar_b.pt --preset nar-b --vq-checkpoint vq_ds16_c2i.pt -o models/nar-b");
    println!("  narx run models/nar-b --class 207 -o out.png --trace out.gif");
    Ok(())
}
