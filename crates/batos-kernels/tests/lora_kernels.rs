//! The batched LoRA kernels: the scalar reference against a dense
//! `x · (W + scale·B·A)ᵀ`, the fast path (AVX2 where present) against the reference on
//! odd shapes and mixed ranks, BGMV against SGMV, and argument rejection.

mod common;

use batos_kernels::cpu::lora::{self, reference, LoraSegment, LoraSlot, LoraSlots};
use batos_kernels::cpu::reference as base;
use batos_kernels::{KernelError, WeightView};
use batos_types::SlotIdx;
use common::{assert_close, TestRng};

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
