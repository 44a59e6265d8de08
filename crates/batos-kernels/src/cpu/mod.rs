//! CPU kernels. The functions here validate their arguments, then run the fastest
//! implementation this CPU supports: AVX2+FMA(+F16C) when detected at run time,
//! otherwise the scalar [`reference`](mod@reference) kernels. Results agree with the
//! reference within the tolerances stated in `tests/simd_parity.rs`. Work is spread
//! over [`num_threads`] threads of the pool [`ThreadBackend`] selects.

mod attention;
pub(crate) mod check;
pub mod int4;
pub mod int4_dot;
pub mod lora;
mod par;
mod pool;
pub mod reference;
mod simd;

pub use par::{num_threads, set_thread_backend, thread_backend, ThreadBackend};

use crate::error::Result;
use crate::shapes::{AttentionHeads, KvCacheLayout, Rope, SeqAttention};
use crate::weights::{WeightData, WeightView};
use crate::KvCache;
use simd::Avx2;

/// Name of the implementation the dispatching kernels use on this CPU: `"cpu-avx2"`
/// or `"cpu-scalar"` (benchmarks tag their results with it).
pub fn implementation() -> &'static str {
    if Avx2::detect().is_some() {
        "cpu-avx2"
    } else {
        "cpu-scalar"
    }
}

/// Rows per parallel task for row-wise kernels over `[rows, width]` data: whole rows,
/// at least ~16K elements per task so small inputs stay on one thread.
fn rows_per_task(rows: usize, width: usize) -> usize {
    let min_rows = (16 * 1024usize).div_ceil(width.max(1));
    rows.div_ceil(num_threads() * 2).max(min_rows).max(1)
}

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
    check::matmul(x, w, out)?;
    let Some(avx) = Avx2::detect() else {
        return reference::matmul(x, w, out);
    };
    // `check::matmul` rejects `cols == 0` (T would be undefined).
    let (n, k) = (w.rows(), w.cols());
    match w.data() {
        WeightData::F32(s) => avx.matmul(x, k, s, n, out),
        WeightData::F16(s) => avx.matmul(x, k, s, n, out),
        WeightData::BF16(s) => avx.matmul(x, k, s, n, out),
        WeightData::Int4(d) => int4::matmul_avx2(avx, x, &d, out),
    }
    Ok(())
}

/// RMSNorm of each `weight.len()`-wide row of `x` into `out` (Llama's
/// `weight * x / sqrt(mean(x²) + eps)`).
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    let t = check::rms_norm(x, weight, out)?;
    let Some(avx) = Avx2::detect() else {
        return reference::rms_norm(x, weight, eps, out);
    };
    let d = weight.len();
    let per = rows_per_task(t, d);
    par::for_each_chunk_mut(out, per * d, &|i, o| {
        let xs = &x[i * per * d..][..o.len()];
        for (xr, or) in xs.chunks_exact(d).zip(o.chunks_exact_mut(d)) {
            avx.rms_norm_row(xr, weight, eps, or);
        }
    });
    Ok(())
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
    check::silu_mul(gate, up, out)?;
    let Some(avx) = Avx2::detect() else {
        return reference::silu_mul(gate, up, out);
    };
    let per = rows_per_task(out.len().div_ceil(1024), 1024) * 1024;
    par::for_each_chunk_mut(out, per, &|i, o| {
        let r = i * per..i * per + o.len();
        avx.silu_mul(&gate[r.clone()], &up[r], o);
    });
    Ok(())
}

/// `out = silu(gate) * up` for a fused `gate_up [T, 2·ffn]` whose rows are
/// `[gate | up]`, into `out [T, ffn]` (saves splitting the fused projection).
pub fn silu_mul_fused(gate_up: &[f32], ffn: usize, out: &mut [f32]) -> Result<()> {
    let t = check::silu_mul_fused(gate_up, ffn, out)?;
    let Some(avx) = Avx2::detect() else {
        return reference::silu_mul_fused(gate_up, ffn, out);
    };
    let per = rows_per_task(t, ffn);
    par::for_each_chunk_mut(out, per * ffn, &|i, o| {
        let rows = &gate_up[i * per * 2 * ffn..][..o.len() * 2];
        for (gu, or) in rows.chunks_exact(2 * ffn).zip(o.chunks_exact_mut(ffn)) {
            avx.silu_mul(&gu[..ffn], &gu[ffn..], or);
        }
    });
    Ok(())
}

/// Softmax of one row in place (see [`reference::softmax`] for the edge cases).
pub fn softmax(x: &mut [f32]) {
    match Avx2::detect() {
        Some(avx) => avx.softmax(x),
        None => reference::softmax(x),
    }
}

/// `softmax(beta · x)` in place (`beta > 0`; the sampler's temperature).
pub(crate) fn softmax_scaled(x: &mut [f32], beta: f32) {
    match Avx2::detect() {
        Some(avx) => avx.softmax_scaled(x, beta),
        None => {
            x.iter_mut().for_each(|v| *v *= beta);
            reference::softmax(x)
        }
    }
}

/// `log Σ exp(x)` of a row with at least one finite entry (the sampler's
/// normaliser; relative error ~1e-6).
pub(crate) fn log_sum_exp(x: &[f32]) -> f32 {
    let (max, sum) = match Avx2::detect() {
        Some(avx) => avx.max_and_sum_exp(x),
        None => {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            (max, x.iter().map(|&v| (v - max).exp()).sum())
        }
    };
    max + sum.ln()
}

/// Index of the largest value, first on ties, NaNs skipped; `None` if there is none.
pub fn argmax(x: &[f32]) -> Option<usize> {
    reference::argmax(x)
}

/// Gathers rows `ids` of the table `[vocab, d]` into `out [ids.len(), d]` as f32.
pub fn embedding(table: &WeightView<'_>, ids: &[u32], out: &mut [f32]) -> Result<()> {
    check::embedding(table, ids, out)?;
    let Some(avx) = Avx2::detect() else {
        return reference::embedding(table, ids, out);
    };
    let d = table.cols();
    for (&id, o) in ids.iter().zip(out.chunks_exact_mut(d)) {
        let r = id as usize * d..(id as usize + 1) * d;
        match table.data() {
            WeightData::F32(s) => o.copy_from_slice(&s[r]),
            WeightData::F16(s) => avx.widen_row(&s[r], o),
            WeightData::BF16(s) => avx.widen_row(&s[r], o),
            WeightData::Int4(d) => d.dequantize_row(id as usize, o),
        }
    }
    Ok(())
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
    check::paged_attention(q, heads, cache, seqs, out)?;
    match Avx2::detect() {
        Some(avx) => {
            attention::paged_attention(avx, q, heads, cache, seqs, out);
            Ok(())
        }
        None => reference::paged_attention(q, heads, cache, seqs, out),
    }
}
