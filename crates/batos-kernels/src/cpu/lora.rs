//! Batched multi-LoRA kernels: every token of one mixed batch picks its own adapter
//! (`Option<SlotIdx>`), and the low-rank update `y += scale · (x · Aᵀ) · Bᵀ` is added
//! to the base projection's output.
//!
//! Two shapes of the same computation, as in Punica/S-LoRA:
//! - [`bgmv`] gathers by slot token by token (decode: one token per sequence);
//! - [`sgmv`] works on [`LoraSegment`]s, runs of consecutive tokens sharing a slot
//!   (prefill), so each adapter row is loaded once per run instead of once per token.
//!
//! [`shrink`] and [`expand`] expose the two halves separately (`h = x · Aᵀ`, then
//! `y += scale · h · Bᵀ`). Slots may have different ranks in one batch; tokens whose
//! slot is `None` are not touched and cost nothing.
//!
//! [`reference`] is the scalar specification (f64 accumulation); the functions at this
//! level validate their arguments identically and then run AVX2/FMA code when the CPU
//! has it (detected at run time), else the reference.

use crate::cpu::check::{len_eq, rows};
use crate::error::{KernelError, Result};
use batos_types::SlotIdx;
use rayon::prelude::*;

/// One hot adapter's matrices for one projection: `A [rank, in]`, `B [out, rank]`
/// (PEFT's `lora_A.weight` / `lora_B.weight`), and the scale `alpha / r` (or
/// `alpha / sqrt(r)` for rsLoRA).
#[derive(Clone, Copy, Debug)]
pub struct LoraSlot<'a> {
    a: &'a [f32],
    b: &'a [f32],
    rank: usize,
    scale: f32,
}

impl<'a> LoraSlot<'a> {
    /// Wraps `a` (`[rank, in]`) and `b` (`[out, rank]`); lengths are checked against a
    /// projection's shape when the slot is put in a [`LoraSlots`] table.
    pub fn new(a: &'a [f32], b: &'a [f32], rank: usize, scale: f32) -> Self {
        LoraSlot { a, b, rank, scale }
    }

    /// The adapter's rank for this projection.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The scale applied to the update.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// `A`, `[rank, in]` row-major.
    pub fn a(&self) -> &'a [f32] {
        self.a
    }

    /// `B`, `[out, rank]` row-major.
    pub fn b(&self) -> &'a [f32] {
        self.b
    }
}

/// The slot table of one projection (one layer's `q_proj`, say): slot `i` holds an
/// adapter, or nothing. Plain data, built per step from whatever owns the hot tier.
///
/// ```
/// use batos_kernels::cpu::lora::{LoraSlot, LoraSlots};
/// let (a, b) = ([1.0f32, 0.0], [2.0f32, 3.0]); // rank 1, in 2, out 2
/// let table = [None, Some(LoraSlot::new(&a, &b, 1, 0.5))];
/// let slots = LoraSlots::new(2, 2, &table).unwrap();
/// assert_eq!(slots.max_rank(), 1);
/// ```
#[derive(Clone, Copy, Debug)]
pub struct LoraSlots<'a> {
    in_features: usize,
    out_features: usize,
    max_rank: usize,
    slots: &'a [Option<LoraSlot<'a>>],
}

impl<'a> LoraSlots<'a> {
    /// Checks every filled slot against the projection's `in_features`/`out_features`:
    /// `A` must be `[rank, in]`, `B` `[out, rank]`, rank ≥ 1 and the scale finite.
    pub fn new(
        in_features: usize,
        out_features: usize,
        slots: &'a [Option<LoraSlot<'a>>],
    ) -> Result<Self> {
        let op = "LoraSlots::new";
        if in_features == 0 || out_features == 0 {
            return Err(KernelError::InvalidShape {
                op,
                what: "projection",
                reason: format!("in {in_features} x out {out_features} has a zero side"),
            });
        }
        let mut max_rank = 0;
        for (i, s) in slots.iter().enumerate() {
            let Some(s) = s else { continue };
            if s.rank == 0 {
                return Err(KernelError::InvalidShape {
                    op,
                    what: "rank",
                    reason: format!("slot {i} has rank 0"),
                });
            }
            if !s.scale.is_finite() {
                return Err(KernelError::InvalidShape {
                    op,
                    what: "scale",
                    reason: format!("slot {i} has non-finite scale {}", s.scale),
                });
            }
            let bad = |what: &'static str, expected: Option<usize>, got: usize| {
                KernelError::InvalidShape {
                    op,
                    what,
                    reason: format!(
                        "slot {i} (rank {}): {got} elements, expected {}",
                        s.rank,
                        expected.map_or("an overflowing size".to_string(), |e| e.to_string())
                    ),
                }
            };
            let a_len = s.rank.checked_mul(in_features);
            if a_len != Some(s.a.len()) {
                return Err(bad("A", a_len, s.a.len()));
            }
            let b_len = s.rank.checked_mul(out_features);
            if b_len != Some(s.b.len()) {
                return Err(bad("B", b_len, s.b.len()));
            }
            max_rank = max_rank.max(s.rank);
        }
        Ok(LoraSlots {
            in_features,
            out_features,
            max_rank,
            slots,
        })
    }

    /// Input width of the projection.
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Output width of the projection.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// The largest rank of any filled slot (0 if none): the row stride of the
    /// intermediate `h` of [`shrink`]/[`expand`].
    pub fn max_rank(&self) -> usize {
        self.max_rank
    }

    /// Number of slots (filled or not).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the table has no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The adapter in `slot`, or a typed error when the slot is outside the table or
    /// empty (a token must never name an empty slot).
    pub fn get(&self, op: &'static str, slot: SlotIdx) -> Result<LoraSlot<'a>> {
        match self.slots.get(slot.index()) {
            Some(Some(s)) => Ok(*s),
            Some(None) => Err(KernelError::InvalidShape {
                op,
                what: "slot",
                reason: format!("slot {} is empty", slot.0),
            }),
            None => Err(KernelError::InvalidShape {
                op,
                what: "slot",
                reason: format!(
                    "slot {} is outside a table of {} slots",
                    slot.0,
                    self.slots.len()
                ),
            }),
        }
    }
}

/// A run of `len` consecutive tokens starting at row `start` that all use `slot`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraSegment {
    pub start: usize,
    pub len: usize,
    pub slot: SlotIdx,
}

/// Splits per-token slots into maximal runs of one slot; tokens without an adapter
/// start no segment.
///
/// ```
/// use batos_kernels::cpu::lora::{segments, LoraSegment};
/// use batos_types::SlotIdx;
/// let s = |i| Some(SlotIdx(i));
/// let segs = segments(&[s(1), s(1), None, s(0), s(1)]);
/// assert_eq!(segs, vec![
///     LoraSegment { start: 0, len: 2, slot: SlotIdx(1) },
///     LoraSegment { start: 3, len: 1, slot: SlotIdx(0) },
///     LoraSegment { start: 4, len: 1, slot: SlotIdx(1) },
/// ]);
/// ```
pub fn segments(tokens: &[Option<SlotIdx>]) -> Vec<LoraSegment> {
    let mut out: Vec<LoraSegment> = Vec::new();
    for (t, s) in tokens.iter().enumerate() {
        let Some(slot) = *s else { continue };
        match out.last_mut() {
            Some(last) if last.slot == slot && last.start + last.len == t => last.len += 1,
            _ => out.push(LoraSegment {
                start: t,
                len: 1,
                slot,
            }),
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Validation shared by the reference and the fast path.

/// Returns T.
fn check_xy(op: &'static str, x: &[f32], y_len: usize, slots: &LoraSlots<'_>) -> Result<usize> {
    let t = rows(op, "x", x.len(), slots.in_features)?;
    len_eq(op, "y", y_len, t * slots.out_features)?;
    Ok(t)
}

fn check_tokens(
    op: &'static str,
    t: usize,
    tokens: &[Option<SlotIdx>],
    slots: &LoraSlots<'_>,
) -> Result<()> {
    len_eq(op, "token slots", tokens.len(), t)?;
    for s in tokens.iter().flatten() {
        slots.get(op, *s)?;
    }
    Ok(())
}

fn check_segments(
    op: &'static str,
    t: usize,
    segs: &[LoraSegment],
    slots: &LoraSlots<'_>,
) -> Result<()> {
    let mut next = 0usize;
    for (i, s) in segs.iter().enumerate() {
        let end = s.start.checked_add(s.len);
        if s.start < next || end.is_none_or(|e| e > t) {
            return Err(KernelError::InvalidShape {
                op,
                what: "segments",
                reason: format!(
                    "segment {i} covers rows {}..{}+{} but segments must be increasing, \
                     non-overlapping and within the {t} rows of x",
                    s.start, s.start, s.len
                ),
            });
        }
        next = s.start + s.len;
        slots.get(op, s.slot)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------

/// Scalar kernels: the specification. Dot products accumulate in f64.
pub mod reference {
    use super::*;

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(&p, &q)| p as f64 * q as f64).sum()
    }

    /// `h[t, ..r] = x[t] · Aᵀ` for every token with a slot; `h` is `[T, max_rank]` and
    /// the rows (and columns past the slot's rank) of other tokens are left as they are.
    pub fn shrink(
        x: &[f32],
        tokens: &[Option<SlotIdx>],
        slots: &LoraSlots<'_>,
        h: &mut [f32],
    ) -> Result<()> {
        let op = "lora::shrink";
        let t = rows(op, "x", x.len(), slots.in_features)?;
        check_tokens(op, t, tokens, slots)?;
        let r_max = slots.max_rank;
        len_eq(op, "h", h.len(), t * r_max)?;
        let n_in = slots.in_features;
        for (i, s) in tokens.iter().enumerate() {
            let Some(s) = s else { continue };
            let s = slots.get(op, *s)?;
            let xi = &x[i * n_in..(i + 1) * n_in];
            for j in 0..s.rank {
                h[i * r_max + j] = dot(xi, &s.a[j * n_in..(j + 1) * n_in]) as f32;
            }
        }
        Ok(())
    }

    /// `y[t] += scale · h[t, ..r] · Bᵀ` for every token with a slot.
    pub fn expand(
        h: &[f32],
        tokens: &[Option<SlotIdx>],
        slots: &LoraSlots<'_>,
        y: &mut [f32],
    ) -> Result<()> {
        let op = "lora::expand";
        let n_out = slots.out_features;
        let t = rows(op, "y", y.len(), n_out)?;
        check_tokens(op, t, tokens, slots)?;
        let r_max = slots.max_rank;
        len_eq(op, "h", h.len(), t * r_max)?;
        for (i, s) in tokens.iter().enumerate() {
            let Some(s) = s else { continue };
            let s = slots.get(op, *s)?;
            let r = s.rank;
            let hi = &h[i * r_max..i * r_max + r];
            for o in 0..n_out {
                let d = dot(hi, &s.b[o * r..(o + 1) * r]);
                y[i * n_out + o] += (s.scale as f64 * d) as f32;
            }
        }
        Ok(())
    }

    /// `y[t] += scale · (x[t] · Aᵀ) · Bᵀ` per token, gathering each token's slot.
    pub fn bgmv(
        x: &[f32],
        tokens: &[Option<SlotIdx>],
        slots: &LoraSlots<'_>,
        y: &mut [f32],
    ) -> Result<()> {
        let op = "lora::bgmv";
        let t = check_xy(op, x, y.len(), slots)?;
        check_tokens(op, t, tokens, slots)?;
        let mut h = vec![0f32; t * slots.max_rank];
        shrink(x, tokens, slots, &mut h)?;
        expand(&h, tokens, slots, y)
    }

    /// The same update for runs of tokens sharing a slot.
    pub fn sgmv(
        x: &[f32],
        segs: &[LoraSegment],
        slots: &LoraSlots<'_>,
        y: &mut [f32],
    ) -> Result<()> {
        let op = "lora::sgmv";
        let t = check_xy(op, x, y.len(), slots)?;
        check_segments(op, t, segs, slots)?;
        let mut tokens = vec![None; t];
        for s in segs {
            tokens[s.start..s.start + s.len].fill(Some(s.slot));
        }
        bgmv(x, &tokens, slots, y)
    }
}

// ---------------------------------------------------------------------------------
// Fast path.

/// Tokens per tile: a tile's `h` stays in L1 and each adapter row is reused this often.
const TILE: usize = 8;
/// Below this many multiply-adds the work stays on the calling thread.
const PAR_MIN_MACS: usize = 1 << 18;

/// One unit of work: `n` consecutive rows of x/y sharing `slot`.
struct Tile<'y, 's> {
    start: usize,
    slot: LoraSlot<'s>,
    y: &'y mut [f32],
}

fn run_tiles(x: &[f32], slots: &LoraSlots<'_>, tiles: Vec<Tile<'_, '_>>) {
    let macs: usize = tiles
        .iter()
        .map(|t| t.y.len() / slots.out_features * t.slot.rank)
        .sum::<usize>()
        * (slots.in_features + slots.out_features);
    let simd = simd_available();
    let work = |tile: Tile<'_, '_>| {
        let n = tile.y.len() / slots.out_features;
        let x_rows = &x[tile.start * slots.in_features..(tile.start + n) * slots.in_features];
        apply_tile(simd, x_rows, slots, &tile.slot, tile.y);
    };
    if macs >= PAR_MIN_MACS && tiles.len() > 1 {
        // A few tiles per task: decode tiles are one token, too small to send alone.
        tiles.into_par_iter().with_min_len(4).for_each(work);
    } else {
        tiles.into_iter().for_each(work);
    }
}

/// Splits `y` into tiles of at most [`TILE`] rows along `segs` (which are validated:
/// increasing and disjoint).
fn tiles_of<'y, 's>(
    segs: &[LoraSegment],
    slots: &LoraSlots<'s>,
    mut y: &'y mut [f32],
) -> Result<Vec<Tile<'y, 's>>> {
    let n_out = slots.out_features;
    let mut consumed = 0usize;
    let mut tiles = Vec::new();
    for s in segs {
        let slot = slots.get("lora::tiles", s.slot)?;
        let skip = (s.start - consumed) * n_out;
        y = &mut std::mem::take(&mut y)[skip..];
        let mut left = s.len;
        let mut start = s.start;
        while left > 0 {
            let n = left.min(TILE);
            let (head, rest) = std::mem::take(&mut y).split_at_mut(n * n_out);
            tiles.push(Tile {
                start,
                slot,
                y: head,
            });
            y = rest;
            start += n;
            left -= n;
        }
        consumed = s.start + s.len;
    }
    Ok(tiles)
}

/// `y += scale · (x · Aᵀ) · Bᵀ` for one tile of `n ≤ TILE` rows sharing one slot.
fn apply_tile(simd: bool, x: &[f32], slots: &LoraSlots<'_>, s: &LoraSlot<'_>, y: &mut [f32]) {
    let (n_in, n_out, r) = (slots.in_features, slots.out_features, s.rank);
    let n = y.len() / n_out;
    let mut h = vec![0f32; n * r];
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when AVX2 and FMA were detected; the slices have
        // the lengths the tile functions assert (checked when the slots and the call
        // were validated).
        unsafe {
            avx2::shrink_tile(x, s.a, n_in, r, n, &mut h);
            for v in &mut h {
                *v *= s.scale;
            }
            avx2::expand_tile(&h, s.b, r, n, n_out, y);
        }
        return;
    }
    let _ = simd;
    // Shrink: each A row is read once for the whole tile.
    for j in 0..r {
        let a = &s.a[j * n_in..(j + 1) * n_in];
        for t in 0..n {
            h[t * r + j] = dot_scalar(&x[t * n_in..(t + 1) * n_in], a);
        }
    }
    // Fold the scale into h once rather than into every output.
    for v in &mut h {
        *v *= s.scale;
    }
    // Expand: each B row is read once for the whole tile.
    for o in 0..n_out {
        let b = &s.b[o * r..(o + 1) * r];
        for t in 0..n {
            y[t * n_out + o] += dot_scalar(&h[t * r..(t + 1) * r], b);
        }
    }
}

fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[inline]
fn dot(simd: bool, a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when AVX2 and FMA were detected on this CPU.
        return unsafe { avx2::dot(a, b) };
    }
    let _ = simd;
    dot_scalar(a, b)
}

fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    // Four partial sums, like the SIMD path's accumulators.
    let mut acc = [0f32; 4];
    let mut ca = a.chunks_exact(4);
    let mut cb = b.chunks_exact(4);
    for (p, q) in (&mut ca).zip(&mut cb) {
        for k in 0..4 {
            acc[k] += p[k] * q[k];
        }
    }
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(p, q)| p * q)
        .sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The eight horizontal sums of `acc[0..8]`, in order.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn reduce8(acc: [__m256; 8]) -> __m256 {
        let t0 = _mm256_hadd_ps(acc[0], acc[1]);
        let t1 = _mm256_hadd_ps(acc[2], acc[3]);
        let t2 = _mm256_hadd_ps(acc[4], acc[5]);
        let t3 = _mm256_hadd_ps(acc[6], acc[7]);
        let u0 = _mm256_hadd_ps(t0, t1);
        let u1 = _mm256_hadd_ps(t2, t3);
        let lo = _mm256_permute2f128_ps(u0, u1, 0x20);
        let hi = _mm256_permute2f128_ps(u0, u1, 0x31);
        _mm256_add_ps(lo, hi)
    }

    /// `h[t·r + j] = x[t] · a[j]` for `t < n`, `j < r`: `x` is `[n, n_in]`, `a`
    /// `[r, n_in]`, `h` `[n, r]`. Eight rows of `a` share each load of `x`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn shrink_tile(
        x: &[f32],
        a: &[f32],
        n_in: usize,
        r: usize,
        n: usize,
        h: &mut [f32],
    ) {
        assert!(x.len() >= n * n_in && a.len() >= r * n_in && h.len() >= n * r);
        let (px, pa) = (x.as_ptr(), a.as_ptr());
        let mut j = 0;
        while j + 8 <= r {
            for t in 0..n {
                let xt = t * n_in;
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut i = 0;
                // SAFETY: i + 8 <= n_in, so every load stays inside row t of x and
                // rows j..j+8 of a (lengths asserted above).
                unsafe {
                    while i + 8 <= n_in {
                        let xv = _mm256_loadu_ps(px.add(xt + i));
                        for (k, acc) in acc.iter_mut().enumerate() {
                            let av = _mm256_loadu_ps(pa.add((j + k) * n_in + i));
                            *acc = _mm256_fmadd_ps(av, xv, *acc);
                        }
                        i += 8;
                    }
                }
                let mut sums = [0f32; 8];
                // SAFETY: `sums` holds exactly 8 floats.
                unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), reduce8(acc)) };
                for (k, s) in sums.iter_mut().enumerate() {
                    for ii in i..n_in {
                        *s += a[(j + k) * n_in + ii] * x[xt + ii];
                    }
                    h[t * r + j + k] = *s;
                }
            }
            j += 8;
        }
        for jj in j..r {
            let row = &a[jj * n_in..(jj + 1) * n_in];
            for t in 0..n {
                // SAFETY: AVX2 and FMA are available (this function's contract).
                h[t * r + jj] = unsafe { dot(&x[t * n_in..(t + 1) * n_in], row) };
            }
        }
    }

    /// `y[t·n_out + o] += h[t] · b[o]` for `t < n`, `o < n_out`: `h` is `[n, r]`, `b`
    /// `[n_out, r]`, `y` `[n, n_out]`. Eight outputs are reduced together.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn expand_tile(
        h: &[f32],
        b: &[f32],
        r: usize,
        n: usize,
        n_out: usize,
        y: &mut [f32],
    ) {
        assert!(h.len() >= n * r && b.len() >= n_out * r && y.len() >= n * n_out);
        let (ph, pb) = (h.as_ptr(), b.as_ptr());
        let mut o = 0;
        while o + 8 <= n_out {
            for t in 0..n {
                let ht = t * r;
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut c = 0;
                // SAFETY: c + 8 <= r, so the loads stay inside row t of h and rows
                // o..o+8 of b (lengths asserted above).
                unsafe {
                    while c + 8 <= r {
                        let hv = _mm256_loadu_ps(ph.add(ht + c));
                        for (k, acc) in acc.iter_mut().enumerate() {
                            let bv = _mm256_loadu_ps(pb.add((o + k) * r + c));
                            *acc = _mm256_fmadd_ps(bv, hv, *acc);
                        }
                        c += 8;
                    }
                }
                let mut sums = [0f32; 8];
                // SAFETY: `sums` holds exactly 8 floats.
                unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), reduce8(acc)) };
                let yt = &mut y[t * n_out + o..t * n_out + o + 8];
                for (k, (s, yv)) in sums.iter_mut().zip(yt).enumerate() {
                    for cc in c..r {
                        *s += b[(o + k) * r + cc] * h[ht + cc];
                    }
                    *yv += *s;
                }
            }
            o += 8;
        }
        for oo in o..n_out {
            let row = &b[oo * r..(oo + 1) * r];
            for t in 0..n {
                // SAFETY: AVX2 and FMA are available (this function's contract).
                y[t * n_out + oo] += unsafe { dot(&h[t * r..(t + 1) * r], row) };
            }
        }
    }

    /// Dot product of the common prefix of `a` and `b`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: every load reads 8 floats at offset i with i + 8 <= n (or i + 16 <= n
        // for the unrolled pair), inside both slices; unaligned loads are used.
        unsafe {
            while i + 16 <= n {
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(pa.add(i + 8)),
                    _mm256_loadu_ps(pb.add(i + 8)),
                    acc1,
                );
                i += 16;
            }
            if i + 8 <= n {
                acc0 =
                    _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                i += 8;
            }
        }
        let acc = _mm256_add_ps(acc0, acc1);
        let lo = _mm256_castps256_ps128(acc);
        let hi = _mm256_extractf128_ps(acc, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        let mut total = _mm_cvtss_f32(s);
        while i < n {
            total += a[i] * b[i];
            i += 1;
        }
        total
    }
}

/// `h[t, ..r] = x[t] · Aᵀ` for every token with a slot (`h` is `[T, max_rank]`; other
/// rows are untouched). Prefer [`bgmv`]/[`sgmv`], which fuse both halves per tile.
pub fn shrink(
    x: &[f32],
    tokens: &[Option<SlotIdx>],
    slots: &LoraSlots<'_>,
    h: &mut [f32],
) -> Result<()> {
    let op = "lora::shrink";
    let t = rows(op, "x", x.len(), slots.in_features)?;
    check_tokens(op, t, tokens, slots)?;
    let r_max = slots.max_rank;
    len_eq(op, "h", h.len(), t * r_max)?;
    let simd = simd_available();
    let n_in = slots.in_features;
    for (i, s) in tokens.iter().enumerate() {
        let Some(s) = s else { continue };
        let s = slots.get(op, *s)?;
        let xi = &x[i * n_in..(i + 1) * n_in];
        for j in 0..s.rank {
            h[i * r_max + j] = dot(simd, xi, &s.a[j * n_in..(j + 1) * n_in]);
        }
    }
    Ok(())
}

/// `y[t] += scale · h[t, ..r] · Bᵀ` for every token with a slot.
pub fn expand(
    h: &[f32],
    tokens: &[Option<SlotIdx>],
    slots: &LoraSlots<'_>,
    y: &mut [f32],
) -> Result<()> {
    let op = "lora::expand";
    let n_out = slots.out_features;
    let t = rows(op, "y", y.len(), n_out)?;
    check_tokens(op, t, tokens, slots)?;
    let r_max = slots.max_rank;
    len_eq(op, "h", h.len(), t * r_max)?;
    let simd = simd_available();
    for (i, s) in tokens.iter().enumerate() {
        let Some(s) = s else { continue };
        let s = slots.get(op, *s)?;
        let r = s.rank;
        let hi = &h[i * r_max..i * r_max + r];
        for o in 0..n_out {
            y[i * n_out + o] += s.scale * dot(simd, hi, &s.b[o * r..(o + 1) * r]);
        }
    }
    Ok(())
}

/// Decode-shaped LoRA: `y[t] += scale · (x[t] · Aᵀ) · Bᵀ` with token `t` gathering
/// slot `tokens[t]`; tokens with `None` are skipped. `x` is `[T, in]`, `y` `[T, out]`.
///
/// ```
/// use batos_kernels::cpu::lora::{bgmv, LoraSlot, LoraSlots};
/// use batos_types::SlotIdx;
/// let (a, b) = ([1.0f32, 1.0], [1.0f32, -1.0]); // rank 1, in 2, out 2
/// let table = [Some(LoraSlot::new(&a, &b, 1, 2.0))];
/// let slots = LoraSlots::new(2, 2, &table).unwrap();
/// let x = [1.0f32, 2.0, 5.0, 5.0];
/// let mut y = [0.0f32; 4];
/// bgmv(&x, &[Some(SlotIdx(0)), None], &slots, &mut y).unwrap();
/// assert_eq!(y, [6.0, -6.0, 0.0, 0.0]);
/// ```
pub fn bgmv(
    x: &[f32],
    tokens: &[Option<SlotIdx>],
    slots: &LoraSlots<'_>,
    y: &mut [f32],
) -> Result<()> {
    let op = "lora::bgmv";
    let t = check_xy(op, x, y.len(), slots)?;
    check_tokens(op, t, tokens, slots)?;
    let segs: Vec<LoraSegment> = tokens
        .iter()
        .enumerate()
        .filter_map(|(start, s)| {
            s.map(|slot| LoraSegment {
                start,
                len: 1,
                slot,
            })
        })
        .collect();
    let tiles = tiles_of(&segs, slots, y)?;
    run_tiles(x, slots, tiles);
    Ok(())
}

/// Prefill-shaped LoRA: the update of [`bgmv`] for runs of consecutive tokens sharing
/// one slot (see [`segments`]); each adapter row is loaded once per tile of a run.
/// Segments must be increasing and disjoint; rows outside every segment are untouched.
pub fn sgmv(x: &[f32], segs: &[LoraSegment], slots: &LoraSlots<'_>, y: &mut [f32]) -> Result<()> {
    let op = "lora::sgmv";
    let t = check_xy(op, x, y.len(), slots)?;
    check_segments(op, t, segs, slots)?;
    let tiles = tiles_of(segs, slots, y)?;
    run_tiles(x, slots, tiles);
    Ok(())
}

/// Picks [`sgmv`] when some tokens share a run, [`bgmv`] otherwise.
pub fn apply(
    x: &[f32],
    tokens: &[Option<SlotIdx>],
    slots: &LoraSlots<'_>,
    y: &mut [f32],
) -> Result<()> {
    let segs = segments(tokens);
    if segs.iter().any(|s| s.len > 1) {
        let t = check_xy("lora::apply", x, y.len(), slots)?;
        len_eq("lora::apply", "token slots", tokens.len(), t)?;
        sgmv(x, &segs, slots, y)
    } else {
        bgmv(x, tokens, slots, y)
    }
}
