//! The exported graphs themselves: every wavefront width and batch size on both backends,
//! grouped-query attention, and the float16 export.

use std::collections::HashMap;

use narx_export::checkpoint::{InMemory, TensorSource};
use narx_export::model_dir::{export, ExportRequest};
use narx_export::random::random_weights;
use narx_graphs::manifest::CacheLayout;
use narx_graphs::nar::ModelArgs;
use narx_graphs::DType;
use narx_runtime::backend::{Engine, GraphKind, HostTensor};
use narx_runtime::generate::{GenerateOptions, Generator, Prompts};

use crate::common::{
    every_row, export_fixture, greedy_unguided_logits, max_abs_diff, ort_generator,
    tract_generator, Reference,
};

/// Prefill with `batch` labels, then one step of `width` tokens; returns the step's head
/// logits and the cache length the step produced.
fn prefill_and_step<E: Engine>(
    engine: &mut E,
    layers: usize,
    batch: usize,
    width: usize,
) -> (Vec<f32>, Vec<f32>, Vec<usize>) {
    let labels = (0..batch as i64).map(|i| i % 10).collect();
    let prefill = engine
        .run(
            GraphKind::Prefill,
            vec![
                (
                    "class_labels".into(),
                    engine.upload(HostTensor::I64(vec![batch], labels)).unwrap(),
                ),
                every_row(engine, batch),
            ],
        )
        .unwrap();
    let mut inputs = carry(prefill, layers);
    let tokens: Vec<i64> = (0..(batch * width) as i64)
        .map(|i| (i * 37) % 256)
        .collect();
    let positions: Vec<i64> = (0..width as i64).map(|i| 1 + i * 9).collect();
    inputs.push((
        "tokens".into(),
        engine
            .upload(HostTensor::I64(vec![batch, width], tokens))
            .unwrap(),
    ));
    inputs.push((
        "positions".into(),
        engine
            .upload(HostTensor::I64(vec![width], positions))
            .unwrap(),
    ));
    inputs.push(every_row(engine, batch));
    let mut step = engine.run(GraphKind::Step, inputs).unwrap();
    let (right_shape, right) = engine.download_f32(&step["logits_right"]).unwrap();
    let (down_shape, down) = engine.download_f32(&step["logits_down"]).unwrap();
    assert_eq!(right_shape, [batch, width, 256]);
    assert_eq!(down_shape, [batch, width, 256]);
    let cache = step.remove("present.2.value").unwrap();
    let (cache_shape, _) = engine.download_f32(&cache).unwrap();
    (right, down, cache_shape)
}

fn carry<V>(mut outputs: HashMap<String, V>, layers: usize) -> Vec<(String, V)> {
    let mut inputs = vec![(
        "past_key_bias".to_string(),
        outputs.remove("present_key_bias").unwrap(),
    )];
    for i in 0..layers {
        for kind in ["key", "value"] {
            let value = outputs.remove(&format!("present.{i}.{kind}")).unwrap();
            inputs.push((format!("past.{i}.{kind}"), value));
        }
    }
    inputs
}

#[test]
fn graphs_run_at_every_width_and_batch_on_both_backends() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("c2i");
    let manifest = export_fixture("nar-c2i-tiny", "model.safetensors", &dir, DType::F32);
    let layers = manifest.kv_cache.layers;
    let mut tract = crate::common::tract_engine_with_prefill(&dir);
    let mut ort = crate::common::ort_engine_with_prefill(&dir);
    for batch in 1..=4 {
        for width in 1..=manifest.grid[0] {
            let (tr, td, tshape) = prefill_and_step(&mut tract, layers, batch, width);
            let (or, od, oshape) = prefill_and_step(&mut ort, layers, batch, width);
            assert_eq!(
                tshape,
                [batch, 4, 1 + width, 24],
                "cache grows by the wavefront"
            );
            assert_eq!(oshape, tshape);
            for (a, b) in tr.iter().chain(&td).zip(or.iter().chain(&od)) {
                assert!(
                    (a - b).abs() < 1e-3,
                    "batch {batch} width {width}: {a} vs {b}"
                );
            }
        }
    }
}

/// A grouped-query model equals the multi-head model whose K/V heads are its kv heads
/// repeated for each query group, which is what upstream's `repeat_interleave` means.
#[test]
fn grouped_query_attention_matches_repeated_kv_heads() {
    let gqa = ModelArgs {
        dim: 64,
        n_layer: 2,
        n_head: 4,
        n_kv_head: Some(2),
        multiple_of: 32,
        vocab_size: 64,
        num_classes: 3,
        block_size: 16,
        ..ModelArgs::default()
    };
    let mha = ModelArgs {
        n_kv_head: None,
        ..gqa.clone()
    };
    let gqa_weights = random_weights(&gqa.parameters(), 3);
    let mut mha_weights = InMemory::new();
    let head_dim = 16;
    for (name, shape) in mha.parameters() {
        let data = gqa_weights.read_f32(&name).unwrap();
        let data = if name.ends_with("attention.wqkv.weight") {
            // Rows [Q: 4 heads | K: 2 heads | V: 2 heads] → [Q | K: 4 | V: 4].
            let row = |r: usize| &data[r * 64..(r + 1) * 64];
            let mut rows: Vec<f32> = data[..64 * 64].to_vec();
            for part in 0..2 {
                for h in 0..4 {
                    for j in 0..head_dim {
                        rows.extend_from_slice(row(64 + part * 32 + (h / 2) * head_dim + j));
                    }
                }
            }
            rows
        } else {
            data
        };
        mha_weights.insert(name, shape, data);
    }
    let temp = tempfile::tempdir().unwrap();
    let export_to = |args: &ModelArgs, weights: &InMemory, name: &str| {
        let dir = temp.path().join(name);
        export(&ExportRequest {
            source: weights,
            config: args.clone().into(),
            grid: None,
            dtype: DType::F32,
            layout: CacheLayout::Append,
            output: dir.clone(),
            force: false,
            vq: None,
            larp: None,
        })
        .unwrap();
        dir
    };
    let gqa_dir = export_to(&gqa, &gqa_weights, "gqa");
    let mha_dir = export_to(&mha, &mha_weights, "mha");
    let expected = logits_per_call(&mut tract_generator(&mha_dir));
    for got in [
        logits_per_call(&mut tract_generator(&gqa_dir)),
        logits_per_call(&mut ort_generator(&gqa_dir)),
    ] {
        assert_eq!(got.len(), expected.len());
        for (call, (g, e)) in got.iter().zip(&expected).enumerate() {
            let worst = max_abs_diff(g, e);
            assert!(worst < 1e-4, "call {call}: GQA differs from MHA by {worst}");
        }
    }
}

fn logits_per_call<E: Engine>(generator: &mut Generator<E>) -> Vec<Vec<f32>> {
    let mut calls = Vec::new();
    generator
        .generate(
            &Prompts::Classes(vec![0, 2]),
            &greedy_unguided_logits(2.0),
            &mut |r| calls.push(r.logits.to_vec()),
        )
        .unwrap();
    calls
}

/// Float16 weights and matmuls stay close to float32: both exports are fed the upstream
/// run's tokens (teacher forcing, so one flipped near-tie cannot derail the comparison) and
/// their head logits compared call by call, on both backends.
#[test]
fn fp16_export_stays_close_to_float32() {
    let temp = tempfile::tempdir().unwrap();
    let fp32 = temp.path().join("fp32");
    let fp16 = temp.path().join("fp16");
    let layers = export_fixture("nar-c2i-tiny", "model.safetensors", &fp32, DType::F32)
        .kv_cache
        .layers;
    let manifest = export_fixture("nar-c2i-tiny", "model.safetensors", &fp16, DType::F16);
    assert_eq!(manifest.dtype, DType::F16);
    let fp32_bytes = std::fs::metadata(fp32.join("weights.bin")).unwrap().len();
    assert!(
        manifest.weights.bytes < fp32_bytes * 6 / 10,
        "weights are stored in float16"
    );
    let expected = teacher_forced(&mut crate::common::tract_engine_with_prefill(&fp32), layers);
    for got in [
        teacher_forced(&mut crate::common::tract_engine_with_prefill(&fp16), layers),
        teacher_forced(&mut crate::common::ort_engine_with_prefill(&fp16), layers),
    ] {
        let worst = max_abs_diff(&got.concat(), &expected.concat());
        // Logits are of order 10; float16 keeps about three decimal digits.
        assert!(
            worst < 0.1,
            "fp16 logits differ from float32 by up to {worst}"
        );
        assert!(
            worst > 0.0,
            "the fp16 export computed exactly the float32 result"
        );
    }
}

/// Head logits of every call, fed the fixture's recorded inputs.
fn teacher_forced<E: Engine>(engine: &mut E, layers: usize) -> Vec<Vec<f32>> {
    let reference = Reference::load("nar-c2i-tiny");
    let (_, labels) = reference.i64("labels");
    let rows: Vec<i64> = labels.iter().copied().chain([10, 10]).collect();
    let batch = rows.len();
    let mut outputs = engine
        .run(
            GraphKind::Prefill,
            vec![
                (
                    "class_labels".into(),
                    engine.upload(HostTensor::I64(vec![batch], rows)).unwrap(),
                ),
                every_row(engine, batch),
            ],
        )
        .unwrap();
    let mut logits = Vec::new();
    for k in 1.. {
        let heads = ["logits_right", "logits_down"]
            .iter()
            .flat_map(|h| engine.download_f32(&outputs[*h]).unwrap().1)
            .collect();
        logits.push(heads);
        let Some((shape, tokens)) = reference.get(&format!("step.{k}.input_tokens")) else {
            break;
        };
        let crate::common::Data::I64(tokens) = tokens else {
            panic!("input tokens are int64")
        };
        let (_, positions) = reference.i64(&format!("step.{k}.input_pos"));
        let mut inputs = carry(outputs, layers);
        inputs.push((
            "tokens".into(),
            engine
                .upload(HostTensor::I64(shape.clone(), tokens))
                .unwrap(),
        ));
        inputs.push((
            "positions".into(),
            engine
                .upload(HostTensor::I64(vec![shape[1]], positions))
                .unwrap(),
        ));
        inputs.push(every_row(engine, batch));
        outputs = engine.run(GraphKind::Step, inputs).unwrap();
    }
    logits
}

/// Each call's guided logits, fed the fixture's tokens, with the heads projecting the guided
/// mix or both halves (guidance then on the host).
fn guided_per_call<E: Engine>(generator: &mut Generator<E>, unguided_logits: bool) -> Vec<f32> {
    let reference = Reference::load("nar-c2i-tiny");
    let forced: Vec<Vec<u32>> = reference
        .i64("tokens")
        .1
        .chunks(generator.plan().cell_count())
        .map(|grid| grid.iter().map(|&t| t as u32).collect())
        .collect();
    let prompts = Prompts::Classes(reference.i64("labels").1);
    let options = GenerateOptions {
        unguided_logits,
        ..greedy_unguided_logits(4.0)
    };
    let mut guided = Vec::new();
    generator
        .generate_forced(&prompts, &options, &forced, &mut |r| {
            guided.extend_from_slice(r.guided)
        })
        .unwrap();
    guided
}

/// In float16 the guided mix rounds `s·cond + (1 − s)·uncond` to float16 before the
/// projection; its guided logits stay as close to float32's as guidance on the host does
/// (on the fixture the two float16 paths differ by about 5e-5, float16 and float32 by 0.09).
#[test]
fn fp16_guided_mix_is_as_close_as_guidance_on_the_host() {
    let temp = tempfile::tempdir().unwrap();
    let (fp32, fp16) = (temp.path().join("fp32"), temp.path().join("fp16"));
    export_fixture("nar-c2i-tiny", "model.safetensors", &fp32, DType::F32);
    export_fixture("nar-c2i-tiny", "model.safetensors", &fp16, DType::F16);
    let expected = guided_per_call(&mut ort_generator(&fp32), false);
    let mixed = guided_per_call(&mut ort_generator(&fp16), false);
    let on_host = guided_per_call(&mut ort_generator(&fp16), true);
    let (mix_error, host_error) = (
        max_abs_diff(&mixed, &expected),
        max_abs_diff(&on_host, &expected),
    );
    assert!(
        mixed != on_host && host_error > 0.0,
        "the two float16 paths computed the same"
    );
    assert!(
        mix_error <= 1.5 * host_error,
        "mix {mix_error} against host {host_error}"
    );
}
