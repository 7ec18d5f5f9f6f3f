//! Clipping ranges from a histogram of |x|: the value `amax` that maps to ±127.
//!
//! - [`Method::Max`]: the largest value seen; nothing is clipped, small values lose
//!   resolution when there are outliers.
//! - [`Method::Percentile`]: the upper edge of the bin where the cumulative count reaches the
//!   percentile (99.99 by default), clipping the rarest values.
//! - [`Method::Entropy`]: TensorRT's entropy calibration: for each candidate clip point `i`
//!   (in bins, from 128 to 2048), the reference distribution `P` is the first `i` bins with
//!   everything beyond folded into the last of them, `Q` is those `i` bins quantised to 128
//!   levels and expanded back over the bins that were non-empty, and the clip point with the
//!   smallest KL divergence `KL(P‖Q)` wins.

use crate::histogram::AbsHistogram;
use crate::CalibrationError;

/// INT8 levels on each side of zero.
pub const LEVELS: usize = 128;

/// How a clipping range is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    Max,
    /// A percentile in (0, 100].
    Percentile(f64),
    Entropy,
}

impl Method {
    pub const DEFAULT_PERCENTILE: f64 = 99.99;

    /// Refuses a percentile outside (0, 100], before any calibration work is done.
    pub fn validate(&self) -> Result<(), CalibrationError> {
        match *self {
            Method::Percentile(p) if !(p > 0.0 && p <= 100.0) => Err(CalibrationError::BadInput(
                format!("--percentile {p} is outside (0, 100]"),
            )),
            _ => Ok(()),
        }
    }

    /// The clipping range of a tensor; `None` when the histogram saw no non-zero value (a
    /// tensor the calibration set never exercised cannot be given a range).
    pub(crate) fn amax(&self, histogram: &AbsHistogram) -> Result<Option<f32>, CalibrationError> {
        self.validate()?;
        if histogram.max() == 0.0 {
            return Ok(None);
        }
        let width = histogram.bin_width();
        let counts = histogram.counts();
        let bins = match *self {
            Method::Max => return Ok(Some(histogram.max())),
            Method::Percentile(p) => percentile_bins(counts, p),
            Method::Entropy => entropy_bins(counts, LEVELS.min(counts.len())),
        };
        Ok(Some((bins as f32 * width).min(histogram.max())))
    }
}

/// The number of leading bins holding at least `p` percent of the count.
fn percentile_bins(counts: &[u64], p: f64) -> usize {
    let total: u64 = counts.iter().sum();
    let target = total as f64 * p / 100.0;
    let mut cumulative = 0u64;
    for (i, &c) in counts.iter().enumerate() {
        cumulative += c;
        if cumulative as f64 >= target {
            return i + 1;
        }
    }
    counts.len()
}

/// The clip point, in bins, with the smallest `KL(P‖Q)` among `levels..=counts.len()`.
fn entropy_bins(counts: &[u64], levels: usize) -> usize {
    let mut best = (f64::INFINITY, counts.len());
    for i in levels..=counts.len() {
        let divergence = clip_divergence(counts, i, levels);
        if divergence < best.0 {
            best = (divergence, i);
        }
    }
    best.1
}

/// `KL(P‖Q)` for clipping after `i` bins and quantising them to `levels` levels.
fn clip_divergence(counts: &[u64], i: usize, levels: usize) -> f64 {
    let outliers: u64 = counts[i..].iter().sum();
    let mut p: Vec<f64> = counts[..i].iter().map(|&c| c as f64).collect();
    p[i - 1] += outliers as f64;
    // Q: merge the unclipped bins into `levels` groups (the last takes the remainder), then
    // spread each group's count evenly over its non-empty bins.
    let per_level = i / levels;
    let mut q = vec![0f64; i];
    for level in 0..levels {
        let start = level * per_level;
        let stop = if level + 1 == levels {
            i
        } else {
            start + per_level
        };
        let group = &counts[start..stop];
        let non_empty = group.iter().filter(|&&c| c > 0).count();
        if non_empty == 0 {
            continue;
        }
        let share = group.iter().sum::<u64>() as f64 / non_empty as f64;
        for (k, &c) in group.iter().enumerate() {
            if c > 0 {
                q[start + k] = share;
            }
        }
    }
    kl_divergence(&smooth(&p), &smooth(&q))
}

/// Moves a little mass onto empty bins so that `KL` stays finite (as MXNet's and ONNX
/// Runtime's implementations of this method do).
fn smooth(distribution: &[f64]) -> Vec<f64> {
    const EPS: f64 = 1e-4;
    let total: f64 = distribution.iter().sum();
    let zeros = distribution.iter().filter(|&&x| x == 0.0).count();
    let non_zeros = distribution.len() - zeros;
    if total == 0.0 || non_zeros == 0 {
        return vec![1.0 / distribution.len() as f64; distribution.len()];
    }
    let taken = EPS * zeros as f64 / non_zeros as f64;
    distribution
        .iter()
        .map(|&x| {
            let x = x / total;
            if x == 0.0 {
                EPS
            } else {
                (x - taken).max(EPS * 0.5)
            }
        })
        .collect()
}

fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    p.iter()
        .zip(q)
        .map(|(&p, &q)| {
            let (p, q) = (p / sp, q / sq);
            if p > 0.0 {
                p * (p / q).ln()
            } else {
                0.0
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn histogram(values: &[f32], bins: usize) -> AbsHistogram {
        let mut h = AbsHistogram::new(bins);
        h.add(values).unwrap();
        h
    }

    #[test]
    fn max_is_the_largest_value() {
        let h = histogram(&[0.5, -3.0, 2.0], 8);
        assert_eq!(Method::Max.amax(&h).unwrap().unwrap(), 3.0);
    }

    #[test]
    fn percentile_is_the_edge_of_the_bin_that_reaches_it() {
        // 8 bins of 1 over [0, 8]: 97 values in bin 0, 2 in bin 3, 1 (8.0) in bin 7.
        let mut values = vec![0.5f32; 97];
        values.extend([3.5, 3.5, 8.0]);
        let h = histogram(&values, 8);
        // 97% is reached in bin 0 → 1.0; 99% in bin 3 → 4.0; 100% needs bin 7 → 8.0.
        assert_eq!(Method::Percentile(97.0).amax(&h).unwrap().unwrap(), 1.0);
        assert_eq!(Method::Percentile(99.0).amax(&h).unwrap().unwrap(), 4.0);
        assert_eq!(Method::Percentile(100.0).amax(&h).unwrap().unwrap(), 8.0);
        for bad in [0.0, -1.0, 100.5, f64::NAN] {
            let err = Method::Percentile(bad).validate().unwrap_err().to_string();
            assert!(err.contains("outside (0, 100]"), "{err}");
            assert!(Method::Percentile(bad).amax(&h).is_err());
        }
        assert!(Method::Percentile(100.0).validate().is_ok());
    }

    #[test]
    fn kl_of_hand_computed_distributions() {
        // KL([0.5, 0.5] ‖ [0.25, 0.75]) = 0.5 ln 2 + 0.5 ln(2/3).
        let got = kl_divergence(&[1.0, 1.0], &[1.0, 3.0]);
        let want = 0.5 * 2f64.ln() + 0.5 * (2.0f64 / 3.0).ln();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        assert_eq!(kl_divergence(&[2.0, 6.0], &[1.0, 3.0]), 0.0);
    }

    #[test]
    fn quantisation_of_a_clip_point_by_hand() {
        // Four bins [4, 0, 2, 2], two levels, no clipping: groups [4, 0] and [2, 2] become
        // Q = [4, 0, 2, 2] (the empty bin stays empty, each group spreads over its non-empty
        // bins), equal to P, so the divergence is 0.
        assert!(clip_divergence(&[4, 0, 2, 2], 4, 2).abs() < 1e-12);
        // Clipping after two bins of [2, 2, 0, 4] with two levels: P = [2, 2 + 4] and
        // Q = [2, 2]: KL([0.25, 0.75] ‖ [0.5, 0.5]).
        let got = clip_divergence(&[2, 2, 0, 4], 2, 2);
        let want = 0.25 * 0.5f64.ln() + 0.75 * 1.5f64.ln();
        assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    }

    #[test]
    fn entropy_clips_a_long_tail_and_keeps_a_spread_distribution() {
        // A Laplace-shaped bulk (scale 0.1, by inverse CDF on a grid; the largest value is
        // about 1.06) and one outlier at 10: the clip point lands past the bulk and well
        // before the outlier.
        let n = 20_000;
        let mut values: Vec<f32> = (0..n)
            .map(|k| -0.1 * (1.0 - (k as f32 + 0.5) / n as f32).ln())
            .collect();
        values.push(10.0);
        let h = histogram(&values, BINS_FOR_TEST);
        let amax = Method::Entropy.amax(&h).unwrap().unwrap();
        assert!(amax < 2.0, "entropy kept the outlier: {amax}");
        assert!(amax > 0.3, "entropy clipped the bulk: {amax}");
        // Uniform over the whole range: nothing to gain by clipping.
        let uniform: Vec<f32> = (0..2048 * 4).map(|i| (i / 4) as f32 + 0.5).collect();
        let h = histogram(&uniform, BINS_FOR_TEST);
        assert_eq!(Method::Entropy.amax(&h).unwrap().unwrap(), h.max());
    }

    const BINS_FOR_TEST: usize = crate::histogram::BINS;

    #[test]
    fn an_unexercised_tensor_has_no_range() {
        let h = histogram(&[0.0, 0.0], 8);
        for method in [Method::Max, Method::Percentile(99.99), Method::Entropy] {
            assert_eq!(method.amax(&h).unwrap(), None);
        }
    }
}
