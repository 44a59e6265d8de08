//! The scalar reference kernels against hand-computed values and independent naive
//! formulations (dense attention over contiguous K/V).

mod common;

use batos_kernels::cpu::reference as r;
use batos_kernels::{
    AttentionHeads, KernelError, KvCache, KvCacheLayout, Llama3RopeScaling, Rope, RopeConfig,
    RopeScaling, SeqAttention, WeightView,
};
use batos_types::BlockId;
use common::{assert_close, TestRng};
use half::{bf16, f16};

#[test]
fn matmul_small_known_values() {
    // W = [[1,2,3],[4,5,6]], x = [[1,0,-1],[2,1,0]]
    let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let x = [1.0f32, 0.0, -1.0, 2.0, 1.0, 0.0];
    let mut y = [0.0f32; 4];
    r::matmul(&x, &WeightView::f32(&w, 2, 3).unwrap(), &mut y).unwrap();
    assert_eq!(y, [-2.0, -2.0, 4.0, 13.0]);
    let wh: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
    r::matmul(&x, &WeightView::f16(&wh, 2, 3).unwrap(), &mut y).unwrap();
    assert_eq!(y, [-2.0, -2.0, 4.0, 13.0]);
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    r::matmul(&x, &WeightView::bf16(&wb, 2, 3).unwrap(), &mut y).unwrap();
    assert_eq!(y, [-2.0, -2.0, 4.0, 13.0]);
}

#[test]
fn matmul_rejects_bad_shapes() {
    let w = [0.0f32; 6];
    let view = WeightView::f32(&w, 2, 3).unwrap();
    let mut y = [0.0f32; 2];
    assert!(matches!(
        r::matmul(&[0.0; 4], &view, &mut y),
        Err(KernelError::NotWholeRows { .. })
    ));
    assert!(matches!(
        r::matmul(&[0.0; 3], &view, &mut [0.0; 3]),
        Err(KernelError::LengthMismatch { .. })
    ));
}

#[test]
fn rms_norm_known_values() {
    let x = [3.0f32, 4.0];
    let mut out = [0.0f32; 2];
    r::rms_norm(&x, &[1.0, 2.0], 0.0, &mut out).unwrap();
    let inv = 1.0 / (12.5f32).sqrt();
    assert_close(&out, &[3.0 * inv, 8.0 * inv], 1e-6, 0.0, "rms_norm");
}

#[test]
fn rope_position_zero_is_identity_and_rotation_preserves_norm() {
    let rope = Rope::new(&RopeConfig {
        theta: 10000.0,
        head_dim: 8,
        scaling: RopeScaling::Default,
    })
    .unwrap();
    let heads = AttentionHeads::new(4, 2, 8).unwrap();
    let mut rng = TestRng::new(1);
    let q0 = rng.vec(2 * 32);
    let k0 = rng.vec(2 * 16);
    let (mut q, mut k) = (q0.clone(), k0.clone());
    r::rope(&rope, &heads, &[0, 5], &mut q, &mut k).unwrap();
    assert_eq!(&q[..32], &q0[..32]);
    assert_eq!(&k[..16], &k0[..16]);
    // Token 1 at position 5: pair (i, i+4) rotated by 5 * inv_freq[i].
    for i in 0..4 {
        let a = 5.0f64 * 10000f64.powf(-(2.0 * i as f64) / 8.0);
        let (x1, x2) = (q0[32 + i] as f64, q0[32 + i + 4] as f64);
        let want = (x1 * a.cos() - x2 * a.sin(), x2 * a.cos() + x1 * a.sin());
        assert!((q[32 + i] as f64 - want.0).abs() < 1e-5);
        assert!((q[32 + i + 4] as f64 - want.1).abs() < 1e-5);
    }
}

#[test]
fn rope_llama3_scaling_matches_hand_computation() {
    let s = Llama3RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let dim = 128;
    let base = 500000.0f32;
    let rope = Rope::new(&RopeConfig {
        theta: base,
        head_dim: dim,
        scaling: RopeScaling::Llama3(s),
    })
    .unwrap();
    let plain = Rope::new(&RopeConfig {
        theta: base,
        head_dim: dim,
        scaling: RopeScaling::Default,
    })
    .unwrap();
    for (i, (&f, &p)) in rope.inv_freq().iter().zip(plain.inv_freq()).enumerate() {
        let wavelen = 2.0 * std::f64::consts::PI / p as f64;
        let want = if wavelen < 8192.0 / 4.0 {
            p as f64
        } else if wavelen > 8192.0 {
            p as f64 / 8.0
        } else {
            let smooth = (8192.0 / wavelen - 1.0) / 3.0;
            (1.0 - smooth) * p as f64 / 8.0 + smooth * p as f64
        };
        assert!(
            ((f as f64) - want).abs() <= 1e-6 * want,
            "inv_freq[{i}] = {f}, want {want}"
        );
    }
    // High frequencies are untouched, the lowest is divided by the factor.
    assert_eq!(rope.inv_freq()[0], plain.inv_freq()[0]);
    assert_eq!(rope.inv_freq()[63], plain.inv_freq()[63] / 8.0);
}

#[test]
fn rope_rejects_odd_head_dim_and_mismatch() {
    assert!(Rope::new(&RopeConfig {
        theta: 1e4,
        head_dim: 7,
        scaling: RopeScaling::Default
    })
    .is_err());
    let rope = Rope::new(&RopeConfig {
        theta: 1e4,
        head_dim: 8,
        scaling: RopeScaling::Default,
    })
    .unwrap();
    let heads = AttentionHeads::new(2, 1, 4).unwrap();
    assert!(r::rope(&rope, &heads, &[0], &mut [0.0; 8], &mut [0.0; 4]).is_err());
}

#[test]
fn softmax_and_argmax_edge_cases() {
    let mut x = [1.0f32, 2.0, 3.0];
    r::softmax(&mut x);
    let e: Vec<f32> = [1.0f32, 2.0, 3.0].iter().map(|v| (v - 3.0).exp()).collect();
    let s: f32 = e.iter().sum();
    assert_close(&x, &[e[0] / s, e[1] / s, e[2] / s], 1e-6, 0.0, "softmax");
    let mut masked = [f32::NEG_INFINITY; 3];
    r::softmax(&mut masked);
    assert_eq!(masked, [0.0; 3]);
    assert_eq!(r::argmax(&[1.0, 3.0, 3.0, f32::NAN]), Some(1));
    assert_eq!(r::argmax(&[f32::NAN]), None);
    assert_eq!(r::argmax(&[]), None);
}

#[test]
fn silu_mul_known_values() {
    let mut out = [0.0f32; 2];
    r::silu_mul(&[0.0, 2.0], &[5.0, 3.0], &mut out).unwrap();
    let s2 = 2.0 / (1.0 + (-2.0f32).exp());
    assert_close(&out, &[0.0, s2 * 3.0], 1e-6, 0.0, "silu_mul");
}

#[test]
fn embedding_gathers_rows_and_rejects_bad_ids() {
    let table: Vec<bf16> = (0..6).map(|v| bf16::from_f32(v as f32)).collect();
    let view = WeightView::bf16(&table, 3, 2).unwrap();
    let mut out = [0.0f32; 4];
    r::embedding(&view, &[2, 0], &mut out).unwrap();
    assert_eq!(out, [4.0, 5.0, 0.0, 1.0]);
    assert!(matches!(
        r::embedding(&view, &[3, 0], &mut out),
        Err(KernelError::TokenOutOfRange { id: 3, .. })
    ));
}

/// Dense causal attention of `q` over contiguous `k`, `v` `[ctx, kvh*hd]`, queries at
/// positions `ctx - nq ..`.
fn dense_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    heads: &AttentionHeads,
    ctx: usize,
) -> Vec<f32> {
    let (hd, qw, kw) = (heads.head_dim(), heads.q_width(), heads.kv_width());
    let nq = q.len() / qw;
    let mut out = vec![0.0f32; q.len()];
    for i in 0..nq {
        let pos = ctx - nq + i;
        for h in 0..heads.num_heads() {
            let g = h / heads.group_size();
            let qv = &q[i * qw + h * hd..][..hd];
            let scores: Vec<f64> = (0..=pos)
                .map(|p| {
                    let kv = &k[p * kw + g * hd..][..hd];
                    qv.iter()
                        .zip(kv)
                        .map(|(&a, &b)| (a * b) as f64)
                        .sum::<f64>()
                        / (hd as f64).sqrt()
                })
                .collect();
            let m = scores.iter().copied().fold(f64::MIN, f64::max);
            let w: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
            let z: f64 = w.iter().sum();
            for d in 0..hd {
                let acc: f64 = (0..=pos)
                    .map(|p| w[p] * v[p * kw + g * hd + d] as f64)
                    .sum();
                out[i * qw + h * hd + d] = (acc / z) as f32;
            }
        }
    }
    out
}

#[test]
fn paged_attention_matches_dense_attention() {
    let mut rng = TestRng::new(7);
    let heads = AttentionHeads::new(6, 2, 8).unwrap();
    let layout = KvCacheLayout::new(4, 2, 8).unwrap();
    let num_blocks = 32;
    let mut k_cache = vec![f32::NAN; num_blocks * layout.block_stride()];
    let mut v_cache = vec![f32::NAN; num_blocks * layout.block_stride()];
    // Three sequences: a prefill chunk continuing a cached prefix, a fresh prefill,
    // and a decode step; blocks shuffled so tables are not contiguous.
    let shapes = [(13usize, 5usize), (6, 6), (21, 1)];
    let mut free: Vec<u32> = (0..num_blocks as u32).rev().collect();
    free.swap(3, 17);
    let mut tables = Vec::new();
    let mut dense = Vec::new();
    for &(ctx, _) in &shapes {
        let table: Vec<BlockId> = (0..ctx.div_ceil(4))
            .map(|_| BlockId(free.pop().unwrap()))
            .collect();
        let k = rng.vec(ctx * heads.kv_width());
        let v = rng.vec(ctx * heads.kv_width());
        let slots: Vec<usize> = (0..ctx).map(|p| layout.slot(&table, p).unwrap()).collect();
        r::write_kv(&k, &v, &slots, &mut k_cache, &mut v_cache, &layout).unwrap();
        tables.push(table);
        dense.push((k, v));
    }
    let total_q: usize = shapes.iter().map(|s| s.1).sum();
    let q = rng.vec(total_q * heads.q_width());
    let mut seqs = Vec::new();
    let mut start = 0;
    for (i, &(ctx, nq)) in shapes.iter().enumerate() {
        seqs.push(SeqAttention {
            block_table: &tables[i],
            context_len: ctx,
            query_start: start,
            query_len: nq,
        });
        start += nq;
    }
    let cache = KvCache {
        k: &k_cache,
        v: &v_cache,
        layout,
    };
    let mut out = vec![0.0f32; q.len()];
    r::paged_attention(&q, &heads, &cache, &seqs, &mut out).unwrap();
    for (i, s) in seqs.iter().enumerate() {
        let rows = s.query_start * heads.q_width()..(s.query_start + s.query_len) * heads.q_width();
        let want = dense_attention(
            &q[rows.clone()],
            &dense[i].0,
            &dense[i].1,
            &heads,
            s.context_len,
        );
        assert_close(&out[rows], &want, 1e-5, 1e-6, "paged vs dense");
    }
}

#[test]
fn paged_attention_rejects_short_tables_and_overlaps() {
    let heads = AttentionHeads::new(2, 1, 4).unwrap();
    let layout = KvCacheLayout::new(2, 1, 4).unwrap();
    let kc = vec![0.0f32; 4 * layout.block_stride()];
    let cache = KvCache {
        k: &kc,
        v: &kc,
        layout,
    };
    let q = vec![0.0f32; 2 * heads.q_width()];
    let mut out = q.clone();
    let table = [BlockId(0)];
    let short = [SeqAttention {
        block_table: &table,
        context_len: 3,
        query_start: 0,
        query_len: 1,
    }];
    assert!(matches!(
        r::paged_attention(&q, &heads, &cache, &short, &mut out),
        Err(KernelError::BadBlockTable { .. })
    ));
    let table2 = [BlockId(9)];
    let oob = [SeqAttention {
        block_table: &table2,
        context_len: 1,
        query_start: 0,
        query_len: 1,
    }];
    assert!(r::paged_attention(&q, &heads, &cache, &oob, &mut out).is_err());
    let one = SeqAttention {
        block_table: &table,
        context_len: 2,
        query_start: 0,
        query_len: 2,
    };
    assert!(r::paged_attention(&q, &heads, &cache, &[one, one], &mut out).is_err());
}

#[test]
fn write_kv_rejects_out_of_range_slot() {
    let layout = KvCacheLayout::new(2, 1, 2).unwrap();
    let mut k = vec![0.0f32; 2 * layout.block_stride()];
    let mut v = k.clone();
    assert!(matches!(
        r::write_kv(&[1.0; 2], &[1.0; 2], &[4], &mut k, &mut v, &layout),
        Err(KernelError::SlotOutOfRange {
            slot: 4,
            capacity: 4,
            ..
        })
    ));
    r::write_kv(&[1.0, 2.0], &[3.0, 4.0], &[3], &mut k, &mut v, &layout).unwrap();
    assert_eq!(&k[6..8], &[1.0, 2.0]);
    assert_eq!(&v[6..8], &[3.0, 4.0]);
}
