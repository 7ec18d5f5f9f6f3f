//! The NAR models (image c2i and t2i, and video) as two ONNX graphs: `prefill` and `step`.
//! The video model is the same transformer with a learned position table instead of rotary
//! embeddings and a third head (NAR-SPEC §7), so both families share every builder here.
//!
//! # How the KV cache enters and leaves the graphs
//!
//! The cache is carried *in generation order* as plain graph inputs and outputs:
//!
//! ```text
//!   prefill(condition, head_mix)        -> logits, present.{i}.{key,value}, present_key_bias
//!   step(tokens, positions, past.*, head_mix)
//!                                       -> logits, present.{i}.{key,value}, present_key_bias
//!                                          present = Concat(past, this call's K/V)
//! ```
//!
//! (`head_mix` chooses the rows the heads project: see `Model::head` in `layers.rs`.)
//!
//! Upstream keeps a cache of fixed length laid out by raster position and masks it with the
//! proximity mask. Attention does not care where a key sits, only whether it is visible, and
//! NAR's mask has a property that makes the raster layout unnecessary: a query on wavefront
//! `t` sees every condition token and every image token of wavefronts `0..=t` — which is
//! exactly everything fed so far (the video model's plane mask is the same rule in 3-D). So narx appends each call's keys and values, and the only
//! mask left is which *condition* keys are visible (t2i caption padding). That mask rides
//! along with the cache as `present_key_bias` (0 or −∞ per cached key), so the runtime builds
//! no masks and the graphs need no mask of full length as input.
//!
//! Why this shape: it is standard ONNX (Concat, no Scatter), ONNX Runtime and tract run it
//! as is, each call's attention costs what has been generated rather than the full capacity,
//! and under CUDA/TensorRT the `present.*` outputs can be bound to device memory and fed back
//! as the next call's `past.*` without a host round trip. The condition tokens have zero
//! rotary rows (NAR-SPEC §1.7), so their keys are zero vectors and image queries score them
//! 0; that is kept exactly by rotating with the same table upstream builds.
//!
//! Prefill and step are separate graphs because they embed different inputs (a condition vs.
//! image tokens) and the prefill has no past; both reference one external weight file, so
//! every weight is stored once. (For class-conditional models the step graph also embeds
//! classes, so a backend may run the prefill as a step over an empty cache.)
//!
//! # The static layout (`narx export --static`), for TensorRT
//!
//! Every dimension is fixed but the batch: the step takes the widest wavefront (padded) and
//! the cache at full capacity.
//!
//! ```text
//!   prefill(condition, head_mix) -> logits, present.* (capacity slots), present_key_bias (C)
//!   step(tokens, positions, key_bias, cache_write, past.*, head_mix)
//!                                -> logits, present.* = past + cache_write · this call's K/V
//! ```
//!
//! `cache_write (capacity, width)` is one-hot per real token (the row of its cache slot) and
//! zero for padding, so new keys land in their slots exactly and padding writes nothing;
//! `key_bias (batch, capacity)` hides the slots not filled yet (and padded captions). The
//! runtime keeps both on the host: they are a few kilobytes per call.

mod config;
mod layers;

use layers::CacheUpdate;
mod video;

pub use config::{ConditionKind, HeadSpec, ModelArgs, ModelConfig, PositionEncoding, Transformer};
pub use video::VideoArgs;

use crate::builder::{ConstData, DType, Dim, GraphBuilder, Value};
pub use crate::manifest::CacheLayout;
use crate::onnx::ModelProto;
use crate::weights::WeightStore;
use crate::GraphError;

/// Graph input and output names: the contract between export and run (also in the manifest).
pub mod names {
    pub const CLASS_LABELS: &str = "class_labels";
    pub const CAPTION_EMBEDDINGS: &str = "caption_embeddings";
    pub const CAPTION_MASK: &str = "caption_mask";
    pub const NULL_CAPTION: &str = "null_caption";
    pub const TOKENS: &str = "tokens";
    pub const POSITIONS: &str = "positions";
    pub const PAST_KEY_BIAS: &str = "past_key_bias";
    pub const PRESENT_KEY_BIAS: &str = "present_key_bias";
    pub const LOGITS_RIGHT: &str = "logits_right";
    pub const LOGITS_DOWN: &str = "logits_down";
    pub const LOGITS_BACK: &str = "logits_back";
    /// `(head rows, batch)`, float32: the combinations of the batch rows the heads project
    /// (the identity for every row's logits, or each prompt's guidance mix).
    pub const HEAD_MIX: &str = "head_mix";
    /// Static layout: the bias of every cache slot, this call's included.
    pub const KEY_BIAS: &str = "key_bias";
    /// Static layout: where this call's keys and values go in the cache.
    pub const CACHE_WRITE: &str = "cache_write";
    /// The weight holding the token embeddings followed by the class embeddings.
    pub const TOKEN_AND_CLASS_EMBEDDINGS: &str = "embeddings.tokens_then_classes";

    /// Per-block cache names, `{layer}` standing for the block index: the manifest's
    /// `kv_cache` holds these patterns, the graphs the names [`for_layer`] makes of them.
    pub const PAST_KEY: &str = "past.{layer}.key";
    pub const PAST_VALUE: &str = "past.{layer}.value";
    pub const PRESENT_KEY: &str = "present.{layer}.key";
    pub const PRESENT_VALUE: &str = "present.{layer}.value";

    /// A cache name `pattern` with `{layer}` replaced by `layer`.
    pub fn for_layer(pattern: &str, layer: usize) -> String {
        pattern.replace("{layer}", &layer.to_string())
    }
    pub fn past_key(layer: usize) -> String {
        for_layer(PAST_KEY, layer)
    }
    pub fn past_value(layer: usize) -> String {
        for_layer(PAST_VALUE, layer)
    }
    pub fn present_key(layer: usize) -> String {
        for_layer(PRESENT_KEY, layer)
    }
    pub fn present_value(layer: usize) -> String {
        for_layer(PRESENT_VALUE, layer)
    }
}

/// Symbolic dimension names.
pub mod dims {
    pub const BATCH: &str = "batch";
    pub const WIDTH: &str = "width";
    /// Rows of head logits: the rows of [`super::names::HEAD_MIX`].
    pub const HEAD_ROWS: &str = "head_rows";
    pub const PAST: &str = "past";
    /// `past + width`: computed by the graph, written to ONNX as an unnamed dimension.
    pub const TOTAL: &str = "past+width";
}

/// Reads a checkpoint tensor as float32, by upstream name. Export implements it over the
/// checkpoint readers; shapes are checked before the graphs are built.
pub trait ParamSource {
    fn read_f32(&self, name: &str) -> Result<Vec<f32>, GraphError>;

    /// `name` as float32, checked to hold `len` values.
    fn read_f32_exact(&self, name: &str, len: usize) -> Result<Vec<f32>, GraphError> {
        let values = self.read_f32(name)?;
        if values.len() != len {
            return Err(GraphError::Param(format!(
                "{name}: {} values, {len} expected",
                values.len()
            )));
        }
        Ok(values)
    }
}

/// Test parameters: every tensor a list names, filled with zeros (for tests that build
/// graphs and read no values).
#[cfg(test)]
pub(crate) struct Zeros(pub Vec<(String, Vec<usize>)>);

#[cfg(test)]
impl ParamSource for Zeros {
    fn read_f32(&self, name: &str) -> Result<Vec<f32>, GraphError> {
        let (_, shape) = self
            .0
            .iter()
            .find(|(n, _)| n == name)
            .ok_or_else(|| GraphError::Param(format!("missing {name}")))?;
        Ok(vec![0.0; shape.iter().product()])
    }
}

/// Test: building from `params` fails naming the tensor when `missing` is left out, and
/// when `misshapen` has another first dimension.
#[cfg(test)]
pub(crate) fn assert_missing_and_misshapen<T>(
    params: &[(String, Vec<usize>)],
    missing: &str,
    misshapen: &str,
    build: impl Fn(&Zeros) -> Result<T, GraphError>,
) {
    let without: Vec<_> = params
        .iter()
        .filter(|(n, _)| n != missing)
        .cloned()
        .collect();
    let err = build(&Zeros(without))
        .err()
        .expect("a missing tensor fails")
        .to_string();
    assert!(err.contains(missing), "{err}");
    let mut wrong = params.to_vec();
    for (name, shape) in &mut wrong {
        if name == misshapen {
            shape[0] += 1;
        }
    }
    let err = build(&Zeros(wrong))
        .err()
        .expect("a misshapen tensor fails")
        .to_string();
    assert!(err.contains(misshapen), "{err}");
}

/// A row-major `(rows, cols)` matrix as `(cols, rows)`: upstream's `Linear` weights are
/// `(out, in)`, the graphs multiply by `(in, out)`.
pub(crate) fn transposed(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; values.len()];
    for (r, row) in values.chunks_exact(cols).take(rows).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}

/// A checkpoint tensor stored as is in float32, under its upstream name, with the graph's
/// `dims` (which may add unit axes to upstream's shape; the bytes are the same).
pub(crate) fn f32_param(
    b: &mut GraphBuilder,
    params: &dyn ParamSource,
    name: &str,
    dims: &[usize],
) -> Result<Value, GraphError> {
    let len = dims.iter().product();
    b.weight(name, DType::F32, dims, || {
        Ok(ConstData::F32(params.read_f32_exact(name, len)?))
    })
}

/// Most positions (condition and grid) a model may have: far beyond any released NAR model
/// (a 64 × 64 grid has 4096), low enough that every size derived from them fits.
const MAX_POSITIONS: usize = 1 << 20;

/// What to build: the model, its latent grid and the precision of weights and matmuls.
#[derive(Clone, Debug)]
pub struct NarSpec {
    pub config: ModelConfig,
    /// `[n, n]` for images, `[T, H, W]` for video.
    pub grid: Vec<usize>,
    /// F32, or F16 (weights and matmuls; norms, softmax, rotary and logits stay float32).
    pub dtype: DType,
    /// How the cache travels between calls (module docs).
    pub layout: CacheLayout,
}

impl NarSpec {
    /// Checks that the grid suits the model: square for the image model (its rotary table
    /// and upstream's mask are square), the trained `latent_shape` for video (positions in
    /// the learned table mean a fixed `(T, H, W)`).
    ///
    /// The grid is checked first, and its size bounded, so that no count derived from it
    /// (the video config's own checks included) can overflow.
    pub fn new(config: ModelConfig, grid: Vec<usize>, dtype: DType) -> Result<Self, GraphError> {
        let bad = |m: String| Err(GraphError::Config(m));
        match &config {
            ModelConfig::Image(_) => {
                if grid.len() != 2 || grid[0] != grid[1] || grid[0] == 0 {
                    return bad(format!("image grid {grid:?} must be n × n with n ≥ 1"));
                }
            }
            ModelConfig::Video(args) => {
                if grid != args.latent_shape {
                    return bad(format!(
                        "video grid {grid:?} differs from the model's latent_shape {:?}",
                        args.latent_shape
                    ));
                }
            }
        }
        let positions = grid
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .and_then(|cells| cells.checked_add(config.condition_len()));
        if !matches!(positions, Some(p) if p <= MAX_POSITIONS) {
            return bad(format!(
                "grid {grid:?} and {} condition positions make more than {MAX_POSITIONS} \
                 positions",
                config.condition_len()
            ));
        }
        config.validate()?;
        if !dtype.is_float() {
            return bad(format!("{dtype:?} is not a model dtype"));
        }
        Ok(NarSpec {
            config,
            grid,
            dtype,
            layout: CacheLayout::Append,
        })
    }

    pub fn with_layout(self, layout: CacheLayout) -> Self {
        NarSpec { layout, ..self }
    }

    /// Condition positions `C`.
    pub fn condition_len(&self) -> usize {
        self.config.condition_len()
    }

    pub fn cells(&self) -> usize {
        self.grid.iter().product()
    }

    /// Upstream's cache length rule `find_multiple(C + cells, 8)`: the most positions a
    /// generation uses, rounded as upstream allocates.
    pub fn cache_capacity(&self) -> usize {
        (self.condition_len() + self.cells()).div_ceil(8) * 8
    }

    /// Cells of the widest wavefront: the most tokens one step feeds.
    pub fn widest_wavefront(&self) -> usize {
        let last: usize = self.grid.iter().map(|d| d - 1).sum();
        (0..=last)
            .map(|k| cells_on_wavefront(&self.grid, k))
            .max()
            .unwrap_or(1)
    }
}

/// Cells whose coordinates sum to `k`.
fn cells_on_wavefront(grid: &[usize], k: usize) -> usize {
    match grid.split_first() {
        None => usize::from(k == 0),
        Some((&first, rest)) => (0..first.min(k + 1))
            .map(|x| cells_on_wavefront(rest, k - x))
            .sum(),
    }
}

/// The two graphs of a NAR model.
pub struct NarGraphs {
    pub prefill: ModelProto,
    pub step: ModelProto,
}

/// Builds both graphs; weights go to `store` once.
pub fn build(
    spec: &NarSpec,
    params: &dyn ParamSource,
    store: &mut WeightStore,
) -> Result<NarGraphs, GraphError> {
    let prefill = build_prefill(spec, params, store)?;
    let step = build_step(spec, params, store)?;
    Ok(NarGraphs { prefill, step })
}

fn batch_dims(rest: &[Dim]) -> Vec<Dim> {
    let mut d = vec![Dim::named(dims::BATCH)];
    d.extend_from_slice(rest);
    d
}

/// `(head rows, rest…)`: the head logits' dims.
fn head_rows_dims(rest: &[Dim]) -> Vec<Dim> {
    let mut d = vec![Dim::named(dims::HEAD_ROWS)];
    d.extend_from_slice(rest);
    d
}

/// The heads' row mix, `(head rows, batch)` ([`names::HEAD_MIX`]).
fn head_mix_input(b: &mut GraphBuilder) -> Value {
    b.input(
        names::HEAD_MIX,
        DType::F32,
        &[Dim::named(dims::HEAD_ROWS), Dim::named(dims::BATCH)],
    )
}

fn cache_dims(spec: &NarSpec, len: Dim) -> Vec<Dim> {
    let t = spec.config.transformer();
    batch_dims(&[Dim::Fixed(t.kv_heads()), len, Dim::Fixed(t.head_dim())])
}

/// Condition → cache of the condition positions and the logits for cell (0, 0).
fn build_prefill(
    spec: &NarSpec,
    params: &dyn ParamSource,
    store: &mut WeightStore,
) -> Result<ModelProto, GraphError> {
    let mut b = GraphBuilder::new("nar_prefill", store);
    let m = layers::Model::new(spec, params);
    let c = spec.condition_len();
    // The embeddings, which condition keys later queries may see (t2i only), and the
    // key bias that starts the cache.
    let (embeddings, key_visible, key_bias) = match spec.config.condition() {
        ConditionKind::Class => {
            let labels = b.input(names::CLASS_LABELS, DType::I64, &batch_dims(&[]));
            let e = m.class_embedding(&mut b, labels)?;
            let zeros = b.zeros_like(labels)?;
            let key_bias = b.unsqueeze(zeros, &[1])?;
            (e, None, key_bias)
        }
        ConditionKind::Caption => {
            let cd = m.image_args()?.caption_dim;
            let features = b.input(
                names::CAPTION_EMBEDDINGS,
                DType::F32,
                &batch_dims(&[Dim::Fixed(c), Dim::Fixed(cd)]),
            );
            let mask = b.input(
                names::CAPTION_MASK,
                DType::F32,
                &batch_dims(&[Dim::Fixed(c)]),
            );
            let null = b.input(names::NULL_CAPTION, DType::Bool, &batch_dims(&[]));
            let e = m.caption_embedding(&mut b, features, null)?;
            let half = b.scalar(0.5, DType::F32)?;
            let visible = b.greater(mask, half)?;
            let key_bias = m.bias_from_visibility(&mut b, visible)?;
            (e, Some(visible), key_bias)
        }
    };
    let attention_bias = b.scoped("mask", |b| m.prefill_bias(b, key_visible))?;
    let positions: Vec<i64> = (0..c as i64).collect();
    let positions = b.const_i64(&positions)?;
    let outputs = m.forward(
        &mut b,
        embeddings,
        positions,
        attention_bias,
        CacheUpdate::Fresh,
    )?;
    let mix = head_mix_input(&mut b);
    let logit_dims = head_rows_dims(&[Dim::Fixed(1), Dim::Fixed(m.vocab_size())]);
    // Only the last condition position predicts (the first cell); the rest only fill the cache.
    for (head, input) in spec.config.heads().iter().zip(outputs.head_inputs) {
        let last = b.slice(input, 1, c as i64 - 1, c as i64)?;
        let logits = m.head(&mut b, head, last, mix)?;
        b.output(head.output, logits, &logit_dims)?;
    }
    b.output(
        names::PRESENT_KEY_BIAS,
        key_bias,
        &batch_dims(&[Dim::Fixed(c)]),
    )?;
    // The static layout starts the cache at full capacity: the C entries in slots 0..C.
    let (placement, slots) = match spec.layout {
        CacheLayout::Append => (None, c),
        CacheLayout::Static => {
            let capacity = spec.cache_capacity();
            let one_hot = (0..capacity * c).map(|i| {
                let (slot, entry) = (i / c, i % c);
                if slot == entry {
                    1.0
                } else {
                    0.0
                }
            });
            let one_hot = match spec.dtype {
                DType::F16 => ConstData::F16(one_hot.map(half::f16::from_f32).collect()),
                _ => ConstData::F32(one_hot.collect()),
            };
            (Some(b.constant(one_hot, &[capacity, c])?), capacity)
        }
    };
    for (i, (k, v)) in outputs.present.into_iter().enumerate() {
        let (k, v) = match placement {
            Some(p) => (b.matmul(p, k)?, b.matmul(p, v)?),
            None => (k, v),
        };
        let dims = cache_dims(spec, Dim::Fixed(slots));
        b.output(&names::present_key(i), k, &dims)?;
        b.output(&names::present_value(i), v, &dims)?;
    }
    Ok(b.finish())
}

/// One wavefront of image tokens + the cache so far → head logits and the grown cache.
fn build_step(
    spec: &NarSpec,
    params: &dyn ParamSource,
    store: &mut WeightStore,
) -> Result<ModelProto, GraphError> {
    let mut b = GraphBuilder::new("nar_step", store);
    let m = layers::Model::new(spec, params);
    // The append layout grows the cache by `width` each call; the static one pads the
    // wavefront to the widest and keeps the cache at capacity.
    let (width, past, total) = match spec.layout {
        CacheLayout::Append => (
            Dim::named(dims::WIDTH),
            Dim::named(dims::PAST),
            Dim::named(dims::TOTAL),
        ),
        CacheLayout::Static => {
            let capacity = Dim::Fixed(spec.cache_capacity());
            (
                Dim::Fixed(spec.widest_wavefront()),
                capacity.clone(),
                capacity,
            )
        }
    };
    let tokens = b.input(
        names::TOKENS,
        DType::I64,
        &batch_dims(std::slice::from_ref(&width)),
    );
    let positions = b.input(names::POSITIONS, DType::I64, std::slice::from_ref(&width));
    let (bias, placement) = match spec.layout {
        CacheLayout::Append => (
            b.input(
                names::PAST_KEY_BIAS,
                DType::F32,
                &batch_dims(std::slice::from_ref(&past)),
            ),
            None,
        ),
        CacheLayout::Static => {
            let bias = b.input(
                names::KEY_BIAS,
                DType::F32,
                &batch_dims(std::slice::from_ref(&past)),
            );
            let write = b.input(
                names::CACHE_WRITE,
                DType::F32,
                &[past.clone(), width.clone()],
            );
            (bias, Some(b.cast(write, spec.dtype)?))
        }
    };
    let mut past_kv = Vec::new();
    for i in 0..spec.config.blocks() {
        let k = b.input(
            &names::past_key(i),
            spec.dtype,
            &cache_dims(spec, past.clone()),
        );
        let v = b.input(
            &names::past_value(i),
            spec.dtype,
            &cache_dims(spec, past.clone()),
        );
        past_kv.push((k, v));
    }
    let embeddings = m.token_embedding(&mut b, tokens)?;
    let (key_bias, attention_bias) = b.scoped("mask", |b| {
        let key_bias = match placement {
            // This call's keys are visible to each other.
            None => {
                let new = b.zeros_like(tokens)?;
                b.concat(&[bias, new], 1)?
            }
            Some(_) => bias,
        };
        let attention_bias = b.unsqueeze(key_bias, &[1, 2])?;
        Ok((key_bias, attention_bias))
    })?;
    let cache = match placement {
        None => CacheUpdate::Append(&past_kv),
        Some(placement) => CacheUpdate::Place(&past_kv, placement),
    };
    let outputs = m.forward(&mut b, embeddings, positions, attention_bias, cache)?;
    let mix = head_mix_input(&mut b);
    let logit_dims = head_rows_dims(&[width, Dim::Fixed(m.vocab_size())]);
    for (head, input) in spec.config.heads().iter().zip(outputs.head_inputs) {
        let logits = m.head(&mut b, head, input, mix)?;
        b.output(head.output, logits, &logit_dims)?;
    }
    if spec.layout == CacheLayout::Append {
        b.output(
            names::PRESENT_KEY_BIAS,
            key_bias,
            &batch_dims(std::slice::from_ref(&total)),
        )?;
    }
    for (i, (k, v)) in outputs.present.into_iter().enumerate() {
        b.output(&names::present_key(i), k, &cache_dims(spec, total.clone()))?;
        b.output(
            &names::present_value(i),
            v,
            &cache_dims(spec, total.clone()),
        )?;
    }
    Ok(b.finish())
}

/// The 2-D rotary table of NAR-SPEC §1.7, `(C + n², d/2)` cosines and sines, with zero rows
/// for the condition positions. Computed in float32 the way upstream computes it.
pub fn rotary_table(args: &ModelArgs, n: usize) -> (ConstData, ConstData, Vec<usize>) {
    let d = args.transformer().head_dim();
    let half = d / 2;
    let quarter = d / 4;
    let base = args.rope_base as f32;
    let freqs: Vec<f32> = (0..quarter)
        .map(|k| 1.0 / base.powf((2 * k) as f32 / half as f32))
        .collect();
    let c = args.cls_token_num;
    let rows = c + n * n;
    let mut cos = vec![0f32; rows * half];
    let mut sin = vec![0f32; rows * half];
    for r in 0..n {
        for col in 0..n {
            let row = c + r * n + col;
            for j in 0..half {
                let angle = if j < quarter {
                    r as f32 * freqs[j]
                } else {
                    col as f32 * freqs[j - quarter]
                };
                cos[row * half + j] = angle.cos();
                sin[row * half + j] = angle.sin();
            }
        }
    }
    (ConstData::F32(cos), ConstData::F32(sin), vec![rows, half])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wavefront_widths() {
        assert_eq!(cells_on_wavefront(&[3, 3], 0), 1);
        assert_eq!(cells_on_wavefront(&[3, 3], 2), 3);
        assert_eq!(cells_on_wavefront(&[3, 3], 4), 1);
        assert_eq!(cells_on_wavefront(&[3, 3], 5), 0);
        let video = |grid: Vec<usize>| NarSpec {
            config: ModelConfig::Video(VideoArgs::default()),
            grid,
            dtype: DType::F32,
            layout: CacheLayout::Append,
        };
        // NAR-SPEC §7: the largest plane of (4, 16, 16) has 60 tokens.
        assert_eq!(video(vec![4, 16, 16]).widest_wavefront(), 60);
        assert_eq!(video(vec![3, 4, 4]).widest_wavefront(), 10);
    }
}
