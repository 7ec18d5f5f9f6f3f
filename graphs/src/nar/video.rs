//! The video model's upstream `ModelArgs` (NAR-videos `LARP_AR`, NAR-SPEC §7): the image
//! transformer without rotary embeddings, with a learned absolute position table, two extra
//! blocks and three dimension heads over a `(T, H, W)` latent grid.

use serde::{Deserialize, Serialize};

use super::config::{class_rows, HeadSpec, Transformer};
use super::names;
use crate::GraphError;

/// Upstream video `ModelArgs`, field for field, with upstream's defaults (which differ from
/// the image model's: 8192 tokens, 101 classes, a `(4, 16, 16)` grid). Training-only fields
/// are accepted and ignored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VideoArgs {
    pub dim: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: Option<usize>,
    pub multiple_of: usize,
    pub ffn_dim_multiplier: Option<f64>,
    pub norm_eps: f64,
    pub num_classes: usize,
    pub class_dropout_prob: f64,
    pub model_type: String,
    pub vocab_size: usize,
    pub cls_token_num: usize,
    /// Image tokens the position table covers; it has `max_seq_len + cls_token_num` rows.
    pub max_seq_len: usize,
    /// `(T, H, W)`.
    pub latent_shape: Vec<usize>,
    /// Whether `abs_pe` is the fixed sin-cos table; it is in the state dict either way.
    pub use_fixed_pe: bool,
    pub frame_prediction: bool,
    #[serde(skip_serializing)]
    pub rope_base: Option<f64>,
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
}

impl Default for VideoArgs {
    fn default() -> Self {
        VideoArgs {
            dim: 4096,
            n_layer: 32,
            n_head: 32,
            n_kv_head: None,
            multiple_of: 256,
            ffn_dim_multiplier: None,
            norm_eps: 1e-5,
            num_classes: 101,
            class_dropout_prob: 0.1,
            model_type: "class_cond".into(),
            vocab_size: 8192,
            cls_token_num: 1,
            max_seq_len: 1024,
            latent_shape: vec![4, 16, 16],
            use_fixed_pe: false,
            frame_prediction: false,
            rope_base: None,
            initializer_range: None,
            token_dropout_p: None,
            attn_dropout_p: None,
            resid_dropout_p: None,
            ffn_dropout_p: None,
            drop_path_rate: None,
            max_batch_size: None,
        }
    }
}

impl VideoArgs {
    /// Checks what the graphs rely on; the message names the field.
    pub fn validate(&self) -> Result<(), GraphError> {
        let bad = |m: String| Err(GraphError::Config(m));
        self.transformer().validate()?;
        if self.model_type != "class_cond" {
            return bad(format!(
                "video model_type {:?} is not supported (only \"class_cond\")",
                self.model_type
            ));
        }
        if self.frame_prediction {
            return bad("frame_prediction models are not supported".into());
        }
        if self.cls_token_num != 1 {
            return bad(format!(
                "class-conditional video models have cls_token_num 1, not {}",
                self.cls_token_num
            ));
        }
        if self.num_classes == 0 {
            return bad("num_classes must be positive".into());
        }
        if self.latent_shape.len() != 3 || self.latent_shape.contains(&0) {
            return bad(format!(
                "latent_shape {:?} must be three positive extents (T, H, W)",
                self.latent_shape
            ));
        }
        let cells = self.cells();
        if cells > self.max_seq_len {
            return bad(format!(
                "latent_shape {:?} has {cells} tokens, more than the position table holds \
                 (max_seq_len {})",
                self.latent_shape, self.max_seq_len
            ));
        }
        Ok(())
    }

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

    /// Tokens in the latent grid (saturating, so a corrupt shape fails validation instead of
    /// overflowing).
    pub fn cells(&self) -> usize {
        self.latent_shape
            .iter()
            .fold(1usize, |acc, &d| acc.saturating_mul(d))
    }

    /// The trunk plus the down and back blocks.
    pub fn blocks(&self) -> usize {
        self.n_layer + 2
    }

    pub fn class_rows(&self) -> usize {
        class_rows(self.num_classes, self.class_dropout_prob)
    }

    /// Rows of `abs_pe`: the condition positions and `max_seq_len` image positions.
    pub fn position_rows(&self) -> usize {
        self.max_seq_len + self.cls_token_num
    }

    /// Right (w+1) reads the trunk, down (h+1) the first extra block, back (t+1) the second;
    /// listed in the order upstream's prefill sums them, `R + B + D`.
    pub fn heads(&self) -> Vec<HeadSpec> {
        let n = self.n_layer;
        vec![
            HeadSpec {
                name: "right",
                output: names::LOGITS_RIGHT,
                axis: 2,
                after_blocks: n,
                norm: "norm_R.weight",
                projection: "output_R.weight",
            },
            HeadSpec {
                name: "back",
                output: names::LOGITS_BACK,
                axis: 0,
                after_blocks: n + 2,
                norm: "norm_B.weight",
                projection: "output_B.weight",
            },
            HeadSpec {
                name: "down",
                output: names::LOGITS_DOWN,
                axis: 1,
                after_blocks: n + 1,
                norm: "norm_D.weight",
                projection: "output_D.weight",
            },
        ]
    }

    /// Every tensor a checkpoint must hold, with upstream names and shapes (NAR-SPEC §7).
    pub fn parameters(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.dim;
        let mut params = vec![
            (
                "cls_embedding.embedding_table.weight".to_string(),
                vec![self.class_rows(), d],
            ),
            ("abs_pe".to_string(), vec![1, self.position_rows(), d]),
        ];
        params.extend(
            self.transformer()
                .body_parameters(self.blocks(), &self.heads()),
        );
        params
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nar::ModelConfig;

    #[test]
    fn lp_preset_has_the_spec_parameter_count() {
        let lp = VideoArgs {
            n_layer: 30,
            n_head: 20,
            dim: 1280,
            ..VideoArgs::default()
        };
        assert_eq!(ModelConfig::from(lp).parameter_count(), 693_588_480);
    }

    #[test]
    fn video_configs_are_told_apart_from_image_configs() {
        let video: ModelConfig = serde_json::from_str(
            r#"{"dim": 64, "n_layer": 2, "n_head": 2, "latent_shape": [3, 4, 4]}"#,
        )
        .unwrap();
        assert!(matches!(video, ModelConfig::Video(ref a) if a.vocab_size == 8192));
        let image: ModelConfig =
            serde_json::from_str(r#"{"dim": 64, "n_layer": 2, "n_head": 2}"#).unwrap();
        assert!(matches!(image, ModelConfig::Image(ref a) if a.vocab_size == 16384));
        // Both round-trip through the manifest's JSON.
        for config in [video, image] {
            let text = serde_json::to_string(&config).unwrap();
            assert_eq!(serde_json::from_str::<ModelConfig>(&text).unwrap(), config);
        }
        let err = serde_json::from_str::<ModelConfig>(r#"{"latent_shape": [1], "bogus": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
    }

    #[test]
    fn validation_names_the_problem() {
        let tiny = VideoArgs {
            dim: 64,
            n_layer: 2,
            n_head: 2,
            max_seq_len: 48,
            latent_shape: vec![3, 4, 4],
            ..VideoArgs::default()
        };
        assert!(tiny.validate().is_ok());
        let too_big = VideoArgs {
            latent_shape: vec![4, 4, 4],
            ..tiny.clone()
        };
        let err = too_big.validate().unwrap_err().to_string();
        assert!(
            err.contains("64 tokens") && err.contains("max_seq_len 48"),
            "{err}"
        );
        let flat = VideoArgs {
            latent_shape: vec![4, 4],
            ..tiny.clone()
        };
        assert!(flat
            .validate()
            .unwrap_err()
            .to_string()
            .contains("(T, H, W)"));
        let fp = VideoArgs {
            frame_prediction: true,
            ..tiny
        };
        assert!(fp
            .validate()
            .unwrap_err()
            .to_string()
            .contains("frame_prediction"));
    }
}
