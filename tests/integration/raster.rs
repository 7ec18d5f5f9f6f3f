//! Raster order (LlamaGen's: one token per call, causal attention) on NAR's backbone, checked
//! against an independent forward pass written out below, and LlamaGen checkpoints (the
//! backbone without NAR's extra block and down head) generating the same tokens.

use std::path::Path;

use narx_export::checkpoint::{open_checkpoint, InMemory, TensorSource};
use narx_export::model_dir::{export, ExportRequest};
use narx_graphs::manifest::CacheLayout;
use narx_graphs::nar::ModelArgs;
use narx_graphs::DType;
use narx_runtime::backend::Engine;
use narx_runtime::generate::{GenerateOptions, Generator, Prompts};
use narx_runtime::sampling::SamplingParams;
use narx_runtime::scheduler::Order;

use crate::common::{
    export_fixture, fixture, graph_paths, max_abs_diff, model_config, narx, ort_engine, stderr,
    stdout, tract_engine,
};

const FIXTURE: &str = "nar-c2i-tiny";

fn fixture_args() -> ModelArgs {
    match model_config(FIXTURE) {
        narx_graphs::nar::ModelConfig::Image(args) => args,
        other => panic!("{FIXTURE} is an image model, got {other:?}"),
    }
}

/// NAR's c2i model, causal, over a whole sequence, in plain loops: the right head's logits
/// after `tokens` (raster order) for `label`. Follows NAR-SPEC §1 (zero rotary rows for the
/// condition, interleaved pairs, row angles in the first half) with a lower-triangular mask.
struct Reference {
    args: ModelArgs,
    weights: Box<dyn TensorSource>,
}

impl Reference {
    fn w(&self, name: &str) -> Vec<f32> {
        self.weights.read_f32(name).unwrap()
    }

    fn rms_norm(&self, x: &[f32], weight: &str) -> Vec<f32> {
        let w = self.w(weight);
        let mean = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        let inv = 1.0 / (mean + self.args.norm_eps as f32).sqrt();
        x.iter().zip(&w).map(|(v, w)| v * inv * w).collect()
    }

    /// `y = W x` for a `(out, in)` weight.
    fn linear(&self, x: &[f32], weight: &str) -> Vec<f32> {
        let w = self.w(weight);
        w.chunks_exact(x.len())
            .map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }

    fn rotate(&self, x: &mut [f32], position: usize, grid: usize) {
        let d = x.len();
        let (half, quarter) = (d / 2, d / 4);
        for j in 0..half {
            let (cos, sin) = if position == 0 {
                (0.0, 0.0)
            } else {
                let (r, c) = ((position - 1) / grid, (position - 1) % grid);
                let (coord, k) = if j < quarter {
                    (r, j)
                } else {
                    (c, j - quarter)
                };
                let theta = 1.0 / (self.args.rope_base as f32).powf((2 * k) as f32 / half as f32);
                let angle = coord as f32 * theta;
                (angle.cos(), angle.sin())
            };
            let (x0, x1) = (x[2 * j], x[2 * j + 1]);
            x[2 * j] = x0 * cos - x1 * sin;
            x[2 * j + 1] = x1 * cos + x0 * sin;
        }
    }

    fn right_logits(&self, label: i64, tokens: &[u32], grid: usize) -> Vec<f32> {
        let (d, heads) = (self.args.dim, self.args.n_head);
        let hd = d / heads;
        let row = |table: &[f32], i: usize| table[i * d..(i + 1) * d].to_vec();
        let classes = self.w("cls_embedding.embedding_table.weight");
        let embeddings = self.w("tok_embeddings.weight");
        let mut x: Vec<Vec<f32>> = std::iter::once(row(&classes, label as usize))
            .chain(tokens.iter().map(|&t| row(&embeddings, t as usize)))
            .collect();
        let len = x.len();
        for layer in 0..self.args.n_layer {
            let p = |s: &str| format!("layers.{layer}.{s}");
            let qkv: Vec<Vec<f32>> = x
                .iter()
                .map(|h| {
                    let normed = self.rms_norm(h, &p("attention_norm.weight"));
                    self.linear(&normed, &p("attention.wqkv.weight"))
                })
                .collect();
            let part = |i: usize, which: usize, head: usize| -> Vec<f32> {
                let start = which * d + head * hd;
                let mut v = qkv[i][start..start + hd].to_vec();
                if which < 2 {
                    self.rotate(&mut v, i, grid);
                }
                v
            };
            for (i, h) in x.iter_mut().enumerate() {
                let mut attended = vec![0f32; d];
                for head in 0..heads {
                    let q = part(i, 0, head);
                    let scores: Vec<f32> = (0..=i)
                        .map(|j| {
                            let k = part(j, 1, head);
                            q.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>() / (hd as f32).sqrt()
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                    let exp: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f32 = exp.iter().sum();
                    for (j, e) in exp.iter().enumerate() {
                        let v = part(j, 2, head);
                        for (a, b) in attended[head * hd..(head + 1) * hd].iter_mut().zip(&v) {
                            *a += e / total * b;
                        }
                    }
                }
                let out = self.linear(&attended, &p("attention.wo.weight"));
                // Every position's Q, K and V were computed above, so the residual can be
                // added in place.
                h.iter_mut().zip(&out).for_each(|(h, o)| *h += o);
            }
            for h in x.iter_mut() {
                let normed = self.rms_norm(h, &p("ffn_norm.weight"));
                let gate = self.linear(&normed, &p("feed_forward.w1.weight"));
                let up = self.linear(&normed, &p("feed_forward.w3.weight"));
                let hidden: Vec<f32> = gate
                    .iter()
                    .zip(&up)
                    .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                    .collect();
                let down = self.linear(&hidden, &p("feed_forward.w2.weight"));
                h.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
            }
        }
        let last = self.rms_norm(&x[len - 1], "norm.weight");
        self.linear(&last, "output.weight")
    }
}

fn greedy() -> GenerateOptions {
    GenerateOptions {
        cfg_scale: 1.0,
        cfg_interval: -1,
        sampling: SamplingParams {
            greedy: true,
            ..SamplingParams::default()
        },
        seed: 0,
        unguided_logits: false,
    }
}

/// Generates in raster order; returns every call's logits (cond row of each prompt) and
/// the final tokens.
fn raster_run<E: Engine>(
    generator: &mut Generator<E>,
    labels: &[i64],
) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let mut logits = Vec::new();
    let generation = generator
        .generate(&Prompts::Classes(labels.to_vec()), &greedy(), &mut |r| {
            logits.push(r.logits.to_vec())
        })
        .unwrap();
    (logits, generation.tokens)
}

#[test]
fn raster_order_matches_a_causal_forward_pass_on_both_backends() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("nar");
    export_fixture(FIXTURE, "model.safetensors", &dir, DType::F32);
    let reference = Reference {
        args: fixture_args(),
        weights: open_checkpoint(&fixture(FIXTURE).join("model.safetensors")).unwrap(),
    };
    let (grid, vocab) = (8, 256);
    let labels = [3, 7];
    let manifest = || narx_graphs::manifest::Manifest::load(&dir).unwrap();
    let tract = Generator::with_order(manifest(), tract_engine(&dir), Order::Raster).unwrap();
    let ort = Generator::with_order(manifest(), ort_engine(&dir), Order::Raster).unwrap();
    assert_eq!(tract.plan().calls().len(), grid * grid);
    let runs = [
        ("tract", raster_run(&mut { tract }, &labels)),
        ("onnxruntime", raster_run(&mut { ort }, &labels)),
    ];
    for (backend, (logits, tokens)) in &runs {
        // Calls 0 (the condition alone), 1, a row end, the next row's start, the last.
        for k in [0, 1, 7, 8, grid * grid - 1] {
            for (b, &label) in labels.iter().enumerate() {
                let expected = reference.right_logits(label, &tokens[b][..k], grid);
                let got = &logits[k][b * vocab..(b + 1) * vocab];
                let worst = max_abs_diff(got, &expected);
                assert!(
                    worst < 1e-3,
                    "{backend}: call {k}, prompt {b}: logits differ by {worst}"
                );
            }
        }
    }
    assert_eq!(runs[0].1 .1, runs[1].1 .1, "tract and ONNX Runtime tokens");
}

/// The c2i fixture without its extra block and down head is a LlamaGen checkpoint.
fn llamagen_weights() -> (ModelArgs, InMemory) {
    let nar = open_checkpoint(&fixture(FIXTURE).join("model.safetensors")).unwrap();
    let args = ModelArgs {
        medusa_attention_num: 0,
        ..fixture_args()
    };
    let mut weights = InMemory::new();
    for (name, shape) in narx_graphs::nar::ModelConfig::from(args.clone()).parameters() {
        weights.insert(name.clone(), shape, nar.read_f32(&name).unwrap());
    }
    (args, weights)
}

fn export_llamagen(dir: &Path) {
    let (args, weights) = llamagen_weights();
    export(&ExportRequest {
        source: &weights,
        config: args.into(),
        grid: None,
        dtype: DType::F32,
        layout: CacheLayout::Append,
        output: dir.to_path_buf(),
        force: false,
        vq: None,
        larp: None,
    })
    .unwrap();
}

#[test]
fn llamagen_checkpoints_generate_in_raster_order() {
    let temp = tempfile::tempdir().unwrap();
    let nar_dir = temp.path().join("nar");
    let llamagen_dir = temp.path().join("llamagen");
    export_fixture(FIXTURE, "model.safetensors", &nar_dir, DType::F32);
    export_llamagen(&llamagen_dir);
    let manifest = narx_graphs::manifest::Manifest::load(&llamagen_dir).unwrap();
    assert_eq!(manifest.family.to_string(), "llamagen-c2i");
    assert_eq!(manifest.heads.len(), 1);
    assert_eq!(manifest.kv_cache.layers, 2);
    let cells: usize = manifest.grid.iter().product();
    // ONNX Runtime runs the prefill through the step graph: one session.
    assert_eq!(graph_paths(&llamagen_dir, false).as_paths().len(), 2);
    assert_eq!(graph_paths(&llamagen_dir, true).as_paths().len(), 1);

    // Its own order is raster; NAR order is refused with a reason.
    let labels = [0, 4];
    let mut llamagen = Generator::new(manifest.clone(), tract_engine(&llamagen_dir)).unwrap();
    assert_eq!(llamagen.order(), Order::Raster);
    let err = Generator::with_order(manifest, ort_engine(&llamagen_dir), Order::Nar)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("raster order only"), "{err}");
    // `narx inspect` counts the calls of the model's own order: one per cell.
    let output = narx(&["inspect", llamagen_dir.to_str().unwrap()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let expected = format!("→ {cells} model calls");
    assert!(stdout(&output).contains(&expected), "{}", stdout(&output));

    // The right head reads the trunk only, so the NAR model in raster order and the LlamaGen
    // model give the same logits and tokens.
    let nar_manifest = narx_graphs::manifest::Manifest::load(&nar_dir).unwrap();
    let mut nar =
        Generator::with_order(nar_manifest, tract_engine(&nar_dir), Order::Raster).unwrap();
    let (a_logits, a_tokens) = raster_run(&mut llamagen, &labels);
    let (b_logits, b_tokens) = raster_run(&mut nar, &labels);
    assert_eq!(a_tokens, b_tokens);
    for (k, (a, b)) in a_logits.iter().zip(&b_logits).enumerate() {
        let worst = max_abs_diff(a, b);
        assert!(worst < 1e-4, "call {k}: {worst}");
    }
}
