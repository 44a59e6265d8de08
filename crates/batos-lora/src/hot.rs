//! The precision hot slots hold: the copy of an adapter's A and B the batched kernels
//! stream every decode step.
//!
//! A decode step over many distinct adapters reads every adapter's A and B once per
//! step, so the bytes per element set its speed (see `docs/perf/lora.md`). The warm
//! tier keeps the canonical f32 decode (the generation is computed from it, and
//! materialisation and device copies start from it); a half-precision format adds a
//! converted copy of the matrices it narrows, built once when the adapter enters the
//! warm tier and charged to the same warm reservation. A narrowed copy is stored in the
//! order the kernels read it, so each matrix is one sequential stream: `A` in panels of
//! eight rows ([`ALayout::Panels`]) and `B` transposed in column blocks
//! ([`BLayout::RankOutBlocks`]; an int8 `B` of rank divisible by 4 in
//! [`BLayout::RankQuadBlocks`] where the CPU runs the kernels' integer-dot path).

use crate::adapter::LoraWeights;
use crate::shapes::Projection;
use batos_kernels::cpu::lora::{
    int8_dot_available, pack_a, pack_b, pack_b_quads, ALayout, BLayout, LoraDType, LoraMatrix,
    LoraSlot,
};
use half::{bf16, f16};

/// The element types hot slots keep `A` and `B` in. Activations and accumulation are
/// f32 whatever the format.
///
/// Tolerance: rounding to bf16 moves each element by at most 2⁻⁸ of itself, to f16 by
/// 2⁻¹¹ (values below f16's normal range round in absolute terms, ≤ 3·10⁻⁸), so the
/// update `scale·(x·Aᵀ)·Bᵀ` moves by at most about twice that of
/// `scale·Σⱼ(Σₖ|xₖ·Aⱼₖ|)·|Bₒⱼ|` — a small fraction of the LoRA delta, itself a small
/// part of the projection output. On the real model with the reference r16 adapter
/// (`crates/batos-model/tests/lora_conformance.rs`) the step-1 logits stay within
/// 3.0·10⁻⁴ of the f32 PEFT reference with f16 slots (asserted < 10⁻³, as for f32
/// slots) and 6.0·10⁻³ with bf16 (asserted < 10⁻²); greedy tokens are identical.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HotFormat {
    /// Element type of `A` (`[rank, in]`, read by the shrink).
    pub a: LoraDType,
    /// Element type of `B` (`[out, rank]`, read by the expand).
    pub b: LoraDType,
}

impl HotFormat {
    /// f32 throughout: the slot reads the warm copy in place, nothing is converted.
    pub const F32: HotFormat = HotFormat {
        a: LoraDType::F32,
        b: LoraDType::F32,
    };
    /// bf16 `A` and `B`: half the bytes, f32's range, 8 significant bits.
    pub const BF16: HotFormat = HotFormat {
        a: LoraDType::BF16,
        b: LoraDType::BF16,
    };
    /// f16 `A` and `B`: half the bytes, 11 significant bits; a matrix with a value
    /// beyond f16's range (±65504) is kept in bf16 instead.
    pub const F16: HotFormat = HotFormat {
        a: LoraDType::F16,
        b: LoraDType::F16,
    };
    /// Symmetric int8 `A` and `B` with one f32 scale per rank row: a quarter of the
    /// bytes; each element moves by at most half a step, 1/254 of its row's largest.
    pub const I8: HotFormat = HotFormat {
        a: LoraDType::I8,
        b: LoraDType::I8,
    };

    /// Whether nothing is converted.
    pub fn is_f32(&self) -> bool {
        *self == HotFormat::F32
    }

    /// The bytes the converted copy of an adapter is expected to take, from its
    /// decoded f32 size (what admission reserves before converting; the reservation is
    /// then set to the exact size).
    pub fn extra_bytes_estimate(&self, f32_bytes: u64) -> u64 {
        let per = |d: LoraDType| match d {
            LoraDType::F32 => 0,
            d => d.size() as u64,
        };
        // A and B hold about the same number of elements in a LoRA pair.
        f32_bytes / 4 * (per(self.a) + per(self.b)) / 2
    }
}

impl Default for HotFormat {
    /// f16: half the bytes of f32, and on the real model within the f32 tolerance of
    /// the PEFT reference (bf16 is not: see `docs/perf/lora.md`).
    fn default() -> Self {
        HotFormat::F16
    }
}

/// Where a narrowed matrix sits in its adapter's [`Arenas`]: element ranges (int8:
/// the codes as a byte range and the scales as a word range of the int8 buffer).
#[derive(Clone, Debug, PartialEq)]
enum Span {
    F16(std::ops::Range<usize>),
    BF16(std::ops::Range<usize>),
    I8 {
        q: std::ops::Range<usize>,
        scales: std::ops::Range<usize>,
    },
}

/// One adapter's narrowed matrices, one buffer per element type, each matrix after the
/// previous one in the order the forward pass reads them (layer by layer, q, k, v, o,
/// gate, up, down, `A` before `B`): a fused group's matrices for one adapter are one
/// sequential stream, which the hardware prefetchers follow across matrices.
///
/// int8 matrices share one buffer of 32-bit words with their f32 row scales, in the
/// order the kernels use them: `A`'s codes, `A`'s scales, `B`'s scales, `B`'s codes
/// (codes four to a word, each matrix padded to whole words). The scales are read
/// between the shrink and the expand; kept in a buffer of their own they were a short
/// second stream per task that missed the cache every time (`docs/perf/lora.md`).
#[derive(Clone, Debug, Default, PartialEq)]
struct Arenas {
    f16: Vec<f16>,
    bf16: Vec<bf16>,
    int8: Vec<u32>,
}

impl Arenas {
    /// Appends `src` (`A` `[rank, in]` or `B` `[out, rank]`, as `matrix` says) in
    /// `dtype`, in the kernels' packed layout; `None` for f32 (the slot reads the f32
    /// copy). `scratch` holds the narrowed matrix before packing.
    fn push(
        &mut self,
        src: &[f32],
        rank: usize,
        dtype: LoraDType,
        matrix: Packed,
        scratch: &mut Scratch,
    ) -> Option<Span> {
        match dtype {
            LoraDType::F32 => None,
            LoraDType::I8 => {
                // One scale per rank row: A's rows, B's columns.
                let mut scales = vec![0f32; rank];
                let n = src.len() / rank.max(1);
                match matrix {
                    Packed::A => {
                        for (s, row) in scales.iter_mut().zip(src.chunks_exact(n.max(1))) {
                            *s = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                        }
                    }
                    Packed::B(_) => {
                        for row in src.chunks_exact(rank.max(1)) {
                            for (s, v) in scales.iter_mut().zip(row) {
                                *s = s.max(v.abs());
                            }
                        }
                    }
                }
                scales.iter_mut().for_each(|s| *s /= 127.0);
                let inv: Vec<f32> = scales
                    .iter()
                    .map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 })
                    .collect();
                let q = &mut scratch.i8;
                q.clear();
                match matrix {
                    Packed::A => {
                        for (k, row) in inv.iter().zip(src.chunks_exact(n.max(1))) {
                            q.extend(row.iter().map(|v| quantize(v * k)));
                        }
                    }
                    Packed::B(_) => {
                        for row in src.chunks_exact(rank.max(1)) {
                            q.extend(row.iter().zip(&inv).map(|(v, k)| quantize(v * k)));
                        }
                    }
                }
                // Packing moves elements within their rank rows: the scales stay valid.
                let packed = &mut scratch.packed_i8;
                packed.clear();
                matrix.pack_into(q, rank, packed);
                let push_scales = |words: &mut Vec<u32>| {
                    let s0 = words.len();
                    words.extend(scales.iter().map(|v| v.to_bits()));
                    s0..words.len()
                };
                let push_codes = |words: &mut Vec<u32>| {
                    let w0 = words.len();
                    words.resize(w0 + packed.len().div_ceil(4), 0);
                    let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut words[w0..]);
                    bytes[..packed.len()].copy_from_slice(bytemuck::cast_slice(&packed[..]));
                    w0 * 4..w0 * 4 + packed.len()
                };
                let (q, scales) = match matrix {
                    Packed::A => {
                        let q = push_codes(&mut self.int8);
                        (q, push_scales(&mut self.int8))
                    }
                    Packed::B(_) => {
                        let sc = push_scales(&mut self.int8);
                        (push_codes(&mut self.int8), sc)
                    }
                };
                Some(Span::I8 { q, scales })
            }
            LoraDType::F16 if src.iter().all(|v| v.abs() <= f16::MAX.to_f32()) => {
                let out = &mut scratch.f16;
                out.resize(src.len(), f16::ZERO);
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut out[..], src);
                let start = self.f16.len();
                matrix.pack_into(out, rank, &mut self.f16);
                Some(Span::F16(start..self.f16.len()))
            }
            // bf16 (or an f16 request whose values do not fit f16).
            LoraDType::F16 | LoraDType::BF16 => {
                let out = &mut scratch.bf16;
                out.resize(src.len(), bf16::ZERO);
                half::slice::HalfFloatSliceExt::convert_from_f32_slice(&mut out[..], src);
                let start = self.bf16.len();
                matrix.pack_into(out, rank, &mut self.bf16);
                Some(Span::BF16(start..self.bf16.len()))
            }
        }
    }

    fn view(&self, span: &Span) -> LoraMatrix<'_> {
        match span {
            Span::F16(r) => LoraMatrix::F16(&self.f16[r.clone()]),
            Span::BF16(r) => LoraMatrix::BF16(&self.bf16[r.clone()]),
            Span::I8 { q, scales } => LoraMatrix::I8 {
                q: &bytemuck::cast_slice(&self.int8)[q.clone()],
                scales: bytemuck::cast_slice(&self.int8[scales.clone()]),
            },
        }
    }

    fn bytes(&self) -> u64 {
        (self.f16.len() * 2 + self.bf16.len() * 2 + self.int8.len() * 4) as u64
    }
}

/// `v` (within ±127 up to rounding) to the nearest int8, ties to even: the
/// add-and-subtract of 1.5·2²³ rounds in the FPU's mode, where `f32::round` would be a
/// libm call per element on the baseline x86-64 target.
#[inline]
fn quantize(v: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    ((v.clamp(-127.0, 127.0) + MAGIC) - MAGIC) as i8
}

/// Buffers a narrowed matrix passes through before it is packed.
#[derive(Default)]
struct Scratch {
    f16: Vec<f16>,
    bf16: Vec<bf16>,
    i8: Vec<i8>,
    packed_i8: Vec<i8>,
}

/// Which matrix a narrowed copy holds, and so its packed layout.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Packed {
    /// `A` `[rank, in]` → [`ALayout::Panels`].
    A,
    /// `B` `[out, rank]` → [`BLayout::RankOutBlocks`], or [`BLayout::RankQuadBlocks`]
    /// (int8, `rank % 4 == 0`).
    B(BLayout),
}

impl Packed {
    fn pack_into<T: Copy>(self, v: &[T], rows: usize, out: &mut Vec<T>) {
        match self {
            Packed::A => pack_a(v, rows, out),
            Packed::B(BLayout::RankQuadBlocks) => pack_b_quads(v, rows, out),
            Packed::B(_) => pack_b(v, rows, out),
        }
    }
}

/// Where one pair's narrowed `A` and `B` sit (`None`: kept in f32), and how `B` is
/// laid out.
type PairSpans = (Option<Span>, Option<(Span, BLayout)>);

/// The narrowed matrices of one adapter, indexed like its [`LoraWeights`]; a matrix
/// the format keeps in f32 is read from the f32 weights.
#[derive(Clone, Debug, PartialEq)]
pub struct HotWeights {
    format: HotFormat,
    num_layers: usize,
    arenas: Arenas,
    /// Per `(layer, projection)`, its narrowed matrices.
    pairs: Vec<Option<PairSpans>>,
}

impl HotWeights {
    /// Converts every pair of `weights` to `format`.
    pub fn convert(weights: &LoraWeights, format: HotFormat) -> HotWeights {
        let n = Projection::ALL.len();
        let mut pairs = vec![None; weights.num_layers() * n];
        let mut arenas = Arenas::default();
        // One allocation per arena in the usual case (no f16 value out of range).
        let count = |d: LoraDType, size: fn(usize, usize) -> usize| -> usize {
            weights
                .iter()
                .map(|(_, _, p)| {
                    let part = |f: LoraDType, len| if f == d { size(len, p.rank) } else { 0 };
                    part(format.a, p.a.len()) + part(format.b, p.b.len())
                })
                .sum()
        };
        let elements = |len, _| len;
        arenas.f16.reserve_exact(count(LoraDType::F16, elements));
        arenas.bf16.reserve_exact(count(LoraDType::BF16, elements));
        // Codes four to a word, then one word per row scale.
        arenas
            .int8
            .reserve_exact(count(LoraDType::I8, |len, rank| len.div_ceil(4) + rank));
        let mut scratch = Scratch::default();
        let quads = int8_dot_available();
        // `iter` visits layers in order and each layer's projections in
        // `Projection::ALL` order: the forward pass's order.
        for (layer, p, pair) in weights.iter() {
            // Both are stored with the rank as rows: A [rank, in], B transposed.
            let a = arenas.push(&pair.a, pair.rank, format.a, Packed::A, &mut scratch);
            // int8 B in quads where the kernels multiply int8 by int8.
            let b_layout = if format.b == LoraDType::I8 && quads && pair.rank.is_multiple_of(4) {
                BLayout::RankQuadBlocks
            } else {
                BLayout::RankOutBlocks
            };
            let b = arenas
                .push(
                    &pair.b,
                    pair.rank,
                    format.b,
                    Packed::B(b_layout),
                    &mut scratch,
                )
                .map(|span| (span, b_layout));
            pairs[layer * n + p.index()] = Some((a, b));
        }
        HotWeights {
            format,
            num_layers: weights.num_layers(),
            arenas,
            pairs,
        }
    }

    /// The format it was converted to.
    pub fn format(&self) -> HotFormat {
        self.format
    }

    /// Bytes of the converted matrices.
    pub fn bytes(&self) -> u64 {
        self.arenas.bytes()
    }

    /// The kernels' view of `(layer, p)`: the narrowed matrices where there are any,
    /// the f32 ones of `weights` (the weights this was converted from) elsewhere.
    pub fn slot<'a>(
        &'a self,
        weights: &'a LoraWeights,
        layer: usize,
        p: Projection,
    ) -> Option<LoraSlot<'a>> {
        let pair = weights.pair(layer, p)?;
        if layer >= self.num_layers {
            return Some(pair.slot());
        }
        let half = self.pairs[layer * Projection::ALL.len() + p.index()].as_ref();
        let (a, a_layout) = match half.and_then(|h| h.0.as_ref()) {
            Some(a) => (self.arenas.view(a), ALayout::Panels),
            None => (LoraMatrix::F32(&pair.a), ALayout::RowMajor),
        };
        let slot = match half.and_then(|h| h.1.as_ref()) {
            Some((b, b_layout)) => {
                LoraSlot::from_matrices(a, self.arenas.view(b), pair.rank, pair.scale)
                    .with_b_layout(*b_layout)
            }
            None => LoraSlot::from_matrices(a, LoraMatrix::F32(&pair.b), pair.rank, pair.scale),
        };
        Some(slot.with_a_layout(a_layout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::LoraPair;

    fn weights(a: Vec<f32>, b: Vec<f32>) -> LoraWeights {
        let mut w = LoraWeights::empty(2);
        let pair = LoraPair {
            rank: 1,
            scale: 0.5,
            a,
            b,
        };
        w.insert(1, Projection::V, pair).unwrap();
        w
    }

    #[test]
    fn mixed_formats_keep_f32_matrices_in_place() {
        let w = weights(vec![0.1, -0.2, 0.3], vec![1.5, 2.5]);
        let f = HotFormat {
            a: LoraDType::F32,
            b: LoraDType::BF16,
        };
        let h = HotWeights::convert(&w, f);
        assert_eq!(h.bytes(), 2 * 2, "only B is copied");
        let s = h.slot(&w, 1, Projection::V).unwrap();
        assert_eq!(s.a(), LoraMatrix::F32(&[0.1, -0.2, 0.3]));
        assert_eq!(s.b().dtype(), LoraDType::BF16);
        assert_eq!(s.b_layout(), BLayout::RankOutBlocks);
        assert_eq!(s.a_layout(), ALayout::RowMajor, "an f32 A is read in place");
        assert_eq!((s.b_at(0, 0), s.b_at(1, 0)), (Some(1.5), Some(2.5)));
        assert_eq!((s.rank(), s.scale()), (1, 0.5));
        assert!(h.slot(&w, 0, Projection::V).is_none(), "no pair there");
        assert!(HotWeights::convert(&w, HotFormat::F32).bytes() == 0);
    }

    #[test]
    fn f16_falls_back_to_bf16_for_values_out_of_its_range() {
        let w = weights(vec![1e5, 0.0, 1.0], vec![0.25, 0.5]);
        let h = HotWeights::convert(&w, HotFormat::F16);
        let s = h.slot(&w, 1, Projection::V).unwrap();
        assert_eq!(s.a().dtype(), LoraDType::BF16, "1e5 does not fit f16");
        assert_eq!(s.a().get(0), Some(bf16::from_f32(1e5).to_f32()));
        assert_eq!(s.b().dtype(), LoraDType::F16);
        assert_eq!(h.bytes(), (3 + 2) * 2);
    }
}

#[cfg(test)]
mod transpose_tests {
    use super::*;
    use crate::adapter::LoraPair;

    #[test]
    fn narrowed_b_is_transposed_and_reads_back_element_by_element() {
        // rank 2, out 3: B = [[1, 2], [3, 4], [5, 6]].
        let mut w = LoraWeights::empty(1);
        let pair = LoraPair {
            rank: 2,
            scale: 1.0,
            a: vec![0.5; 2 * 4],
            b: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        };
        w.insert(0, Projection::O, pair).unwrap();
        let h = HotWeights::convert(&w, HotFormat::F16);
        let s = h.slot(&w, 0, Projection::O).unwrap();
        assert_eq!(s.b().to_f32_vec(), vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
        for o in 0..3 {
            for j in 0..2 {
                assert_eq!(s.b_at(o, j), Some((o * 2 + j + 1) as f32));
            }
        }
    }
}

#[cfg(test)]
mod int8_tests {
    use super::*;
    use crate::adapter::LoraPair;

    #[test]
    fn int8_rows_round_within_half_a_step_of_their_scale() {
        let mut w = LoraWeights::empty(1);
        let a: Vec<f32> = (0..2 * 5).map(|i| (i as f32 - 4.5) * 0.013).collect();
        let b: Vec<f32> = (0..3 * 2).map(|i| (i as f32 - 2.0) * 0.7).collect();
        let pair = LoraPair {
            rank: 2,
            scale: 1.0,
            a: a.clone(),
            b: b.clone(),
        };
        w.insert(0, Projection::Q, pair).unwrap();
        let h = HotWeights::convert(&w, HotFormat::I8);
        let s = h.slot(&w, 0, Projection::Q).unwrap();
        assert_eq!(s.a().dtype(), LoraDType::I8);
        // Codes padded to whole 4-byte words (10 → 12, 6 → 8), then one f32 per rank row.
        assert_eq!(h.bytes(), (12 + 2 * 4) + (8 + 2 * 4));
        let sa = s.a().row_scales().unwrap();
        for (i, v) in a.iter().enumerate() {
            let got = s.a_at(i / 5, i % 5).unwrap();
            assert!(
                (got - v).abs() <= sa[i / 5] / 2.0 + 1e-7,
                "A[{i}]: {got} vs {v}"
            );
        }
        let sb = s.b().row_scales().unwrap();
        for (i, v) in b.iter().enumerate() {
            let (o, j) = (i / 2, i % 2);
            let got = s.b_at(o, j).unwrap();
            assert!(
                (got - v).abs() <= sb[j] / 2.0 + 1e-7,
                "B[{o}, {j}]: {got} vs {v}"
            );
        }
        // A zero row keeps a zero scale and zeros.
        let mut z = LoraWeights::empty(1);
        let pair = LoraPair {
            rank: 1,
            scale: 1.0,
            a: vec![0.0; 4],
            b: vec![0.0; 3],
        };
        z.insert(0, Projection::K, pair).unwrap();
        let hz = HotWeights::convert(&z, HotFormat::I8);
        let sz = hz.slot(&z, 0, Projection::K).unwrap();
        assert_eq!(sz.a().to_f32_vec(), vec![0.0; 4]);
    }

    #[test]
    fn int8_scales_sit_in_the_stream_between_a_and_b() {
        // Two projections of one layer: each pair is A codes, A scales, B scales, B
        // codes, and the next pair starts right after (codes padded to whole words).
        let mut w = LoraWeights::empty(1);
        for (p, n_in, n_out) in [(Projection::Q, 5, 3), (Projection::K, 8, 7)] {
            let rank = 2;
            let pair = LoraPair {
                rank,
                scale: 1.0,
                a: (0..rank * n_in).map(|i| i as f32 * 0.1 - 0.4).collect(),
                b: (0..n_out * rank).map(|i| 0.3 - i as f32 * 0.05).collect(),
            };
            w.insert(0, p, pair).unwrap();
        }
        let h = HotWeights::convert(&w, HotFormat::I8);
        let addr = |m: LoraMatrix<'_>| match m {
            LoraMatrix::I8 { q, scales } => (
                q.as_ptr() as usize,
                q.len(),
                scales.as_ptr() as usize,
                scales.len(),
            ),
            other => panic!("not int8: {:?}", other.dtype()),
        };
        let mut expected_start = None;
        for p in [Projection::Q, Projection::K] {
            let s = h.slot(&w, 0, p).unwrap();
            let (aq, alen, asc, an) = addr(s.a());
            let (bq, blen, bsc, bn) = addr(s.b());
            if let Some(start) = expected_start {
                assert_eq!(aq, start, "{p:?} starts right after the previous pair");
            }
            assert_eq!(
                asc,
                aq + alen.next_multiple_of(4),
                "{p:?}: A's scales after A"
            );
            assert_eq!(bsc, asc + 4 * an, "{p:?}: B's scales after A's");
            assert_eq!(bq, bsc + 4 * bn, "{p:?}: B's codes after B's scales");
            expected_start = Some(bq + blen.next_multiple_of(4));
        }
        assert_eq!(
            h.bytes() as usize,
            expected_start.unwrap() - addr(h.slot(&w, 0, Projection::Q).unwrap().a()).0
        );
    }

    #[test]
    fn int8_b_of_rank_divisible_by_four_is_packed_for_the_integer_dot_path() {
        // rank 4 (quads where the CPU has VNNI) and rank 2 (never).
        let mut w = LoraWeights::empty(1);
        for (p, rank) in [(Projection::Up, 4), (Projection::Down, 2)] {
            let (n_in, n_out) = (16, 70);
            let pair = LoraPair {
                rank,
                scale: 1.0,
                a: (0..rank * n_in).map(|i| (i % 7) as f32 - 3.0).collect(),
                b: (0..n_out * rank).map(|i| (i % 5) as f32 * 0.1).collect(),
            };
            w.insert(0, p, pair).unwrap();
        }
        let h = HotWeights::convert(&w, HotFormat::I8);
        let quads = h.slot(&w, 0, Projection::Up).unwrap();
        let want = if int8_dot_available() {
            BLayout::RankQuadBlocks
        } else {
            BLayout::RankOutBlocks
        };
        assert_eq!(quads.b_layout(), want);
        let plain = h.slot(&w, 0, Projection::Down).unwrap();
        assert_eq!(plain.b_layout(), BLayout::RankOutBlocks);
        // Either way B reads back element by element within half a step.
        for (s, rank) in [(quads, 4), (plain, 2)] {
            let sb = s.b().row_scales().unwrap();
            for o in 0..70 {
                for (j, step) in sb.iter().enumerate().take(rank) {
                    let v = ((o * rank + j) % 5) as f32 * 0.1;
                    let got = s.b_at(o, j).unwrap();
                    assert!((got - v).abs() <= step / 2.0 + 1e-7, "B[{o}, {j}]");
                }
            }
        }
    }
}
