//! `narx export`: checkpoint → model directory.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, ValueEnum};

use narx_export::checkpoint::{open_checkpoint, TensorSource};
use narx_export::model_dir::{export, ExportRequest, LarpRequest, VqRequest};
use narx_export::presets::{preset, preset_names};
use narx_export::random::random_weights;
use narx_graphs::larp::LarpConfig;
use narx_graphs::manifest::CacheLayout;
use narx_graphs::nar::ModelConfig;
use narx_graphs::vq::VqConfig;
use narx_graphs::DType;

use super::BadInput;

#[derive(Args)]
pub struct ExportArgs {
    /// Checkpoint: safetensors, or a PyTorch `.pt`/`.pth` (read without running any code).
    #[arg(long, required_unless_present = "random_weights")]
    checkpoint: Option<PathBuf>,
    /// Seeded random weights instead of a checkpoint, to measure or try a shape (the model
    /// generates noise).
    #[arg(long, conflicts_with = "checkpoint")]
    random_weights: bool,
    /// Model shape: nar-b, nar-m, nar-l, nar-xl, nar-xxl (c2i), nar-xl-t2i, a LlamaGen c2i
    /// model llamagen-{b,l,xl,xxl,3b}, or a video model nar-video-{s,b,l,lp,xl,xxl,xxxl}.
    #[arg(long, conflicts_with = "config", required_unless_present = "config")]
    preset: Option<String>,
    /// JSON object with upstream `ModelArgs` fields, instead of a preset (a video model's
    /// has `latent_shape`; a LlamaGen model's has `"medusa_attention_num": 0`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Latent grid side n (image n·16 px); default from the config's block_size. Video grids
    /// are the config's latent_shape.
    #[arg(long)]
    grid: Option<usize>,
    /// Precision of weights and matmuls.
    #[arg(long, value_enum, default_value = "fp32")]
    dtype: Precision,
    /// Shapes for TensorRT: every dimension fixed but the batch (the wavefront padded to the
    /// widest, the KV cache at full capacity, masks doing the rest), so one engine serves
    /// the whole generation.
    #[arg(long = "static")]
    static_shapes: bool,
    /// The image tokenizer (VQ) checkpoint, so `narx run -o` can write pictures; its encoder
    /// is ignored.
    #[arg(long)]
    vq_checkpoint: Option<PathBuf>,
    /// Tokenizer shape: vq-16 (default).
    #[arg(long, requires = "vq_checkpoint", conflicts_with = "vq_config")]
    vq_preset: Option<String>,
    /// JSON object with the tokenizer's fields (codebook_size, codebook_embed_dim, z_channels,
    /// decoder_ch_mult, ch), instead of a preset.
    #[arg(long, requires = "vq_checkpoint")]
    vq_config: Option<PathBuf>,
    /// The video tokenizer (LARP) checkpoint, so `narx run -o clip.gif` can write clips; its
    /// encoder and prior model are ignored.
    #[arg(long, requires = "larp_config", conflicts_with = "vq_checkpoint")]
    larp_checkpoint: Option<PathBuf>,
    /// JSON object with the LARP tokenizer's constructor arguments (as its training config's
    /// `model.args`).
    #[arg(long, requires = "larp_checkpoint")]
    larp_config: Option<PathBuf>,
    /// Replace the output directory if it is a model directory already.
    #[arg(long)]
    force: bool,
    /// Model directory to write.
    #[arg(short, long)]
    output: PathBuf,
    /// Print the manifest as JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Precision {
    Fp32,
    Fp16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::Fp32 => DType::F32,
            Precision::Fp16 => DType::F16,
        }
    }
}

/// `--preset` or `--config` → upstream `ModelArgs` of either family.
pub fn model_config(
    preset_name: Option<&str>,
    config: Option<&PathBuf>,
) -> anyhow::Result<ModelConfig> {
    if let Some(name) = preset_name {
        return preset(name).ok_or_else(|| {
            BadInput(format!(
                "unknown preset {name:?}; known presets: {}",
                preset_names().join(", ")
            ))
            .into()
        });
    }
    let path = config.ok_or_else(|| BadInput("pass --preset NAME or --config FILE".into()))?;
    read_config("config", path)
}

/// Reads a JSON config file; `what` names it in errors.
fn read_config<T: serde::de::DeserializeOwned>(what: &str, path: &Path) -> anyhow::Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BadInput(format!("cannot read {what} {}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| BadInput(format!("{what} {}: {e}", path.display())).into())
}

/// `--vq-preset` or `--vq-config` → the tokenizer's configuration (VQ-16 when neither).
fn vq_config(preset: Option<&str>, config: Option<&PathBuf>) -> anyhow::Result<VqConfig> {
    if let Some(path) = config {
        return read_config("VQ config", path);
    }
    match preset.unwrap_or("vq-16") {
        "vq-16" => Ok(VqConfig::vq16()),
        other => Err(BadInput(format!("unknown VQ preset {other:?}; known presets: vq-16")).into()),
    }
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let model = model_config(args.preset.as_deref(), args.config.as_ref())?;
    let vq_config = vq_config(args.vq_preset.as_deref(), args.vq_config.as_ref())?;
    let larp_config: Option<LarpConfig> = args
        .larp_config
        .as_deref()
        .map(|path| read_config("LARP config", path))
        .transpose()?;
    if args.grid == Some(0) {
        return Err(BadInput("--grid must be at least 1".into()).into());
    }
    let started = Instant::now();
    let source: Box<dyn TensorSource> = match &args.checkpoint {
        Some(path) => open_checkpoint(path)?,
        None => Box::new(random_weights(&model.parameters(), 0)),
    };
    let origin = args
        .checkpoint
        .as_ref()
        .map_or("random weights".into(), |p| p.display().to_string());
    let vq_source = args
        .vq_checkpoint
        .as_deref()
        .map(open_checkpoint)
        .transpose()?;
    let larp_source = args
        .larp_checkpoint
        .as_deref()
        .map(open_checkpoint)
        .transpose()?;
    let manifest = export(&ExportRequest {
        source: source.as_ref(),
        config: model,
        grid: args.grid,
        dtype: args.dtype.dtype(),
        layout: if args.static_shapes {
            CacheLayout::Static
        } else {
            CacheLayout::Append
        },
        output: args.output.clone(),
        force: args.force,
        vq: vq_source.as_ref().map(|source| VqRequest {
            source: source.as_ref(),
            config: vq_config,
        }),
        larp: larp_source
            .as_ref()
            .zip(larp_config)
            .map(|(source, config)| LarpRequest {
                source: source.as_ref(),
                config,
            }),
    })
    .with_context(|| format!("exporting {origin}"))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
    } else {
        println!(
            "exported {} ({} parameters, grid {}, {:?}) to {} in {:.1} s",
            manifest.family,
            manifest.parameters,
            grid_text(&manifest.grid),
            manifest.dtype,
            args.output.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// `[4, 16, 16]` → `4×16×16`.
pub fn grid_text(grid: &[usize]) -> String {
    grid.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join("×")
}
