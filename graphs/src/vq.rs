//! The VQ-16 image tokenizer's decoder (NAR-SPEC §6) as one ONNX graph: token codes → pixels.
//!
//! ```text
//! codes (B, h, w) ─Gather(L2-normalised codebook)─Transpose(NCHW)─post_quant_conv─┐
//!   ┌─────────────────────────────────────────────────────────────────────────────┘
//!   └─conv_in─mid[Res, Attn, Res]─level 0 [Res, Attn]×3─Upsample─level 1 … level L−1
//!       ─norm_out─swish─conv_out─▶ image (B, 3, f·h, f·w), f = 2^(L−1) (16 for VQ-16)
//! ```
//!
//! Only the decoder path is built: NAR generates codes, so the encoder, `quant_conv` and the
//! `quantize.codebook_used` buffer of upstream checkpoints are never read. The graph has no
//! fixed spatial size: `height` and `width` are symbolic, so one graph decodes any grid.
//!
//! Everything runs in float32, as upstream runs the tokenizer (it is never cast to bf16), and
//! uses standard opset-17 operators only. In particular GroupNorm is built from
//! Reshape/ReduceMean/Sub/Mul/Sqrt (`GroupNormalization` needs opset 18), and the nearest ×2
//! upsampling is an Unsqueeze/Expand/Reshape, which is exact by construction on every engine
//! (a `Resize` would need string attributes to pin down its rounding; see `upsample` below).

use serde::{Deserialize, Serialize};

use crate::builder::{ConstData, DType, Dim, GraphBuilder, Value};
use crate::nar::{f32_param, ParamSource};
use crate::onnx::ModelProto;
use crate::weights::WeightStore;
use crate::GraphError;

/// Graph input: token codes `(batch, height, width)`, int64, raster order on the grid.
pub const CODES: &str = "codes";
/// Graph output: the decoded image `(batch, 3, f·height, f·width)`, float32, nominally in
/// [−1, 1] (not clamped, as upstream's `decode_code` returns it).
pub const IMAGE: &str = "image";

/// Symbolic dimension names of the decoder graph.
pub mod dims {
    pub const BATCH: &str = "batch";
    pub const HEIGHT: &str = "height";
    pub const WIDTH: &str = "width";
}

/// GroupNorm groups of every `Normalize` in the decoder (upstream `nn.GroupNorm(32, C)`).
const GROUPS: usize = 32;
/// GroupNorm epsilon (upstream `Normalize` passes `eps=1e-6`, not torch's default 1e-5).
const GROUP_NORM_EPS: f32 = 1e-6;
/// `F.normalize`'s lower bound on the norm, so an all-zero codebook row stays zero.
const L2_NORM_EPS: f32 = 1e-12;
/// More levels than this would overflow the `2^(levels−1)` upsampling factor long before any
/// real tokenizer; the bound only keeps arithmetic on user-given configs panic-free.
const MAX_LEVELS: usize = 16;

/// The tokenizer configuration: upstream `ModelArgs` (tokenizer) fields plus the decoder
/// constructor's `ch` and `num_res_blocks`. Unset fields take the VQ-16 values, as upstream's
/// defaults are VQ-16; unknown fields (`encoder_ch_mult`, `dropout_p`, `commit_loss_beta`, …)
/// are accepted and ignored because configs copied from training runs carry them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct VqConfig {
    /// Codebook rows (the token vocabulary of the generator).
    pub codebook_size: usize,
    /// Width of a codebook row (the latent channels before `post_quant_conv`).
    pub codebook_embed_dim: usize,
    /// Channels after `post_quant_conv`, input of `decoder.conv_in`.
    pub z_channels: usize,
    /// Channel multipliers per resolution, highest resolution first (upstream order); the
    /// decoder walks them in reverse.
    #[serde(alias = "ch_mult")]
    pub decoder_ch_mult: Vec<usize>,
    /// Base channel count.
    pub ch: usize,
    /// Upstream's `num_res_blocks`; each decoder level has one more ResBlock than this.
    pub num_res_blocks: usize,
    /// Whether codebook rows are L2-normalised at lookup (true for VQ-16).
    pub codebook_l2_norm: bool,
}

impl Default for VqConfig {
    fn default() -> Self {
        VqConfig::vq16()
    }
}

/// One decoder level (`decoder.conv_blocks.{index}`), in decoder order (lowest resolution
/// first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Level {
    index: usize,
    /// Channels entering the level's first ResBlock.
    channels_in: usize,
    /// Channels of every block after the first ResBlock.
    channels: usize,
    /// An AttnBlock after each ResBlock (only the lowest-resolution level has them).
    attention: bool,
    /// Ends with a nearest ×2 upsample and a 3×3 conv (every level but the last).
    upsample: bool,
}

impl VqConfig {
    /// The released VQ-16 tokenizer (`VQ_16`, `vq_ds16_c2i.pt` / `vq_ds16_t2i.pt`).
    pub fn vq16() -> Self {
        VqConfig {
            codebook_size: 16384,
            codebook_embed_dim: 8,
            z_channels: 256,
            decoder_ch_mult: vec![1, 1, 2, 2, 4],
            ch: 128,
            num_res_blocks: 2,
            codebook_l2_norm: true,
        }
    }

    /// Checks what the graph relies on; the message names the field.
    pub fn validate(&self) -> Result<(), GraphError> {
        let bad = |m: String| Err(GraphError::Config(m));
        for (field, value) in [
            ("codebook_size", self.codebook_size),
            ("codebook_embed_dim", self.codebook_embed_dim),
            ("z_channels", self.z_channels),
            ("ch", self.ch),
        ] {
            if value == 0 {
                return bad(format!("{field} must be positive"));
            }
        }
        if self.codebook_size > i64::MAX as usize {
            return bad(format!(
                "codebook_size {} does not fit int64 codes",
                self.codebook_size
            ));
        }
        if self.decoder_ch_mult.is_empty() || self.decoder_ch_mult.len() > MAX_LEVELS {
            return bad(format!(
                "decoder_ch_mult must have 1 to {MAX_LEVELS} entries, not {}",
                self.decoder_ch_mult.len()
            ));
        }
        for (i, &m) in self.decoder_ch_mult.iter().enumerate() {
            let channels = self.ch.checked_mul(m).filter(|&c| c > 0);
            match channels {
                None => {
                    return bad(format!(
                        "ch {} × decoder_ch_mult[{i}] {m} is not a usable channel count",
                        self.ch
                    ))
                }
                // Every level's channels pass through GroupNorm(32).
                Some(c) if !c.is_multiple_of(GROUPS) => {
                    return bad(format!(
                        "ch {} × decoder_ch_mult[{i}] {m} = {c} channels is not a multiple of \
                         the {GROUPS} GroupNorm groups",
                        self.ch
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// How many times larger the image is than the code grid: `2^(levels − 1)`.
    pub fn upsample_factor(&self) -> usize {
        let upsamplings = self.decoder_ch_mult.len().clamp(1, MAX_LEVELS) - 1;
        1 << upsamplings
    }

    /// Channels of the lowest-resolution level: `conv_in`'s output, `mid`'s width.
    fn bottom_channels(&self) -> usize {
        let last = self.decoder_ch_mult.last().copied().unwrap_or(0);
        self.ch.saturating_mul(last)
    }

    /// The levels as upstream's `Decoder.__init__` builds them: `i_level` runs over the
    /// multipliers in reverse, so `conv_blocks.0` is the lowest resolution.
    fn levels(&self) -> Vec<Level> {
        let count = self.decoder_ch_mult.len();
        let mut channels_in = self.bottom_channels();
        let mut levels = Vec::with_capacity(count);
        for (index, &m) in self.decoder_ch_mult.iter().rev().enumerate() {
            let channels = self.ch.saturating_mul(m);
            levels.push(Level {
                index,
                channels_in,
                channels,
                attention: index == 0,
                upsample: index + 1 != count,
            });
            channels_in = channels;
        }
        levels
    }

    /// Channels entering `norm_out` and `conv_out`.
    fn top_channels(&self) -> usize {
        self.levels()
            .last()
            .map_or(self.bottom_channels(), |l| l.channels)
    }

    /// Every tensor the decoder graph reads, with upstream names and shapes (NAR-SPEC §6):
    /// the codebook, `post_quant_conv` and `decoder.*`, in upstream's module order.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let mut params = vec![
            (
                "quantize.embedding.weight".to_string(),
                vec![self.codebook_size, self.codebook_embed_dim],
            ),
            (
                "post_quant_conv.weight".to_string(),
                vec![self.z_channels, self.codebook_embed_dim, 1, 1],
            ),
            ("post_quant_conv.bias".to_string(), vec![self.z_channels]),
        ];
        let bottom = self.bottom_channels();
        push_conv(&mut params, "decoder.conv_in", self.z_channels, bottom, 3);
        push_res(&mut params, "decoder.mid.0", bottom, bottom);
        push_attn(&mut params, "decoder.mid.1", bottom);
        push_res(&mut params, "decoder.mid.2", bottom, bottom);
        for level in self.levels() {
            let p = format!("decoder.conv_blocks.{}", level.index);
            let mut c_in = level.channels_in;
            for i in 0..self.res_per_level() {
                push_res(&mut params, &format!("{p}.res.{i}"), c_in, level.channels);
                c_in = level.channels;
            }
            if level.attention {
                for i in 0..self.res_per_level() {
                    push_attn(&mut params, &format!("{p}.attn.{i}"), level.channels);
                }
            }
            if level.upsample {
                let c = level.channels;
                push_conv(&mut params, &format!("{p}.upsample.conv"), c, c, 3);
            }
        }
        let top = self.top_channels();
        push_norm(&mut params, "decoder.norm_out", top);
        push_conv(&mut params, "decoder.conv_out", top, 3, 3);
        params
    }

    /// Number of values in [`VqConfig::parameters`] (42,583,171 for VQ-16, of which 42,449,795
    /// are `decoder.*`).
    pub fn parameter_count(&self) -> usize {
        self.parameters()
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }

    /// ResBlocks per level: upstream's decoder uses `num_res_blocks + 1`.
    fn res_per_level(&self) -> usize {
        self.num_res_blocks.saturating_add(1)
    }
}

fn push_conv(
    params: &mut Vec<(String, Vec<usize>)>,
    prefix: &str,
    c_in: usize,
    c_out: usize,
    kernel: usize,
) {
    params.push((
        format!("{prefix}.weight"),
        vec![c_out, c_in, kernel, kernel],
    ));
    params.push((format!("{prefix}.bias"), vec![c_out]));
}

fn push_norm(params: &mut Vec<(String, Vec<usize>)>, prefix: &str, c: usize) {
    params.push((format!("{prefix}.weight"), vec![c]));
    params.push((format!("{prefix}.bias"), vec![c]));
}

fn push_res(params: &mut Vec<(String, Vec<usize>)>, prefix: &str, c_in: usize, c_out: usize) {
    push_norm(params, &format!("{prefix}.norm1"), c_in);
    push_conv(params, &format!("{prefix}.conv1"), c_in, c_out, 3);
    push_norm(params, &format!("{prefix}.norm2"), c_out);
    push_conv(params, &format!("{prefix}.conv2"), c_out, c_out, 3);
    if c_in != c_out {
        push_conv(params, &format!("{prefix}.nin_shortcut"), c_in, c_out, 1);
    }
}

fn push_attn(params: &mut Vec<(String, Vec<usize>)>, prefix: &str, c: usize) {
    push_norm(params, &format!("{prefix}.norm"), c);
    for conv in ["q", "k", "v", "proj_out"] {
        push_conv(params, &format!("{prefix}.{conv}"), c, c, 1);
    }
}

const CODEBOOK: &str = "quantize.embedding.weight";

/// Builds the decoder graph: `codes (batch, height, width)` int64 → `image (batch, 3,
/// f·height, f·width)` float32, f = [`VqConfig::upsample_factor`]. Weights are read from
/// `params` by upstream name and go to `store`.
pub fn build_decoder(
    config: &VqConfig,
    params: &dyn ParamSource,
    store: &mut WeightStore,
) -> Result<ModelProto, GraphError> {
    config.validate()?;
    let mut b = GraphBuilder::new("vq_decoder", store);
    let tokenizer = Decoder { config, params };
    let codes = b.input(
        CODES,
        DType::I64,
        &[
            Dim::named(dims::BATCH),
            Dim::named(dims::HEIGHT),
            Dim::named(dims::WIDTH),
        ],
    );
    let z = b.scoped("quantize", |b| tokenizer.lookup(b, codes))?;
    let z = tokenizer.conv(
        &mut b,
        z,
        "post_quant_conv",
        config.codebook_embed_dim,
        config.z_channels,
        1,
    )?;
    let image = tokenizer.decoder(&mut b, z)?;
    let f = config.upsample_factor();
    b.output(
        IMAGE,
        image,
        &[
            Dim::named(dims::BATCH),
            Dim::Fixed(3),
            // Expressions are written unnamed: engines infer them from `codes`.
            Dim::Named(format!("{f}*{}", dims::HEIGHT)),
            Dim::Named(format!("{f}*{}", dims::WIDTH)),
        ],
    )?;
    Ok(b.finish())
}

struct Decoder<'a> {
    config: &'a VqConfig,
    params: &'a dyn ParamSource,
}

impl Decoder<'_> {
    /// Codes → latent image, NCHW (upstream `get_codebook_entry(channel_first=True)`).
    ///
    /// ```text
    /// codes (B,h,w) ─Gather(codebook)─▶ (B,h,w,D) ─Transpose(0,3,1,2)─▶ (B,D,h,w)
    /// ```
    fn lookup(&self, b: &mut GraphBuilder, codes: Value) -> Result<Value, GraphError> {
        let shape = (self.config.codebook_size, self.config.codebook_embed_dim);
        let table = codebook_weight(
            b,
            self.params,
            CODEBOOK,
            shape,
            self.config.codebook_l2_norm,
        )?;
        let rows = b.gather(table, codes)?;
        b.transpose(rows, &[0, 3, 1, 2])
    }

    /// `Conv2d(c_in → c_out, kernel, padding kernel/2, bias)` from `{name}.weight/.bias`.
    fn conv(
        &self,
        b: &mut GraphBuilder,
        x: Value,
        name: &str,
        c_in: usize,
        c_out: usize,
        kernel: usize,
    ) -> Result<Value, GraphError> {
        b.scoped(name, |b| {
            let w = f32_param(
                b,
                self.params,
                &format!("{name}.weight"),
                &[c_out, c_in, kernel, kernel],
            )?;
            let bias = f32_param(b, self.params, &format!("{name}.bias"), &[c_out])?;
            b.conv2d(x, w, bias, (kernel / 2) as i64)
        })
    }

    /// `Decoder.forward`: conv_in, mid, the levels, norm_out, swish, conv_out.
    fn decoder(&self, b: &mut GraphBuilder, z: Value) -> Result<Value, GraphError> {
        let config = self.config;
        let bottom = config.bottom_channels();
        let mut h = self.conv(b, z, "decoder.conv_in", config.z_channels, bottom, 3)?;
        h = self.res_block(b, h, "decoder.mid.0", bottom, bottom)?;
        h = self.attn_block(b, h, "decoder.mid.1", bottom)?;
        h = self.res_block(b, h, "decoder.mid.2", bottom, bottom)?;
        for level in config.levels() {
            let p = format!("decoder.conv_blocks.{}", level.index);
            let mut c_in = level.channels_in;
            for i in 0..config.res_per_level() {
                h = self.res_block(b, h, &format!("{p}.res.{i}"), c_in, level.channels)?;
                c_in = level.channels;
                if level.attention {
                    h = self.attn_block(b, h, &format!("{p}.attn.{i}"), level.channels)?;
                }
            }
            if level.upsample {
                h = self.upsample(b, h, &format!("{p}.upsample"), level.channels)?;
            }
        }
        let top = config.top_channels();
        h = self.group_norm(b, h, "decoder.norm_out", top)?;
        h = b.scoped("decoder.swish_out", |b| swish(b, h))?;
        self.conv(b, h, "decoder.conv_out", top, 3, 3)
    }

    /// `GroupNorm(32, C, eps=1e-6, affine)` over NCHW: statistics per sample and group over
    /// (C/32 channels × H × W), biased variance, as `torch.nn.GroupNorm`. Built from basic
    /// operators because `GroupNormalization` is opset 18 (and its opset-18 definition has
    /// per-group, not per-channel, scale and bias).
    ///
    /// The group is viewed as `(C/32·H, W)` (Reshape `[0, 32, −1, 0]` keeps W) and reduced
    /// over both axes, not flattened to one axis of C/32·H·W values: at 384×384 a group holds
    /// 590k values, and tract's float32 ReduceMean over one axis that long lost about 1e-3 of
    /// the normalised output (5e-4 relative error in the variance), while over two axes it is
    /// as accurate as ONNX Runtime (2e-5). Two chained single-axis ReduceMeans would be as
    /// accurate but made tract's declutter pass run for many minutes on the whole decoder.
    ///
    /// ```text
    /// x ─Reshape(B,32,C/32·H,W)─normalize(axes 2,3)─Reshape(Shape(x))─Mul(γ (C,1,1))─Add(β (C,1,1))─▶
    /// ```
    fn group_norm(
        &self,
        b: &mut GraphBuilder,
        x: Value,
        name: &str,
        channels: usize,
    ) -> Result<Value, GraphError> {
        b.scoped(name, |b| {
            let shape = b.shape(x)?;
            let grouped = b.reshape(x, &[0, GROUPS as i64, -1, 0])?;
            let normed = b.normalize(grouped, &[2, 3], GROUP_NORM_EPS)?;
            let normed = b.reshape_to(normed, shape)?;
            // γ and β (C, 1, 1) broadcast over (B, C, H, W); same bytes as upstream (C).
            b.affine(normed, self.params, name, &[channels, 1, 1])
        })
    }

    /// Upstream `ResnetBlock` (dropout 0 at inference).
    ///
    /// ```text
    /// x ─┬─norm1─swish─conv1(3×3)─norm2─swish─conv2(3×3)─┐
    ///    └─[nin_shortcut (1×1) when c_in ≠ c_out]────────Add─▶
    /// ```
    fn res_block(
        &self,
        b: &mut GraphBuilder,
        x: Value,
        name: &str,
        c_in: usize,
        c_out: usize,
    ) -> Result<Value, GraphError> {
        let p = |s: &str| format!("{name}.{s}");
        let h = self.group_norm(b, x, &p("norm1"), c_in)?;
        let h = b.scoped(&p("swish1"), |b| swish(b, h))?;
        let h = self.conv(b, h, &p("conv1"), c_in, c_out, 3)?;
        let h = self.group_norm(b, h, &p("norm2"), c_out)?;
        let h = b.scoped(&p("swish2"), |b| swish(b, h))?;
        let h = self.conv(b, h, &p("conv2"), c_out, c_out, 3)?;
        let shortcut = if c_in == c_out {
            x
        } else {
            self.conv(b, x, &p("nin_shortcut"), c_in, c_out, 1)?
        };
        b.scoped(name, |b| b.add(shortcut, h))
    }

    /// Upstream `AttnBlock`: one head over all H·W positions, scores scaled by C^−½, softmax
    /// over the keys, residual add. q/k/v/proj_out are 1×1 convs, kept as Conv so the
    /// checkpoint weights are used as they are.
    ///
    /// ```text
    /// x ─norm─┬─q─Reshape(B,C,HW)─Transpose─Mul(C^−½)─┐ (B,HW,C)
    ///         ├─k─Reshape(B,C,HW)───────────────────MatMul─Softmax(keys)─┐ (B,HW,HW)
    ///         └─v─Reshape(B,C,HW)─Transpose─────────────────────────────MatMul─┐ (B,HW,C)
    ///   ┌──────────────────────────────────────────────────────────────────────┘
    ///   └─Transpose─Reshape(Shape(x))─proj_out─┐
    /// x ───────────────────────────────────────Add─▶
    /// ```
    fn attn_block(
        &self,
        b: &mut GraphBuilder,
        x: Value,
        name: &str,
        c: usize,
    ) -> Result<Value, GraphError> {
        let p = |s: &str| format!("{name}.{s}");
        let h = self.group_norm(b, x, &p("norm"), c)?;
        let q = self.conv(b, h, &p("q"), c, c, 1)?;
        let k = self.conv(b, h, &p("k"), c, c, 1)?;
        let v = self.conv(b, h, &p("v"), c, c, 1)?;
        let out = b.scoped(name, |b| {
            let shape = b.shape(x)?;
            let q = b.reshape(q, &[0, c as i64, -1])?;
            let q = b.transpose(q, &[0, 2, 1])?;
            // (B, C, HW) is already kᵀ.
            let kt = b.reshape(k, &[0, c as i64, -1])?;
            let v = b.reshape(v, &[0, c as i64, -1])?;
            let v = b.transpose(v, &[0, 2, 1])?;
            let out = b.attention(q, kt, v, None, c)?;
            let out = b.transpose(out, &[0, 2, 1])?;
            b.reshape_to(out, shape)
        })?;
        let out = self.conv(b, out, &p("proj_out"), c, c, 1)?;
        b.scoped(name, |b| b.add(x, out))
    }

    /// Upstream `Upsample`: nearest ×2 then a 3×3 conv.
    fn upsample(
        &self,
        b: &mut GraphBuilder,
        x: Value,
        name: &str,
        c: usize,
    ) -> Result<Value, GraphError> {
        let h = b.scoped(name, |b| upsample(b, x))?;
        self.conv(b, h, &format!("{name}.conv"), c, c, 3)
    }
}

/// Nearest-neighbour ×2 on NCHW: `out[y, x] = in[⌊y/2⌋, ⌊x/2⌋]` (`F.interpolate(mode=
/// "nearest", scale_factor=2)`). `(B, C, H, 2, W, 2)` has the same row-major layout as
/// `(B, C, 2H, 2W)`, so broadcasting each pixel into a 2×2 block and reshaping is exact on
/// every engine. `Resize` would be one node, but only its defaults (`half_pixel`,
/// `round_prefer_floor`) are expressible without string attributes, and their equivalence to
/// floor-nearest at scale 2 rests on each engine's rounding.
///
/// ```text
/// x ─Unsqueeze(3,5)─▶ (B,C,H,1,W,1) ─Expand(1,1,1,2,1,2)─▶ (B,C,H,2,W,2) ─Reshape(Shape(x)·[1,1,2,2])─▶
/// ```
fn upsample(b: &mut GraphBuilder, x: Value) -> Result<Value, GraphError> {
    let shape = b.shape(x)?;
    let factors = b.const_i64(&[1, 1, 2, 2])?;
    let out_shape = b.mul(shape, factors)?;
    let blocks = b.unsqueeze(x, &[3, 5])?;
    let block = b.const_i64(&[1, 1, 1, 2, 1, 2])?;
    let blocks = b.expand(blocks, block)?;
    b.reshape_to(blocks, out_shape)
}

/// A tokenizer's codebook `name` `(rows, width)` as a graph weight: its rows L2-normalised
/// when `normalise` ([`l2_normalize_rows`]), then stored as `{name}.l2_normalized`, because
/// it is no longer the checkpoint tensor and a reader of the weight file must not mistake it
/// for the raw rows; else stored as is.
pub(crate) fn codebook_weight(
    b: &mut GraphBuilder,
    params: &dyn ParamSource,
    name: &str,
    (rows, width): (usize, usize),
    normalise: bool,
) -> Result<Value, GraphError> {
    let stored = if normalise {
        format!("{name}.l2_normalized")
    } else {
        name.to_string()
    };
    b.weight(&stored, DType::F32, &[rows, width], || {
        let mut table = params.read_f32_exact(name, rows * width)?;
        if normalise {
            l2_normalize_rows(&mut table, width);
        }
        Ok(ConstData::F32(table))
    })
}

/// Divides each `width`-wide row of `table` by `max(‖row‖₂, 1e-12)`, as `F.normalize(p=2,
/// dim=-1)` does at every codebook lookup upstream. Tokenizers fold it into the stored table
/// once, in float32 like upstream, so the graph needs a plain Gather.
pub(crate) fn l2_normalize_rows(table: &mut [f32], width: usize) {
    if width == 0 {
        return;
    }
    for row in table.chunks_exact_mut(width) {
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        let denominator = norm.max(L2_NORM_EPS);
        for x in row {
            *x /= denominator;
        }
    }
}

/// `x · sigmoid(x)` (upstream `nonlinearity`).
fn swish(b: &mut GraphBuilder, x: Value) -> Result<Value, GraphError> {
    let s = b.sigmoid(x)?;
    b.mul(x, s)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const NORMALISED_CODEBOOK: &str = "quantize.embedding.weight.l2_normalized";
    use crate::nar::{assert_missing_and_misshapen, Zeros};

    /// The fixture's tokenizer (`vq16-tiny`): VQ-16 shape with narrower channels.
    fn tiny() -> VqConfig {
        VqConfig {
            codebook_size: 256,
            z_channels: 64,
            ch: 32,
            ..VqConfig::vq16()
        }
    }

    fn shape_of<'a>(params: &'a [(String, Vec<usize>)], name: &str) -> Option<&'a [usize]> {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.as_slice())
    }

    #[test]
    fn vq16_parameter_counts_match_the_spec() {
        let config = VqConfig::vq16();
        config.validate().unwrap();
        let params = config.parameters();
        let decoder: usize = params
            .iter()
            .filter(|(n, _)| n.starts_with("decoder."))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(decoder, 42_449_795);
        assert_eq!(config.parameter_count(), 42_583_171);
        assert_eq!(config.upsample_factor(), 16);
        assert_eq!(
            shape_of(&params, "decoder.conv_blocks.1.res.0.nin_shortcut.weight"),
            Some(&[256, 512, 1, 1][..])
        );
        assert_eq!(
            shape_of(&params, "decoder.conv_blocks.3.upsample.conv.weight"),
            Some(&[128, 128, 3, 3][..])
        );
    }

    fn fixture_reference() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures/vq16-tiny/reference.json"
        );
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn fixture_config_reads_and_lists_the_upstream_names() {
        let reference = fixture_reference();
        let config: VqConfig = serde_json::from_value(reference["config"].clone()).unwrap();
        assert_eq!(config, tiny());
        let all: BTreeMap<String, Vec<usize>> =
            serde_json::from_value(reference["parameters"].clone()).unwrap();
        // The fixture's state dict minus what decoding never reads: the encoder,
        // `quant_conv` and the `codebook_used` buffer.
        let unread = ["encoder.", "quant_conv.", "quantize.codebook_used"];
        let expected: BTreeMap<String, Vec<usize>> = all
            .into_iter()
            .filter(|(n, _)| !unread.iter().any(|p| n.starts_with(p)))
            .collect();
        let listed = config.parameters();
        let ours: BTreeMap<String, Vec<usize>> = listed.iter().cloned().collect();
        assert_eq!(ours.len(), listed.len(), "duplicate names");
        assert_eq!(ours, expected);
    }

    #[test]
    fn ch_mult_alias_and_defaults() {
        let config: VqConfig = serde_json::from_str(r#"{"ch_mult": [1, 2]}"#).unwrap();
        assert_eq!(config.decoder_ch_mult, vec![1, 2]);
        assert_eq!(config.num_res_blocks, 2);
        assert!(config.codebook_l2_norm);
        assert_eq!(config.upsample_factor(), 2);
    }

    #[test]
    fn validation_names_the_field() {
        let err = |c: VqConfig| c.validate().unwrap_err().to_string();
        let e = err(VqConfig { ch: 48, ..tiny() });
        assert!(e.contains("decoder_ch_mult[0]") && e.contains("48"), "{e}");
        let e = err(VqConfig {
            decoder_ch_mult: vec![],
            ..tiny()
        });
        assert!(e.contains("decoder_ch_mult"), "{e}");
        let e = err(VqConfig {
            codebook_size: 0,
            ..tiny()
        });
        assert!(e.contains("codebook_size"), "{e}");
        let e = err(VqConfig {
            z_channels: 0,
            ..tiny()
        });
        assert!(e.contains("z_channels"), "{e}");
        let e = err(VqConfig {
            ch: usize::MAX,
            ..tiny()
        });
        assert!(e.contains("ch "), "{e}");
        assert!(matches!(
            VqConfig { ch: 0, ..tiny() }.validate(),
            Err(GraphError::Config(_))
        ));
    }

    /// A VQ-16-shaped tokenizer small enough to build in tests.
    pub(crate) fn small() -> VqConfig {
        VqConfig {
            codebook_size: 16,
            codebook_embed_dim: 4,
            z_channels: 8,
            decoder_ch_mult: vec![1, 2],
            ch: 32,
            num_res_blocks: 1,
            codebook_l2_norm: true,
        }
    }

    #[test]
    fn graph_reads_every_listed_tensor_and_declares_its_io() {
        let config = small();
        let params = Zeros(config.parameters());
        let mut store = WeightStore::inline();
        let model = build_decoder(&config, &params, &mut store).unwrap();
        assert_eq!(model.opset_import[0].version, Some(crate::builder::OPSET));
        let graph = model.graph.unwrap();
        let ops: std::collections::HashSet<&str> = graph
            .node
            .iter()
            .filter_map(|n| n.op_type.as_deref())
            .collect();
        assert!(!ops.contains("GroupNormalization"));
        let inits: std::collections::HashSet<&str> = graph
            .initializer
            .iter()
            .filter_map(|t| t.name.as_deref())
            .collect();
        for (name, _) in config.parameters() {
            let stored = if name == "quantize.embedding.weight" {
                NORMALISED_CODEBOOK
            } else {
                name.as_str()
            };
            assert!(inits.contains(stored), "{stored} not in the graph");
        }
        let (dtype, dims) = crate::builder::describe_io(&graph.input[0]).unwrap();
        assert_eq!(graph.input[0].name.as_deref(), Some(CODES));
        assert_eq!(dtype, DType::I64);
        assert_eq!(
            dims,
            vec![
                Dim::named("batch"),
                Dim::named("height"),
                Dim::named("width")
            ]
        );
        assert_eq!(graph.output[0].name.as_deref(), Some(IMAGE));
        let (dtype, dims) = crate::builder::describe_io(&graph.output[0]).unwrap();
        assert_eq!(dtype, DType::F32);
        // `2*height` and `2*width` are left unnamed for engines to infer.
        assert_eq!(
            dims,
            vec![
                Dim::named("batch"),
                Dim::Fixed(3),
                Dim::named("?"),
                Dim::named("?")
            ]
        );
    }

    #[test]
    fn missing_or_misshapen_tensors_are_errors() {
        let config = small();
        assert_missing_and_misshapen(
            &config.parameters(),
            "decoder.conv_out.bias",
            "quantize.embedding.weight",
            |params| build_decoder(&config, params, &mut WeightStore::inline()),
        );
    }

    #[test]
    fn codebook_rows_are_normalised_in_the_graph() {
        struct Rows;
        impl ParamSource for Rows {
            fn read_f32(&self, name: &str) -> Result<Vec<f32>, GraphError> {
                let config = small();
                let (_, shape) = config
                    .parameters()
                    .into_iter()
                    .find(|(n, _)| n == name)
                    .ok_or_else(|| GraphError::Param(format!("missing {name}")))?;
                let len: usize = shape.iter().product();
                Ok(if name == "quantize.embedding.weight" {
                    // Row 0 is zero (must stay zero), the others (3, 4, 0, 0)·k.
                    (0..len)
                        .map(|i| match (i / 4, i % 4) {
                            (0, _) => 0.0,
                            (r, 0) => 3.0 * r as f32,
                            (r, 1) => 4.0 * r as f32,
                            _ => 0.0,
                        })
                        .collect()
                } else {
                    vec![0.0; len]
                })
            }
        }
        let model = build_decoder(&small(), &Rows, &mut WeightStore::inline()).unwrap();
        let graph = model.graph.unwrap();
        let table = graph
            .initializer
            .iter()
            .find(|t| t.name.as_deref() == Some(NORMALISED_CODEBOOK))
            .unwrap();
        let values: Vec<f32> = table
            .raw_data
            .as_deref()
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(&values[..4], &[0.0; 4]);
        for row in values[4..].chunks_exact(4) {
            assert!(
                (row[0] - 0.6).abs() < 1e-6 && (row[1] - 0.8).abs() < 1e-6,
                "{row:?}"
            );
        }
    }
}
