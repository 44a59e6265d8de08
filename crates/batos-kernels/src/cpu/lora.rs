//! Batched multi-LoRA kernels: every token of one mixed batch picks its own adapter
//! (`Option<SlotIdx>`), and the low-rank update `y += scale · (x · Aᵀ) · Bᵀ` is added
//! to the base projection's output.
//!
//! Two shapes of the same computation, as in Punica/S-LoRA:
//! - [`bgmv`] gathers by slot token by token (decode: one token per sequence);
//! - [`sgmv`] works on [`LoraSegment`]s, runs of consecutive tokens sharing a slot
//!   (prefill).
//!
//! Both run on one engine, [`apply_fused`]: it groups the batch's tokens by slot (so
//! tokens of one adapter share each load of its rows, wherever they sit in the batch),
//! and applies every projection of a group that shares its input (q, k and v read the
//! same normed hidden state; gate and up too) in one pass, accumulating straight into
//! the columns of the fused projection output. [`shrink`] and [`expand`] expose the two
//! halves separately (`h = x · Aᵀ`, then `y += scale · h · Bᵀ`). Slots may have
//! different ranks in one batch; tokens whose slot is `None` are not touched and cost
//! nothing.
//!
//! Hot slots hold `A` and `B` as f32, f16 or bf16 ([`LoraMatrix`]); activations and
//! accumulation are always f32. Half-precision slots halve the bytes a decode step
//! streams, which is what multi-adapter decode is bound by.
//!
//! [`reference`](mod@reference) is the scalar specification (f64 accumulation over the
//! widened matrices); the functions at this level validate their arguments identically and
//! then run AVX2/FMA/F16C code when the CPU has it (detected at run time), else a
//! scalar f32 path. The fast path computes each token's result the same way whatever
//! else is in the batch, so a mixed batch gives every token exactly what it gets alone.

use crate::cpu::check::{len_eq, rows};
use crate::error::{KernelError, Result};
use batos_types::SlotIdx;
use half::{bf16, f16};
use std::borrow::Cow;

mod layout;
pub use layout::{a_offset, b_offset, pack_a, pack_b, pack_b_quads, ALayout};

/// The element type of a hot slot's `A` or `B`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LoraDType {
    F32,
    /// IEEE half: 11 significant bits, values up to 65504.
    F16,
    /// bfloat16: 8 significant bits, f32's range.
    BF16,
    /// Symmetric int8 per row (see [`LoraMatrix::I8`]): a quarter of f32's bytes.
    I8,
}

impl LoraDType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            LoraDType::F32 => 4,
            LoraDType::F16 | LoraDType::BF16 => 2,
            LoraDType::I8 => 1,
        }
    }
}

impl std::fmt::Display for LoraDType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoraDType::F32 => "f32",
            LoraDType::F16 => "f16",
            LoraDType::BF16 => "bf16",
            LoraDType::I8 => "i8",
        })
    }
}

/// A borrowed row-major matrix of a hot slot in one of the [`LoraDType`]s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LoraMatrix<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// Symmetric int8 with one f32 scale per rank row: the element at `A[j, i]` or
    /// `B[o, j]` is `q · scales[j]`. The kernels fold the row scales into the
    /// rank-sized intermediate, so a `B` in int8 must be stored with the rank as rows
    /// ([`BLayout::RankOut`] or [`BLayout::RankOutBlocks`]). [`LoraMatrix::get`] reads
    /// the row-major layout (row `i / (len / scales.len())`).
    I8 {
        q: &'a [i8],
        scales: &'a [f32],
    },
}

impl<'a> LoraMatrix<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            LoraMatrix::F32(s) => s.len(),
            LoraMatrix::F16(s) => s.len(),
            LoraMatrix::BF16(s) => s.len(),
            LoraMatrix::I8 { q, .. } => q.len(),
        }
    }

    /// The per-row scales of an [`LoraMatrix::I8`] matrix.
    pub fn row_scales(&self) -> Option<&'a [f32]> {
        match self {
            LoraMatrix::I8 { scales, .. } => Some(scales),
            _ => None,
        }
    }

    /// Whether the matrix has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The element type.
    pub fn dtype(&self) -> LoraDType {
        match self {
            LoraMatrix::F32(_) => LoraDType::F32,
            LoraMatrix::F16(_) => LoraDType::F16,
            LoraMatrix::BF16(_) => LoraDType::BF16,
            LoraMatrix::I8 { .. } => LoraDType::I8,
        }
    }

    /// Element `i` widened to f32, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<f32> {
        match self {
            LoraMatrix::F32(s) => s.get(i).copied(),
            LoraMatrix::F16(s) => s.get(i).map(|v| v.to_f32()),
            LoraMatrix::BF16(s) => s.get(i).map(|v| v.to_f32()),
            LoraMatrix::I8 { q, scales } => {
                let row_len = q.len() / scales.len().max(1);
                let v = *q.get(i)?;
                Some(v as f32 * scales.get(i / row_len.max(1))?)
            }
        }
    }

    /// The address of the first element: an identity for caches that must notice when
    /// a slot's weights are replaced (never dereferenced).
    pub fn data_addr(&self) -> usize {
        match self {
            LoraMatrix::F32(v) => v.as_ptr() as usize,
            LoraMatrix::F16(v) => v.as_ptr() as usize,
            LoraMatrix::BF16(v) => v.as_ptr() as usize,
            LoraMatrix::I8 { q, .. } => q.as_ptr() as usize,
        }
    }

    /// The element at storage offset `i`, which belongs to rank row `row`, widened to
    /// f32 (int8 scaled by that row's scale); `None` past the end.
    fn at_row(&self, i: usize, row: usize) -> Option<f32> {
        match self {
            LoraMatrix::I8 { q, scales } => Some(*q.get(i)? as f32 * scales.get(row)?),
            other => other.get(i),
        }
    }

    /// Every element widened to f32, in storage order.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            LoraMatrix::F32(s) => s.to_vec(),
            LoraMatrix::F16(s) => s.iter().map(|v| v.to_f32()).collect(),
            LoraMatrix::BF16(s) => s.iter().map(|v| v.to_f32()).collect(),
            LoraMatrix::I8 { .. } => (0..self.len()).filter_map(|i| self.get(i)).collect(),
        }
    }
}

impl<'a> From<&'a [f32]> for LoraMatrix<'a> {
    fn from(s: &'a [f32]) -> Self {
        LoraMatrix::F32(s)
    }
}

impl<'a> From<&'a [f16]> for LoraMatrix<'a> {
    fn from(s: &'a [f16]) -> Self {
        LoraMatrix::F16(s)
    }
}

impl<'a> From<&'a [bf16]> for LoraMatrix<'a> {
    fn from(s: &'a [bf16]) -> Self {
        LoraMatrix::BF16(s)
    }
}

/// How a slot's `B` is laid out in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum BLayout {
    /// `[out, rank]` row-major: PEFT's `lora_B.weight` as stored.
    #[default]
    OutRank,
    /// `[rank, out]` row-major (B transposed): the expand streams out-wide rows and
    /// needs no horizontal sums.
    RankOut,
    /// `[rank, out]` in column blocks (the hot copies' layout): the columns in blocks
    /// of 64 (then of 8, then the rest), each block `[rank][width]` in the place its
    /// columns take in `[out, rank]` order, so the expand reads one sequential stream
    /// (see [`b_offset`]).
    RankOutBlocks,
    /// `[rank, out]` in the column blocks of [`BLayout::RankOutBlocks`], each block
    /// `[rank / 4][width][4]`: four rank rows of one output side by side, the bytes one
    /// `vpdpbusd` lane sums (needs `rank % 4 == 0`). An int8 slot whose `B` is stored
    /// this way runs the **integer-dot path** where the CPU has AVX-512 VNNI
    /// ([`int8_dot_available`]): the shrink takes each token's input quantised to int8
    /// per group of 32 (as the int4 base's activations are) and the expand the
    /// rank-sized intermediate quantised per token, so the int8 matrices are
    /// multiplied without widening. Elsewhere the slot runs the float path.
    RankQuadBlocks,
}

/// Whether this CPU runs the integer-dot path of int8 slots stored with
/// [`BLayout::RankQuadBlocks`] (AVX2, FMA, F16C and AVX-512 F, VL and VNNI).
pub fn int8_dot_available() -> bool {
    crate::cpu::int4_dot::DotPath::Avx512Vnni.is_available()
}

/// One hot adapter's matrices for one projection: `A [rank, in]`, `B [out, rank]`
/// (PEFT's `lora_A.weight` / `lora_B.weight`; `B` may be stored transposed, see
/// [`BLayout`]), and the scale `alpha / r` (or `alpha / sqrt(r)` for rsLoRA).
#[derive(Clone, Copy, Debug)]
pub struct LoraSlot<'a> {
    a: LoraMatrix<'a>,
    b: LoraMatrix<'a>,
    a_layout: ALayout,
    b_layout: BLayout,
    rank: usize,
    scale: f32,
}

impl<'a> LoraSlot<'a> {
    /// Wraps f32 `a` (`[rank, in]`) and `b` (`[out, rank]`); lengths are checked
    /// against a projection's shape when the slot is put in a [`LoraSlots`] table.
    pub fn new(a: &'a [f32], b: &'a [f32], rank: usize, scale: f32) -> Self {
        LoraSlot::from_matrices(a.into(), b.into(), rank, scale)
    }

    /// Wraps `a` and `b` in any element types (they may differ: an f32 `A` with a
    /// bf16 `B` is fine).
    pub fn from_matrices(a: LoraMatrix<'a>, b: LoraMatrix<'a>, rank: usize, scale: f32) -> Self {
        LoraSlot {
            a,
            b,
            a_layout: ALayout::RowMajor,
            b_layout: BLayout::OutRank,
            rank,
            scale,
        }
    }

    /// The same slot with `A` read in `layout` (its length is the same either way).
    pub fn with_a_layout(self, layout: ALayout) -> Self {
        LoraSlot {
            a_layout: layout,
            ..self
        }
    }

    /// How `A` is laid out.
    pub fn a_layout(&self) -> ALayout {
        self.a_layout
    }

    /// Element `(j, i)` of `A` (`j < rank`, `i < in`) widened to f32, whatever the
    /// layout; `None` outside the matrix.
    pub fn a_at(&self, j: usize, i: usize) -> Option<f32> {
        let n_in = self.a.len() / self.rank.max(1);
        if j >= self.rank || i >= n_in {
            return None;
        }
        self.a
            .at_row(a_offset(self.a_layout, self.rank, n_in, j, i), j)
    }

    /// `A` as row-major f32 `[rank, in]`, borrowed when it is stored that way.
    pub fn a_rows_f32(&self) -> Cow<'a, [f32]> {
        if let (LoraMatrix::F32(v), ALayout::RowMajor) = (self.a, self.a_layout) {
            return Cow::Borrowed(v);
        }
        let mut v = vec![0f32; self.a.len()];
        self.write_a_rows_f32(&mut v);
        Cow::Owned(v)
    }

    /// `Bᵀ` as row-major f32 `[rank, out]`, borrowed when it is stored that way.
    pub fn bt_rows_f32(&self) -> Cow<'a, [f32]> {
        if let (LoraMatrix::F32(v), BLayout::RankOut) = (self.b, self.b_layout) {
            return Cow::Borrowed(v);
        }
        let mut v = vec![0f32; self.b.len()];
        self.write_bt_rows_f32(&mut v);
        Cow::Owned(v)
    }

    /// [`LoraSlot::a_rows_f32`] written into `out` (`rank · in` floats), with no
    /// allocation (a device slot write stages rows straight into page-locked memory).
    pub fn write_a_rows_f32(&self, out: &mut [f32]) {
        let rows = match self.a_layout {
            ALayout::RowMajor => RankRows::Stored,
            ALayout::Panels => RankRows::PanelsA,
        };
        widen_rank_rows_into(self.a, self.rank, rows, out)
    }

    /// [`LoraSlot::bt_rows_f32`] written into `out` (`rank · out` floats).
    pub fn write_bt_rows_f32(&self, out: &mut [f32]) {
        let rows = match self.b_layout {
            BLayout::RankOut => RankRows::Stored,
            BLayout::RankOutBlocks => RankRows::BlocksBt,
            BLayout::RankQuadBlocks => RankRows::QuadsBt,
            // [out, rank]: transposed element by element.
            BLayout::OutRank => {
                assert_eq!(out.len(), self.b.len(), "write_bt_rows_f32: output length");
                let n_out = self.b.len() / self.rank.max(1);
                for (i, o) in out.iter_mut().enumerate() {
                    *o = self.b_at(i % n_out.max(1), i / n_out.max(1)).unwrap_or(0.0);
                }
                return;
            }
        };
        widen_rank_rows_into(self.b, self.rank, rows, out)
    }

    /// The same slot with `B` read in `layout` (its length is the same either way).
    pub fn with_b_layout(self, layout: BLayout) -> Self {
        LoraSlot {
            b_layout: layout,
            ..self
        }
    }

    /// How `B` is laid out.
    pub fn b_layout(&self) -> BLayout {
        self.b_layout
    }

    /// Element `(o, j)` of `B` (`o < out`, `j < rank`) widened to f32, whatever the
    /// layout; `None` outside the matrix.
    pub fn b_at(&self, o: usize, j: usize) -> Option<f32> {
        if j >= self.rank {
            return None;
        }
        let out = self.b.len() / self.rank;
        if o >= out {
            return None;
        }
        self.b
            .at_row(b_offset(self.b_layout, self.rank, out, o, j), j)
    }

    /// The adapter's rank for this projection.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The scale applied to the update.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// `A`, `[rank, in]` (see [`LoraSlot::a_layout`]).
    pub fn a(&self) -> LoraMatrix<'a> {
        self.a
    }

    /// `B`, `[out, rank]` or `[rank, out]` (see [`LoraSlot::b_layout`]).
    pub fn b(&self) -> LoraMatrix<'a> {
        self.b
    }
}

/// How a stored matrix's elements map to rank-major rows (`[rank, in]` for `A`,
/// `[rank, out]` for `Bᵀ`).
#[derive(Clone, Copy)]
enum RankRows {
    /// Already rank-major.
    Stored,
    /// `A` in [`ALayout::Panels`].
    PanelsA,
    /// `Bᵀ` in [`BLayout::RankOutBlocks`].
    BlocksBt,
    /// `Bᵀ` in [`BLayout::RankQuadBlocks`].
    QuadsBt,
}

/// Calls `run(from, to, len)` for each run of elements that is contiguous both in a
/// stored matrix of `len` elements and `rank` rows, and in its rank-major order: `from`
/// indexes the stored order, `to` the rank-major one. A run never spans two rows.
fn rank_runs(rows: RankRows, rank: usize, len: usize, mut run: impl FnMut(usize, usize, usize)) {
    let n = len / rank.max(1);
    match rows {
        RankRows::Stored => {
            for j in 0..rank {
                run(j * n, j * n, n);
            }
        }
        RankRows::PanelsA => {
            let full = n / 8 * 8;
            let mut pos = 0;
            for j0 in (0..rank).step_by(layout::PANEL) {
                let panel = layout::PANEL.min(rank - j0);
                for i in (0..full).step_by(8) {
                    for k in 0..panel {
                        run(pos, (j0 + k) * n + i, 8);
                        pos += 8;
                    }
                }
                for k in 0..panel {
                    if n > full {
                        run(pos, (j0 + k) * n + full, n - full);
                    }
                    pos += n - full;
                }
            }
        }
        RankRows::BlocksBt => {
            let (mut pos, mut o) = (0, 0);
            while o < n {
                let (o0, w) = layout::bt_block(n, o);
                for c in 0..rank {
                    run(pos, c * n + o0, w);
                    pos += w;
                }
                o = o0 + w;
            }
        }
        RankRows::QuadsBt => {
            for o in 0..n {
                for j in 0..rank {
                    run(
                        b_offset(BLayout::RankQuadBlocks, rank, n, o, j),
                        j * n + o,
                        1,
                    );
                }
            }
        }
    }
}

/// `m` as rank-major f32 rows (int8 row scales applied) into `out` (`m.len()`
/// floats), run by run: half-precision runs convert whole (`half`'s F16C slice conversion, detected once per run, where `to_f32`
/// detects and converts one value at a time).
fn widen_rank_rows_into(m: LoraMatrix<'_>, rank: usize, rows: RankRows, out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    assert_eq!(out.len(), m.len(), "widen_rank_rows_into: output length");
    let n = (m.len() / rank.max(1)).max(1);
    match m {
        LoraMatrix::F32(v) => rank_runs(rows, rank, v.len(), |s, d, l| {
            out[d..d + l].copy_from_slice(&v[s..s + l])
        }),
        LoraMatrix::F16(v) => rank_runs(rows, rank, v.len(), |s, d, l| {
            v[s..s + l].convert_to_f32_slice(&mut out[d..d + l])
        }),
        LoraMatrix::BF16(v) => rank_runs(rows, rank, v.len(), |s, d, l| {
            v[s..s + l].convert_to_f32_slice(&mut out[d..d + l])
        }),
        LoraMatrix::I8 { q, scales } => rank_runs(rows, rank, q.len(), |s, d, l| {
            let sc = scales[d / n];
            for (o, &c) in out[d..d + l].iter_mut().zip(&q[s..s + l]) {
                *o = c as f32 * sc;
            }
        }),
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
    /// `A` must be `[rank, in]`, `B` `[out, rank]` (int8 with one row scale per rank
    /// row), rank ≥ 1 and the scale finite. It reads the slots' shapes, never their
    /// values: `A`, `B` and int8 row scales are data, checked finite when an adapter
    /// is audited (`batos-lora`), not on every call (a forward step builds a table
    /// per projection and layer, and a scan of every slot's row scales there cost a
    /// 64-adapter decode step 1.5–2 ms of cache misses).
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
            let scales_bad = |what: &'static str, reason: String| KernelError::InvalidShape {
                op,
                what,
                reason: format!("slot {i}: {reason}"),
            };
            for (what, m) in [("A", s.a), ("B", s.b)] {
                let Some(sc) = m.row_scales() else { continue };
                if sc.len() != s.rank {
                    return Err(scales_bad(
                        what,
                        format!(
                            "{} i8 row scales, expected one per rank row ({})",
                            sc.len(),
                            s.rank
                        ),
                    ));
                }
            }
            if s.b_layout == BLayout::RankQuadBlocks && !s.rank.is_multiple_of(4) {
                return Err(KernelError::InvalidShape {
                    op,
                    what: "B",
                    reason: format!(
                        "slot {i}: rank {} in BLayout::RankQuadBlocks, which needs a \
                         multiple of 4",
                        s.rank
                    ),
                });
            }
            if s.b.row_scales().is_some() && s.b_layout == BLayout::OutRank {
                return Err(scales_bad(
                    "B",
                    "an i8 B must be stored with the rank as rows (BLayout::RankOut or \
                     RankOutBlocks)"
                        .into(),
                ));
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

    /// Every slot, filled or not.
    pub fn slots(&self) -> &'a [Option<LoraSlot<'a>>] {
        self.slots
    }

    /// The adapter in `slot`, or a typed error when the slot is outside the table or
    /// empty (a token must never name an empty slot).
    pub fn get(&self, op: &'static str, slot: SlotIdx) -> Result<LoraSlot<'a>> {
        match self.lookup(op, slot)? {
            Some(s) => Ok(s),
            None => Err(KernelError::InvalidShape {
                op,
                what: "slot",
                reason: format!("slot {} is empty", slot.0),
            }),
        }
    }

    /// The adapter in `slot` if it adapts this projection (`None`: it does not, or the
    /// slot is empty); a typed error when the slot is outside the table.
    pub fn lookup(&self, op: &'static str, slot: SlotIdx) -> Result<Option<LoraSlot<'a>>> {
        match self.slots.get(slot.index()) {
            Some(s) => Ok(*s),
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

/// One projection of a group that shares its input (`q`, `k` and `v` read the same
/// normed hidden state): its slot table, and where its `out_features` columns start in
/// each row of the fused output the group writes (`q` at 0, `k` after `q`, …).
#[derive(Clone, Copy, Debug)]
pub struct LoraTarget<'a> {
    slots: LoraSlots<'a>,
    column: usize,
}

impl<'a> LoraTarget<'a> {
    /// `slots`, writing output columns `column..column + slots.out_features()`.
    pub fn new(slots: LoraSlots<'a>, column: usize) -> Self {
        LoraTarget { slots, column }
    }

    /// The projection's slot table.
    pub fn slots(&self) -> &LoraSlots<'a> {
        &self.slots
    }

    /// The first output column it writes.
    pub fn column(&self) -> usize {
        self.column
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

fn segment_tokens(t: usize, segs: &[LoraSegment]) -> Vec<Option<SlotIdx>> {
    let mut tokens = vec![None; t];
    for s in segs {
        tokens[s.start..s.start + s.len].fill(Some(s.slot));
    }
    tokens
}

/// Checks a fused call; returns T. Every target reads `x` (so all share
/// `in_features`), writes its columns inside rows of `y_width`, and every token's slot
/// lies inside every table (a `None` entry there means "not adapted", not an error).
pub(crate) fn check_fused(
    op: &'static str,
    x: &[f32],
    tokens: &[Option<SlotIdx>],
    targets: &[LoraTarget<'_>],
    y_len: usize,
    y_width: usize,
) -> Result<usize> {
    let Some(first) = targets.first() else {
        return Err(KernelError::InvalidShape {
            op,
            what: "targets",
            reason: "no projection to apply".into(),
        });
    };
    let n_in = first.slots.in_features;
    let t = rows(op, "x", x.len(), n_in)?;
    len_eq(op, "token slots", tokens.len(), t)?;
    if y_width == 0 {
        return Err(KernelError::InvalidShape {
            op,
            what: "y_width",
            reason: "the fused output rows have zero width".into(),
        });
    }
    len_eq(op, "y", y_len, t * y_width)?;
    for (k, g) in targets.iter().enumerate() {
        if g.slots.in_features != n_in {
            return Err(KernelError::InvalidShape {
                op,
                what: "targets",
                reason: format!(
                    "target {k} reads {} inputs but target 0 reads {n_in}: a group shares x",
                    g.slots.in_features
                ),
            });
        }
        let end = g.column.checked_add(g.slots.out_features);
        if end.is_none_or(|e| e > y_width) {
            return Err(KernelError::InvalidShape {
                op,
                what: "targets",
                reason: format!(
                    "target {k} writes columns {}..{}+{} past rows of {y_width}",
                    g.column, g.column, g.slots.out_features
                ),
            });
        }
        for s in tokens.iter().flatten() {
            g.slots.lookup(op, *s)?;
        }
    }
    Ok(t)
}

// ---------------------------------------------------------------------------------

/// Scalar kernels: the specification. Dot products accumulate in f64 over the
/// matrices widened to f32.
pub mod reference {
    use super::*;

    /// `Σ x[i]·A[j, i]` in f64, in either layout of `A`.
    fn dot_a(x: &[f32], s: &LoraSlot<'_>, j: usize) -> f64 {
        x.iter()
            .enumerate()
            .map(|(i, &p)| p as f64 * s.a_at(j, i).unwrap_or(0.0) as f64)
            .sum()
    }

    /// `Σ_j h[j]·B[o, j]` in f64, in either layout of `B`.
    fn dot_b(h: &[f32], s: &LoraSlot<'_>, o: usize) -> f64 {
        h.iter()
            .enumerate()
            .map(|(j, &p)| p as f64 * s.b_at(o, j).unwrap_or(0.0) as f64)
            .sum()
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
                h[i * r_max + j] = dot_a(xi, &s, j) as f32;
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
                let d = dot_b(hi, &s, o);
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
        bgmv(x, &segment_tokens(t, segs), slots, y)
    }

    /// [`super::apply_fused`]: for every target and every token whose slot the target's
    /// table fills, `y[t, column..column + out] += scale · (x[t] · Aᵀ) · Bᵀ`.
    pub fn apply_fused(
        x: &[f32],
        tokens: &[Option<SlotIdx>],
        targets: &[LoraTarget<'_>],
        y: &mut [f32],
        y_width: usize,
    ) -> Result<()> {
        let op = "lora::apply_fused";
        check_fused(op, x, tokens, targets, y.len(), y_width)?;
        let n_in = targets[0].slots.in_features;
        for g in targets {
            let n_out = g.slots.out_features;
            for (i, s) in tokens.iter().enumerate() {
                let Some(s) = s else { continue };
                let Some(s) = g.slots.lookup(op, *s)? else {
                    continue;
                };
                let xi = &x[i * n_in..(i + 1) * n_in];
                let h: Vec<f32> = (0..s.rank).map(|j| dot_a(xi, &s, j) as f32).collect();
                let row = &mut y[i * y_width + g.column..i * y_width + g.column + n_out];
                for (o, yv) in row.iter_mut().enumerate() {
                    *yv += (s.scale as f64 * dot_b(&h, &s, o)) as f32;
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------
// Fast path.

/// Tokens per task: a task's `h` stays in L1 and each adapter row it loads serves
/// this many tokens.
const TILE: usize = 8;
/// Chunks the tasks are cut into per thread (see `fused`).
const CHUNKS_PER_THREAD: usize = 16;
/// Below this many multiply-adds the work stays on the calling thread.
const PAR_MIN_MACS: usize = 1 << 18;

/// An element type a hot slot may hold: loads eight lanes at a time on the AVX2 path
/// (`simd::Elem`), widens one at a time on the scalar path.
trait SlotElem: super::simd::Elem {
    fn to_f32(self) -> f32;
    /// The slice as int8 codes when the type is `i8` (the integer-dot path).
    fn as_i8(_: &[Self]) -> Option<&[i8]> {
        None
    }
}

impl SlotElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl SlotElem for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

impl SlotElem for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl SlotElem for i8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    fn as_i8(s: &[i8]) -> Option<&[i8]> {
        Some(s)
    }
}

/// Inputs per quantisation group of the integer-dot shrink (the int4 base's size).
const XQ_GROUP: usize = 32;

/// Rows quantised to int8 per group as the int4 base's activations are
/// (`cpu::int4_dot`): values `[n, width]`, and per row and group the scale `d` (the
/// values stand for `d · x8`) and the integer sum `σ8`. Refilled in place.
#[derive(Default)]
struct QuantRows {
    width: usize,
    group: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    sum: Vec<i32>,
}

impl QuantRows {
    fn fill<'r>(
        &mut self,
        rows: impl ExactSizeIterator<Item = &'r [f32]>,
        width: usize,
        group: usize,
    ) {
        let n = rows.len();
        let groups = width.div_ceil(group);
        self.width = width;
        self.group = group;
        self.q.resize(n * width, 0);
        self.d.resize(n * groups, 0.0);
        self.sum.resize(n * groups, 0);
        for (t, x) in rows.enumerate() {
            for g in 0..groups {
                let cols = g * group..((g + 1) * group).min(width);
                let (d, s) = super::int4_dot::quantize_group(
                    &x[cols.clone()],
                    &mut self.q[t * width + cols.start..t * width + cols.end],
                );
                self.d[t * groups + g] = d;
                self.sum[t * groups + g] = s;
            }
        }
    }

    fn groups(&self) -> usize {
        self.width.div_ceil(self.group)
    }

    /// Row `t`.
    fn row(&self, t: usize) -> XRow<'_> {
        let g = self.groups();
        XRow {
            q: &self.q[t * self.width..(t + 1) * self.width],
            d: &self.d[t * g..(t + 1) * g],
            sum: &self.sum[t * g..(t + 1) * g],
        }
    }
}

/// One token's input as int8 per group of [`XQ_GROUP`]: values, and per group the
/// scale `d` and the sum `σ8`.
#[derive(Clone, Copy, Default)]
struct XRow<'a> {
    q: &'a [i8],
    d: &'a [f32],
    sum: &'a [i32],
}

/// Where the integer-dot shrink gets a call's inputs as int8: quantised per task
/// (`None`), or the base matmul's quantisation of the same `x` (`[T, in]`, groups of
/// [`XQ_GROUP`], unpadded; the same bits).
type SharedX<'a> = Option<&'a super::int4_dot::Int8Activations>;

/// Token `t`'s row of the shared activations.
fn shared_row(acts: &super::int4_dot::Int8Activations, t: usize) -> XRow<'_> {
    let (q, d, sum) = acts
        .token_row(t)
        .expect("shared activations: unpadded, token in range");
    XRow { q, d, sum }
}

/// Per-thread buffers of the integer-dot path: the task's inputs and intermediate as
/// int8 (reused task after task: a decode task is a few microseconds).
#[derive(Default)]
struct DotScratch {
    xq: QuantRows,
    hq: QuantRows,
}

thread_local! {
    static DOT_SCRATCH: std::cell::RefCell<DotScratch> = std::cell::RefCell::default();
}

// The AVX2 loads of int8 rows (without their row scale, which the kernels fold into
// the rank-sized intermediate).
#[cfg(target_arch = "x86_64")]
impl super::simd::Elem for i8 {
    #[inline(always)]
    unsafe fn load8(p: *const i8) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller guarantees 8 readable bytes and AVX2.
        unsafe {
            let v = _mm_loadl_epi64(p as *const __m128i);
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
        }
    }
    fn widen(self) -> f32 {
        self as f32
    }
}
#[cfg(not(target_arch = "x86_64"))]
impl super::simd::Elem for i8 {}

/// Runs `$body` with `$s` bound to the typed slice inside a [`LoraMatrix`]
/// (monomorphising the body per element type; int8 row scales are read separately).
macro_rules! with_matrix {
    ($m:expr, $s:ident => $body:expr) => {
        match $m {
            LoraMatrix::F32($s) => $body,
            LoraMatrix::F16($s) => $body,
            LoraMatrix::BF16($s) => $body,
            LoraMatrix::I8 { q: $s, .. } => $body,
        }
    };
}

/// The factor `h[·, j]` is multiplied by after the shrink: the slot's scale and the
/// int8 row scales of `A` row `j` and transposed-`B` row `j`.
#[derive(Clone, Copy)]
struct Fold<'s> {
    scale: f32,
    a: Option<&'s [f32]>,
    b: Option<&'s [f32]>,
}

impl Fold<'_> {
    /// The slot's scale and its int8 row scales, if any.
    fn of<'s>(s: &LoraSlot<'s>) -> Fold<'s> {
        Fold {
            scale: s.scale,
            a: s.a.row_scales(),
            b: s.b.row_scales(),
        }
    }

    #[inline]
    fn at(&self, j: usize) -> f32 {
        let mut f = self.scale;
        if let Some(a) = self.a {
            f *= a[j];
        }
        if let Some(b) = self.b {
            f *= b[j];
        }
        f
    }

    /// Scales `h` (`[n, r]`).
    fn apply(&self, h: &mut [f32], r: usize) {
        for row in h.chunks_exact_mut(r) {
            for (j, v) in row.iter_mut().enumerate() {
                *v *= self.at(j);
            }
        }
    }
}

fn simd_available() -> bool {
    super::simd::Avx2::detect().is_some()
}

/// Up to [`TILE`] tokens of one slot, and their rows of the fused output.
struct Task<'y> {
    slot: SlotIdx,
    n: usize,
    tokens: [usize; TILE],
    rows: [&'y mut [f32]; TILE],
}

/// The engine behind every public entry point; arguments are validated.
fn fused(
    (x, shared): (&[f32], SharedX<'_>),
    tokens: &[Option<SlotIdx>],
    targets: &[LoraTarget<'_>],
    y: &mut [f32],
    y_width: usize,
) {
    let n_in = targets[0].slots.in_features;
    // Group the tokens by slot (a counting sort keeps each slot's tokens in order).
    let n_slots = tokens
        .iter()
        .flatten()
        .map(|s| s.index() + 1)
        .max()
        .unwrap_or(0);
    if n_slots == 0 {
        return;
    }
    let mut start = vec![0usize; n_slots + 1];
    for s in tokens.iter().flatten() {
        start[s.index() + 1] += 1;
    }
    for i in 0..n_slots {
        start[i + 1] += start[i];
    }
    let mut next = start.clone();
    let mut order = vec![0usize; start[n_slots]];
    for (t, s) in tokens.iter().enumerate() {
        if let Some(s) = s {
            order[next[s.index()]] = t;
            next[s.index()] += 1;
        }
    }
    // Hand every token's output row to the one task that owns the token.
    let mut rows: Vec<Option<&mut [f32]>> = y.chunks_exact_mut(y_width).map(Some).collect();
    let mut tasks: Vec<Task<'_>> = Vec::new();
    let mut macs = 0usize;
    for s in 0..n_slots {
        let slot = SlotIdx(s as u16);
        let per_token: usize = targets
            .iter()
            .filter_map(|g| {
                let sl = g.slots.slots.get(s).copied().flatten()?;
                Some(sl.rank * (n_in + g.slots.out_features))
            })
            .sum();
        for chunk in order[start[s]..start[s + 1]].chunks(TILE) {
            let mut task = Task {
                slot,
                n: chunk.len(),
                tokens: [0; TILE],
                rows: std::array::from_fn(|_| <&mut [f32]>::default()),
            };
            for (i, &t) in chunk.iter().enumerate() {
                task.tokens[i] = t;
                task.rows[i] = rows[t].take().unwrap_or_default();
            }
            macs += per_token * chunk.len();
            tasks.push(task);
        }
    }
    let paths = (simd_available(), int8_dot_available());
    let run = |chunk: &mut [Task<'_>]| run_tasks(paths, (x, shared), n_in, targets, chunk);
    if macs >= PAR_MIN_MACS && tasks.len() > 1 {
        // Chunks of a few tasks: a decode task is one token, small to hand out alone,
        // but the threads finish together only if the last chunks are small (the
        // idle thread's wait is spent spinning).
        let mut per = tasks
            .len()
            .div_ceil(super::par::num_threads() * CHUNKS_PER_THREAD)
            .max(1);
        if paths.1 && tasks.iter().filter(|t| t.n == 1).count() > 1 {
            // Whole groups of interleaved one-token tasks per chunk (`run_tasks`).
            per = per.next_multiple_of(WAYS);
        }
        super::par::for_each_chunk_mut(&mut tasks, per, &|_, chunk| run(chunk));
    } else {
        run(&mut tasks);
    }
}

/// One-token tasks whose adapters run the integer-dot path run up to this many at a
/// time, their adapters' streams interleaved (`run_ways`).
const WAYS: usize = 4;

/// Runs `tasks` in order: a run of up to [`WAYS`] one-token tasks that can interleave
/// (`interleavable`) together, any other task on its own.
fn run_tasks(
    paths: (bool, bool),
    x: (&[f32], SharedX<'_>),
    n_in: usize,
    targets: &[LoraTarget<'_>],
    tasks: &mut [Task<'_>],
) {
    let mut rest = tasks;
    while !rest.is_empty() {
        let k = if paths.1 {
            interleavable(n_in, targets, rest)
        } else {
            0
        };
        let (group, tail) = rest.split_at_mut(k.max(1));
        #[cfg(target_arch = "x86_64")]
        match group {
            [_, _] => run_ways::<2>(x, n_in, targets, group),
            [_, _, _] => run_ways::<3>(x, n_in, targets, group),
            [_, _, _, _] => run_ways::<4>(x, n_in, targets, group),
            _ => group
                .iter_mut()
                .for_each(|t| run_task(paths, x, n_in, targets, t)),
        }
        #[cfg(not(target_arch = "x86_64"))]
        group
            .iter_mut()
            .for_each(|t| run_task(paths, x, n_in, targets, t));
        rest = tail;
    }
}

/// How many of the first tasks (up to [`WAYS`]; 0 or 1 means none) can run
/// interleaved: one token each, and in every target either no slot or int8 slots of
/// one rank that the integer-dot kernels take whole (`A` in panels of 8 rows over
/// inputs in steps of 8, `B` in quads).
fn interleavable<'a>(n_in: usize, targets: &[LoraTarget<'a>], tasks: &[Task<'_>]) -> usize {
    let slot = |g: &LoraTarget<'a>, t: &Task<'_>| target_slot(g, t.slot);
    let fits = |s: &LoraSlot<'_>| {
        matches!(s.a, LoraMatrix::I8 { .. })
            && matches!(s.b, LoraMatrix::I8 { .. })
            && s.a_layout == ALayout::Panels
            && s.b_layout == BLayout::RankQuadBlocks
            && s.rank.is_multiple_of(layout::PANEL)
            && n_in.is_multiple_of(8)
    };
    let Some(first) = tasks.first().filter(|t| t.n == 1) else {
        return 0;
    };
    if !targets
        .iter()
        .all(|g| slot(g, first).is_none_or(|s| fits(&s)))
    {
        return 0;
    }
    1 + tasks[1..]
        .iter()
        .take(WAYS - 1)
        .take_while(|t| {
            t.n == 1
                && targets.iter().all(|g| match (slot(g, first), slot(g, t)) {
                    (None, None) => true,
                    (Some(f), Some(s)) => s.rank == f.rank && fits(&s),
                    _ => false,
                })
        })
        .count()
}

/// The slot `slot` of `g`'s table, if it holds one.
fn target_slot<'a>(g: &LoraTarget<'a>, slot: SlotIdx) -> Option<LoraSlot<'a>> {
    g.slots.slots.get(slot.index()).copied().flatten()
}

/// The codes of an int8 matrix (`interleavable` accepted only int8 slots).
#[cfg(target_arch = "x86_64")]
fn int8_codes(m: LoraMatrix<'_>) -> &[i8] {
    match m {
        LoraMatrix::I8 { q, .. } => q,
        _ => unreachable!("interleavable: int8 slots"),
    }
}

/// `K` one-token tasks that [`interleavable`] accepted, target by target: the `K`
/// shrinks in one loop, then the `K` expands in one loop. Each task gets the bits
/// [`run_task`] gives it; reading `K` adapters' streams side by side keeps more of
/// them in flight than one stream at a time (`docs/perf/lora.md`, session 9).
#[cfg(target_arch = "x86_64")]
fn run_ways<const K: usize>(
    (x, shared): (&[f32], SharedX<'_>),
    n_in: usize,
    targets: &[LoraTarget<'_>],
    group: &mut [Task<'_>],
) {
    let tasks: &mut [Task<'_>; K] = group.try_into().expect("K tasks");
    let mut h = H_SCRATCH.take();
    DOT_SCRATCH.with_borrow_mut(|sc| {
        let mut xq_ready = false;
        for g in targets {
            let slots: [Option<LoraSlot<'_>>; K] =
                std::array::from_fn(|w| target_slot(g, tasks[w].slot));
            let Some(r) = slots[0].map(|s| s.rank) else {
                continue;
            };
            let slots = slots.map(|s| s.expect("interleavable: every task has the slot"));
            if !xq_ready && shared.is_none() {
                let xs = tasks
                    .iter()
                    .map(|t| &x[t.tokens[0] * n_in..(t.tokens[0] + 1) * n_in]);
                sc.xq.fill(xs, n_in, XQ_GROUP);
                xq_ready = true;
            }
            let rows: [XRow<'_>; K] = match shared {
                Some(acts) => std::array::from_fn(|w| shared_row(acts, tasks[w].tokens[0])),
                None => std::array::from_fn(|w| sc.xq.row(w)),
            };
            h.clear();
            h.resize(K * r, 0.0);
            // SAFETY: VNNI was detected (`interleavable` runs only then); every `A` is
            // `[r, n_in]` in whole panels of 8 rows over 8-input steps and `rows` are
            // the K tokens' inputs.
            unsafe {
                vnni::shrink_panels_ways::<K>(
                    rows,
                    XQ_GROUP,
                    slots.map(|s| int8_codes(s.a)),
                    r,
                    &mut h,
                )
            };
            for (s, hw) in slots.iter().zip(h.chunks_exact_mut(r)) {
                Fold::of(s).apply(hw, r);
            }
            sc.hq.fill(h.chunks_exact(r), r, r);
            let width = g.slots.out_features;
            let mut rows = tasks.iter_mut();
            let ys: [&mut [f32]; K] = std::array::from_fn(|_| {
                let t = rows.next().expect("K tasks");
                &mut t.rows[0][g.column..g.column + width]
            });
            // SAFETY: as above; every `B` is `[width, r]` in quads (`r % 4 == 0`,
            // checked with the slot table) and `hq` holds one row of `r` per task.
            unsafe { vnni::expand_quads_ways::<K>(&sc.hq, slots.map(|s| int8_codes(s.b)), r, ys) };
        }
    });
    H_SCRATCH.set(h);
}

/// Every target of one task: `x` rows are read from cache for each, each adapter row
/// is streamed once for all of the task's tokens.
fn run_task(
    (simd, vnni): (bool, bool),
    (x, shared): (&[f32], SharedX<'_>),
    n_in: usize,
    targets: &[LoraTarget<'_>],
    task: &mut Task<'_>,
) {
    let n = task.n;
    let xs: [&[f32]; TILE] = std::array::from_fn(|i| {
        if i < n {
            &x[task.tokens[i] * n_in..(task.tokens[i] + 1) * n_in]
        } else {
            &[]
        }
    });
    // No allocation per task: a decode step over many adapters runs thousands.
    let slots = || {
        targets
            .iter()
            .filter_map(|g| target_slot(g, task.slot).map(|s| (s, g)))
    };
    let r_max = slots().map(|(s, _)| s.rank).max().unwrap_or(0);
    let mut h = H_SCRATCH.take();
    h.clear();
    h.resize(n * r_max, 0.0);
    // The tokens' inputs as int8, made for the first integer-dot slot of the task.
    let mut inputs = TaskInputs {
        xs: &xs[..n],
        tokens: &task.tokens[..n],
        shared,
        xq_ready: false,
    };
    for (s, g) in slots() {
        let out = Out {
            rows: &mut task.rows[..n],
            column: g.column,
            width: g.slots.out_features,
        };
        let h = &mut h[..n * s.rank];
        with_matrix!(s.a, a => with_matrix!(s.b, b => {
            let fold = Fold::of(&s);
            let p = Pair {
                a,
                b,
                a_layout: s.a_layout,
                b_layout: s.b_layout,
                rank: s.rank,
                fold,
            };
            apply_pair((simd, vnni), &mut inputs, p, h, out)
        }));
    }
    H_SCRATCH.set(h);
}

thread_local! {
    /// A task's rank-sized intermediate, kept between tasks on each thread.
    static H_SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Where one projection's update goes: columns `column..column + width` of `rows`.
struct Out<'r, 'y> {
    rows: &'r mut [&'y mut [f32]],
    column: usize,
    width: usize,
}

/// One slot's matrices with their element types resolved.
struct Pair<'s, EA, EB> {
    a: &'s [EA],
    b: &'s [EB],
    a_layout: ALayout,
    b_layout: BLayout,
    rank: usize,
    fold: Fold<'s>,
}

/// A task's inputs: its tokens' rows of `x` and their indices in the call, the
/// call's shared int8 inputs if any, and whether this thread's [`DotScratch`] holds
/// the tokens' inputs as int8 (made on first use by an integer-dot slot of the task
/// when nothing is shared).
struct TaskInputs<'t> {
    xs: &'t [&'t [f32]],
    tokens: &'t [usize],
    shared: SharedX<'t>,
    xq_ready: bool,
}

/// `out[t] += scale · (xs[t] · Aᵀ) · Bᵀ` for one slot and the task's tokens.
fn apply_pair<EA: SlotElem, EB: SlotElem>(
    (simd, vnni): (bool, bool),
    inputs: &mut TaskInputs<'_>,
    p: Pair<'_, EA, EB>,
    h: &mut [f32],
    out: Out<'_, '_>,
) {
    let Pair {
        a,
        b,
        a_layout,
        b_layout,
        rank: r,
        fold,
    } = p;
    let xs = inputs.xs;
    #[cfg(target_arch = "x86_64")]
    if let (true, BLayout::RankQuadBlocks, Some(a8), Some(b8)) =
        (vnni, b_layout, EA::as_i8(a), EB::as_i8(b))
    {
        let n_in = a.len() / r;
        DOT_SCRATCH.with_borrow_mut(|sc| {
            if a_layout == ALayout::Panels
                && r.is_multiple_of(layout::PANEL)
                && n_in.is_multiple_of(8)
            {
                if !inputs.xq_ready && inputs.shared.is_none() {
                    sc.xq.fill(xs.iter().map(|x| &x[..n_in]), n_in, XQ_GROUP);
                    inputs.xq_ready = true;
                }
                let rows: [XRow<'_>; TILE] = std::array::from_fn(|i| match inputs.shared {
                    _ if i >= xs.len() => XRow::default(),
                    Some(acts) => shared_row(acts, inputs.tokens[i]),
                    None => sc.xq.row(i),
                });
                // SAFETY: VNNI (and AVX2) were detected; `a` is `[r, n_in]` in whole
                // 8-row panels of 8-column steps, `rows` are the task's tokens' inputs.
                unsafe { vnni::shrink_panels(&rows[..xs.len()], XQ_GROUP, a8, r, h) };
            } else {
                shrink_rows(simd, xs, a, a_layout, r, h);
            }
            fold.apply(h, r);
            sc.hq.fill(h.chunks_exact(r).take(xs.len()), r, r);
            // SAFETY: as above; `b` is `[out, r]` in quads (`r % 4 == 0`, checked with
            // the slot table), `hq` holds one row of `r` per token.
            unsafe { vnni::expand_quads(&sc.hq, b8, r, out) };
        });
        return;
    }
    let _ = vnni;
    shrink_rows(simd, xs, a, a_layout, r, h);
    // Fold the scale into h once rather than into every output.
    fold.apply(h, r);
    expand_one(simd, h, b, b_layout, r, out);
}

/// `h[t·r + j] = xs[t] · A[j]` for every token `t` and `j < r`, `A` in `layout`.
fn shrink_rows<E: SlotElem>(
    simd: bool,
    xs: &[&[f32]],
    a: &[E],
    layout: ALayout,
    r: usize,
    h: &mut [f32],
) {
    let n_in = a.len() / r;
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when AVX2, FMA and F16C were detected; the
        // slices have the lengths the tile functions assert (checked when the slots and
        // the call were validated).
        unsafe {
            match layout {
                ALayout::RowMajor => avx2::shrink_tile::<E, false>(xs, a, n_in, r, h),
                ALayout::Panels => avx2::shrink_tile::<E, true>(xs, a, n_in, r, h),
            }
        }
        return;
    }
    let _ = simd;
    // Each A row is read once for the task's tokens.
    let mut gathered = Vec::new();
    for j in 0..r {
        let row = match layout {
            ALayout::RowMajor => &a[j * n_in..(j + 1) * n_in],
            ALayout::Panels => {
                gathered.clear();
                gathered.extend((0..n_in).map(|i| a[a_offset(layout, r, n_in, j, i)]));
                &gathered[..]
            }
        };
        for (t, xt) in xs.iter().enumerate() {
            h[t * r + j] = dot_scalar(xt, row);
        }
    }
}

/// The scalar expand: `out.rows[t][column + o] += h[t] · B[o]` in either layout.
fn expand_scalar<E: SlotElem>(h: &[f32], b: &[E], layout: BLayout, r: usize, out: Out<'_, '_>) {
    match layout {
        // Each B row is read once for the task's tokens.
        BLayout::OutRank => {
            for o in 0..out.width {
                let row = &b[o * r..(o + 1) * r];
                for (t, y) in out.rows.iter_mut().enumerate() {
                    y[out.column + o] += dot_scalar(&h[t * r..(t + 1) * r], row);
                }
            }
        }
        // Sum over the rank per output first, then add: the order of the SIMD path.
        BLayout::RankOut | BLayout::RankOutBlocks | BLayout::RankQuadBlocks => {
            let mut acc = vec![0f32; out.width];
            for (t, y) in out.rows.iter_mut().enumerate() {
                acc.fill(0.0);
                for j in 0..r {
                    let hv = h[t * r + j];
                    for (o, a) in acc.iter_mut().enumerate() {
                        *a += hv * b[b_offset(layout, r, out.width, o, j)].to_f32();
                    }
                }
                for (yv, a) in y[out.column..out.column + out.width].iter_mut().zip(&acc) {
                    *yv += a;
                }
            }
        }
    }
}

fn dot_scalar<E: SlotElem>(x: &[f32], m: &[E]) -> f32 {
    // Four partial sums, like the SIMD path's accumulators.
    let mut acc = [0f32; 4];
    let mut cx = x.chunks_exact(4);
    let mut cm = m.chunks_exact(4);
    for (p, q) in (&mut cx).zip(&mut cm) {
        for k in 0..4 {
            acc[k] += p[k] * q[k].to_f32();
        }
    }
    let tail: f32 = cx
        .remainder()
        .iter()
        .zip(cm.remainder())
        .map(|(p, q)| p * q.to_f32())
        .sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{a_offset, ALayout, Out, SlotElem};
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

    /// `h[t·r + j] = xs[t] · a[j]` for every token `t` and `j < r`: `a` is
    /// `[r, n_in]`, row-major (`PANELS = false`) or in [`ALayout::Panels`] (`true`, each
    /// panel one sequential stream), `h` `[xs.len(), r]`. Eight rows of `a` share each
    /// load of `x`, and each token's sums are formed the same way whatever the other
    /// tokens are.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn shrink_tile<E: SlotElem, const PANELS: bool>(
        xs: &[&[f32]],
        a: &[E],
        n_in: usize,
        r: usize,
        h: &mut [f32],
    ) {
        use super::layout::PANEL;
        let n = xs.len();
        assert!(a.len() >= r * n_in && h.len() >= n * r && xs.iter().all(|x| x.len() >= n_in));
        let layout = if PANELS {
            ALayout::Panels
        } else {
            ALayout::RowMajor
        };
        let full = n_in / 8 * 8;
        let pa = a.as_ptr();
        let mut j0 = 0;
        while j0 < r {
            let rows = PANEL.min(r - j0);
            // Row k's 8 columns from 8c start at j0·n_in + k·row_step + c·step.
            let (row_step, step) = if PANELS { (8, 8 * rows) } else { (n_in, 8) };
            let base = |k: usize| j0 * n_in + k * row_step;
            for (t, xt) in xs.iter().enumerate() {
                let px = xt.as_ptr();
                let mut sums = [0f32; PANEL];
                if rows == PANEL {
                    let mut acc = [_mm256_setzero_ps(); PANEL];
                    // SAFETY: i + 8 <= full <= n_in inside the token's x row; each load
                    // is 8 elements of row j0 + k at columns i..i + 8, inside `a`
                    // (lengths asserted above) in either layout.
                    unsafe {
                        for c in 0..full / 8 {
                            let xv = _mm256_loadu_ps(px.add(8 * c));
                            for (k, acc) in acc.iter_mut().enumerate() {
                                let av = E::load8(pa.add(base(k) + c * step));
                                *acc = _mm256_fmadd_ps(av, xv, *acc);
                            }
                        }
                        _mm256_storeu_ps(sums.as_mut_ptr(), reduce8(acc));
                    }
                } else {
                    for (k, s) in sums.iter_mut().enumerate().take(rows) {
                        let mut acc = _mm256_setzero_ps();
                        let mut lanes = [0f32; 8];
                        // SAFETY: as above.
                        unsafe {
                            for c in 0..full / 8 {
                                let av = E::load8(pa.add(base(k) + c * step));
                                acc = _mm256_fmadd_ps(av, _mm256_loadu_ps(px.add(8 * c)), acc);
                            }
                            _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
                        }
                        *s = lanes.iter().sum();
                    }
                }
                for (k, s) in sums.iter_mut().enumerate().take(rows) {
                    for ii in full..n_in {
                        *s += a[a_offset(layout, r, n_in, j0 + k, ii)].to_f32() * xt[ii];
                    }
                    h[t * r + j0 + k] = *s;
                }
            }
            j0 += rows;
        }
    }

    /// `out.rows[t][out.column + o] += h[t] · b[o]` for every token `t` and
    /// `o < out.width`: `h` is `[rows, r]`, `b` `[width, r]`. Eight outputs are reduced
    /// together and added to the row with one vector add.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn expand_tile<E: SlotElem>(h: &[f32], b: &[E], r: usize, out: Out<'_, '_>) {
        let (n, n_out, col) = (out.rows.len(), out.width, out.column);
        assert!(
            h.len() >= n * r
                && b.len() >= n_out * r
                && out.rows.iter().all(|y| y.len() >= col + n_out)
        );
        let (ph, pb) = (h.as_ptr(), b.as_ptr());
        let mut o = 0;
        while o + 8 <= n_out {
            for (t, y) in out.rows.iter_mut().enumerate() {
                let ht = t * r;
                let mut acc = [_mm256_setzero_ps(); 8];
                let mut c = 0;
                // SAFETY: c + 8 <= r, so the loads stay inside row t of h and rows
                // o..o+8 of b (lengths asserted above).
                unsafe {
                    while c + 8 <= r {
                        let hv = _mm256_loadu_ps(ph.add(ht + c));
                        for (k, acc) in acc.iter_mut().enumerate() {
                            let bv = E::load8(pb.add((o + k) * r + c));
                            *acc = _mm256_fmadd_ps(bv, hv, *acc);
                        }
                        c += 8;
                    }
                }
                let mut v = reduce8(acc);
                if c < r {
                    let mut sums = [0f32; 8];
                    // SAFETY: `sums` holds exactly 8 floats.
                    unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), v) };
                    for (k, s) in sums.iter_mut().enumerate() {
                        for cc in c..r {
                            *s += b[(o + k) * r + cc].to_f32() * h[ht + cc];
                        }
                    }
                    // SAFETY: as above.
                    v = unsafe { _mm256_loadu_ps(sums.as_ptr()) };
                }
                let dst = &mut y[col + o..col + o + 8];
                // SAFETY: `dst` holds exactly 8 floats.
                unsafe {
                    let p = dst.as_mut_ptr();
                    _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), v));
                }
            }
            o += 8;
        }
        for oo in o..n_out {
            let row = &b[oo * r..(oo + 1) * r];
            for (t, y) in out.rows.iter_mut().enumerate() {
                // SAFETY: AVX2, FMA and F16C are available (this function's contract).
                y[col + oo] += unsafe { dot(&h[t * r..(t + 1) * r], row) };
            }
        }
    }

    /// [`expand_tile`] for `B` stored transposed, `bt` `[r, width]`, row-major
    /// ([`BLayout::RankOut`], `BLOCKED = false`) or in column blocks
    /// ([`BLayout::RankOutBlocks`], `BLOCKED = true`, one sequential stream per
    /// block): for each token, eight registers of eight outputs accumulate
    /// `h[t, c]·bt[c]` over the rank (eight independent FMA chains), then add to the row
    /// once.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn expand_tile_t<E: SlotElem, const BLOCKED: bool>(
        h: &[f32],
        bt: &[E],
        r: usize,
        out: Out<'_, '_>,
    ) {
        use super::layout::BLOCK;
        const REGS: usize = BLOCK / 8;
        let (n, n_out, col) = (out.rows.len(), out.width, out.column);
        assert!(
            h.len() >= n * r
                && bt.len() >= n_out * r
                && out.rows.iter().all(|y| y.len() >= col + n_out)
        );
        // Where row c of the `w` columns from `o` starts (see `layout::b_offset`).
        let at = |c: usize, o: usize, w: usize| {
            if BLOCKED {
                o * r + c * w
            } else {
                c * n_out + o
            }
        };
        let pb = bt.as_ptr();
        for (t, y) in out.rows.iter_mut().enumerate() {
            let ht = &h[t * r..(t + 1) * r];
            let py = y[col..col + n_out].as_mut_ptr();
            let mut o = 0;
            while o + BLOCK <= n_out {
                let mut acc = [_mm256_setzero_ps(); REGS];
                for (c, &hc) in ht.iter().enumerate() {
                    let hv = _mm256_set1_ps(hc);
                    // SAFETY: o + 64 <= n_out, so the 64 elements of row c of these
                    // columns lie inside bt in either layout.
                    unsafe {
                        let row = pb.add(at(c, o, BLOCK));
                        for (k, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm256_fmadd_ps(hv, E::load8(row.add(8 * k)), *acc);
                        }
                    }
                }
                for (k, acc) in acc.iter().enumerate() {
                    // SAFETY: o + 8k + 8 <= n_out: inside the row's columns.
                    unsafe {
                        let p = py.add(o + 8 * k);
                        _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), *acc));
                    }
                }
                o += BLOCK;
            }
            while o + 8 <= n_out {
                let mut acc = _mm256_setzero_ps();
                for (c, &hc) in ht.iter().enumerate() {
                    // SAFETY: o + 8 <= n_out: row c of these 8 columns is inside bt.
                    acc = unsafe {
                        _mm256_fmadd_ps(_mm256_set1_ps(hc), E::load8(pb.add(at(c, o, 8))), acc)
                    };
                }
                // SAFETY: o + 8 <= n_out: inside the row's columns.
                unsafe {
                    let p = py.add(o);
                    _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), acc));
                }
                o += 8;
            }
            let w = n_out - o;
            for oo in 0..w {
                let mut acc = 0f32;
                for (c, &hc) in ht.iter().enumerate() {
                    acc = hc.mul_add(bt[at(c, o, w) + oo].to_f32(), acc);
                }
                y[col + o + oo] += acc;
            }
        }
    }

    /// Dot product of the common prefix of `x` and `m`.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot<E: SlotElem>(x: &[f32], m: &[E]) -> f32 {
        let n = x.len().min(m.len());
        let (px, pm) = (x.as_ptr(), m.as_ptr());
        let mut acc0 = _mm256_setzero_ps();
        let mut acc1 = _mm256_setzero_ps();
        let mut i = 0;
        // SAFETY: every load reads 8 elements at offset i with i + 8 <= n (or
        // i + 16 <= n for the unrolled pair), inside both slices.
        unsafe {
            while i + 16 <= n {
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i)), E::load8(pm.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(px.add(i + 8)),
                    E::load8(pm.add(i + 8)),
                    acc1,
                );
                i += 16;
            }
            if i + 8 <= n {
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(px.add(i)), E::load8(pm.add(i)), acc0);
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
            total += x[i] * m[i].to_f32();
            i += 1;
        }
        total
    }
}

/// The integer-dot path of int8 slots in [`BLayout::RankQuadBlocks`]: int8 codes of
/// `A`/`B` against int8 activations with `vpdpbusd` (256-bit, AVX-512 VNNI + VL).
/// `vpdpbusd` multiplies unsigned by signed bytes, so the weight codes are read with
/// their sign bit flipped (`c + 128`) and `128 · Σ x8` is taken off each sum.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::layout::{bt_block, BLOCK, PANEL, QUAD};
    use super::{Out, QuantRows, XRow};
    use std::arch::x86_64::*;

    /// One panel's 8 rows of `h` from the shrink's accumulators: row k's two lanes are
    /// 2k, 2k + 1 of `lo` (k < 4) or `hi` (k ≥ 4), and `−128 · corr` undoes the
    /// flipped codes.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn panel_rows(lo: __m256, hi: __m256, corr: f32, h: &mut [f32]) {
        // hadd leaves rows 0, 1, 4, 5 | 2, 3, 6, 7.
        let mut sums = [0f32; 8];
        // SAFETY: `sums` holds exactly 8 floats.
        unsafe { _mm256_storeu_ps(sums.as_mut_ptr(), _mm256_hadd_ps(lo, hi)) };
        for (k, lane) in [0usize, 1, 4, 5, 2, 3, 6, 7].into_iter().enumerate() {
            h[k] = (-128.0f32).mul_add(corr, sums[lane]);
        }
    }

    /// `(n_in, groups)` of the integer-dot shrink's inputs, which must be rows of equal
    /// width in whole 8-input steps, whole groups of 8-input steps, and `r` whole panels.
    fn shrink_shape(rows: &[XRow<'_>], group: usize, r: usize) -> (usize, usize) {
        let n_in = rows.first().map_or(0, |x| x.q.len());
        let groups = n_in.div_ceil(group.max(1));
        assert!(
            r.is_multiple_of(PANEL)
                && n_in.is_multiple_of(8)
                && group.is_multiple_of(8)
                && rows
                    .iter()
                    .all(|x| x.q.len() == n_in && x.d.len() == groups && x.sum.len() == groups)
        );
        (n_in, groups)
    }

    /// `h[t·r + j] = Σᵢ A[j, i] · x[t, i]` (codes of `A`, `x` as quantised in
    /// `rows[t]`, in groups of `group`) for every token of `rows`: `a` is `[r, n_in]`
    /// in [`super::ALayout::Panels`] with `r % 8 == 0` and `n_in % 8 == 0`, so each
    /// panel step is 64 bytes, eight rows × eight inputs.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA, AVX-512 F, VL and VNNI.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn shrink_panels(
        rows: &[XRow<'_>],
        group: usize,
        a: &[i8],
        r: usize,
        h: &mut [f32],
    ) {
        let (n_in, groups) = shrink_shape(rows, group, r);
        assert!(a.len() >= r * n_in && h.len() >= rows.len() * r);
        let flip = _mm256_set1_epi8(i8::MIN);
        for j0 in (0..r).step_by(PANEL) {
            let panel = &a[j0 * n_in..(j0 + PANEL) * n_in];
            for (t, xt) in rows.iter().enumerate() {
                let (mut flo, mut fhi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
                let mut corr = 0f32;
                for g in 0..groups {
                    let (c0, c1) = (g * group / 8, ((g + 1) * group).min(n_in) / 8);
                    let (mut lo, mut hi) = (_mm256_setzero_si256(), _mm256_setzero_si256());
                    for c in c0..c1 {
                        // SAFETY: c < n_in / 8, so the 8 inputs at 8c lie in the token's
                        // row and the 64 bytes at 64c in the panel (8 rows × n_in).
                        unsafe {
                            let xb = _mm256_set1_epi64x(std::ptr::read_unaligned(
                                xt.q.as_ptr().add(8 * c) as *const i64,
                            ));
                            let p = panel.as_ptr().add(64 * c) as *const __m256i;
                            let alo = _mm256_xor_si256(_mm256_loadu_si256(p), flip);
                            let ahi = _mm256_xor_si256(_mm256_loadu_si256(p.add(1)), flip);
                            lo = _mm256_dpbusd_epi32(lo, alo, xb);
                            hi = _mm256_dpbusd_epi32(hi, ahi, xb);
                        }
                    }
                    let d = xt.d[g];
                    let dv = _mm256_set1_ps(d);
                    flo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), dv, flo);
                    fhi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), dv, fhi);
                    corr = d.mul_add(xt.sum[g] as f32, corr);
                }
                // SAFETY: this function's features include AVX2.
                unsafe { panel_rows(flo, fhi, corr, &mut h[t * r + j0..t * r + j0 + PANEL]) };
            }
        }
    }

    /// `out.rows[t][out.column + o] += Σⱼ B[o, j] · h[t, j]` (codes of `B`, `h` as
    /// quantised in `hq`, one group per token): `b` is `[out, r]` in
    /// [`super::BLayout::RankQuadBlocks`].
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA, AVX-512 F, VL and VNNI.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn expand_quads(hq: &QuantRows, b: &[i8], r: usize, out: Out<'_, '_>) {
        const REGS: usize = BLOCK / 8;
        let (n, n_out, col) = (out.rows.len(), out.width, out.column);
        assert!(
            r.is_multiple_of(QUAD)
                && hq.width == r
                && hq.group == r
                && hq.q.len() >= n * r
                && b.len() >= n_out * r
                && out.rows.iter().all(|y| y.len() >= col + n_out)
        );
        let flip = _mm256_set1_epi8(i8::MIN);
        let quads = r / QUAD;
        for (t, y) in out.rows.iter_mut().enumerate() {
            let ht = &hq.q[t * r..(t + 1) * r];
            let d = hq.d[t];
            let (dv, corr) = (_mm256_set1_ps(d), _mm256_set1_epi32(128 * hq.sum[t]));
            let y = &mut y[col..col + n_out];
            // Four of h's codes, broadcast to every lane.
            let h4 = |q: usize| {
                // SAFETY: q < r / 4, so the 4 bytes at 4q lie in the token's row.
                _mm256_set1_epi32(unsafe {
                    std::ptr::read_unaligned(ht.as_ptr().add(QUAD * q) as *const i32)
                })
            };
            let mut o = 0;
            while o + BLOCK <= n_out {
                let block = &b[o * r..(o + BLOCK) * r];
                let mut acc = [_mm256_setzero_si256(); REGS];
                for q in 0..quads {
                    let hb = h4(q);
                    for (m, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: quad q of the block is 64 outputs × 4 bytes at
                        // q·256; load m is its outputs 8m..8m + 8.
                        unsafe {
                            let p = block.as_ptr().add(q * BLOCK * QUAD + 32 * m) as *const __m256i;
                            let bv = _mm256_xor_si256(_mm256_loadu_si256(p), flip);
                            *acc = _mm256_dpbusd_epi32(*acc, bv, hb);
                        }
                    }
                }
                for (m, acc) in acc.iter().enumerate() {
                    let v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(*acc, corr)), dv);
                    // SAFETY: o + 8m + 8 <= n_out: inside the row's columns.
                    unsafe {
                        let p = y.as_mut_ptr().add(o + 8 * m);
                        _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), v));
                    }
                }
                o += BLOCK;
            }
            // SAFETY: as above; `o` is where the whole 64-blocks end.
            unsafe { expand_tail(ht, (d, hq.sum[t]), b, y, o) };
        }
    }

    /// The outputs of one token from `o` on, past the last whole 64-block (blocks of
    /// 8, then the rest one by one): `y[o..] += d · (Σⱼ B[·, j] · ht[j])`, `sum` being
    /// `Σ ht` (the correction of the flipped codes).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA, AVX-512 F, VL and VNNI.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    unsafe fn expand_tail(ht: &[i8], (d, sum): (f32, i32), b: &[i8], y: &mut [f32], mut o: usize) {
        let (r, n_out) = (ht.len(), y.len());
        assert!(r.is_multiple_of(QUAD) && b.len() >= n_out * r);
        let flip = _mm256_set1_epi8(i8::MIN);
        let (dv, corr) = (_mm256_set1_ps(d), _mm256_set1_epi32(128 * sum));
        while o + 8 <= n_out {
            let block = &b[o * r..(o + 8) * r];
            let mut acc = _mm256_setzero_si256();
            for q in 0..r / QUAD {
                // SAFETY: quad q of this 8-output block is 32 bytes at 32q, and the 4
                // bytes of ht at 4q lie in the row (q < r / 4).
                unsafe {
                    let hb = _mm256_set1_epi32(std::ptr::read_unaligned(
                        ht.as_ptr().add(QUAD * q) as *const i32
                    ));
                    let p = block.as_ptr().add(32 * q) as *const __m256i;
                    let bv = _mm256_xor_si256(_mm256_loadu_si256(p), flip);
                    acc = _mm256_dpbusd_epi32(acc, bv, hb);
                }
            }
            let v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc, corr)), dv);
            // SAFETY: o + 8 <= n_out: inside the row's columns.
            unsafe {
                let p = y.as_mut_ptr().add(o);
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), v));
            }
            o += 8;
        }
        if o < n_out {
            let (o0, w) = bt_block(n_out, o);
            let block = &b[o0 * r..];
            for oo in 0..w {
                let mut s = 0i32;
                for (j, &hj) in ht.iter().enumerate() {
                    let code = block[j / QUAD * w * QUAD + oo * QUAD + j % QUAD];
                    s += i32::from(hj) * i32::from(code);
                }
                y[o0 + oo] += s as f32 * d;
            }
        }
    }

    /// [`shrink_panels`] for `K` tokens with an `A` each (`rows[w]` against `a[w]`,
    /// into `h[w·r..]`), the `K` panels read side by side, 64 bytes of each in turn;
    /// each row gets the bits the one-matrix kernel gives it.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA, AVX-512 F, VL and VNNI.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn shrink_panels_ways<const K: usize>(
        rows: [XRow<'_>; K],
        group: usize,
        a: [&[i8]; K],
        r: usize,
        h: &mut [f32],
    ) {
        let (n_in, groups) = shrink_shape(&rows, group, r);
        assert!(a.iter().all(|a| a.len() >= r * n_in) && h.len() >= K * r);
        let flip = _mm512_set1_epi8(i8::MIN);
        for j0 in (0..r).step_by(PANEL) {
            // Lanes 0..8 are the one-matrix kernel's `lo`, 8..16 its `hi`.
            let mut f = [_mm512_setzero_ps(); K];
            let mut corr = [0f32; K];
            for g in 0..groups {
                let (c0, c1) = (g * group / 8, ((g + 1) * group).min(n_in) / 8);
                let mut acc = [_mm512_setzero_si512(); K];
                for c in c0..c1 {
                    for (w, acc) in acc.iter_mut().enumerate() {
                        // SAFETY: c < n_in / 8, so the 8 inputs at 8c lie in rows[w]
                        // and the 64 bytes at j0·n_in + 64c in panel j0 of a[w].
                        unsafe {
                            let xb = _mm512_set1_epi64(std::ptr::read_unaligned(
                                rows[w].q.as_ptr().add(8 * c) as *const i64,
                            ));
                            let p = a[w].as_ptr().add(j0 * n_in + 64 * c);
                            let av = _mm512_xor_si512(_mm512_loadu_si512(p as *const _), flip);
                            *acc = _mm512_dpbusd_epi32(*acc, av, xb);
                        }
                    }
                }
                for w in 0..K {
                    let d = rows[w].d[g];
                    f[w] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[w]), _mm512_set1_ps(d), f[w]);
                    corr[w] = d.mul_add(rows[w].sum[g] as f32, corr[w]);
                }
            }
            for w in 0..K {
                let flo = _mm512_castps512_ps256(f[w]);
                let fhi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(f[w])));
                // SAFETY: this function's features include AVX2.
                unsafe { panel_rows(flo, fhi, corr[w], &mut h[w * r + j0..w * r + j0 + PANEL]) };
            }
        }
    }

    /// [`expand_quads`] for `K` tokens with a `B` each (`hq` row `w` against `b[w]`,
    /// into `ys[w]`, the target's columns of token `w`'s row), the `K` matrices' blocks
    /// read side by side; each output gets the bits the one-matrix kernel gives it
    /// (the same integer sums; 512-bit registers hold a block of all `K` in 4 each).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA, AVX-512 F, VL and VNNI.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub(super) unsafe fn expand_quads_ways<const K: usize>(
        hq: &QuantRows,
        b: [&[i8]; K],
        r: usize,
        mut ys: [&mut [f32]; K],
    ) {
        const ZMM: usize = BLOCK / 16;
        let n_out = ys[0].len();
        assert!(
            r.is_multiple_of(QUAD)
                && hq.width == r
                && hq.group == r
                && hq.q.len() >= K * r
                && b.iter().all(|b| b.len() >= n_out * r)
                && ys.iter().all(|y| y.len() == n_out)
        );
        let flip = _mm512_set1_epi8(i8::MIN);
        let dv: [__m512; K] = std::array::from_fn(|w| _mm512_set1_ps(hq.d[w]));
        let corr: [__m512i; K] = std::array::from_fn(|w| _mm512_set1_epi32(128 * hq.sum[w]));
        let mut o = 0;
        while o + BLOCK <= n_out {
            let mut acc = [[_mm512_setzero_si512(); ZMM]; K];
            for q in 0..r / QUAD {
                for w in 0..K {
                    // SAFETY: 4q + 4 <= r: the 4 bytes lie in row w of `hq`.
                    let hb = _mm512_set1_epi32(unsafe {
                        std::ptr::read_unaligned(hq.q.as_ptr().add(w * r + QUAD * q) as *const i32)
                    });
                    for (m, acc) in acc[w].iter_mut().enumerate() {
                        // SAFETY: quad q of the block at o is 64 outputs × 4 bytes at
                        // o·r + q·256; load m is its outputs 16m..16m + 16.
                        unsafe {
                            let p = b[w].as_ptr().add(o * r + q * BLOCK * QUAD + 64 * m);
                            let bv = _mm512_xor_si512(_mm512_loadu_si512(p as *const _), flip);
                            *acc = _mm512_dpbusd_epi32(*acc, bv, hb);
                        }
                    }
                }
            }
            for (w, y) in ys.iter_mut().enumerate() {
                for (m, acc) in acc[w].iter().enumerate() {
                    let v =
                        _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(*acc, corr[w])), dv[w]);
                    // SAFETY: o + 16m + 16 <= n_out: inside the row's columns.
                    unsafe {
                        let p = y.as_mut_ptr().add(o + 16 * m);
                        _mm512_storeu_ps(p, _mm512_add_ps(_mm512_loadu_ps(p), v));
                    }
                }
            }
            o += BLOCK;
        }
        for (w, y) in ys.into_iter().enumerate() {
            // SAFETY: as above; `o` is where the whole 64-blocks end.
            unsafe { expand_tail(&hq.q[w * r..(w + 1) * r], (hq.d[w], hq.sum[w]), b[w], y, o) };
        }
    }
}

/// `h[t, ..r] = x[t] · Aᵀ` for every token with a slot (`h` is `[T, max_rank]`; other
/// rows are untouched). Prefer [`apply_fused`]/[`bgmv`]/[`sgmv`], which fuse both
/// halves per task.
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
        let hi = &mut h[i * r_max..i * r_max + s.rank];
        with_matrix!(s.a, a => shrink_rows(simd, &[xi], a, s.a_layout, s.rank, hi));
        if let Some(sc) = s.a.row_scales() {
            hi.iter_mut().zip(sc).for_each(|(v, sc)| *v *= sc);
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
        // `shrink` applied A's row scales already.
        let fold = Fold {
            a: None,
            ..Fold::of(&s)
        };
        let hi: Vec<f32> = h[i * r_max..i * r_max + r]
            .iter()
            .enumerate()
            .map(|(j, v)| v * fold.at(j))
            .collect();
        let mut row = [&mut y[i * n_out..(i + 1) * n_out]];
        let out = Out {
            rows: &mut row,
            column: 0,
            width: n_out,
        };
        with_matrix!(s.b, b => expand_one(simd, &hi, b, s.b_layout, r, out));
    }
    Ok(())
}

/// `out += h · Bᵀ` for one token (`h` already scaled).
fn expand_one<E: SlotElem>(
    simd: bool,
    h: &[f32],
    b: &[E],
    layout: BLayout,
    r: usize,
    out: Out<'_, '_>,
) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when AVX2, FMA and F16C were detected; lengths
        // were validated with the slot table and the call.
        unsafe {
            match layout {
                BLayout::OutRank => avx2::expand_tile(h, b, r, out),
                BLayout::RankOut => avx2::expand_tile_t::<E, false>(h, b, r, out),
                BLayout::RankOutBlocks => avx2::expand_tile_t::<E, true>(h, b, r, out),
                // The float path of an integer-dot layout (no VNNI, or the split API).
                BLayout::RankQuadBlocks => expand_scalar(h, b, layout, r, out),
            }
        }
        return;
    }
    let _ = simd;
    expand_scalar(h, b, layout, r, out)
}

/// LoRA for a group of projections that read the same input: for every target and
/// every token whose slot the target's table fills,
/// `y[t, column..column + out] += scale · (x[t] · Aᵀ) · Bᵀ`. `x` is `[T, in]` (every
/// target has that `in_features`), `y` the fused projection output `[T, y_width]`
/// (each target writes its own columns; rows of tokens without a slot are untouched).
/// A `None` entry in one target's table means the adapter in that slot does not adapt
/// that projection; a token naming a slot outside any table is an error.
///
/// Tokens are grouped by slot wherever they sit in the batch, and each group's
/// tokens share every load of the adapter's rows (up to 8 tokens per task); the tasks
/// run on the kernels' thread pool.
///
/// ```
/// use batos_kernels::cpu::lora::{apply_fused, LoraSlot, LoraSlots, LoraTarget};
/// use batos_types::SlotIdx;
/// // Two projections over in = 2: "q" (out 2) at columns 0..2, "k" (out 1) at 2..3.
/// let (qa, qb) = ([1.0f32, 1.0], [1.0f32, -1.0]);
/// let (ka, kb) = ([0.0f32, 1.0], [3.0f32]);
/// let (q_table, k_table) = (
///     [Some(LoraSlot::new(&qa, &qb, 1, 1.0))],
///     [Some(LoraSlot::new(&ka, &kb, 1, 1.0))],
/// );
/// let q = LoraSlots::new(2, 2, &q_table).unwrap();
/// let k = LoraSlots::new(2, 1, &k_table).unwrap();
/// let targets = [LoraTarget::new(q, 0), LoraTarget::new(k, 2)];
/// let x = [1.0f32, 2.0, 7.0, 7.0];
/// let mut y = [0.0f32; 6];
/// apply_fused(&x, &[Some(SlotIdx(0)), None], &targets, &mut y, 3).unwrap();
/// assert_eq!(y, [3.0, -3.0, 6.0, 0.0, 0.0, 0.0]);
/// ```
pub fn apply_fused(
    x: &[f32],
    tokens: &[Option<SlotIdx>],
    targets: &[LoraTarget<'_>],
    y: &mut [f32],
    y_width: usize,
) -> Result<()> {
    check_fused("lora::apply_fused", x, tokens, targets, y.len(), y_width)?;
    fused((x, None), tokens, targets, y, y_width);
    Ok(())
}

/// `y = x · Wᵀ` for an int4 layer in the integer-dot layout
/// ([`super::int4_dot::matmul`]), then the LoRA of `targets` as [`apply_fused`] adds
/// it; `w` is the group's fused base weight (`[y_width, in]`). The int8 slots' shrink
/// reads the input as the base matmul quantised it instead of quantising it again
/// (when the base's groups are 32 inputs wide, the shrink's own): the same bits as the
/// two calls one after the other, with one quantisation of `x` instead of one per task.
///
/// Checks everything before writing: on an error `y` is untouched.
pub fn matmul_int4_then_lora(
    x: &[f32],
    w: &super::int4_dot::Int4DotWeight,
    tokens: &[Option<SlotIdx>],
    targets: &[LoraTarget<'_>],
    y: &mut [f32],
    y_width: usize,
) -> Result<()> {
    let op = "lora::matmul_int4_then_lora";
    check_fused(op, x, tokens, targets, y.len(), y_width)?;
    len_eq(op, "base weight rows", w.rows(), y_width)?;
    len_eq(
        op,
        "base weight columns",
        w.cols(),
        targets[0].slots.in_features,
    )?;
    super::int4_dot::matmul_then(super::int4_dot::DotPath::best(), x, w, y, |acts, y| {
        let shared = (acts.group_size() == XQ_GROUP && acts.token_row(0).is_some()).then_some(acts);
        fused((x, shared), tokens, targets, y, y_width)
    })
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
    fused(
        (x, None),
        tokens,
        &[LoraTarget::new(*slots, 0)],
        y,
        slots.out_features,
    );
    Ok(())
}

/// Prefill-shaped LoRA: the update of [`bgmv`] for runs of consecutive tokens sharing
/// one slot (see [`segments`]); each adapter row is loaded once per 8 tokens of a run.
/// Segments must be increasing and disjoint; rows outside every segment are untouched.
pub fn sgmv(x: &[f32], segs: &[LoraSegment], slots: &LoraSlots<'_>, y: &mut [f32]) -> Result<()> {
    let op = "lora::sgmv";
    let t = check_xy(op, x, y.len(), slots)?;
    check_segments(op, t, segs, slots)?;
    fused(
        (x, None),
        &segment_tokens(t, segs),
        &[LoraTarget::new(*slots, 0)],
        y,
        slots.out_features,
    );
    Ok(())
}

/// One projection's LoRA for any batch: [`bgmv`], which groups tokens by slot
/// whatever their order (runs of one slot are [`sgmv`]'s segments).
pub fn apply(
    x: &[f32],
    tokens: &[Option<SlotIdx>],
    slots: &LoraSlots<'_>,
    y: &mut [f32],
) -> Result<()> {
    bgmv(x, tokens, slots, y)
}
