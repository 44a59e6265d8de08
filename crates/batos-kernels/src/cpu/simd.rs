//! AVX2 + FMA + F16C kernels, selected at run time.
//!
//! Every `unsafe` of the CPU backend lives here: the intrinsics (which need the
//! features this module checks for before any call) and raw-pointer writes of disjoint
//! output tiles from several threads. Callers go through the safe wrappers at the
//! bottom, which require an [`Avx2`] token that only [`Avx2::detect`] can create.

#![allow(clippy::missing_safety_doc)]

use half::{bf16, f16};
use std::sync::OnceLock;

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Proof that this CPU has AVX2, FMA and F16C. Only [`Avx2::detect`] creates it, so
/// holding one makes calling the `target_feature` functions below sound.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2(Token);

/// Constructible only where the AVX2 code exists: elsewhere an empty enum, so every
/// `Avx2` method there is statically unreachable.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy, Debug)]
struct Token;
#[cfg(not(target_arch = "x86_64"))]
#[derive(Clone, Copy, Debug)]
enum Token {}

impl Avx2 {
    /// `Some` when the running CPU supports AVX2, FMA and F16C (checked once).
    pub(crate) fn detect() -> Option<Avx2> {
        static HAS: OnceLock<bool> = OnceLock::new();
        let has = *HAS.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                false
            }
        });
        #[cfg(target_arch = "x86_64")]
        {
            has.then_some(Avx2(Token))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = has;
            None
        }
    }
}

/// A `*mut f32` that may cross threads. Users guarantee that concurrent writers touch
/// disjoint elements and that the pointee outlives every use.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: the pointer is only dereferenced under the disjoint-write discipline
// documented on each use; the type itself carries no aliasing.
#[cfg(target_arch = "x86_64")]
unsafe impl Send for SendPtr {}
// SAFETY: as above.
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for SendPtr {}

#[cfg(target_arch = "x86_64")]
mod imp {
    use super::*;

    /// A weight element type that loads eight at a time as f32 lanes.
    pub(crate) trait Elem: Copy + Send + Sync + 'static {
        /// Loads `p[0..8]` widened to f32.
        ///
        /// # Safety
        /// `p..p+8` must be readable and the CPU must have AVX2/F16C.
        unsafe fn load8(p: *const Self) -> __m256;
        fn widen(self) -> f32;
    }

    impl Elem for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            // SAFETY: the caller guarantees 8 readable floats and AVX.
            unsafe { _mm256_loadu_ps(p) }
        }
        fn widen(self) -> f32 {
            self
        }
    }

    impl Elem for f16 {
        #[inline(always)]
        unsafe fn load8(p: *const f16) -> __m256 {
            // SAFETY: the caller guarantees 8 readable halves (16 bytes) and F16C.
            unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)) }
        }
        fn widen(self) -> f32 {
            self.to_f32()
        }
    }

    impl Elem for bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const bf16) -> __m256 {
            // SAFETY: the caller guarantees 16 readable bytes and AVX2. bf16 is the
            // high half of an f32, so widening is a zero-extend and a shift.
            unsafe {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
            }
        }
        fn widen(self) -> f32 {
            self.to_f32()
        }
    }

    /// Sum of the 8 lanes.
    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        // SAFETY: register-only AVX ops; the caller runs with AVX enabled.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_movehdup_ps(s));
            _mm_cvtss_f32(s)
        }
    }

    /// Lane sums of four vectors, as `[sum(a), sum(b), sum(c), sum(d)]`.
    #[inline(always)]
    unsafe fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        // SAFETY: register-only AVX ops.
        unsafe {
            let ab = _mm256_hadd_ps(a, b);
            let cd = _mm256_hadd_ps(c, d);
            let abcd = _mm256_hadd_ps(ab, cd);
            _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1))
        }
    }

    /// `out[i*ldo + j] = Σ_p x[i*ldx + p] · w[j*ldw + p]` for `i < MR`, `j < NR`
    /// (`NR ≤ 4`): a register-blocked tile of dot products, K in steps of 8.
    ///
    /// # Safety
    /// AVX2/FMA/F16C present; `x` has `MR` readable rows of `k`, `w` has `NR` readable
    /// rows of `k`, and `out` has `MR` writable rows of `NR` that no other thread
    /// touches during the call.
    #[inline(always)]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    unsafe fn tile<W: Elem, const MR: usize, const NR: usize>(
        x: *const f32,
        ldx: usize,
        w: *const W,
        ldw: usize,
        k: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        // SAFETY: all offsets stay inside the rows the caller vouched for; the
        // intrinsics need the features the caller vouched for.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NR]; MR];
            let kv = k & !7;
            let mut p = 0;
            while p < kv {
                let mut xs = [_mm256_setzero_ps(); MR];
                for (i, xv) in xs.iter_mut().enumerate() {
                    *xv = _mm256_loadu_ps(x.add(i * ldx + p));
                }
                for j in 0..NR {
                    let wv = W::load8(w.add(j * ldw + p));
                    for i in 0..MR {
                        acc[i][j] = _mm256_fmadd_ps(xs[i], wv, acc[i][j]);
                    }
                }
                p += 8;
            }
            for i in 0..MR {
                let z = _mm256_setzero_ps();
                let a = |j: usize| if j < NR { acc[i][j] } else { z };
                let mut sums = [0f32; 4];
                _mm_storeu_ps(sums.as_mut_ptr(), hsum4(a(0), a(1), a(2), a(3)));
                for (j, s) in sums.iter_mut().enumerate().take(NR) {
                    for q in kv..k {
                        *s += *x.add(i * ldx + q) * (*w.add(j * ldw + q)).widen();
                    }
                    *out.add(i * ldo + j) = *s;
                }
            }
        }
    }

    /// Tokens per cache block of the activation matrix (x rows reused across all the
    /// weight rows of a task while they stay in L2).
    const TB: usize = 96;

    /// Computes output columns `j0..j1` for all `t` tokens: `out[i, j] = x[i]·w[j]`.
    ///
    /// # Safety
    /// AVX2/FMA/F16C present; `x` is `[t, k]`; `w` is `[n, k]` with `j1 ≤ n`; `out`
    /// points to a `[t, n]` buffer whose columns `j0..j1` no other thread touches.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn matmul_cols<W: Elem>(
        x: &[f32],
        t: usize,
        k: usize,
        w: &[W],
        n: usize,
        j0: usize,
        j1: usize,
        out: SendPtr,
    ) {
        let xp = x.as_ptr();
        if t < 4 {
            // Decode-sized batches are bound by DRAM bandwidth: stream one weight row
            // at a time (strictly sequential reads; interleaving several rows measured
            // 2-3x slower from DRAM here) against all `t` tokens.
            for j in j0..j1 {
                let wr = w[j * k..(j + 1) * k].as_ptr();
                // SAFETY: forwarded from this function's contract.
                unsafe {
                    let o = out.0.add(j);
                    match t {
                        1 => row_dots::<W, 1>(xp, k, wr, o, n),
                        2 => row_dots::<W, 2>(xp, k, wr, o, n),
                        _ => row_dots::<W, 3>(xp, k, wr, o, n),
                    }
                }
            }
            return;
        }
        // Larger batches are compute-bound: widen (or copy) four weight rows at a time
        // into an L1-resident f32 panel, read sequentially, and run register-blocked
        // 3x4 tiles over a block of tokens.
        let mut scratch = vec![0.0f32; 4 * k];
        let mut tb0 = 0;
        while tb0 < t {
            let tb1 = (tb0 + TB).min(t);
            let mut j = j0;
            while j < j1 {
                let nr = (j1 - j).min(4);
                let wrows = &w[j * k..(j + nr) * k];
                // SAFETY: features as promised by this function's contract.
                unsafe { widen_row(wrows, &mut scratch[..nr * k]) };
                // SAFETY: forwarded from this function's contract; the scratch holds
                // `nr` rows of `k` floats.
                unsafe { row_group::<f32>(xp, k, scratch.as_ptr(), nr, tb0, tb1, out.0.add(j), n) };
                j += nr;
            }
            tb0 = tb1;
        }
    }

    /// `out[i*ldo] = x[i]·w` for the `MR` token rows of `x` and one weight row `w`,
    /// 16 elements per step in two accumulator chains per token.
    ///
    /// # Safety
    /// AVX2/FMA/F16C present; `x` has `MR` rows of `k`, `w` has `k` elements, `out`
    /// has `MR` writable elements at stride `ldo` no other thread touches.
    #[inline(always)]
    unsafe fn row_dots<W: Elem, const MR: usize>(
        x: *const f32,
        k: usize,
        w: *const W,
        out: *mut f32,
        ldo: usize,
    ) {
        // SAFETY: offsets stay inside the rows the caller vouched for.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; MR];
            let mut p = 0;
            while p + 16 <= k {
                let w0 = W::load8(w.add(p));
                let w1 = W::load8(w.add(p + 8));
                for (i, a) in acc.iter_mut().enumerate() {
                    let xi = x.add(i * k + p);
                    a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(xi), w0, a[0]);
                    a[1] = _mm256_fmadd_ps(_mm256_loadu_ps(xi.add(8)), w1, a[1]);
                }
                p += 16;
            }
            if p + 8 <= k {
                let w0 = W::load8(w.add(p));
                for (i, a) in acc.iter_mut().enumerate() {
                    a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(x.add(i * k + p)), w0, a[0]);
                }
                p += 8;
            }
            for (i, a) in acc.iter().enumerate() {
                let mut sum = hsum(_mm256_add_ps(a[0], a[1]));
                for q in p..k {
                    sum += *x.add(i * k + q) * (*w.add(q)).widen();
                }
                *out.add(i * ldo) = sum;
            }
        }
    }

    /// All tokens `tb0..tb1` against `nr ≤ 4` weight rows at `w`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn row_group<W: Elem>(
        x: *const f32,
        k: usize,
        w: *const W,
        nr: usize,
        tb0: usize,
        tb1: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        // SAFETY: forwarded; every tile reads rows inside `x`/`w` and writes rows
        // `tb0..tb1` of the caller's columns.
        unsafe {
            let mut i = tb0;
            while i < tb1 {
                // Four left: two 2-row tiles beat a 3-row tile plus a 1-row one.
                let mr = match tb1 - i {
                    4 => 2,
                    left => left.min(3),
                };
                let xi = x.add(i * k);
                let oi = out.add(i * ldo);
                match (mr, nr) {
                    (3, 4) => tile::<W, 3, 4>(xi, k, w, k, k, oi, ldo),
                    (2, 4) => tile::<W, 2, 4>(xi, k, w, k, k, oi, ldo),
                    (1, 4) => tile::<W, 1, 4>(xi, k, w, k, k, oi, ldo),
                    (3, 3) => tile::<W, 3, 3>(xi, k, w, k, k, oi, ldo),
                    (2, 3) => tile::<W, 2, 3>(xi, k, w, k, k, oi, ldo),
                    (1, 3) => tile::<W, 1, 3>(xi, k, w, k, k, oi, ldo),
                    (3, 2) => tile::<W, 3, 2>(xi, k, w, k, k, oi, ldo),
                    (2, 2) => tile::<W, 2, 2>(xi, k, w, k, k, oi, ldo),
                    (1, 2) => tile::<W, 1, 2>(xi, k, w, k, k, oi, ldo),
                    (3, _) => tile::<W, 3, 1>(xi, k, w, k, k, oi, ldo),
                    (2, _) => tile::<W, 2, 1>(xi, k, w, k, k, oi, ldo),
                    _ => tile::<W, 1, 1>(xi, k, w, k, k, oi, ldo),
                }
                i += mr;
            }
        }
    }

    /// `Σ a[i]·b[i]` with four independent accumulators.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        // SAFETY: every load is at an offset < n - 7 (or < n for the scalar tail).
        unsafe {
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut i = 0;
            while i + 32 <= n {
                for (u, acc_u) in acc.iter_mut().enumerate() {
                    let o = i + 8 * u;
                    *acc_u = _mm256_fmadd_ps(
                        _mm256_loadu_ps(pa.add(o)),
                        _mm256_loadu_ps(pb.add(o)),
                        *acc_u,
                    );
                }
                i += 32;
            }
            while i + 8 <= n {
                acc[0] = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i)),
                    _mm256_loadu_ps(pb.add(i)),
                    acc[0],
                );
                i += 8;
            }
            let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
            let mut sum = hsum(s);
            while i < n {
                sum += *pa.add(i) * *pb.add(i);
                i += 1;
            }
            sum
        }
    }

    /// `y[i] *= alpha`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn scale(alpha: f32, y: &mut [f32]) {
        let n = y.len();
        // SAFETY: offsets stay below n.
        unsafe {
            let py = y.as_mut_ptr();
            let a = _mm256_set1_ps(alpha);
            let mut i = 0;
            while i + 8 <= n {
                _mm256_storeu_ps(py.add(i), _mm256_mul_ps(a, _mm256_loadu_ps(py.add(i))));
                i += 8;
            }
            while i < n {
                *py.add(i) *= alpha;
                i += 1;
            }
        }
    }

    /// `e^x` per lane: range reduction by `ln 2` and a degree-6 polynomial (relative
    /// error below 2e-7 on the normal range); `0` below -87.3, saturating above 88.7.
    #[inline(always)]
    pub(crate) unsafe fn exp8(x: __m256) -> __m256 {
        // SAFETY: register-only AVX2/FMA ops.
        unsafe {
            let under = _mm256_cmp_ps(x, _mm256_set1_ps(-87.33), _CMP_LT_OQ);
            let x = _mm256_min_ps(
                _mm256_max_ps(x, _mm256_set1_ps(-87.33)),
                _mm256_set1_ps(88.72),
            );
            let n = _mm256_round_ps(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            // Cody-Waite: ln2 split in a high part exact in f32 and a correction.
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm256_set1_ps(1.987_569_1e-4);
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.666_666_5e-1));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
            let r2 = _mm256_mul_ps(r, r);
            p = _mm256_fmadd_ps(p, r2, _mm256_add_ps(r, _mm256_set1_ps(1.0)));
            // 2^n built in the exponent field; n ∈ [-126, 128] after the clamp, and
            // 2^128 overflows to +inf as exp would.
            let ni = _mm256_cvtps_epi32(n);
            let pow = _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_add_epi32(ni, _mm256_set1_epi32(127)),
                23,
            ));
            let res = _mm256_mul_ps(p, pow);
            _mm256_andnot_ps(under, res)
        }
    }

    /// `out = silu(gate) * up`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
        let n = out.len().min(gate.len()).min(up.len());
        // SAFETY: offsets stay below n.
        unsafe {
            let (pg, pu, po) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
            let one = _mm256_set1_ps(1.0);
            let mut i = 0;
            while i + 8 <= n {
                let g = _mm256_loadu_ps(pg.add(i));
                let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
                let s = _mm256_div_ps(g, _mm256_add_ps(one, e));
                _mm256_storeu_ps(po.add(i), _mm256_mul_ps(s, _mm256_loadu_ps(pu.add(i))));
                i += 8;
            }
            while i < n {
                *po.add(i) = super::super::reference::silu(*pg.add(i)) * *pu.add(i);
                i += 1;
            }
        }
    }

    /// RMSNorm of one row.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn rms_norm_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        let d = x.len().min(weight.len()).min(out.len());
        // SAFETY: offsets stay below d.
        unsafe {
            let ss = dot(&x[..d], &x[..d]);
            let inv = 1.0 / (ss / d as f32 + eps).sqrt();
            let (px, pw, po) = (x.as_ptr(), weight.as_ptr(), out.as_mut_ptr());
            let vi = _mm256_set1_ps(inv);
            let mut i = 0;
            while i + 8 <= d {
                let v = _mm256_mul_ps(_mm256_loadu_ps(px.add(i)), vi);
                _mm256_storeu_ps(po.add(i), _mm256_mul_ps(_mm256_loadu_ps(pw.add(i)), v));
                i += 8;
            }
            while i < d {
                *po.add(i) = *pw.add(i) * (*px.add(i) * inv);
                i += 1;
            }
        }
    }

    /// Softmax of one row in place; edge cases as the reference.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn softmax(x: &mut [f32]) {
        // SAFETY: same features.
        unsafe { softmax_scaled(x, 1.0) }
    }

    /// `softmax(beta · x)` in place, for `beta > 0`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn softmax_scaled(x: &mut [f32], beta: f32) {
        let n = x.len();
        // SAFETY: offsets stay below n.
        unsafe {
            let p = x.as_mut_ptr();
            let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i + 8 <= n {
                vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(i)));
                i += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
            let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for &v in &x[i..] {
                max = max.max(v);
            }
            if max == f32::NEG_INFINITY {
                x.iter_mut().for_each(|v| *v = 0.0);
                return;
            }
            let vm = _mm256_set1_ps(max);
            let vs = _mm256_set1_ps(beta);
            let mut vsum = _mm256_setzero_ps();
            i = 0;
            while i + 8 <= n {
                let e = exp8(_mm256_mul_ps(
                    _mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm),
                    vs,
                ));
                _mm256_storeu_ps(p.add(i), e);
                vsum = _mm256_add_ps(vsum, e);
                i += 8;
            }
            let mut sum = hsum(vsum);
            while i < n {
                let e = ((*p.add(i) - max) * beta).exp();
                *p.add(i) = e;
                sum += e;
                i += 1;
            }
            scale(1.0 / sum, x);
        }
    }

    /// Hints the cache lines of `len` floats at `p` into L1 (a hint: never faults).
    #[inline(always)]
    unsafe fn prefetch_row(p: *const f32, len: usize) {
        let mut o = 0;
        while o < len {
            // SAFETY: prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(o) as *const i8) };
            o += 16;
        }
    }

    /// `Σ exp(x[i] - max)` for the row's maximum `max` (returned too); `-inf` entries
    /// contribute 0. Returns `(max, sum)`.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn max_and_sum_exp(x: &[f32]) -> (f32, f32) {
        let n = x.len();
        // SAFETY: offsets stay below n.
        unsafe {
            let p = x.as_ptr();
            let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i + 8 <= n {
                vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(i)));
                i += 8;
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
            let mut max = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for &v in &x[i..] {
                max = max.max(v);
            }
            if max == f32::NEG_INFINITY {
                return (max, 0.0);
            }
            let vm = _mm256_set1_ps(max);
            let mut acc = [_mm256_setzero_ps(); 2];
            i = 0;
            while i + 16 <= n {
                acc[0] = _mm256_add_ps(acc[0], exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), vm)));
                acc[1] = _mm256_add_ps(
                    acc[1],
                    exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i + 8)), vm)),
                );
                i += 16;
            }
            let mut sum = hsum(_mm256_add_ps(acc[0], acc[1]));
            for &v in &x[i..] {
                sum += (v - max).exp();
            }
            (max, sum)
        }
    }

    /// Attention of the `g` query heads of one KV head for one query row:
    /// `out[h] = softmax(scale · q[h]·K) · V` over the positions whose K/V rows start
    /// at `offsets` in `k` / `v`. `scores` is scratch.
    ///
    /// Heads go three at a time, so each K or V row loaded serves up to three heads:
    /// scores in 3x4 (heads x positions) register tiles, the weighted V sum in 3x32.
    ///
    /// # Safety
    /// AVX2/FMA present. `q` and `out` hold `g * hd` floats; every `offsets[p] + hd`
    /// is within both `k` and `v` (checked by the caller's validation).
    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn attend(
        q: &[f32],
        g: usize,
        hd: usize,
        k: &[f32],
        v: &[f32],
        offsets: &[usize],
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        let ctx = offsets.len();
        scores.clear();
        scores.resize(g * ctx, 0.0);
        // SAFETY: q/out are g*hd long; k/v rows are hd long at each offset (contract);
        // score indices are < g*ctx.
        unsafe {
            let (kp, vp, qp) = (k.as_ptr(), v.as_ptr(), q.as_ptr());
            let sp = scores.as_mut_ptr();
            let mut h0 = 0;
            while h0 < g {
                let hc = (g - h0).min(3);
                let qh = qp.add(h0 * hd);
                let mut p = 0;
                while p < ctx {
                    // Four positions share a tile when their rows are evenly spaced
                    // (same cache block); otherwise one at a time.
                    let four = p + 4 <= ctx && {
                        let o = &offsets[p..p + 4];
                        o[1] > o[0] && o[2] > o[1] && o[3] > o[2] && {
                            let st = o[1] - o[0];
                            o[2] - o[1] == st && o[3] - o[2] == st
                        }
                    };
                    if p + 12 <= ctx && h0 == 0 {
                        // Paged rows are scattered: fetch a few positions ahead.
                        for &o in &offsets[p + 8..p + 12] {
                            prefetch_row(kp.add(o), hd);
                        }
                    }
                    let kr = kp.add(offsets[p]);
                    let o = sp.add(h0 * ctx + p);
                    if four {
                        let ldw = offsets[p + 1] - offsets[p];
                        match hc {
                            3 => tile::<f32, 3, 4>(qh, hd, kr, ldw, hd, o, ctx),
                            2 => tile::<f32, 2, 4>(qh, hd, kr, ldw, hd, o, ctx),
                            _ => tile::<f32, 1, 4>(qh, hd, kr, ldw, hd, o, ctx),
                        }
                        p += 4;
                    } else {
                        match hc {
                            3 => tile::<f32, 3, 1>(qh, hd, kr, 0, hd, o, ctx),
                            2 => tile::<f32, 2, 1>(qh, hd, kr, 0, hd, o, ctx),
                            _ => tile::<f32, 1, 1>(qh, hd, kr, 0, hd, o, ctx),
                        }
                        p += 1;
                    }
                }
                h0 += hc;
            }
            for h in 0..g {
                softmax_scaled(&mut scores[h * ctx..(h + 1) * ctx], scale);
            }
            let sp = scores.as_ptr();
            let op = out.as_mut_ptr();
            let mut h0 = 0;
            while h0 < g {
                let hc = (g - h0).min(3);
                let mut d0 = 0;
                while d0 < hd {
                    let w = sp.add(h0 * ctx);
                    let o = op.add(h0 * hd + d0);
                    let (vr, left) = (vp.add(d0), hd - d0);
                    d0 += match (hc, left) {
                        (3, 32..) => weighted_sum::<3, 4>(w, ctx, vr, offsets, o, hd),
                        (2, 32..) => weighted_sum::<2, 4>(w, ctx, vr, offsets, o, hd),
                        (_, 32..) => weighted_sum::<1, 4>(w, ctx, vr, offsets, o, hd),
                        (3, 8..) => weighted_sum::<3, 1>(w, ctx, vr, offsets, o, hd),
                        (2, 8..) => weighted_sum::<2, 1>(w, ctx, vr, offsets, o, hd),
                        (_, 8..) => weighted_sum::<1, 1>(w, ctx, vr, offsets, o, hd),
                        _ => weighted_sum_scalar(hc, w, ctx, vr, offsets, o, hd, left),
                    };
                }
                h0 += hc;
            }
        }
    }

    /// `o[h*ld + 8j + l] = Σ_p w[h*ctx + p] · v[offsets[p] + 8j + l]` for `h < HC`,
    /// `j < DV`, `l < 8`; returns the `8·DV` dims done.
    #[inline(always)]
    unsafe fn weighted_sum<const HC: usize, const DV: usize>(
        w: *const f32,
        ctx: usize,
        v: *const f32,
        offsets: &[usize],
        o: *mut f32,
        ld: usize,
    ) -> usize {
        // SAFETY: the caller (attend) guarantees HC score rows of ctx, V rows with 8·DV
        // dims left at every offset, and HC output rows of that many dims.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); DV]; HC];
            for (p, &off) in offsets.iter().enumerate() {
                if let Some(&ahead) = offsets.get(p + 8) {
                    prefetch_row(v.add(ahead), 8 * DV);
                }
                let vr = v.add(off);
                let mut vv = [_mm256_setzero_ps(); DV];
                for (j, x) in vv.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(vr.add(8 * j));
                }
                for (h, a) in acc.iter_mut().enumerate() {
                    let wv = _mm256_set1_ps(*w.add(h * ctx + p));
                    for (x, y) in a.iter_mut().zip(&vv) {
                        *x = _mm256_fmadd_ps(wv, *y, *x);
                    }
                }
            }
            for (h, a) in acc.iter().enumerate() {
                for (j, x) in a.iter().enumerate() {
                    _mm256_storeu_ps(o.add(h * ld + 8 * j), *x);
                }
            }
            8 * DV
        }
    }

    /// Scalar tail of [`weighted_sum`] for the last `left < 8` dims.
    #[allow(clippy::too_many_arguments)]
    unsafe fn weighted_sum_scalar(
        hc: usize,
        w: *const f32,
        ctx: usize,
        v: *const f32,
        offsets: &[usize],
        o: *mut f32,
        ld: usize,
        left: usize,
    ) -> usize {
        // SAFETY: as for `weighted_sum`, with `left` dims.
        unsafe {
            for h in 0..hc {
                for d in 0..left {
                    let mut a = 0f32;
                    for (p, &off) in offsets.iter().enumerate() {
                        a += *w.add(h * ctx + p) * *v.add(off + d);
                    }
                    *o.add(h * ld + d) = a;
                }
            }
            left
        }
    }

    /// Widens a row of weights to f32 (embedding gather).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn widen_row<W: Elem>(src: &[W], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        // SAFETY: offsets stay below n.
        unsafe {
            let mut i = 0;
            while i + 8 <= n {
                _mm256_storeu_ps(dst.as_mut_ptr().add(i), W::load8(src.as_ptr().add(i)));
                i += 8;
            }
            while i < n {
                dst[i] = src[i].widen();
                i += 1;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use imp::Elem;

/// Safe entry points: each takes the [`Avx2`] token as proof of CPU support.
#[cfg(target_arch = "x86_64")]
impl Avx2 {
    /// Output columns `j0..j1` of `out [t, n] = x [t, k] · w [n, k]ᵀ`.
    ///
    /// # Safety
    /// `out` must point to a live `[t, n]` f32 buffer whose columns `j0..j1` no
    /// other thread reads or writes during the call. Shapes must satisfy
    /// `x.len() == t*k`, `w.len() == n*k`, `j0 ≤ j1 ≤ n`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn matmul_cols<W: Elem>(
        self,
        x: &[f32],
        t: usize,
        k: usize,
        w: &[W],
        n: usize,
        cols: std::ops::Range<usize>,
        out: SendPtr,
    ) {
        debug_assert!(x.len() == t * k && w.len() == n * k && cols.end <= n);
        // SAFETY: the token proves the features; the rest is this fn's contract.
        unsafe { imp::matmul_cols(x, t, k, w, n, cols.start, cols.end, out) }
    }

    /// `out [t, n] = x [t, k] · w [n, k]ᵀ`, parallel over disjoint column ranges of
    /// `out` (each thread streams its own weight rows). Shapes are checked by the
    /// caller; a mismatch here panics rather than reading out of bounds.
    pub(crate) fn matmul<W: Elem>(self, x: &[f32], k: usize, w: &[W], n: usize, out: &mut [f32]) {
        assert!(k > 0 && x.len().is_multiple_of(k) && w.len() == n * k);
        let t = x.len() / k;
        assert!(out.len() == t * n);
        if t == 0 || n == 0 {
            return;
        }
        let threads = super::par::num_threads();
        let flops = t * n * k;
        // Small products are not worth waking threads for.
        // Waking a thread costs ~10 µs here; below ~128K multiply-adds (a 192x576
        // matvec) one thread finishes sooner.
        let tasks = if flops < 1 << 17 || threads == 1 {
            1
        } else if t < 8 {
            // Memory-bound: contiguous runs of weight rows, a few per thread so a
            // descheduled thread holds up only a small share.
            threads * 4
        } else {
            // Compute-bound: finer tasks balance cores shared with other work.
            (threads * 4).min(n.div_ceil(16))
        };
        let per = n.div_ceil(tasks).next_multiple_of(4);
        let tasks = n.div_ceil(per);
        let ptr = SendPtr(out.as_mut_ptr());
        super::par::for_each(tasks, &|task| {
            let cols = task * per..((task + 1) * per).min(n);
            // SAFETY: `out` is a live `[t, n]` buffer borrowed mutably for this whole
            // call, and the tasks' column ranges are disjoint.
            unsafe { self.matmul_cols(x, t, k, w, n, cols, ptr) }
        });
    }

    pub(crate) fn silu_mul(self, gate: &[f32], up: &[f32], out: &mut [f32]) {
        // SAFETY: as above.
        unsafe { imp::silu_mul(gate, up, out) }
    }

    pub(crate) fn rms_norm_row(self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
        // SAFETY: as above.
        unsafe { imp::rms_norm_row(x, weight, eps, out) }
    }

    pub(crate) fn softmax_scaled(self, x: &mut [f32], beta: f32) {
        // SAFETY: as above.
        unsafe { imp::softmax_scaled(x, beta) }
    }

    pub(crate) fn max_and_sum_exp(self, x: &[f32]) -> (f32, f32) {
        // SAFETY: as above.
        unsafe { imp::max_and_sum_exp(x) }
    }

    pub(crate) fn softmax(self, x: &mut [f32]) {
        // SAFETY: as above.
        unsafe { imp::softmax(x) }
    }

    /// See [`imp::attend`]; panics (instead of reading out of bounds) if an offset
    /// row does not fit in `k`/`v` or `q`/`out` are not `g * hd` long.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attend(
        self,
        q: &[f32],
        g: usize,
        hd: usize,
        k: &[f32],
        v: &[f32],
        offsets: &[usize],
        scale: f32,
        scores: &mut Vec<f32>,
        out: &mut [f32],
    ) {
        assert!(q.len() == g * hd && out.len() == g * hd);
        let lim = k.len().min(v.len());
        assert!(offsets.iter().all(|&o| o + hd <= lim));
        // SAFETY: the token proves the features; the asserts are the contract.
        unsafe { imp::attend(q, g, hd, k, v, offsets, scale, scores, out) }
    }

    pub(crate) fn widen_row<W: Elem>(self, src: &[W], dst: &mut [f32]) {
        // SAFETY: as above (F16C included in the token).
        unsafe { imp::widen_row(src, dst) }
    }
}

/// Other architectures: no SIMD path; the token cannot exist, so these are never called.
#[cfg(not(target_arch = "x86_64"))]
mod fallback {
    use super::Avx2;

    pub(crate) trait Elem: Copy + Send + Sync + 'static {}
    impl Elem for f32 {}
    impl Elem for half::f16 {}
    impl Elem for half::bf16 {}

    #[allow(clippy::too_many_arguments)]
    impl Avx2 {
        pub(crate) fn matmul<W: Elem>(self, _: &[f32], _: usize, _: &[W], _: usize, _: &mut [f32]) {
            match self.0 {}
        }
        pub(crate) fn silu_mul(self, _: &[f32], _: &[f32], _: &mut [f32]) {
            match self.0 {}
        }
        pub(crate) fn rms_norm_row(self, _: &[f32], _: &[f32], _: f32, _: &mut [f32]) {
            match self.0 {}
        }
        pub(crate) fn softmax(self, _: &mut [f32]) {
            match self.0 {}
        }
        pub(crate) fn softmax_scaled(self, _: &mut [f32], _: f32) {
            match self.0 {}
        }
        pub(crate) fn max_and_sum_exp(self, _: &[f32]) -> (f32, f32) {
            match self.0 {}
        }
        pub(crate) fn attend(
            self,
            _: &[f32],
            _: usize,
            _: usize,
            _: &[f32],
            _: &[f32],
            _: &[usize],
            _: f32,
            _: &mut Vec<f32>,
            _: &mut [f32],
        ) {
            match self.0 {}
        }
        pub(crate) fn widen_row<W: Elem>(self, _: &[W], _: &mut [f32]) {
            match self.0 {}
        }
    }
}
#[cfg(not(target_arch = "x86_64"))]
pub(crate) use fallback::Elem;
