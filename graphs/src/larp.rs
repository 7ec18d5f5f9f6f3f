//! The LARP video tokenizer's decode path (NAR-SPEC §7, upstream
//! `LARPTokenizer.decode_from_bottleneck`) as one ONNX graph: latent codes → video.
//!
//! ```text
//! codes (B,N) ─Gather(L2-normalised codebook)─out_linear─Add(decoder_latent_pe [+ type])─┐
//! patch queries (1,Q,D) [+ type] ─Expand(B,Q,D)─────────────────────────────────────Concat─┐
//!   ┌──────────────────────────────────────────────────────────────────────────────────────┘
//!   └─decoder.blocks × depth─last Q tokens─final_layer (LayerNorm, Linear)─unpatchify─▶
//!     video (B, c, frames, height, width)
//! ```
//!
//! LARP's latents are learned-query tokens, not patches: the decoder is a plain ViT over
//! `[latents; patch queries]` with full bidirectional attention, and each of the Q patch
//! queries becomes one `pt × p × p` block of pixels. Only this path is built; the encoder, the
//! bottleneck's `in_linear` and the prior model of upstream checkpoints are never read.
//!
//! Everything runs in float32 with opset-17 operators: LayerNorm is built from
//! ReduceMean/Sub/Mul/Sqrt and exact GELU from `Erf` (`LayerNormalization` and `Gelu` would
//! need engines and opsets narx does not assume).

use serde::{Deserialize, Serialize};

use crate::builder::{DType, Dim, GraphBuilder, Value};
use crate::nar::{f32_param, ParamSource};
use crate::onnx::ModelProto;
use crate::vq::codebook_weight;
use crate::weights::WeightStore;
use crate::GraphError;

/// Graph input: latent codes `(batch, N)`, int64, in upstream's latent order.
pub const CODES: &str = "codes";
/// Graph output: the decoded video `(batch, c, frames, height, width)`, float32, nominally in
/// [0, 1] (not clamped, as `decode_from_bottleneck` returns it).
pub const VIDEO: &str = "video";

/// Symbolic dimension names of the decoder graph (the same as the other narx graphs).
pub mod dims {
    pub use crate::vq::dims::BATCH;
}

/// Pre-norm epsilon of timm's `Block` (`nn.LayerNorm` default).
const BLOCK_NORM_EPS: f32 = 1e-5;
/// `final_layer.norm_final` epsilon (upstream `OutputLayer` passes `eps=1e-6`).
const FINAL_NORM_EPS: f32 = 1e-6;
/// timm `Block(mlp_ratio=4)`: the MLP's hidden width over the model width.
const MLP_RATIO: usize = 4;
/// The only decoder module upstream's `decode` can call (`decoder(latents, queries)`).
const PARALLEL_DECODER: &str = "transformer_encoder_parallel";
/// Bottleneck norms upstream accepts (lower-cased); they act only in `project_in` (encoder
/// side), so decoding is the same for all of them.
const BOTTLENECK_NORMS: &[&str] = &["no", "none", "bn_bn", "bn_b", "ln_d", "ln_nd", "ln_d_na"];

/// `LARPTokenizer` constructor arguments (upstream `model.args`, or the hub `config.json`).
/// Only what the decode path reads is typed; everything else real configs carry (`encoder_*`,
/// `prior_model`, `latent_pe_scale_factor`, the regularizer's loss weights, …) is accepted and
/// ignored. Missing fields take upstream's defaults; `bottleneck` has none upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LarpConfig {
    pub bottleneck: BottleneckConfig,
    /// Latent tokens per video (N; 1024 for LARP-L).
    #[serde(default = "default::bottleneck_token_num")]
    pub bottleneck_token_num: usize,
    /// Frame side in pixels (square frames).
    #[serde(default = "default::input_size")]
    pub input_size: usize,
    #[serde(default = "default::frame_num")]
    pub frame_num: usize,
    /// The encoder's patch depth; upstream's `unpatchify` uses it too.
    #[serde(default = "default::temporal_patch_size")]
    pub temporal_patch_size: usize,
    /// The encoder's patch side; upstream's `unpatchify` uses it too.
    #[serde(default = "default::patch_size")]
    pub patch_size: usize,
    #[serde(default = "default::temporal_patch_size")]
    pub decoder_temporal_patch_size: usize,
    #[serde(default = "default::patch_size")]
    pub decoder_patch_size: usize,
    /// Video channels (input and output).
    #[serde(default = "default::in_channels")]
    pub in_channels: usize,
    /// Module of encoder and decoder unless `decoder_name` overrides it.
    #[serde(default = "default::transformer_name")]
    pub transformer_name: String,
    /// Decoder module; `None` or `'none'`/`'no'`/`'null'`/`''` mean `transformer_name`.
    #[serde(default)]
    pub decoder_name: Option<String>,
    #[serde(default = "default::hidden_size")]
    pub decoder_hidden_size: usize,
    #[serde(default = "default::num_heads")]
    pub decoder_num_heads: usize,
    #[serde(default = "default::depth")]
    pub decoder_depth: usize,
    /// Patch queries as the sum of learned per-axis tables (`decoder_t/h/w_embed`) instead of
    /// the fixed 3-D sin-cos buffer `decoder_patch_query_embed`.
    #[serde(default)]
    pub learned_decoder_patch_query_embed: bool,
    /// Adds `decoder_latent_token_type_embed (1, 1, D)` to every latent.
    #[serde(default)]
    pub use_decoder_latent_token_type_embed: bool,
    /// Adds `decoder_patch_query_token_type_embed (1, 1, D)` to every patch query.
    #[serde(default)]
    pub use_decoder_patch_query_token_type_embed: bool,
}

/// Upstream's `bottleneck` spec: `{name, args}` for `models.make`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BottleneckConfig {
    /// Registered module name; upstream has only `bottleneck`.
    pub name: String,
    pub args: BottleneckArgs,
}

/// The `Bottleneck` arguments the decode path depends on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BottleneckArgs {
    /// Codebook row width, input of `out_linear`.
    pub bottleneck_dim: usize,
    /// Encoder-side normalisation (`none`, `ln_d`, …); checked, not used by decoding.
    #[serde(default)]
    pub norm: Option<String>,
    pub regularizer: RegularizerConfig,
}

/// Upstream's `regularizer` spec: `{name, args}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegularizerConfig {
    /// `vq` (a codebook) is the only regularizer codes can be decoded from.
    pub name: String,
    pub args: RegularizerArgs,
}

/// The `SimpleVectorQuantizer` arguments the lookup depends on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegularizerArgs {
    pub codebook_size: usize,
    /// Codebook rows are L2-normalised at lookup (true for LARP).
    #[serde(default)]
    pub l2_normalized: bool,
}

/// Upstream's constructor defaults (`LARPTokenizer.__init__`).
mod default {
    pub fn bottleneck_token_num() -> usize {
        1024
    }
    pub fn input_size() -> usize {
        128
    }
    pub fn frame_num() -> usize {
        16
    }
    pub fn temporal_patch_size() -> usize {
        4
    }
    pub fn patch_size() -> usize {
        8
    }
    pub fn in_channels() -> usize {
        3
    }
    pub fn transformer_name() -> String {
        super::PARALLEL_DECODER.to_string()
    }
    pub fn hidden_size() -> usize {
        768
    }
    pub fn num_heads() -> usize {
        12
    }
    pub fn depth() -> usize {
        6
    }
}

impl LarpConfig {
    /// Checks what the graph relies on; the message names the field. With these checks the
    /// Q = (frame_num/pt)·(input_size/p)² patch queries are exactly the blocks `unpatchify`
    /// lays out, and every shape fits int64.
    pub fn validate(&self) -> Result<(), GraphError> {
        let bad = |m: String| Err(GraphError::Config(m));
        let bottleneck = &self.bottleneck;
        if bottleneck.name != "bottleneck" {
            return bad(format!(
                "bottleneck.name is '{}': upstream's only bottleneck module is 'bottleneck'",
                bottleneck.name
            ));
        }
        let regularizer = &bottleneck.args.regularizer;
        if regularizer.name != "vq" {
            return bad(format!(
                "bottleneck.args.regularizer.name is '{}': only 'vq' (a codebook) can be \
                 decoded from codes",
                regularizer.name
            ));
        }
        if let Some(norm) = &bottleneck.args.norm {
            if !BOTTLENECK_NORMS.contains(&norm.to_lowercase().as_str()) {
                return bad(format!(
                    "bottleneck.args.norm '{norm}' is not one upstream knows ({})",
                    BOTTLENECK_NORMS.join(", ")
                ));
            }
        }
        if bottleneck.args.bottleneck_dim == 0 {
            return bad(
                "bottleneck.args.bottleneck_dim must be positive (upstream's \
                        unprojected bottleneck, bottleneck_dim ≤ 0, is not supported)"
                    .into(),
            );
        }
        for (field, value) in [
            (
                "bottleneck.args.regularizer.args.codebook_size",
                self.codebook_size(),
            ),
            ("bottleneck_token_num", self.bottleneck_token_num),
            ("input_size", self.input_size),
            ("frame_num", self.frame_num),
            ("temporal_patch_size", self.temporal_patch_size),
            ("patch_size", self.patch_size),
            (
                "decoder_temporal_patch_size",
                self.decoder_temporal_patch_size,
            ),
            ("decoder_patch_size", self.decoder_patch_size),
            ("in_channels", self.in_channels),
            ("decoder_hidden_size", self.decoder_hidden_size),
            ("decoder_num_heads", self.decoder_num_heads),
        ] {
            if value == 0 {
                return bad(format!("{field} must be positive"));
            }
        }
        let decoder = self.decoder_module();
        if decoder != PARALLEL_DECODER {
            return bad(format!(
                "decoder_name/transformer_name select '{decoder}': upstream's decode calls the \
                 decoder with latents and queries, which only '{PARALLEL_DECODER}' takes"
            ));
        }
        if !self
            .decoder_hidden_size
            .is_multiple_of(self.decoder_num_heads)
        {
            return bad(format!(
                "decoder_hidden_size {} is not divisible by decoder_num_heads {}",
                self.decoder_hidden_size, self.decoder_num_heads
            ));
        }
        // `unpatchify` reshapes the final layer's pt·p·p·c values per query with the
        // encoder-named sizes, so they must describe the same patches.
        for (encoder, decoder, e, d) in [
            (
                "temporal_patch_size",
                "decoder_temporal_patch_size",
                self.temporal_patch_size,
                self.decoder_temporal_patch_size,
            ),
            (
                "patch_size",
                "decoder_patch_size",
                self.patch_size,
                self.decoder_patch_size,
            ),
        ] {
            if e != d {
                return bad(format!(
                    "{encoder} {e} differs from {decoder} {d}: upstream's unpatchify lays out \
                     the final layer's {decoder} patches with {encoder}, so they must be equal"
                ));
            }
        }
        for (field, value, patch_field, patch) in [
            (
                "input_size",
                self.input_size,
                "decoder_patch_size",
                self.decoder_patch_size,
            ),
            (
                "frame_num",
                self.frame_num,
                "decoder_temporal_patch_size",
                self.decoder_temporal_patch_size,
            ),
        ] {
            if !value.is_multiple_of(patch) {
                return bad(format!(
                    "{field} {value} is not divisible by {patch_field} {patch}"
                ));
            }
        }
        if self.codebook_size() > i64::MAX as usize {
            return bad(format!(
                "bottleneck.args.regularizer.args.codebook_size {} does not fit int64 codes",
                self.codebook_size()
            ));
        }
        let (c, t, h, w) = self.video_shape();
        let sizes = self
            .parameters()
            .into_iter()
            .chain([("video".to_string(), vec![c, t, h, w])])
            .chain([(
                "decoder tokens".to_string(),
                vec![self.bottleneck_token_num, self.queries()],
            )]);
        for (name, shape) in sizes {
            let fits = shape
                .iter()
                .try_fold(1usize, |n, &d| n.checked_mul(d))
                .is_some_and(|n| n <= i64::MAX as usize);
            if !fits {
                return bad(format!("{name} {shape:?} is too large"));
            }
        }
        Ok(())
    }

    /// Latent tokens per video: the length of `codes` (N).
    pub fn latent_tokens(&self) -> usize {
        self.bottleneck_token_num
    }

    /// Codebook rows: the token vocabulary of the generator.
    pub fn codebook_size(&self) -> usize {
        self.bottleneck.args.regularizer.args.codebook_size
    }

    /// The decoded video's `(channels, frames, height, width)`.
    pub fn video_shape(&self) -> (usize, usize, usize, usize) {
        (
            self.in_channels,
            self.frame_num,
            self.input_size,
            self.input_size,
        )
    }

    /// Effective decoder module name, as upstream resolves `decoder_name`.
    fn decoder_module(&self) -> &str {
        match &self.decoder_name {
            Some(name) if !["none", "no", "null", ""].contains(&name.to_lowercase().as_str()) => {
                name
            }
            _ => &self.transformer_name,
        }
    }

    /// The decoder's patch grid `(t, h, w)`: one query per `pt × p × p` output block.
    fn query_grid(&self) -> (usize, usize, usize) {
        let t = self
            .frame_num
            .checked_div(self.decoder_temporal_patch_size)
            .unwrap_or(0);
        let side = self
            .input_size
            .checked_div(self.decoder_patch_size)
            .unwrap_or(0);
        (t, side, side)
    }

    /// Patch queries (Q).
    fn queries(&self) -> usize {
        let (t, h, w) = self.query_grid();
        t.saturating_mul(h).saturating_mul(w)
    }

    /// Values the final linear layer emits per query: `pt·p·p·c`.
    fn patch_values(&self) -> usize {
        self.decoder_temporal_patch_size
            .saturating_mul(self.decoder_patch_size)
            .saturating_mul(self.decoder_patch_size)
            .saturating_mul(self.in_channels)
    }

    fn mlp_hidden(&self) -> usize {
        self.decoder_hidden_size.saturating_mul(MLP_RATIO)
    }

    /// Every tensor the decoder graph reads, with upstream names and shapes: codebook,
    /// `out_linear`, the latent and query tables, `decoder.blocks.*` and `final_layer.*`.
    /// Checkpoints also carry the encoder, `bottleneck.in_linear` and the prior model; the
    /// decoder never reads them.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.decoder_hidden_size;
        let bottleneck_dim = self.bottleneck.args.bottleneck_dim;
        let mut params = vec![(
            "decoder_latent_pe".to_string(),
            vec![1, self.latent_tokens(), d],
        )];
        if self.use_decoder_latent_token_type_embed {
            params.push(("decoder_latent_token_type_embed".into(), vec![1, 1, d]));
        }
        if self.learned_decoder_patch_query_embed {
            let (t, h, w) = self.query_grid();
            params.push(("decoder_h_embed".into(), vec![1, 1, h, 1, d]));
            params.push(("decoder_w_embed".into(), vec![1, 1, 1, w, d]));
            params.push(("decoder_t_embed".into(), vec![1, t, 1, 1, d]));
        } else {
            params.push((
                "decoder_patch_query_embed".into(),
                vec![1, self.queries(), d],
            ));
        }
        if self.use_decoder_patch_query_token_type_embed {
            params.push(("decoder_patch_query_token_type_embed".into(), vec![1, 1, d]));
        }
        let mlp = self.mlp_hidden();
        for i in 0..self.decoder_depth {
            let p = format!("decoder.blocks.{i}");
            params.extend([
                (format!("{p}.norm1.weight"), vec![d]),
                (format!("{p}.norm1.bias"), vec![d]),
                (format!("{p}.attn.qkv.weight"), vec![d.saturating_mul(3), d]),
                (format!("{p}.attn.proj.weight"), vec![d, d]),
                (format!("{p}.attn.proj.bias"), vec![d]),
                (format!("{p}.norm2.weight"), vec![d]),
                (format!("{p}.norm2.bias"), vec![d]),
                (format!("{p}.mlp.fc1.weight"), vec![mlp, d]),
                (format!("{p}.mlp.fc1.bias"), vec![mlp]),
                (format!("{p}.mlp.fc2.weight"), vec![d, mlp]),
                (format!("{p}.mlp.fc2.bias"), vec![d]),
            ]);
        }
        params.extend([
            (
                "bottleneck.out_linear.weight".into(),
                vec![d, bottleneck_dim],
            ),
            ("bottleneck.out_linear.bias".into(), vec![d]),
            (
                "bottleneck.regularizer.embedding.weight".into(),
                vec![self.codebook_size(), bottleneck_dim],
            ),
            ("final_layer.norm_final.weight".into(), vec![d]),
            ("final_layer.norm_final.bias".into(), vec![d]),
            (
                "final_layer.linear.weight".into(),
                vec![self.patch_values(), d],
            ),
            ("final_layer.linear.bias".into(), vec![self.patch_values()]),
        ]);
        params
    }
}

const CODEBOOK: &str = "bottleneck.regularizer.embedding.weight";

/// Builds the decoder graph: `codes (batch, N)` int64 → `video (batch, c, frames, height,
/// width)` float32 ([`LarpConfig::video_shape`]). Weights are read from `params` by upstream
/// name and go to `store`; Linear weights are stored transposed (`{name}.T`), the codebook
/// normalised when the config normalises it.
pub fn build_decoder(
    config: &LarpConfig,
    params: &dyn ParamSource,
    store: &mut WeightStore,
) -> Result<ModelProto, GraphError> {
    config.validate()?;
    let mut b = GraphBuilder::new("larp_decoder", store);
    let tokenizer = Decoder { config, params };
    let n = config.latent_tokens();
    let codes = b.input(CODES, DType::I64, &[Dim::named(dims::BATCH), Dim::Fixed(n)]);
    let latents = tokenizer.latents(&mut b, codes)?;
    let queries = tokenizer.queries(&mut b, codes)?;
    let mut h = b.scoped("decoder", |b| b.concat(&[latents, queries], 1))?;
    for i in 0..config.decoder_depth {
        h = tokenizer.block(&mut b, h, i)?;
    }
    let q = config.queries();
    // Upstream's `h[:, -query_length:]`: the patch queries, after the latents.
    h = b.scoped("decoder", |b| b.slice(h, 1, n as i64, (n + q) as i64))?;
    let (dim, out) = (config.decoder_hidden_size, config.patch_values());
    h = tokenizer.layer_norm(&mut b, h, "final_layer.norm_final", FINAL_NORM_EPS)?;
    h = tokenizer.linear(&mut b, h, "final_layer.linear", dim, out, true)?;
    let video = b.scoped("unpatchify", |b| tokenizer.unpatchify(b, h))?;
    let (c, frames, height, width) = config.video_shape();
    b.output(
        VIDEO,
        video,
        &[
            Dim::named(dims::BATCH),
            Dim::Fixed(c),
            Dim::Fixed(frames),
            Dim::Fixed(height),
            Dim::Fixed(width),
        ],
    )?;
    Ok(b.finish())
}

struct Decoder<'a> {
    config: &'a LarpConfig,
    params: &'a dyn ParamSource,
}

impl Decoder<'_> {
    /// `y = x Wᵀ (+ bias)` for an upstream `Linear(inputs → outputs)` module `name`: its
    /// `{name}.weight` through [`GraphBuilder::linear_transposed`], then `{name}.bias`.
    fn linear(
        &self,
        b: &mut GraphBuilder,
        x: Value,
        name: &str,
        inputs: usize,
        outputs: usize,
        bias: bool,
    ) -> Result<Value, GraphError> {
        b.scoped(name, |b| {
            let weight = format!("{name}.weight");
            let y = b.linear_transposed(x, self.params, &weight, inputs, outputs)?;
            if !bias {
                return Ok(y);
            }
            let bias = f32_param(b, self.params, &format!("{name}.bias"), &[outputs])?;
            b.add(y, bias)
        })
    }

    /// Codes → decoder latents (upstream `bottleneck.decode` then `z + get_decoder_latent_pe()`).
    ///
    /// ```text
    /// codes (B,N) ─Gather(codebook)─▶ (B,N,bd) ─out_linear─▶ (B,N,D) ─Add(pe [+ type])─▶
    /// ```
    fn latents(&self, b: &mut GraphBuilder, codes: Value) -> Result<Value, GraphError> {
        let config = self.config;
        let (rows, width) = (
            config.codebook_size(),
            config.bottleneck.args.bottleneck_dim,
        );
        let normalise = config.bottleneck.args.regularizer.args.l2_normalized;
        let z = b.scoped("bottleneck.regularizer", |b| {
            let table = codebook_weight(b, self.params, CODEBOOK, (rows, width), normalise)?;
            b.gather(table, codes)
        })?;
        let d = config.decoder_hidden_size;
        let z = self.linear(b, z, "bottleneck.out_linear", width, d, true)?;
        b.scoped("decoder_latent_pe", |b| {
            let mut pe = f32_param(
                b,
                self.params,
                "decoder_latent_pe",
                &[1, config.latent_tokens(), d],
            )?;
            if config.use_decoder_latent_token_type_embed {
                let kind = f32_param(
                    b,
                    self.params,
                    "decoder_latent_token_type_embed",
                    &[1, 1, d],
                )?;
                pe = b.add(pe, kind)?;
            }
            b.add(z, pe)
        })
    }

    /// The patch queries broadcast to the batch (upstream `get_decoder_patch_query_embed()
    /// .expand(b, -1, -1)`), `(B, Q, D)`; `codes` only supplies the batch size.
    ///
    /// ```text
    /// decoder_patch_query_embed (1,Q,D)                          ─┐
    ///   or (h_embed + w_embed + t_embed) (1,t,h,w,D) ─Reshape(1,Q,D)─[Add(type)]─Expand(B,Q,D)─▶
    /// ```
    fn queries(&self, b: &mut GraphBuilder, codes: Value) -> Result<Value, GraphError> {
        let config = self.config;
        let (d, q) = (config.decoder_hidden_size, config.queries());
        b.scoped("decoder_patch_query_embed", |b| {
            let mut table = if config.learned_decoder_patch_query_embed {
                let (t, h, w) = config.query_grid();
                let h_embed = f32_param(b, self.params, "decoder_h_embed", &[1, 1, h, 1, d])?;
                let w_embed = f32_param(b, self.params, "decoder_w_embed", &[1, 1, 1, w, d])?;
                let t_embed = f32_param(b, self.params, "decoder_t_embed", &[1, t, 1, 1, d])?;
                let hw = b.add(h_embed, w_embed)?;
                let thw = b.add(hw, t_embed)?;
                b.reshape(thw, &[1, q as i64, d as i64])?
            } else {
                f32_param(b, self.params, "decoder_patch_query_embed", &[1, q, d])?
            };
            if config.use_decoder_patch_query_token_type_embed {
                let kind = f32_param(
                    b,
                    self.params,
                    "decoder_patch_query_token_type_embed",
                    &[1, 1, d],
                )?;
                table = b.add(table, kind)?;
            }
            let codes_shape = b.shape(codes)?;
            let batch = b.slice(codes_shape, 0, 0, 1)?;
            let rest = b.const_i64(&[q as i64, d as i64])?;
            let shape = b.concat(&[batch, rest], 0)?;
            b.expand(table, shape)
        })
    }

    /// timm `Block`: `x + attn(norm1(x))`, then `+ mlp(norm2(x))` (no LayerScale, no
    /// dropout at inference).
    fn block(&self, b: &mut GraphBuilder, x: Value, index: usize) -> Result<Value, GraphError> {
        let p = format!("decoder.blocks.{index}");
        let h = self.layer_norm(b, x, &format!("{p}.norm1"), BLOCK_NORM_EPS)?;
        let h = self.attention(b, h, &format!("{p}.attn"))?;
        let x = b.scoped(&p, |b| b.add(x, h))?;
        let h = self.layer_norm(b, x, &format!("{p}.norm2"), BLOCK_NORM_EPS)?;
        let h = self.mlp(b, h, &format!("{p}.mlp"))?;
        b.scoped(&p, |b| b.add(x, h))
    }

    /// timm `Attention`: fused qkv (no bias), softmax(q·kᵀ·hd^−½) v per head over all tokens
    /// (no mask), heads merged, `proj` (with bias).
    ///
    /// ```text
    /// x ─qkv─Split(D,D,D)─┬─q─Reshape(B,L,H,hd)─Transpose(0,2,1,3)─Mul(hd^−½)─┐
    ///                     ├─k─Reshape(B,L,H,hd)─Transpose(0,2,3,1)──────────MatMul─Softmax─┐
    ///                     └─v─Reshape(B,L,H,hd)─Transpose(0,2,1,3)─────────────────────MatMul─┐
    ///   ┌─────────────────────────────────────────────────────────────────────────────────────┘
    ///   └─Transpose(0,2,1,3)─Reshape(B,L,D)─proj─▶
    /// ```
    fn attention(&self, b: &mut GraphBuilder, x: Value, name: &str) -> Result<Value, GraphError> {
        let d = self.config.decoder_hidden_size;
        let heads = self.config.decoder_num_heads;
        let head_dim = d / heads;
        let qkv = self.linear(b, x, &format!("{name}.qkv"), d, 3 * d, false)?;
        let merged = b.scoped(name, |b| {
            let parts = b.split(qkv, -1, &[d as i64; 3])?;
            let split_heads = |b: &mut GraphBuilder, v: Value, perm: &[i64]| {
                let v = b.reshape(v, &[0, 0, heads as i64, head_dim as i64])?;
                b.transpose(v, perm)
            };
            let q = split_heads(b, parts[0], &[0, 2, 1, 3])?;
            let kt = split_heads(b, parts[1], &[0, 2, 3, 1])?;
            let v = split_heads(b, parts[2], &[0, 2, 1, 3])?;
            let out = b.attention(q, kt, v, None, head_dim)?;
            let out = b.transpose(out, &[0, 2, 1, 3])?;
            b.reshape(out, &[0, 0, d as i64])
        })?;
        self.linear(b, merged, &format!("{name}.proj"), d, d, true)
    }

    /// timm `Mlp`: fc1, exact GELU, fc2 (both with bias).
    fn mlp(&self, b: &mut GraphBuilder, x: Value, name: &str) -> Result<Value, GraphError> {
        let (d, hidden) = (self.config.decoder_hidden_size, self.config.mlp_hidden());
        let h = self.linear(b, x, &format!("{name}.fc1"), d, hidden, true)?;
        let h = b.scoped(&format!("{name}.act"), |b| gelu(b, h))?;
        self.linear(b, h, &format!("{name}.fc2"), hidden, d, true)
    }

    /// `nn.LayerNorm(D, eps)` over the last axis: biased variance, affine
    /// ([`GraphBuilder::normalize`], [`GraphBuilder::affine`]).
    fn layer_norm(
        &self,
        b: &mut GraphBuilder,
        x: Value,
        name: &str,
        eps: f32,
    ) -> Result<Value, GraphError> {
        let d = self.config.decoder_hidden_size;
        b.scoped(name, |b| {
            let normed = b.normalize(x, &[-1], eps)?;
            b.affine(normed, self.params, name, &[d])
        })
    }

    /// Upstream `unpatchify`: `(B, Q, pt·p·p·c)` → `(B, t, h, w, pt, p, p, c)` →
    /// einops `b t h w pt p1 p2 c -> b c (t pt) (h p1) (w p2)`.
    fn unpatchify(&self, b: &mut GraphBuilder, x: Value) -> Result<Value, GraphError> {
        let config = self.config;
        let (t, h, w) = config.query_grid();
        let (pt, p, c) = (
            config.decoder_temporal_patch_size,
            config.decoder_patch_size,
            config.in_channels,
        );
        let blocks = [t, h, w, pt, p, p, c].map(|n| n as i64);
        let x = b.reshape(x, &[&[0][..], &blocks[..]].concat())?;
        let x = b.transpose(x, &[0, 7, 1, 4, 2, 5, 3, 6])?;
        let (_, frames, height, width) = config.video_shape();
        b.reshape(
            x,
            &[0, c as i64, frames as i64, height as i64, width as i64],
        )
    }
}

/// Exact GELU, `0.5·x·(1 + erf(x/√2))` (timm's default `nn.GELU`).
fn gelu(b: &mut GraphBuilder, x: Value) -> Result<Value, GraphError> {
    let inv_sqrt2 = b.scalar(std::f32::consts::FRAC_1_SQRT_2, DType::F32)?;
    let scaled = b.mul(x, inv_sqrt2)?;
    let erf = b.erf(scaled)?;
    let one = b.scalar(1.0, DType::F32)?;
    let gate = b.add(erf, one)?;
    let half = b.scalar(0.5, DType::F32)?;
    let half_x = b.mul(x, half)?;
    b.mul(half_x, gate)
}

#[cfg(test)]
mod tests {
    const NORMALISED_CODEBOOK: &str = "bottleneck.regularizer.embedding.weight.l2_normalized";

    use std::collections::{BTreeMap, HashSet};

    use super::*;
    use crate::nar::{assert_missing_and_misshapen, Zeros};

    fn fixture_reference() -> serde_json::Value {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/fixtures/larp-tiny/reference.json"
        );
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_slice(&bytes).unwrap()
    }

    /// The fixture's tokenizer (`larp-tiny`).
    fn tiny() -> LarpConfig {
        serde_json::from_value(fixture_reference()["config"].clone()).unwrap()
    }

    /// Upstream `cfgs/larp_tokenizer.yaml` `model.args`, with the UCF-101 run's 128×128, 16
    /// frames substituted for `$input_size$` and `$frame_num$`.
    const REAL: &str = r#"{
        "bottleneck": {"name": "bottleneck", "args": {"bottleneck_dim": 16, "norm": "none",
            "regularizer": {"name": "vq", "args": {"codebook_size": 8192,
                "commitment_loss_weight": 0.25, "codebook_loss_weight": 1.0,
                "entropy_loss_weight": 0.0, "entropy_loss_temperature": 0.01,
                "l2_normalized": true, "stochastic": true, "stochastic_temperature": 0.03}}}},
        "prior_model": {"name": "gptc-S", "use_mix_ss": true, "mix_ss_max_ratio": 0.5,
            "mix_ss_peak_steps_ratio": 0.3, "n_rounds": 2, "avg_loss_over_rounds": true,
            "no_grad_before_last_round": false, "no_dropout": false,
            "latent_ce_temperature": 1.0, "args": {"l2_normalized": true}},
        "transformer_name": "transformer_encoder_parallel", "encoder_name": "none",
        "decoder_name": "none", "bottleneck_token_num": 1024, "input_size": 128,
        "frame_num": 16, "temporal_patch_size": 4, "patch_size": 8,
        "decoder_temporal_patch_size": 4, "decoder_patch_size": 8, "in_channels": 3,
        "encoder_hidden_size": 768, "decoder_hidden_size": 768, "encoder_num_heads": 12,
        "decoder_num_heads": 12, "encoder_depth": 12, "decoder_depth": 12,
        "learned_encoder_patch_pe": false, "learned_encoder_latent_query_embed": true,
        "learned_decoder_latent_pe": false, "learned_decoder_patch_query_embed": false,
        "use_encoder_patch_token_type_embed": false,
        "use_encoder_latent_query_token_type_embed": false,
        "use_decoder_latent_token_type_embed": false,
        "use_decoder_patch_query_token_type_embed": true,
        "encoder_query_gaussian_init": true, "latent_pe_scale_factor": 10000,
        "query_init_std": 0.02
    }"#;

    fn shape_of<'a>(params: &'a [(String, Vec<usize>)], name: &str) -> Option<&'a [usize]> {
        params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| s.as_slice())
    }

    #[test]
    fn fixture_parameters_are_the_reference_decoder_path() {
        let reference = fixture_reference();
        let config = tiny();
        config.validate().unwrap();
        assert_eq!(config.latent_tokens(), 48);
        assert_eq!(config.codebook_size(), 128);
        let (c, t, h, w) = config.video_shape();
        assert_eq!(
            serde_json::json!([c, t, h, w]),
            reference["video_shape"],
            "video_shape"
        );
        let all: BTreeMap<String, Vec<usize>> =
            serde_json::from_value(reference["parameters"].clone()).unwrap();
        // The checkpoint minus the encoder side, which the decoder never reads.
        let encoder_side = [
            "encoder.",
            "encoder_",
            "x_embedder.",
            "bottleneck.in_linear.",
        ];
        let expected: BTreeMap<String, Vec<usize>> = all
            .into_iter()
            .filter(|(n, _)| !encoder_side.iter().any(|p| n.starts_with(p)))
            .collect();
        let listed = config.parameters();
        let ours: BTreeMap<String, Vec<usize>> = listed.iter().cloned().collect();
        assert_eq!(ours.len(), listed.len(), "duplicate names");
        assert_eq!(ours, expected);
    }

    #[test]
    fn real_config_reads_with_its_unused_fields() {
        let config: LarpConfig = serde_json::from_str(REAL).unwrap();
        config.validate().unwrap();
        assert_eq!(config.decoder_depth, 12);
        assert!(config.use_decoder_patch_query_token_type_embed);
        assert_eq!(config.video_shape(), (3, 16, 128, 128));
        let params = config.parameters();
        assert_eq!(
            shape_of(&params, "decoder_patch_query_embed"),
            Some(&[1, 1024, 768][..])
        );
        assert_eq!(
            shape_of(&params, "decoder_patch_query_token_type_embed"),
            Some(&[1, 1, 768][..])
        );
        assert_eq!(
            shape_of(&params, "final_layer.linear.weight"),
            Some(&[768, 768][..])
        );
        let count = |prefix: &str| -> usize {
            params
                .iter()
                .filter(|(n, _)| n.starts_with(prefix))
                .map(|(_, s)| s.iter().product::<usize>())
                .sum()
        };
        // NAR-SPEC §7: 12 × 7.09 M blocks + 0.6 M output layer.
        assert_eq!(count("decoder.blocks."), 12 * 7_085_568);
        assert_eq!(count("final_layer."), 592_128);
        // Round trip: what narx writes reads back the same.
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<LarpConfig>(&json).unwrap(), config);
    }

    #[test]
    fn missing_fields_take_upstreams_defaults() {
        let config: LarpConfig = serde_json::from_str(
            r#"{"bottleneck": {"name": "bottleneck", "args": {"bottleneck_dim": 16,
                "regularizer": {"name": "vq", "args": {"codebook_size": 8192}}}},
                "prior_model": {"name": "none"}}"#,
        )
        .unwrap();
        config.validate().unwrap();
        assert_eq!(config.bottleneck_token_num, 1024);
        assert_eq!(config.video_shape(), (3, 16, 128, 128));
        assert_eq!(config.decoder_depth, 6);
        assert_eq!(config.decoder_hidden_size, 768);
        assert_eq!(config.decoder_num_heads, 12);
        assert_eq!(config.transformer_name, PARALLEL_DECODER);
        assert!(!config.bottleneck.args.regularizer.args.l2_normalized);
        assert!(!config.learned_decoder_patch_query_embed);
        assert!(!config.use_decoder_latent_token_type_embed);
        assert!(!config.use_decoder_patch_query_token_type_embed);
        // `bottleneck` has no default upstream.
        assert!(serde_json::from_str::<LarpConfig>("{}").is_err());
    }

    #[test]
    fn learned_queries_and_type_embeds_list_their_tables() {
        let config = LarpConfig {
            learned_decoder_patch_query_embed: true,
            use_decoder_latent_token_type_embed: true,
            use_decoder_patch_query_token_type_embed: true,
            ..tiny()
        };
        let params = config.parameters();
        assert_eq!(shape_of(&params, "decoder_patch_query_embed"), None);
        assert_eq!(
            shape_of(&params, "decoder_h_embed"),
            Some(&[1, 1, 4, 1, 64][..])
        );
        assert_eq!(
            shape_of(&params, "decoder_w_embed"),
            Some(&[1, 1, 1, 4, 64][..])
        );
        assert_eq!(
            shape_of(&params, "decoder_t_embed"),
            Some(&[1, 3, 1, 1, 64][..])
        );
        for name in [
            "decoder_latent_token_type_embed",
            "decoder_patch_query_token_type_embed",
        ] {
            assert_eq!(shape_of(&params, name), Some(&[1, 1, 64][..]), "{name}");
        }
    }

    #[test]
    fn validation_names_the_field() {
        let err = |c: LarpConfig| match c.validate() {
            Err(GraphError::Config(m)) => m,
            other => panic!("expected a config error, got {other:?}"),
        };
        let with_args = |f: &dyn Fn(&mut BottleneckArgs)| {
            let mut c = tiny();
            f(&mut c.bottleneck.args);
            c
        };
        let e = err(with_args(&|a| a.regularizer.name = "skl".into()));
        assert!(e.contains("regularizer.name") && e.contains("vq"), "{e}");
        let e = err(with_args(&|a| a.regularizer.args.codebook_size = 0));
        assert!(e.contains("codebook_size must be positive"), "{e}");
        let e = err(with_args(&|a| a.norm = Some("group".into())));
        assert!(e.contains("bottleneck.args.norm 'group'"), "{e}");
        let e = err(with_args(&|a| a.bottleneck_dim = 0));
        assert!(e.contains("bottleneck_dim must be positive"), "{e}");
        let mut c = tiny();
        c.bottleneck.name = "other".into();
        assert!(err(c).contains("bottleneck.name"));
        // Encoder-side norms do not change decoding.
        with_args(&|a| a.norm = Some("LN_D".into()))
            .validate()
            .unwrap();
        with_args(&|a| a.norm = None).validate().unwrap();

        let e = err(LarpConfig {
            bottleneck_token_num: 0,
            ..tiny()
        });
        assert!(e.contains("bottleneck_token_num must be positive"), "{e}");
        let e = err(LarpConfig {
            in_channels: 0,
            ..tiny()
        });
        assert!(e.contains("in_channels"), "{e}");
        let e = err(LarpConfig {
            decoder_num_heads: 3,
            ..tiny()
        });
        assert!(
            e.contains("decoder_hidden_size 64") && e.contains("decoder_num_heads 3"),
            "{e}"
        );
        let e = err(LarpConfig {
            input_size: 36,
            ..tiny()
        });
        assert!(
            e.contains("input_size 36") && e.contains("decoder_patch_size 8"),
            "{e}"
        );
        let e = err(LarpConfig {
            frame_num: 10,
            ..tiny()
        });
        assert!(
            e.contains("frame_num 10") && e.contains("decoder_temporal_patch_size 4"),
            "{e}"
        );
        let e = err(LarpConfig {
            decoder_patch_size: 4,
            ..tiny()
        });
        assert!(
            e.contains("patch_size 8 differs from decoder_patch_size 4")
                && e.contains("unpatchify"),
            "{e}"
        );
        let e = err(LarpConfig {
            temporal_patch_size: 2,
            ..tiny()
        });
        assert!(e.contains("temporal_patch_size 2 differs"), "{e}");
        let e = err(LarpConfig {
            decoder_name: Some("transformer_encoder_fused".into()),
            ..tiny()
        });
        assert!(e.contains("transformer_encoder_fused"), "{e}");
        // `'none'` falls back to `transformer_name`, as upstream.
        LarpConfig {
            decoder_name: Some("None".into()),
            ..tiny()
        }
        .validate()
        .unwrap();
        let e = err(LarpConfig {
            decoder_hidden_size: usize::MAX / 2,
            decoder_num_heads: 1,
            ..tiny()
        });
        assert!(e.contains("too large"), "{e}");
    }

    /// The name a listed checkpoint tensor has among the graph's initializers.
    fn stored_name(name: &str, config: &LarpConfig) -> String {
        if name == CODEBOOK && config.bottleneck.args.regularizer.args.l2_normalized {
            NORMALISED_CODEBOOK.to_string()
        } else if name.ends_with(".weight") && !name.contains("norm") && name != CODEBOOK {
            format!("{name}.T")
        } else {
            name.to_string()
        }
    }

    #[test]
    fn graph_reads_every_listed_tensor_and_declares_its_io() {
        let plain = tiny();
        let learned = LarpConfig {
            learned_decoder_patch_query_embed: true,
            use_decoder_latent_token_type_embed: true,
            use_decoder_patch_query_token_type_embed: true,
            ..tiny()
        };
        for config in [plain, learned] {
            let params = Zeros(config.parameters());
            let mut store = WeightStore::inline();
            let model = build_decoder(&config, &params, &mut store).unwrap();
            assert_eq!(model.opset_import[0].version, Some(crate::builder::OPSET));
            let graph = model.graph.unwrap();
            let ops: HashSet<&str> = graph
                .node
                .iter()
                .filter_map(|n| n.op_type.as_deref())
                .collect();
            assert!(ops.contains("Erf"));
            assert!(!ops.contains("LayerNormalization") && !ops.contains("Gelu"));
            let inits: HashSet<&str> = graph
                .initializer
                .iter()
                .filter_map(|t| t.name.as_deref())
                .collect();
            for (name, _) in config.parameters() {
                let stored = stored_name(&name, &config);
                assert!(inits.contains(stored.as_str()), "{stored} not in the graph");
            }
            assert_eq!(graph.input[0].name.as_deref(), Some(CODES));
            let (dtype, dims) = crate::builder::describe_io(&graph.input[0]).unwrap();
            assert_eq!(dtype, DType::I64);
            assert_eq!(dims, vec![Dim::named("batch"), Dim::Fixed(48)]);
            assert_eq!(graph.output[0].name.as_deref(), Some(VIDEO));
            let (dtype, dims) = crate::builder::describe_io(&graph.output[0]).unwrap();
            assert_eq!(dtype, DType::F32);
            assert_eq!(
                dims,
                vec![
                    Dim::named("batch"),
                    Dim::Fixed(3),
                    Dim::Fixed(12),
                    Dim::Fixed(32),
                    Dim::Fixed(32)
                ]
            );
        }
    }

    #[test]
    fn missing_or_misshapen_tensors_are_errors() {
        let config = tiny();
        assert_missing_and_misshapen(
            &config.parameters(),
            "decoder.blocks.1.mlp.fc2.bias",
            "final_layer.linear.weight",
            |params| build_decoder(&config, params, &mut WeightStore::inline()),
        );
    }

    /// Linear weights are stored transposed, and the codebook normalised.
    #[test]
    fn stored_tables_are_transposed_and_normalised() {
        struct Counting(LarpConfig);
        impl ParamSource for Counting {
            fn read_f32(&self, name: &str) -> Result<Vec<f32>, GraphError> {
                let (_, shape) = self
                    .0
                    .parameters()
                    .into_iter()
                    .find(|(n, _)| n == name)
                    .ok_or_else(|| GraphError::Param(format!("missing {name}")))?;
                let len: usize = shape.iter().product();
                Ok((0..len).map(|i| i as f32).collect())
            }
        }
        let config = tiny();
        let model = build_decoder(
            &config,
            &Counting(config.clone()),
            &mut WeightStore::inline(),
        )
        .unwrap();
        let graph = model.graph.unwrap();
        let values = |name: &str| -> Vec<f32> {
            let t = graph
                .initializer
                .iter()
                .find(|t| t.name.as_deref() == Some(name))
                .unwrap_or_else(|| panic!("{name}"));
            t.raw_data
                .as_deref()
                .unwrap()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        // out_linear (64, 16) → (16, 64): element (i, o) is upstream's (o, i) = o·16 + i.
        let w = values("bottleneck.out_linear.weight.T");
        assert_eq!(w[1], 16.0);
        assert_eq!(w[64], 1.0);
        // Codebook row 1 = (16, 17, …, 31) / ‖·‖.
        let table = values(NORMALISED_CODEBOOK);
        let row: Vec<f32> = (16..32).map(|i| i as f32).collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((table[16] - 16.0 / norm).abs() < 1e-6);
        let row_norm = table[16..32].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((row_norm - 1.0).abs() < 1e-6);
    }
}
