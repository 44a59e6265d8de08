//! The batched LoRA kernels: the scalar reference against a dense
//! `x · (W + scale·B·A)ᵀ`, the fast path (AVX2 where present) against the reference on
//! odd shapes and mixed ranks, BGMV against SGMV, and argument rejection.

mod common;

use batos_kernels::cpu::int4_dot::{self, Int4DotWeight, Int4Rows};
use batos_kernels::cpu::lora::{
    self, int8_dot_available, pack_a, pack_b, pack_b_quads, reference, ALayout, BLayout, LoraDType,
    LoraMatrix, LoraSegment, LoraSlot, LoraSlots, LoraTarget,
};
use batos_kernels::cpu::reference as base;
use batos_kernels::{KernelError, WeightView};
use batos_types::SlotIdx;
use common::{assert_close, TestRng};
use half::{bf16, f16};

/// Owned A/B/scale for one slot.
struct Owned {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
    scale: f32,
}

fn make_slots(
    rng: &mut TestRng,
    n_in: usize,
    n_out: usize,
    ranks: &[Option<usize>],
) -> Vec<Option<Owned>> {
    ranks
        .iter()
        .map(|r| {
            r.map(|rank| Owned {
                a: rng.vec(rank * n_in),
                b: rng.vec(n_out * rank),
                rank,
                scale: 0.5 + rng.uniform().abs(),
            })
        })
        .collect()
}

fn views(owned: &[Option<Owned>]) -> Vec<Option<LoraSlot<'_>>> {
    owned
        .iter()
        .map(|o| {
            o.as_ref()
                .map(|o| LoraSlot::new(&o.a, &o.b, o.rank, o.scale))
        })
        .collect()
}

fn random_tokens(rng: &mut TestRng, t: usize, table: &[Option<Owned>]) -> Vec<Option<SlotIdx>> {
    let filled: Vec<u16> = (0..table.len() as u16)
        .filter(|&i| table[i as usize].is_some())
        .collect();
    (0..t)
        .map(|_| {
            let k = rng.below(filled.len() + 1);
            filled.get(k).map(|&i| SlotIdx(i))
        })
        .collect()
}

/// Dense check: for each token, W' = W + scale·B·A, y = x · W'ᵀ, in f64.
fn dense(
    x: &[f32],
    w: &[f32],
    n_in: usize,
    n_out: usize,
    tokens: &[Option<SlotIdx>],
    table: &[Option<Owned>],
) -> Vec<f32> {
    let mut y = vec![0f32; tokens.len() * n_out];
    for (t, s) in tokens.iter().enumerate() {
        let xt = &x[t * n_in..(t + 1) * n_in];
        for o in 0..n_out {
            let mut acc = 0f64;
            for i in 0..n_in {
                let mut wv = w[o * n_in + i] as f64;
                if let Some(s) = s {
                    let sl = table[s.index()].as_ref().unwrap();
                    let ba: f64 = (0..sl.rank)
                        .map(|j| sl.b[o * sl.rank + j] as f64 * sl.a[j * n_in + i] as f64)
                        .sum();
                    wv += sl.scale as f64 * ba;
                }
                acc += xt[i] as f64 * wv;
            }
            y[t * n_out + o] = acc as f32;
        }
    }
    y
}

#[test]
fn reference_matches_dense_merged_weight() {
    let mut rng = TestRng::new(7);
    let (n_in, n_out) = (48, 40);
    let table = make_slots(&mut rng, n_in, n_out, &[Some(4), None, Some(16), Some(1)]);
    let v = views(&table);
    let slots = LoraSlots::new(n_in, n_out, &v).unwrap();
    let t = 23;
    let x = rng.vec(t * n_in);
    let w = rng.vec(n_out * n_in);
    let tokens = random_tokens(&mut rng, t, &table);
    let mut y = vec![0f32; t * n_out];
    base::matmul(&x, &WeightView::f32(&w, n_out, n_in).unwrap(), &mut y).unwrap();
    reference::bgmv(&x, &tokens, &slots, &mut y).unwrap();
    let want = dense(&x, &w, n_in, n_out, &tokens, &table);
    assert_close(&y, &want, 1e-5, 1e-5, "reference bgmv vs dense");
}

#[test]
fn fast_path_matches_reference_on_odd_shapes_and_mixed_ranks() {
    let mut rng = TestRng::new(11);
    for &(n_in, n_out) in &[(1, 1), (7, 3), (37, 29), (65, 130), (576, 192), (1536, 576)] {
        let ranks = [Some(1), Some(3), None, Some(8), Some(17), Some(64)];
        let table = make_slots(&mut rng, n_in, n_out, &ranks);
        let v = views(&table);
        let slots = LoraSlots::new(n_in, n_out, &v).unwrap();
        for &t in &[1usize, 5, 9, 33] {
            let x = rng.vec(t * n_in);
            let y0 = rng.vec(t * n_out);
            let tokens = random_tokens(&mut rng, t, &table);
            let mut want = y0.clone();
            reference::bgmv(&x, &tokens, &slots, &mut want).unwrap();
            let what = format!("in {n_in} out {n_out} T {t}");
            let mut got = y0.clone();
            lora::bgmv(&x, &tokens, &slots, &mut got).unwrap();
            let tol = 2e-6 * (n_in as f32).sqrt() * 8.0;
            assert_close(&got, &want, tol, tol, &format!("bgmv {what}"));
            let mut got = y0.clone();
            lora::sgmv(&x, &lora::segments(&tokens), &slots, &mut got).unwrap();
            assert_close(&got, &want, tol, tol, &format!("sgmv {what}"));
            let mut got = y0.clone();
            lora::apply(&x, &tokens, &slots, &mut got).unwrap();
            assert_close(&got, &want, tol, tol, &format!("apply {what}"));
        }
    }
}

#[test]
fn long_runs_take_the_segmented_path_and_match() {
    let mut rng = TestRng::new(3);
    let (n_in, n_out) = (96, 80);
    let table = make_slots(&mut rng, n_in, n_out, &[Some(8), Some(16), Some(5)]);
    let v = views(&table);
    let slots = LoraSlots::new(n_in, n_out, &v).unwrap();
    // Prefill-like: three sequences of 19, 1 and 30 tokens, plus 4 base-only tokens.
    let mut tokens = vec![Some(SlotIdx(1)); 19];
    tokens.push(Some(SlotIdx(0)));
    tokens.extend(std::iter::repeat_n(None, 4));
    tokens.extend(std::iter::repeat_n(Some(SlotIdx(1)), 30));
    let segs = lora::segments(&tokens);
    assert_eq!(segs.len(), 3);
    assert_eq!(
        segs[2],
        LoraSegment {
            start: 24,
            len: 30,
            slot: SlotIdx(1)
        }
    );
    let t = tokens.len();
    let x = rng.vec(t * n_in);
    let mut want = vec![0f32; t * n_out];
    reference::sgmv(&x, &segs, &slots, &mut want).unwrap();
    let mut got = vec![0f32; t * n_out];
    lora::sgmv(&x, &segs, &slots, &mut got).unwrap();
    assert_close(&got, &want, 1e-4, 1e-4, "sgmv long runs");
}

#[test]
fn tokens_without_adapter_are_untouched_bit_for_bit() {
    let mut rng = TestRng::new(5);
    let (n_in, n_out) = (33, 17);
    let table = make_slots(&mut rng, n_in, n_out, &[Some(4)]);
    let v = views(&table);
    let slots = LoraSlots::new(n_in, n_out, &v).unwrap();
    let tokens = [
        None,
        Some(SlotIdx(0)),
        None,
        None,
        Some(SlotIdx(0)),
        Some(SlotIdx(0)),
    ];
    let x = rng.vec(tokens.len() * n_in);
    let y0: Vec<f32> = rng
        .vec(tokens.len() * n_out)
        .into_iter()
        .map(|v| v * 1e3)
        .collect();
    let mut y = y0.clone();
    lora::apply(&x, &tokens, &slots, &mut y).unwrap();
    for (t, s) in tokens.iter().enumerate() {
        let row = t * n_out..(t + 1) * n_out;
        if s.is_none() {
            assert_eq!(
                y[row.clone()]
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>(),
                y0[row].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "token {t}"
            );
        } else {
            assert_ne!(y[row.clone()], y0[row], "token {t} should have changed");
        }
    }
    // A batch with no adapter at all leaves y alone.
    let mut y = y0.clone();
    lora::bgmv(&x, &[None; 6], &slots, &mut y).unwrap();
    assert_eq!(y, y0);
}

#[test]
fn shrink_then_expand_equals_fused() {
    let mut rng = TestRng::new(9);
    let (n_in, n_out) = (70, 50);
    let table = make_slots(&mut rng, n_in, n_out, &[Some(2), Some(12), None, Some(7)]);
    let v = views(&table);
    let slots = LoraSlots::new(n_in, n_out, &v).unwrap();
    let t = 13;
    let tokens = random_tokens(&mut rng, t, &table);
    let x = rng.vec(t * n_in);
    let r = slots.max_rank();
    let mut h = vec![0f32; t * r];
    let mut h_ref = vec![0f32; t * r];
    lora::shrink(&x, &tokens, &slots, &mut h).unwrap();
    reference::shrink(&x, &tokens, &slots, &mut h_ref).unwrap();
    assert_close(&h, &h_ref, 1e-5, 1e-5, "shrink");
    let mut y = vec![0f32; t * n_out];
    let mut y_ref = vec![0f32; t * n_out];
    lora::expand(&h, &tokens, &slots, &mut y).unwrap();
    reference::expand(&h_ref, &tokens, &slots, &mut y_ref).unwrap();
    assert_close(&y, &y_ref, 1e-5, 1e-5, "expand");
    let mut fused = vec![0f32; t * n_out];
    lora::bgmv(&x, &tokens, &slots, &mut fused).unwrap();
    assert_close(&fused, &y_ref, 1e-5, 1e-5, "fused vs split");
}

#[test]
fn mixed_batch_equals_each_token_alone() {
    let mut rng = TestRng::new(21);
    let (n_in, n_out) = (64, 48);
    let table = make_slots(&mut rng, n_in, n_out, &[Some(8), Some(16)]);
    let v = views(&table);
    let slots = LoraSlots::new(n_in, n_out, &v).unwrap();
    let tokens = [None, Some(SlotIdx(0)), Some(SlotIdx(1)), Some(SlotIdx(0))];
    let x = rng.vec(tokens.len() * n_in);
    let mut batch = vec![0f32; tokens.len() * n_out];
    lora::apply(&x, &tokens, &slots, &mut batch).unwrap();
    for (t, s) in tokens.iter().enumerate() {
        let mut alone = vec![0f32; n_out];
        lora::apply(&x[t * n_in..(t + 1) * n_in], &[*s], &slots, &mut alone).unwrap();
        assert_eq!(&batch[t * n_out..(t + 1) * n_out], &alone[..], "token {t}");
    }
}

#[test]
fn rejects_bad_arguments_with_typed_errors() {
    let (a, b) = (vec![0f32; 2 * 4], vec![0f32; 3 * 2]);
    // A of the wrong length for in=5.
    let bad = [Some(LoraSlot::new(&a, &b, 2, 1.0))];
    assert!(matches!(
        LoraSlots::new(5, 3, &bad),
        Err(KernelError::InvalidShape { what: "A", .. })
    ));
    assert!(matches!(
        LoraSlots::new(4, 4, &bad),
        Err(KernelError::InvalidShape { what: "B", .. })
    ));
    let nan = [Some(LoraSlot::new(&a, &b, 2, f32::NAN))];
    assert!(matches!(
        LoraSlots::new(4, 3, &nan),
        Err(KernelError::InvalidShape { what: "scale", .. })
    ));
    let zero = [Some(LoraSlot::new(&[], &[], 0, 1.0))];
    assert!(matches!(
        LoraSlots::new(4, 3, &zero),
        Err(KernelError::InvalidShape { what: "rank", .. })
    ));

    let table = [Some(LoraSlot::new(&a, &b, 2, 1.0)), None];
    let slots = LoraSlots::new(4, 3, &table).unwrap();
    let x = [0f32; 8];
    let mut y = [0f32; 6];
    // Empty and out-of-range slots.
    for s in [SlotIdx(1), SlotIdx(9)] {
        let err = lora::bgmv(&x, &[Some(s), None], &slots, &mut y).unwrap_err();
        assert!(
            matches!(err, KernelError::InvalidShape { what: "slot", .. }),
            "{err}"
        );
        let err = reference::bgmv(&x, &[Some(s), None], &slots, &mut y).unwrap_err();
        assert!(
            matches!(err, KernelError::InvalidShape { what: "slot", .. }),
            "{err}"
        );
    }
    // Token count differs from x's rows; y of the wrong length.
    assert!(matches!(
        lora::bgmv(&x, &[None], &slots, &mut y),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        lora::bgmv(&x, &[None, None], &slots, &mut y[..5]),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        lora::bgmv(&x[..7], &[None, None], &slots, &mut y),
        Err(KernelError::NotWholeRows { .. })
    ));
    // Overlapping and out-of-range segments.
    let seg = |start, len| LoraSegment {
        start,
        len,
        slot: SlotIdx(0),
    };
    for segs in [
        vec![seg(0, 2), seg(1, 1)],
        vec![seg(1, 2)],
        vec![seg(usize::MAX, 2)],
    ] {
        let err = lora::sgmv(&x, &segs, &slots, &mut y).unwrap_err();
        assert!(
            matches!(
                err,
                KernelError::InvalidShape {
                    what: "segments",
                    ..
                }
            ),
            "{err}"
        );
    }
    // h of the wrong length.
    let mut h = [0f32; 3];
    assert!(matches!(
        lora::shrink(&x, &[None, None], &slots, &mut h),
        Err(KernelError::LengthMismatch { .. })
    ));
}

// ---------------------------------------------------------------------------------
// Half-precision hot slots and fused groups of projections.

/// One slot's matrices stored in the element types a hot slot may hold.
struct Stored {
    a: Store,
    b: Store,
    layout: BLayout,
    rank: usize,
    scale: f32,
}

enum Store {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I8(Vec<i8>, Vec<f32>),
}

impl Store {
    /// `v` (`rows` rows) in `dtype`; int8 gets one absmax scale per row.
    fn new(v: &[f32], rows: usize, dtype: LoraDType) -> Store {
        match dtype {
            LoraDType::F32 => Store::F32(v.to_vec()),
            LoraDType::F16 => Store::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
            LoraDType::BF16 => Store::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            LoraDType::I8 => {
                let mut q = Vec::with_capacity(v.len());
                let mut scales = Vec::with_capacity(rows);
                for row in v.chunks_exact(v.len() / rows) {
                    let s = row.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
                    scales.push(s);
                    q.extend(
                        row.iter()
                            .map(|&x| if s > 0.0 { (x / s).round() as i8 } else { 0 }),
                    );
                }
                Store::I8(q, scales)
            }
        }
    }

    /// The same matrix, `A` (`[rank, in]`, `bt` = `None`) or `Bᵀ` (`[rank, out]`,
    /// `bt` = the packed layout), in a packed hot layout ([`pack_a`], or
    /// [`pack_b`]/[`pack_b_quads`] from `B` `[out, rank]`).
    fn packed(self, rank: usize, bt: Option<BLayout>) -> Store {
        fn p<T: Copy>(v: &[T], rank: usize, bt: Option<BLayout>) -> Vec<T> {
            let mut out = Vec::new();
            if let Some(layout) = bt {
                // Back to B [out, rank]: element (o, j) is bt[j·out + o].
                let n_out = v.len() / rank;
                let b: Vec<T> = (0..v.len())
                    .map(|i| v[(i % rank) * n_out + i / rank])
                    .collect();
                match layout {
                    BLayout::RankQuadBlocks => pack_b_quads(&b, rank, &mut out),
                    _ => pack_b(&b, rank, &mut out),
                }
            } else {
                pack_a(v, rank, &mut out)
            }
            out
        }
        match self {
            Store::F32(v) => Store::F32(p(&v, rank, bt)),
            Store::F16(v) => Store::F16(p(&v, rank, bt)),
            Store::BF16(v) => Store::BF16(p(&v, rank, bt)),
            Store::I8(q, scales) => Store::I8(p(&q, rank, bt), scales),
        }
    }

    fn view(&self) -> LoraMatrix<'_> {
        match self {
            Store::F32(v) => LoraMatrix::F32(v),
            Store::F16(v) => LoraMatrix::F16(v),
            Store::BF16(v) => LoraMatrix::BF16(v),
            Store::I8(q, scales) => LoraMatrix::I8 { q, scales },
        }
    }
}

fn store(table: &[Option<Owned>], a: LoraDType, b: LoraDType) -> Vec<Option<Stored>> {
    store_as(table, a, b, BLayout::OutRank)
}

/// `B` transposed to `[rank, out]` when `layout` says so; with the hot copies' layouts
/// ([`BLayout::RankOutBlocks`], [`BLayout::RankQuadBlocks`]) `A` is packed in panels
/// too.
fn store_as(
    table: &[Option<Owned>],
    a: LoraDType,
    b: LoraDType,
    layout: BLayout,
) -> Vec<Option<Stored>> {
    table
        .iter()
        .map(|o| {
            o.as_ref().map(|o| {
                let bt: Vec<f32> = match layout {
                    BLayout::OutRank => o.b.clone(),
                    BLayout::RankOut | BLayout::RankOutBlocks | BLayout::RankQuadBlocks => {
                        let out = o.b.len() / o.rank;
                        (0..o.rank * out)
                            .map(|i| o.b[(i % out) * o.rank + i / out])
                            .collect()
                    }
                };
                let b_rows = match layout {
                    BLayout::OutRank => o.b.len() / o.rank,
                    BLayout::RankOut | BLayout::RankOutBlocks | BLayout::RankQuadBlocks => o.rank,
                };
                let (mut sa, mut sb) = (Store::new(&o.a, o.rank, a), Store::new(&bt, b_rows, b));
                if matches!(layout, BLayout::RankOutBlocks | BLayout::RankQuadBlocks) {
                    sa = sa.packed(o.rank, None);
                    sb = sb.packed(o.rank, Some(layout));
                }
                Stored {
                    a: sa,
                    b: sb,
                    layout,
                    rank: o.rank,
                    scale: o.scale,
                }
            })
        })
        .collect()
}

fn stored_views(s: &[Option<Stored>]) -> Vec<Option<LoraSlot<'_>>> {
    s.iter()
        .map(|o| {
            o.as_ref().map(|o| {
                let a_layout = match o.layout {
                    BLayout::RankOutBlocks | BLayout::RankQuadBlocks => ALayout::Panels,
                    _ => ALayout::RowMajor,
                };
                LoraSlot::from_matrices(o.a.view(), o.b.view(), o.rank, o.scale)
                    .with_b_layout(o.layout)
                    .with_a_layout(a_layout)
            })
        })
        .collect()
}

const DTYPES: [LoraDType; 4] = [
    LoraDType::F32,
    LoraDType::F16,
    LoraDType::BF16,
    LoraDType::I8,
];

#[test]
fn half_slots_match_the_reference_on_odd_shapes_mixed_ranks_and_mixed_dtypes() {
    let mut rng = TestRng::new(41);
    for &(n_in, n_out) in &[(1, 1), (7, 3), (37, 29), (65, 130), (576, 192)] {
        let ranks = [Some(1), Some(3), None, Some(8), Some(17), Some(16)];
        let table = make_slots(&mut rng, n_in, n_out, &ranks);
        for (da, db, layout) in DTYPES.iter().flat_map(|&a| {
            DTYPES.iter().flat_map(move |&b| {
                [
                    (a, b, BLayout::OutRank),
                    (a, b, BLayout::RankOut),
                    (a, b, BLayout::RankOutBlocks),
                ]
            })
        }) {
            // An int8 B is only ever stored transposed (its row scales are per rank).
            if db == LoraDType::I8 && layout == BLayout::OutRank {
                continue;
            }
            {
                let stored = store_as(&table, da, db, layout);
                let v = stored_views(&stored);
                let slots = LoraSlots::new(n_in, n_out, &v).unwrap();
                for &t in &[1usize, 9, 20] {
                    let x = rng.vec(t * n_in);
                    let y0 = rng.vec(t * n_out);
                    let tokens = random_tokens(&mut rng, t, &table);
                    let mut want = y0.clone();
                    reference::bgmv(&x, &tokens, &slots, &mut want).unwrap();
                    let mut got = y0.clone();
                    lora::bgmv(&x, &tokens, &slots, &mut got).unwrap();
                    // f32 accumulation against f64 over the same (widened) values.
                    let tol = 2e-6 * (n_in as f32).sqrt() * 8.0;
                    let what = format!("A {da} B {db} {layout:?} in {n_in} out {n_out} T {t}");
                    assert_close(&got, &want, tol, tol, &what);
                    // The two halves agree with the fused call.
                    let r = slots.max_rank();
                    let mut h = vec![0f32; t * r];
                    lora::shrink(&x, &tokens, &slots, &mut h).unwrap();
                    let mut split = y0.clone();
                    lora::expand(&h, &tokens, &slots, &mut split).unwrap();
                    assert_close(&split, &want, tol, tol, &format!("split {what}"));
                }
            }
        }
    }
}

/// The stated tolerance of half-precision hot slots against f32 ones: the update
/// `scale·(x·Aᵀ)·Bᵀ` changes by at most `rel` of the magnitude it could have,
/// `scale·Σ_j (Σ_k |x_k·A_jk|) · |B_oj|`.
#[test]
fn half_slots_stay_within_the_stated_rounding_bound_of_f32_slots() {
    let mut rng = TestRng::new(43);
    let (n_in, n_out) = (576, 192);
    let table = make_slots(&mut rng, n_in, n_out, &[Some(16), Some(8)]);
    let t = 12;
    let x = rng.vec(t * n_in);
    let tokens = random_tokens(&mut rng, t, &table);
    let v32 = views(&table);
    let s32 = LoraSlots::new(n_in, n_out, &v32).unwrap();
    let mut exact = vec![0f32; t * n_out];
    reference::bgmv(&x, &tokens, &s32, &mut exact).unwrap();
    // |h|·|B| per output: the scale of the update.
    let mut mag = vec![0f32; t * n_out];
    for (i, s) in tokens.iter().enumerate() {
        let Some(s) = s else { continue };
        let o = table[s.index()].as_ref().unwrap();
        let xi = &x[i * n_in..(i + 1) * n_in];
        let absx: Vec<f32> = xi.iter().map(|v| v.abs()).collect();
        for out in 0..n_out {
            let mut m = 0f64;
            for j in 0..o.rank {
                let ha: f64 = (0..n_in)
                    .map(|k| (absx[k] * o.a[j * n_in + k].abs()) as f64)
                    .sum();
                m += ha * o.b[out * o.rank + j].abs() as f64;
            }
            mag[i * n_out + out] = (o.scale as f64 * m) as f32;
        }
    }
    // bf16 keeps 8 significant bits, f16 11: rounding A and B each moves an element by
    // at most 2^-8 (bf16) or 2^-11 (f16) of itself, so the update moves by at most
    // about twice that of `mag`. f16 subnormals (|v| < 6.1e-5) round in absolute
    // terms instead, covered by the small absolute slack.
    let rels = [
        (LoraDType::BF16, 2.01 * 2f32.powi(-8)),
        (LoraDType::F16, 2.01 * 2f32.powi(-11)),
    ];
    for (dtype, rel) in rels {
        let stored = store(&table, dtype, dtype);
        let v = stored_views(&stored);
        let slots = LoraSlots::new(n_in, n_out, &v).unwrap();
        let mut got = vec![0f32; t * n_out];
        lora::bgmv(&x, &tokens, &slots, &mut got).unwrap();
        for (k, ((g, e), m)) in got.iter().zip(&exact).zip(&mag).enumerate() {
            let bound = rel * m + 1e-4;
            assert!(
                (g - e).abs() <= bound,
                "{dtype}: element {k}: {g} vs {e}, bound {bound}"
            );
        }
    }
}

/// Slot tables for a group of projections over `n_in` inputs: `ranks[i]` for the
/// projection of `widths[i]` outputs.
fn group_slots<R: AsRef<[Option<usize>]>>(
    rng: &mut TestRng,
    n_in: usize,
    widths: &[usize],
    ranks: &[R],
) -> Vec<Vec<Option<Owned>>> {
    widths
        .iter()
        .zip(ranks)
        .map(|(&w, r)| make_slots(rng, n_in, w, r.as_ref()))
        .collect()
}

/// A group of projections over `n_in` inputs (one slot table each, `widths` outputs),
/// their columns laid out in order in the fused output.
fn group_targets<'a>(
    views: &'a [Vec<Option<LoraSlot<'a>>>],
    n_in: usize,
    widths: &[usize],
) -> (Vec<LoraSlots<'a>>, Vec<LoraTarget<'a>>) {
    let slots: Vec<LoraSlots<'a>> = views
        .iter()
        .zip(widths)
        .map(|(v, &w)| LoraSlots::new(n_in, w, v).unwrap())
        .collect();
    let mut col = 0;
    let targets = slots
        .iter()
        .map(|s| {
            let g = LoraTarget::new(*s, col);
            col += s.out_features();
            g
        })
        .collect();
    (slots, targets)
}

/// Column by column, `got` (a fused call's output over `y0`, rows of `y_width`) equals
/// each target's projection applied on its own, bit for bit; tokens whose adapter skips
/// a projection leave its columns alone.
fn assert_fused_equals_each_projection_alone(
    (x, tokens): (&[f32], &[Option<SlotIdx>]),
    (targets, slots): (&[LoraTarget<'_>], &[LoraSlots<'_>]),
    (y0, got, y_width): (&[f32], &[f32], usize),
    what: &str,
) {
    let t = tokens.len();
    for (g, s) in targets.iter().zip(slots) {
        let w = s.out_features();
        let mut alone: Vec<f32> = (0..t)
            .flat_map(|r| y0[r * y_width + g.column()..][..w].to_vec())
            .collect();
        let toks: Vec<Option<SlotIdx>> = tokens
            .iter()
            .map(|s_| s_.filter(|i| s.slots()[i.index()].is_some()))
            .collect();
        lora::bgmv(x, &toks, s, &mut alone).unwrap();
        for r in 0..t {
            assert_eq!(
                &got[r * y_width + g.column()..][..w],
                &alone[r * w..(r + 1) * w],
                "{what} row {r} column {}",
                g.column()
            );
        }
    }
}

#[test]
fn fused_group_matches_each_projection_alone_and_the_reference() {
    let mut rng = TestRng::new(47);
    let n_in = 45;
    // q, k, v-like widths, one adapter missing from k (adapts q and v only).
    let widths = [75usize, 13, 13];
    let ranks = [
        [Some(4), None, Some(16), Some(9)],
        [Some(4), None, None, Some(9)],
        [Some(4), None, Some(16), Some(9)],
    ];
    let y_width = widths.iter().sum::<usize>() + 3; // a few columns no target writes
    let tables = group_slots(&mut rng, n_in, &widths, &ranks);
    for (da, db, layout) in [
        (LoraDType::F32, LoraDType::F32, BLayout::OutRank),
        (LoraDType::BF16, LoraDType::BF16, BLayout::OutRank),
        (LoraDType::F32, LoraDType::F16, BLayout::OutRank),
        (LoraDType::F16, LoraDType::F16, BLayout::RankOut),
        (LoraDType::F32, LoraDType::F32, BLayout::RankOut),
        (LoraDType::I8, LoraDType::I8, BLayout::RankOut),
        (LoraDType::F16, LoraDType::F16, BLayout::RankOutBlocks),
        (LoraDType::F32, LoraDType::F32, BLayout::RankOutBlocks),
        (LoraDType::I8, LoraDType::I8, BLayout::RankOutBlocks),
    ] {
        let stored: Vec<_> = tables.iter().map(|t| store_as(t, da, db, layout)).collect();
        let views: Vec<_> = stored.iter().map(|s| stored_views(s)).collect();
        let (slots, targets) = group_targets(&views, n_in, &widths);
        for &t in &[1usize, 6, 19] {
            let x = rng.vec(t * n_in);
            let y0 = rng.vec(t * y_width);
            // Slot 1 is empty everywhere: tokens only name 0, 2 and 3.
            let tokens: Vec<Option<SlotIdx>> = (0..t)
                .map(|_| [None, Some(0u16), Some(2), Some(3)][rng.below(4)].map(SlotIdx))
                .collect();
            let mut got = y0.clone();
            lora::apply_fused(&x, &tokens, &targets, &mut got, y_width).unwrap();
            let mut want = y0.clone();
            reference::apply_fused(&x, &tokens, &targets, &mut want, y_width).unwrap();
            let what = format!("A {da} B {db} {layout:?} T {t}");
            assert_close(
                &got,
                &want,
                1e-4,
                1e-4,
                &format!("fused vs reference, {what}"),
            );
            assert_fused_equals_each_projection_alone(
                (&x, &tokens),
                (&targets, &slots),
                (&y0, &got, y_width),
                &what,
            );
            for r in 0..t {
                let tail = r * y_width + y_width - 3..(r + 1) * y_width;
                assert_eq!(&got[tail.clone()], &y0[tail], "unwritten columns");
            }
        }
    }
}

#[test]
fn a_token_gets_the_same_bits_in_any_batch() {
    let mut rng = TestRng::new(53);
    let (n_in, n_out) = (96, 72);
    let table = make_slots(&mut rng, n_in, n_out, &[Some(16), Some(5), Some(16)]);
    let stored = store(&table, LoraDType::BF16, LoraDType::BF16);
    let v = stored_views(&stored);
    let slots = LoraSlots::new(n_in, n_out, &v).unwrap();
    // 21 tokens: slot 0's tokens are scattered, so they share tasks of up to 8.
    let tokens: Vec<Option<SlotIdx>> = (0..21)
        .map(|i| [Some(0u16), Some(1), None, Some(0), Some(2)][i % 5].map(SlotIdx))
        .collect();
    let x = rng.vec(tokens.len() * n_in);
    let mut batch = vec![0f32; tokens.len() * n_out];
    lora::apply(&x, &tokens, &slots, &mut batch).unwrap();
    for (t, s) in tokens.iter().enumerate() {
        let mut alone = vec![0f32; n_out];
        lora::apply(&x[t * n_in..(t + 1) * n_in], &[*s], &slots, &mut alone).unwrap();
        assert_eq!(&batch[t * n_out..(t + 1) * n_out], &alone[..], "token {t}");
    }
}

#[test]
fn fused_rejects_bad_groups_with_typed_errors() {
    let (a, b) = (vec![0.5f32; 2 * 4], vec![0.5f32; 3 * 2]);
    let (a5, b1) = (vec![0.5f32; 2 * 5], vec![0.5f32; 2]);
    let t3 = [Some(LoraSlot::new(&a, &b, 2, 1.0))];
    let t_in5 = [Some(LoraSlot::new(&a5, &b1, 2, 1.0))];
    let s3 = LoraSlots::new(4, 3, &t3).unwrap();
    let s_in5 = LoraSlots::new(5, 1, &t_in5).unwrap();
    let x = [1f32; 8];
    let tokens = [Some(SlotIdx(0)), None];
    let mut y = [0f32; 2 * 4];
    let shape_err = |r: batos_kernels::Result<()>, what: &str| match r {
        Err(KernelError::InvalidShape { what: w, .. }) => assert_eq!(w, what),
        other => panic!("expected InvalidShape {what}, got {other:?}"),
    };
    // No targets; targets reading different inputs; columns past the row.
    shape_err(lora::apply_fused(&x, &tokens, &[], &mut y, 4), "targets");
    let mixed = [LoraTarget::new(s3, 0), LoraTarget::new(s_in5, 3)];
    shape_err(lora::apply_fused(&x, &tokens, &mixed, &mut y, 4), "targets");
    let past = [LoraTarget::new(s3, 2)];
    shape_err(lora::apply_fused(&x, &tokens, &past, &mut y, 4), "targets");
    shape_err(
        reference::apply_fused(&x, &tokens, &past, &mut y, 4),
        "targets",
    );
    // A slot outside the table; zero-width rows; y of the wrong length.
    let ok = [LoraTarget::new(s3, 1)];
    shape_err(
        lora::apply_fused(&x, &[Some(SlotIdx(1)), None], &ok, &mut y, 4),
        "slot",
    );
    shape_err(lora::apply_fused(&x, &tokens, &ok, &mut y, 0), "y_width");
    assert!(matches!(
        lora::apply_fused(&x, &tokens, &ok, &mut y[..7], 4),
        Err(KernelError::LengthMismatch { what: "y", .. })
    ));
    // The valid call writes columns 1..4 of row 0 only.
    lora::apply_fused(&x, &tokens, &ok, &mut y, 4).unwrap();
    assert_eq!(y, [0.0, 2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0]);
}

#[test]
fn int8_slots_need_rank_rows_of_scales_and_a_transposed_b() {
    let (q, sc2, sc3) = (vec![1i8; 2 * 4], vec![0.5f32; 2], vec![0.5f32; 3]);
    let b = vec![0.25f32; 2 * 3];
    let i8m = |scales| LoraMatrix::I8 { q: &q, scales };
    let slot = |a, b_layout| {
        [Some(
            LoraSlot::from_matrices(a, LoraMatrix::F32(&b), 2, 1.0).with_b_layout(b_layout),
        )]
    };
    // Three scales for two rank rows.
    let t = slot(i8m(&sc3), BLayout::OutRank);
    assert!(matches!(
        LoraSlots::new(4, 3, &t),
        Err(KernelError::InvalidShape { what: "A", .. })
    ));
    // An int8 B in the PEFT layout (its rows would be outputs, not ranks).
    let bq = vec![1i8; 2 * 3];
    let t = [Some(LoraSlot::from_matrices(
        i8m(&sc2),
        LoraMatrix::I8 {
            q: &bq,
            scales: &sc2,
        },
        2,
        1.0,
    ))];
    assert!(matches!(
        LoraSlots::new(4, 3, &t),
        Err(KernelError::InvalidShape { what: "B", .. })
    ));
    // Values are not checked here (the audit rejects non-finite adapters): a NaN row
    // scale passes the shape checks.
    let nan = [f32::NAN, 1.0];
    let t = slot(i8m(&nan), BLayout::OutRank);
    assert!(LoraSlots::new(4, 3, &t).is_ok());
    // A valid one dequantises as q · scale.
    let t = slot(i8m(&sc2), BLayout::OutRank);
    let slots = LoraSlots::new(4, 3, &t).unwrap();
    assert_eq!(slots.slots()[0].unwrap().a().get(5), Some(0.5));
}

/// The row-major f32 views the device paths upload read every layout back element for
/// element.
#[test]
fn rank_major_f32_views_match_the_element_reads_in_every_layout() {
    let mut rng = TestRng::new(53);
    let (n_in, n_out) = (77, 130);
    let table = make_slots(&mut rng, n_in, n_out, &[Some(4), Some(16)]);
    for layout in [
        BLayout::OutRank,
        BLayout::RankOut,
        BLayout::RankOutBlocks,
        BLayout::RankQuadBlocks,
    ] {
        for dtype in DTYPES {
            if dtype == LoraDType::I8 && layout == BLayout::OutRank {
                continue;
            }
            let stored = store_as(&table, dtype, dtype, layout);
            for s in stored_views(&stored).into_iter().flatten() {
                let r = s.rank();
                let a: Vec<f32> = (0..r * n_in)
                    .map(|i| s.a_at(i / n_in, i % n_in).unwrap())
                    .collect();
                let bt: Vec<f32> = (0..r * n_out)
                    .map(|i| s.b_at(i % n_out, i / n_out).unwrap())
                    .collect();
                assert_eq!(&s.a_rows_f32()[..], &a[..], "A {dtype} {layout:?}");
                assert_eq!(&s.bt_rows_f32()[..], &bt[..], "Bt {dtype} {layout:?}");
                let (mut wa, mut wb) = (vec![f32::NAN; a.len()], vec![f32::NAN; bt.len()]);
                s.write_a_rows_f32(&mut wa);
                s.write_bt_rows_f32(&mut wb);
                assert_eq!(wa, a, "A into {dtype} {layout:?}");
                assert_eq!(wb, bt, "Bt into {dtype} {layout:?}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------
// The integer-dot path of int8 slots (B in BLayout::RankQuadBlocks).

/// int8 `A` (panels) and `B` (quads) of `table`, as the hot tier stores them where the
/// CPU has VNNI.
fn int8_dot_slots(table: &[Option<Owned>]) -> Vec<Option<Stored>> {
    store_as(table, LoraDType::I8, LoraDType::I8, BLayout::RankQuadBlocks)
}

/// What rounding the inputs to int8 can move the update by, per output of one token:
/// the input `x` per group of 32 (each element by at most half a step, `max|x_g|/254`)
/// through `|A|` and `|B|`, and the intermediate `h` per token (`max|h|/254` each)
/// through `|B|`; `A` and `B` are the int8 slot's own (widened) values.
fn int8_dot_bound(s: &LoraSlot<'_>, x: &[f32], n_out: usize) -> Vec<f64> {
    let (r, n_in) = (s.rank(), x.len());
    let step_x: Vec<f64> = x
        .chunks(32)
        .flat_map(|g| {
            let m = g.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 254.0;
            std::iter::repeat_n(m, g.len())
        })
        .collect();
    let mut dh = vec![0f64; r];
    let mut h = vec![0f64; r];
    for j in 0..r {
        for i in 0..n_in {
            let a = s.a_at(j, i).unwrap() as f64;
            h[j] += a * x[i] as f64;
            dh[j] += a.abs() * step_x[i];
        }
        h[j] *= s.scale() as f64;
        dh[j] *= s.scale() as f64;
    }
    // h is quantised after the scale (and the int8 row scales) are folded in; its
    // step covers the x error too.
    let hmax = h.iter().zip(&dh).fold(0f64, |m, (v, d)| m.max(v.abs() + d));
    (0..n_out)
        .map(|o| {
            (0..r)
                .map(|j| (s.b_at(o, j).unwrap() as f64).abs() * (dh[j] + hmax / 254.0))
                .sum()
        })
        .collect()
}

#[test]
fn int8_dot_slots_stay_within_the_stated_input_rounding_bound() {
    let mut rng = TestRng::new(61);
    if !int8_dot_available() {
        eprintln!("int8 dot path: no AVX-512 VNNI here; the float path runs these slots");
    }
    // Whole panels (ranks 8, 16) and a rank whose shrink stays on the float path
    // (12: not whole panels); inputs of whole 8-steps with a partial last group (40)
    // and not (45, float shrink); outputs with 64-blocks, 8-blocks and tails.
    for &(n_in, n_out) in &[(576, 192), (40, 203), (45, 77), (1536, 576)] {
        let table = make_slots(&mut rng, n_in, n_out, &[Some(16), None, Some(8), Some(12)]);
        let stored = int8_dot_slots(&table);
        let v = stored_views(&stored);
        let slots = LoraSlots::new(n_in, n_out, &v).unwrap();
        for &t in &[1usize, 9] {
            let x = rng.vec(t * n_in);
            let tokens = random_tokens(&mut rng, t, &table);
            let mut want = vec![0f32; t * n_out];
            reference::bgmv(&x, &tokens, &slots, &mut want).unwrap();
            let mut got = vec![0f32; t * n_out];
            lora::bgmv(&x, &tokens, &slots, &mut got).unwrap();
            for (i, s) in tokens.iter().enumerate() {
                let Some(s) = s else {
                    assert!(got[i * n_out..(i + 1) * n_out].iter().all(|&v| v == 0.0));
                    continue;
                };
                let slot = slots.get("test", *s).unwrap();
                let bound = int8_dot_bound(&slot, &x[i * n_in..(i + 1) * n_in], n_out);
                for o in 0..n_out {
                    let (g, w) = (got[i * n_out + o] as f64, want[i * n_out + o] as f64);
                    // f32 accumulation on top of the rounding bound.
                    let tol = 1.01 * bound[o] + 1e-5 * (1.0 + w.abs());
                    assert!(
                        (g - w).abs() <= tol,
                        "in {n_in} out {n_out} token {i} output {o}: got {g}, want {w}, \
                         bound {tol}"
                    );
                }
            }
        }
    }
}

/// The integer-dot path's arithmetic, emulated in f32 in the kernels' order, for
/// inputs that int8 represents exactly (integers with a ±127 in every 32 inputs, so
/// each group's scale is 1 and the shrink's sums are exact integers): the kernel must
/// give these bits.
fn int8_dot_emulated(s: &LoraSlot<'_>, x: &[f32], y: &mut [f32]) {
    let (r, n_in, n_out) = (s.rank(), x.len(), y.len());
    let (LoraMatrix::I8 { q: aq, scales: sa }, LoraMatrix::I8 { q: bq, scales: sb }) =
        (s.a(), s.b())
    else {
        panic!("int8 slots expected");
    };
    let a_code = |j: usize, i: usize| i64::from(aq[lora::a_offset(s.a_layout(), r, n_in, j, i)]);
    let b_code = |o: usize, j: usize| i64::from(bq[lora::b_offset(s.b_layout(), r, n_out, o, j)]);
    // h: exact integer sums, then the fold (scale · A row scale · B row scale) in f32.
    let h: Vec<f32> = (0..r)
        .map(|j| {
            let sum: i64 = (0..n_in).map(|i| a_code(j, i) * x[i] as i64).sum();
            let f = s.scale() * sa[j] * sb[j];
            sum as f32 * f
        })
        .collect();
    // h to int8 per token, as the int4 base's activations are quantised.
    let amax = h.iter().fold(0f32, |m, v| m.max(v.abs()));
    let (inv, d) = if amax == 0.0 {
        (0.0, 0.0)
    } else {
        (127.0 / amax, amax / 127.0)
    };
    let hq: Vec<i64> = h
        .iter()
        .map(|&v| (v * inv).round_ties_even().clamp(-127.0, 127.0) as i64)
        .collect();
    for (o, yv) in y.iter_mut().enumerate() {
        let sum: i64 = (0..r).map(|j| hq[j] * b_code(o, j)).sum();
        *yv += sum as f32 * d;
    }
}

#[test]
fn int8_dot_path_gives_the_exact_integer_result_on_inputs_int8_represents() {
    if !int8_dot_available() {
        eprintln!("SKIPPED: no AVX-512 VNNI here; int8 slots run the float path");
        return;
    }
    let mut rng = TestRng::new(71);
    for &(n_in, n_out) in &[(576, 192), (40, 203), (1536, 576), (64, 9)] {
        let table = make_slots(&mut rng, n_in, n_out, &[Some(16), Some(8), None, Some(32)]);
        let stored = int8_dot_slots(&table);
        let v = stored_views(&stored);
        let slots = LoraSlots::new(n_in, n_out, &v).unwrap();
        let t = 11;
        let x: Vec<f32> = (0..t * n_in)
            .map(|i| {
                if i % n_in % 32 == 0 {
                    if rng.below(2) == 0 {
                        127.0
                    } else {
                        -127.0
                    }
                } else {
                    (rng.below(255) as i32 - 127) as f32
                }
            })
            .collect();
        let tokens = random_tokens(&mut rng, t, &table);
        let y0 = rng.vec(t * n_out);
        let mut got = y0.clone();
        lora::bgmv(&x, &tokens, &slots, &mut got).unwrap();
        for (i, s) in tokens.iter().enumerate() {
            let mut want = y0[i * n_out..(i + 1) * n_out].to_vec();
            if let Some(s) = s {
                let slot = slots.get("test", *s).unwrap();
                int8_dot_emulated(&slot, &x[i * n_in..(i + 1) * n_in], &mut want);
            }
            assert_eq!(
                &got[i * n_out..(i + 1) * n_out],
                &want[..],
                "in {n_in} out {n_out} token {i} slot {s:?}"
            );
        }
    }
}

#[test]
fn int8_dot_fused_group_equals_each_projection_alone_and_each_token_alone() {
    let mut rng = TestRng::new(67);
    let n_in = 576;
    let widths = [576usize, 192, 192];
    let ranks = [
        [Some(16), None, Some(8)],
        [Some(16), None, None],
        [Some(16), None, Some(8)],
    ];
    let y_width = widths.iter().sum::<usize>();
    let tables = group_slots(&mut rng, n_in, &widths, &ranks);
    let stored: Vec<_> = tables.iter().map(|t| int8_dot_slots(t)).collect();
    let views: Vec<_> = stored.iter().map(|s| stored_views(s)).collect();
    let (slots, targets) = group_targets(&views, n_in, &widths);
    // 19 tokens: slot 0's share tasks of up to 8.
    let tokens: Vec<Option<SlotIdx>> = (0..19)
        .map(|i| [Some(0u16), None, Some(2), Some(0)][i % 4].map(SlotIdx))
        .collect();
    let t = tokens.len();
    let x = rng.vec(t * n_in);
    let y0 = rng.vec(t * y_width);
    let mut got = y0.clone();
    lora::apply_fused(&x, &tokens, &targets, &mut got, y_width).unwrap();
    assert_fused_equals_each_projection_alone(
        (&x, &tokens),
        (&targets, &slots),
        (&y0, &got, y_width),
        "int8 dot",
    );
    for (r, s) in tokens.iter().enumerate() {
        let mut one = y0[r * y_width..(r + 1) * y_width].to_vec();
        lora::apply_fused(
            &x[r * n_in..(r + 1) * n_in],
            &[*s],
            &targets,
            &mut one,
            y_width,
        )
        .unwrap();
        assert_eq!(&got[r * y_width..(r + 1) * y_width], &one[..], "token {r}");
    }
}

#[test]
fn quad_layout_needs_a_rank_divisible_by_four() {
    let (a, b) = (vec![0.5f32; 3 * 8], vec![0.25f32; 5 * 3]);
    let table = [Some(
        LoraSlot::new(&a, &b, 3, 1.0).with_b_layout(BLayout::RankQuadBlocks),
    )];
    let err = LoraSlots::new(8, 5, &table).unwrap_err();
    assert!(
        matches!(err, KernelError::InvalidShape { what: "B", .. }),
        "{err}"
    );
}

#[test]
fn int8_dot_decode_tasks_interleaved_give_each_token_its_own_bits() {
    if !int8_dot_available() {
        eprintln!("SKIPPED: no AVX-512 VNNI here; int8 slots run the float path");
        return;
    }
    let mut rng = TestRng::new(79);
    let n_in = 576;
    // Whole 64-blocks (576, 192) and a width with an 8-block and a scalar tail (203).
    let widths = [576usize, 192, 203];
    // Runs of one rank (interleaved up to four at a time), rank changes (8, 32) that
    // end a run, and a slot that skips the second target (a run across it must end).
    let q = [16, 16, 16, 16, 16, 8, 8, 16, 32, 16, 16, 16].map(Some);
    let mut k = q;
    k[9] = None;
    let ranks = [q, k, q];
    let y_width = widths.iter().sum::<usize>();
    let tables = group_slots(&mut rng, n_in, &widths, &ranks);
    let stored: Vec<_> = tables.iter().map(|t| int8_dot_slots(t)).collect();
    let views: Vec<_> = stored.iter().map(|s| stored_views(s)).collect();
    let (slots, targets) = group_targets(&views, n_in, &widths);
    // One token per slot in a shuffled order, tokens without an adapter between them,
    // and slot 3 twice (a two-token task among the one-token ones).
    let mut tokens: Vec<Option<SlotIdx>> = (0..12u16).map(|s| Some(SlotIdx(s))).collect();
    tokens.extend([None, None, Some(SlotIdx(3))]);
    for i in (1..tokens.len()).rev() {
        tokens.swap(i, rng.below(i + 1));
    }
    let t = tokens.len();
    // Random inputs: the batch equals each token alone (a task of its own), bit for bit.
    let x = rng.vec(t * n_in);
    let y0 = rng.vec(t * y_width);
    let mut got = y0.clone();
    lora::apply_fused(&x, &tokens, &targets, &mut got, y_width).unwrap();
    for (r, s) in tokens.iter().enumerate() {
        let mut one = y0[r * y_width..(r + 1) * y_width].to_vec();
        let x1 = &x[r * n_in..(r + 1) * n_in];
        lora::apply_fused(x1, &[*s], &targets, &mut one, y_width).unwrap();
        assert_eq!(
            &got[r * y_width..(r + 1) * y_width],
            &one[..],
            "token {r} slot {s:?}"
        );
    }
    // Inputs int8 represents: every target's columns are the exact integer result.
    let xi: Vec<f32> = (0..t * n_in)
        .map(|i| match (i % n_in % 32, rng.below(2)) {
            (0, 0) => 127.0,
            (0, _) => -127.0,
            _ => (rng.below(255) as i32 - 127) as f32,
        })
        .collect();
    let mut got = y0.clone();
    lora::apply_fused(&xi, &tokens, &targets, &mut got, y_width).unwrap();
    for (r, s) in tokens.iter().enumerate() {
        let row = r * y_width;
        for (g, tab) in targets.iter().zip(&slots) {
            let w = tab.out_features();
            let mut want = y0[row + g.column()..][..w].to_vec();
            if let Some(slot) = s.and_then(|s| tab.slots()[s.index()]) {
                int8_dot_emulated(&slot, &xi[r * n_in..(r + 1) * n_in], &mut want);
            }
            assert_eq!(
                &got[row + g.column()..][..w],
                &want[..],
                "token {r} slot {s:?} column {}",
                g.column()
            );
        }
    }
}

/// A random `[rows, cols]` int4 layer in the integer-dot layout, groups of `group`.
fn int4_layer(rng: &mut TestRng, rows: usize, cols: usize, group: usize) -> Int4DotWeight {
    let codes: Vec<u8> = (0..rows * cols).map(|_| rng.below(16) as u8).collect();
    let zeros: Vec<u8> = (0..rows * cols / group)
        .map(|_| rng.below(16) as u8)
        .collect();
    let scales: Vec<f16> = (0..rows * cols / group)
        .map(|_| f16::from_f32(0.01 + 0.02 * rng.uniform().abs()))
        .collect();
    Int4DotWeight::from_rows(Int4Rows {
        rows,
        cols,
        group_size: group,
        codes: &codes,
        zeros: &zeros,
        scales: &scales,
        offsets: None,
    })
    .unwrap()
}

#[test]
fn int4_base_then_lora_gives_the_bits_of_the_two_calls() {
    let mut rng = TestRng::new(83);
    let n_in = 576;
    let widths = [576usize, 192, 203];
    let y_width = widths.iter().sum::<usize>();
    let q = [16, 16, 8, 16, 16, 16, 32, 16].map(Some);
    let mut k = q;
    k[4] = None;
    let ranks = [q, k, q];
    let tables = group_slots(&mut rng, n_in, &widths, &ranks);
    // Groups of 32 share the base's int8 inputs with the int8 shrink; groups of 64 do not.
    for group in [32usize, 64] {
        let w = int4_layer(&mut rng, y_width, n_in, group);
        for (da, db, layout) in [
            (LoraDType::I8, LoraDType::I8, BLayout::RankQuadBlocks),
            (LoraDType::F16, LoraDType::F16, BLayout::RankOutBlocks),
        ] {
            let stored: Vec<_> = tables.iter().map(|t| store_as(t, da, db, layout)).collect();
            let views: Vec<_> = stored.iter().map(|s| stored_views(s)).collect();
            let (_slots, targets) = group_targets(&views, n_in, &widths);
            // Decode over distinct adapters (one-token tasks), one token, a mixed batch.
            let decode: Vec<Option<SlotIdx>> = [5u16, 99, 0, 7, 1, 3, 99, 2, 6, 4]
                .map(|s| (s < 8).then_some(SlotIdx(s)))
                .to_vec();
            let mixed = random_tokens(&mut rng, 19, &tables[0]);
            for tokens in [decode, vec![Some(SlotIdx(2))], mixed] {
                let t = tokens.len();
                let x = rng.vec(t * n_in);
                let mut want = vec![0f32; t * y_width];
                int4_dot::matmul(&x, &w, &mut want).unwrap();
                lora::apply_fused(&x, &tokens, &targets, &mut want, y_width).unwrap();
                // The base overwrites y: start from garbage.
                let mut got = rng.vec(t * y_width);
                lora::matmul_int4_then_lora(&x, &w, &tokens, &targets, &mut got, y_width).unwrap();
                assert_eq!(got, want, "group {group}, A {da} B {db}, {t} tokens");
            }
        }
    }
}

#[test]
fn int4_base_then_lora_checks_before_writing() {
    let mut rng = TestRng::new(89);
    let (n_in, n_out) = (64, 24);
    let table = make_slots(&mut rng, n_in, n_out, &[Some(8)]);
    let v = views(&table);
    let slots = LoraSlots::new(n_in, n_out, &v).unwrap();
    let targets = [LoraTarget::new(slots, 0)];
    let x = rng.vec(2 * n_in);
    let tokens = [Some(SlotIdx(0)), None];
    // A base with other outputs than the fused row, or other inputs than the slots.
    for (rows, cols) in [(n_out + 8, n_in), (n_out, 2 * n_in)] {
        let w = int4_layer(&mut rng, rows, cols, 32);
        let y0 = rng.vec(2 * n_out);
        let mut y = y0.clone();
        let err =
            lora::matmul_int4_then_lora(&x, &w, &tokens, &targets, &mut y, n_out).unwrap_err();
        assert!(matches!(err, KernelError::LengthMismatch { .. }), "{err}");
        assert_eq!(y, y0, "y written before the error");
    }
    // A token naming a slot past the table.
    let w = int4_layer(&mut rng, n_out, n_in, 32);
    let y0 = rng.vec(2 * n_out);
    let mut y = y0.clone();
    let bad = [Some(SlotIdx(3)), None];
    assert!(lora::matmul_int4_then_lora(&x, &w, &bad, &targets, &mut y, n_out).is_err());
    assert_eq!(y, y0);
}
