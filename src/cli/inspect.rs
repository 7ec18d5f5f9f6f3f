//! `narx inspect`: what a model directory holds.

use std::path::PathBuf;

use clap::Args;

use narx_graphs::manifest::{Condition, GraphFile, Manifest};
use narx_graphs::Dim;
use narx_runtime::generate::natural_order;

#[derive(Args)]
pub struct InspectArgs {
    /// Model directory written by `narx export`.
    model: PathBuf,
    /// Print the manifest as JSON.
    #[arg(long)]
    json: bool,
}

fn shape(dims: &[Dim]) -> String {
    let parts: Vec<String> = dims
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => n.to_string(),
            Dim::Named(s) => s.clone(),
        })
        .collect();
    format!("({})", parts.join(", "))
}

fn graph(role: &str, g: &GraphFile) {
    println!("{role} graph: {} ({})", g.file, human_bytes(g.bytes));
    for t in &g.inputs {
        println!("  in   {:<22} {:?} {}", t.name, t.dtype, shape(&t.shape));
    }
    for t in &g.outputs {
        println!("  out  {:<22} {:?} {}", t.name, t.dtype, shape(&t.shape));
    }
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    let m = Manifest::load(&args.model)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&m)?);
        return Ok(());
    }
    let c = m.config.transformer();
    let steps = natural_order(&m).calls(&m.grid);
    println!("{}: {}", args.model.display(), m.family);
    println!(
        "  {} parameters: {} blocks (+{} extra), {} attention heads ({} kv), dim {}, vocab {}",
        m.parameters,
        c.n_layer,
        m.config.blocks() - c.n_layer,
        c.n_head,
        m.kv_cache.kv_heads,
        c.dim,
        m.vocab_size
    );
    let grid: Vec<String> = m.grid.iter().map(usize::to_string).collect();
    println!(
        "  grid {} → {} model calls; weights {:?} in {} ({})",
        grid.join("×"),
        steps,
        m.dtype,
        m.weights.file,
        human_bytes(m.weights.bytes)
    );
    match &m.condition {
        Condition::Class {
            num_classes,
            null_class,
            class_token_offset,
        } => {
            let null = null_class.map_or("none".to_string(), |c| c.to_string());
            println!(
                "  condition: class 0..{} (null class {null})",
                num_classes - 1
            );
            if let Some(offset) = class_token_offset {
                println!(
                    "  the step graph embeds class c as token {offset}+c: it can run the prefill"
                );
            }
        }
        Condition::Caption { tokens, dim } => {
            println!("  condition: caption features ({tokens}, {dim}) with mask")
        }
    }
    let heads: Vec<String> = m
        .heads
        .iter()
        .map(|h| format!("{} (axis {}, {})", h.name, h.axis, h.output))
        .collect();
    println!("  heads: {}", heads.join(", "));
    let s = &m.sampling;
    println!(
        "  sampling defaults: cfg {} (interval {}), temperature {}, top-k {}, top-p {}",
        s.cfg_scale, s.cfg_interval, s.temperature, s.top_k, s.top_p
    );
    println!(
        "  KV cache: {} layout, {} layers, capacity {} positions",
        m.kv_cache.layout, m.kv_cache.layers, m.kv_cache.capacity
    );
    graph("prefill", &m.graphs.prefill);
    graph("step", &m.graphs.step);
    if let Some(select) = &m.graphs.select {
        graph("selection (top-k on the device)", select);
    }
    if let Some(vq) = &m.vq_decoder {
        let side = |n: usize| n * vq.patch;
        println!(
            "  VQ decoder: codebook {}, {}×{} tokens → {}×{} pixels",
            vq.config.codebook_size,
            m.grid[0],
            m.grid[m.grid.len() - 1],
            side(m.grid[0]),
            side(m.grid[m.grid.len() - 1])
        );
        graph("decoder", &vq.graph);
    }
    if let Some(larp) = &m.larp_decoder {
        let (channels, frames, height, width) = larp.config.video_shape();
        println!(
            "  LARP video decoder: codebook {}, {} tokens → {frames} frames of {width}×{height} \
             ({channels} channels), {} ViT blocks of width {}",
            larp.config.codebook_size(),
            larp.config.latent_tokens(),
            larp.config.decoder_depth,
            larp.config.decoder_hidden_size
        );
        graph("decoder", &larp.graph);
    }
    let trt = &m.tensorrt;
    let cache = |folder: &Option<String>| folder.clone().unwrap_or_else(|| "off".into());
    println!(
        "  TensorRT: fp16 {}, bf16 {}, optimisation level {}, engine cache {}, timing cache {}",
        trt.fp16,
        trt.bf16,
        trt.builder_optimization_level,
        cache(&trt.engine_cache),
        cache(&trt.timing_cache)
    );
    println!(
        "  CUDA graphs on the cuda provider: {}",
        if m.cuda_graph {
            "on (the step's shapes are static)"
        } else {
            "off"
        }
    );
    if let Some(q) = &m.quantization {
        println!("  quantised: {q}");
    }
    if let Some(c) = &m.calibration {
        println!(
            "  calibrated ({}, {} generations): {} tensor ranges in {}, {} (TensorRT {}), {}; \
             QDQ model in {}/, quality in {}",
            c.method,
            c.generations,
            c.tensors,
            c.ranges,
            c.trt_cache,
            c.trt_version,
            c.ort_table,
            c.qdq_model,
            c.quality
        );
    }
    Ok(())
}
