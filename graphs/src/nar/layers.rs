//! The NAR transformer, top to bottom: embeddings, positions (rotary or learned), blocks
//! (norm → attention → norm → FFN), heads. Each method emits the nodes of one piece under a
//! readable scope.

use super::{
    rotary_table, transposed, HeadSpec, ModelArgs, ModelConfig, NarSpec, ParamSource,
    PositionEncoding, Transformer,
};
use crate::builder::{ConstData, DType, GraphBuilder, Value};
use crate::ops::float_data;
use crate::GraphError;

/// Per-layer K and V values.
pub type KeyValue = (Value, Value);

/// The rotary cosines and sines of a call, `(cos, sin)` each `(B, S, heads, d/2, 1)`: for the
/// query heads and for the key heads (the same values when every query head has its own key
/// head).
#[derive(Clone, Copy)]
pub struct Rotary {
    q: (Value, Value),
    k: (Value, Value),
}

/// How each block's new keys and values join its cache.
#[derive(Clone, Copy)]
pub enum CacheUpdate<'a> {
    /// No cache yet: the new entries are the cache (the prefill).
    Fresh,
    /// `present = Concat(past, new)` along the sequence, per layer.
    Append(&'a [KeyValue]),
    /// `present = past + placement · new`, per layer: `placement (capacity, width)` has one 1
    /// per real entry, in the row of its cache slot, and zero columns for padding, so each
    /// entry lands in its slot of a full-capacity cache exactly (its slot holds zeros before).
    Place(&'a [KeyValue], Value),
}

/// What the block stack hands to the heads, plus each block's grown cache.
pub struct StackOutputs {
    /// Each head's input (the hidden state after its `after_blocks`), in head order.
    pub head_inputs: Vec<Value>,
    pub present: Vec<KeyValue>,
}

pub struct Model<'a> {
    spec: &'a NarSpec,
    params: &'a dyn ParamSource,
    shape: Transformer,
}

impl<'a> Model<'a> {
    pub fn new(spec: &'a NarSpec, params: &'a dyn ParamSource) -> Self {
        Model {
            spec,
            params,
            shape: spec.config.transformer(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        self.shape.vocab_size
    }

    /// The image model's arguments, which captions and the rotary table need.
    pub fn image_args(&self) -> Result<&ModelArgs, GraphError> {
        match &self.spec.config {
            ModelConfig::Image(args) => Ok(args),
            ModelConfig::Video(_) => Err(GraphError::Invalid(
                "the video model has neither captions nor rotary embeddings".into(),
            )),
        }
    }

    fn dtype(&self) -> DType {
        self.spec.dtype
    }

    /// Checkpoint data in the model dtype.
    fn data(&self, name: &str) -> Result<ConstData, GraphError> {
        Ok(float_data(self.params.read_f32(name)?, self.dtype()))
    }

    /// A checkpoint tensor stored as is.
    fn param(&self, b: &mut GraphBuilder, name: &str, dims: &[usize]) -> Result<Value, GraphError> {
        b.weight(name, self.dtype(), dims, || self.data(name))
    }

    /// RMSNorm as upstream: normalise in float32, round to the model dtype, then scale.
    /// Written in the form ONNX Runtime fuses into one `SimplifiedLayerNormalization`.
    ///
    /// ```text
    /// x ─Cast(f32)─┬─Pow(2)─ReduceMean─Add(eps)─Sqrt─┐
    ///              └─────────────────────────────────Div─Cast(dtype)─Mul(weight)
    /// ```
    fn rms_norm(&self, b: &mut GraphBuilder, x: Value, weight: &str) -> Result<Value, GraphError> {
        let d = self.shape.dim;
        let eps = self.shape.norm_eps as f32;
        b.scoped(weight.trim_end_matches(".weight"), |b| {
            let x32 = b.cast(x, DType::F32)?;
            let two = b.scalar(2.0, DType::F32)?;
            let square = b.pow(x32, two)?;
            let mean = b.reduce_mean(square, &[-1])?;
            let eps = b.scalar(eps, DType::F32)?;
            let var = b.add(mean, eps)?;
            let root = b.sqrt(var)?;
            let normed = b.div(x32, root)?;
            let normed = b.cast(normed, self.dtype())?;
            let w = self.param(b, weight, &[d])?;
            b.mul(normed, w)
        })
    }

    /// Class labels `(B,)` → `(B, 1, D)`; label `num_classes` is the null class.
    pub fn class_embedding(
        &self,
        b: &mut GraphBuilder,
        labels: Value,
    ) -> Result<Value, GraphError> {
        let (_, classes) = self
            .spec
            .config
            .classes()
            .ok_or_else(|| GraphError::Invalid("this model is not class-conditional".into()))?;
        b.scoped("cls_embedding", |b| {
            let table = self.embedding_table(b)?;
            let (v, rows) = (self.shape.vocab_size as i64, classes as i64);
            // A slice of constants, which runtimes fold, rather than integer arithmetic on
            // the labels (TensorRT 8.6 computes INT64 in INT32).
            let classes = b.slice(table, 0, v, v + rows)?;
            let e = b.gather(classes, labels)?;
            b.unsqueeze(e, &[1])
        })
    }

    /// Caption features `(B, C, caption_dim)` → `(B, C, D)` through the bias-free tanh-GELU MLP;
    /// rows whose `null` flag is set use the learned unconditional caption instead.
    ///
    /// ```text
    /// Where(null, uncond_embedding, features) ─fc1─GELU(tanh)─fc2─▶
    /// ```
    pub fn caption_embedding(
        &self,
        b: &mut GraphBuilder,
        features: Value,
        null: Value,
    ) -> Result<Value, GraphError> {
        let args = self.image_args()?;
        let (c, cd, d) = (args.cls_token_num, args.caption_dim, args.dim);
        b.scoped("cls_embedding", |b| {
            let features = b.cast(features, self.dtype())?;
            let uncond = self.param(b, "cls_embedding.uncond_embedding", &[c, cd])?;
            let null = b.unsqueeze(null, &[1, 2])?;
            let x = b.where_(null, uncond, features)?;
            let h =
                b.linear_transposed(x, self.params, "cls_embedding.cap_proj.fc1.weight", cd, d)?;
            let h = b.scoped("gelu", |b| gelu_tanh(b, h))?;
            b.linear_transposed(h, self.params, "cls_embedding.cap_proj.fc2.weight", d, d)
        })
    }

    /// Image tokens `(B, S)` → `(B, S, D)`; for class-conditional models token `V + label`
    /// embeds class `label` (see [`Self::embedding_table`]).
    pub fn token_embedding(
        &self,
        b: &mut GraphBuilder,
        tokens: Value,
    ) -> Result<Value, GraphError> {
        b.scoped("tok_embeddings", |b| {
            let table = self.embedding_table(b)?;
            b.gather(table, tokens)
        })
    }

    /// The rows both graphs gather from: the image tokens' `(V, D)` table, followed for
    /// class-conditional models by the class table, so that the step graph can embed a
    /// class and run the prefill as a step over an empty cache (one session, one copy of
    /// the weights in memory).
    fn embedding_table(&self, b: &mut GraphBuilder) -> Result<Value, GraphError> {
        let (v, d) = (self.shape.vocab_size, self.shape.dim);
        let Some((_, classes)) = self.spec.config.classes() else {
            return self.param(b, "tok_embeddings.weight", &[v, d]);
        };
        b.weight(
            super::names::TOKEN_AND_CLASS_EMBEDDINGS,
            self.dtype(),
            &[v + classes, d],
            || {
                let mut rows = self.params.read_f32_exact("tok_embeddings.weight", v * d)?;
                rows.extend(
                    self.params
                        .read_f32_exact("cls_embedding.embedding_table.weight", classes * d)?,
                );
                Ok(float_data(rows, self.dtype()))
            },
        )
    }

    /// Visible/hidden (bool) → additive bias (0 / −∞), float32.
    pub fn bias_from_visibility(
        &self,
        b: &mut GraphBuilder,
        visible: Value,
    ) -> Result<Value, GraphError> {
        let zero = b.scalar(0.0, DType::F32)?;
        let hidden = b.scalar(f32::NEG_INFINITY, DType::F32)?;
        b.where_(visible, zero, hidden)
    }

    /// The prefill's condition mask (NAR-SPEC §3.2–3.3): causal, AND the caption mask for
    /// captions, then the diagonal forced visible (the identity quirk that gives padding
    /// tokens a self-only row).
    pub fn prefill_bias(
        &self,
        b: &mut GraphBuilder,
        key_visible: Option<Value>,
    ) -> Result<Value, GraphError> {
        let c = self.spec.condition_len();
        let causal: Vec<bool> = (0..c * c).map(|i| i % c <= i / c).collect();
        let causal = b.constant(ConstData::Bool(causal), &[c, c])?;
        let visible = match key_visible {
            None => causal,
            Some(keys) => {
                let keys = b.unsqueeze(keys, &[1, 2])?;
                let allowed = b.and(causal, keys)?;
                let eye: Vec<bool> = (0..c * c).map(|i| i % c == i / c).collect();
                let eye = b.constant(ConstData::Bool(eye), &[c, c])?;
                b.or(allowed, eye)?
            }
        };
        self.bias_from_visibility(b, visible)
    }

    /// All blocks over `x (B, S, D)` at absolute `positions (S,)`.
    pub fn forward(
        &self,
        b: &mut GraphBuilder,
        x: Value,
        positions: Value,
        attention_bias: Value,
        cache: CacheUpdate,
    ) -> Result<StackOutputs, GraphError> {
        let (mut h, rotary) = match self.spec.config.positions() {
            PositionEncoding::Rotary2d => {
                let rotary = b.scoped("rotary", |b| self.rotary(b, x, positions))?;
                (x, Some(rotary))
            }
            PositionEncoding::Learned { rows } => {
                let h = b.scoped("abs_pe", |b| {
                    let table =
                        b.weight("abs_pe", self.dtype(), &[rows, self.shape.dim], || {
                            self.data("abs_pe")
                        })?;
                    let pe = b.gather(table, positions)?;
                    b.add(x, pe)
                })?;
                (h, None)
            }
        };
        let heads = self.spec.config.heads();
        let mut head_inputs = vec![None; heads.len()];
        let mut present = Vec::new();
        for i in 0..=self.spec.config.blocks() {
            for (slot, head) in head_inputs.iter_mut().zip(&heads) {
                if head.after_blocks == i {
                    *slot = Some(h);
                }
            }
            if i == self.spec.config.blocks() {
                break;
            }
            let (out, kv) = b.scoped(&format!("layers.{i}"), |b| {
                self.block(b, i, h, rotary, attention_bias, cache)
            })?;
            h = out;
            present.push(kv);
        }
        let head_inputs = head_inputs
            .into_iter()
            .zip(&heads)
            .map(|(input, head)| {
                input.ok_or_else(|| {
                    GraphError::Invalid(format!("head {} reads past the last block", head.name))
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(StackOutputs {
            head_inputs,
            present,
        })
    }

    /// Cosines and sines for `positions`, expanded to `(B, S, heads, d/2, 1)` (the batch of
    /// the embeddings `x (B, S, D)`) for the query heads and for the key heads, once per call
    /// for every block. The rotation's products then multiply tensors of one shape: tract
    /// runs a product broadcast over middle axes element by element, which took a fifth of
    /// its generation time.
    fn rotary(
        &self,
        b: &mut GraphBuilder,
        x: Value,
        positions: Value,
    ) -> Result<Rotary, GraphError> {
        let (cos, sin, dims) = rotary_table(self.image_args()?, self.spec.grid[0]);
        let half = dims[1] as i64;
        let mut pick = |table: ConstData| -> Result<Value, GraphError> {
            let table = b.constant(table, &dims)?;
            let rows = b.gather(table, positions)?;
            b.reshape(rows, &[1, -1, 1, half, 1])
        };
        let (cos, sin) = (pick(cos)?, pick(sin)?);
        let shape = b.shape(x)?;
        let batch_and_len = b.slice(shape, 0, 0, 2)?;
        let mut expanded = |heads: usize| -> Result<(Value, Value), GraphError> {
            let rest = b.const_i64(&[heads as i64, half, 1])?;
            let shape = b.concat(&[batch_and_len, rest], 0)?;
            Ok((b.expand(cos, shape)?, b.expand(sin, shape)?))
        };
        let (heads, kv_heads) = (self.shape.n_head, self.shape.kv_heads());
        let q = expanded(heads)?;
        let k = if kv_heads == heads {
            q
        } else {
            expanded(kv_heads)?
        };
        Ok(Rotary { q, k })
    }

    /// Rotates interleaved pairs of `x (B, S, heads, d)` in float32 (NAR-SPEC §1.7) with
    /// `(cos, sin)` from [`Rotary`].
    ///
    /// ```text
    /// x ─Cast(f32)─Reshape(.., d/2, 2)─┬─x0─┐  x0'= x0·cos − x1·sin
    ///                                  └─x1─┴─ x1'= x1·cos + x0·sin ─Concat─Reshape─Cast─▶
    /// ```
    fn rotate(
        &self,
        b: &mut GraphBuilder,
        x: Value,
        rotary: (Value, Value),
    ) -> Result<Value, GraphError> {
        let (cos, sin) = rotary;
        let x = b.cast(x, DType::F32)?;
        let pairs = b.reshape(x, &[0, 0, 0, -1, 2])?;
        let x0 = b.slice(pairs, 4, 0, 1)?;
        let x1 = b.slice(pairs, 4, 1, 2)?;
        let x0c = b.mul(x0, cos)?;
        let x1s = b.mul(x1, sin)?;
        let first = b.sub(x0c, x1s)?;
        let x1c = b.mul(x1, cos)?;
        let x0s = b.mul(x0, sin)?;
        let second = b.add(x1c, x0s)?;
        let rotated = b.concat(&[first, second], 4)?;
        let rotated = b.reshape(rotated, &[0, 0, 0, -1])?;
        b.cast(rotated, self.dtype())
    }

    /// `u = x + Attn(RMSNorm(x))`, `y = u + FFN(RMSNorm(u))`.
    fn block(
        &self,
        b: &mut GraphBuilder,
        layer: usize,
        x: Value,
        rotary: Option<Rotary>,
        attention_bias: Value,
        cache: CacheUpdate,
    ) -> Result<(Value, KeyValue), GraphError> {
        let p = |s: &str| format!("layers.{layer}.{s}");
        let normed = self.rms_norm(b, x, &p("attention_norm.weight"))?;
        let (attended, kv) = b.scoped("attn", |b| {
            self.attention(b, layer, normed, rotary, attention_bias, cache)
        })?;
        let u = b.add(x, attended)?;
        let normed = self.rms_norm(b, u, &p("ffn_norm.weight"))?;
        let ffn = b.scoped("ffn", |b| self.feed_forward(b, layer, normed))?;
        Ok((b.add(u, ffn)?, kv))
    }

    /// Fused-QKV attention with the cache appended or placed (module docs), grouped-query capable;
    /// Q and K are rotated only in the image model.
    ///
    /// ```text
    /// x ─wqkv─Split─┬─Q─Reshape─rotate─Transpose──────────────────────┐
    ///               ├─K─Reshape─rotate─Transpose─Concat(past K)─[repeat]┴─QKᵀ/√d + bias─Softmax─┐
    ///               └─V─Reshape────────Transpose─Concat(past V)─[repeat]─────────────────────MatMul─wo─▶
    /// ```
    fn attention(
        &self,
        b: &mut GraphBuilder,
        layer: usize,
        x: Value,
        rotary: Option<Rotary>,
        attention_bias: Value,
        cache: CacheUpdate,
    ) -> Result<(Value, KeyValue), GraphError> {
        let t = &self.shape;
        let (d, h, kv, hd) = (t.dim, t.n_head, t.kv_heads(), t.head_dim());
        let qkv_width = (h + 2 * kv) * hd;
        let qkv = b.linear_transposed(
            x,
            self.params,
            &format!("layers.{layer}.attention.wqkv.weight"),
            d,
            qkv_width,
        )?;
        let parts = b.split(
            qkv,
            -1,
            &[(h * hd) as i64, (kv * hd) as i64, (kv * hd) as i64],
        )?;
        let q = b.reshape(parts[0], &[0, 0, h as i64, hd as i64])?;
        let k = b.reshape(parts[1], &[0, 0, kv as i64, hd as i64])?;
        let v = b.reshape(parts[2], &[0, 0, kv as i64, hd as i64])?;
        let (q, k) = match rotary {
            Some(rotary) => (
                b.scoped("rotary_q", |b| self.rotate(b, q, rotary.q))?,
                b.scoped("rotary_k", |b| self.rotate(b, k, rotary.k))?,
            ),
            None => (q, k),
        };
        let q = b.transpose(q, &[0, 2, 1, 3])?;
        let k = b.transpose(k, &[0, 2, 1, 3])?;
        let v = b.transpose(v, &[0, 2, 1, 3])?;
        let (k, v) = match cache {
            CacheUpdate::Fresh => (k, v),
            CacheUpdate::Append(past) => {
                let (pk, pv) = past[layer];
                (b.concat(&[pk, k], 2)?, b.concat(&[pv, v], 2)?)
            }
            CacheUpdate::Place(past, placement) => {
                let (pk, pv) = past[layer];
                let placed_k = b.matmul(placement, k)?;
                let placed_v = b.matmul(placement, v)?;
                (b.add(pk, placed_k)?, b.add(pv, placed_v)?)
            }
        };
        let (k_all, v_all) = if kv < h {
            (self.repeat_kv(b, k)?, self.repeat_kv(b, v)?)
        } else {
            (k, v)
        };
        // Scores, softmax and the weighted sum in float32, as upstream's MATH backend.
        let q = b.cast(q, DType::F32)?;
        let k_all = b.cast(k_all, DType::F32)?;
        let kt = b.transpose(k_all, &[0, 1, 3, 2])?;
        let v_all = b.cast(v_all, DType::F32)?;
        let out = b.attention(q, kt, v_all, Some(attention_bias), hd)?;
        let out = b.cast(out, self.dtype())?;
        let out = b.transpose(out, &[0, 2, 1, 3])?;
        let out = b.reshape(out, &[0, 0, d as i64])?;
        let out = b.linear_transposed(
            out,
            self.params,
            &format!("layers.{layer}.attention.wo.weight"),
            d,
            d,
        )?;
        Ok((out, (k, v)))
    }

    /// `(B, kv, T, d)` → `(B, heads, T, d)`, each kv head repeated for its query group
    /// (upstream's `repeat_interleave`).
    fn repeat_kv(&self, b: &mut GraphBuilder, x: Value) -> Result<Value, GraphError> {
        let t = &self.shape;
        let group = (t.n_head / t.kv_heads()) as i64;
        let x = b.unsqueeze(x, &[2])?;
        let shape = b.const_i64(&[1, 1, group, 1, 1])?;
        let x = b.expand(x, shape)?;
        b.reshape(x, &[0, t.n_head as i64, -1, t.head_dim() as i64])
    }

    /// SwiGLU: `w2(silu(w1 x) ⊙ w3 x)`.
    fn feed_forward(
        &self,
        b: &mut GraphBuilder,
        layer: usize,
        x: Value,
    ) -> Result<Value, GraphError> {
        let (d, f) = (self.shape.dim, self.shape.ffn_hidden());
        let p = |s: &str| format!("layers.{layer}.feed_forward.{s}.weight");
        // w1 and w3 read the same input: one MatMul over both, stored `(d, 2f)`. One larger
        // product runs faster than two, and a QDQ model then has one quantised input per
        // product (ONNX Runtime merges identical QuantizeLinear nodes, and does not fuse a
        // shared one into integer MatMuls).
        let (w1, w3) = (p("w1"), p("w3"));
        let w13 = b.weight(&format!("{w1}+w3.T"), self.dtype(), &[d, 2 * f], || {
            let mut rows = self.params.read_f32_exact(&w1, f * d)?;
            rows.extend(self.params.read_f32_exact(&w3, f * d)?);
            Ok(float_data(transposed(&rows, 2 * f, d), self.dtype()))
        })?;
        let both = b.matmul(x, w13)?;
        let halves = b.split(both, -1, &[f as i64, f as i64])?;
        let (gate, up) = (halves[0], halves[1]);
        let sig = b.sigmoid(gate)?;
        let gate = b.mul(gate, sig)?;
        let hidden = b.mul(gate, up)?;
        b.linear_transposed(hidden, self.params, &p("w2"), f, d)
    }

    /// One head's float32 logits for the rows `mix (R, B)` makes of the batch: its RMSNorm,
    /// the mix, its bias-free projection, then the cast (upstream computes the projection in
    /// the model dtype and upcasts the result).
    ///
    /// The projection is linear and so are guidance and the averaging of heads, so a mix of
    /// `s·cond + (1 − s)·uncond` rows gives the guided logits directly, projecting half the
    /// rows; the identity mix gives every row's own logits.
    ///
    /// ```text
    /// x ─RMSNorm─Reshape(B, S·D)─MatMul(mix, ·)─Reshape(R, S, D)─projection─Cast(f32)─▶
    /// ```
    pub fn head(
        &self,
        b: &mut GraphBuilder,
        head: &HeadSpec,
        input: Value,
        mix: Value,
    ) -> Result<Value, GraphError> {
        let (d, v) = (self.shape.dim, self.shape.vocab_size);
        b.scoped(&format!("head_{}", head.name), |b| {
            let x = self.rms_norm(b, input, head.norm)?;
            // Mixed in float32, where upstream guides.
            let x = b.cast(x, DType::F32)?;
            let rows = b.reshape(x, &[0, -1])?;
            let mixed = b.matmul(mix, rows)?;
            let x = b.reshape(mixed, &[0, -1, d as i64])?;
            let x = b.cast(x, self.dtype())?;
            let logits = b.linear_transposed(x, self.params, head.projection, d, v)?;
            b.cast(logits, DType::F32)
        })
    }
}

/// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, in the dtype of `x`.
fn gelu_tanh(b: &mut GraphBuilder, x: Value) -> Result<Value, GraphError> {
    let dt = x.dtype();
    let x2 = b.mul(x, x)?;
    let x3 = b.mul(x2, x)?;
    let coeff = b.scalar(0.044715, dt)?;
    let cubic = b.mul(x3, coeff)?;
    let inner = b.add(x, cubic)?;
    let sqrt_2_over_pi = b.scalar((2.0f64 / std::f64::consts::PI).sqrt() as f32, dt)?;
    let inner = b.mul(inner, sqrt_2_over_pi)?;
    let t = b.tanh(inner)?;
    let one = b.scalar(1.0, dt)?;
    let t = b.add(t, one)?;
    let half = b.scalar(0.5, dt)?;
    let hx = b.mul(x, half)?;
    b.mul(hx, t)
}
