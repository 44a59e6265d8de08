//! CPU kernels. The functions here validate their arguments, then run the fastest
//! implementation this CPU supports: AVX2+FMA(+F16C) when detected at run time,
//! otherwise the scalar [`reference`] kernels. Results agree with the reference within
//! the tolerances stated in `tests/`.

pub(crate) mod check;
pub mod lora;
pub mod reference;

use crate::error::Result;
use crate::shapes::{AttentionHeads, KvCacheLayout, Rope, SeqAttention};
use crate::weights::WeightView;
use crate::KvCache;

/// `out[T, rows] = x[T, cols] · Wᵀ` where `W` is `[rows, cols]` (a linear layer
/// `[out_features, in_features]`); `T = x.len() / cols`.
///
/// ```
/// use batos_kernels::{cpu, WeightView};
/// let w = [1.0f32, 0.0, 0.0, 2.0]; // [[1, 0], [0, 2]]
/// let x = [3.0f32, 4.0];
/// let mut y = [0.0f32; 2];
/// cpu::matmul(&x, &WeightView::f32(&w, 2, 2).unwrap(), &mut y).unwrap();
/// assert_eq!(y, [3.0, 8.0]);
/// ```
pub fn matmul(x: &[f32], w: &WeightView<'_>, out: &mut [f32]) -> Result<()> {
    reference::matmul(x, w, out)
}

/// RMSNorm of each `weight.len()`-wide row of `x` into `out` (Llama's
/// `weight * x / sqrt(mean(x²) + eps)`).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    reference::rms_norm(x, weight, eps, out)
}

/// Rotary embeddings in place on `q [T, heads*hd]` and `k [T, kv_heads*hd]`, token `t`
/// at `positions[t]` (HF Llama "rotate_half" convention).
pub fn rope(
    rope: &Rope,
    heads: &AttentionHeads,
    positions: &[usize],
    q: &mut [f32],
    k: &mut [f32],
) -> Result<()> {
    reference::rope(rope, heads, positions, q, k)
}

/// `out = silu(gate) * up`, elementwise.
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    reference::silu_mul(gate, up, out)
}

/// Softmax of one row in place (see [`reference::softmax`] for the edge cases).
pub fn softmax(x: &mut [f32]) {
    reference::softmax(x)
}

/// Index of the largest value, first on ties, NaNs skipped; `None` if there is none.
pub fn argmax(x: &[f32]) -> Option<usize> {
    reference::argmax(x)
}

/// Gathers rows `ids` of the table `[vocab, d]` into `out [ids.len(), d]` as f32.
pub fn embedding(table: &WeightView<'_>, ids: &[u32], out: &mut [f32]) -> Result<()> {
    reference::embedding(table, ids, out)
}

/// Scatters new keys/values `[T, kv_heads*hd]` into the paged caches at `slots`.
pub fn write_kv(
    k_new: &[f32],
    v_new: &[f32],
    slots: &[usize],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    layout: &KvCacheLayout,
) -> Result<()> {
    reference::write_kv(k_new, v_new, slots, k_cache, v_cache, layout)
}

/// Causal GQA attention over the paged cache for a batch of sequences, each with its
/// own block table, context length and run of query rows (see [`SeqAttention`]).
pub fn paged_attention(
    q: &[f32],
    heads: &AttentionHeads,
    cache: &KvCache<'_>,
    seqs: &[SeqAttention<'_>],
    out: &mut [f32],
) -> Result<()> {
    reference::paged_attention(q, heads, cache, seqs, out)
}
