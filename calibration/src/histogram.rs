//! A streaming histogram of absolute values.
//!
//! The range starts at the first non-zero maximum seen and doubles whenever a larger value
//! arrives; doubling merges pairs of bins, so the counts stay exact (no re-binning by
//! interpolation) and the histogram keeps `BINS` counters whatever it is fed. The final range
//! is the true maximum rounded up to a power-of-two multiple of the first one, so at least
//! half of the bins cover values that occurred.

use crate::CalibrationError;

/// Bins of a calibration histogram (TensorRT's and ONNX Runtime's choice).
pub(crate) const BINS: usize = 2048;

#[derive(Clone, Debug, PartialEq)]
pub(crate) struct AbsHistogram {
    counts: Vec<u64>,
    /// Upper edge of the last bin; 0 until a non-zero value arrives.
    edge: f32,
    max: f32,
    zeros: u64,
}

impl Default for AbsHistogram {
    fn default() -> Self {
        Self::new(BINS)
    }
}

impl AbsHistogram {
    /// An empty histogram of `bins` bins (an even number ≥ 2, so the range can double).
    pub(crate) fn new(bins: usize) -> Self {
        assert!(
            bins >= 2 && bins.is_multiple_of(2),
            "bins must be even and at least 2"
        );
        AbsHistogram {
            counts: vec![0; bins],
            edge: 0.0,
            max: 0.0,
            zeros: 0,
        }
    }

    /// Adds `values`; NaN and ±∞ are refused (they would make every range meaningless).
    pub(crate) fn add(&mut self, values: &[f32]) -> Result<(), CalibrationError> {
        if let Some(bad) = values.iter().find(|v| !v.is_finite()) {
            return Err(CalibrationError::BadInput(format!(
                "cannot calibrate on a non-finite activation ({bad})"
            )));
        }
        let batch_max = values.iter().fold(0f32, |m, v| m.max(v.abs()));
        if batch_max > 0.0 {
            if self.edge == 0.0 {
                self.edge = batch_max;
                // Zeros seen before any range existed belong to the first bin.
                self.counts[0] += std::mem::take(&mut self.zeros);
            }
            while batch_max > self.edge {
                self.double();
            }
        }
        self.max = self.max.max(batch_max);
        if self.edge == 0.0 {
            self.zeros += values.len() as u64;
            return Ok(());
        }
        let bins = self.counts.len();
        let scale = bins as f32 / self.edge;
        for v in values {
            let bin = ((v.abs() * scale) as usize).min(bins - 1);
            self.counts[bin] += 1;
        }
        Ok(())
    }

    /// Doubles the range: bins `2j` and `2j + 1` become bin `j`.
    fn double(&mut self) {
        let half = self.counts.len() / 2;
        for j in 0..half {
            self.counts[j] = self.counts[2 * j] + self.counts[2 * j + 1];
        }
        self.counts[half..].iter_mut().for_each(|c| *c = 0);
        self.edge *= 2.0;
    }

    /// Counts per bin; bin `i` covers `[i, i + 1) · bin_width()` (the last includes its edge).
    /// Until a non-zero value arrives there is no range and every count is 0.
    pub(crate) fn counts(&self) -> &[u64] {
        &self.counts
    }

    pub(crate) fn bin_width(&self) -> f32 {
        self.edge / self.counts.len() as f32
    }

    /// The largest |x| seen (exact, not binned).
    pub(crate) fn max(&self) -> f32 {
        self.max
    }

    /// How many values were added.
    #[cfg(test)]
    fn total(&self) -> u64 {
        self.zeros + self.counts.iter().sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_their_bins() {
        let mut h = AbsHistogram::new(4);
        h.add(&[4.0, -1.0, 0.5, 2.5, -3.9]).unwrap();
        // Range [0, 4], bins of 1: 0.5 → 0, 1.0 → 1, 2.5 → 2, 3.9 → 3, 4.0 → 3 (edge).
        assert_eq!(h.counts(), &[1, 1, 1, 2]);
        assert_eq!(h.bin_width(), 1.0);
        assert_eq!(h.max(), 4.0);
        assert_eq!(h.total(), 5);
    }

    #[test]
    fn growing_ranges_merge_bins_exactly() {
        let mut h = AbsHistogram::new(4);
        h.add(&[0.0, 0.0]).unwrap();
        h.add(&[1.0, 0.3, 0.6]).unwrap();
        // Range [0, 1], bins of 0.25: 0, 0, 0.3 → 1, 0.6 → 2, 1.0 → 3.
        assert_eq!(h.counts(), &[2, 1, 1, 1]);
        h.add(&[3.5]).unwrap();
        // Doubled twice to [0, 4], bins of 1: everything below 1 merges into bin 0.
        assert_eq!(h.counts(), &[5, 0, 0, 1]);
        assert_eq!(h.bin_width(), 1.0);
        assert_eq!(h.max(), 3.5);
        assert_eq!(h.total(), 6);
        // The same values in one batch set the range from 3.5 alone (bins of 0.875) and bin
        // differently; streaming never splits a count, it only coarsens earlier bins.
        let mut once = AbsHistogram::new(4);
        once.add(&[0.0, 0.0, 1.0, 0.3, 0.6, 3.5]).unwrap();
        assert_eq!(once.counts(), &[4, 1, 0, 1]);
        assert_eq!(once.total(), h.total());
    }

    #[test]
    fn non_finite_values_are_refused() {
        let mut h = AbsHistogram::default();
        assert!(h.add(&[1.0, f32::NAN]).is_err());
        assert!(h.add(&[f32::INFINITY]).is_err());
        assert_eq!(h.total(), 0);
    }
}
