//! What quantisation costs: a candidate model (the QDQ model, or a float16 export) against
//! the float32 model on held-out prompts.
//!
//! - `top1_agreement`: the float32 model generates greedily; the candidate is fed the same
//!   tokens (teacher forcing) and, at every call and produced cell, its guided logits' arg-max
//!   is compared with float32's.
//! - `top1_agreement_unguided`: the same on the conditional logits before guidance, which
//!   shows how much guidance amplifies the difference (`u + s(c − u)` scales it by about s).
//! - `mean_kl`: over the same cells, `KL(softmax(float32) ‖ softmax(candidate))` of the guided
//!   logits.
//! - `token_agreement`: both generate greedily on their own; the fraction of grid cells where
//!   the final tokens agree (one early difference changes everything after it, so this is
//!   the strictest figure).

use std::path::Path;

use serde_json::json;

use narx_graphs::manifest::{Condition, Manifest};
use narx_runtime::generate::{GenerateOptions, Prompts};
use narx_runtime::load::{AnyGenerator, LoadOptions, Provider, Purpose};
use narx_runtime::sampling::SamplingParams;

use crate::CalibrationError;

/// The four figures for one candidate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Quality {
    pub top1_agreement: f64,
    pub top1_agreement_unguided: f64,
    pub mean_kl: f64,
    pub token_agreement: f64,
    /// Cells compared for the first two.
    pub cells: usize,
}

impl Quality {
    pub fn to_json(self) -> serde_json::Value {
        json!({
            "top1_agreement": self.top1_agreement,
            "top1_agreement_unguided": self.top1_agreement_unguided,
            "mean_kl": self.mean_kl,
            "token_agreement": self.token_agreement,
            "cells": self.cells,
        })
    }
}

/// Refuses a candidate whose logits cannot be lined up with the reference's call by call:
/// another grid, vocabulary, set of dimension heads or kind of prompt.
pub fn check_comparable(
    reference: &Manifest,
    candidate: &Manifest,
    candidate_dir: &Path,
) -> Result<(), CalibrationError> {
    let condition = |c: &Condition| match c {
        Condition::Class { num_classes, .. } => format!("{num_classes} classes"),
        Condition::Caption { tokens, dim } => format!("captions of {tokens}×{dim}"),
    };
    let axes = |m: &Manifest| m.heads.iter().map(|h| h.axis).collect::<Vec<_>>();
    let differences = [
        (
            "grid",
            format!("{:?}", reference.grid),
            format!("{:?}", candidate.grid),
        ),
        (
            "vocabulary",
            reference.vocab_size.to_string(),
            candidate.vocab_size.to_string(),
        ),
        (
            "dimension heads (axes)",
            format!("{:?}", axes(reference)),
            format!("{:?}", axes(candidate)),
        ),
        (
            "condition",
            condition(&reference.condition),
            condition(&candidate.condition),
        ),
    ];
    let problems: Vec<String> = differences
        .iter()
        .filter(|(_, want, got)| want != got)
        .map(|(what, want, got)| format!("{what} {got}, expected {want}"))
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    Err(CalibrationError::BadInput(format!(
        "{} is not an export of the same model: {}",
        candidate_dir.display(),
        problems.join("; ")
    )))
}

/// Compares `candidate` with `reference` (both model directories) on `prompts`, with the
/// guidance of `options` and greedy decoding.
pub fn compare(
    reference: &Path,
    candidate: &Path,
    prompts: &[Prompts],
    options: &GenerateOptions,
    provider: Provider,
    load: &LoadOptions,
) -> Result<Quality, CalibrationError> {
    let run_error = |e: narx_runtime::RuntimeError| CalibrationError::Run(e.to_string());
    // The comparison reads every call's full logits, both halves before guidance
    // (`unguided_logits`), which bypasses a selection graph: none is loaded.
    let load = LoadOptions {
        select_on_device: Some(false),
        ..load.clone()
    };
    let open = |dir: &Path| {
        AnyGenerator::open(dir, provider, &load, Purpose::Generate)
            .map(|(g, _)| g)
            .map_err(run_error)
    };
    let (mut float, mut other) = (open(reference)?, open(candidate)?);
    let greedy = GenerateOptions {
        sampling: SamplingParams {
            greedy: true,
            ..options.sampling
        },
        unguided_logits: true,
        ..options.clone()
    };
    check_comparable(float.manifest(), other.manifest(), candidate)?;
    let vocab = float.manifest().vocab_size;
    // What the candidate reports must line up with the reference's calls; a mismatch is
    // recorded here (the callback cannot fail) and returned after the run.
    let mismatch = |call: usize| {
        CalibrationError::Run(format!(
            "{} produced logits that do not line up with the reference's at call {call}",
            candidate.display()
        ))
    };
    let (mut agree, mut agree_unguided, mut cells, mut kl_sum) = (0usize, 0usize, 0usize, 0f64);
    let (mut same_tokens, mut tokens) = (0usize, 0usize);
    for batch in prompts {
        // Per call: the guided logits, and the conditional half before guidance (the first
        // rows of the assembled logits, as many values as the guided ones).
        let mut reference_calls = Vec::new();
        let mut misaligned = None;
        let reference_run = float
            .generate(
                batch,
                &greedy,
                &mut |r| match r.logits.get(..r.guided.len()) {
                    Some(cond) => reference_calls.push((r.guided.to_vec(), cond.to_vec())),
                    None => {
                        misaligned.get_or_insert(reference_calls.len());
                    }
                },
            )
            .map_err(run_error)?;
        let mut call = 0;
        other
            .generate_forced(batch, &greedy, &reference_run.tokens, &mut |r| {
                let lined_up = reference_calls.get(call).and_then(|(guided, cond)| {
                    let got_cond = r.logits.get(..cond.len())?;
                    (r.guided.len() == guided.len()).then_some((guided, cond, got_cond))
                });
                let Some((guided, cond, got_cond)) = lined_up else {
                    misaligned.get_or_insert(call);
                    call += 1;
                    return;
                };
                for (want, got) in guided.chunks_exact(vocab).zip(r.guided.chunks_exact(vocab)) {
                    agree += usize::from(argmax(want) == argmax(got));
                    kl_sum += kl(want, got);
                    cells += 1;
                }
                for (want, got) in cond.chunks_exact(vocab).zip(got_cond.chunks_exact(vocab)) {
                    agree_unguided += usize::from(argmax(want) == argmax(got));
                }
                call += 1;
            })
            .map_err(run_error)?;
        if let Some(call) = misaligned {
            return Err(mismatch(call));
        }
        let free = other
            .generate(batch, &greedy, &mut |_| {})
            .map_err(run_error)?;
        for (a, b) in reference_run.tokens.iter().zip(&free.tokens) {
            same_tokens += a.iter().zip(b).filter(|(x, y)| x == y).count();
            tokens += a.len();
        }
    }
    let ratio = |n: usize, d: usize| if d == 0 { 0.0 } else { n as f64 / d as f64 };
    Ok(Quality {
        top1_agreement: ratio(agree, cells),
        top1_agreement_unguided: ratio(agree_unguided, cells),
        mean_kl: if cells == 0 {
            0.0
        } else {
            kl_sum / cells as f64
        },
        token_agreement: ratio(same_tokens, tokens),
        cells,
    })
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// `KL(softmax(p) ‖ softmax(q))` from logits, in f64.
fn kl(p: &[f32], q: &[f32]) -> f64 {
    let log_softmax = |x: &[f32]| {
        let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
        let log_sum = sum.ln() + max;
        x.iter().map(|&v| v as f64 - log_sum).collect::<Vec<f64>>()
    };
    let (lp, lq) = (log_softmax(p), log_softmax(q));
    lp.iter()
        .zip(&lq)
        .map(|(a, b)| a.exp() * (a - b))
        .sum::<f64>()
        .max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_and_argmax_by_hand() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert!(kl(&[0.0, 1.0], &[0.0, 1.0]).abs() < 1e-12);
        // softmax([0, ln 3]) = [0.25, 0.75]; softmax([0, 0]) = [0.5, 0.5].
        let got = kl(&[0.0, 3f32.ln()], &[0.0, 0.0]);
        let want = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    }
}
