//! Classifier-free guidance, as upstream applies it (NAR-SPEC §4).
//!
//! With a scale above 1 the model batch is `[cond; uncond]`: the prompts, then the same
//! number of rows with the null condition. Guided logits are `uncond + (cond − uncond)·s`,
//! in that operation order, in f32. `cfg_interval` switches guidance off for good once enough
//! tokens exist; the uncond half is still computed (its KV cache must stay complete), only
//! its logits are ignored.

use thiserror::Error;

/// Why guidance could not be configured or applied.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum GuidanceError {
    #[error("guidance scale must be a finite number, got {0}")]
    InvalidScale(f32),
    #[error("{what} has {got} values, expected {expected}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
}

/// Whether a run with this scale carries an uncond half at all: upstream builds it only
/// when `cfg_scale > 1`.
pub fn uses_uncond_half(scale: f32) -> bool {
    scale > 1.0
}

/// Model batch rows for `prompts` prompts: `[cond; uncond]` with guidance, else the prompts.
pub fn model_rows(prompts: usize, scale: f32) -> usize {
    if uses_uncond_half(scale) {
        2 * prompts
    } else {
        prompts
    }
}

/// Writes `uncond + (cond − uncond) · scale` element-wise into `out`.
///
/// The operation order is upstream's, so results match it bit for bit in f32.
pub fn guide(
    cond: &[f32],
    uncond: &[f32],
    scale: f32,
    out: &mut [f32],
) -> Result<(), GuidanceError> {
    if uncond.len() != cond.len() {
        return Err(GuidanceError::LengthMismatch {
            what: "uncond logits",
            expected: cond.len(),
            got: uncond.len(),
        });
    }
    if out.len() != cond.len() {
        return Err(GuidanceError::LengthMismatch {
            what: "guided logits buffer",
            expected: cond.len(),
            got: out.len(),
        });
    }
    for ((o, &c), &u) in out.iter_mut().zip(cond).zip(uncond) {
        *o = u + (c - u) * scale;
    }
    Ok(())
}

/// The mix of `rows` rows that keeps each one: the identity, `(rows, rows)` row-major.
pub fn identity_mix(rows: usize) -> Vec<f32> {
    let mut mix = vec![0.0; rows * rows];
    for i in 0..rows {
        mix[i * rows + i] = 1.0;
    }
    mix
}

/// When guidance applies during one generation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CfgSchedule {
    scale: f32,
    interval: Option<usize>,
}

impl CfgSchedule {
    /// `scale` is upstream's `cfg_scale`; `interval` its `cfg_interval`, with `None` for the
    /// default −1 (upstream treats every negative value alike: guidance never stops).
    pub fn new(scale: f32, interval: Option<usize>) -> Result<Self, GuidanceError> {
        if !scale.is_finite() {
            return Err(GuidanceError::InvalidScale(scale));
        }
        Ok(Self { scale, interval })
    }

    /// The guidance scale.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// Whether the model batch carries an uncond half (see [`uses_uncond_half`]).
    pub fn uses_uncond_half(&self) -> bool {
        uses_uncond_half(self.scale)
    }

    /// Whether the call that follows `tokens_before` generated tokens is guided.
    ///
    /// Upstream keeps a counter that starts at 1 after the prefill and grows by each step's
    /// output; before a step it turns guidance off for good once `counter > cfg_interval`.
    /// The counter only grows, so this is the same as guiding exactly the calls with
    /// `tokens_before ≤ cfg_interval`; the prefill (0 tokens before) is always guided.
    pub fn is_guided(&self, tokens_before: usize) -> bool {
        self.uses_uncond_half() && self.interval.is_none_or(|limit| tokens_before <= limit)
    }

    /// The call after `tokens_before` tokens as a mix of the model batch `[cond; uncond]`
    /// of `2·prompts` rows, `(prompts, 2·prompts)` row-major: row `i` is
    /// `s·cond_i + (1 − s)·uncond_i` when the call is guided, `cond_i` when not.
    ///
    /// Projecting this mix of the heads' inputs gives the guided logits (the projection and
    /// the averaging of heads are linear), from half the rows; the sum is grouped
    /// differently from [`guide`]'s, so the logits agree to rounding, not to the bit.
    pub fn head_mix(&self, tokens_before: usize, prompts: usize) -> Vec<f32> {
        let (cond, uncond) = if self.is_guided(tokens_before) {
            (self.scale, 1.0 - self.scale)
        } else {
            (1.0, 0.0)
        };
        let mut mix = vec![0.0; prompts * 2 * prompts];
        for (i, row) in mix.chunks_exact_mut(2 * prompts).enumerate() {
            row[i] = cond;
            row[prompts + i] = uncond;
        }
        mix
    }

    /// Turns a call's assembled logits into the logits to sample from.
    ///
    /// `logits` is the whole model batch: `[cond; uncond]` when [`Self::uses_uncond_half`],
    /// else just the cond rows; `out` has the size of the cond half. Guided calls get
    /// [`guide`], unguided ones the cond half unchanged.
    pub fn apply(
        &self,
        tokens_before: usize,
        logits: &[f32],
        out: &mut [f32],
    ) -> Result<(), GuidanceError> {
        let halves = if self.uses_uncond_half() { 2 } else { 1 };
        if out.len().checked_mul(halves) != Some(logits.len()) {
            return Err(GuidanceError::LengthMismatch {
                what: "model-batch logits",
                expected: out.len().saturating_mul(halves),
                got: logits.len(),
            });
        }
        let (cond, uncond) = logits.split_at(out.len());
        if self.is_guided(tokens_before) {
            guide(cond, uncond, self.scale, out)
        } else {
            out.copy_from_slice(cond);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tokens before each call of a 3×3 grid: wavefronts of 1, 2, 3, 2, 1 tokens.
    const TOKENS_BEFORE_3X3: [usize; 5] = [0, 1, 3, 6, 8];

    fn guided_calls(scale: f32, interval: Option<usize>) -> Vec<usize> {
        let schedule = CfgSchedule::new(scale, interval).unwrap();
        TOKENS_BEFORE_3X3
            .iter()
            .enumerate()
            .filter(|(_, &before)| schedule.is_guided(before))
            .map(|(call, _)| call)
            .collect()
    }

    #[test]
    fn cfg_interval_counts_like_upstream_on_a_3x3_grid() {
        // Counter before step t: 1, 3, 6, 8; guidance stops once it exceeds the interval.
        assert_eq!(guided_calls(4.0, None), [0, 1, 2, 3, 4]);
        assert_eq!(guided_calls(4.0, Some(0)), [0]);
        assert_eq!(guided_calls(4.0, Some(1)), [0, 1]);
        assert_eq!(guided_calls(4.0, Some(2)), [0, 1]);
        assert_eq!(guided_calls(4.0, Some(3)), [0, 1, 2]);
        assert_eq!(guided_calls(4.0, Some(5)), [0, 1, 2]);
        assert_eq!(guided_calls(4.0, Some(6)), [0, 1, 2, 3]);
        assert_eq!(guided_calls(4.0, Some(8)), [0, 1, 2, 3, 4]);
    }

    #[test]
    fn no_guidance_without_an_uncond_half() {
        assert!(!uses_uncond_half(1.0));
        assert!(!uses_uncond_half(0.5));
        assert!(uses_uncond_half(1.25));
        assert_eq!(guided_calls(1.0, None), Vec::<usize>::new());
        assert_eq!(guided_calls(1.0, Some(5)), Vec::<usize>::new());
    }

    #[test]
    fn guide_uses_upstreams_operation_order() {
        let cond = [2.0f32, 1.0e8, 0.1];
        let uncond = [1.0f32, 1.0, 0.3];
        let scale = 4.0f32;
        let mut out = [0.0f32; 3];
        guide(&cond, &uncond, scale, &mut out).unwrap();
        for i in 0..3 {
            assert_eq!(out[i], uncond[i] + (cond[i] - uncond[i]) * scale);
        }
        assert_eq!(out[0], 5.0);
        // The algebraically equal cond·s + uncond·(1 − s) rounds differently here.
        assert_ne!(out[2], cond[2] * scale + uncond[2] * (1.0 - scale));
    }

    #[test]
    fn apply_guides_or_passes_the_cond_half() {
        let logits = [3.0f32, 5.0, 1.0, 1.0]; // cond rows [3, 5], uncond rows [1, 1]
        let schedule = CfgSchedule::new(2.0, Some(1)).unwrap();
        let mut out = [0.0f32; 2];
        schedule.apply(0, &logits, &mut out).unwrap();
        assert_eq!(out, [5.0, 9.0]);
        schedule.apply(3, &logits, &mut out).unwrap();
        assert_eq!(out, [3.0, 5.0]);

        let plain = CfgSchedule::new(1.0, None).unwrap();
        plain.apply(0, &logits[..2], &mut out).unwrap();
        assert_eq!(out, [3.0, 5.0]);
    }

    #[test]
    fn head_mix_guides_like_apply() {
        // Two prompts; rows [cond₀, cond₁, uncond₀, uncond₁] of one value each.
        let logits = [3.0f32, 5.0, 1.0, 2.0];
        let schedule = CfgSchedule::new(4.0, Some(1)).unwrap();
        for before in [0, 3] {
            let mix = schedule.head_mix(before, 2);
            let mixed: Vec<f32> = mix
                .chunks(4)
                .map(|row| row.iter().zip(&logits).map(|(w, l)| w * l).sum())
                .collect();
            let mut applied = [0.0f32; 2];
            schedule.apply(before, &logits, &mut applied).unwrap();
            assert_eq!(mixed, applied, "{before} tokens before");
        }
        assert_eq!(schedule.head_mix(3, 1), [1.0, 0.0]);
        assert_eq!(identity_mix(2), [1.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(matches!(
            CfgSchedule::new(f32::NAN, None),
            Err(GuidanceError::InvalidScale(_))
        ));
        assert!(matches!(
            CfgSchedule::new(f32::INFINITY, None),
            Err(GuidanceError::InvalidScale(_))
        ));
        let mut out = [0.0f32; 2];
        assert!(matches!(
            guide(&[1.0, 2.0], &[1.0], 2.0, &mut out),
            Err(GuidanceError::LengthMismatch {
                what: "uncond logits",
                ..
            })
        ));
        assert!(matches!(
            guide(&[1.0], &[1.0], 2.0, &mut out),
            Err(GuidanceError::LengthMismatch { .. })
        ));
        let schedule = CfgSchedule::new(2.0, None).unwrap();
        assert!(matches!(
            schedule.apply(0, &[1.0, 2.0, 3.0], &mut out),
            Err(GuidanceError::LengthMismatch {
                expected: 4,
                got: 3,
                ..
            })
        ));
    }
}
