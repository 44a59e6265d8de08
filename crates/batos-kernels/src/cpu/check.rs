//! Argument validation shared by the reference and the dispatching kernels, so both
//! reject exactly the same inputs with the same errors.

use crate::error::{KernelError, Result};
use crate::shapes::{AttentionHeads, KvCacheLayout, Rope, SeqAttention};
use crate::weights::WeightView;
use crate::KvCache;

pub(crate) fn len_eq(
    op: &'static str,
    what: &'static str,
    got: usize,
    expected: usize,
) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch {
            op,
            what,
            expected,
            got,
        })
    }
}

/// Number of rows of `len` elements split into rows of `row_len`.
pub(crate) fn rows(
    op: &'static str,
    what: &'static str,
    len: usize,
    row_len: usize,
) -> Result<usize> {
    if row_len == 0 {
        return Err(KernelError::InvalidShape {
            op,
            what,
            reason: "row length is zero".into(),
        });
    }
    if !len.is_multiple_of(row_len) {
        return Err(KernelError::NotWholeRows {
            op,
            what,
            len,
            row_len,
        });
    }
    Ok(len / row_len)
}

/// Returns T, the number of tokens.
pub(crate) fn matmul(x: &[f32], w: &WeightView<'_>, out: &[f32]) -> Result<usize> {
    let t = rows("matmul", "x", x.len(), w.cols())?;
    len_eq("matmul", "out", out.len(), t * w.rows())?;
    Ok(t)
}

pub(crate) fn rms_norm(x: &[f32], weight: &[f32], out: &[f32]) -> Result<usize> {
    let t = rows("rms_norm", "x", x.len(), weight.len())?;
    len_eq("rms_norm", "out", out.len(), x.len())?;
    Ok(t)
}

pub(crate) fn silu_mul(gate: &[f32], up: &[f32], out: &[f32]) -> Result<()> {
    len_eq("silu_mul", "up", up.len(), gate.len())?;
    len_eq("silu_mul", "out", out.len(), gate.len())
}

/// Returns T; `gate_up` is `[T, 2·ffn]` and `out` `[T, ffn]`.
pub(crate) fn silu_mul_fused(gate_up: &[f32], ffn: usize, out: &[f32]) -> Result<usize> {
    let t = rows("silu_mul_fused", "gate_up", gate_up.len(), 2 * ffn)?;
    len_eq("silu_mul_fused", "out", out.len(), t * ffn)?;
    Ok(t)
}

pub(crate) fn rope(
    rope: &Rope,
    heads: &AttentionHeads,
    positions: &[usize],
    q: &[f32],
    k: &[f32],
) -> Result<()> {
    if rope.head_dim() != heads.head_dim() {
        return Err(KernelError::InvalidShape {
            op: "rope",
            what: "head_dim",
            reason: format!(
                "rope head_dim {} differs from attention head_dim {}",
                rope.head_dim(),
                heads.head_dim()
            ),
        });
    }
    let t = positions.len();
    len_eq("rope", "q", q.len(), t * heads.q_width())?;
    len_eq("rope", "k", k.len(), t * heads.kv_width())
}

pub(crate) fn embedding(table: &WeightView<'_>, ids: &[u32], out: &[f32]) -> Result<()> {
    embedding_rows(table.rows(), table.cols(), ids, out)
}

/// [`embedding`] for any table of `rows × cols`.
pub(crate) fn embedding_rows(rows: usize, cols: usize, ids: &[u32], out: &[f32]) -> Result<()> {
    len_eq("embedding", "out", out.len(), ids.len() * cols)?;
    for &id in ids {
        if id as usize >= rows {
            return Err(KernelError::TokenOutOfRange {
                op: "embedding",
                id,
                rows,
            });
        }
    }
    Ok(())
}

/// Returns the number of slots in the cache.
pub(crate) fn write_kv(
    k_new: &[f32],
    v_new: &[f32],
    slots: &[usize],
    k_cache: &[f32],
    v_cache: &[f32],
    layout: &KvCacheLayout,
) -> Result<usize> {
    let stride = layout.slot_stride();
    len_eq("write_kv", "k_new", k_new.len(), slots.len() * stride)?;
    len_eq("write_kv", "v_new", v_new.len(), slots.len() * stride)?;
    let capacity = cache_slots("write_kv", k_cache, v_cache, layout)?;
    for &slot in slots {
        if slot >= capacity {
            return Err(KernelError::SlotOutOfRange {
                op: "write_kv",
                slot,
                capacity,
            });
        }
    }
    Ok(capacity)
}

fn cache_slots(op: &'static str, k: &[f32], v: &[f32], layout: &KvCacheLayout) -> Result<usize> {
    let blocks = rows(op, "k_cache", k.len(), layout.block_stride())?;
    len_eq(op, "v_cache", v.len(), k.len())?;
    Ok(blocks * layout.block_size())
}

/// Validates a paged-attention batch. Also checks that query runs are in increasing,
/// non-overlapping row order, so the outputs of different sequences are disjoint.
pub(crate) fn paged_attention(
    q: &[f32],
    heads: &AttentionHeads,
    cache: &KvCache<'_>,
    seqs: &[SeqAttention<'_>],
    out: &[f32],
) -> Result<usize> {
    let op = "paged_attention";
    let layout = &cache.layout;
    if layout.num_kv_heads() != heads.num_kv_heads() || layout.head_dim() != heads.head_dim() {
        return Err(KernelError::InvalidShape {
            op,
            what: "cache layout",
            reason: format!(
                "cache has {} kv heads of dim {}, attention has {} of dim {}",
                layout.num_kv_heads(),
                layout.head_dim(),
                heads.num_kv_heads(),
                heads.head_dim()
            ),
        });
    }
    let t = rows(op, "q", q.len(), heads.q_width())?;
    len_eq(op, "out", out.len(), q.len())?;
    let num_blocks = cache_slots(op, cache.k, cache.v, layout)? / layout.block_size();
    let mut next_free_row = 0usize;
    for (i, s) in seqs.iter().enumerate() {
        let bad = |reason: String| KernelError::BadBlockTable { op, seq: i, reason };
        if s.query_len > s.context_len {
            return Err(bad(format!(
                "query_len {} exceeds context_len {}",
                s.query_len, s.context_len
            )));
        }
        if s.query_start < next_free_row {
            return Err(bad(format!(
                "query rows start at {} but earlier sequences use rows up to {next_free_row}; \
                 runs must be in increasing, non-overlapping order",
                s.query_start
            )));
        }
        let end = s
            .query_start
            .checked_add(s.query_len)
            .filter(|&e| e <= t)
            .ok_or_else(|| {
                bad(format!(
                    "query rows {}..{}+{} exceed the {t} rows of q",
                    s.query_start, s.query_start, s.query_len
                ))
            })?;
        next_free_row = end;
        let needed = s.context_len.div_ceil(layout.block_size());
        if s.block_table.len() < needed {
            return Err(bad(format!(
                "context_len {} needs {needed} blocks of {} but the table has {}",
                s.context_len,
                layout.block_size(),
                s.block_table.len()
            )));
        }
        if let Some(b) = s.block_table[..needed]
            .iter()
            .find(|b| b.index() >= num_blocks)
        {
            return Err(bad(format!(
                "block {} is out of range for a cache of {num_blocks} blocks",
                b.0
            )));
        }
    }
    Ok(t)
}
