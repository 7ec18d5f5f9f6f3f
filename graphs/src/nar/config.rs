//! The upstream `ModelArgs` (NAR-SPEC §1.1) and what follows from it: head size, FFN size,
//! condition length, the parameter list a checkpoint must hold (§5).

use serde::{Deserialize, Serialize};

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
        if self.dim == 0 || self.n_layer == 0 || self.n_head == 0 || self.vocab_size == 0 {
            return bad("dim, n_layer, n_head and vocab_size must be positive".into());
        }
        if !self.dim.is_multiple_of(self.n_head) {
            return bad(format!(
                "dim {} is not a multiple of n_head {}",
                self.dim, self.n_head
            ));
        }
        if !self.head_dim().is_multiple_of(4) {
            return bad(format!(
                "head dim {} must be a multiple of 4 for the 2-D rotary table",
                self.head_dim()
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 || !self.n_head.is_multiple_of(kv) {
            return bad(format!("n_kv_head {kv} must divide n_head {}", self.n_head));
        }
        if self.multiple_of == 0 {
            return bad("multiple_of must be positive".into());
        }
        if self.medusa_attention_num != 1 {
            return bad(format!(
                "medusa_attention_num {} is not supported (NAR uses exactly one extra block)",
                self.medusa_attention_num
            ));
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

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_head
    }

    pub fn kv_heads(&self) -> usize {
        self.n_kv_head.unwrap_or(self.n_head)
    }

    /// Transformer blocks: the trunk plus the extra ("medusa") block.
    pub fn blocks(&self) -> usize {
        self.n_layer + 1
    }

    /// SwiGLU hidden size, as upstream's `FeedForward` computes it.
    pub fn ffn_hidden(&self) -> usize {
        let mut hidden = 2 * (4 * self.dim) / 3;
        if let Some(m) = self.ffn_dim_multiplier {
            hidden = (m * hidden as f64) as usize;
        }
        hidden.div_ceil(self.multiple_of) * self.multiple_of
    }

    /// Rows of the class table: one per class, plus the null class when trained with dropout.
    pub fn class_rows(&self) -> usize {
        self.num_classes + usize::from(self.class_dropout_prob > 0.0)
    }

    /// The grid side implied by `block_size` (`n²`), if it is a square.
    pub fn default_grid(&self) -> Option<usize> {
        let n = (self.block_size as f64).sqrt().round() as usize;
        (n * n == self.block_size && n > 0).then_some(n)
    }

    /// Every tensor a checkpoint must hold, with upstream names and shapes (NAR-SPEC §5).
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let (d, f, v) = (self.dim, self.ffn_hidden(), self.vocab_size);
        let qkv = (self.n_head + 2 * self.kv_heads()) * self.head_dim();
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
        params.push(("tok_embeddings.weight".into(), vec![v, d]));
        for i in 0..self.blocks() {
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
        params.extend([
            ("norm.weight".into(), vec![d]),
            ("output.weight".into(), vec![v, d]),
            ("medusa_norm.weight".into(), vec![d]),
            ("medusa_output.weight".into(), vec![v, d]),
        ]);
        params
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
        assert_eq!(preset(12, 12, 768).parameter_count(), 130_551_552);
        assert_eq!(preset(24, 16, 1024).parameter_count(), 372_536_320);
        assert_eq!(preset(36, 20, 1280).parameter_count(), 815_991_040);
        let t2i = ModelArgs {
            model_type: "t2i".into(),
            cls_token_num: 120,
            ..preset(36, 20, 1280)
        };
        assert_eq!(t2i.parameter_count(), 818_969_600);
    }

    #[test]
    fn ffn_sizes_match_the_spec_table() {
        assert_eq!(preset(12, 12, 768).ffn_hidden(), 2048);
        assert_eq!(preset(18, 16, 1024).ffn_hidden(), 2816);
        assert_eq!(preset(36, 20, 1280).ffn_hidden(), 3584);
        assert_eq!(preset(48, 24, 1536).ffn_hidden(), 4096);
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
    }
}
