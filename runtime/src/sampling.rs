//! Token sampling exactly as upstream's `sample` / `top_k_top_p_filtering` (NAR-SPEC §4):
//! temperature (floored at 1e-5), top-k keeping ties, then top-p, then one draw from the
//! softmax; or greedy arg-max.
//!
//! Draws are reproducible per image: each image owns an [`ImageRng`] keyed by the run seed
//! and its index, so its tokens do not depend on which batch it was generated in. Bit-exact
//! agreement with upstream's draws is impossible (PyTorch's RNG stream), so the draw itself is
//! also exposed with an injected uniform ([`sample_row_with_uniform`]), which pins down the
//! inverse-CDF rule the tests check.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use thiserror::Error;

/// Upstream's floor on the temperature divisor (`max(temperature, 1e-5)`).
const MIN_TEMPERATURE: f32 = 1e-5;

/// Why sampling parameters or a logit row were rejected.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SamplingError {
    #[error("temperature must be a finite number >= 0, got {0}")]
    InvalidTemperature(f32),
    #[error("top_p must be in (0, 1], got {0}")]
    InvalidTopP(f32),
    #[error("cannot sample from an empty vocabulary")]
    EmptyVocabulary,
    #[error("a vocabulary of {0} entries does not fit u32 token ids")]
    VocabularyTooLarge(usize),
    #[error("logit {index} is {value}; logits must be finite or -inf")]
    NonFiniteLogit { index: usize, value: f32 },
    #[error("every logit is -inf, so no token can be drawn")]
    NoCandidate,
    #[error("the uniform draw {0} is outside [0, 1)")]
    InvalidUniform(f64),
    #[error("{what} has {got} values, expected {expected}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("a batch of {images} images cannot own {rows} logit rows evenly")]
    RowsPerImage { rows: usize, images: usize },
    #[error("a sampling thread panicked")]
    WorkerPanicked,
}

/// How a token is chosen from a row of logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Logits are divided by `max(temperature, 1e-5)` before filtering.
    pub temperature: f32,
    /// Keep the `top_k` largest logits (and ties with the smallest of them); 0 = off.
    pub top_k: usize,
    /// Nucleus threshold in (0, 1]; 1 = off.
    pub top_p: f32,
    /// Take the arg-max instead of drawing (the mode the conformance fixtures use).
    pub greedy: bool,
}

impl Default for SamplingParams {
    /// Upstream's defaults: temperature 1, no top-k, no top-p, a random draw.
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            greedy: false,
        }
    }
}

impl SamplingParams {
    /// Checks the parameters; called by every sampling function.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::InvalidTemperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::InvalidTopP(self.top_p));
        }
        Ok(())
    }

    /// What logits are divided by before filtering: `max(temperature, 1e-5)`.
    pub fn divisor(&self) -> f32 {
        self.temperature.max(MIN_TEMPERATURE)
    }
}

/// The random stream of one image: ChaCha8 seeded from the run seed, with the stream (nonce)
/// set to the image's index, so images are independent and each is reproducible alone.
#[derive(Debug, Clone)]
pub struct ImageRng(ChaCha8Rng);

impl ImageRng {
    /// The stream for image `image_index` of a run seeded with `seed`.
    pub fn new(seed: u64, image_index: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(image_index);
        Self(rng)
    }
}

impl RngCore for ImageRng {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }

    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        self.0.fill_bytes(dst)
    }
}

/// Applies temperature, top-k and top-p to `logits` in place, leaving removed tokens at −∞:
/// the distribution upstream's softmax sees.
///
/// Logits must be finite or −∞ (−∞ marks an already excluded token), with at least one
/// finite.
pub fn filter_logits(logits: &mut [f32], params: &SamplingParams) -> Result<(), SamplingError> {
    params.validate()?;
    let mut sampler = RowSampler::default();
    sampler.filter(logits, params)?;
    logits.fill(f32::NEG_INFINITY);
    let survivors = &sampler.survivors;
    for (&i, &value) in survivors.kept.iter().zip(&survivors.weights) {
        logits[i] = value;
    }
    Ok(())
}

/// Chooses a token from one row of logits (one output position of one image).
///
/// Greedy mode returns the first index of the largest logit and ignores temperature and
/// filters (neither can change the arg-max). Otherwise the row is filtered as
/// [`filter_logits`], turned into probabilities with a softmax, and one token is drawn with a
/// uniform from `rng`.
pub fn sample_row<R: Rng + ?Sized>(
    logits: &[f32],
    params: &SamplingParams,
    rng: &mut R,
) -> Result<u32, SamplingError> {
    if params.greedy {
        params.validate()?;
        return greedy(logits);
    }
    let u: f64 = rng.random();
    sample_row_with_uniform(logits, params, u)
}

/// [`sample_row`] with the uniform supplied by the caller, so that a given draw's token can be
/// checked. `u` must lie in [0, 1); the token is the first whose cumulative
/// probability, in vocabulary order, exceeds `u` times the total.
pub fn sample_row_with_uniform(
    logits: &[f32],
    params: &SamplingParams,
    u: f64,
) -> Result<u32, SamplingError> {
    RowSampler::default().sample(logits, params, Some(u))
}

/// Samples rows with reusable buffers, so a block of rows allocates nothing per row. Rows
/// are read, never written: the filters, the softmax and the draw work on the surviving
/// entries, copied out with their indices.
#[derive(Default)]
struct RowSampler {
    /// The row divided by the temperature, when that is not 1.
    scaled: Vec<f32>,
    survivors: Survivors,
}

impl RowSampler {
    /// Greedy when `u` is `None`, else a draw with uniform `u`.
    fn sample(
        &mut self,
        logits: &[f32],
        params: &SamplingParams,
        u: Option<f64>,
    ) -> Result<u32, SamplingError> {
        let Some(u) = u.filter(|_| !params.greedy) else {
            params.validate()?;
            return greedy(logits);
        };
        if !(0.0..1.0).contains(&u) {
            return Err(SamplingError::InvalidUniform(u));
        }
        params.validate()?;
        self.filter(logits, params)?;
        // A removed entry's probability is exactly 0, so leaving it out changes no sum.
        let survivors = &mut self.survivors;
        softmax(&mut survivors.weights);
        draw(&survivors.kept, &survivors.weights, u)
    }

    /// Temperature, top-k, then top-p, into `survivors`.
    fn filter(&mut self, logits: &[f32], params: &SamplingParams) -> Result<(), SamplingError> {
        let divisor = params.divisor();
        // x / 1 is x exactly, so the common temperature skips the copy.
        let values: &[f32] = if divisor == 1.0 {
            logits
        } else {
            self.scaled.clear();
            self.scaled.extend(logits.iter().map(|l| l / divisor));
            &self.scaled
        };
        check_logits(values)?;
        let survivors = &mut self.survivors;
        match params.top_k {
            k if k == 0 || k >= values.len() => survivors.collect(values, f32::NEG_INFINITY),
            k => survivors.top_k(values, k),
        }
        if params.top_p < 1.0 {
            survivors.nucleus(params.top_p);
        }
        Ok(())
    }
}

/// The entries of a row that survive filtering, and the filters' scratch.
#[derive(Default)]
struct Survivors {
    /// Indices, ascending.
    kept: Vec<usize>,
    /// Their logits after temperature (then, for the draw, their probabilities).
    weights: Vec<f32>,
    /// Scratch for top-k's selections.
    selection: Vec<f32>,
    /// Top-p's ranking of the survivors (positions in `kept`), their exponentials in that
    /// order, and which positions it removes.
    order: Vec<usize>,
    exps: Vec<f32>,
    removed: Vec<bool>,
}

impl Survivors {
    /// The entries of `values` at or above `floor` that are not −∞, in vocabulary order.
    fn collect(&mut self, values: &[f32], floor: f32) {
        // A bit mask per chunk (the comparisons vectorise), then one step per entry that
        // passes; the values are gathered after.
        const CHUNK: usize = 16;
        let passes = |v: f32| v >= floor && v > f32::NEG_INFINITY;
        self.kept.clear();
        for (c, chunk) in values.chunks(CHUNK).enumerate() {
            let mut mask = 0u32;
            for (j, &v) in chunk.iter().enumerate() {
                mask |= u32::from(passes(v)) << j;
            }
            self.kept.extend(std::iter::from_fn(|| {
                let j = mask.trailing_zeros() as usize;
                mask &= mask.checked_sub(1)?;
                Some(c * CHUNK + j)
            }));
        }
        self.weights.clear();
        self.weights.extend(self.kept.iter().map(|&i| values[i]));
    }

    /// Top-k as upstream: the entries at or above the `k`-th largest (`k` is below the
    /// row's length), so ties with it survive; with fewer than `k` finite entries, all of
    /// them.
    ///
    /// Selecting the `k`-th largest over the whole row would cost most of a row's sampling,
    /// so the selection runs on the entries at or above a floor estimated from a sample
    /// ([`estimated_floor`]): every entry at or above the true threshold is at or above a
    /// lower floor, so the result is exact whenever at least `k` entries pass; when fewer
    /// do, it starts again from every entry. For top-k 2000 of 16384 about a fifth passes.
    fn top_k(&mut self, values: &[f32], k: usize) {
        let floor = estimated_floor(values, k, &mut self.selection);
        self.collect(values, floor);
        if self.kept.len() < k && floor > f32::NEG_INFINITY {
            self.collect(values, f32::NEG_INFINITY);
        }
        if self.kept.len() <= k {
            return;
        }
        self.selection.clear();
        self.selection.extend_from_slice(&self.weights);
        let threshold = *self
            .selection
            .select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a))
            .1;
        retain(&mut self.kept, &mut self.weights, |_, w| w >= threshold);
    }

    /// Nucleus filtering as upstream: sort descending, softmax, cumulative sum, mark entries
    /// whose cumulative probability exceeds `p`, shift the marks right by one (keeping the
    /// first entry past the threshold, and always the top one), and drop the marked.
    ///
    /// Only survivors are ranked: removed entries have probability 0, would sort last and
    /// cannot change the outcome. Ties rank by ascending index. The cumulative sum
    /// accumulates in f64 and is compared in f32, as PyTorch's CPU `cumsum` does.
    fn nucleus(&mut self, p: f32) {
        let weights = &self.weights;
        // Positions in `kept`, which ascends: ties between positions order as indices do.
        self.order.clear();
        self.order.extend(0..weights.len());
        self.order
            .sort_unstable_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
        let Some(&top) = self.order.first() else {
            return;
        };
        let max = weights[top];
        self.exps.clear();
        self.exps
            .extend(self.order.iter().map(|&j| (weights[j] - max).exp()));
        let sum: f32 = self.exps.iter().sum();
        self.removed.clear();
        self.removed.resize(weights.len(), false);
        let mut cumulative = 0.0f64;
        let mut previous_exceeds = false;
        for (&j, &e) in self.order.iter().zip(&self.exps) {
            cumulative += f64::from(e / sum);
            self.removed[j] = previous_exceeds;
            previous_exceeds = (cumulative as f32) > p;
        }
        let removed = &self.removed;
        retain(&mut self.kept, &mut self.weights, |j, _| !removed[j]);
    }
}

/// Keeps the survivors (indices `kept`, values `weights`) for which `keep(position,
/// value)` holds, in order.
fn retain(kept: &mut Vec<usize>, weights: &mut Vec<f32>, mut keep: impl FnMut(usize, f32) -> bool) {
    let mut survivors = 0;
    for j in 0..kept.len() {
        if keep(j, weights[j]) {
            kept[survivors] = kept[j];
            weights[survivors] = weights[j];
            survivors += 1;
        }
    }
    kept.truncate(survivors);
    weights.truncate(survivors);
}

/// Samples every row of a `(batch, positions, vocab)` block into `(batch, positions)` tokens;
/// row `b` draws from `rngs[b]`, positions in order, so each image's stream is used the same
/// way whatever else is in the batch.
///
/// The uniforms are drawn first, in that order; the rows are then filtered and drawn on
/// several threads (they are independent once their uniform is known).
pub fn sample_block<R: Rng>(
    logits: &[f32],
    vocab: usize,
    params: &SamplingParams,
    rngs: &mut [R],
    tokens: &mut [u32],
) -> Result<(), SamplingError> {
    if vocab == 0 {
        return Err(SamplingError::EmptyVocabulary);
    }
    let expected = tokens.len().saturating_mul(vocab);
    if logits.len() != expected {
        return Err(SamplingError::LengthMismatch {
            what: "logit block",
            expected,
            got: logits.len(),
        });
    }
    let images = rngs.len();
    if images == 0 || !tokens.len().is_multiple_of(images) {
        return Err(SamplingError::RowsPerImage {
            rows: tokens.len(),
            images,
        });
    }
    params.validate()?;
    let positions = tokens.len() / images;
    let uniforms: Vec<Option<f64>> = (0..tokens.len())
        .map(|row| (!params.greedy).then(|| rngs[row / positions].random()))
        .collect();
    let rows = tokens.len();
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows)
        .min(expected / MIN_VALUES_PER_THREAD)
        .max(1);
    let rows_per_thread = rows.div_ceil(threads);
    let sample_rows = |logits: &[f32], tokens: &mut [u32], uniforms: &[Option<f64>]| {
        let mut sampler = RowSampler::default();
        for ((row, token), &u) in logits.chunks_exact(vocab).zip(tokens).zip(uniforms) {
            *token = sampler.sample(row, params, u)?;
        }
        Ok(())
    };
    if threads == 1 {
        return sample_rows(logits, tokens, &uniforms);
    }
    std::thread::scope(|scope| {
        let workers: Vec<_> = logits
            .chunks(rows_per_thread * vocab)
            .zip(tokens.chunks_mut(rows_per_thread))
            .zip(uniforms.chunks(rows_per_thread))
            .map(|((logits, tokens), uniforms)| {
                scope.spawn(move || sample_rows(logits, tokens, uniforms))
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|worker| worker.join().unwrap_or(Err(SamplingError::WorkerPanicked)))
    })
}

/// Below this many logits per thread, starting a thread costs more than it saves.
const MIN_VALUES_PER_THREAD: usize = 1 << 16;

/// Rejects NaN and +∞ (upstream's softmax would turn them into NaN and `multinomial` would
/// fail) and rows with nothing left to choose.
fn check_logits(logits: &[f32]) -> Result<(), SamplingError> {
    check_vocabulary(logits.len())?;
    // One pass without early exits (it vectorises); the culprit is looked up only on error.
    let (mut invalid, mut any_candidate) = (false, false);
    for &l in logits {
        invalid |= l.is_nan() | (l == f32::INFINITY);
        any_candidate |= l > f32::NEG_INFINITY;
    }
    if invalid {
        let (index, &value) = logits
            .iter()
            .enumerate()
            .find(|(_, l)| l.is_nan() || **l == f32::INFINITY)
            .expect("an invalid logit was seen");
        return Err(SamplingError::NonFiniteLogit { index, value });
    }
    if !any_candidate {
        return Err(SamplingError::NoCandidate);
    }
    Ok(())
}

/// Rejects vocabularies that are empty or whose indices do not fit u32 token ids.
fn check_vocabulary(len: usize) -> Result<(), SamplingError> {
    match len {
        0 => Err(SamplingError::EmptyVocabulary),
        len if u32::try_from(len - 1).is_err() => Err(SamplingError::VocabularyTooLarge(len)),
        _ => Ok(()),
    }
}

/// The first index of the largest logit.
fn greedy(logits: &[f32]) -> Result<u32, SamplingError> {
    check_logits(logits)?;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let first = logits.iter().position(|&l| l == max);
    index_to_token(first.expect("a checked row has a maximum"))
}

fn index_to_token(index: usize) -> Result<u32, SamplingError> {
    u32::try_from(index).map_err(|_| SamplingError::VocabularyTooLarge(index + 1))
}

/// Entries in the evenly spaced sample [`estimated_floor`] looks at.
const FLOOR_SAMPLE: usize = 512;

/// A value at or (most likely) a little below the `k`-th largest of `values`: the entry of
/// an evenly spaced sample whose rank there is somewhat higher than `k`'s share of the row.
/// −∞ (no floor) for rows too short to sample or a `k` too large to gain from one.
fn estimated_floor(values: &[f32], k: usize, scratch: &mut Vec<f32>) -> f32 {
    let n = values.len();
    if n < 8 * FLOOR_SAMPLE || 4 * k > n {
        return f32::NEG_INFINITY;
    }
    let step = n / FLOOR_SAMPLE;
    scratch.clear();
    scratch.extend((0..FLOOR_SAMPLE).map(|i| values[i * step]));
    // About `expected` sampled entries lie above the threshold; the margin (four standard
    // deviations and a little) makes a floor above it rare.
    let expected = k * FLOOR_SAMPLE / n;
    let rank = (expected + 4 * expected.isqrt() + 8).min(FLOOR_SAMPLE - 1);
    *scratch
        .select_nth_unstable_by(rank, |a, b| b.total_cmp(a))
        .1
}

/// Softmax in place over a non-empty row of logits, summed in order.
fn softmax(weights: &mut [f32]) {
    let max = weights.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for w in weights.iter_mut() {
        *w = (*w - max).exp();
        sum += *w;
    }
    weights.iter_mut().for_each(|w| *w /= sum);
}

/// Inverse-CDF draw over the probabilities `probs` of the tokens `kept`, in vocabulary order:
/// the first token whose cumulative probability exceeds `u` times the total. Zero-probability
/// tokens are never chosen; if rounding leaves the target at the very end, the last possible
/// token is taken.
fn draw(kept: &[usize], probs: &[f32], u: f64) -> Result<u32, SamplingError> {
    let total: f64 = probs.iter().map(|&p| f64::from(p)).sum();
    let target = u * total;
    let mut cumulative = 0.0f64;
    let mut last = None;
    for (&i, &p) in kept.iter().zip(probs) {
        if p > 0.0 {
            cumulative += f64::from(p);
            last = Some(i);
            if target < cumulative {
                return index_to_token(i);
            }
        }
    }
    last.map_or(Err(SamplingError::NoCandidate), index_to_token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            greedy: false,
        }
    }

    fn kept(logits: &[f32], p: &SamplingParams) -> Vec<usize> {
        let mut row = logits.to_vec();
        filter_logits(&mut row, p).unwrap();
        (0..row.len())
            .filter(|&i| row[i] > f32::NEG_INFINITY)
            .collect()
    }

    fn ln(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    #[test]
    fn top_k_keeps_ties_at_the_threshold() {
        let logits = [1.0, 3.0, 2.0, 2.0, 0.0, 2.0];
        assert_eq!(kept(&logits, &params(1.0, 2, 1.0)), [1, 2, 3, 5]);
        assert_eq!(kept(&logits, &params(1.0, 1, 1.0)), [1]);
        assert_eq!(kept(&logits, &params(1.0, 6, 1.0)), [0, 1, 2, 3, 4, 5]);
        assert_eq!(kept(&logits, &params(1.0, 100, 1.0)), [0, 1, 2, 3, 4, 5]);
        // Surviving logits are untouched (temperature 1).
        let mut row = logits.to_vec();
        filter_logits(&mut row, &params(1.0, 2, 1.0)).unwrap();
        assert_eq!(row[1], 3.0);
        assert_eq!(row[0], f32::NEG_INFINITY);
    }

    #[test]
    fn top_p_keeps_the_first_token_past_the_threshold() {
        // Sorted probabilities 0.5, 0.3, 0.15, 0.05: cumulative 0.5, 0.8, 0.95, 1.0.
        let logits = ln(&[0.15, 0.5, 0.05, 0.3]);
        // 0.8 is the first cumulative value above 0.6; its token (index 3) stays.
        assert_eq!(kept(&logits, &params(1.0, 0, 0.6)), [1, 3]);
        assert_eq!(kept(&logits, &params(1.0, 0, 0.9)), [0, 1, 3]);
        // The top token always stays.
        assert_eq!(kept(&logits, &params(1.0, 0, 0.1)), [1]);
        // top_k = 0 means no top-k at all, not "keep one".
        assert_eq!(kept(&logits, &params(1.0, 0, 0.99)), [0, 1, 2, 3]);
    }

    #[test]
    fn top_k_runs_before_top_p() {
        let logits = ln(&[0.4, 0.3, 0.2, 0.1]);
        let p = params(1.0, 2, 0.5);
        // Top-k first: {0, 1} renormalised to 0.57, 0.43, cumulative 0.57 > 0.5 already, so
        // only token 0 survives. Top-p first would keep {0, 1} (cumulative 0.4, 0.7).
        assert_eq!(kept(&logits, &p), [0]);
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(sample_row_with_uniform(&logits, &p, u), Ok(0));
        }
    }

    #[test]
    fn temperature_is_floored() {
        let logits = [1.0f32, 1.00001, -2.0];
        let mut row = logits.to_vec();
        filter_logits(&mut row, &params(0.0, 0, 1.0)).unwrap();
        let expected: Vec<f32> = logits.iter().map(|l| l / 1e-5).collect();
        assert_eq!(row, expected);
        assert!(row.iter().all(|l| l.is_finite()));
        // Temperature 0 is effectively greedy but never divides by zero.
        let sharp = [0.0f32, 1.0, 0.5];
        let mut rng = ImageRng::new(1, 0);
        for _ in 0..100 {
            let token = sample_row(&sharp, &params(0.0, 0, 1.0), &mut rng);
            assert_eq!(token, Ok(1));
        }
    }

    #[test]
    fn temperature_divides_logits() {
        let mut row = vec![2.0f32, -4.0];
        filter_logits(&mut row, &params(2.0, 0, 1.0)).unwrap();
        assert_eq!(row, [1.0, -2.0]);
    }

    #[test]
    fn greedy_takes_the_first_maximum_and_ignores_temperature() {
        let logits = [1.0f32, 5.0, 5.0, 2.0, f32::NEG_INFINITY];
        let mut rng = ImageRng::new(0, 0);
        for temperature in [0.0, 0.5, 1.0, 100.0] {
            let p = SamplingParams {
                temperature,
                top_k: 1,
                top_p: 0.5,
                greedy: true,
            };
            assert_eq!(sample_row(&logits, &p, &mut rng), Ok(1));
        }
    }

    #[test]
    fn draws_follow_inverse_cdf_in_vocabulary_order() {
        let logits = ln(&[0.25, 0.5, 0.25]);
        let p = SamplingParams::default();
        assert_eq!(sample_row_with_uniform(&logits, &p, 0.0), Ok(0));
        assert_eq!(sample_row_with_uniform(&logits, &p, 0.2), Ok(0));
        assert_eq!(sample_row_with_uniform(&logits, &p, 0.3), Ok(1));
        assert_eq!(sample_row_with_uniform(&logits, &p, 0.7), Ok(1));
        assert_eq!(sample_row_with_uniform(&logits, &p, 0.8), Ok(2));
        assert_eq!(
            sample_row_with_uniform(&logits, &p, 1.0 - f64::EPSILON),
            Ok(2)
        );
        // A cumulative boundary belongs to the next token: [0, 0.5) → 0, [0.5, 1) → 1.
        let even = [0.0f32, 0.0];
        assert_eq!(sample_row_with_uniform(&even, &p, 0.5), Ok(1));
        // A removed (−∞) token is never drawn, even at the edges.
        let masked = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        for u in [0.0, 0.5, 1.0 - f64::EPSILON] {
            assert_eq!(sample_row_with_uniform(&masked, &p, u), Ok(1));
        }
    }

    #[test]
    fn draws_follow_the_probabilities() {
        let probs = [0.1f32, 0.2, 0.3, 0.4];
        let logits = ln(&probs);
        let p = SamplingParams::default();
        let mut rng = ImageRng::new(12345, 0);
        let n = 20_000usize;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            let token = sample_row(&logits, &p, &mut rng).unwrap();
            counts[token as usize] += 1;
        }
        for (count, prob) in counts.iter().zip(probs) {
            let mean = n as f64 * f64::from(prob);
            let sigma = (mean * (1.0 - f64::from(prob))).sqrt();
            assert!(
                (*count as f64 - mean).abs() < 4.0 * sigma,
                "counts {counts:?} for {probs:?}"
            );
        }
    }

    #[test]
    fn streams_are_reproducible_per_image() {
        let logits: Vec<f32> = (0..64).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = params(1.0, 20, 0.95);
        let run = |seed: u64, image: u64| -> Vec<u32> {
            let mut rng = ImageRng::new(seed, image);
            (0..64)
                .map(|_| sample_row(&logits, &p, &mut rng).unwrap())
                .collect()
        };
        assert_eq!(run(7, 3), run(7, 3));
        assert_ne!(run(7, 3), run(7, 4));
        assert_ne!(run(7, 3), run(8, 3));
    }

    #[test]
    fn block_sampling_does_not_depend_on_the_batch() {
        let vocab = 16;
        let positions = 3;
        let row: Vec<f32> = (0..vocab).map(|i| (i % 5) as f32 * 0.2).collect();
        let image_tokens = |seed: u64, index: u64| -> Vec<u32> {
            let logits = row.repeat(positions);
            let mut tokens = vec![0; positions];
            let mut rngs = [ImageRng::new(seed, index)];
            sample_block(
                &logits,
                vocab,
                &SamplingParams::default(),
                &mut rngs,
                &mut tokens,
            )
            .unwrap();
            tokens
        };
        let logits = row.repeat(2 * positions);
        let mut tokens = vec![0; 2 * positions];
        let mut rngs = [ImageRng::new(9, 5), ImageRng::new(9, 6)];
        sample_block(
            &logits,
            vocab,
            &SamplingParams::default(),
            &mut rngs,
            &mut tokens,
        )
        .unwrap();
        assert_eq!(tokens[..positions], image_tokens(9, 5)[..]);
        assert_eq!(tokens[positions..], image_tokens(9, 6)[..]);
    }

    /// A block big enough to be split across threads samples exactly what row-by-row
    /// sampling with the same streams does, for every mode.
    #[test]
    fn threaded_blocks_equal_row_by_row_sampling() {
        let (vocab, images, positions) = (8192, 3, 7);
        let rows = images * positions;
        assert!(rows * vocab >= 2 * MIN_VALUES_PER_THREAD);
        let logits: Vec<f32> = (0..rows * vocab)
            .map(|i| ((i * 7919) % 1009) as f32 * 0.01)
            .collect();
        for p in [
            params(1.0, 0, 1.0),
            params(0.7, 50, 1.0),
            params(1.0, 200, 0.8),
            SamplingParams {
                greedy: true,
                ..SamplingParams::default()
            },
        ] {
            let mut rngs: Vec<ImageRng> = (0..images as u64).map(|i| ImageRng::new(3, i)).collect();
            let mut tokens = vec![0; rows];
            sample_block(&logits, vocab, &p, &mut rngs, &mut tokens).unwrap();
            let mut rngs: Vec<ImageRng> = (0..images as u64).map(|i| ImageRng::new(3, i)).collect();
            let one_by_one: Vec<u32> = logits
                .chunks_exact(vocab)
                .enumerate()
                .map(|(row, values)| sample_row(values, &p, &mut rngs[row / positions]).unwrap())
                .collect();
            assert_eq!(tokens, one_by_one, "{p:?}");
        }
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        for t in [-0.5, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                params(t, 0, 1.0).validate(),
                Err(SamplingError::InvalidTemperature(_))
            ));
        }
        for top_p in [0.0, -0.1, 1.5, f32::NAN] {
            assert!(matches!(
                params(1.0, 0, top_p).validate(),
                Err(SamplingError::InvalidTopP(_))
            ));
        }
        assert_eq!(params(0.0, 5, 1.0).validate(), Ok(()));
        let mut rng = ImageRng::new(0, 0);
        assert!(matches!(
            sample_row(&[1.0], &params(-1.0, 0, 1.0), &mut rng),
            Err(SamplingError::InvalidTemperature(_))
        ));
    }

    #[test]
    fn invalid_rows_are_rejected() {
        let p = SamplingParams::default();
        let mut rng = ImageRng::new(0, 0);
        assert_eq!(
            sample_row(&[], &p, &mut rng),
            Err(SamplingError::EmptyVocabulary)
        );
        assert!(matches!(
            sample_row(&[0.0, f32::NAN], &p, &mut rng),
            Err(SamplingError::NonFiniteLogit { index: 1, .. })
        ));
        assert!(matches!(
            sample_row(&[f32::INFINITY, 0.0], &p, &mut rng),
            Err(SamplingError::NonFiniteLogit { index: 0, .. })
        ));
        assert_eq!(
            sample_row(&[f32::NEG_INFINITY; 3], &p, &mut rng),
            Err(SamplingError::NoCandidate)
        );
        let greedy = SamplingParams { greedy: true, ..p };
        assert!(matches!(
            sample_row(&[f32::NAN], &greedy, &mut rng),
            Err(SamplingError::NonFiniteLogit { .. })
        ));
        assert_eq!(
            sample_row_with_uniform(&[0.0], &p, 1.0),
            Err(SamplingError::InvalidUniform(1.0))
        );
        let mut tokens = [0u32; 4];
        assert!(matches!(
            sample_block(
                &[0.0; 8],
                2,
                &p,
                &mut [rng.clone(), rng.clone(), rng.clone()],
                &mut tokens
            ),
            Err(SamplingError::RowsPerImage { rows: 4, images: 3 })
        ));
        assert!(matches!(
            sample_block(&[0.0; 7], 2, &p, &mut [rng.clone()], &mut tokens),
            Err(SamplingError::LengthMismatch { .. })
        ));
    }

    /// What top-k keeps, by a full sort: the finite entries at or above the k-th largest
    /// in `total_cmp` order (all finite entries when `k` reaches past them).
    fn top_k_by_sort(values: &[f32], k: usize) -> Vec<usize> {
        let mut sorted = values.to_vec();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let threshold = sorted[k.min(values.len()) - 1];
        (0..values.len())
            .filter(|&i| values[i] > f32::NEG_INFINITY && values[i] >= threshold)
            .collect()
    }

    /// Rows long enough for the estimated floor, where the evenly spaced sample sees only
    /// the largest entries (too few then pass: every entry is selected from) or only the
    /// smallest (most of the row passes).
    #[test]
    fn top_k_is_exact_when_the_sample_misleads() {
        let n = 16384;
        let step = n / FLOOR_SAMPLE;
        for sampled_high in [true, false] {
            let row: Vec<f32> = (0..n)
                .map(|i| {
                    let noise = ((i * 7919) % 997) as f32 * 1e-3;
                    if (i % step == 0) == sampled_high {
                        10.0 + noise
                    } else {
                        noise
                    }
                })
                .collect();
            for k in [1, 50, 511, 512, 513, 2000, 4096] {
                let expected = top_k_by_sort(&row, k);
                assert_eq!(kept(&row, &params(1.0, k, 1.0)), expected, "k {k}");
            }
        }
    }

    proptest::proptest! {
        /// Ties, signed zeros and −∞ included, at sizes that take the estimated floor and
        /// sizes that do not: top-k keeps what a full sort says.
        #[test]
        fn top_k_keeps_what_a_full_sort_says(
            n in 1usize..20_000,
            k_fraction in 0.0f64..1.2,
            seed: u64,
            palette in 1usize..40,
        ) {
            let mut state = seed;
            let mut next = || {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (state >> 33) as usize
            };
            // A small palette makes ties common; it holds both zeros and −∞, and at least
            // one finite entry.
            let choices: Vec<f32> = (0..palette)
                .map(|i| match i {
                    0 => 1.5,
                    1 => f32::NEG_INFINITY,
                    2 => -0.0,
                    3 => 0.0,
                    _ => (next() % 2001) as f32 / 100.0 - 10.0,
                })
                .collect();
            let mut row: Vec<f32> = (0..n).map(|_| choices[next() % palette]).collect();
            row[next() % n] = 1.5;
            let k = ((k_fraction * n as f64) as usize).max(1);
            proptest::prop_assert_eq!(kept(&row, &params(1.0, k, 1.0)), top_k_by_sort(&row, k));
        }
    }
}
