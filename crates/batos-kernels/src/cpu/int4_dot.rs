//! int4 weights repacked for integer dot products against int8 activations, and the
//! kernels that use them (the scheme llama.cpp uses for Q4_1 on CPUs).
//!
//! Each token's inputs are quantised per weight group to int8, symmetric:
//! `d = max|x|/127`, `x8 = round_ties_even(x · 127/max|x|)` (so `x ≈ d · x8`), and the
//! group's integer sum `σ8 = Σ x8` is kept ([`Int8Activations`]). A weight is
//! `W[n, k] = (q − z)·s + o` (`o` the optional float offset of GGUF's Q4_1, else 0),
//! i.e. `q·s + m` with the group "minimum" `m = o − z·s`, so one group contributes
//! `d · (s · Σ q·x8 + m · σ8)` where `Σ q·x8` is an exact integer dot product.
//!
//! **Order (the spec, identical on every path):** per token and output row, `y = 0`, then
//! per group in order `t = fma(s, float(Σq·x8), m · float(σ8))`, `y = fma(d, t, y)`, with
//! `m = o − z·s` (`z·s` is exact in f32) or `−(z·s)` without offsets. Integer sums are
//! exact, so a token's outputs are bit-identical whatever the batch around it, the
//! tile shape, the thread split or the [`DotPath`].
//!
//! **Layout ([`Int4DotWeight`]):** output rows in blocks of eight; each group's inputs
//! padded with zero codes to a multiple of eight (`P`). Per block and group, `P/8`
//! 32-byte chunks; in chunk `c`, byte `4r + i` holds the code of row `r` of the block
//! at input `8c + i` in its low nibble and input `8c + 4 + i` in its high nibble. One
//! 256-bit load thus gives, after `& 0xF` and `>> 4`, two registers of "four
//! consecutive inputs × eight rows" as u8, which a 4-byte activation broadcast turns
//! into eight row sums per `vpdpbusd` (or `vpmaddubsw` + `vpmaddwd` on AVX2). Scales
//! (f16), zero points (one nibble per row) and offsets (f16) are kept per block and
//! group, so the repacked weights take the bytes the AutoAWQ tensors did.

use std::ops::Range;
use std::sync::OnceLock;

use half::f16;

use super::int4::Int4Data;
#[cfg(target_arch = "x86_64")]
use super::simd::SendPtr;
use crate::error::{KernelError, Result};

/// Which implementation runs the integer-dot kernels. [`DotPath::best`] picks the
/// fastest this CPU has; tests and benchmarks force the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DotPath {
    /// Portable Rust: the reference every other path must match bit for bit.
    Scalar,
    /// AVX2 + FMA + F16C: `vpmaddubsw` then `vpmaddwd` per 4-input quad.
    Avx2,
    /// The same plus AVX-512 VNNI (with VL) on 256-bit registers: one `vpdpbusd`.
    Avx512Vnni,
}

impl DotPath {
    /// Every path, slowest first.
    pub const ALL: [DotPath; 3] = [DotPath::Scalar, DotPath::Avx2, DotPath::Avx512Vnni];

    /// The fastest path this CPU supports (checked once).
    pub fn best() -> DotPath {
        static BEST: OnceLock<DotPath> = OnceLock::new();
        *BEST.get_or_init(|| {
            [DotPath::Avx512Vnni, DotPath::Avx2]
                .into_iter()
                .find(|p| p.is_available())
                .unwrap_or(DotPath::Scalar)
        })
    }

    /// Whether this CPU can run the path.
    pub fn is_available(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = || {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            };
            match self {
                DotPath::Scalar => true,
                DotPath::Avx2 => avx2(),
                DotPath::Avx512Vnni => {
                    avx2()
                        && is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512vl")
                        && is_x86_feature_detected!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == DotPath::Scalar
        }
    }

    /// A short name for benchmark labels.
    pub fn name(self) -> &'static str {
        match self {
            DotPath::Scalar => "scalar",
            DotPath::Avx2 => "avx2",
            DotPath::Avx512Vnni => "avx512vnni",
        }
    }

    fn require(self, op: &'static str) -> Result<()> {
        if self.is_available() {
            return Ok(());
        }
        Err(KernelError::CpuPathUnavailable {
            op,
            path: self.name(),
            needs: match self {
                DotPath::Avx512Vnni => "avx2, fma, f16c, avx512f, avx512vl, avx512vnni",
                _ => "avx2, fma, f16c",
            },
        })
    }
}

/// Inputs per group rounded up to whole 8-input chunks.
fn padded_group(group: usize) -> usize {
    group.next_multiple_of(8)
}

fn check_shape(op: &'static str, k: usize, group: usize) -> Result<()> {
    if k == 0 || group == 0 || !k.is_multiple_of(group) {
        return Err(KernelError::InvalidShape {
            op,
            what: "int8 dot shape",
            reason: format!(
                "in_features {k} must be a positive multiple of the positive group size {group}"
            ),
        });
    }
    Ok(())
}

/// Tokens' inputs quantised to int8 per group (see the [module docs](self)): values
/// `[T, K/G, P]` (each group zero-padded to `P`), scales `d` and sums `σ8` `[T, K/G]`.
/// Reusable: [`Int8Activations::quantize`] keeps the buffers' capacity.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Int8Activations {
    tokens: usize,
    k: usize,
    group: usize,
    padded: usize,
    q: Vec<i8>,
    scale: Vec<f32>,
    sum: Vec<i32>,
}

impl Int8Activations {
    /// Empty; fill with [`Int8Activations::quantize`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Quantises `x` (`[T, k]`, finite) in groups of `group` on the fastest path.
    pub fn quantize(&mut self, x: &[f32], k: usize, group: usize) -> Result<()> {
        self.quantize_with(DotPath::best(), x, k, group)
    }

    /// [`Int8Activations::quantize`] on a given path (every path gives the same bits).
    pub fn quantize_with(
        &mut self,
        path: DotPath,
        x: &[f32],
        k: usize,
        group: usize,
    ) -> Result<()> {
        let op = "Int8Activations::quantize";
        path.require(op)?;
        check_shape(op, k, group)?;
        let tokens = super::check::rows(op, "x", x.len(), k)?;
        let (groups, padded) = (k / group, padded_group(group));
        self.tokens = tokens;
        self.k = k;
        self.group = group;
        self.padded = padded;
        self.q.clear();
        self.q.resize(tokens * groups * padded, 0);
        self.scale.resize(tokens * groups, 0.0);
        self.sum.resize(tokens * groups, 0);
        // Large batches (prefill) quantise on the pool's threads, whole tokens each.
        let tasks = if tokens * k >= 1 << 14 {
            super::par::num_threads().min(tokens)
        } else {
            1
        };
        let per = tokens.div_ceil(tasks) * groups;
        let jobs: Vec<std::sync::Mutex<Option<QuantizeJob<'_>>>> = x
            .chunks(per * group)
            .zip(self.q.chunks_mut(per * padded))
            .zip(self.scale.chunks_mut(per).zip(self.sum.chunks_mut(per)))
            .map(|((x, q), (d, s))| std::sync::Mutex::new(Some((x, q, d, s))))
            .collect();
        let run = |i: usize| {
            let job = jobs[i].lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(job) = job {
                quantize_groups(path, group, padded, job);
            }
        };
        if jobs.len() == 1 {
            run(0);
        } else {
            super::par::for_each(jobs.len(), &run);
        }
        Ok(())
    }

    /// Tokens `T`.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Inputs per token `K`.
    pub fn in_features(&self) -> usize {
        self.k
    }

    /// Inputs per group `G`.
    pub fn group_size(&self) -> usize {
        self.group
    }

    /// The int8 values of token `t`'s group `grp` (`G` of them).
    pub fn values(&self, t: usize, grp: usize) -> &[i8] {
        let i = (t * (self.k / self.group) + grp) * self.padded;
        &self.q[i..i + self.group]
    }

    /// `d` of token `t`'s group `grp`: the values stand for `d · x8`.
    pub fn scale(&self, t: usize, grp: usize) -> f32 {
        self.scale[t * (self.k / self.group) + grp]
    }

    /// `σ8 = Σ x8` of token `t`'s group `grp`.
    pub fn sum(&self, t: usize, grp: usize) -> i32 {
        self.sum[t * (self.k / self.group) + grp]
    }

    /// Token `t`'s values (`K`), scales and sums (`K/G` each) as plain rows, when the
    /// groups are not padded (`G % 8 == 0`); `None` otherwise or past the last token.
    pub(crate) fn token_row(&self, t: usize) -> Option<(&[i8], &[f32], &[i32])> {
        if self.padded != self.group || t >= self.tokens {
            return None;
        }
        let groups = self.k / self.group;
        Some((
            &self.q[t * self.k..(t + 1) * self.k],
            &self.scale[t * groups..(t + 1) * groups],
            &self.sum[t * groups..(t + 1) * groups],
        ))
    }
}

/// Inputs, values, scales and sums of a run of whole groups.
type QuantizeJob<'a> = (&'a [f32], &'a mut [i8], &'a mut [f32], &'a mut [i32]);

/// Quantises every group of `job` on `path` (checked available by the caller).
fn quantize_groups(path: DotPath, group: usize, padded: usize, job: QuantizeJob<'_>) {
    let (x, q, scale, sum) = job;
    let blocks = x
        .chunks_exact(group)
        .zip(q.chunks_exact_mut(padded))
        .zip(scale.iter_mut().zip(sum.iter_mut()));
    for ((xg, qg), (d, s)) in blocks {
        let qg = &mut qg[..group];
        (*d, *s) = match path {
            #[cfg(target_arch = "x86_64")]
            DotPath::Avx2 | DotPath::Avx512Vnni => {
                // SAFETY: the caller checked the path (AVX2) is available; both slices
                // have `group` elements.
                unsafe { x86::quantize_group(xg, qg) }
            }
            _ => quantize_group_scalar(xg, qg),
        };
    }
}

/// One group of inputs quantised exactly as [`Int8Activations`] does it, on the
/// fastest path (every path gives the same bits): writes `x8` into `q` and returns
/// `(d, σ8)`. For the crate's other integer-dot kernels (the int8 LoRA slots).
pub(crate) fn quantize_group(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    assert_eq!(x.len(), q.len(), "quantize_group: x and q differ in length");
    #[cfg(target_arch = "x86_64")]
    if DotPath::Avx2.is_available() {
        // SAFETY: AVX2 was detected and the lengths are equal.
        return unsafe { x86::quantize_group(x, q) };
    }
    quantize_group_scalar(x, q)
}

/// One group: returns `(d, σ8)` and writes `x8` into `q`.
fn quantize_group_scalar(x: &[f32], q: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, &v| a.max(v.abs()));
    if amax == 0.0 {
        q.fill(0);
        return (0.0, 0);
    }
    let inv = 127.0 / amax;
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        let r = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
        sum += i32::from(r);
        *o = r;
    }
    (amax / 127.0, sum)
}

/// The group "minimum" `m = o − z·s` (`−(z·s)` without an offset); `z·s` is exact.
fn group_min(s: f32, z: f32, offset: Option<f32>) -> f32 {
    match offset {
        Some(o) => o - z * s,
        None => -(z * s),
    }
}

/// An int4 linear layer `[N, K]` (output rows × inputs) in the integer-dot layout of
/// the [module docs](self). `N` and `K` are any positive sizes, the group size `G`
/// any positive divisor of `K`.
#[derive(Clone, Debug, PartialEq)]
pub struct Int4DotWeight {
    rows: usize,
    cols: usize,
    group: usize,
    padded: usize,
    groups: usize,
    blocks: usize,
    /// `[blocks][groups][P/8][32]`.
    codes: Vec<u8>,
    /// `[blocks][groups][8]`.
    scales: Vec<f16>,
    /// `[blocks][groups]`: row `r` of the block in nibble `r`.
    zeros: Vec<u32>,
    /// `[blocks][groups][8]`.
    offsets: Option<Vec<f16>>,
}

/// Row-major int4 parameters of an `[N, K]` layer for [`Int4DotWeight::from_rows`]:
/// `codes [N, K]`, `zeros [N, K/G]` (4-bit values; higher bits are dropped),
/// `scales [N, K/G]` and optional `offsets [N, K/G]`.
#[derive(Clone, Copy, Debug)]
pub struct Int4Rows<'a> {
    pub rows: usize,
    pub cols: usize,
    pub group_size: usize,
    pub codes: &'a [u8],
    pub zeros: &'a [u8],
    pub scales: &'a [f16],
    pub offsets: Option<&'a [f16]>,
}

impl Int4DotWeight {
    /// Repacks row-major parameters (lengths checked).
    pub fn from_rows(p: Int4Rows<'_>) -> Result<Self> {
        let op = "Int4DotWeight::from_rows";
        let (n, k, g) = (p.rows, p.cols, p.group_size);
        check_shape(op, k, g)?;
        if n == 0 {
            return Err(KernelError::InvalidShape {
                op,
                what: "int8 dot shape",
                reason: "no output rows".into(),
            });
        }
        let Some(nk) = n.checked_mul(k) else {
            return Err(KernelError::InvalidShape {
                op,
                what: "int8 dot shape",
                reason: format!("{n} x {k} overflows usize"),
            });
        };
        let groups = k / g;
        super::check::len_eq(op, "codes", p.codes.len(), nk)?;
        super::check::len_eq(op, "zeros", p.zeros.len(), n * groups)?;
        super::check::len_eq(op, "scales", p.scales.len(), n * groups)?;
        if let Some(o) = p.offsets {
            super::check::len_eq(op, "offsets", o.len(), n * groups)?;
        }
        let (padded, blocks) = (padded_group(g), n.div_ceil(8));
        let chunks = padded / 8;
        let mut codes = vec![0u8; blocks * groups * chunks * 32];
        let mut scales = vec![f16::ZERO; blocks * groups * 8];
        let mut zeros = vec![0u32; blocks * groups];
        let mut offsets = p.offsets.map(|_| vec![f16::ZERO; blocks * groups * 8]);
        for row in 0..n {
            let (b, r) = (row / 8, row % 8);
            for grp in 0..groups {
                let bg = b * groups + grp;
                for i in 0..g {
                    let q = p.codes[row * k + grp * g + i] & 0xF;
                    let (c, w) = (i / 8, i % 8);
                    let at = (bg * chunks + c) * 32 + 4 * r + w % 4;
                    codes[at] |= if w < 4 { q } else { q << 4 };
                }
                let pi = row * groups + grp;
                scales[bg * 8 + r] = p.scales[pi];
                zeros[bg] |= u32::from(p.zeros[pi] & 0xF) << (4 * r);
                if let (Some(dst), Some(src)) = (offsets.as_mut(), p.offsets) {
                    dst[bg * 8 + r] = src[pi];
                }
            }
        }
        Ok(Int4DotWeight {
            rows: n,
            cols: k,
            group: g,
            padded,
            groups,
            blocks,
            codes,
            scales,
            zeros,
            offsets,
        })
    }

    /// Repacks AutoAWQ-layout weights, with optional Q4_1-style group offsets
    /// (`[K/G, N]`, the layout of the scales).
    pub fn from_int4(w: &Int4Data<'_>, offsets: Option<&[f16]>) -> Result<Self> {
        let lay = w.layout();
        let (k, n, groups) = (lay.in_features(), lay.out_features(), lay.groups());
        if let Some(o) = offsets {
            super::check::len_eq("Int4DotWeight::from_int4", "offsets", o.len(), n * groups)?;
        }
        let wpr = lay.words_per_row();
        let mut codes = vec![0u8; n * k];
        for (kk, words) in w.qweight().chunks_exact(wpr).enumerate() {
            for (j, &word) in words.iter().enumerate() {
                for (c, q) in super::int4::unpack_word(word).into_iter().enumerate() {
                    codes[(8 * j + c) * k + kk] = q;
                }
            }
        }
        let mut zeros = vec![0u8; n * groups];
        for (grp, words) in w.qzeros().chunks_exact(wpr).enumerate() {
            for (j, &word) in words.iter().enumerate() {
                for (c, z) in super::int4::unpack_word(word).into_iter().enumerate() {
                    zeros[(8 * j + c) * groups + grp] = z;
                }
            }
        }
        let transpose = |src: &[f16]| {
            let mut t = vec![f16::ZERO; n * groups];
            for (grp, row) in src.chunks_exact(n).enumerate() {
                for (col, &v) in row.iter().enumerate() {
                    t[col * groups + grp] = v;
                }
            }
            t
        };
        let scales = transpose(w.scales());
        let offsets = offsets.map(transpose);
        Self::from_rows(Int4Rows {
            rows: n,
            cols: k,
            group_size: lay.group_size(),
            codes: &codes,
            zeros: &zeros,
            scales: &scales,
            offsets: offsets.as_deref(),
        })
    }

    /// Output rows `N`.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Inputs `K`.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Inputs per group `G`.
    pub fn group_size(&self) -> usize {
        self.group
    }

    /// Whether the layer has float group offsets.
    pub fn has_offsets(&self) -> bool {
        self.offsets.is_some()
    }

    /// Bytes the repacked tensors occupy (padding included).
    pub fn size_in_bytes(&self) -> usize {
        self.codes.len()
            + 2 * self.scales.len()
            + 4 * self.zeros.len()
            + self.offsets.as_ref().map_or(0, |o| 2 * o.len())
    }

    /// The 4-bit code of `W[n, k]`.
    pub fn code(&self, n: usize, k: usize) -> u8 {
        let (grp, i) = (k / self.group, k % self.group);
        let (c, w) = (i / 8, i % 8);
        let at = ((n / 8 * self.groups + grp) * (self.padded / 8) + c) * 32 + 4 * (n % 8) + w % 4;
        let byte = self.codes[at];
        if w < 4 {
            byte & 0xF
        } else {
            byte >> 4
        }
    }

    /// The zero point of row `n` in group `grp`.
    pub fn zero(&self, n: usize, grp: usize) -> u8 {
        ((self.zeros[n / 8 * self.groups + grp] >> (4 * (n % 8))) & 0xF) as u8
    }

    /// The scale of row `n` in group `grp`.
    pub fn scale(&self, n: usize, grp: usize) -> f16 {
        self.scales[(n / 8 * self.groups + grp) * 8 + n % 8]
    }

    /// The float offset of row `n` in group `grp`, if the layer has offsets.
    pub fn offset(&self, n: usize, grp: usize) -> Option<f16> {
        let at = (n / 8 * self.groups + grp) * 8 + n % 8;
        self.offsets.as_ref().map(|o| o[at])
    }

    /// The group minimum `m = o − z·s` of row `n` in group `grp`.
    pub fn group_min(&self, n: usize, grp: usize) -> f32 {
        group_min(
            self.scale(n, grp).to_f32(),
            f32::from(self.zero(n, grp)),
            self.offset(n, grp).map(f16::to_f32),
        )
    }

    /// `W[n, k] = (q − z)·s (+ o)` as f32.
    pub fn get(&self, n: usize, k: usize) -> f32 {
        let grp = k / self.group;
        let d = i32::from(self.code(n, k)) - i32::from(self.zero(n, grp));
        let w = d as f32 * self.scale(n, grp).to_f32();
        self.offset(n, grp).map_or(w, |o| w + o.to_f32())
    }

    /// Row `n` dequantised into `out` (`K` values; an embedding lookup).
    pub fn dequantize_row(&self, n: usize, out: &mut [f32]) {
        for (k, o) in out[..self.cols].iter_mut().enumerate() {
            *o = self.get(n, k);
        }
    }
}

/// Rows `ids` of `w` as an embedding table, dequantised into `out [ids.len(), K]`; the
/// same checks and errors as [`super::embedding`].
pub fn embedding(w: &Int4DotWeight, ids: &[u32], out: &mut [f32]) -> Result<()> {
    super::check::embedding_rows(w.rows, w.cols, ids, out)?;
    for (&id, o) in ids.iter().zip(out.chunks_exact_mut(w.cols)) {
        w.dequantize_row(id as usize, o);
    }
    Ok(())
}

/// `out[T, N] = x[T, K] · Wᵀ` with `x` already quantised, on the fastest path.
pub fn matmul_int8(a: &Int8Activations, w: &Int4DotWeight, out: &mut [f32]) -> Result<()> {
    matmul_int8_with(DotPath::best(), a, w, out)
}

thread_local! {
    /// The activations of [`matmul`], kept between calls on each thread.
    static ACTS: std::cell::RefCell<Int8Activations> = std::cell::RefCell::new(Int8Activations::new());
}

/// `out[T, N] = x[T, K] · Wᵀ`: quantises `x` to int8 (a per-thread buffer), then
/// [`matmul_int8`]. Bit-identical per token whatever `T`.
pub fn matmul(x: &[f32], w: &Int4DotWeight, out: &mut [f32]) -> Result<()> {
    matmul_with(DotPath::best(), x, w, out)
}

/// [`matmul`] on a given path.
pub fn matmul_with(path: DotPath, x: &[f32], w: &Int4DotWeight, out: &mut [f32]) -> Result<()> {
    matmul_then(path, x, w, out, |_, _| ())
}

/// [`matmul_with`], then `then` with the quantised `x` and `out` (the LoRA of the same
/// input reuses the base's int8 activations).
pub(crate) fn matmul_then<R>(
    path: DotPath,
    x: &[f32],
    w: &Int4DotWeight,
    out: &mut [f32],
    then: impl FnOnce(&Int8Activations, &mut [f32]) -> R,
) -> Result<R> {
    ACTS.with(|cell| {
        let mut a = cell.borrow_mut();
        a.quantize_with(path, x, w.cols, w.group)?;
        matmul_int8_with(path, &a, w, out)?;
        Ok(then(&a, out))
    })
}

/// [`matmul_int8`] on a given path (every path gives the same bits).
pub fn matmul_int8_with(
    path: DotPath,
    a: &Int8Activations,
    w: &Int4DotWeight,
    out: &mut [f32],
) -> Result<()> {
    let op = "int4_dot::matmul";
    path.require(op)?;
    if a.tokens > 0 || a.k > 0 {
        super::check::len_eq(op, "activation in_features", a.k, w.cols)?;
        super::check::len_eq(op, "activation group_size", a.group, w.group)?;
    }
    super::check::len_eq(op, "out", out.len(), a.tokens * w.rows)?;
    if a.tokens == 0 {
        return Ok(());
    }
    match path {
        #[cfg(target_arch = "x86_64")]
        DotPath::Avx2 | DotPath::Avx512Vnni => {
            parallel(path, a, w, out);
            Ok(())
        }
        _ => {
            matmul_scalar(a, w, out);
            Ok(())
        }
    }
}

/// The reference: per token and row, groups in order (see the module docs).
fn matmul_scalar(a: &Int8Activations, w: &Int4DotWeight, out: &mut [f32]) {
    for (t, yt) in out.chunks_exact_mut(w.rows).enumerate() {
        for (n, y) in yt.iter_mut().enumerate() {
            let mut acc = 0f32;
            for grp in 0..w.groups {
                let x8 = a.values(t, grp);
                let dot: i32 = x8
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| i32::from(w.code(n, grp * w.group + i)) * i32::from(v))
                    .sum();
                let s = w.scale(n, grp).to_f32();
                let m = w.group_min(n, grp);
                let part = s.mul_add(dot as f32, m * a.sum(t, grp) as f32);
                acc = a.scale(t, grp).mul_add(part, acc);
            }
            *y = acc;
        }
    }
}

/// Splits the row blocks over the pool's threads.
#[cfg(target_arch = "x86_64")]
fn parallel(path: DotPath, a: &Int8Activations, w: &Int4DotWeight, out: &mut [f32]) {
    let t = a.tokens;
    let threads = super::par::num_threads();
    let tasks = if t * w.rows * w.cols < 1 << 16 || threads == 1 {
        1
    } else if t < 4 {
        threads
    } else {
        (threads * 4).min(w.blocks.div_ceil(2))
    };
    // Decode tiles four blocks at a time, batches two.
    let unit = if t == 1 { 4 } else { 2 };
    let per = w.blocks.div_ceil(tasks).next_multiple_of(unit);
    let tasks = w.blocks.div_ceil(per);
    let ptr = SendPtr(out.as_mut_ptr());
    super::par::for_each(tasks, &|task| {
        let blocks = task * per..((task + 1) * per).min(w.blocks);
        // SAFETY: the path's features were checked by the caller; `out` is a live
        // `[t, N]` buffer borrowed mutably for this call and each task writes only the
        // rows of its own blocks.
        unsafe {
            match path {
                DotPath::Avx512Vnni => x86::vnni::run(a, w, blocks, ptr),
                _ => x86::avx2::run(a, w, blocks, ptr),
            }
        }
    });
}

// AVX-512 intrinsics and target features are stable since Rust 1.89, the workspace's MSRV.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::*;

    /// [`quantize_group_scalar`] with AVX2: the same bits (max and integer sums are
    /// exact; `vcvtps2dq` rounds to nearest even like `round_ties_even`).
    ///
    /// # Safety
    /// AVX2 present; `x.len() == q.len()`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn quantize_group(x: &[f32], q: &mut [i8]) -> (f32, i32) {
        let n = x.len();
        let full = n / 8 * 8;
        // SAFETY: loads and stores stay within the first `full` elements.
        unsafe {
            let sign = _mm256_set1_ps(-0.0);
            let mut vmax = _mm256_setzero_ps();
            for c in (0..full).step_by(8) {
                let v = _mm256_andnot_ps(sign, _mm256_loadu_ps(x.as_ptr().add(c)));
                // NaN lanes keep the running maximum, as `f32::max` does.
                vmax = _mm256_max_ps(v, vmax);
            }
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), vmax);
            let amax = x[full..]
                .iter()
                .fold(lanes.iter().fold(0f32, |a, &v| a.max(v)), |a, &v| {
                    a.max(v.abs())
                });
            if amax == 0.0 {
                q.fill(0);
                return (0.0, 0);
            }
            let inv = 127.0 / amax;
            let vinv = _mm256_set1_ps(inv);
            let (lo, hi) = (_mm256_set1_epi32(-127), _mm256_set1_epi32(127));
            let mut vsum = _mm256_setzero_si256();
            for c in (0..full).step_by(8) {
                let r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x.as_ptr().add(c)), vinv));
                let r = _mm256_min_epi32(_mm256_max_epi32(r, lo), hi);
                vsum = _mm256_add_epi32(vsum, r);
                let p16 =
                    _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r));
                let p8 = _mm_packs_epi16(p16, p16);
                _mm_storel_epi64(q.as_mut_ptr().add(c) as *mut __m128i, p8);
            }
            let mut ints = [0i32; 8];
            _mm256_storeu_si256(ints.as_mut_ptr() as *mut __m256i, vsum);
            let mut sum: i32 = ints.iter().sum();
            for (o, &v) in q[full..].iter_mut().zip(&x[full..]) {
                let r = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
                sum += i32::from(r);
                *o = r;
            }
            (amax / 127.0, sum)
        }
    }

    /// AVX2 `Σ u8·i8` over each lane's four bytes, added to `acc` (no saturation: the
    /// codes are < 16, so a pair of products is at most 2·15·128). Register-only AVX2
    /// ops; expanded inside the kernels' `unsafe` blocks.
    macro_rules! dot_avx2 {
        ($acc:expr, $w:expr, $x:expr) => {{
            let pairs = _mm256_maddubs_epi16($w, $x);
            _mm256_add_epi32($acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
        }};
    }

    /// The same with one `vpdpbusd` (AVX-512 VNNI + VL). Only expanded into the VNNI
    /// kernel, which runs after `DotPath::Avx512Vnni` was detected.
    macro_rules! dot_vnni {
        ($acc:expr, $w:expr, $x:expr) => {
            _mm256_dpbusd_epi32($acc, $w, $x)
        };
    }

    /// Stamps out the tiled kernel once per instruction set, so every intrinsic is
    /// compiled inside a function with the matching `target_feature`s.
    macro_rules! dot_kernels {
        ($name:ident, $features:literal, $dot:ident) => {
            pub(super) mod $name {
                use super::*;

                /// Row blocks `blocks` for all tokens.
                ///
                /// # Safety
                /// The features are present; `out` is a live `[T, N]` buffer whose rows
                /// of these blocks no other thread touches.
                #[target_feature(enable = $features)]
                pub(in super::super) unsafe fn run(
                    a: &Int8Activations,
                    w: &Int4DotWeight,
                    blocks: Range<usize>,
                    out: SendPtr,
                ) {
                    let t = a.tokens;
                    let mut b = blocks.start;
                    // SAFETY: forwarded contract; every tile stays within `blocks`
                    // and `t` tokens.
                    unsafe {
                        if t == 1 {
                            while b + 4 <= blocks.end {
                                tile::<1, 4>(a, w, 0, b, out);
                                b += 4;
                            }
                            while b < blocks.end {
                                tile::<1, 1>(a, w, 0, b, out);
                                b += 1;
                            }
                            return;
                        }
                        while b < blocks.end {
                            let nb = if b + 2 <= blocks.end { 2 } else { 1 };
                            let mut i = 0;
                            while i < t {
                                let mr = (t - i).min(4);
                                match (mr, nb) {
                                    (4, 2) => tile::<4, 2>(a, w, i, b, out),
                                    (3, 2) => tile::<3, 2>(a, w, i, b, out),
                                    (2, 2) => tile::<2, 2>(a, w, i, b, out),
                                    (1, 2) => tile::<1, 2>(a, w, i, b, out),
                                    (4, _) => tile::<4, 1>(a, w, i, b, out),
                                    (3, _) => tile::<3, 1>(a, w, i, b, out),
                                    (2, _) => tile::<2, 1>(a, w, i, b, out),
                                    _ => tile::<1, 1>(a, w, i, b, out),
                                }
                                i += mr;
                            }
                            b += nb;
                        }
                    }
                }

                /// Tokens `i0..i0+MR` against row blocks `b0..b0+NB`.
                #[target_feature(enable = $features)]
                #[inline]
                unsafe fn tile<const MR: usize, const NB: usize>(
                    a: &Int8Activations,
                    w: &Int4DotWeight,
                    i0: usize,
                    b0: usize,
                    out: SendPtr,
                ) {
                    let (groups, padded) = (w.groups, w.padded);
                    let chunks = padded / 8;
                    // SAFETY: blocks b0..b0+NB < w.blocks and tokens i0..i0+MR < T by
                    // the caller; every pointer below indexes those blocks' codes and
                    // parameters, those tokens' activations, and the output rows of
                    // the blocks that exist (a short last block goes through `tail`).
                    unsafe {
                        let nib = _mm256_set1_epi8(0x0F);
                        let shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
                        let sign = _mm256_set1_ps(-0.0);
                        let mut y = [[_mm256_setzero_ps(); NB]; MR];
                        for grp in 0..groups {
                            let cp: [*const u8; NB] = std::array::from_fn(|u| {
                                w.codes
                                    .as_ptr()
                                    .add(((b0 + u) * groups + grp) * chunks * 32)
                            });
                            let xp: [*const i8; MR] = std::array::from_fn(|m| {
                                a.q.as_ptr().add(((i0 + m) * groups + grp) * padded)
                            });
                            let mut acc = [[_mm256_setzero_si256(); NB]; MR];
                            for c in 0..chunks {
                                let mut lo = [_mm256_setzero_si256(); NB];
                                let mut hi = [_mm256_setzero_si256(); NB];
                                for u in 0..NB {
                                    let v = _mm256_loadu_si256(cp[u].add(32 * c) as *const __m256i);
                                    lo[u] = _mm256_and_si256(v, nib);
                                    hi[u] = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nib);
                                }
                                for m in 0..MR {
                                    let q = xp[m].add(8 * c);
                                    let xa = _mm256_set1_epi32((q as *const i32).read_unaligned());
                                    let xb = _mm256_set1_epi32(
                                        (q.add(4) as *const i32).read_unaligned(),
                                    );
                                    for u in 0..NB {
                                        acc[m][u] = $dot!(acc[m][u], lo[u], xa);
                                        acc[m][u] = $dot!(acc[m][u], hi[u], xb);
                                    }
                                }
                            }
                            for u in 0..NB {
                                let bg = (b0 + u) * groups + grp;
                                let s = _mm256_cvtph_ps(_mm_loadu_si128(
                                    w.scales.as_ptr().add(bg * 8) as *const __m128i,
                                ));
                                let z = _mm256_cvtepi32_ps(_mm256_and_si256(
                                    _mm256_srlv_epi32(
                                        _mm256_set1_epi32(*w.zeros.get_unchecked(bg) as i32),
                                        shifts,
                                    ),
                                    _mm256_set1_epi32(0xF),
                                ));
                                let mn = match &w.offsets {
                                    Some(o) => _mm256_fnmadd_ps(
                                        z,
                                        s,
                                        _mm256_cvtph_ps(_mm_loadu_si128(
                                            o.as_ptr().add(bg * 8) as *const __m128i
                                        )),
                                    ),
                                    None => _mm256_xor_ps(_mm256_mul_ps(z, s), sign),
                                };
                                for m in 0..MR {
                                    let tg = (i0 + m) * groups + grp;
                                    let sx = _mm256_set1_ps(*a.sum.get_unchecked(tg) as f32);
                                    let d = _mm256_set1_ps(*a.scale.get_unchecked(tg));
                                    let part = _mm256_fmadd_ps(
                                        s,
                                        _mm256_cvtepi32_ps(acc[m][u]),
                                        _mm256_mul_ps(mn, sx),
                                    );
                                    y[m][u] = _mm256_fmadd_ps(d, part, y[m][u]);
                                }
                            }
                        }
                        for m in 0..MR {
                            for u in 0..NB {
                                let row0 = 8 * (b0 + u);
                                let o = out.0.add((i0 + m) * w.rows + row0);
                                if row0 + 8 <= w.rows {
                                    _mm256_storeu_ps(o, y[m][u]);
                                } else {
                                    let mut tail = [0f32; 8];
                                    _mm256_storeu_ps(tail.as_mut_ptr(), y[m][u]);
                                    std::ptr::copy_nonoverlapping(tail.as_ptr(), o, w.rows - row0);
                                }
                            }
                        }
                    }
                }
            }
        };
    }

    dot_kernels!(avx2, "avx2,fma,f16c", dot_avx2);
    // The AVX-512 target features also give the kernel 32 vector registers: measured
    // 1.2-1.35x faster at T = 128-512 than the same code on AVX2's 16.
    dot_kernels!(vnni, "avx2,fma,f16c,avx512f,avx512vl,avx512vnni", dot_vnni);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantize_group_rounds_and_sums() {
        let x = [1.0f32, -0.5, 0.25, 0.0, -1.0];
        let mut q = [0i8; 5];
        let (d, s) = quantize_group_scalar(&x, &mut q);
        assert_eq!(q, [127, -64, 32, 0, -127]);
        assert_eq!(s, 127 - 64 + 32 - 127);
        assert_eq!(d, 1.0 / 127.0);
        let (d, s) = quantize_group_scalar(&[0.0; 3], &mut q[..3]);
        assert_eq!((d, s), (0.0, 0));
    }

    #[test]
    fn shapes_are_checked() {
        let mut a = Int8Activations::new();
        assert!(a.quantize_with(DotPath::Scalar, &[0.0; 6], 6, 4).is_err());
        assert!(a.quantize_with(DotPath::Scalar, &[0.0; 7], 6, 3).is_err());
        let p = Int4Rows {
            rows: 3,
            cols: 6,
            group_size: 3,
            codes: &[0; 18],
            zeros: &[0; 6],
            scales: &[f16::ONE; 5],
            offsets: None,
        };
        assert!(Int4DotWeight::from_rows(p).is_err());
    }
}
