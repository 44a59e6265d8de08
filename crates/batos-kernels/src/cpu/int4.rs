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
//! Weight `W[n, k] = (q[k, n] − z[k/G, n]) · s[k/G, n]`, computed as
//! `((q − z) as f32) * s` by [`Int4Data::get`], [`Int4Data::dequantize_row`] and the
//! scalar reference matmul. The AVX2 matmul instead takes the zero point and scale out
//! of each group's sum (`s·Σx·q − (z·s)·Σx`, see `matmul_avx2`): the same product,
//! rounded differently, and in one fixed order per output whatever the batch.
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
        if !out_features.is_multiple_of(8) {
            return bad(format!(
                "out_features {out_features} is not a multiple of 8 (eight columns per packed word)"
            ));
        }
        if !in_features.is_multiple_of(group_size) {
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

/// Tokens at which the int4 matmul switches from the decode kernels (codes unpacked
/// in registers for each use, shared by up to three tokens) to a panel of codes
/// unpacked once and reused by all tokens (prefill).
const PANEL_MIN_TOKENS: usize = 4;

/// Packed words a prefill panel block unpacks at once (two per 16-column sub-panel):
/// 128 columns, a whole cache line of each input row's words, and a token tile's
/// inputs stay in L1 across the eight 16-column microkernels.
const PANEL_BLOCK_WORDS: usize = 16;

/// How many input rows ahead the panel's unpacking prefetches its words.
const PANEL_PREFETCH_ROWS: usize = 8;

/// Packed words per decode chunk (1,024 columns): each input row's words of a chunk
/// are one contiguous 512-byte read, so the weights stream through memory nearly in
/// order (walking one 8-word block down all K rows instead touches a new page every
/// few rows and measured ~1.6x slower per token once the weights come from DRAM),
/// and the chunk's per-group sums (8 KiB per token) stay in L1.
const DECODE_CHUNK_WORDS: usize = 128;

/// `out[T, N] = x[T, K] · Wᵀ` for int4 `W` on AVX2 (shapes checked by the caller),
/// parallel over disjoint ranges of packed output words.
///
/// Both paths compute every output element in one fixed order, with the zero point
/// and scale taken out of the sum per group:
/// - per group `g`, `d = Σₖ xₖ·qₖ` as one f32 FMA chain over the group's rows in order
///   (from `0`), and `σ = Σₖ xₖ` added in order (shared by all columns);
/// - `y = 0`, then per group in order `y = fma(s, d, y)`, `y = y − (z·s)·σ` (one fused
///   negated multiply-add; `z·s` is exact in f32).
///
/// So a token's result does not depend on the batch around it, nor on which path or
/// thread computes it.
pub(crate) fn matmul_avx2(avx: Avx2, x: &[f32], w: &Int4Data<'_>, out: &mut [f32]) {
    let (k, n, g) = (
        w.layout.in_features,
        w.layout.out_features,
        w.layout.group_size,
    );
    let t = x.len() / k;
    if t == 0 {
        return;
    }
    // σ for every token and group, summed once in the one order both paths use.
    let groups = k / g;
    let mut xsum = vec![0f32; t * groups];
    for (xr, sr) in x.chunks_exact(k).zip(xsum.chunks_exact_mut(groups)) {
        for (xg, s) in xr.chunks_exact(g).zip(sr.iter_mut()) {
            *s = xg.iter().fold(0.0f32, |a, &v| a + v);
        }
    }
    let words = w.layout.words_per_row();
    let threads = super::par::num_threads();
    let (tasks, unit) = if t * n * k < 1 << 16 || threads == 1 {
        (1, 2)
    } else if t < PANEL_MIN_TOKENS {
        // Decode: one range per thread, whole 8-word blocks where possible.
        (threads, 8)
    } else {
        ((threads * 4).min(words.div_ceil(4)), 2)
    };
    let per = words.div_ceil(tasks).next_multiple_of(unit);
    let tasks = words.div_ceil(per);
    let ptr = SendPtr(out.as_mut_ptr());
    let xsum = &xsum[..];
    super::par::for_each(tasks, &|task| {
        let cols = task * per..((task + 1) * per).min(words);
        // SAFETY: `out` is a live `[t, n]` buffer borrowed mutably for this whole call
        // and each task writes only the columns of its own word range; `xsum` is
        // `[t, K/G]`.
        unsafe { avx2::matmul_words(avx, x, xsum, t, w, cols, ptr) }
    });
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;
    use std::cell::Cell;

    thread_local! {
        /// The prefill panel's buffer, kept between calls on each thread.
        static PANEL_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    }

    /// Shift of each lane's nibble so lanes come out in column order.
    #[inline(always)]
    unsafe fn lane_shifts() -> __m256i {
        // SAFETY: register-only AVX op.
        unsafe { _mm256_setr_epi32(0, 16, 4, 20, 8, 24, 12, 28) }
    }

    /// The eight codes of `word` as f32 lanes in column order.
    #[inline(always)]
    unsafe fn codes_f32(word: u32, shifts: __m256i) -> __m256 {
        // SAFETY: register-only AVX2 ops.
        unsafe {
            _mm256_cvtepi32_ps(_mm256_and_si256(
                _mm256_srlv_epi32(_mm256_set1_epi32(word as i32), shifts),
                _mm256_set1_epi32(0xF),
            ))
        }
    }

    /// Nibble `p` of each of eight packed words, as f32: lane `i` of result `p` is the
    /// code of column `AWQ_PACK_ORDER[p]` of word `i` ("nibble-major" order).
    #[inline(always)]
    unsafe fn nibbles(v: __m256i) -> [__m256; 8] {
        // SAFETY: register-only AVX2 ops.
        unsafe {
            let m = _mm256_set1_epi32(0xF);
            let f = |c: __m256i| _mm256_cvtepi32_ps(c);
            [
                f(_mm256_and_si256(v, m)),
                f(_mm256_and_si256(_mm256_srli_epi32::<4>(v), m)),
                f(_mm256_and_si256(_mm256_srli_epi32::<8>(v), m)),
                f(_mm256_and_si256(_mm256_srli_epi32::<12>(v), m)),
                f(_mm256_and_si256(_mm256_srli_epi32::<16>(v), m)),
                f(_mm256_and_si256(_mm256_srli_epi32::<20>(v), m)),
                f(_mm256_and_si256(_mm256_srli_epi32::<24>(v), m)),
                f(_mm256_srli_epi32::<28>(v)),
            ]
        }
    }

    /// Transposes an 8×8 f32 matrix given as eight row vectors.
    #[inline(always)]
    unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // SAFETY: register-only AVX ops.
        unsafe {
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ]
        }
    }

    /// Computes output columns of words `cols` for all `t` tokens.
    ///
    /// # Safety
    /// `x` is `[t, K]`, `xsum` is `[t, K/G]`; `out` points to a live `[t, N]` buffer
    /// whose columns of words `cols` no other thread touches; `cols.end ≤ N/8`.
    pub(super) unsafe fn matmul_words(
        _avx: Avx2,
        x: &[f32],
        xsum: &[f32],
        t: usize,
        w: &Int4Data<'_>,
        cols: std::ops::Range<usize>,
        out: SendPtr,
    ) {
        // SAFETY: the token proves AVX2/FMA/F16C; the rest is this fn's contract.
        unsafe {
            if t < PANEL_MIN_TOKENS {
                fused(x, xsum, t, w, cols, out)
            } else {
                panel(x, xsum, t, w, cols, out)
            }
        }
    }

    /// Decode path: up to three tokens at a time against chunks of
    /// [`DECODE_CHUNK_WORDS`] packed words, input rows in memory order; each row's
    /// words are peeled eight at a time out of 256-bit loads, and the per-group sums
    /// live in small L1 buffers rather than registers, so one unpack feeds every token.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fused(
        x: &[f32],
        xsum: &[f32],
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
                let nc = (cols.end - j).min(DECODE_CHUNK_WORDS);
                // SAFETY: forwarded contract; tokens i..i+mr < t, words j..j+nc ≤ cols.end.
                unsafe {
                    match mr {
                        3 => fused_chunk::<3>(x, xsum, i, w, j, nc, out),
                        2 => fused_chunk::<2>(x, xsum, i, w, j, nc, out),
                        _ => fused_chunk::<1>(x, xsum, i, w, j, nc, out),
                    }
                }
                j += nc;
            }
            i += mr;
        }
    }

    /// Lanes `< nw` set.
    #[inline(always)]
    unsafe fn word_mask(nw: usize) -> __m256i {
        // SAFETY: register-only AVX2 ops.
        unsafe {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(nw as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        }
    }

    /// Scales and `z·s` of words `j0..j0+nw` (`nw ≤ 8`) in group `grp`, in the
    /// nibble-major lane order of [`nibbles`] (lanes of missing words are zero).
    ///
    /// # Safety
    /// AVX2/F16C present; `grp < K/G`, `j0 + nw ≤ N/8`; `mask` has lanes `< nw` set.
    #[inline(always)]
    unsafe fn group_params_nibble_major(
        w: &Int4Data<'_>,
        grp: usize,
        j0: usize,
        nw: usize,
        mask: __m256i,
    ) -> ([__m256; 8], [__m256; 8]) {
        let (n, wpr) = (w.layout.out_features, w.layout.words_per_row());
        // SAFETY: only the nw words (and their 8·nw scales) inside the layout are read.
        unsafe {
            let sp = w.scales.as_ptr().add(grp * n + 8 * j0);
            let mut rows = [_mm256_setzero_ps(); 8];
            for (i, r) in rows.iter_mut().enumerate().take(nw) {
                *r = _mm256_cvtph_ps(_mm_loadu_si128(sp.add(8 * i) as *const __m128i));
            }
            // by_col[c] lane i: the scale of column c of word j0 + i.
            let by_col = transpose8(rows);
            let zp = w.qzeros.as_ptr().add(grp * wpr + j0) as *const i32;
            let z = nibbles(_mm256_maskload_epi32(zp, mask));
            let s: [__m256; 8] = std::array::from_fn(|p| by_col[AWQ_PACK_ORDER[p]]);
            let zs: [__m256; 8] = std::array::from_fn(|p| _mm256_mul_ps(z[p], s[p]));
            (s, zs)
        }
    }

    /// Tokens `i0..i0+MR` against words `j0..j0+nc` (`nc ≤ DECODE_CHUNK_WORDS`).
    /// Sums are kept per 8-word block in nibble-major order (64 floats per block).
    #[inline(always)]
    unsafe fn fused_chunk<const MR: usize>(
        x: &[f32],
        xsum: &[f32],
        i0: usize,
        w: &Int4Data<'_>,
        j0: usize,
        nc: usize,
        out: SendPtr,
    ) {
        let (k, n, g) = (
            w.layout.in_features,
            w.layout.out_features,
            w.layout.group_size,
        );
        let (wpr, groups) = (w.layout.words_per_row(), k / g);
        let (full, rem) = (nc / 8, nc % 8);
        let blocks = nc.div_ceil(8);
        let mut d = [[0f32; DECODE_CHUNK_WORDS * 8]; MR];
        let mut y = [[0f32; DECODE_CHUNK_WORDS * 8]; MR];
        // SAFETY: rows i0..i0+MR of x and xsum, words j0..j0+nc of every qweight row
        // (the last block's by a masked load when it is short) and the output tile are
        // in bounds by the caller's contract; d and y hold `blocks · 64 ≤` their length.
        unsafe {
            let rem_mask = word_mask(rem);
            let qp = (w.qweight.as_ptr() as *const i32).add(j0);
            for grp in 0..groups {
                for dm in d.iter_mut() {
                    dm[..blocks * 64].fill(0.0);
                }
                for r in grp * g..(grp + 1) * g {
                    let row = qp.add(r * wpr);
                    let xb: [__m256; MR] =
                        std::array::from_fn(|m| _mm256_set1_ps(*x.get_unchecked((i0 + m) * k + r)));
                    for b in 0..blocks {
                        let v = if b < full {
                            _mm256_loadu_si256(row.add(8 * b) as *const __m256i)
                        } else {
                            _mm256_maskload_epi32(row.add(8 * b), rem_mask)
                        };
                        let q = nibbles(v);
                        for (dm, &xm) in d.iter_mut().zip(&xb) {
                            let dp = dm.as_mut_ptr().add(64 * b);
                            for (p, &qv) in q.iter().enumerate() {
                                let a = dp.add(8 * p);
                                _mm256_storeu_ps(a, _mm256_fmadd_ps(xm, qv, _mm256_loadu_ps(a)));
                            }
                        }
                    }
                }
                for b in 0..blocks {
                    let nw = if b < full { 8 } else { rem };
                    let (s, zs) = group_params_nibble_major(w, grp, j0 + 8 * b, nw, word_mask(nw));
                    for (m, (dm, ym)) in d.iter().zip(y.iter_mut()).enumerate() {
                        let xs = _mm256_set1_ps(*xsum.get_unchecked((i0 + m) * groups + grp));
                        let (dp, yp) = (dm.as_ptr().add(64 * b), ym.as_mut_ptr().add(64 * b));
                        for p in 0..8 {
                            let a = yp.add(8 * p);
                            let v = _mm256_fmadd_ps(
                                s[p],
                                _mm256_loadu_ps(dp.add(8 * p)),
                                _mm256_loadu_ps(a),
                            );
                            _mm256_storeu_ps(a, _mm256_fnmadd_ps(zs[p], xs, v));
                        }
                    }
                }
            }
            // Back to column order: row c of the transpose's input is nibble
            // NIBBLE_OF_COLUMN[c], so row u of its output is word j0 + 8b + u's columns.
            for (m, ym) in y.iter().enumerate() {
                for b in 0..blocks {
                    let nw = if b < full { 8 } else { rem };
                    let yp = ym.as_ptr().add(64 * b);
                    let by_word = transpose8(std::array::from_fn(|c| {
                        _mm256_loadu_ps(yp.add(8 * NIBBLE_OF_COLUMN[c]))
                    }));
                    let o = out.0.add((i0 + m) * n + 8 * (j0 + 8 * b));
                    for (u, v) in by_word.iter().enumerate().take(nw) {
                        _mm256_storeu_ps(o.add(8 * u), *v);
                    }
                }
            }
        }
    }

    /// Prefill path: unpack the codes of up to [`PANEL_BLOCK_WORDS`] words for all K
    /// into f32 sub-panels `[K, 16]` (two words each) once, with the groups' scales and
    /// `z·s`, then run every token through an f32 microkernel on them.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn panel(
        x: &[f32],
        xsum: &[f32],
        t: usize,
        w: &Int4Data<'_>,
        cols: std::ops::Range<usize>,
        out: SendPtr,
    ) {
        let (k, g, n) = (
            w.layout.in_features,
            w.layout.group_size,
            w.layout.out_features,
        );
        let (wpr, groups) = (w.layout.words_per_row(), k / g);
        let subs = PANEL_BLOCK_WORDS / 2;
        // The panel is reused across calls (one per thread): at the model's shapes it is
        // hundreds of KiB, and a fresh allocation per call costs page faults.
        let mut scratch = PANEL_SCRATCH.with(|c| c.take());
        let (codes_len, params_len) = (subs * k * 16, subs * groups * 32);
        scratch.resize(codes_len + params_len, 0.0);
        // Per sub-panel: K rows of 16 codes; then per sub-panel and group: 16 scales and
        // 16 z·s.
        let (codes, params) = scratch.split_at_mut(codes_len);
        let (cp, pp) = (codes.as_mut_ptr(), params.as_mut_ptr());
        let mut j = cols.start;
        while j < cols.end {
            let nb = (cols.end - j).min(PANEL_BLOCK_WORDS);
            // SAFETY: words j..j+nb are in range; sub-panel `u / 2` has K rows of 16
            // floats and `groups` parameter rows of 32.
            unsafe {
                let shifts = lane_shifts();
                // Row by row, so each row's words are read in one pass over their
                // cache lines (the LM head's rows are 24 KiB apart).
                for r in 0..k {
                    let row = w.qweight.as_ptr().add(r * wpr + j);
                    // Rows are N/2 bytes apart; the prefetchers do not follow, and
                    // without this the unpacking waits on DRAM (measured: a third of
                    // a 16-sequence decode step).
                    _mm_prefetch::<_MM_HINT_T0>(
                        row.wrapping_add(PANEL_PREFETCH_ROWS * wpr) as *const i8
                    );
                    for u in 0..nb {
                        let c = cp.add((u / 2) * k * 16 + 8 * (u % 2) + r * 16);
                        _mm256_storeu_ps(c, codes_f32(*row.add(u), shifts));
                    }
                }
                for grp in 0..groups {
                    for u in 0..nb {
                        let s = _mm256_cvtph_ps(_mm_loadu_si128(
                            w.scales.as_ptr().add(grp * n + 8 * (j + u)) as *const __m128i,
                        ));
                        let z = codes_f32(*w.qzeros.get_unchecked(grp * wpr + j + u), shifts);
                        let p = pp.add((u / 2) * groups * 32 + 8 * (u % 2) + grp * 32);
                        _mm256_storeu_ps(p, s);
                        _mm256_storeu_ps(p.add(16), _mm256_mul_ps(z, s));
                    }
                }
                let mut i = 0;
                while i < t {
                    let mr = (t - i).min(6);
                    let mut u = 0;
                    while u < nb {
                        let nw = (nb - u).min(2);
                        let sub = u / 2;
                        let c = cp.add(sub * k * 16) as *const f32;
                        let p = pp.add(sub * groups * 32) as *const f32;
                        let args = (x, xsum, i, c, p, w, j + u, out);
                        match (mr, nw) {
                            (6, 2) => panel_tile::<6, 2>(args),
                            (5, 2) => panel_tile::<5, 2>(args),
                            (4, 2) => panel_tile::<4, 2>(args),
                            (3, 2) => panel_tile::<3, 2>(args),
                            (2, 2) => panel_tile::<2, 2>(args),
                            (1, 2) => panel_tile::<1, 2>(args),
                            (6, _) => panel_tile::<6, 1>(args),
                            (5, _) => panel_tile::<5, 1>(args),
                            (4, _) => panel_tile::<4, 1>(args),
                            (3, _) => panel_tile::<3, 1>(args),
                            (2, _) => panel_tile::<2, 1>(args),
                            _ => panel_tile::<1, 1>(args),
                        }
                        u += nw;
                    }
                    i += mr;
                }
            }
            j += nb;
        }
        PANEL_SCRATCH.with(|c| c.set(scratch));
    }

    /// `(x, xsum, first token, codes sub-panel, its group parameters, weights, first
    /// word, out)` of one [`panel_tile`].
    type TileArgs<'a, 'w> = (
        &'a [f32],
        &'a [f32],
        usize,
        *const f32,
        *const f32,
        &'a Int4Data<'w>,
        usize,
        SendPtr,
    );

    /// Tokens `i0..i0+MR` against one sub-panel (row stride 16), the output tile
    /// accumulated in place group by group.
    #[inline(always)]
    unsafe fn panel_tile<const MR: usize, const NW: usize>(args: TileArgs<'_, '_>) {
        let (x, xsum, i0, codes, params, w, j0, out) = args;
        let (k, n, g) = (
            w.layout.in_features,
            w.layout.out_features,
            w.layout.group_size,
        );
        let groups = k / g;
        // SAFETY: rows i0..i0+MR of x and xsum, K sub-panel rows, its parameter rows
        // and the output tile are in bounds by the caller's contract.
        unsafe {
            let xp = x.as_ptr().add(i0 * k);
            let o = out.0.add(i0 * n + 8 * j0);
            for m in 0..MR {
                for u in 0..NW {
                    _mm256_storeu_ps(o.add(m * n + 8 * u), _mm256_setzero_ps());
                }
            }
            for grp in 0..groups {
                let mut d = [[_mm256_setzero_ps(); NW]; MR];
                for r in grp * g..(grp + 1) * g {
                    let mut q = [_mm256_setzero_ps(); NW];
                    for (u, v) in q.iter_mut().enumerate() {
                        *v = _mm256_loadu_ps(codes.add(r * 16 + 8 * u));
                    }
                    for (m, d_m) in d.iter_mut().enumerate() {
                        let xb = _mm256_set1_ps(*xp.add(m * k + r));
                        for (a, &v) in d_m.iter_mut().zip(&q) {
                            *a = _mm256_fmadd_ps(xb, v, *a);
                        }
                    }
                }
                let pg = params.add(grp * 32);
                for (m, d_m) in d.iter().enumerate() {
                    let xs = _mm256_set1_ps(*xsum.get_unchecked((i0 + m) * groups + grp));
                    for (u, &dv) in d_m.iter().enumerate() {
                        let s = _mm256_loadu_ps(pg.add(8 * u));
                        let zs = _mm256_loadu_ps(pg.add(16 + 8 * u));
                        let y = o.add(m * n + 8 * u);
                        let v = _mm256_fmadd_ps(s, dv, _mm256_loadu_ps(y));
                        _mm256_storeu_ps(y, _mm256_fnmadd_ps(zs, xs, v));
                    }
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
