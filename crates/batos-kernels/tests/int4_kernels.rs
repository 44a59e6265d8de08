//! int4 (AutoAWQ GEMM layout) kernels against the scalar reference.
//!
//! - packing: `Int4Data::get` agrees with codes packed by hand in AutoAWQ's nibble order;
//! - `cpu::matmul` on int4 weights against `reference::matmul` (which dequantises each
//!   row and accumulates in f64) on odd shapes, every thread backend, both the decode
//!   path (T < 4) and the panel prefill path: `|got − want| ≤ 1e-5 · Σₖ|xₖ|·(qₖ+zₖ)·sₖ`
//!   per element. The kernels sum `s·Σx·q − (z·s)·Σx` per group rather than
//!   `Σx·(q−z)·s`, so their rounding error scales with the magnitudes of both terms,
//!   not of their difference: hence `q + z`, where a dense kernel's bound has `|q − z|`;
//! - batch invariance: a token's output row is bit-identical whatever other tokens
//!   share the call (decode vs prefill path, any tiling);
//! - bad shapes and lengths are typed errors.

mod common;

use batos_kernels::cpu::int4::{pack_word, unpack_word, AWQ_PACK_ORDER};
use batos_kernels::cpu::{self, reference as r, ThreadBackend};
use batos_kernels::{Int4Data, Int4Layout, KernelError, WeightView};
use common::TestRng;
use half::f16;

/// Owned int4 test weights with their codes kept for checking.
struct Case {
    layout: Int4Layout,
    codes: Vec<u8>, // [N, K]
    zeros: Vec<u8>, // [N, K/G]
    qweight: Vec<u32>,
    qzeros: Vec<u32>,
    scales: Vec<f16>,
}

impl Case {
    fn random(rng: &mut TestRng, k: usize, n: usize, g: usize) -> Case {
        let layout = Int4Layout::new(k, n, g).unwrap();
        let groups = k / g;
        let codes: Vec<u8> = (0..n * k).map(|_| rng.below(16) as u8).collect();
        let zeros: Vec<u8> = (0..n * groups).map(|_| rng.below(16) as u8).collect();
        let scales: Vec<f16> = (0..groups * n)
            .map(|_| f16::from_f32(0.01 + 0.1 * rng.uniform().abs()))
            .collect();
        let wpr = n / 8;
        let mut qweight = vec![0u32; k * wpr];
        for kk in 0..k {
            for j in 0..wpr {
                let mut c = [0u8; 8];
                for (l, v) in c.iter_mut().enumerate() {
                    *v = codes[(8 * j + l) * k + kk];
                }
                qweight[kk * wpr + j] = pack_word(c);
            }
        }
        let mut qzeros = vec![0u32; groups * wpr];
        for gg in 0..groups {
            for j in 0..wpr {
                let mut c = [0u8; 8];
                for (l, v) in c.iter_mut().enumerate() {
                    *v = zeros[(8 * j + l) * groups + gg];
                }
                qzeros[gg * wpr + j] = pack_word(c);
            }
        }
        Case {
            layout,
            codes,
            zeros,
            qweight,
            qzeros,
            scales,
        }
    }

    fn data(&self) -> Int4Data<'_> {
        Int4Data::new(self.layout, &self.qweight, &self.qzeros, &self.scales).unwrap()
    }

    fn view(&self) -> WeightView<'_> {
        WeightView::int4(self.data())
    }
}

#[test]
fn words_unpack_to_their_codes() {
    let mut rng = TestRng::new(1);
    for _ in 0..200 {
        let mut c = [0u8; 8];
        c.iter_mut().for_each(|v| *v = rng.below(16) as u8);
        assert_eq!(unpack_word(pack_word(c)), c);
    }
    // AutoAWQ stores column AWQ_PACK_ORDER[p] in nibble p.
    let w = pack_word([1, 2, 3, 4, 5, 6, 7, 8]);
    let nibbles: Vec<u32> = (0..8).map(|p| (w >> (4 * p)) & 0xF).collect();
    let want: Vec<u32> = AWQ_PACK_ORDER.iter().map(|&c| c as u32 + 1).collect();
    assert_eq!(nibbles, want);
}

#[test]
fn dequantisation_is_q_minus_z_times_s() {
    let mut rng = TestRng::new(2);
    let case = Case::random(&mut rng, 24, 16, 8);
    let d = case.data();
    let (k, g, groups) = (24, 8, 3);
    for n in 0..16 {
        let mut row = vec![0f32; k];
        d.dequantize_row(n, &mut row);
        for (kk, &got) in row.iter().enumerate() {
            let q = case.codes[n * k + kk] as i32;
            let z = case.zeros[n * groups + kk / g] as i32;
            let s = case.scales[(kk / g) * 16 + n].to_f32();
            let want = (q - z) as f32 * s;
            assert_eq!(d.get(n, kk), want);
            assert_eq!(got, want);
            assert_eq!(case.view().get(n, kk), Some(want));
        }
    }
}

fn check_matmul(rng: &mut TestRng, t: usize, k: usize, n: usize, g: usize) {
    let case = Case::random(rng, k, n, g);
    let view = case.view();
    let x = rng.vec(t * k);
    let mut want = vec![0f32; t * n];
    r::matmul(&x, &view, &mut want).unwrap();
    // Σₖ|xₖ|·(qₖ + zₖ)·sₖ: the size of the two per-group terms the kernels subtract.
    let d = case.data();
    let mut mag = vec![0f32; t * n];
    for i in 0..t {
        for j in 0..n {
            mag[i * n + j] = (0..k)
                .map(|kk| {
                    let qz = f32::from(d.code(j, kk)) + f32::from(d.zero(j, kk));
                    x[i * k + kk].abs() * qz * d.scale(j, kk).to_f32()
                })
                .sum();
        }
    }
    for backend in [
        ThreadBackend::SpinPool,
        ThreadBackend::Rayon,
        ThreadBackend::Serial,
    ] {
        cpu::set_thread_backend(backend);
        let mut got = vec![f32::NAN; t * n];
        cpu::matmul(&x, &view, &mut got).unwrap();
        for (idx, ((&gv, &wv), &m)) in got.iter().zip(&want).zip(&mag).enumerate() {
            let tol = 1e-5 * m + 1e-7;
            assert!(
                (gv - wv).abs() <= tol,
                "t={t} k={k} n={n} g={g} {backend:?}: element {idx}: got {gv}, want {wv} (tol {tol})"
            );
        }
    }
    cpu::set_thread_backend(ThreadBackend::SpinPool);
}

#[test]
fn matmul_matches_reference_on_odd_shapes() {
    let mut rng = TestRng::new(3);
    // (K, N, G): K not a multiple of 8, groups of 1, one group, the model's 64.
    // N: one word, under one 8-word decode block (56), one block (64), blocks plus a
    // remainder (72, 136), a 16-column prefill sub-panel plus one word (24, 40).
    let shapes = [
        (7, 8, 7),
        (7, 8, 1),
        (9, 24, 3),
        (21, 64, 7),
        (63, 40, 21),
        (64, 8, 64),
        (65, 16, 13),
        (39, 120, 13),
        (192, 56, 64),
        (96, 200, 32),
        (576, 72, 64),
        (130, 136, 65),
    ];
    for &(k, n, g) in &shapes {
        for t in [1, 2, 3, 4, 5, 7, 13, 20] {
            check_matmul(&mut rng, t, k, n, g);
        }
    }
    for t in 1..=37 {
        check_matmul(&mut rng, t, 91, 56, 7);
    }
    // One larger product so several threads share the work.
    check_matmul(&mut rng, 37, 576, 1536, 64);
    check_matmul(&mut rng, 2, 1536, 576, 64);
}

/// Every sub-batch of `x` (`[37, K]`) gives bit-identical rows to the whole batch,
/// under every thread backend (decode path for T < 4, prefill panels above).
fn check_batch_invariance(rng: &mut TestRng, k: usize, n: usize, g: usize) {
    let case = Case::random(rng, k, n, g);
    let view = case.view();
    let total = 37;
    let x = rng.vec(total * k);
    let mut full = vec![0f32; total * n];
    cpu::matmul(&x, &view, &mut full).unwrap();
    for backend in [
        ThreadBackend::SpinPool,
        ThreadBackend::Rayon,
        ThreadBackend::Serial,
    ] {
        cpu::set_thread_backend(backend);
        for t in [1, 2, 3, 4, 5, 6, 7, 11, 16, 36] {
            for start in [0, 5.min(total - t), total - t] {
                let mut part = vec![0f32; t * n];
                cpu::matmul(&x[start * k..(start + t) * k], &view, &mut part).unwrap();
                let same = part
                    .iter()
                    .zip(&full[start * n..(start + t) * n])
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(
                    same,
                    "k={k} n={n} g={g} {backend:?}: rows {start}..{} alone differ from \
                     the batch of {total}",
                    start + t
                );
            }
        }
    }
    cpu::set_thread_backend(ThreadBackend::SpinPool);
}

#[test]
fn a_token_row_does_not_depend_on_its_batch() {
    let mut rng = TestRng::new(4);
    // The model's group sizes, and odd ones with partial decode blocks.
    check_batch_invariance(&mut rng, 576, 192, 64);
    check_batch_invariance(&mut rng, 576, 960, 32);
    check_batch_invariance(&mut rng, 65, 56, 13);
    check_batch_invariance(&mut rng, 21, 136, 1);
}

#[test]
fn bad_shapes_are_typed_errors() {
    assert!(matches!(
        Int4Layout::new(64, 20, 64),
        Err(KernelError::InvalidShape { .. })
    ));
    assert!(matches!(
        Int4Layout::new(100, 16, 64),
        Err(KernelError::InvalidShape { .. })
    ));
    assert!(matches!(
        Int4Layout::new(64, 16, 0),
        Err(KernelError::InvalidShape { .. })
    ));
    let layout = Int4Layout::new(64, 16, 32).unwrap();
    let (qw, qz, s) = (vec![0u32; 128], vec![0u32; 4], vec![f16::ONE; 32]);
    assert!(Int4Data::new(layout, &qw, &qz, &s).is_ok());
    assert!(matches!(
        Int4Data::new(layout, &qw[..127], &qz, &s),
        Err(KernelError::LengthMismatch {
            what: "qweight",
            expected: 128,
            got: 127,
            ..
        })
    ));
    assert!(Int4Data::new(layout, &qw, &qz[..3], &s).is_err());
    assert!(Int4Data::new(layout, &qw, &qz, &s[..31]).is_err());
    let view = WeightView::int4(Int4Data::new(layout, &qw, &qz, &s).unwrap());
    let x = vec![0f32; 63];
    let mut out = vec![0f32; 16];
    assert!(matches!(
        cpu::matmul(&x, &view, &mut out),
        Err(KernelError::NotWholeRows { .. })
    ));
    let x = vec![0f32; 64];
    let mut out = vec![0f32; 15];
    assert!(cpu::matmul(&x, &view, &mut out).is_err());
    assert!(view.row_range(0, 8).is_none());
    assert!(view.row_range(0, 16).is_some());
}
