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

/// Every thread backend: a row's output must not depend on which one ran it.
const THREAD_BACKENDS: [ThreadBackend; 3] = [
    ThreadBackend::SpinPool,
    ThreadBackend::Rayon,
    ThreadBackend::Serial,
];

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
    for backend in THREAD_BACKENDS {
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
    for backend in THREAD_BACKENDS {
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

// ---- Integer-dot kernels (int8 activations, `cpu::int4_dot`) ----
//
// - repacking AutoAWQ weights keeps every `W[n, k]` (with and without Q4_1 offsets);
// - every `DotPath` this CPU has gives the same bits as the scalar reference, for the
//   activations and the outputs, under every thread backend, on odd shapes (K not a
//   multiple of 32, groups of 1..13 inputs, N not a multiple of 8, T 1..37);
// - against the exact f64 product with the unquantised activations, the error is
//   within what int8 rounding allows: `Σ_g (d_g/2)·Σ_{k∈g}|W[n,k]|` (each input moves by
//   at most half a step `d_g`) plus `1e-5 ·` the magnitudes the float part sums;
// - a token's output row is bit-identical alone and in any batch, at any position.

use batos_kernels::cpu::int4_dot::{self, DotPath, Int4DotWeight, Int4Rows, Int8Activations};

/// Row-major random int4 parameters, with offsets when `offsets`.
struct DotCase {
    n: usize,
    k: usize,
    g: usize,
    codes: Vec<u8>,
    zeros: Vec<u8>,
    scales: Vec<f16>,
    offsets: Option<Vec<f16>>,
}

impl DotCase {
    fn random(rng: &mut TestRng, n: usize, k: usize, g: usize, offsets: bool) -> DotCase {
        let groups = k / g;
        DotCase {
            n,
            k,
            g,
            codes: (0..n * k).map(|_| rng.below(16) as u8).collect(),
            zeros: (0..n * groups).map(|_| rng.below(16) as u8).collect(),
            scales: (0..n * groups)
                .map(|_| f16::from_f32(0.01 + 0.1 * rng.uniform().abs()))
                .collect(),
            offsets: offsets.then(|| {
                (0..n * groups)
                    .map(|_| f16::from_f32(0.2 * rng.uniform()))
                    .collect()
            }),
        }
    }

    fn weight(&self) -> Int4DotWeight {
        Int4DotWeight::from_rows(Int4Rows {
            rows: self.n,
            cols: self.k,
            group_size: self.g,
            codes: &self.codes,
            zeros: &self.zeros,
            scales: &self.scales,
            offsets: self.offsets.as_deref(),
        })
        .unwrap()
    }

    fn w(&self, n: usize, k: usize) -> f64 {
        let pi = n * (self.k / self.g) + k / self.g;
        let d = f64::from(self.codes[n * self.k + k]) - f64::from(self.zeros[pi]);
        let w = d * f64::from(self.scales[pi].to_f32());
        w + self
            .offsets
            .as_ref()
            .map_or(0.0, |o| f64::from(o[pi].to_f32()))
    }
}

fn available_paths() -> Vec<DotPath> {
    DotPath::ALL
        .into_iter()
        .filter(|p| p.is_available())
        .collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn dot_repack_keeps_every_weight() {
    let mut rng = TestRng::new(41);
    for (k, n, g) in [(64, 16, 32), (21, 8, 7), (96, 24, 96), (5, 8, 1)] {
        let case = Case::random(&mut rng, k, n, g);
        let data = case.data();
        let offsets: Vec<f16> = (0..case.layout.scales_len())
            .map(|_| f16::from_f32(0.3 * rng.uniform()))
            .collect();
        let plain = Int4DotWeight::from_int4(&data, None).unwrap();
        let with = Int4DotWeight::from_int4(&data, Some(&offsets)).unwrap();
        assert!(!plain.has_offsets() && with.has_offsets());
        for nn in 0..n {
            let mut row = vec![0f32; k];
            plain.dequantize_row(nn, &mut row);
            for kk in 0..k {
                assert_eq!(plain.code(nn, kk), case.codes[nn * k + kk]);
                assert_eq!(
                    row[kk].to_bits(),
                    data.get(nn, kk).to_bits(),
                    "n={nn} k={kk}"
                );
                let o = offsets[(kk / g) * n + nn].to_f32();
                assert_eq!(with.get(nn, kk), data.get(nn, kk) + o);
            }
        }
        // The repacked layer takes the bytes of the AutoAWQ tensors (plus the offsets).
        assert_eq!(
            plain.size_in_bytes(),
            n * k.div_ceil(g) * (g.next_multiple_of(8) / 2 + 2) + n.div_ceil(8) * (k / g) * 4
        );
    }
}

/// Shapes for the path and accuracy tests: `(n, k, g)`.
fn dot_shapes() -> Vec<(usize, usize, usize)> {
    let mut s = vec![
        (8, 32, 32),
        (56, 64, 32),
        (13, 60, 12),
        (61, 128, 64),
        (1, 7, 7),
        (40, 576, 32),
    ];
    for g in 1..=13 {
        s.push((8 + 3 * g, g * (1 + g % 3), g));
    }
    s
}

#[test]
fn dot_paths_agree_bit_for_bit_on_odd_shapes() {
    let mut rng = TestRng::new(42);
    let paths = available_paths();
    for (si, (n, k, g)) in dot_shapes().into_iter().enumerate() {
        let case = DotCase::random(&mut rng, n, k, g, si % 2 == 1);
        let w = case.weight();
        for t in [1, 2, 3, 4, 5, 9, 37] {
            let x = rng.vec(t * k);
            let mut want_acts = Int8Activations::new();
            want_acts.quantize_with(DotPath::Scalar, &x, k, g).unwrap();
            let mut want = vec![0f32; t * n];
            int4_dot::matmul_int8_with(DotPath::Scalar, &want_acts, &w, &mut want).unwrap();
            for &path in &paths {
                let mut acts = Int8Activations::new();
                acts.quantize_with(path, &x, k, g).unwrap();
                assert_eq!(
                    acts, want_acts,
                    "{path:?} n={n} k={k} g={g} t={t}: activations"
                );
                for backend in THREAD_BACKENDS {
                    cpu::set_thread_backend(backend);
                    let mut got = vec![f32::NAN; t * n];
                    int4_dot::matmul_int8_with(path, &acts, &w, &mut got).unwrap();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "{path:?} {backend:?} n={n} k={k} g={g} t={t}"
                    );
                }
                cpu::set_thread_backend(ThreadBackend::SpinPool);
            }
        }
    }
}

#[test]
fn dot_error_is_within_the_int8_rounding_bound() {
    let mut rng = TestRng::new(43);
    for (si, (n, k, g)) in dot_shapes().into_iter().enumerate() {
        let case = DotCase::random(&mut rng, n, k, g, si % 2 == 0);
        let w = case.weight();
        let t = 3;
        let x = rng.vec(t * k);
        let mut acts = Int8Activations::new();
        acts.quantize(&x, k, g).unwrap();
        let mut got = vec![0f32; t * n];
        int4_dot::matmul_int8(&acts, &w, &mut got).unwrap();
        for tt in 0..t {
            for nn in 0..n {
                let (mut exact, mut bound) = (0f64, 1e-6f64);
                for grp in 0..k / g {
                    let d = f64::from(acts.scale(tt, grp));
                    let (mut abs_w, mut mag) = (0f64, 0f64);
                    for (i, &q8) in acts.values(tt, grp).iter().enumerate() {
                        let kk = grp * g + i;
                        let wv = case.w(nn, kk);
                        exact += wv * f64::from(x[tt * k + kk]);
                        abs_w += wv.abs();
                        mag += (f64::from(case.codes[nn * k + kk]) + 16.0) * f64::from(q8).abs();
                    }
                    let s = f64::from(w.scale(nn, grp).to_f32());
                    let m = f64::from(w.group_min(nn, grp)).abs();
                    bound += d / 2.0 * abs_w + 1e-5 * d * (s + m) * mag;
                }
                let gv = f64::from(got[tt * n + nn]);
                assert!(
                    (gv - exact).abs() <= bound,
                    "n={n} k={k} g={g} token {tt} row {nn}: got {gv}, exact {exact}, bound {bound}"
                );
            }
        }
    }
}

#[test]
fn dot_token_row_does_not_depend_on_its_batch() {
    let mut rng = TestRng::new(44);
    for (n, k, g, offsets) in [(56, 64, 32, false), (61, 96, 32, true), (24, 39, 13, true)] {
        let case = DotCase::random(&mut rng, n, k, g, offsets);
        let w = case.weight();
        let t = 37;
        let x = rng.vec(t * k);
        let mut batch = vec![0f32; t * n];
        int4_dot::matmul(&x, &w, &mut batch).unwrap();
        for (start, len) in [(0, 1), (5, 1), (36, 1), (3, 2), (10, 4), (7, 9), (1, 36)] {
            let mut part = vec![0f32; len * n];
            int4_dot::matmul(&x[start * k..(start + len) * k], &w, &mut part).unwrap();
            assert_eq!(
                bits(&part),
                bits(&batch[start * n..(start + len) * n]),
                "n={n} k={k} g={g}: rows {start}..{} alone differ from the batch",
                start + len
            );
        }
    }
}

#[test]
fn dot_bad_shapes_are_typed_errors() {
    let mut rng = TestRng::new(45);
    let w = DotCase::random(&mut rng, 16, 64, 32, false).weight();
    let mut acts = Int8Activations::new();
    assert!(matches!(
        acts.quantize(&[0.0; 10], 64, 32),
        Err(KernelError::NotWholeRows { .. })
    ));
    assert!(matches!(
        acts.quantize(&[0.0; 60], 60, 32),
        Err(KernelError::InvalidShape { .. })
    ));
    acts.quantize(&[0.5; 128], 64, 32).unwrap();
    let mut out = vec![0f32; 31];
    assert!(matches!(
        int4_dot::matmul_int8(&acts, &w, &mut out),
        Err(KernelError::LengthMismatch { .. })
    ));
    acts.quantize(&[0.5; 128], 64, 16).unwrap();
    let mut out = vec![0f32; 32];
    assert!(matches!(
        int4_dot::matmul_int8(&acts, &w, &mut out),
        Err(KernelError::LengthMismatch { .. })
    ));
}
