//! How much arithmetic a generation is: the matmul FLOPs of every model call, derived from the
//! manifest, so `narx bench` can report achieved GFLOP/s against the machine's matmul rate.

use narx_graphs::nar::{ModelArgs, ModelConfig};

use crate::scheduler::WavefrontPlan;

/// Matmul FLOPs (2 per multiply-add) of one full generation of a NAR model with `rows`
/// model-batch rows (prompts × 2 with guidance) whose heads project `head_rows` rows
/// ([`crate::generate::Generator::head_rows`]). Element-wise work is left out: it is a few
/// percent.
pub fn generation_flops(
    config: &ModelConfig,
    plan: &WavefrontPlan,
    rows: usize,
    head_rows: usize,
) -> f64 {
    let shape = config.transformer();
    let d = shape.dim as f64;
    let f = shape.ffn_hidden() as f64;
    let v = shape.vocab_size as f64;
    let qkv = ((shape.n_head + 2 * shape.kv_heads()) * shape.head_dim()) as f64;
    let blocks = config.blocks() as f64;
    // Condition positions, and the caption MLP the prefill runs over them (t2i).
    let (condition_len, condition_mlp) = match config {
        ModelConfig::Image(ModelArgs {
            model_type,
            cls_token_num,
            caption_dim,
            ..
        }) if model_type == "t2i" => {
            let t = *cls_token_num as f64;
            (t, t * 2.0 * (*caption_dim as f64 * d + d * d))
        }
        _ => (1.0, 0.0),
    };
    let per_token = blocks * 2.0 * (d * qkv + d * d + 3.0 * d * f);
    // Every head the graph has runs, whether or not the plan reads it (raster order on a
    // NAR model still computes the down head).
    let heads = config.heads().len() as f64 * 2.0 * d * v;
    let (mut trunk, mut projected) = (condition_mlp, 0.0);
    let mut past = 0.0;
    for call in plan.calls() {
        let (tokens, predicting) = if call.is_prefill() {
            (condition_len, 1.0)
        } else {
            (call.input_len() as f64, call.input_len() as f64)
        };
        // Q·Kᵀ and the weighted sum of V, over every key visible to the new tokens.
        let attention = blocks * 2.0 * 2.0 * tokens * (past + tokens) * d;
        trunk += tokens * per_token + attention;
        projected += predicting * heads;
        past += tokens;
    }
    trunk * rows as f64 + projected * head_rows as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The figure: one NAR-B image at 16×16 with guidance is ~120 GFLOP.
    #[test]
    fn nar_b_with_guidance_is_about_120_gflop() {
        let nar_b = ModelArgs {
            dim: 768,
            n_layer: 12,
            n_head: 12,
            ..ModelArgs::default()
        };
        let plan = WavefrontPlan::new(&[16, 16], &[1, 0]).unwrap();
        let config = nar_b.into();
        let gflop = generation_flops(&config, &plan, 2, 2) / 1e9;
        assert!((115.0..130.0).contains(&gflop), "{gflop} GFLOP");
        // Projecting the guided mix saves half the two 768 × 16384 heads: 256 rows × 2 × 25 MFLOP.
        let mixed = generation_flops(&config, &plan, 2, 1) / 1e9;
        let saved = 256.0 * 2.0 * 2.0 * 768.0 * 16384.0 / 1e9;
        assert!(
            (gflop - mixed - saved).abs() < 1e-6,
            "{gflop} − {mixed} GFLOP"
        );
    }
}
