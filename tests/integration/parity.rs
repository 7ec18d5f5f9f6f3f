//! Conformance against the upstream fixtures: every call's assembled and guided logits within
//! 1e-3, and every token exact under greedy decoding, on tract and on ONNX Runtime CPU, in
//! both cache layouts.

use narx_graphs::manifest::CacheLayout;
use narx_graphs::{DType, Dim};
use narx_runtime::backend::Engine;
use narx_runtime::generate::{GenerateOptions, Generator, Prompts};
use narx_runtime::sampling::SamplingParams;

use crate::common::{
    export_fixture, export_fixture_as, ort_generator, ort_generator_on_fixed_buffers,
    reference_json, tract_generator, Reference,
};

const TOLERANCE: f32 = 1e-3;

pub fn prompts(name: &str, reference: &Reference) -> Prompts {
    if reference_json(name)["kind"] == "t2i" {
        let (shape, embeddings) = reference.f32("caption_embeddings");
        let (_, mask) = reference.f32("caption_mask");
        Prompts::Captions {
            embeddings,
            mask,
            count: shape[0],
        }
    } else {
        Prompts::Classes(reference.i64("labels").1)
    }
}

/// The first place two logit blocks `(rows, cells, vocab)` differ by more than the tolerance.
fn first_difference(got: &[f32], expected: &[f32], cells: usize, vocab: usize) -> Option<String> {
    got.iter()
        .zip(expected)
        .position(|(g, e)| (g - e).abs() > TOLERANCE || g.is_nan())
        .map(|i| {
            let (row, rest) = (i / (cells * vocab), i % (cells * vocab));
            format!(
                "row {row}, output cell {}, token {}: got {}, expected {}",
                rest / vocab,
                rest % vocab,
                got[i],
                expected[i]
            )
        })
}

/// What the heads project in a replay.
#[derive(Clone, Copy)]
enum Heads {
    /// Both guidance halves: the unguided logits are checked as well as the guided ones.
    BothHalves,
    /// Each prompt's guided mix (the default): only guided logits come back.
    GuidedMix,
}

/// Replays a fixture's generation and checks every call; panics naming the call and cell.
fn replay<E: Engine>(generator: &mut Generator<E>, name: &str, heads: Heads) {
    let reference = Reference::load(name);
    let json = reference_json(name);
    let options = GenerateOptions {
        cfg_scale: json["cfg_scale"].as_f64().unwrap() as f32,
        cfg_interval: json["cfg_interval"].as_i64().unwrap(),
        sampling: SamplingParams {
            greedy: true,
            ..SamplingParams::default()
        },
        seed: 0,
        unguided_logits: matches!(heads, Heads::BothHalves),
    };
    let condition_len = generator.manifest().config.condition_len();
    let vocab = generator.manifest().vocab_size;
    let backend = generator.engine_name();
    let mut problems = Vec::new();
    let mut calls = 0;
    let generation = generator
        .generate(&prompts(name, &reference), &options, &mut |report| {
            let k = report.call.index();
            calls += 1;
            let (_, positions) = reference.i64(&format!("step.{k}.input_pos"));
            let fed: Vec<i64> = if report.call.is_prefill() {
                (0..condition_len as i64).collect()
            } else {
                report
                    .call
                    .fed()
                    .iter()
                    .map(|c| (condition_len + c.raster()) as i64)
                    .collect()
            };
            if fed != positions {
                problems.push(format!(
                    "call {k}: fed positions {fed:?}, upstream {positions:?}"
                ));
            }
            let cells = report.call.output_len();
            let mut checked = vec![("guided_logits", report.guided)];
            match heads {
                Heads::BothHalves => checked.push(("logits", report.logits)),
                Heads::GuidedMix if !report.logits.is_empty() => {
                    problems.push(format!("call {k}: the heads projected both halves"))
                }
                Heads::GuidedMix => {}
            }
            for (what, got) in checked {
                let (shape, expected) = reference.f32(&format!("step.{k}.{what}"));
                if shape[1] != cells || got.len() != expected.len() {
                    problems.push(format!("call {k}: {what} shape {shape:?} vs {cells} cells"));
                } else if let Some(diff) = first_difference(got, &expected, cells, vocab) {
                    problems.push(format!("call {k}: {what} differ at {diff}"));
                }
            }
            let (_, expected) = reference.i64(&format!("step.{k}.next_tokens"));
            let got: Vec<i64> = report.tokens.iter().map(|&t| i64::from(t)).collect();
            if got != expected {
                problems.push(format!("call {k}: tokens {got:?}, upstream {expected:?}"));
            }
        })
        .unwrap();
    assert!(
        problems.is_empty(),
        "{name} on {backend}:\n{}",
        problems.join("\n")
    );
    assert_eq!(calls, json["steps"].as_u64().unwrap() as usize);
    let (shape, tokens) = reference.i64("tokens");
    let got: Vec<i64> = generation
        .tokens
        .iter()
        .flatten()
        .map(|&t| i64::from(t))
        .collect();
    assert_eq!(got, tokens, "{name} on {backend}: final tokens {shape:?}");
}

fn parity(name: &str) {
    let temp = tempfile::tempdir().unwrap();
    let from_safetensors = temp.path().join("st");
    let from_pt = temp.path().join("pt");
    export_fixture(name, "model.safetensors", &from_safetensors, DType::F32);
    export_fixture(name, "model.pt", &from_pt, DType::F32);
    // Both checkpoint formats give the same model, byte for byte.
    for file in ["weights.bin", "prefill.onnx", "step.onnx"] {
        let a = std::fs::read(from_safetensors.join(file)).unwrap();
        let b = std::fs::read(from_pt.join(file)).unwrap();
        assert!(
            a == b,
            "{name}: {file} differs between the .pt and safetensors exports"
        );
    }
    replay(
        &mut tract_generator(&from_safetensors),
        name,
        Heads::GuidedMix,
    );
    replay(&mut tract_generator(&from_pt), name, Heads::BothHalves);
    replay(
        &mut ort_generator(&from_safetensors),
        name,
        Heads::GuidedMix,
    );
    replay(&mut ort_generator(&from_pt), name, Heads::BothHalves);

    // The static layout (`--static`): every dimension but the batch fixed.
    let fixed = temp.path().join("static");
    let manifest = export_fixture_as(
        name,
        "model.safetensors",
        &fixed,
        DType::F32,
        CacheLayout::Static,
    );
    assert_eq!(manifest.kv_cache.layout, CacheLayout::Static);
    for graph in [&manifest.graphs.prefill, &manifest.graphs.step] {
        for tensor in graph.inputs.iter().chain(&graph.outputs) {
            let dynamic: Vec<&Dim> = tensor
                .shape
                .iter()
                .filter(|d| !matches!(d, Dim::Fixed(_)))
                .collect();
            assert!(
                dynamic
                    .iter()
                    .all(|d| [Dim::named("batch"), Dim::named("head_rows")].contains(d)),
                "{name}: {} has dynamic dims {dynamic:?}",
                tensor.name
            );
        }
    }
    replay(&mut tract_generator(&fixed), name, Heads::GuidedMix);
    replay(&mut ort_generator(&fixed), name, Heads::BothHalves);

    // The step on buffers that stay put, as CUDA graphs replay it: the same numbers, and
    // nothing copied into the buffers but each call's host inputs and, once, the prefill's
    // cache (the cache then alternates between two sets without a copy).
    let mut generator = ort_generator_on_fixed_buffers(&fixed);
    replay(&mut generator, name, Heads::GuidedMix);
    let prompts = Reference::load(name).i64("tokens").0[0];
    let rows = 2 * prompts;
    let steps = reference_json(name)["steps"].as_u64().unwrap() as usize - 1;
    let width = manifest.graphs.step.inputs[0].shape[1].clone();
    assert_eq!(manifest.graphs.step.inputs[0].name, "tokens");
    let Dim::Fixed(width) = width else {
        panic!("{name}: static tokens width {width:?}")
    };
    let kv = &manifest.kv_cache;
    let slots = kv.capacity;
    let cache = rows * kv.layers * 2 * kv.kv_heads * slots * kv.head_dim * 4;
    // tokens and positions (int64), key_bias, cache_write and head_mix (float32)
    let per_step =
        rows * width * 8 + width * 8 + rows * slots * 4 + slots * width * 4 + prompts * rows * 4;
    assert_eq!(
        generator.engine().staged_bytes(),
        Some((cache + steps * per_step) as u64),
        "{name}: bytes copied into the fixed buffers"
    );
}

/// Turns an export into what narx wrote before the heads took `head_mix`: the mix MatMuls
/// bypassed, the input gone from both graphs and from the manifest.
fn without_head_mix(dir: &std::path::Path) {
    use narx_graphs::nar::names::HEAD_MIX;
    for file in ["prefill.onnx", "step.onnx"] {
        let path = dir.join(file);
        let mut model = narx_graphs::decode_model(&std::fs::read(&path).unwrap()).unwrap();
        let graph = model.graph.as_mut().unwrap();
        let mixes: Vec<(String, String)> = graph
            .node
            .iter()
            .filter(|n| n.input.first().map(String::as_str) == Some(HEAD_MIX))
            .map(|n| (n.output[0].clone(), n.input[1].clone()))
            .collect();
        assert!(!mixes.is_empty(), "{file}: no head mix");
        graph
            .node
            .retain(|n| n.input.first().map(String::as_str) != Some(HEAD_MIX));
        for node in &mut graph.node {
            for input in &mut node.input {
                if let Some((_, rows)) = mixes.iter().find(|(mixed, _)| mixed == input) {
                    *input = rows.clone();
                }
            }
        }
        graph.input.retain(|i| i.name.as_deref() != Some(HEAD_MIX));
        std::fs::write(&path, narx_graphs::encode_model(&model)).unwrap();
    }
    let path = dir.join("narx.json");
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for graph in ["prefill", "step"] {
        let inputs = manifest["graphs"][graph]["inputs"].as_array_mut().unwrap();
        inputs.retain(|i| i["name"] != HEAD_MIX);
        manifest["tensorrt_profiles"][graph]
            .as_object_mut()
            .unwrap()
            .remove(HEAD_MIX);
    }
    let text = manifest.to_string().replace("\"head_rows\"", "\"batch\"");
    std::fs::write(&path, text).unwrap();
}

/// Directories exported before the heads took `head_mix` still run, projecting every row.
#[test]
fn exports_without_the_head_mix_still_match_upstream() {
    let name = "nar-c2i-tiny";
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("older");
    export_fixture(name, "model.safetensors", &dir, DType::F32);
    without_head_mix(&dir);
    replay(&mut tract_generator(&dir), name, Heads::BothHalves);
    replay(&mut ort_generator(&dir), name, Heads::BothHalves);
}

#[test]
fn c2i_fixture_matches_upstream_on_tract_and_onnxruntime() {
    parity("nar-c2i-tiny");
}

#[test]
fn t2i_fixture_matches_upstream_on_tract_and_onnxruntime() {
    parity("nar-t2i-tiny");
}

/// Three heads over a (T, H, W) grid, a learned position table, and upstream's video
/// checkpoint loaded from both formats.
#[test]
fn video_fixture_matches_upstream_on_tract_and_onnxruntime() {
    parity("nar-video-tiny");
}
