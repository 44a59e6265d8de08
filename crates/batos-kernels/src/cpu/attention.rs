//! Paged attention on the fast path: one task per (query row, KV head), so a single
//! sequence's decode step still spreads over cores, and the query heads of a GQA group
//! share each K/V row load.

use super::par;
use super::reference::kv_offset;
use super::simd::Avx2;
use crate::shapes::{AttentionHeads, SeqAttention};
use crate::KvCache;
use std::cell::RefCell;

thread_local! {
    /// Per-thread scratch: attention scores and K/V row offsets.
    static SCRATCH: RefCell<(Vec<f32>, Vec<usize>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Same contract as [`super::reference::paged_attention`]; arguments already checked.
pub(crate) fn paged_attention(
    avx: Avx2,
    q: &[f32],
    heads: &AttentionHeads,
    cache: &KvCache<'_>,
    seqs: &[SeqAttention<'_>],
    out: &mut [f32],
) {
    let hd = heads.head_dim();
    let g = heads.group_size();
    let qw = heads.q_width();
    let rows = q.len() / qw;
    // Which sequence and position each query row belongs to (rows no sequence names
    // are left untouched).
    let mut owner: Vec<Option<(usize, usize)>> = vec![None; rows];
    for (si, s) in seqs.iter().enumerate() {
        let first = s.context_len - s.query_len;
        for i in 0..s.query_len {
            owner[s.query_start + i] = Some((si, first + i));
        }
    }
    let scale = 1.0 / (hd as f32).sqrt();
    let chunk = g * hd;
    let kvh = heads.num_kv_heads();
    par::for_each_chunk_mut(out, chunk, &|idx, o| {
        let (row, kv_head) = (idx / kvh, idx % kvh);
        let Some((si, pos)) = owner[row] else { return };
        let s = &seqs[si];
        let ctx = pos + 1;
        SCRATCH.with(|cell| {
            let (scores, offsets) = &mut *cell.borrow_mut();
            offsets.clear();
            offsets.extend((0..ctx).map(|p| kv_offset(&cache.layout, s, p, kv_head)));
            let qrow = &q[row * qw + kv_head * chunk..][..chunk];
            avx.attend(qrow, g, hd, cache.k, cache.v, offsets, scale, scores, o);
        });
    });
}
