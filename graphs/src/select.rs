//! The selection graph: what a generation needs from one call's head logits, computed where
//! the logits are (on the GPU under CUDA and TensorRT), so a call returns kilobytes instead
//! of `rows × width × heads × vocab` floats.
//!
//! ```text
//! Concat(logits_<head> (rows, width, V), axis 1) ─Gather(select_index[s], axis 1)
//!   ─Mul(select_mask[s])─ Σ slots ─Div(select_count)─▶ assembled (rows, produced, V)
//!   ─ cond = Gather(cond_rows), uncond = Gather(uncond_rows)
//!   ─ Where(guided, uncond + (cond − uncond)·cfg_scale, cond)
//!   ─TopK(top_k)─▶ top_values (B, produced, k), top_indices (B, produced, k) as float
//! ```
//!
//! It computes exactly what the runtime does on the host: slot `s` of a produced cell is
//! its `s`-th contribution (head `h`, input `i` → row `h · width + i` of the concatenated
//! heads), so the sum runs in the host's order; unused slots add `x · 0 = 0`, which changes
//! nothing. Then the division by the count and guidance with the same formula. Token ids
//! come back as float32 (exact below 2²⁴), so every output downloads the same way.

use crate::builder::{Attr, DType, Dim, GraphBuilder};
use crate::onnx::ModelProto;
use crate::weights::WeightStore;
use crate::GraphError;

/// Input and output names.
pub mod names {
    /// `(slots, produced)` int64: each cell's contributions in summation order, as rows of
    /// the heads' logits concatenated along the width (`head · width + input`).
    pub const INDEX: &str = "select_index";
    /// `(slots, produced)` float: 1 for a contribution, 0 for an unused slot.
    pub const MASK: &str = "select_mask";
    /// `(produced,)` float: how many heads reach each cell.
    pub const COUNT: &str = "select_count";
    /// `(prompts,)` int64: the rows of the conditional half.
    pub const COND_ROWS: &str = "cond_rows";
    /// `(prompts,)` int64: the rows of the unconditional half (the conditional rows again
    /// when the batch has none; the call is then unguided).
    pub const UNCOND_ROWS: &str = "uncond_rows";
    /// `(1,)` bool: whether this call is guided.
    pub const GUIDED: &str = "guided";
    /// `(1,)` float.
    pub const CFG_SCALE: &str = "cfg_scale";
    /// `(1,)` int64: candidates kept per cell.
    pub const TOP_K: &str = "top_k";
    /// `(B, produced, k)`: the largest guided logits, largest first (ties: lower id first).
    pub const TOP_VALUES: &str = "top_values";
    /// `(B, produced, k)`: their token ids, as float.
    pub const TOP_INDICES: &str = "top_indices";
}

/// Dimension names of the selection graph.
pub mod dims {
    pub const ROWS: &str = "rows";
    pub const WIDTH: &str = "width";
    pub const PRODUCED: &str = "produced";
    pub const PROMPTS: &str = "prompts";
    pub const K: &str = "k";
}

/// The selection graph for a model whose heads write `heads` (output names, in manifest
/// order) over a vocabulary of `vocab`. It has no weights; `store` only satisfies the builder.
pub fn build(
    heads: &[&str],
    vocab: usize,
    store: &mut WeightStore,
) -> Result<ModelProto, GraphError> {
    if heads.is_empty() {
        return Err(GraphError::Invalid(
            "selection needs at least one head".into(),
        ));
    }
    let mut b = GraphBuilder::new("narx_select", store);
    let (rows, width, produced) = (
        Dim::named(dims::ROWS),
        Dim::named(dims::WIDTH),
        Dim::named(dims::PRODUCED),
    );
    let logits: Vec<_> = heads
        .iter()
        .map(|name| {
            b.input(
                name,
                DType::F32,
                &[rows.clone(), width.clone(), Dim::Fixed(vocab)],
            )
        })
        .collect();
    // A cell has at most one contribution per head.
    let per_slot = [Dim::Fixed(heads.len()), produced.clone()];
    let index = b.input(names::INDEX, DType::I64, &per_slot);
    let mask = b.input(names::MASK, DType::F32, &per_slot);
    let count = b.input(names::COUNT, DType::F32, std::slice::from_ref(&produced));
    let prompts = [Dim::named(dims::PROMPTS)];
    let cond_rows = b.input(names::COND_ROWS, DType::I64, &prompts);
    let uncond_rows = b.input(names::UNCOND_ROWS, DType::I64, &prompts);
    let one = [Dim::Fixed(1)];
    let guided = b.input(names::GUIDED, DType::Bool, &one);
    let scale = b.input(names::CFG_SCALE, DType::F32, &one);
    let top_k = b.input(names::TOP_K, DType::I64, &one);

    let all = b.concat(&logits, 1)?;
    let mut sum = None;
    for slot in 0..heads.len() as i64 {
        let rows = b.slice(index, 0, slot, slot + 1)?;
        let rows = b.reshape(rows, &[-1])?;
        let reached = b.gather_axis(all, rows, 1)?;
        let weight = b.slice(mask, 0, slot, slot + 1)?;
        let weight = b.reshape(weight, &[1, -1, 1])?;
        let part = b.mul(reached, weight)?;
        sum = Some(match sum {
            None => part,
            Some(total) => b.add(total, part)?,
        });
    }
    let sum = sum.expect("at least one head");
    let count = b.reshape(count, &[1, -1, 1])?;
    let assembled = b.div(sum, count)?;

    let cond = b.gather_axis(assembled, cond_rows, 0)?;
    let uncond = b.gather_axis(assembled, uncond_rows, 0)?;
    let difference = b.sub(cond, uncond)?;
    let scaled = b.mul(difference, scale)?;
    let mixed = b.add(uncond, scaled)?;
    let chosen = b.where_(guided, mixed, cond)?;

    let top = b.node(
        "TopK",
        &[chosen, top_k],
        &[
            ("axis", Attr::Int(-1)),
            ("largest", Attr::Int(1)),
            ("sorted", Attr::Int(1)),
        ],
        &[DType::F32, DType::I64],
    )?;
    let ids = b.cast(top[1], DType::F32)?;
    let out = [Dim::named(dims::PROMPTS), produced, Dim::named(dims::K)];
    b.output(names::TOP_VALUES, top[0], &out)?;
    b.output(names::TOP_INDICES, ids, &out)?;
    Ok(b.finish())
}
