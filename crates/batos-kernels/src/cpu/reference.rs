//! Scalar reference kernels: the specification every fast path is tested against.
//!
//! Plain loops, written for obviousness, not speed. Dot products and reductions
//! accumulate in f64, so these are at least as accurate as any f32 fast path.

use super::check;
use crate::error::Result;
use crate::shapes::{AttentionHeads, KvCacheLayout, Rope, SeqAttention};
use crate::weights::{WeightData, WeightView};
use crate::KvCache;

/// Widens row `r` of `w` to f32 into `buf`.
pub(crate) fn widen_row(w: &WeightView<'_>, r: usize, buf: &mut [f32]) {
    let c = w.cols();
    let range = r * c..(r + 1) * c;
    match w.data() {
        WeightData::F32(s) => buf.copy_from_slice(&s[range]),
        WeightData::F16(s) => {
            for (b, v) in buf.iter_mut().zip(&s[range]) {
                *b = v.to_f32();
            }
        }
        WeightData::BF16(s) => {
            for (b, v) in buf.iter_mut().zip(&s[range]) {
                *b = v.to_f32();
            }
        }
        WeightData::Int4(d) => d.dequantize_row(r, buf),
    }
}

/// `out[T, rows] = x[T, cols] · Wᵀ` where `W` is `[rows, cols]` (`y = x·Wᵀ`).
pub fn matmul(x: &[f32], w: &WeightView<'_>, out: &mut [f32]) -> Result<()> {
    let t = check::matmul(x, w, out)?;
    let (n, k) = (w.rows(), w.cols());
    let mut row = vec![0f32; k];
    for j in 0..n {
        widen_row(w, j, &mut row);
        for i in 0..t {
            let xi = &x[i * k..(i + 1) * k];
            let acc: f64 = xi
                .iter()
                .zip(&row)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum();
            out[i * n + j] = acc as f32;
        }
    }
    Ok(())
}

/// RMSNorm of each `d`-wide row of `x` (`d = weight.len()`), as Llama:
/// `out = weight * (x / sqrt(mean(x²) + eps))`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    check::rms_norm(x, weight, out)?;
    let d = weight.len();
    for (xr, or) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms: f64 = xr.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
        let inv = (1.0 / (ms + eps as f64).sqrt()) as f32;
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(weight) {
            *o = g * (v * inv);
        }
    }
    Ok(())
}

/// Applies rotary embeddings in place to `q [T, num_heads*head_dim]` and
/// `k [T, num_kv_heads*head_dim]`, token `t` at `positions[t]`.
///
/// HF Llama convention (non-interleaved): with `h = head_dim/2`, element `i < h` pairs
/// with `i + h`: `(a, b) → (a·cos − b·sin, b·cos + a·sin)`.
pub fn rope(
    rope: &Rope,
    heads: &AttentionHeads,
    positions: &[usize],
    q: &mut [f32],
    k: &mut [f32],
) -> Result<()> {
    check::rope(rope, heads, positions, q, k)?;
    let hd = heads.head_dim();
    let half = hd / 2;
    let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
    for (t, &pos) in positions.iter().enumerate() {
        rope.cos_sin(pos, &mut cos, &mut sin);
        let qrow = &mut q[t * heads.q_width()..(t + 1) * heads.q_width()];
        let krow = &mut k[t * heads.kv_width()..(t + 1) * heads.kv_width()];
        for head in qrow.chunks_exact_mut(hd).chain(krow.chunks_exact_mut(hd)) {
            for i in 0..half {
                let (a, b) = (head[i], head[i + half]);
                head[i] = a * cos[i] - b * sin[i];
                head[i + half] = b * cos[i] + a * sin[i];
            }
        }
    }
    Ok(())
}

/// `x·sigmoid(x)`, the SiLU activation.
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `out = silu(gate) * up`, elementwise (the Llama MLP's gating).
pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
    check::silu_mul(gate, up, out)?;
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
    Ok(())
}

/// `out[t] = silu(gate[t]) * up[t]` where each row of `gate_up [T, 2·ffn]` is
/// `[gate | up]` (a fused gate/up projection) and `out` is `[T, ffn]`.
pub fn silu_mul_fused(gate_up: &[f32], ffn: usize, out: &mut [f32]) -> Result<()> {
    check::silu_mul_fused(gate_up, ffn, out)?;
    let f = ffn;
    for (gu, o) in gate_up.chunks_exact(2 * f).zip(out.chunks_exact_mut(f)) {
        for ((o, &g), &u) in o.iter_mut().zip(&gu[..f]).zip(&gu[f..]) {
            *o = silu(g) * u;
        }
    }
    Ok(())
}

/// Numerically stable softmax of one row, in place. An empty row is left alone; a
/// row whose maximum is `-inf` (everything masked) becomes all zeros.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        x.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let mut sum = 0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Index of the largest value (the first one on ties, like `torch.argmax`); NaNs are
/// skipped. `None` when `x` is empty or all NaN.
pub fn argmax(x: &[f32]) -> Option<usize> {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        match best {
            Some((_, b)) if v <= b => {}
            _ => best = Some((i, v)),
        }
    }
    best.map(|(i, _)| i)
}

/// Gathers rows `ids` of `table [vocab, d]` into `out [ids.len(), d]`, widened to f32.
pub fn embedding(table: &WeightView<'_>, ids: &[u32], out: &mut [f32]) -> Result<()> {
    check::embedding(table, ids, out)?;
    let d = table.cols();
    for (&id, o) in ids.iter().zip(out.chunks_exact_mut(d)) {
        widen_row(table, id as usize, o);
    }
    Ok(())
}

/// Scatters the new tokens' keys and values `[T, num_kv_heads*head_dim]` into the
/// paged caches at `slots[t]` (see [`KvCacheLayout`]).
pub fn write_kv(
    k_new: &[f32],
    v_new: &[f32],
    slots: &[usize],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    layout: &KvCacheLayout,
) -> Result<()> {
    check::write_kv(k_new, v_new, slots, k_cache, v_cache, layout)?;
    let s = layout.slot_stride();
    for (t, &slot) in slots.iter().enumerate() {
        k_cache[slot * s..(slot + 1) * s].copy_from_slice(&k_new[t * s..(t + 1) * s]);
        v_cache[slot * s..(slot + 1) * s].copy_from_slice(&v_new[t * s..(t + 1) * s]);
    }
    Ok(())
}

/// Causal paged attention with GQA and scale `1/sqrt(head_dim)` for a batch of
/// sequences (see [`SeqAttention`]). Writes `out [T, num_heads*head_dim]` for every
/// query row a sequence names; other rows are left untouched.
pub fn paged_attention(
    q: &[f32],
    heads: &AttentionHeads,
    cache: &KvCache<'_>,
    seqs: &[SeqAttention<'_>],
    out: &mut [f32],
) -> Result<()> {
    check::paged_attention(q, heads, cache, seqs, out)?;
    let hd = heads.head_dim();
    let layout = &cache.layout;
    let scale = 1.0 / (hd as f64).sqrt();
    for s in seqs {
        let first_pos = s.context_len - s.query_len;
        for qi in 0..s.query_len {
            let row = s.query_start + qi;
            let pos = first_pos + qi;
            for h in 0..heads.num_heads() {
                let kvh = h / heads.group_size();
                let qv = &q[row * heads.q_width() + h * hd..][..hd];
                let mut scores: Vec<f64> = (0..=pos)
                    .map(|p| {
                        let base = kv_offset(layout, s, p, kvh);
                        let kv = &cache.k[base..base + hd];
                        qv.iter()
                            .zip(kv)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let o = &mut out[row * heads.q_width() + h * hd..][..hd];
                for (d, ov) in o.iter_mut().enumerate() {
                    let mut acc = 0f64;
                    for (p, &w) in scores.iter().enumerate() {
                        acc += w * cache.v[kv_offset(layout, s, p, kvh) + d] as f64;
                    }
                    *ov = (acc / sum) as f32;
                }
            }
        }
    }
    Ok(())
}

/// Offset of head `kvh` of position `p` of sequence `s` in a K or V cache.
pub(crate) fn kv_offset(
    layout: &KvCacheLayout,
    s: &SeqAttention<'_>,
    p: usize,
    kvh: usize,
) -> usize {
    let block = s.block_table[p / layout.block_size()].index();
    let slot = block * layout.block_size() + p % layout.block_size();
    slot * layout.slot_stride() + kvh * layout.head_dim()
}
