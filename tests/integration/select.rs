//! The selection graph (assembly, guidance and top-k where the logits are) against the
//! host's own: on the fixtures, every call's candidates are the host's largest guided logits
//! (top-k's and a margin for ties) with the same values, and the tokens are the same, greedy
//! (upstream's) and sampled.

use narx_graphs::manifest::{CacheLayout, Manifest};
use narx_graphs::DType;
use narx_runtime::backend::ort::{OrtEngine, OrtOptions};
use narx_runtime::backend::tract::TractEngine;
use narx_runtime::backend::Engine;
use narx_runtime::generate::{GenerateOptions, Generator};
use narx_runtime::load::GraphChoice;
use narx_runtime::sampling::SamplingParams;

use crate::common::{
    chosen_graphs, export_fixture_as, greedy_unguided_logits, ort_generator, ort_library,
    reference_json, tract_generator, Reference,
};
use crate::parity::prompts;

/// Per call, the guided logits; and the tokens.
fn run<E: Engine>(
    generator: &mut Generator<E>,
    name: &str,
    options: &GenerateOptions,
) -> (Vec<Vec<f32>>, Vec<Vec<u32>>) {
    let reference = Reference::load(name);
    let mut guided = Vec::new();
    let generation = generator
        .generate(&prompts(name, &reference), options, &mut |r| {
            guided.push(r.guided.to_vec())
        })
        .unwrap();
    (guided, generation.tokens)
}

/// `selecting` against `host`, the same backend without the selection graph.
fn check<E: Engine>(mut selecting: Generator<E>, mut host: Generator<E>, name: &str) {
    let json = reference_json(name);
    let vocab = selecting.manifest().vocab_size;
    for (greedy, top_k) in [(true, 7), (false, 20)] {
        let options = GenerateOptions {
            cfg_scale: json["cfg_scale"].as_f64().unwrap() as f32,
            cfg_interval: json["cfg_interval"].as_i64().unwrap(),
            sampling: SamplingParams {
                greedy,
                top_k,
                ..SamplingParams::default()
            },
            seed: 3,
            unguided_logits: false,
        };
        let (want, want_tokens) = run(&mut host, name, &options);
        let (got, got_tokens) = run(&mut selecting, name, &options);
        let what = format!("{name} on {}, top-k {top_k}", selecting.engine_name());
        assert_eq!(got_tokens, want_tokens, "{what}: tokens");
        if greedy {
            let (_, upstream) = Reference::load(name).i64("tokens");
            let tokens: Vec<i64> = got_tokens.iter().flatten().map(|&t| t.into()).collect();
            assert_eq!(tokens, upstream, "{what}: tokens against upstream");
        }
        for (call, (got, want)) in got.iter().zip(&want).enumerate() {
            for (row, (got, want)) in got.chunks(vocab).zip(want.chunks(vocab)).enumerate() {
                let kept: Vec<usize> = (0..vocab).filter(|&i| got[i].is_finite()).collect();
                let mut sorted = want.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                let (threshold, returned) = (sorted[top_k - 1], sorted[kept.len() - 1]);
                // The largest logits came back (top-k's and a margin for its ties), each
                // with the host's value.
                for i in 0..vocab {
                    assert_eq!(
                        got[i].is_finite(),
                        want[i] >= returned,
                        "{what}: call {call} row {row} token {i}: {} (host {}, k-th {threshold})",
                        got[i],
                        want[i]
                    );
                }
                assert!(
                    kept.len() > top_k,
                    "{what}: call {call} row {row}: no margin"
                );
                for &i in &kept {
                    assert!(
                        (got[i] - want[i]).abs() <= 1e-5,
                        "{what}: call {call} row {row} token {i}: {} vs host {}",
                        got[i],
                        want[i]
                    );
                }
            }
        }
    }
}

/// Both backends, and both cache layouts on ONNX Runtime (the static one pads the wavefront,
/// so the selection reads rows of a wider output).
fn selection_matches_the_host(name: &str) {
    let temp = tempfile::tempdir().unwrap();
    let options = OrtOptions {
        library: Some(ort_library()),
        intra_threads: Some(2),
        ..OrtOptions::default()
    };
    for layout in [CacheLayout::Append, CacheLayout::Static] {
        let dir = temp.path().join(layout.to_string());
        export_fixture_as(name, "model.safetensors", &dir, DType::F32, layout);
        let files = chosen_graphs(
            &dir,
            GraphChoice {
                step_runs_prefill: true,
                select: true,
            },
        );
        let manifest = Manifest::load(&dir).unwrap();
        let ort = OrtEngine::load(&files.as_paths(), &options).unwrap();
        let selecting = Generator::new(manifest.clone(), ort).unwrap();
        check(selecting, ort_generator(&dir), name);
        if layout == CacheLayout::Append {
            let tract = TractEngine::load(&files.as_paths(), Some(2)).unwrap();
            let selecting = Generator::new(manifest, tract).unwrap();
            check(selecting, tract_generator(&dir), name);
        }
    }
}

#[test]
fn c2i_selection_on_the_device_matches_the_host() {
    selection_matches_the_host("nar-c2i-tiny");
}

#[test]
fn t2i_selection_on_the_device_matches_the_host() {
    selection_matches_the_host("nar-t2i-tiny");
}

/// Three heads: cells reached by up to three predictions.
#[test]
fn video_selection_on_the_device_matches_the_host() {
    selection_matches_the_host("nar-video-tiny");
}

/// Asked for every row's logits before guidance, a generator with the selection graph
/// brings the heads' logits to the host as one without it does.
#[test]
fn unguided_logits_bypass_the_selection() {
    let name = "nar-c2i-tiny";
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("model");
    export_fixture_as(
        name,
        "model.safetensors",
        &dir,
        DType::F32,
        CacheLayout::Append,
    );
    let files = chosen_graphs(
        &dir,
        GraphChoice {
            step_runs_prefill: true,
            select: true,
        },
    );
    let tract = TractEngine::load(&files.as_paths(), Some(2)).unwrap();
    let mut selecting = Generator::new(Manifest::load(&dir).unwrap(), tract).unwrap();
    let mut host = tract_generator(&dir);
    let options = greedy_unguided_logits(4.0);
    let reference = Reference::load(name);
    let logits = |generator: &mut Generator<TractEngine>| {
        let mut calls = Vec::new();
        generator
            .generate(&prompts(name, &reference), &options, &mut |r| {
                calls.push(r.logits.to_vec())
            })
            .unwrap();
        calls
    };
    let (got, want) = (logits(&mut selecting), logits(&mut host));
    assert!(got.iter().all(|call| !call.is_empty()));
    assert_eq!(got, want);
}
