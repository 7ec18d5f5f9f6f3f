//! The wavefront scheduler: which cells each model call feeds and produces, and how the
//! dimension heads' logits are merged into one distribution per produced cell.
//!
//! NAR generates a latent grid one *wavefront* at a time. Wavefront `k` is the set of cells
//! whose coordinates sum to `k`. Every dimension head predicts the neighbour at +1 along its
//! axis, so feeding wavefront `k − 1` yields predictions for exactly the cells of wavefront
//! `k`; a cell reached by several heads gets the mean of their logits. The image model's
//! first/middle/last rule (NAR-SPEC §2, with `accept_first_last` flipping at `t = n`) and the
//! video model's three-head rule (§7) are both this one rule on a 2-D and a 3-D grid: a
//! prediction that would leave the grid is simply dropped.
//!
//! Call 0 is the prefill: its single input is the last condition position, and every head's
//! prediction there lands on the origin. Call `k ≥ 1` feeds wavefront `k − 1` and produces
//! wavefront `k`, so a grid with extents `d₀ … d_{m−1}` takes `Σdᵢ − m + 1` calls
//! (`2n − 1` for an `n × n` image, `T + H + W − 2` for video).
//!
//! Within a wavefront, cells are listed in lexicographic order of their coordinates (row
//! ascending for images; `t`, then `h` ascending for video), as upstream orders its inputs
//! and outputs. A cell's raster index is the row-major offset `((t·H) + h)·W + w`.

use thiserror::Error;

/// The order cells are generated in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// NAR: one wavefront per call, every dimension head contributing.
    Nar,
    /// LlamaGen's raster order: one cell per call ([`WavefrontPlan::raster`]).
    Raster,
}

impl Order {
    pub fn name(self) -> &'static str {
        match self {
            Order::Nar => "nar",
            Order::Raster => "raster",
        }
    }

    /// Model calls to generate `grid` in this order: one per wavefront (the extents' sum
    /// minus the axes plus one), or one per cell.
    pub fn calls(self, grid: &[usize]) -> usize {
        match self {
            Order::Nar => (grid.iter().sum::<usize>() + 1).saturating_sub(grid.len()),
            Order::Raster => grid.iter().product(),
        }
    }
}

/// Largest grid a plan accepts (1024 times the largest upstream grid): the plan lists every
/// cell, so an absurd grid from a corrupt manifest must be an error, not an allocation abort.
pub const MAX_CELLS: usize = 1 << 20;

/// Why a plan could not be built or applied.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    #[error("the latent grid has no dimensions")]
    EmptyGrid,
    #[error("latent grid axis {axis} has extent 0")]
    ZeroExtent { axis: usize },
    #[error("the latent grid {grid:?} has more than {MAX_CELLS} cells")]
    GridTooLarge { grid: Vec<usize> },
    #[error("no dimension heads were given")]
    NoHeads,
    #[error("head {head} predicts along axis {axis}, but the grid has only {ndim} axes")]
    AxisOutOfRange {
        head: usize,
        axis: usize,
        ndim: usize,
    },
    #[error("heads {first} and {second} both predict along axis {axis}")]
    DuplicateAxis {
        axis: usize,
        first: usize,
        second: usize,
    },
    #[error(
        "grid axis {axis} has extent {extent} but no head predicts along it, \
         so its cells past index 0 could never be generated"
    )]
    UncoveredAxis { axis: usize, extent: usize },
    #[error("expected logits from {expected} heads, got {got}")]
    HeadCount { expected: usize, got: usize },
    #[error("{what} has {got} values, expected {expected}")]
    LengthMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("a buffer of shape {shape:?} has more elements than fit in memory indices")]
    ShapeTooLarge { shape: [usize; 3] },
}

/// One latent-grid cell: its coordinates and its raster (row-major) index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cell {
    coords: Box<[usize]>,
    raster: usize,
}

impl Cell {
    /// Coordinates, one per grid axis (`[r, c]` for images, `[t, h, w]` for video).
    pub fn coords(&self) -> &[usize] {
        &self.coords
    }

    /// Row-major index into the flattened grid; the absolute sequence position of the cell
    /// is the condition length plus this.
    pub fn raster(&self) -> usize {
        self.raster
    }
}

/// One head prediction that reaches a produced cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Contribution {
    /// Index of the input (position within the call's fed cells; 0 for the prefill).
    pub input: usize,
    /// Index of the head, in the order the plan was given `head_axes`.
    pub head: usize,
}

/// A cell produced by a call, with the predictions averaged into its logits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducedCell {
    cell: Cell,
    contributions: Box<[Contribution]>,
}

impl ProducedCell {
    /// The cell this output position fills.
    pub fn cell(&self) -> &Cell {
        &self.cell
    }

    /// The predictions that reach the cell, in summation order (ascending input index, as
    /// upstream accumulates them; the order matters for rounding). Never empty.
    pub fn contributions(&self) -> &[Contribution] {
        &self.contributions
    }
}

/// One model call: what it feeds, what it produces, and how to assemble its logits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    index: usize,
    fed: Vec<Cell>,
    produced: Vec<ProducedCell>,
    heads: usize,
    cells: usize,
    tokens_before: usize,
}

impl Call {
    /// Position of this call in the plan (0 = prefill).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Whether this is the prefill, whose input is the condition rather than grid cells.
    pub fn is_prefill(&self) -> bool {
        self.index == 0
    }

    /// Grid cells fed to the model, in input order (empty for the prefill).
    pub fn fed(&self) -> &[Cell] {
        &self.fed
    }

    /// Number of input positions whose head logits `assemble` expects: the fed cells, or
    /// the single last condition position for the prefill.
    pub fn input_len(&self) -> usize {
        self.fed.len().max(1)
    }

    /// Cells produced by this call, in output order (lexicographic).
    pub fn produced(&self) -> &[ProducedCell] {
        &self.produced
    }

    /// Number of tokens this call produces per batch row.
    pub fn output_len(&self) -> usize {
        self.produced.len()
    }

    /// Number of tokens produced by all earlier calls (0 for the prefill): the counter that
    /// upstream's `cfg_interval` compares against.
    pub fn tokens_before(&self) -> usize {
        self.tokens_before
    }

    /// Merges the heads' logits into one row per produced cell.
    ///
    /// `heads[h]` holds head `h`'s logits laid out `(rows, input_len, vocab)`, `rows` being the
    /// model batch (both guidance halves included). Writes `(rows, output_len, vocab)` into
    /// `out`: for each produced cell the sum of its contributions in order, then divided by
    /// their count, all in f32: the image model's averaging exactly; upstream's video model
    /// averages in bf16, which float32 exports do not reproduce (their logits are float32).
    pub fn assemble(
        &self,
        heads: &[&[f32]],
        rows: usize,
        vocab: usize,
        out: &mut [f32],
    ) -> Result<(), PlanError> {
        if heads.len() != self.heads {
            return Err(PlanError::HeadCount {
                expected: self.heads,
                got: heads.len(),
            });
        }
        let s_in = self.input_len();
        let s_out = self.output_len();
        let in_len = volume([rows, s_in, vocab])?;
        let out_len = volume([rows, s_out, vocab])?;
        for head in heads {
            if head.len() != in_len {
                return Err(PlanError::LengthMismatch {
                    what: "head logits",
                    expected: in_len,
                    got: head.len(),
                });
            }
        }
        if out.len() != out_len {
            return Err(PlanError::LengthMismatch {
                what: "assembled logits buffer",
                expected: out_len,
                got: out.len(),
            });
        }
        if vocab == 0 {
            return Ok(());
        }
        for (row, out_row) in out.chunks_exact_mut(s_out * vocab).enumerate() {
            for (target, dst) in self.produced.iter().zip(out_row.chunks_exact_mut(vocab)) {
                for (n, c) in target.contributions.iter().enumerate() {
                    let start = (row * s_in + c.input) * vocab;
                    let src = &heads[c.head][start..start + vocab];
                    if n == 0 {
                        dst.copy_from_slice(src);
                    } else {
                        dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
                    }
                }
                // Division by 1 is exact, so single contributions skip it.
                if target.contributions.len() > 1 {
                    let count = target.contributions.len() as f32;
                    dst.iter_mut().for_each(|d| *d /= count);
                }
            }
        }
        Ok(())
    }

    /// Writes this call's tokens into a raster-ordered token buffer.
    ///
    /// `tokens` is `(batch, output_len)` in output order; `grid_tokens` is `(batch, cells)` in
    /// raster order, the layout of the final result (upstream's row lists concatenated).
    pub fn place<T: Copy>(
        &self,
        tokens: &[T],
        batch: usize,
        grid_tokens: &mut [T],
    ) -> Result<(), PlanError> {
        let s_out = self.output_len();
        let expected = volume([batch, s_out, 1])?;
        if tokens.len() != expected {
            return Err(PlanError::LengthMismatch {
                what: "call tokens",
                expected,
                got: tokens.len(),
            });
        }
        let expected = volume([batch, self.cells, 1])?;
        if grid_tokens.len() != expected {
            return Err(PlanError::LengthMismatch {
                what: "grid token buffer",
                expected,
                got: grid_tokens.len(),
            });
        }
        // `cells` ≥ 1 by construction (every extent is ≥ 1), so the chunks are non-empty.
        for (row, grid_row) in grid_tokens.chunks_exact_mut(self.cells).enumerate() {
            let row_tokens = &tokens[row * s_out..(row + 1) * s_out];
            for (target, &token) in self.produced.iter().zip(row_tokens) {
                grid_row[target.cell.raster] = token;
            }
        }
        Ok(())
    }
}

/// The full sequence of model calls that generates one latent grid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WavefrontPlan {
    grid: Vec<usize>,
    head_axes: Vec<usize>,
    calls: Vec<Call>,
}

impl WavefrontPlan {
    /// Plans the generation of `grid` (extents, e.g. `[rows, cols]` or `[T, H, W]`) with
    /// dimension heads where head `h` predicts the neighbour at +1 along `head_axes[h]`
    /// (image: `[1, 0]` = right, below; video: `[2, 0, 1]` = right, next frame, down, the
    /// R, B, D of upstream).
    ///
    /// The head order fixes only the prefill's summation order: upstream's video prefill
    /// sums R + B + D.
    pub fn new(grid: &[usize], head_axes: &[usize]) -> Result<Self, PlanError> {
        let (raster_cells, strides) = raster_cells(grid)?;
        validate_heads(grid, head_axes)?;
        let cells = raster_cells.len();
        // Σ(dᵢ − 1) cannot overflow once the product fits.
        let last_wave: usize = grid.iter().map(|d| d - 1).sum();

        // Raster order is lexicographic order, so bucketing cells by raster index lists each
        // wavefront in the order upstream uses.
        let mut waves: Vec<Vec<Cell>> = vec![Vec::new(); last_wave + 1];
        // `slot[raster]` is the cell's position within its wavefront.
        let mut slot = Vec::with_capacity(cells);
        for cell in raster_cells {
            let wave = &mut waves[cell.coords.iter().sum::<usize>()];
            slot.push(wave.len());
            wave.push(cell);
        }

        let origin = waves[0].clone();
        let mut calls = Vec::with_capacity(last_wave + 1);
        calls.push(Call {
            index: 0,
            fed: Vec::new(),
            produced: origin
                .into_iter()
                .map(|cell| ProducedCell {
                    cell,
                    contributions: (0..head_axes.len())
                        .map(|head| Contribution { input: 0, head })
                        .collect(),
                })
                .collect(),
            heads: head_axes.len(),
            cells,
            tokens_before: 0,
        });
        let mut tokens_before = 1;
        for k in 1..=last_wave {
            let fed = waves[k - 1].clone();
            let mut contributions = vec![Vec::new(); waves[k].len()];
            for (input, cell) in fed.iter().enumerate() {
                for (head, &axis) in head_axes.iter().enumerate() {
                    if cell.coords[axis] + 1 < grid[axis] {
                        let target = cell.raster + strides[axis];
                        contributions[slot[target]].push(Contribution { input, head });
                    }
                }
            }
            let produced = waves[k]
                .iter()
                .cloned()
                .zip(contributions)
                .map(|(cell, c)| ProducedCell {
                    cell,
                    contributions: c.into_boxed_slice(),
                })
                .collect::<Vec<_>>();
            let produced_len = produced.len();
            calls.push(Call {
                index: k,
                fed,
                produced,
                heads: head_axes.len(),
                cells,
                tokens_before,
            });
            tokens_before += produced_len;
        }
        Ok(Self {
            grid: grid.to_vec(),
            head_axes: head_axes.to_vec(),
            calls,
        })
    }

    /// LlamaGen's raster order over the same grid: one cell per call, each predicted by the
    /// single head that reads the trunk at the previous position (the right head, whose
    /// axis is `head_axis`; at a row's end it predicts the next row's first cell, as the
    /// next position in the sequence). Feeding one token per call with the cache appended
    /// makes the attention causal, as LlamaGen's mask is.
    pub fn raster(grid: &[usize], head_axis: usize) -> Result<Self, PlanError> {
        let (raster_cells, _) = raster_cells(grid)?;
        if head_axis >= grid.len() {
            return Err(PlanError::AxisOutOfRange {
                head: 0,
                axis: head_axis,
                ndim: grid.len(),
            });
        }
        let cells = raster_cells.len();
        let only_head = || Box::new([Contribution { input: 0, head: 0 }]) as Box<[Contribution]>;
        let mut calls = Vec::with_capacity(cells);
        let mut previous: Option<Cell> = None;
        for (index, cell) in raster_cells.into_iter().enumerate() {
            calls.push(Call {
                index,
                fed: previous.take().into_iter().collect(),
                produced: vec![ProducedCell {
                    cell: cell.clone(),
                    contributions: only_head(),
                }],
                heads: 1,
                cells,
                tokens_before: index,
            });
            previous = Some(cell);
        }
        Ok(Self {
            grid: grid.to_vec(),
            head_axes: vec![head_axis],
            calls,
        })
    }

    /// Grid extents the plan was built for.
    pub fn grid(&self) -> &[usize] {
        &self.grid
    }

    /// Axis each head predicts along, in head order.
    pub fn head_axes(&self) -> &[usize] {
        &self.head_axes
    }

    /// Number of cells (tokens per image).
    pub fn cell_count(&self) -> usize {
        self.grid.iter().product()
    }

    /// The model calls in order; `calls()[0]` is the prefill.
    pub fn calls(&self) -> &[Call] {
        &self.calls
    }

    /// The widest wavefront fed to the model, which bounds the step graph's sequence
    /// dimension (16 / 24 / 32 for n = 16 / 24 / 32; 60 for the (4, 16, 16) video grid).
    pub fn max_input_len(&self) -> usize {
        self.calls.iter().map(Call::input_len).max().unwrap_or(1)
    }
}

/// Every cell in raster (lexicographic) order, and the grid's row-major strides.
fn raster_cells(grid: &[usize]) -> Result<(Vec<Cell>, Vec<usize>), PlanError> {
    if grid.is_empty() {
        return Err(PlanError::EmptyGrid);
    }
    if let Some(axis) = grid.iter().position(|&d| d == 0) {
        return Err(PlanError::ZeroExtent { axis });
    }
    let cells = grid
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&cells| cells <= MAX_CELLS)
        .ok_or_else(|| PlanError::GridTooLarge {
            grid: grid.to_vec(),
        })?;
    let mut strides = vec![1usize; grid.len()];
    for axis in (0..grid.len() - 1).rev() {
        strides[axis] = strides[axis + 1] * grid[axis + 1];
    }
    let cells = (0..cells)
        .map(|raster| Cell {
            coords: strides
                .iter()
                .zip(grid)
                .map(|(&stride, &extent)| (raster / stride) % extent)
                .collect(),
            raster,
        })
        .collect();
    Ok((cells, strides))
}

/// Each head has its own axis of the grid, and every axis longer than 1 has a head.
fn validate_heads(grid: &[usize], head_axes: &[usize]) -> Result<(), PlanError> {
    if head_axes.is_empty() {
        return Err(PlanError::NoHeads);
    }
    let ndim = grid.len();
    let mut head_of_axis: Vec<Option<usize>> = vec![None; ndim];
    for (head, &axis) in head_axes.iter().enumerate() {
        let Some(owner) = head_of_axis.get_mut(axis) else {
            return Err(PlanError::AxisOutOfRange { head, axis, ndim });
        };
        if let Some(first) = *owner {
            return Err(PlanError::DuplicateAxis {
                axis,
                first,
                second: head,
            });
        }
        *owner = Some(head);
    }
    for (axis, (&extent, owner)) in grid.iter().zip(&head_of_axis).enumerate() {
        if extent > 1 && owner.is_none() {
            return Err(PlanError::UncoveredAxis { axis, extent });
        }
    }
    Ok(())
}

/// Element count of a 3-D buffer, or an error if it overflows `usize`.
fn volume(shape: [usize; 3]) -> Result<usize, PlanError> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or(PlanError::ShapeTooLarge { shape })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const IMAGE_HEADS: [usize; 2] = [1, 0];
    /// Upstream's R, B, D (as the video manifest lists them).
    const VIDEO_HEADS: [usize; 3] = [2, 0, 1];

    /// Every cell of `grid` in lexicographic order, by an odometer independent of the plan.
    fn all_coords(grid: &[usize]) -> Vec<Vec<usize>> {
        let mut out = Vec::new();
        let mut c = vec![0; grid.len()];
        loop {
            out.push(c.clone());
            let mut axis = grid.len();
            loop {
                if axis == 0 {
                    return out;
                }
                axis -= 1;
                c[axis] += 1;
                if c[axis] < grid[axis] {
                    break;
                }
                c[axis] = 0;
            }
        }
    }

    fn raster_of(grid: &[usize], coords: &[usize]) -> usize {
        coords.iter().zip(grid).fold(0, |acc, (&c, &d)| acc * d + c)
    }

    fn wave(grid: &[usize], k: usize) -> Vec<Vec<usize>> {
        all_coords(grid)
            .into_iter()
            .filter(|c| c.iter().sum::<usize>() == k)
            .collect()
    }

    /// Deterministic, distinct-ish logits so that sums in different orders differ.
    fn fake_logits(seed: u64, len: usize) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 40.0
            })
            .collect()
    }

    fn head_logits(
        call: &Call,
        heads: usize,
        rows: usize,
        vocab: usize,
        seed: u64,
    ) -> Vec<Vec<f32>> {
        (0..heads)
            .map(|h| {
                fake_logits(
                    seed ^ ((call.index() as u64) << 20) ^ ((h as u64) << 40),
                    rows * call.input_len() * vocab,
                )
            })
            .collect()
    }

    fn assembled(call: &Call, logits: &[Vec<f32>], rows: usize, vocab: usize) -> Vec<f32> {
        let refs: Vec<&[f32]> = logits.iter().map(Vec::as_slice).collect();
        let mut out = vec![f32::NAN; rows * call.output_len() * vocab];
        call.assemble(&refs, rows, vocab, &mut out).unwrap();
        out
    }

    /// Brute force from the definition: each cell of wavefront k averages the heads of the
    /// fed cells at −1 along each head axis, summed in input order.
    fn brute_force(
        grid: &[usize],
        head_axes: &[usize],
        k: usize,
        logits: &[Vec<f32>],
        rows: usize,
        vocab: usize,
    ) -> Vec<f32> {
        let targets = wave(grid, k);
        let mut out = Vec::new();
        for row in 0..rows {
            for target in &targets {
                let mut acc: Vec<f32> = Vec::new();
                let mut count = 0usize;
                if k == 0 {
                    for head in logits {
                        let src = &head[row * vocab..(row + 1) * vocab];
                        acc = if acc.is_empty() {
                            src.to_vec()
                        } else {
                            acc.iter().zip(src).map(|(a, s)| a + s).collect()
                        };
                        count += 1;
                    }
                } else {
                    let inputs = wave(grid, k - 1);
                    for (i, input) in inputs.iter().enumerate() {
                        for (h, &axis) in head_axes.iter().enumerate() {
                            let mut moved = input.clone();
                            moved[axis] += 1;
                            if &moved == target {
                                let start = (row * inputs.len() + i) * vocab;
                                let src = &logits[h][start..start + vocab];
                                acc = if acc.is_empty() {
                                    src.to_vec()
                                } else {
                                    acc.iter().zip(src).map(|(a, s)| a + s).collect()
                                };
                                count += 1;
                            }
                        }
                    }
                }
                assert!(count > 0, "nothing predicts {target:?}");
                if count > 1 {
                    acc.iter_mut().for_each(|a| *a /= count as f32);
                }
                out.extend(acc);
            }
        }
        out
    }

    /// NAR-SPEC §2 literally, for an n × n image with heads [R, B]: prefill (R + B)/2; step t
    /// gives first = R₀, middleⱼ = (Bⱼ + Rⱼ₊₁)/2, last = B_{S−1}, first and last only while
    /// t < n.
    fn spec_2d(n: usize, t: usize, r: &[f32], b: &[f32], rows: usize, vocab: usize) -> Vec<f32> {
        let at = |x: &[f32], row: usize, s: usize, i: usize| -> Vec<f32> {
            x[(row * s + i) * vocab..(row * s + i + 1) * vocab].to_vec()
        };
        let avg = |x: Vec<f32>, y: Vec<f32>| -> Vec<f32> {
            x.iter().zip(&y).map(|(a, c)| (a + c) / 2.0).collect()
        };
        let mut out = Vec::new();
        for row in 0..rows {
            if t == 0 {
                out.extend(avg(at(r, row, 1, 0), at(b, row, 1, 0)));
                continue;
            }
            let s = t.min(2 * n - t);
            let accept_first_last = t < n;
            if accept_first_last {
                out.extend(at(r, row, s, 0));
            }
            for j in 0..s - 1 {
                out.extend(avg(at(b, row, s, j), at(r, row, s, j + 1)));
            }
            if accept_first_last {
                out.extend(at(b, row, s, s - 1));
            }
        }
        out
    }

    /// Structural properties every plan must satisfy.
    fn check_structure(grid: &[usize], head_axes: &[usize]) {
        let plan = WavefrontPlan::new(grid, head_axes).unwrap();
        let cells: usize = grid.iter().product();
        let calls = plan.calls();
        assert_eq!(calls.len(), grid.iter().sum::<usize>() - grid.len() + 1);
        assert_eq!(plan.cell_count(), cells);

        let mut produced_at = vec![None; cells];
        let mut tokens_before = 0;
        for (k, call) in calls.iter().enumerate() {
            assert_eq!(call.index(), k);
            assert_eq!(call.tokens_before(), tokens_before);
            tokens_before += call.output_len();
            // Fed cells: wavefront k − 1 in lexicographic order, each produced earlier.
            let expected_fed = if k == 0 {
                Vec::new()
            } else {
                wave(grid, k - 1)
            };
            let fed: Vec<Vec<usize>> = call.fed().iter().map(|c| c.coords().to_vec()).collect();
            assert_eq!(fed, expected_fed);
            for cell in call.fed() {
                assert_eq!(cell.raster(), raster_of(grid, cell.coords()));
                assert!(produced_at[cell.raster()].is_some_and(|p| p < k));
            }
            assert_eq!(call.input_len(), call.fed().len().max(1));
            // Produced cells: wavefront k, each once, after all of its predictors.
            let out: Vec<Vec<usize>> = call
                .produced()
                .iter()
                .map(|p| p.cell().coords().to_vec())
                .collect();
            assert_eq!(out, wave(grid, k));
            for p in call.produced() {
                let cell = p.cell();
                assert_eq!(cell.raster(), raster_of(grid, cell.coords()));
                assert!(
                    produced_at[cell.raster()].is_none(),
                    "{cell:?} produced twice"
                );
                produced_at[cell.raster()] = Some(k);
                let mut predecessors = 0;
                for &axis in head_axes {
                    if cell.coords()[axis] > 0 {
                        predecessors += 1;
                        let mut pred = cell.coords().to_vec();
                        pred[axis] -= 1;
                        let pred_raster = raster_of(grid, &pred);
                        assert!(produced_at[pred_raster].is_some_and(|q| q < k));
                        assert!(call.fed().iter().any(|f| f.raster() == pred_raster));
                    }
                }
                let contributions = p.contributions();
                assert!(!contributions.is_empty());
                if k == 0 {
                    assert_eq!(contributions.len(), head_axes.len());
                } else {
                    assert_eq!(contributions.len(), predecessors);
                    for c in contributions {
                        let mut moved = call.fed()[c.input].coords().to_vec();
                        moved[head_axes[c.head]] += 1;
                        assert_eq!(moved, cell.coords());
                    }
                    assert!(contributions.windows(2).all(|w| w[0].input < w[1].input));
                }
            }
        }
        assert!(produced_at.iter().all(Option::is_some));
        assert_eq!(tokens_before, cells);

        // Placement reassembles the raster order.
        let batch = 2;
        let mut grid_tokens = vec![usize::MAX; batch * cells];
        for call in calls {
            let tokens: Vec<usize> = (0..batch)
                .flat_map(|b| {
                    call.produced()
                        .iter()
                        .map(move |p| b * cells + p.cell().raster())
                })
                .collect();
            call.place(&tokens, batch, &mut grid_tokens).unwrap();
        }
        assert_eq!(grid_tokens, (0..batch * cells).collect::<Vec<_>>());
    }

    fn check_assembly(grid: &[usize], head_axes: &[usize], rows: usize, vocab: usize, seed: u64) {
        let plan = WavefrontPlan::new(grid, head_axes).unwrap();
        for (k, call) in plan.calls().iter().enumerate() {
            let logits = head_logits(call, head_axes.len(), rows, vocab, seed);
            let got = assembled(call, &logits, rows, vocab);
            let want = brute_force(grid, head_axes, k, &logits, rows, vocab);
            assert_eq!(got, want, "call {k} of {grid:?} heads {head_axes:?}");
            if grid.len() == 2 && grid[0] == grid[1] && head_axes == IMAGE_HEADS {
                let spec = spec_2d(grid[0], k, &logits[0], &logits[1], rows, vocab);
                assert_eq!(got, spec, "call {k} of {grid:?} vs NAR-SPEC §2");
            }
        }
    }

    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![Vec::new()];
        }
        let mut out = Vec::new();
        for p in permutations(n - 1) {
            for pos in 0..=p.len() {
                let mut q = p.clone();
                q.insert(pos, n - 1);
                out.push(q);
            }
        }
        out
    }

    #[test]
    fn every_small_grid_is_scheduled_correctly() {
        for h in 1..=7 {
            for w in 1..=9 {
                for axes in permutations(2) {
                    check_structure(&[h, w], &axes);
                    check_assembly(&[h, w], &axes, 2, 3, (h * 10 + w) as u64);
                }
            }
        }
        for t in 1..=3 {
            for h in 1..=4 {
                for w in 1..=5 {
                    for axes in permutations(3) {
                        check_structure(&[t, h, w], &axes);
                        check_assembly(&[t, h, w], &axes, 2, 2, (t * 100 + h * 10 + w) as u64);
                    }
                }
            }
        }
    }

    #[test]
    fn square_grids_match_the_spec_rule() {
        for n in 1..=16 {
            check_assembly(&[n, n], &IMAGE_HEADS, 1, 2, n as u64);
        }
    }

    fn grid_and_heads() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
        let two_d = (1usize..=7, 1usize..=9).prop_map(|(h, w)| vec![h, w]);
        let three_d = (1usize..=3, 1usize..=4, 1usize..=5).prop_map(|(t, h, w)| vec![t, h, w]);
        prop_oneof![two_d, three_d].prop_flat_map(|grid| {
            let perms = permutations(grid.len());
            (Just(grid), proptest::sample::select(perms))
        })
    }

    proptest! {
        #[test]
        fn plan_properties((grid, axes) in grid_and_heads()) {
            check_structure(&grid, &axes);
        }

        #[test]
        fn assembly_matches_references(
            (grid, axes) in grid_and_heads(),
            rows in 1usize..=4,
            vocab in 1usize..=5,
            seed in any::<u64>(),
        ) {
            check_assembly(&grid, &axes, rows, vocab, seed);
        }
    }

    #[test]
    fn spec_worked_example_3x3() {
        let plan = WavefrontPlan::new(&[3, 3], &IMAGE_HEADS).unwrap();
        let calls = plan.calls();
        assert_eq!(calls.len(), 5);
        let positions =
            |call: &Call| -> Vec<usize> { call.fed().iter().map(|c| 1 + c.raster()).collect() };
        // (produced coordinates, [(input, head)] in summation order)
        type Landing = (Vec<usize>, Vec<(usize, usize)>);
        let outputs = |call: &Call| -> Vec<Landing> {
            call.produced()
                .iter()
                .map(|p| {
                    (
                        p.cell().coords().to_vec(),
                        p.contributions()
                            .iter()
                            .map(|c| (c.input, c.head))
                            .collect(),
                    )
                })
                .collect()
        };
        const R: usize = 0;
        const B: usize = 1;

        assert!(calls[0].is_prefill());
        assert_eq!(calls[0].input_len(), 1);
        assert_eq!(outputs(&calls[0]), vec![(vec![0, 0], vec![(0, R), (0, B)])]);

        assert_eq!(positions(&calls[1]), vec![1]);
        assert_eq!(
            outputs(&calls[1]),
            vec![(vec![0, 1], vec![(0, R)]), (vec![1, 0], vec![(0, B)])]
        );

        assert_eq!(positions(&calls[2]), vec![2, 4]);
        assert_eq!(
            outputs(&calls[2]),
            vec![
                (vec![0, 2], vec![(0, R)]),
                (vec![1, 1], vec![(0, B), (1, R)]),
                (vec![2, 0], vec![(1, B)]),
            ]
        );

        // accept_first_last = false from t = n: R₀ and B₂ leave the grid.
        assert_eq!(positions(&calls[3]), vec![3, 5, 7]);
        assert_eq!(
            outputs(&calls[3]),
            vec![
                (vec![1, 2], vec![(0, B), (1, R)]),
                (vec![2, 1], vec![(1, B), (2, R)]),
            ]
        );

        assert_eq!(positions(&calls[4]), vec![6, 8]);
        assert_eq!(outputs(&calls[4]), vec![(vec![2, 2], vec![(0, B), (1, R)])]);

        // (2, 2) is never fed back.
        assert!(calls
            .iter()
            .all(|c| c.fed().iter().all(|f| f.raster() != 8)));
        assert_eq!(plan.max_input_len(), 3);

        // Numbers: step 2 with S = 2, vocab 1, one row.
        let r = [10.0, 20.0];
        let b = [1.0, 2.0];
        let mut out = [0.0; 3];
        calls[2].assemble(&[&r, &b], 1, 1, &mut out).unwrap();
        assert_eq!(out, [10.0, (1.0 + 20.0) / 2.0, 2.0]);
    }

    #[test]
    fn video_example_2x2x2() {
        const R: usize = 0;
        const B: usize = 1;
        const D: usize = 2;
        let plan = WavefrontPlan::new(&[2, 2, 2], &VIDEO_HEADS).unwrap();
        let calls = plan.calls();
        assert_eq!(calls.len(), 2 + 2 + 2 - 2);
        assert_eq!(Order::Nar.calls(&[2, 2, 2]), calls.len());

        // The prefill's one cell sums R + B + D, as upstream does.
        let prefill = &calls[0].produced()[0];
        let heads: Vec<usize> = prefill.contributions().iter().map(|c| c.head).collect();
        assert_eq!(heads, [R, B, D]);

        let fed2: Vec<&[usize]> = calls[2].fed().iter().map(Cell::coords).collect();
        assert_eq!(fed2, [&[0, 0, 1][..], &[0, 1, 0], &[1, 0, 0]]);
        let p011 = &calls[2].produced()[0];
        assert_eq!(p011.cell().coords(), &[0, 1, 1]);
        assert_eq!(
            p011.contributions(),
            &[
                Contribution { input: 0, head: D },
                Contribution { input: 1, head: R }
            ]
        );

        let fed3: Vec<&[usize]> = calls[3].fed().iter().map(Cell::coords).collect();
        assert_eq!(fed3, [&[0, 1, 1][..], &[1, 0, 1], &[1, 1, 0]]);
        let p111 = &calls[3].produced()[0];
        assert_eq!(p111.cell().coords(), &[1, 1, 1]);
        assert_eq!(p111.cell().raster(), 7);
        assert_eq!(
            p111.contributions(),
            &[
                Contribution { input: 0, head: B },
                Contribution { input: 1, head: D },
                Contribution { input: 2, head: R },
            ]
        );

        // The summation order is observable in f32: (B₀ + D₁) + R₂ = (1e8 − 1e8) + 1 = 1,
        // whereas (B₀ + R₂) + D₁ would round to 0.
        let r = [0.0, 0.0, 1.0];
        let d = [0.0, -1.0e8, 0.0];
        let b = [1.0e8, 0.0, 0.0];
        let mut out = [0.0];
        calls[3].assemble(&[&r, &b, &d], 1, 1, &mut out).unwrap();
        assert_eq!(out, [1.0 / 3.0]);

        // (0,1,1) = (D₀ + R₁) / 2.
        let r = [5.0, 7.0, 100.0];
        let d = [3.0, 100.0, 100.0];
        let b = [100.0, 100.0, 100.0];
        let mut out = [0.0; 3];
        calls[2].assemble(&[&r, &b, &d], 1, 1, &mut out).unwrap();
        assert_eq!(out[0], (3.0 + 7.0) / 2.0);
    }

    #[test]
    fn raster_order_feeds_the_previous_cell_and_predicts_the_next() {
        for grid in [vec![1], vec![3, 3], vec![2, 5], vec![2, 3, 4]] {
            let last_axis = grid.len() - 1;
            let plan = WavefrontPlan::raster(&grid, last_axis).unwrap();
            let cells = plan.cell_count();
            assert_eq!(plan.calls().len(), cells);
            assert_eq!(Order::Raster.calls(&grid), cells);
            assert_eq!(plan.head_axes(), &[last_axis]);
            assert_eq!(plan.max_input_len(), 1);
            let coords = all_coords(&grid);
            for (k, call) in plan.calls().iter().enumerate() {
                assert_eq!(call.index(), k);
                assert_eq!(call.tokens_before(), k);
                let fed: Vec<usize> = call.fed().iter().map(Cell::raster).collect();
                assert_eq!(fed, if k == 0 { vec![] } else { vec![k - 1] });
                assert_eq!(call.output_len(), 1);
                let produced = &call.produced()[0];
                assert_eq!(produced.cell().raster(), k);
                assert_eq!(produced.cell().coords(), coords[k].as_slice());
                assert_eq!(
                    produced.contributions(),
                    &[Contribution { input: 0, head: 0 }]
                );
            }
            // One head's logits pass through unchanged.
            let call = &plan.calls()[plan.calls().len() - 1];
            let logits = [1.0, 2.0, 3.0, 4.0];
            let mut out = [0.0; 4];
            call.assemble(&[&logits], 2, 2, &mut out).unwrap();
            assert_eq!(out, logits);
        }
        assert!(matches!(
            WavefrontPlan::raster(&[3, 3], 2),
            Err(PlanError::AxisOutOfRange { .. })
        ));
        assert_eq!(WavefrontPlan::raster(&[], 0), Err(PlanError::EmptyGrid));
    }

    #[test]
    fn call_counts_for_the_real_grids() {
        for (n, calls, widest) in [(16, 31, 16), (24, 47, 24), (32, 63, 32)] {
            let plan = WavefrontPlan::new(&[n, n], &IMAGE_HEADS).unwrap();
            assert_eq!(plan.calls().len(), calls);
            assert_eq!(plan.max_input_len(), widest);
        }
        let plan = WavefrontPlan::new(&[4, 16, 16], &VIDEO_HEADS).unwrap();
        assert_eq!(plan.calls().len(), 34);
        assert_eq!(plan.max_input_len(), 60);
    }

    #[test]
    fn invalid_plans_are_errors() {
        assert_eq!(WavefrontPlan::new(&[], &[0]), Err(PlanError::EmptyGrid));
        assert_eq!(
            WavefrontPlan::new(&[3, 0], &[1, 0]),
            Err(PlanError::ZeroExtent { axis: 1 })
        );
        assert_eq!(WavefrontPlan::new(&[3, 3], &[]), Err(PlanError::NoHeads));
        assert_eq!(
            WavefrontPlan::new(&[3, 3], &[1, 2]),
            Err(PlanError::AxisOutOfRange {
                head: 1,
                axis: 2,
                ndim: 2
            })
        );
        assert_eq!(
            WavefrontPlan::new(&[3, 3], &[1, 1]),
            Err(PlanError::DuplicateAxis {
                axis: 1,
                first: 0,
                second: 1
            })
        );
        assert_eq!(
            WavefrontPlan::new(&[3, 3], &[1]),
            Err(PlanError::UncoveredAxis { axis: 0, extent: 3 })
        );
        assert!(matches!(
            WavefrontPlan::new(&[usize::MAX, 3], &[1, 0]),
            Err(PlanError::GridTooLarge { .. })
        ));
        assert!(matches!(
            WavefrontPlan::new(&[1025, 1024], &[1, 0]),
            Err(PlanError::GridTooLarge { .. })
        ));
        // An axis of extent 1 needs no head.
        assert!(WavefrontPlan::new(&[1, 4], &[1]).is_ok());
    }

    #[test]
    fn length_mismatches_are_errors() {
        let plan = WavefrontPlan::new(&[3, 3], &IMAGE_HEADS).unwrap();
        let call = &plan.calls()[2];
        let ok = [0.0f32; 2 * 2 * 4];
        let short = [0.0f32; 5];
        let mut out = vec![0.0f32; 2 * 3 * 4];
        assert_eq!(
            call.assemble(&[&ok], 2, 4, &mut out),
            Err(PlanError::HeadCount {
                expected: 2,
                got: 1
            })
        );
        assert!(matches!(
            call.assemble(&[&ok, &short], 2, 4, &mut out),
            Err(PlanError::LengthMismatch {
                what: "head logits",
                ..
            })
        ));
        assert!(matches!(
            call.assemble(&[&ok, &ok], 2, 4, &mut out[1..]),
            Err(PlanError::LengthMismatch { .. })
        ));
        assert!(matches!(
            call.assemble(&[&ok, &ok], usize::MAX, 4, &mut out),
            Err(PlanError::ShapeTooLarge { .. })
        ));
        assert!(call.assemble(&[&ok, &ok], 2, 4, &mut out).is_ok());

        let mut grid_tokens = [0u32; 2 * 9];
        assert!(matches!(
            call.place(&[1u32, 2, 3], 2, &mut grid_tokens),
            Err(PlanError::LengthMismatch {
                what: "call tokens",
                ..
            })
        ));
        assert!(matches!(
            call.place(&[1u32; 6], 2, &mut grid_tokens[..17]),
            Err(PlanError::LengthMismatch {
                what: "grid token buffer",
                ..
            })
        ));
        call.place(&[1u32, 2, 3, 4, 5, 6], 2, &mut grid_tokens)
            .unwrap();
        assert_eq!(grid_tokens[2], 1);
        assert_eq!(grid_tokens[4], 2);
        assert_eq!(grid_tokens[6], 3);
        assert_eq!(grid_tokens[9 + 2], 4);
        assert_eq!(grid_tokens[9 + 6], 6);
    }
}
