//! int4 weights in AutoAWQ's "GEMM" layout, and the CPU kernels that multiply by them
//! with dequantisation on the fly.
//!
//! Layout (AutoAWQ `WQLinear_GEMM`, so checkpoints move both ways without repacking):
//! for a linear layer with `in_features` K, `out_features` N and `group_size` G,
//! - `qweight`: u32 `[K, N/8]`; word `(k, j)` holds the 4-bit codes of columns
//!   `8j..8j+8` of input row `k`, column `8j + AWQ_PACK_ORDER[p]` in nibble `p`
//!   (bits `4p..4p+4`);
//! - `qzeros`: u32 `[K/G, N/8]`, zero points packed the same way;
//! - `scales`: f16 `[K/G, N]`.
//!
//! Weight `W[n, k] = (q[k, n] − z[k/G, n]) · s[k/G, n]`, computed exactly as
//! `((q − z) as f32) * s` by every implementation, so the AVX2 kernels see the same
//! weights as the scalar reference.
//!
//! Shape constraints (checked by [`Int4Layout::new`], typed errors otherwise): `K ≥ 1`,
//! `N` a positive multiple of 8 (one packed word holds eight output columns), `G ≥ 1`
//! dividing `K`. `K` need not be a multiple of 8.

use half::f16;

use super::simd::{Avx2, SendPtr};
use crate::error::{KernelError, Result};

/// AutoAWQ's nibble order: nibble `p` of a packed word holds column `AWQ_PACK_ORDER[p]`
/// of its group of eight.
pub const AWQ_PACK_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// The inverse of [`AWQ_PACK_ORDER`]: column `c` lives in nibble `NIBBLE_OF_COLUMN[c]`.
pub const NIBBLE_OF_COLUMN: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// Packs eight 4-bit codes (column order, each `< 16`; higher bits are dropped) into
/// one word in AutoAWQ's nibble order.
///
/// ```
/// use batos_kernels::cpu::int4::{pack_word, unpack_word};
/// let codes = [0, 1, 2, 3, 4, 5, 6, 7];
/// assert_eq!(pack_word(codes), 0x7531_6420);
/// assert_eq!(unpack_word(pack_word(codes)), codes);
/// ```
pub fn pack_word(codes: [u8; 8]) -> u32 {
    AWQ_PACK_ORDER.iter().enumerate().fold(0u32, |w, (p, &c)| {
        w | (u32::from(codes[c] & 0xF) << (4 * p))
    })
}

/// The eight 4-bit codes of a packed word, in column order.
pub fn unpack_word(word: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    for (c, o) in out.iter_mut().enumerate() {
        *o = ((word >> (4 * NIBBLE_OF_COLUMN[c])) & 0xF) as u8;
    }
    out
}

/// Validated dimensions of an int4 linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Int4Layout {
    in_features: usize,
    out_features: usize,
    group_size: usize,
}

impl Int4Layout {
    /// Checks the constraints in the [module docs](self).
    pub fn new(in_features: usize, out_features: usize, group_size: usize) -> Result<Self> {
        let bad = |reason: String| {
            Err(KernelError::InvalidShape {
                op: "Int4Layout::new",
                what: "int4 layout",
                reason,
            })
        };
        if in_features == 0 || out_features == 0 || group_size == 0 {
            return bad(format!(
                "in_features {in_features}, out_features {out_features} and group_size \
                 {group_size} must all be positive"
            ));
        }
        if out_features % 8 != 0 {
            return bad(format!(
                "out_features {out_features} is not a multiple of 8 (eight columns per packed word)"
            ));
        }
        if in_features % group_size != 0 {
            return bad(format!(
                "in_features {in_features} is not a multiple of group_size {group_size}"
            ));
        }
        if in_features.checked_mul(out_features).is_none() {
            return bad(format!("{in_features} x {out_features} overflows usize"));
        }
        Ok(Int4Layout {
            in_features,
            out_features,
            group_size,
        })
    }

    /// Input features K (rows of `qweight`).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output features N.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input rows sharing one scale and zero point.
    pub fn group_size(&self) -> usize {
        self.group_size
    }

    /// Number of groups along K.
    pub fn groups(&self) -> usize {
        self.in_features / self.group_size
    }

    /// Packed words per row (`N/8`).
    pub fn words_per_row(&self) -> usize {
        self.out_features / 8
    }

    /// Length of `qweight` (`K · N/8`).
    pub fn qweight_len(&self) -> usize {
        self.in_features * self.words_per_row()
    }

    /// Length of `qzeros` (`K/G · N/8`).
    pub fn qzeros_len(&self) -> usize {
        self.groups() * self.words_per_row()
    }

    /// Length of `scales` (`K/G · N`).
    pub fn scales_len(&self) -> usize {
        self.groups() * self.out_features
    }

    /// Bytes of `qweight`, `qzeros` and `scales` together.
    pub fn size_in_bytes(&self) -> usize {
        (self.qweight_len() + self.qzeros_len()) * 4 + self.scales_len() * 2
    }
}

/// Borrowed int4 weights of one linear layer, lengths checked against the layout.
#[derive(Clone, Copy, Debug)]
pub struct Int4Data<'a> {
    qweight: &'a [u32],
    qzeros: &'a [u32],
    scales: &'a [f16],
    layout: Int4Layout,
}

impl<'a> Int4Data<'a> {
    /// Wraps the three tensors; each must have the length `layout` implies.
    pub fn new(
        layout: Int4Layout,
        qweight: &'a [u32],
        qzeros: &'a [u32],
        scales: &'a [f16],
    ) -> Result<Self> {
        let op = "Int4Data::new";
        super::check::len_eq(op, "qweight", qweight.len(), layout.qweight_len())?;
        super::check::len_eq(op, "qzeros", qzeros.len(), layout.qzeros_len())?;
        super::check::len_eq(op, "scales", scales.len(), layout.scales_len())?;
        Ok(Int4Data {
            qweight,
            qzeros,
            scales,
            layout,
        })
    }

    /// The dimensions.
    pub fn layout(&self) -> Int4Layout {
        self.layout
    }

    /// Packed codes, `[K, N/8]`.
    pub fn qweight(&self) -> &'a [u32] {
        self.qweight
    }

    /// Packed zero points, `[K/G, N/8]`.
    pub fn qzeros(&self) -> &'a [u32] {
        self.qzeros
    }

    /// Scales, `[K/G, N]`.
    pub fn scales(&self) -> &'a [f16] {
        self.scales
    }

    /// The 4-bit code of weight `W[n, k]` (`n < N`, `k < K`, unchecked beyond slicing).
    pub fn code(&self, n: usize, k: usize) -> u8 {
        let wpr = self.layout.words_per_row();
        unpack_word(self.qweight[k * wpr + n / 8])[n % 8]
    }

    /// The zero point of `W[n, k]`.
    pub fn zero(&self, n: usize, k: usize) -> u8 {
        let wpr = self.layout.words_per_row();
        let g = k / self.layout.group_size;
        unpack_word(self.qzeros[g * wpr + n / 8])[n % 8]
    }

    /// The scale of `W[n, k]`.
    pub fn scale(&self, n: usize, k: usize) -> f16 {
        let g = k / self.layout.group_size;
        self.scales[g * self.layout.out_features + n]
    }

    /// `W[n, k]` as f32: `((q − z) as f32) · s`.
    pub fn get(&self, n: usize, k: usize) -> f32 {
        let d = i32::from(self.code(n, k)) - i32::from(self.zero(n, k));
        d as f32 * self.scale(n, k).to_f32()
    }

    /// Row `n` of `W` (all K inputs of output `n`) dequantised into `out`
    /// (`out.len() == K`).
    pub fn dequantize_row(&self, n: usize, out: &mut [f32]) {
        let (k, g) = (self.layout.in_features, self.layout.group_size);
        let wpr = self.layout.words_per_row();
        let (j, c) = (n / 8, n % 8);
        let shift = 4 * NIBBLE_OF_COLUMN[c];
        for (grp, chunk) in out[..k].chunks_mut(g).enumerate() {
            let z = ((self.qzeros[grp * wpr + j] >> shift) & 0xF) as i32;
            let s = self.scales[grp * self.layout.out_features + n].to_f32();
            for (r, o) in chunk.iter_mut().enumerate() {
                let q = ((self.qweight[(grp * g + r) * wpr + j] >> shift) & 0xF) as i32;
                *o = (q - z) as f32 * s;
            }
        }
    }
}

/// Tokens at which the int4 matmul switches from fused dequantisation (decode) to a
/// dequantised panel reused by all tokens (prefill).
const PANEL_MIN_TOKENS: usize = 4;

/// `out[T, N] = x[T, K] · Wᵀ` for int4 `W` on AVX2 (shapes checked by the caller),
/// parallel over disjoint ranges of packed output words.
///
/// Every output element is one f32 FMA chain over `k = 0..K` in order, whichever path
/// and thread computes it, so a token's result does not depend on the batch around it.
pub(crate) fn matmul_avx2(avx: Avx2, x: &[f32], w: &Int4Data<'_>, out: &mut [f32]) {
    let (k, n) = (w.layout.in_features, w.layout.out_features);
    let t = x.len() / k;
    if t == 0 {
        return;
    }
    let words = w.layout.words_per_row();
    let threads = super::par::num_threads();
    let tasks = if t * n * k < 1 << 16 || threads == 1 {
        1
    } else if t < 8 {
        threads
    } else {
        (threads * 4).min(words.div_ceil(4))
    };
    // Whole pairs of words (16 columns) per task, the width of the microkernels.
    let per = words.div_ceil(tasks).next_multiple_of(2);
    let tasks = words.div_ceil(per);
    let ptr = SendPtr(out.as_mut_ptr());
    super::par::for_each(tasks, &|task| {
        let cols = task * per..((task + 1) * per).min(words);
        // SAFETY: `out` is a live `[t, n]` buffer borrowed mutably for this whole call
        // and each task writes only the columns of its own word range.
        unsafe { avx2::matmul_words(avx, x, t, w, cols, ptr) }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// Shift of each lane's nibble so lanes come out in column order.
    #[inline(always)]
    unsafe fn lane_shifts() -> __m256i {
        // SAFETY: register-only AVX op.
        unsafe { _mm256_setr_epi32(0, 16, 4, 20, 8, 24, 12, 28) }
    }

    /// The eight codes of `word` as i32 lanes in column order.
    #[inline(always)]
    unsafe fn codes(word: u32, shifts: __m256i) -> __m256i {
        // SAFETY: register-only AVX2 ops.
        unsafe {
            _mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(word as i32), shifts),
                _mm256_set1_epi32(0xF),
            )
        }
    }

    /// Zero points and scales of one word's eight columns in one group.
    #[derive(Clone, Copy)]
    struct GroupParams {
        z: __m256i,
        s: __m256,
    }

    /// # Safety
    /// AVX2/F16C present; `(g, j)` inside the layout of `w`.
    #[inline(always)]
    unsafe fn group_params(w: &Int4Data<'_>, g: usize, j: usize, shifts: __m256i) -> GroupParams {
        let wpr = w.layout.words_per_row();
        // SAFETY: `g < K/G` and `j < N/8`, so the word and the 8 scales at
        // `g*N + 8j` are in bounds.
        unsafe {
            GroupParams {
                z: codes(*w.qzeros.get_unchecked(g * wpr + j), shifts),
                s: _mm256_cvtph_ps(_mm_loadu_si128(
                    w.scales.as_ptr().add(g * w.layout.out_features + 8 * j) as *const __m128i,
                )),
            }
        }
    }

    /// Eight dequantised weights `W[8j..8j+8, k]` from one packed word.
    #[inline(always)]
    unsafe fn dequant(word: u32, p: GroupParams, shifts: __m256i) -> __m256 {
        // SAFETY: register-only AVX2 ops.
        unsafe {
            _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_sub_epi32(codes(word, shifts), p.z)),
                p.s,
            )
        }
    }

    /// Computes output columns of words `cols` for all `t` tokens.
    ///
    /// # Safety
    /// `x` is `[t, K]`; `out` points to a live `[t, N]` buffer whose columns of words
    /// `cols` no other thread touches; `cols.end ≤ N/8`.
    pub(super) unsafe fn matmul_words(
        _avx: Avx2,
        x: &[f32],
        t: usize,
        w: &Int4Data<'_>,
        cols: std::ops::Range<usize>,
        out: SendPtr,
    ) {
        // SAFETY: the token proves AVX2/FMA/F16C; the rest is this fn's contract.
        unsafe {
            if t < PANEL_MIN_TOKENS {
                fused(x, t, w, cols, out)
            } else {
                panel(x, t, w, cols, out)
            }
        }
    }

    /// Decode path: dequantise each word in registers right before its FMAs.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fused(
        x: &[f32],
        t: usize,
        w: &Int4Data<'_>,
        cols: std::ops::Range<usize>,
        out: SendPtr,
    ) {
        let mut i = 0;
        while i < t {
            let mr = (t - i).min(3);
            let mut j = cols.start;
            while j < cols.end {
                let nw = (cols.end - j).min(2);
                // SAFETY: forwarded contract; rows i..i+mr < t, words j..j+nw ≤ cols.end.
                unsafe {
                    match (mr, nw) {
                        (3, 2) => fused_tile::<3, 2>(x, i, w, j, out),
                        (2, 2) => fused_tile::<2, 2>(x, i, w, j, out),
                        (1, 2) => fused_tile::<1, 2>(x, i, w, j, out),
                        (3, _) => fused_tile::<3, 1>(x, i, w, j, out),
                        (2, _) => fused_tile::<2, 1>(x, i, w, j, out),
                        _ => fused_tile::<1, 1>(x, i, w, j, out),
                    }
                }
                j += nw;
            }
            i += mr;
        }
    }

    /// Tokens `i0..i0+MR` against words `j0..j0+NW`, dequantising on the fly.
    #[inline(always)]
    unsafe fn fused_tile<const MR: usize, const NW: usize>(
        x: &[f32],
        i0: usize,
        w: &Int4Data<'_>,
        j0: usize,
        out: SendPtr,
    ) {
        let (k, n, g) = (
            w.layout.in_features,
            w.layout.out_features,
            w.layout.group_size,
        );
        let wpr = w.layout.words_per_row();
        // SAFETY: rows i0..i0+MR of x, words j0..j0+NW of every qweight row and the
        // output tile are in bounds by the caller's contract.
        unsafe {
            let shifts = lane_shifts();
            let mut acc = [[_mm256_setzero_ps(); NW]; MR];
            let xp = x.as_ptr().add(i0 * k);
            let qp = w.qweight.as_ptr();
            for grp in 0..k / g {
                let mut params = [GroupParams {
                    z: _mm256_setzero_si256(),
                    s: _mm256_setzero_ps(),
                }; NW];
                for (u, p) in params.iter_mut().enumerate() {
                    *p = group_params(w, grp, j0 + u, shifts);
                }
                for r in grp * g..(grp + 1) * g {
                    let row = qp.add(r * wpr + j0);
                    let mut wv = [_mm256_setzero_ps(); NW];
                    for (u, v) in wv.iter_mut().enumerate() {
                        *v = dequant(*row.add(u), params[u], shifts);
                    }
                    for (m, acc_m) in acc.iter_mut().enumerate() {
                        let xv = _mm256_set1_ps(*xp.add(m * k + r));
                        for (a, &v) in acc_m.iter_mut().zip(&wv) {
                            *a = _mm256_fmadd_ps(xv, v, *a);
                        }
                    }
                }
            }
            for (m, acc_m) in acc.iter().enumerate() {
                let o = out.0.add((i0 + m) * n + 8 * j0);
                for (u, a) in acc_m.iter().enumerate() {
                    _mm256_storeu_ps(o.add(8 * u), *a);
                }
            }
        }
    }

    /// Prefill path: dequantise two words' columns for all K into an f32 panel
    /// `[K, 16]` once, then run every token through an f32 microkernel on it.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn panel(
        x: &[f32],
        t: usize,
        w: &Int4Data<'_>,
        cols: std::ops::Range<usize>,
        out: SendPtr,
    ) {
        let (k, g) = (w.layout.in_features, w.layout.group_size);
        let wpr = w.layout.words_per_row();
        let mut buf = vec![0f32; k * 16];
        let bp = buf.as_mut_ptr();
        let mut j = cols.start;
        while j < cols.end {
            let nw = (cols.end - j).min(2);
            // SAFETY: words j..j+nw are in range; the panel has K rows of 16 floats.
            unsafe {
                let shifts = lane_shifts();
                for grp in 0..k / g {
                    for u in 0..nw {
                        let p = group_params(w, grp, j + u, shifts);
                        for r in grp * g..(grp + 1) * g {
                            let word = *w.qweight.get_unchecked(r * wpr + j + u);
                            _mm256_storeu_ps(bp.add(r * 16 + 8 * u), dequant(word, p, shifts));
                        }
                    }
                }
                let mut i = 0;
                while i < t {
                    let mr = (t - i).min(6);
                    match (mr, nw) {
                        (6, 2) => panel_tile::<6, 2>(x, i, k, bp, w, j, out),
                        (5, 2) => panel_tile::<5, 2>(x, i, k, bp, w, j, out),
                        (4, 2) => panel_tile::<4, 2>(x, i, k, bp, w, j, out),
                        (3, 2) => panel_tile::<3, 2>(x, i, k, bp, w, j, out),
                        (2, 2) => panel_tile::<2, 2>(x, i, k, bp, w, j, out),
                        (1, 2) => panel_tile::<1, 2>(x, i, k, bp, w, j, out),
                        (6, _) => panel_tile::<6, 1>(x, i, k, bp, w, j, out),
                        (5, _) => panel_tile::<5, 1>(x, i, k, bp, w, j, out),
                        (4, _) => panel_tile::<4, 1>(x, i, k, bp, w, j, out),
                        (3, _) => panel_tile::<3, 1>(x, i, k, bp, w, j, out),
                        (2, _) => panel_tile::<2, 1>(x, i, k, bp, w, j, out),
                        _ => panel_tile::<1, 1>(x, i, k, bp, w, j, out),
                    }
                    i += mr;
                }
            }
            j += nw;
        }
    }

    /// Tokens `i0..i0+MR` against the dequantised panel (row stride 16).
    #[inline(always)]
    unsafe fn panel_tile<const MR: usize, const NW: usize>(
        x: &[f32],
        i0: usize,
        k: usize,
        panel: *const f32,
        w: &Int4Data<'_>,
        j0: usize,
        out: SendPtr,
    ) {
        let n = w.layout.out_features;
        // SAFETY: rows i0..i0+MR of x, K panel rows, and the output tile are in bounds
        // by the caller's contract.
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); NW]; MR];
            let xp = x.as_ptr().add(i0 * k);
            for r in 0..k {
                let mut wv = [_mm256_setzero_ps(); NW];
                for (u, v) in wv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(panel.add(r * 16 + 8 * u));
                }
                for (m, acc_m) in acc.iter_mut().enumerate() {
                    let xv = _mm256_set1_ps(*xp.add(m * k + r));
                    for (a, &v) in acc_m.iter_mut().zip(&wv) {
                        *a = _mm256_fmadd_ps(xv, v, *a);
                    }
                }
            }
            for (m, acc_m) in acc.iter().enumerate() {
                let o = out.0.add((i0 + m) * n + 8 * j0);
                for (u, a) in acc_m.iter().enumerate() {
                    _mm256_storeu_ps(o.add(8 * u), *a);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_order_is_autoawq() {
        // Column c's code is c: nibble p holds column AWQ_PACK_ORDER[p].
        let w = pack_word([0, 1, 2, 3, 4, 5, 6, 7]);
        for (p, &c) in AWQ_PACK_ORDER.iter().enumerate() {
            assert_eq!((w >> (4 * p)) & 0xF, c as u32);
        }
        for (c, &p) in NIBBLE_OF_COLUMN.iter().enumerate() {
            assert_eq!(AWQ_PACK_ORDER[p], c);
        }
    }

    #[test]
    fn layout_rejects_bad_shapes() {
        assert!(Int4Layout::new(64, 12, 64).is_err());
        assert!(Int4Layout::new(96, 16, 64).is_err());
        assert!(Int4Layout::new(0, 16, 1).is_err());
        assert!(Int4Layout::new(7, 16, 7).is_ok());
    }
}
