//! The upstream `ModelArgs` (NAR-SPEC §1.1) and what follows from it: head size, FFN size,
//! condition length, the parameter list a checkpoint must hold (§5); and [`ModelConfig`],
//! which holds either family's arguments and answers what the graphs and the manifest ask.

use serde::{Deserialize, Deserializer, Serialize};

use super::names;
use super::video::VideoArgs;
use crate::GraphError;

/// Upstream `ModelArgs`, field for field, with upstream's defaults. Training-only fields are
/// accepted (configs copied from training runs carry them) and ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelArgs {
    pub dim: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: Option<usize>,
    pub multiple_of: usize,
    pub ffn_dim_multiplier: Option<f64>,
    pub rope_base: f64,
    pub norm_eps: f64,
    pub num_classes: usize,
    pub caption_dim: usize,
    pub class_dropout_prob: f64,
    pub model_type: String,
    pub vocab_size: usize,
    pub cls_token_num: usize,
    pub block_size: usize,
    pub medusa_attention_num: usize,
    #[serde(skip_serializing)]
    pub initializer_range: Option<f64>,
    #[serde(skip_serializing)]
    pub token_dropout_p: Option<f64>,
    #[serde(skip_serializing)]
    pub attn_dropout_p: Option<f64>,
    #[serde(skip_serializing)]
    pub resid_dropout_p: Option<f64>,
    #[serde(skip_serializing)]
    pub ffn_dropout_p: Option<f64>,
    #[serde(skip_serializing)]
    pub drop_path_rate: Option<f64>,
    #[serde(skip_serializing)]
    pub max_batch_size: Option<usize>,
    #[serde(skip_serializing)]
    pub max_seq_len: Option<usize>,
}

impl Default for ModelArgs {
    fn default() -> Self {
        ModelArgs {
            dim: 4096,
            n_layer: 32,
            n_head: 32,
            n_kv_head: None,
            multiple_of: 256,
            ffn_dim_multiplier: None,
            rope_base: 10000.0,
            norm_eps: 1e-5,
            num_classes: 1000,
            caption_dim: 2048,
            class_dropout_prob: 0.1,
            model_type: "c2i".into(),
            vocab_size: 16384,
            cls_token_num: 1,
            block_size: 256,
            medusa_attention_num: 1,
            initializer_range: None,
            token_dropout_p: None,
            attn_dropout_p: None,
            resid_dropout_p: None,
            ffn_dropout_p: None,
            drop_path_rate: None,
            max_batch_size: None,
            max_seq_len: None,
        }
    }
}

/// How a NAR image model is conditioned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConditionKind {
    /// A class label; row `num_classes` of the table is the null class.
    Class,
    /// T5 caption features, `cls_token_num` rows of `caption_dim`.
    Caption,
}

impl ModelArgs {
    /// Checks what the graphs rely on; the message names the field.
    pub fn validate(&self) -> Result<(), GraphError> {
        let bad = |m: String| Err(GraphError::Config(m));
        let transformer = self.transformer();
        transformer.validate()?;
        if !transformer.head_dim().is_multiple_of(4) {
            return bad(format!(
                "head dim {} must be a multiple of 4 for the 2-D rotary table",
                transformer.head_dim()
            ));
        }
        match (self.medusa_attention_num, self.model_type.as_str()) {
            (1, _) | (0, "c2i") => {}
            (0, _) => {
                return bad("LlamaGen models (medusa_attention_num 0) are supported for c2i".into())
            }
            (n, _) => {
                return bad(format!(
                    "medusa_attention_num {n} is not supported (NAR has one extra block, \
                     LlamaGen none)"
                ))
            }
        }
        match self.model_type.as_str() {
            "c2i" if self.cls_token_num != 1 => bad(format!(
                "c2i models have cls_token_num 1, not {}",
                self.cls_token_num
            )),
            "c2i" if self.num_classes == 0 => bad("num_classes must be positive".into()),
            "t2i" if self.cls_token_num == 0 || self.caption_dim == 0 => {
                bad("t2i models need cls_token_num and caption_dim".into())
            }
            "t2i" if self.caption_dim > MAX_SIZE => bad(format!(
                "caption_dim {} is more than {MAX_SIZE}",
                self.caption_dim
            )),
            "c2i" | "t2i" => Ok(()),
            other => bad(format!(
                "model_type {other:?} is neither \"c2i\" nor \"t2i\""
            )),
        }
    }

    pub fn condition(&self) -> ConditionKind {
        if self.model_type == "t2i" {
            ConditionKind::Caption
        } else {
            ConditionKind::Class
        }
    }

    /// The transformer's shape.
    pub fn transformer(&self) -> Transformer {
        Transformer {
            dim: self.dim,
            n_layer: self.n_layer,
            n_head: self.n_head,
            n_kv_head: self.n_kv_head,
            multiple_of: self.multiple_of,
            ffn_dim_multiplier: self.ffn_dim_multiplier,
            norm_eps: self.norm_eps,
            vocab_size: self.vocab_size,
        }
    }

    /// Whether this is LlamaGen (NAR's backbone without the extra block and the down head),
    /// which generates in raster order only.
    pub fn is_llamagen(&self) -> bool {
        self.medusa_attention_num == 0
    }

    /// Transformer blocks: the trunk plus NAR's extra ("medusa") block.
    pub fn blocks(&self) -> usize {
        self.n_layer + self.medusa_attention_num
    }

    /// Rows of the class table: one per class, plus the null class when trained with dropout.
    pub fn class_rows(&self) -> usize {
        class_rows(self.num_classes, self.class_dropout_prob)
    }

    /// The grid side implied by `block_size` (`n²`), if it is a square.
    pub fn default_grid(&self) -> Option<usize> {
        let n = (self.block_size as f64).sqrt().round() as usize;
        (n * n == self.block_size && n > 0).then_some(n)
    }

    /// The right head reads the trunk, the down head the extra block (NAR-SPEC §1.3);
    /// LlamaGen has the right head only (its "next token" head).
    pub fn heads(&self) -> Vec<HeadSpec> {
        let right = HeadSpec {
            name: "right",
            output: names::LOGITS_RIGHT,
            axis: 1,
            after_blocks: self.n_layer,
            norm: "norm.weight",
            projection: "output.weight",
        };
        if self.is_llamagen() {
            return vec![right];
        }
        let down = HeadSpec {
            name: "down",
            output: names::LOGITS_DOWN,
            axis: 0,
            after_blocks: self.n_layer + 1,
            norm: "medusa_norm.weight",
            projection: "medusa_output.weight",
        };
        vec![right, down]
    }

    /// Every tensor a checkpoint must hold, with upstream names and shapes (NAR-SPEC §5).
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.dim;
        let mut params = match self.condition() {
            ConditionKind::Class => vec![(
                "cls_embedding.embedding_table.weight".to_string(),
                vec![self.class_rows(), d],
            )],
            ConditionKind::Caption => vec![
                (
                    "cls_embedding.cap_proj.fc1.weight".to_string(),
                    vec![d, self.caption_dim],
                ),
                ("cls_embedding.cap_proj.fc2.weight".to_string(), vec![d, d]),
                (
                    "cls_embedding.uncond_embedding".to_string(),
                    vec![self.cls_token_num, self.caption_dim],
                ),
            ],
        };
        params.extend(
            self.transformer()
                .body_parameters(self.blocks(), &self.heads()),
        );
        params
    }
}

/// Upstream's `LabelEmbedder`: one row per class, plus the null class when trained with
/// label dropout.
pub(super) fn class_rows(num_classes: usize, class_dropout_prob: f64) -> usize {
    num_classes + usize::from(class_dropout_prob > 0.0)
}

/// Most a width or vocabulary may be, and most blocks: far beyond any real model, low
/// enough that every count derived from them (parameters, FFN width) fits in a 64-bit
/// `usize`.
const MAX_SIZE: usize = 1 << 20;
const MAX_LAYERS: usize = 1 << 12;
/// Most `ffn_dim_multiplier` may be (upstream presets use about 1.3), for the same reason.
const MAX_FFN_MULTIPLIER: f64 = 16.0;

/// The transformer shape both families share (blocks, attention, FFN, vocabulary).
#[derive(Clone, Debug, PartialEq)]
pub struct Transformer {
    pub dim: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: Option<usize>,
    pub multiple_of: usize,
    pub ffn_dim_multiplier: Option<f64>,
    pub norm_eps: f64,
    pub vocab_size: usize,
}

impl Transformer {
    pub(super) fn validate(&self) -> Result<(), GraphError> {
        let bad = |m: String| Err(GraphError::Config(m));
        if self.dim == 0 || self.n_layer == 0 || self.n_head == 0 || self.vocab_size == 0 {
            return bad("dim, n_layer, n_head and vocab_size must be positive".into());
        }
        if !self.dim.is_multiple_of(self.n_head) {
            return bad(format!(
                "dim {} is not a multiple of n_head {}",
                self.dim, self.n_head
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.n_head.is_multiple_of(kv) {
            return bad(format!("n_kv_head {kv} must divide n_head {}", self.n_head));
        }
        if self.multiple_of == 0 {
            return bad("multiple_of must be positive".into());
        }
        for (field, value, max) in [
            ("dim", self.dim, MAX_SIZE),
            ("n_layer", self.n_layer, MAX_LAYERS),
            ("vocab_size", self.vocab_size, MAX_SIZE),
            ("multiple_of", self.multiple_of, MAX_SIZE),
        ] {
            if value > max {
                return bad(format!("{field} {value} is more than {max}"));
            }
        }
        if let Some(m) = self.ffn_dim_multiplier {
            if !(m > 0.0 && m <= MAX_FFN_MULTIPLIER) {
                return bad(format!(
                    "ffn_dim_multiplier {m} must be in (0, {MAX_FFN_MULTIPLIER}]"
                ));
            }
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_head
    }

    pub fn kv_heads(&self) -> usize {
        self.n_kv_head.unwrap_or(self.n_head)
    }

    /// SwiGLU hidden size, as upstream's `FeedForward` computes it.
    pub fn ffn_hidden(&self) -> usize {
        let mut hidden = 2 * (4 * self.dim) / 3;
        if let Some(m) = self.ffn_dim_multiplier {
            hidden = (m * hidden as f64) as usize;
        }
        hidden.div_ceil(self.multiple_of) * self.multiple_of
    }

    /// The token table, `blocks` blocks and the heads' norms and projections.
    pub(super) fn body_parameters(
        &self,
        blocks: usize,
        heads: &[HeadSpec],
    ) -> Vec<(String, Vec<usize>)> {
        let (d, f, v) = (self.dim, self.ffn_hidden(), self.vocab_size);
        let qkv = (self.n_head + 2 * self.kv_heads()) * self.head_dim();
        let mut params = vec![("tok_embeddings.weight".to_string(), vec![v, d])];
        for i in 0..blocks {
            let p = |s: &str| format!("layers.{i}.{s}");
            params.extend([
                (p("attention.wqkv.weight"), vec![qkv, d]),
                (p("attention.wo.weight"), vec![d, d]),
                (p("feed_forward.w1.weight"), vec![f, d]),
                (p("feed_forward.w3.weight"), vec![f, d]),
                (p("feed_forward.w2.weight"), vec![d, f]),
                (p("attention_norm.weight"), vec![d]),
                (p("ffn_norm.weight"), vec![d]),
            ]);
        }
        for head in heads {
            params.push((head.norm.to_string(), vec![d]));
            params.push((head.projection.to_string(), vec![v, d]));
        }
        params
    }
}

/// A dimension head: the block output it reads, its norm and projection, and the grid axis
/// along which it predicts the neighbour.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadSpec {
    pub name: &'static str,
    /// Graph output holding its logits.
    pub output: &'static str,
    pub axis: usize,
    /// How many blocks run before its input is taken.
    pub after_blocks: usize,
    pub norm: &'static str,
    pub projection: &'static str,
}

/// Where a token's position enters the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PositionEncoding {
    /// The image model's 2-D rotary table (NAR-SPEC §1.7), applied to Q and K.
    Rotary2d,
    /// The video model's learned table `abs_pe`, added to the embeddings (§7).
    Learned { rows: usize },
}

/// Either family's upstream arguments. Serialised as the bare arguments; read back as video
/// when the object has a `latent_shape` (every video config does; no image config does).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ModelConfig {
    Image(ModelArgs),
    Video(VideoArgs),
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = serde_json::Value::deserialize(deserializer)?;
        let is_video = value.get("latent_shape").is_some();
        if is_video {
            serde_json::from_value(value).map(ModelConfig::Video)
        } else {
            serde_json::from_value(value).map(ModelConfig::Image)
        }
        .map_err(serde::de::Error::custom)
    }
}

impl From<ModelArgs> for ModelConfig {
    fn from(args: ModelArgs) -> Self {
        ModelConfig::Image(args)
    }
}

impl From<VideoArgs> for ModelConfig {
    fn from(args: VideoArgs) -> Self {
        ModelConfig::Video(args)
    }
}

impl ModelConfig {
    pub fn validate(&self) -> Result<(), GraphError> {
        match self {
            ModelConfig::Image(a) => a.validate(),
            ModelConfig::Video(a) => a.validate(),
        }
    }

    pub fn transformer(&self) -> Transformer {
        match self {
            ModelConfig::Image(a) => a.transformer(),
            ModelConfig::Video(a) => a.transformer(),
        }
    }

    /// Every block, trunk and extra ones: each has a KV cache.
    pub fn blocks(&self) -> usize {
        match self {
            ModelConfig::Image(a) => a.blocks(),
            ModelConfig::Video(a) => a.blocks(),
        }
    }

    /// The dimension heads, in the order the prefill sums them.
    pub fn heads(&self) -> Vec<HeadSpec> {
        match self {
            ModelConfig::Image(a) => a.heads(),
            ModelConfig::Video(a) => a.heads(),
        }
    }

    pub fn positions(&self) -> PositionEncoding {
        match self {
            ModelConfig::Image(_) => PositionEncoding::Rotary2d,
            ModelConfig::Video(a) => PositionEncoding::Learned {
                rows: a.position_rows(),
            },
        }
    }

    pub fn condition(&self) -> ConditionKind {
        match self {
            ModelConfig::Image(a) => a.condition(),
            ModelConfig::Video(_) => ConditionKind::Class,
        }
    }

    /// Condition positions `C`.
    pub fn condition_len(&self) -> usize {
        match self {
            ModelConfig::Image(a) => a.cls_token_num,
            ModelConfig::Video(a) => a.cls_token_num,
        }
    }

    /// `(num_classes, rows of the class table)` for class-conditional models.
    pub fn classes(&self) -> Option<(usize, usize)> {
        match self {
            ModelConfig::Image(a) if a.condition() == ConditionKind::Class => {
                Some((a.num_classes, a.class_rows()))
            }
            ModelConfig::Image(_) => None,
            ModelConfig::Video(a) => Some((a.num_classes, a.class_rows())),
        }
    }

    /// Every tensor a checkpoint must hold, with upstream names and shapes.
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        match self {
            ModelConfig::Image(a) => a.parameters(),
            ModelConfig::Video(a) => a.parameters(),
        }
    }

    /// Number of parameters (the `uncond_embedding` buffer excluded, as upstream counts).
    pub fn parameter_count(&self) -> usize {
        self.parameters()
            .iter()
            .filter(|(name, _)| name != "cls_embedding.uncond_embedding")
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(n_layer: usize, n_head: usize, dim: usize) -> ModelArgs {
        ModelArgs {
            n_layer,
            n_head,
            dim,
            ..Default::default()
        }
    }

    #[test]
    fn parameter_counts_match_the_spec_table() {
        let count = |args: ModelArgs| ModelConfig::from(args).parameter_count();
        assert_eq!(count(preset(12, 12, 768)), 130_551_552);
        assert_eq!(count(preset(24, 16, 1024)), 372_536_320);
        assert_eq!(count(preset(36, 20, 1280)), 815_991_040);
        let t2i = ModelArgs {
            model_type: "t2i".into(),
            cls_token_num: 120,
            ..preset(36, 20, 1280)
        };
        assert_eq!(count(t2i), 818_969_600);
        // LlamaGen-equivalent: no extra block, no down head.
        let llamagen = |l, h, d| ModelArgs {
            medusa_attention_num: 0,
            ..preset(l, h, d)
        };
        assert_eq!(count(llamagen(12, 12, 768)), 110_888_448);
        assert_eq!(count(llamagen(36, 20, 1280)), 774_699_520);
    }

    #[test]
    fn ffn_sizes_match_the_spec_table() {
        let ffn = |l, h, d| preset(l, h, d).transformer().ffn_hidden();
        assert_eq!(ffn(12, 12, 768), 2048);
        assert_eq!(ffn(18, 16, 1024), 2816);
        assert_eq!(ffn(36, 20, 1280), 3584);
        assert_eq!(ffn(48, 24, 1536), 4096);
    }

    #[test]
    fn validation_names_the_problem() {
        let err = preset(2, 5, 96).validate().unwrap_err().to_string();
        assert!(err.contains("n_head 5"), "{err}");
        let err = ModelArgs {
            model_type: "video".into(),
            ..preset(2, 4, 96)
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(err.contains("\"video\""), "{err}");
        // Sizes whose parameter count or FFN width would overflow.
        let huge = |edit: fn(&mut ModelArgs)| {
            let mut args = preset(2, 4, 96);
            edit(&mut args);
            args.validate().unwrap_err().to_string()
        };
        let err = huge(|a| a.dim = 1 << 40);
        assert!(err.contains("dim 1099511627776"), "{err}");
        let err = huge(|a| a.n_layer = usize::MAX);
        assert!(err.contains("n_layer"), "{err}");
        let err = huge(|a| a.vocab_size = 1 << 40);
        assert!(err.contains("vocab_size"), "{err}");
        let err = huge(|a| a.ffn_dim_multiplier = Some(1e300));
        assert!(err.contains("ffn_dim_multiplier"), "{err}");
        let err = huge(|a| a.ffn_dim_multiplier = Some(f64::NAN));
        assert!(err.contains("ffn_dim_multiplier"), "{err}");
        let err = huge(|a| {
            a.model_type = "t2i".into();
            a.caption_dim = 1 << 40;
        });
        assert!(err.contains("caption_dim"), "{err}");
    }
}
