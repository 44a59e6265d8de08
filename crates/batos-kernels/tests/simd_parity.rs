//! The dispatching kernels (`cpu::*`, AVX2 on CPUs that have it) against the scalar
//! reference on random shapes, odd sizes included, under every thread backend.
//!
//! Tolerances:
//! - matmul: `|got − want| ≤ 1e-5 · Σₖ|xₖ·wₖ|` per element — f32 accumulation in
//!   another order than the f64 reference (weights are widened exactly, so f16/bf16
//!   add no error of their own);
//! - rms_norm, softmax, silu_mul: relative 1e-5 (SIMD `exp` is within 2e-7);
//! - attention: absolute 2e-5 (outputs are convex combinations of values in [-1, 1]);
//! - embedding and write_kv: exact.

mod common;

use batos_kernels::cpu::{self, reference as r, ThreadBackend};
use batos_kernels::{
    AttentionHeads, KvCache, KvCacheLayout, Rope, RopeConfig, RopeScaling, SeqAttention, WeightView,
};
use batos_types::BlockId;
use common::{assert_close, TestRng};
use half::{bf16, f16};
use proptest::prelude::*;

const BACKENDS: [ThreadBackend; 3] = [
    ThreadBackend::SpinPool,
    ThreadBackend::Rayon,
    ThreadBackend::Serial,
];

const ODD: [usize; 12] = [1, 2, 3, 4, 5, 7, 8, 17, 63, 64, 65, 577];

/// Checks `cpu::matmul` against the reference for one shape and every dtype.
fn check_matmul(rng: &mut TestRng, t: usize, n: usize, k: usize) {
    let x = rng.vec(t * k);
    let w32 = rng.vec(n * k);
    let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
    let wb16: Vec<bf16> = w32.iter().map(|&v| bf16::from_f32(v)).collect();
    let views = [
        WeightView::f32(&w32, n, k).unwrap(),
        WeightView::f16(&w16, n, k).unwrap(),
        WeightView::bf16(&wb16, n, k).unwrap(),
    ];
    let xa: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    for view in views {
        let mut want = vec![0.0f32; t * n];
        r::matmul(&x, &view, &mut want).unwrap();
        // Σ|x·w| per output, from the reference on absolute values.
        let wabs: Vec<f32> = (0..n * k)
            .map(|i| view.get(i / k, i % k).unwrap().abs())
            .collect();
        let mut mag = vec![0.0f32; t * n];
        r::matmul(&xa, &WeightView::f32(&wabs, n, k).unwrap(), &mut mag).unwrap();
        let mut got = vec![f32::NAN; t * n];
        cpu::matmul(&x, &view, &mut got).unwrap();
        for i in 0..t * n {
            let tol = 1e-5 * mag[i] + f32::MIN_POSITIVE;
            assert!(
                (got[i] - want[i]).abs() <= tol,
                "matmul {} t={t} n={n} k={k} at [{}, {}]: got {}, want {} (tol {tol})",
                view.dtype(),
                i / n,
                i % n,
                got[i],
                want[i]
            );
        }
    }
}

#[test]
fn matmul_matches_reference_on_odd_shapes() {
    let mut rng = TestRng::new(11);
    for backend in BACKENDS {
        cpu::set_thread_backend(backend);
        for _ in 0..40 {
            let t = ODD[rng.below(8)];
            let n = ODD[rng.below(ODD.len())];
            let k = ODD[rng.below(ODD.len())];
            check_matmul(&mut rng, t, n, k);
        }
    }
    cpu::set_thread_backend(ThreadBackend::default());
}

#[test]
fn matmul_matches_reference_on_large_and_blocked_shapes() {
    let mut rng = TestRng::new(12);
    // Multi-task splits, token blocks beyond one cache block (96), model-like widths.
    for &(t, n, k) in &[
        (1, 192, 576),
        (2, 577, 65),
        (16, 1536, 64),
        (33, 192, 576),
        (130, 70, 129),
        (200, 65, 64),
    ] {
        check_matmul(&mut rng, t, n, k);
    }
}

#[test]
fn matmul_of_empty_inner_dimension_is_zero() {
    let w: [f32; 0] = [];
    let mut out = [1.0f32; 6];
    cpu::matmul(&[], &WeightView::f32(&w, 3, 0).unwrap(), &mut out).unwrap_err();
    let view = WeightView::f32(&w, 0, 4).unwrap();
    let mut none: [f32; 0] = [];
    cpu::matmul(&[1.0; 8], &view, &mut none).unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn matmul_proptest(t in 1usize..12, n in 1usize..40, k in 1usize..80, seed in any::<u64>()) {
        check_matmul(&mut TestRng::new(seed), t, n, k);
    }
}

#[test]
fn rms_norm_matches_reference() {
    let mut rng = TestRng::new(21);
    for &d in &ODD {
        for &t in &[1usize, 3, 17, 130] {
            let x = rng.vec(t * d);
            let w = rng.vec(d);
            let (mut got, mut want) = (vec![0.0; t * d], vec![0.0; t * d]);
            r::rms_norm(&x, &w, 1e-5, &mut want).unwrap();
            cpu::rms_norm(&x, &w, 1e-5, &mut got).unwrap();
            assert_close(&got, &want, 1e-5, 1e-6, &format!("rms_norm t={t} d={d}"));
        }
    }
}

#[test]
fn silu_mul_matches_reference_including_extremes() {
    let mut rng = TestRng::new(22);
    for &n in &[1usize, 7, 8, 17, 65, 577, 70_001] {
        let gate: Vec<f32> = (0..n).map(|_| rng.uniform() * 30.0).collect();
        let up = rng.vec(n);
        let (mut got, mut want) = (vec![0.0; n], vec![0.0; n]);
        r::silu_mul(&gate, &up, &mut want).unwrap();
        cpu::silu_mul(&gate, &up, &mut got).unwrap();
        assert_close(&got, &want, 1e-5, 1e-7, &format!("silu_mul n={n}"));
    }
    let gate = [-200.0f32, -90.0, -88.0, 0.0, 88.0, 90.0, 200.0, 1e-30];
    let up = [1.0f32; 8];
    let (mut got, mut want) = ([0.0; 8], [0.0; 8]);
    r::silu_mul(&gate, &up, &mut want).unwrap();
    cpu::silu_mul(&gate, &up, &mut got).unwrap();
    assert_close(&got, &want, 1e-5, 1e-30, "silu_mul extremes");
}

#[test]
fn silu_mul_fused_matches_split_reference() {
    let mut rng = TestRng::new(26);
    for &(t, f) in &[(1usize, 1usize), (3, 7), (17, 65), (130, 1536)] {
        let gate_up: Vec<f32> = (0..t * 2 * f).map(|_| rng.uniform() * 10.0).collect();
        let (mut gate, mut up) = (Vec::new(), Vec::new());
        for row in gate_up.chunks_exact(2 * f) {
            gate.extend_from_slice(&row[..f]);
            up.extend_from_slice(&row[f..]);
        }
        let mut want = vec![0.0; t * f];
        r::silu_mul(&gate, &up, &mut want).unwrap();
        let (mut fused_ref, mut fused_fast, mut via_trait) =
            (vec![0.0; t * f], vec![0.0; t * f], vec![0.0; t * f]);
        r::silu_mul_fused(&gate_up, f, &mut fused_ref).unwrap();
        cpu::silu_mul_fused(&gate_up, f, &mut fused_fast).unwrap();
        // The trait's default (split, then silu_mul) through a backend without an
        // override of its own.
        struct SplitOnly;
        impl batos_kernels::Kernels for SplitOnly {
            fn matmul(
                &self,
                x: &[f32],
                w: &WeightView<'_>,
                o: &mut [f32],
            ) -> batos_kernels::Result<()> {
                cpu::matmul(x, w, o)
            }
            fn rms_norm(
                &self,
                x: &[f32],
                w: &[f32],
                eps: f32,
                o: &mut [f32],
            ) -> batos_kernels::Result<()> {
                cpu::rms_norm(x, w, eps, o)
            }
            fn rope(
                &self,
                rope: &Rope,
                heads: &AttentionHeads,
                positions: &[usize],
                q: &mut [f32],
                k: &mut [f32],
            ) -> batos_kernels::Result<()> {
                cpu::rope(rope, heads, positions, q, k)
            }
            fn silu_mul(&self, g: &[f32], u: &[f32], o: &mut [f32]) -> batos_kernels::Result<()> {
                cpu::silu_mul(g, u, o)
            }
            fn embedding(
                &self,
                t: &WeightView<'_>,
                ids: &[u32],
                o: &mut [f32],
            ) -> batos_kernels::Result<()> {
                cpu::embedding(t, ids, o)
            }
            fn write_kv(
                &self,
                k: &[f32],
                v: &[f32],
                slots: &[usize],
                kc: &mut [f32],
                vc: &mut [f32],
                layout: &KvCacheLayout,
            ) -> batos_kernels::Result<()> {
                cpu::write_kv(k, v, slots, kc, vc, layout)
            }
            fn paged_attention(
                &self,
                q: &[f32],
                heads: &AttentionHeads,
                cache: &KvCache<'_>,
                seqs: &[SeqAttention<'_>],
                o: &mut [f32],
            ) -> batos_kernels::Result<()> {
                cpu::paged_attention(q, heads, cache, seqs, o)
            }
            fn lora(
                &self,
                x: &[f32],
                tokens: &[Option<batos_types::SlotIdx>],
                targets: &[cpu::lora::LoraTarget<'_>],
                y: &mut [f32],
                y_width: usize,
            ) -> batos_kernels::Result<()> {
                cpu::lora::apply_fused(x, tokens, targets, y, y_width)
            }
        }
        batos_kernels::Kernels::silu_mul_fused(&SplitOnly, &gate_up, f, &mut via_trait).unwrap();
        assert_eq!(fused_ref, want);
        assert_close(
            &fused_fast,
            &want,
            1e-5,
            1e-7,
            &format!("silu_mul_fused t={t} f={f}"),
        );
        assert_close(&via_trait, &want, 1e-5, 1e-7, "trait default");
    }
    assert!(cpu::silu_mul_fused(&[0.0; 6], 2, &mut [0.0; 3]).is_err());
    assert!(cpu::silu_mul_fused(&[0.0; 8], 2, &mut [0.0; 3]).is_err());
    assert!(cpu::silu_mul_fused(&[0.0; 8], 0, &mut []).is_err());
}

#[test]
fn softmax_matches_reference() {
    let mut rng = TestRng::new(23);
    for &n in &[1usize, 3, 8, 17, 63, 577, 49152] {
        let mut x: Vec<f32> = (0..n).map(|_| rng.uniform() * 20.0).collect();
        if n > 3 {
            x[1] = f32::NEG_INFINITY;
        }
        let mut want = x.clone();
        r::softmax(&mut want);
        cpu::softmax(&mut x);
        assert_close(&x, &want, 1e-5, 1e-9, &format!("softmax n={n}"));
    }
    let mut masked = [f32::NEG_INFINITY; 9];
    cpu::softmax(&mut masked);
    assert_eq!(masked, [0.0; 9]);
}

#[test]
fn embedding_matches_reference_exactly() {
    let mut rng = TestRng::new(24);
    let (vocab, d) = (50, 65);
    let t32 = rng.vec(vocab * d);
    let t16: Vec<f16> = t32.iter().map(|&v| f16::from_f32(v)).collect();
    let tb: Vec<bf16> = t32.iter().map(|&v| bf16::from_f32(v)).collect();
    let ids = [0u32, 49, 7, 7, 13];
    for view in [
        WeightView::f32(&t32, vocab, d).unwrap(),
        WeightView::f16(&t16, vocab, d).unwrap(),
        WeightView::bf16(&tb, vocab, d).unwrap(),
    ] {
        let (mut got, mut want) = (vec![0.0; ids.len() * d], vec![0.0; ids.len() * d]);
        r::embedding(&view, &ids, &mut want).unwrap();
        cpu::embedding(&view, &ids, &mut got).unwrap();
        assert_eq!(got, want);
    }
}

#[test]
fn rope_dispatch_matches_reference_exactly() {
    let mut rng = TestRng::new(25);
    let rope = Rope::new(&RopeConfig {
        theta: 100_000.0,
        head_dim: 64,
        scaling: RopeScaling::Default,
    })
    .unwrap();
    let heads = AttentionHeads::new(9, 3, 64).unwrap();
    let positions = [0usize, 1, 17, 511, 8191];
    let q = rng.vec(positions.len() * heads.q_width());
    let k = rng.vec(positions.len() * heads.kv_width());
    let (mut q1, mut k1, mut q2, mut k2) = (q.clone(), k.clone(), q, k);
    r::rope(&rope, &heads, &positions, &mut q1, &mut k1).unwrap();
    cpu::rope(&rope, &heads, &positions, &mut q2, &mut k2).unwrap();
    assert_eq!((q1, k1), (q2, k2));
}

/// A random batch over a shared paged cache: (queries, tables, seq shapes).
struct Batch {
    heads: AttentionHeads,
    layout: KvCacheLayout,
    k_cache: Vec<f32>,
    v_cache: Vec<f32>,
    tables: Vec<Vec<BlockId>>,
    shapes: Vec<(usize, usize)>,
    q: Vec<f32>,
}

fn random_batch(
    rng: &mut TestRng,
    heads: AttentionHeads,
    block: usize,
    shapes: Vec<(usize, usize)>,
) -> Batch {
    let layout = KvCacheLayout::new(block, heads.num_kv_heads(), heads.head_dim()).unwrap();
    let blocks: usize = shapes.iter().map(|s| s.0.div_ceil(block)).sum::<usize>() + 3;
    let mut k_cache = vec![0.0f32; blocks * layout.block_stride()];
    let mut v_cache = k_cache.clone();
    // Interleave block ids across sequences.
    let mut ids: Vec<u32> = (0..blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, rng.below(i + 1));
    }
    let mut tables = Vec::new();
    for &(ctx, _) in &shapes {
        let table: Vec<BlockId> = (0..ctx.div_ceil(block))
            .map(|_| BlockId(ids.pop().unwrap()))
            .collect();
        let k = rng.vec(ctx * heads.kv_width());
        let v = rng.vec(ctx * heads.kv_width());
        let slots: Vec<usize> = (0..ctx).map(|p| layout.slot(&table, p).unwrap()).collect();
        cpu::write_kv(&k, &v, &slots, &mut k_cache, &mut v_cache, &layout).unwrap();
        tables.push(table);
    }
    let rows: usize = shapes.iter().map(|s| s.1).sum();
    let q = rng.vec(rows * heads.q_width());
    Batch {
        heads,
        layout,
        k_cache,
        v_cache,
        tables,
        shapes,
        q,
    }
}

fn check_attention(b: &Batch) {
    let mut seqs = Vec::new();
    let mut start = 0;
    for (i, &(ctx, nq)) in b.shapes.iter().enumerate() {
        seqs.push(SeqAttention {
            block_table: &b.tables[i],
            context_len: ctx,
            query_start: start,
            query_len: nq,
        });
        start += nq;
    }
    let cache = KvCache {
        k: &b.k_cache,
        v: &b.v_cache,
        layout: b.layout,
    };
    let mut want = vec![0.0f32; b.q.len()];
    r::paged_attention(&b.q, &b.heads, &cache, &seqs, &mut want).unwrap();
    let mut got = vec![f32::NAN; b.q.len()];
    cpu::paged_attention(&b.q, &b.heads, &cache, &seqs, &mut got).unwrap();
    assert_close(&got, &want, 0.0, 2e-5, &format!("attention {:?}", b.shapes));
}

#[test]
fn paged_attention_matches_reference() {
    let mut rng = TestRng::new(31);
    for backend in BACKENDS {
        cpu::set_thread_backend(backend);
        // Mixed prefill chunks and decodes, GQA 3:1 with the model's head_dim.
        let b = random_batch(
            &mut rng,
            AttentionHeads::new(9, 3, 64).unwrap(),
            16,
            vec![(1, 1), (40, 40), (77, 1), (33, 7), (17, 1)],
        );
        check_attention(&b);
        // Group sizes 4 and 8 (heads split 3+1 and 3+3+2 in the fast path).
        for &(nh, nkv) in &[(8usize, 2usize), (8, 1)] {
            let b = random_batch(
                &mut rng,
                AttentionHeads::new(nh, nkv, 40).unwrap(),
                8,
                vec![(21, 21), (30, 1)],
            );
            check_attention(&b);
        }
        // Odd head_dim, MHA, block size 1 and 5.
        for &(hd, block) in &[(7usize, 1usize), (17, 5), (65, 3)] {
            let b = random_batch(
                &mut rng,
                AttentionHeads::new(2, 2, hd).unwrap(),
                block,
                vec![(3, 2), (19, 1), (9, 9)],
            );
            check_attention(&b);
        }
    }
    cpu::set_thread_backend(ThreadBackend::default());
}

#[test]
fn paged_attention_with_descending_and_repeated_stride_tables() {
    // Block size 1 with blocks in descending order: K/V rows evenly spaced but going
    // backwards, which the 4-position tiles must not take for a forward stride.
    let mut rng = TestRng::new(33);
    let heads = AttentionHeads::new(6, 2, 16).unwrap();
    let layout = KvCacheLayout::new(1, 2, 16).unwrap();
    let ctx = 13;
    let mut k_cache = vec![0.0f32; 20 * layout.block_stride()];
    let mut v_cache = k_cache.clone();
    let table: Vec<BlockId> = (0..ctx as u32).rev().map(|b| BlockId(b + 3)).collect();
    let slots: Vec<usize> = (0..ctx).map(|p| layout.slot(&table, p).unwrap()).collect();
    let (k, v) = (
        rng.vec(ctx * heads.kv_width()),
        rng.vec(ctx * heads.kv_width()),
    );
    cpu::write_kv(&k, &v, &slots, &mut k_cache, &mut v_cache, &layout).unwrap();
    let q = rng.vec(3 * heads.q_width());
    let seqs = [SeqAttention {
        block_table: &table,
        context_len: ctx,
        query_start: 0,
        query_len: 3,
    }];
    let cache = KvCache {
        k: &k_cache,
        v: &v_cache,
        layout,
    };
    let (mut got, mut want) = (vec![0.0f32; q.len()], vec![0.0f32; q.len()]);
    r::paged_attention(&q, &heads, &cache, &seqs, &mut want).unwrap();
    cpu::paged_attention(&q, &heads, &cache, &seqs, &mut got).unwrap();
    assert_close(&got, &want, 0.0, 2e-5, "descending table");
}

#[test]
fn paged_attention_leaves_unnamed_rows_untouched() {
    let mut rng = TestRng::new(32);
    let b = random_batch(
        &mut rng,
        AttentionHeads::new(4, 2, 8).unwrap(),
        4,
        vec![(5, 2)],
    );
    let cache = KvCache {
        k: &b.k_cache,
        v: &b.v_cache,
        layout: b.layout,
    };
    // Rows 0 and 3 of a 4-row batch are not named by any sequence.
    let mut q = vec![0.0f32; 4 * b.heads.q_width()];
    q[b.heads.q_width()..3 * b.heads.q_width()].copy_from_slice(&b.q);
    let seqs = [SeqAttention {
        block_table: &b.tables[0],
        context_len: 5,
        query_start: 1,
        query_len: 2,
    }];
    let mut out = vec![-7.0f32; q.len()];
    cpu::paged_attention(&q, &b.heads, &cache, &seqs, &mut out).unwrap();
    assert!(out[..b.heads.q_width()].iter().all(|&v| v == -7.0));
    assert!(out[3 * b.heads.q_width()..].iter().all(|&v| v == -7.0));
    assert!(out[b.heads.q_width()..3 * b.heads.q_width()]
        .iter()
        .all(|&v| v != -7.0));
}
