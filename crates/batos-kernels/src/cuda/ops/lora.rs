//! Batched multi-LoRA for mixed batches (`kernels/lora.cu`).
//!
//! Semantics (the spec the CPU reference also follows): for every token `t`
//! whose slot is `Some(s)`,
//! `y[t] += scale[s] * (x[t] · A[s]ᵀ) · B[s]ᵀ` with `A[s]` of shape [rank_s, in]
//! and `B[s]` of shape [out, rank_s]; tokens whose slot is `None` are left as
//! they are and cost nothing (they never enter a launch).

use std::sync::Arc;

use batos_types::SlotIdx;

use super::super::device::CudaDevice;
use super::super::error::{CudaError, CudaResult};
use super::super::pool::DeviceBuffer;
use super::super::registry::ModuleId;
use super::super::stream::{UploadFence, UploadStream};
use crate::cpu::lora::LoraSlot;
use cudarc::driver::{CudaStream, PushKernelArg};

use super::{as_i32, as_u32, cfg, kname, launch, Activation};

/// Tokens per SGMV tile (must match `SGMV_TILE` in `kernels/lora.cu`).
pub const SGMV_TILE: usize = 16;
/// Largest supported rank (shared-memory bound of the expand kernels).
pub const MAX_RANK: usize = 512;
/// Input columns per shrink block (must match `LORA_K_CHUNK` in the kernel).
const K_CHUNK: usize = 256;

/// Dimensions of a stack of hot adapter slots for one linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraShape {
    /// Number of hot slots.
    pub slots: usize,
    /// Rank every slot is padded to.
    pub max_rank: usize,
    /// Input features of the layer.
    pub in_features: usize,
    /// Output features of the layer.
    pub out_features: usize,
}

/// The stacked adapter weights of all hot slots for one layer:
/// `a` [slots, max_rank, in] (PEFT `lora_A` rows, zero padded) and
/// `bt` [slots, max_rank, out] (PEFT `lora_B` transposed), with per-slot ranks
/// (mixed ranks are fine) and scales (alpha / rank, or whatever the adapter says).
#[derive(Debug)]
pub struct LoraStack<T: Activation> {
    a: DeviceBuffer<T>,
    bt: DeviceBuffer<T>,
    ranks: DeviceBuffer<i32>,
    scales: DeviceBuffer<f32>,
    shape: LoraShape,
}

impl<T: Activation> LoraStack<T> {
    /// Validates and uploads a stack.
    pub fn upload(
        dev: &CudaDevice,
        shape: LoraShape,
        a: &[T],
        bt: &[T],
        ranks: &[usize],
        scales: &[f32],
    ) -> CudaResult<Self> {
        const OP: &str = "LoraStack::upload";
        let LoraShape {
            slots,
            max_rank,
            in_features,
            out_features,
        } = shape;
        if max_rank == 0 || max_rank > MAX_RANK {
            return Err(CudaError::invalid(
                OP,
                format!("max_rank {max_rank} must be in 1..={MAX_RANK}"),
            ));
        }
        CudaError::check_len(OP, "a", slots * max_rank * in_features, a.len())?;
        CudaError::check_len(OP, "bt", slots * max_rank * out_features, bt.len())?;
        CudaError::check_len(OP, "ranks", slots, ranks.len())?;
        CudaError::check_len(OP, "scales", slots, scales.len())?;
        if let Some((s, r)) = ranks.iter().enumerate().find(|(_, r)| **r > max_rank) {
            return Err(CudaError::invalid(
                OP,
                format!("slot {s} has rank {r} > max_rank {max_rank}"),
            ));
        }
        as_i32(OP, "in", in_features)?;
        as_i32(OP, "out", out_features)?;
        let ranks_i: Vec<i32> = ranks.iter().map(|r| *r as i32).collect();
        Ok(LoraStack {
            a: dev.upload(a)?,
            bt: dev.upload(bt)?,
            ranks: dev.upload(&ranks_i)?,
            scales: dev.upload(scales)?,
            shape,
        })
    }

    /// An empty stack with room for `shape.slots` adapters of rank up to
    /// `shape.max_rank` (every slot rank 0, which the kernels skip); fill slots with
    /// [`LoraStack::write_slot`].
    pub fn zeros(dev: &CudaDevice, shape: LoraShape) -> CudaResult<Self> {
        const OP: &str = "LoraStack::zeros";
        check_shape(OP, shape)?;
        Ok(LoraStack {
            a: dev.zeros(shape.slots * shape.max_rank * shape.in_features)?,
            bt: dev.zeros(shape.slots * shape.max_rank * shape.out_features)?,
            ranks: dev.zeros(shape.slots)?,
            scales: dev.zeros(shape.slots)?,
            shape,
        })
    }

    /// Device bytes of a stack of `shape` (what a budget should reserve for it).
    pub fn device_bytes(shape: LoraShape) -> u64 {
        let elems = shape.slots * shape.max_rank * (shape.in_features + shape.out_features);
        (elems * std::mem::size_of::<T>() + shape.slots * (4 + 4)) as u64
    }

    /// Writes one slot in place, queued on `stream` (the device's compute stream, or an
    /// [`UploadStream`](crate::cuda::UploadStream) ordered against it): `a` is the
    /// adapter's `[rank, in]` (PEFT `lora_A`), `bt` its `[rank, out]` (`lora_B`
    /// transposed). Rows past `rank` keep whatever they held: the kernels read only
    /// `ranks[slot]` rows. `rank` 0 empties the slot (`a` and `bt` then empty). The
    /// other slots are untouched, so a cold → hot load moves one adapter's bytes.
    pub fn write_slot(
        &mut self,
        stream: &Arc<CudaStream>,
        slot: SlotIdx,
        a: &[T],
        bt: &[T],
        rank: usize,
        scale: f32,
    ) -> CudaResult<()> {
        self.check_write(
            "LoraStack::write_slot",
            slot,
            rank,
            scale,
            (a.len(), bt.len()),
        )?;
        let LoraShape {
            max_rank,
            in_features,
            out_features,
            ..
        } = self.shape;
        let s = slot.index();
        self.a
            .copy_from_host_at(stream, s * max_rank * in_features, a)?;
        self.bt
            .copy_from_host_at(stream, s * max_rank * out_features, bt)?;
        // In stream order after the rows, so no kernel queued behind this write sees
        // the new rank with the old rows.
        self.ranks.copy_from_host_at(stream, s, &[rank as i32])?;
        self.scales.copy_from_host_at(stream, s, &[scale])
    }

    /// Checks one slot write (rows `[rank, in]` and `[rank, out]` long `lens`) against
    /// the stack before anything is copied.
    fn check_write(
        &self,
        op: &'static str,
        slot: SlotIdx,
        rank: usize,
        scale: f32,
        (a, bt): (usize, usize),
    ) -> CudaResult<()> {
        let s = self.shape;
        if slot.index() >= s.slots {
            return Err(CudaError::invalid(
                op,
                format!("slot {} outside a stack of {} slots", slot.index(), s.slots),
            ));
        }
        if rank > s.max_rank {
            return Err(CudaError::invalid(
                op,
                format!("rank {rank} > the stack's max_rank {}", s.max_rank),
            ));
        }
        if !scale.is_finite() {
            return Err(CudaError::invalid(
                op,
                format!("scale {scale} is not finite"),
            ));
        }
        CudaError::check_len(op, "a", rank * s.in_features, a)?;
        CudaError::check_len(op, "bt", rank * s.out_features, bt)
    }

    /// The stack's dimensions.
    pub fn shape(&self) -> LoraShape {
        self.shape
    }
}

/// Where a [`SlotWrite`]'s rows come from.
#[derive(Clone, Copy, Debug)]
pub enum SlotRows<'a> {
    /// Row-major f32 `A` `[rank, in]` and `Bᵀ` `[rank, out]`, as
    /// [`LoraStack::write_slot`] takes them (empty for rank 0).
    F32 {
        /// `A` rows.
        a: &'a [f32],
        /// `Bᵀ` rows.
        bt: &'a [f32],
    },
    /// A host slot in any element type and layout, widened to f32 rows while it is
    /// staged ([`LoraSlot::write_a_rows_f32`]), with no copy in between.
    Slot(LoraSlot<'a>),
}

impl SlotRows<'_> {
    /// Lengths of the `A` and `Bᵀ` rows.
    fn lens(&self) -> (usize, usize) {
        match self {
            SlotRows::F32 { a, bt } => (a.len(), bt.len()),
            SlotRows::Slot(s) => (s.a().len(), s.b().len()),
        }
    }

    fn write(&self, a: &mut [f32], bt: &mut [f32]) {
        match self {
            SlotRows::F32 { a: sa, bt: sb } => {
                a.copy_from_slice(sa);
                bt.copy_from_slice(sb);
            }
            SlotRows::Slot(s) => {
                s.write_a_rows_f32(a);
                s.write_bt_rows_f32(bt);
            }
        }
    }
}

/// One slot's new contents for [`write_slots`] (rank 0 empties the slot).
#[derive(Clone, Copy, Debug)]
pub struct SlotWrite<'a> {
    /// The stack written.
    pub stack: &'a LoraStack<f32>,
    /// Its slot.
    pub slot: SlotIdx,
    /// The rows.
    pub rows: SlotRows<'a>,
    /// The adapter's rank (0: empty).
    pub rank: usize,
    /// The adapter's scale.
    pub scale: f32,
}

impl SlotWrite<'_> {
    /// Staged 32-bit words: the rows, then the rank and the scale.
    fn words(&self) -> usize {
        let (a, bt) = self.rows.lens();
        a + bt + 2
    }
}

/// The buffers [`write_slots`] stages through, kept between calls: page-locked host
/// memory (so the copy is one DMA the host does not wait for) and its device twin,
/// grown on demand. Reused only once the previous batch is through
/// ([`SlotStaging::in_flight`]).
#[derive(Debug, Default)]
pub struct SlotStaging {
    host: Option<cudarc::driver::PinnedHostSlice<f32>>,
    dev: Option<DeviceBuffer<f32>>,
    ops: Option<DeviceBuffer<u64>>,
    in_flight: Option<UploadFence>,
}

impl SlotStaging {
    /// Marks the staged batch as read by the copies and kernel before `fence`: the
    /// next [`write_slots`] waits for it before overwriting the buffers.
    pub fn in_flight(&mut self, fence: UploadFence) {
        self.in_flight = Some(fence);
    }
}

/// Writes many slots of many f32 stacks with one host → device copy and one kernel
/// launch on `upload`'s stream (after the compute work queued so far): the rows,
/// ranks and scales are staged back to back in page-locked memory, copied in one
/// piece, and scattered on the device (`lora_scatter_words`). The same contents as
/// [`LoraStack::write_slot`] for each write, without a driver call per row block (a
/// 30-layer adapter is 210 stacks × 4 writes). Every write is checked before anything
/// is staged. The caller records the [`UploadFence`] after this call and hands it to
/// [`SlotStaging::in_flight`].
pub fn write_slots(
    dev: &CudaDevice,
    upload: &UploadStream,
    staging: &mut SlotStaging,
    writes: &[SlotWrite<'_>],
) -> CudaResult<()> {
    for w in writes {
        w.stack
            .check_write("write_slots", w.slot, w.rank, w.scale, w.rows.lens())?;
    }
    // Batches of at most STAGING_WORDS (a larger single write goes alone), each
    // staged once the previous one is through: the page-locked buffer stays small.
    let mut start = 0;
    while start < writes.len() {
        let mut end = start;
        let mut words = 0;
        while end < writes.len() {
            let w = writes[end].words();
            if end > start && words + w > STAGING_WORDS {
                break;
            }
            words += w;
            end += 1;
        }
        if start > 0 {
            let between = upload.finish()?;
            staging.in_flight(between);
        }
        stage_batch(dev, upload, staging, &writes[start..end])?;
        start = end;
    }
    Ok(())
}

/// Page-locked staging kept between slot writes, in 32-bit words (32 MiB: one
/// SmolLM2 r16 adapter in f32 rows is 18.6 MiB).
const STAGING_WORDS: usize = 8 << 20;

/// One batch of [`write_slots`]: stage, copy, scatter.
fn stage_batch(
    dev: &CudaDevice,
    upload: &UploadStream,
    staging: &mut SlotStaging,
    writes: &[SlotWrite<'_>],
) -> CudaResult<()> {
    const OP: &str = "write_slots";
    // The previous batch's copy and kernel must be through before its buffers change.
    if let Some(f) = staging.in_flight.take() {
        f.synchronize()?;
    }
    let total: usize = writes.iter().map(SlotWrite::words).sum();
    if staging.host.as_ref().is_none_or(|h| h.len() < total) {
        let cap = total.max(STAGING_WORDS);
        staging.host = None;
        // SAFETY: page-locked memory of `cap` f32 (every bit pattern valid); it is
        // written below before any copy reads it.
        let host = unsafe { dev.context().alloc_pinned::<f32>(cap) }
            .map_err(CudaError::driver("cuMemHostAlloc"))?;
        staging.host = Some(host);
    }
    if staging.dev.as_ref().is_none_or(|d| d.len() < total) {
        staging.dev = None;
        staging.dev = Some(dev.alloc::<f32>(total.max(STAGING_WORDS))?);
    }
    let n_ops = 4 * writes.len();
    if staging.ops.as_ref().is_none_or(|d| d.len() < 3 * n_ops) {
        staging.ops = None;
        staging.ops = Some(dev.alloc::<u64>((3 * n_ops).next_power_of_two())?);
    }
    // Fresh buffers may come from the pool: order the copies after the compute work
    // that used them last.
    upload.begin(dev)?;

    // Stage: per write, A rows, Bᵀ rows, rank (its bits), scale, in parallel; a host
    // slot is widened straight into the page-locked buffer.
    let host = staging
        .host
        .as_mut()
        .expect("allocated above")
        .as_mut_slice()
        .map_err(CudaError::driver("pinned staging"))?;
    let mut parts: Vec<&mut [f32]> = Vec::with_capacity(writes.len());
    let mut rest = &mut host[..total];
    for w in writes {
        let (part, tail) = rest.split_at_mut(w.words());
        parts.push(part);
        rest = tail;
    }
    {
        use rayon::prelude::*;
        parts.par_iter_mut().zip(writes).for_each(|(part, w)| {
            let (na, nb) = w.rows.lens();
            let (a, rest) = part.split_at_mut(na);
            let (bt, tail) = rest.split_at_mut(nb);
            w.rows.write(a, bt);
            // The kernel copies words: the rank's i32 bits travel in an f32 slot.
            tail[0] = f32::from_bits(w.rank as i32 as u32);
            tail[1] = w.scale;
        });
    }
    // The runs: (device address, offset in the staged words, words).
    let stream = upload.stream();
    let mut ops: Vec<u64> = Vec::with_capacity(3 * n_ops);
    let mut off = 0u64;
    for w in writes {
        let s = w.stack.shape;
        let slot = w.slot.index();
        let (na, nb) = w.rows.lens();
        let (a_words, bt_words) = (na as u64, nb as u64);
        let runs = [
            (
                device_addr(&w.stack.a, stream, slot * s.max_rank * s.in_features),
                off,
                a_words,
            ),
            (
                device_addr(&w.stack.bt, stream, slot * s.max_rank * s.out_features),
                off + a_words,
                bt_words,
            ),
            (
                device_addr(&w.stack.ranks, stream, slot),
                off + a_words + bt_words,
                1,
            ),
            (
                device_addr(&w.stack.scales, stream, slot),
                off + a_words + bt_words + 1,
                1,
            ),
        ];
        for (dst, src, n) in runs {
            ops.extend([dst, src, n]);
        }
        off += w.words() as u64;
    }
    let host = &staging.host.as_ref().expect("allocated above");
    // `as_slice` waits for nothing pending (the last batch was synchronised above);
    // the copy reads the `total` words staged above.
    let staged = &host
        .as_slice()
        .map_err(CudaError::driver("pinned staging"))?[..total];
    let dev_buf = staging.dev.as_mut().expect("allocated above");
    {
        let mut dst = dev_buf.view_mut();
        let mut dst = dst.slice_mut(0..total);
        stream
            .memcpy_htod(staged, &mut dst)
            .map_err(CudaError::driver("memcpy_htod (staged slots)"))?;
    }
    let ops_buf = staging.ops.as_mut().expect("allocated above");
    ops_buf.copy_from_host_at(stream, 0, &ops)?;
    let f = dev.function(ModuleId::Lora, "lora_scatter_words")?;
    let (src_v, ops_v) = (dev_buf.view(), ops_buf.view());
    let n = as_i32(OP, "runs", n_ops)?;
    let mut args = stream.launch_builder(&f);
    args.arg(&src_v).arg(&ops_v).arg(&n);
    // SAFETY: lora_scatter_words(const u32* src, const u64* ops, int n_ops), one block
    // per run; each run reads `n` staged words at an offset inside the `total` copied
    // and writes them at a destination inside its stack's buffer: slot < slots,
    // rank ≤ max_rank and the row lengths were checked above, so every destination
    // range lies inside that buffer.
    unsafe {
        launch(
            OP,
            &mut args,
            cfg((as_u32(OP, "runs", n_ops)?, 1, 1), 256, 0),
        )
    }
}

/// The device address of element `elem` of `buf`.
fn device_addr<T: super::super::pool::CudaElem>(
    buf: &DeviceBuffer<T>,
    stream: &Arc<CudaStream>,
    elem: usize,
) -> u64 {
    use cudarc::driver::DevicePtr;
    let view = buf.view();
    // Cross-stream event tracking is off (see `CudaDevice`): the guard records nothing;
    // the caller orders the stream.
    let (ptr, _guard) = view.device_ptr(stream);
    ptr + (elem * std::mem::size_of::<T>()) as u64
}

fn check_shape(op: &'static str, shape: LoraShape) -> CudaResult<()> {
    if shape.max_rank == 0 || shape.max_rank > MAX_RANK {
        return Err(CudaError::invalid(
            op,
            format!("max_rank {} must be in 1..={MAX_RANK}", shape.max_rank),
        ));
    }
    as_i32(op, "slots", shape.slots)?;
    as_i32(op, "in", shape.in_features)?;
    as_i32(op, "out", shape.out_features)?;
    Ok(())
}

/// Which kernel family a plan launches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraMode {
    /// Gather by slot, one block per active token (decode).
    Bgmv,
    /// Segments of consecutive tokens sharing a slot, cut into tiles (prefill).
    Sgmv,
    /// Any mix (decode, prefill or both): the active tokens are sorted by slot
    /// (stably) and each slot's tokens are cut into tiles of <= [`SGMV_TILE`]; one
    /// shrink and one expand launch for the whole batch, 16-byte weight loads, each
    /// weight row read once per tile. Needs in and out features that are multiples of 8.
    Grouped,
}

/// Device-side launch lists for one batch, built on the host from the per-token
/// slots. Reusable for every LoRA layer of the forward pass.
#[derive(Debug)]
pub struct LoraPlan {
    mode: LoraMode,
    tokens: usize,
    rows: usize,
    launches: usize,
    /// BGMV: token index and slot per active token. SGMV: per tile
    /// (start token, length, slot, first h row). Grouped: the active tokens sorted
    /// by slot, then per tile (start in that list, length, slot).
    lists: Vec<DeviceBuffer<i32>>,
}

impl LoraPlan {
    /// Builds the plan for `token_slots` (one entry per token of the batch).
    pub fn new(
        dev: &CudaDevice,
        mode: LoraMode,
        slots: usize,
        token_slots: &[Option<SlotIdx>],
    ) -> CudaResult<Self> {
        const OP: &str = "LoraPlan::new";
        as_i32(OP, "tokens", token_slots.len())?;
        if let Some((t, s)) = token_slots
            .iter()
            .enumerate()
            .find_map(|(t, s)| s.filter(|s| s.index() >= slots).map(|s| (t, s)))
        {
            return Err(CudaError::invalid(
                OP,
                format!(
                    "token {t} uses slot {} but the stack has {slots} slots",
                    s.index()
                ),
            ));
        }
        let rows = token_slots.iter().filter(|s| s.is_some()).count();
        let host = host_lists(mode, token_slots);
        // Grouped: list 0 is the token order, the tiles start at list 1.
        let launches = host[usize::from(mode == LoraMode::Grouped)].len();
        let lists = host
            .iter()
            .map(|l| dev.upload(l))
            .collect::<CudaResult<Vec<_>>>()?;
        Ok(LoraPlan {
            mode,
            tokens: token_slots.len(),
            rows,
            launches,
            lists,
        })
    }

    /// Tokens that carry an adapter (rows of the shrink output).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Tokens in the batch.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The kernel family.
    pub fn mode(&self) -> LoraMode {
        self.mode
    }
}

fn check_plan(
    op: &'static str,
    plan: &LoraPlan,
    x_or_y_len: usize,
    width: usize,
    what: &'static str,
) -> CudaResult<()> {
    CudaError::check_len(op, what, plan.tokens * width, x_or_y_len)?;
    if plan.lists.is_empty() {
        return Err(CudaError::invalid(op, "plan has no launch lists"));
    }
    Ok(())
}

/// Length of the f32 scratch [`lora_shrink`] fills: K-split partials
/// `[ceil(in / 256), plan.rows(), max_rank]`.
pub fn shrink_scratch_len<T: Activation>(stack: &LoraStack<T>, plan: &LoraPlan) -> usize {
    k_splits(stack.shape.in_features) * plan.rows * stack.shape.max_rank
}

fn k_splits(in_features: usize) -> usize {
    in_features.div_ceil(K_CHUNK).max(1)
}

/// Shrink: `h[row, r] = x[t] · A[s, r]` for every active token (rows in plan order),
/// as K-split partials in `h` ([`shrink_scratch_len`] floats) that [`lora_expand`] sums.
pub fn lora_shrink<T: Activation>(
    dev: &CudaDevice,
    stack: &LoraStack<T>,
    plan: &LoraPlan,
    x: &DeviceBuffer<T>,
    h: &mut DeviceBuffer<f32>,
) -> CudaResult<()> {
    const OP: &str = "lora_shrink";
    let s = stack.shape;
    check_plan(OP, plan, x.len(), s.in_features, "x")?;
    CudaError::check_len(OP, "h", shrink_scratch_len(stack, plan), h.len())?;
    if plan.launches == 0 {
        return Ok(());
    }
    let ks = as_u32(OP, "k splits", k_splits(s.in_features))?;
    let rows = as_i32(OP, "rows", plan.rows)?;
    let (k, r) = (
        as_i32(OP, "in", s.in_features)?,
        as_i32(OP, "max_rank", s.max_rank)?,
    );
    let n = as_u32(OP, "launches", plan.launches)?;
    let (xv, av, rv, mut hv) = (x.view(), stack.a.view(), stack.ranks.view(), h.view_mut());
    match plan.mode {
        LoraMode::Bgmv => {
            let f = dev.function(ModuleId::Lora, &kname::<T>("bgmv_shrink"))?;
            let (tv, sv) = (plan.lists[0].view(), plan.lists[1].view());
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&xv)
                .arg(&av)
                .arg(&tv)
                .arg(&sv)
                .arg(&rv)
                .arg(&mut hv)
                .arg(&k)
                .arg(&r);
            let grid = (n, as_u32(OP, "rank blocks", s.max_rank.div_ceil(4))?, ks);
            // SAFETY: bgmv_shrink_<T>(x, a, tok, slot, ranks, h, int in, int max_rank);
            // tok[i] < tokens and slot[i] < slots were checked when the plan was built,
            // x is [tokens, in], a [slots, max_rank, in], h [ksplits, rows, max_rank] with
            // blockIdx.z < ksplits, and warps with r >= max_rank return before touching memory.
            unsafe { launch(OP, &mut args, cfg(grid, 128, 0)) }
        }
        LoraMode::Sgmv => {
            let f = dev.function(ModuleId::Lora, &kname::<T>("sgmv_shrink"))?;
            let (ts, tl, tsl, th) = (
                plan.lists[0].view(),
                plan.lists[1].view(),
                plan.lists[2].view(),
                plan.lists[3].view(),
            );
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&xv)
                .arg(&av)
                .arg(&ts)
                .arg(&tl)
                .arg(&tsl)
                .arg(&th)
                .arg(&rv)
                .arg(&mut hv)
                .arg(&k)
                .arg(&r)
                .arg(&rows);
            // SAFETY: sgmv_shrink_<T>(x, a, tile_start, tile_len, tile_slot, tile_hrow,
            // ranks, h, int in, int max_rank, int rows); each tile covers len <= SGMV_TILE
            // tokens inside [0, tokens) and h rows hrow..hrow+len < rows, as built by the
            // plan; blockIdx.y < ksplits indexes the partial, h holds ksplits*rows*max_rank.
            unsafe { launch(OP, &mut args, cfg((n, ks, 1), 128, 0)) }
        }
        LoraMode::Grouped => {
            check_grouped(OP, s)?;
            let f = dev.function(ModuleId::Lora, &kname::<T>("grouped_shrink"))?;
            let (pv, ts, tl, tsl) = (
                plan.lists[0].view(),
                plan.lists[1].view(),
                plan.lists[2].view(),
                plan.lists[3].view(),
            );
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&xv)
                .arg(&av)
                .arg(&pv)
                .arg(&ts)
                .arg(&tl)
                .arg(&tsl)
                .arg(&rv)
                .arg(&mut hv)
                .arg(&k)
                .arg(&r)
                .arg(&rows);
            // SAFETY: grouped_shrink_<T>(x, a, perm, tile_start, tile_len, tile_slot, ranks,
            // h, int in, int max_rank, int rows), 256 threads. perm holds the rows active
            // tokens (each < tokens), each tile covers perm[start..start+len] with len <=
            // SGMV_TILE (the shared x tile) and one slot < slots, as built by the plan; in %
            // 8 == 0 (checked above) keeps every 16-byte load aligned and inside its row;
            // blockIdx.y < ksplits, h holds ksplits*rows*max_rank floats.
            unsafe { launch(OP, &mut args, cfg((n, ks, 1), 256, 0)) }
        }
    }
}

/// The grouped kernels read and write 8 elements (16 bytes for f16) at a time.
fn check_grouped(op: &'static str, s: LoraShape) -> CudaResult<()> {
    if !s.in_features.is_multiple_of(8) || !s.out_features.is_multiple_of(8) {
        return Err(CudaError::invalid(
            op,
            format!(
                "LoraMode::Grouped needs in and out features that are multiples of 8, got {} x {}",
                s.in_features, s.out_features
            ),
        ));
    }
    Ok(())
}

/// Expand: `y[t] += scale[s] * h[row] · Bt[s]` for every active token.
pub fn lora_expand<T: Activation>(
    dev: &CudaDevice,
    stack: &LoraStack<T>,
    plan: &LoraPlan,
    h: &DeviceBuffer<f32>,
    y: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    const OP: &str = "lora_expand";
    let s = stack.shape;
    check_plan(OP, plan, y.len(), s.out_features, "y")?;
    CudaError::check_len(OP, "h", shrink_scratch_len(stack, plan), h.len())?;
    if plan.launches == 0 {
        return Ok(());
    }
    let ks = as_i32(OP, "k splits", k_splits(s.in_features))?;
    let rows = as_i32(OP, "rows", plan.rows)?;
    let (n_out, r) = (
        as_i32(OP, "out", s.out_features)?,
        as_i32(OP, "max_rank", s.max_rank)?,
    );
    let n = as_u32(OP, "launches", plan.launches)?;
    let col_blocks = as_u32(OP, "column blocks", s.out_features.div_ceil(256))?;
    let (hv, bv, rv, scv, mut yv) = (
        h.view(),
        stack.bt.view(),
        stack.ranks.view(),
        stack.scales.view(),
        y.view_mut(),
    );
    match plan.mode {
        LoraMode::Bgmv => {
            let f = dev.function(ModuleId::Lora, &kname::<T>("bgmv_expand"))?;
            let (tv, sv) = (plan.lists[0].view(), plan.lists[1].view());
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&hv)
                .arg(&bv)
                .arg(&tv)
                .arg(&sv)
                .arg(&rv)
                .arg(&scv)
                .arg(&mut yv)
                .arg(&n_out)
                .arg(&r)
                .arg(&ks);
            let shared = (s.max_rank * 4) as u32;
            // SAFETY: bgmv_expand_<T>(h, bt, tok, slot, ranks, scales, y, int out, int
            // max_rank, int ksplits) with max_rank floats of dynamic shared memory; indices as in
            // the shrink, columns n < out are guarded in the kernel.
            unsafe { launch(OP, &mut args, cfg((n, col_blocks, 1), 256, shared)) }
        }
        LoraMode::Sgmv => {
            let f = dev.function(ModuleId::Lora, &kname::<T>("sgmv_expand"))?;
            let (ts, tl, tsl, th) = (
                plan.lists[0].view(),
                plan.lists[1].view(),
                plan.lists[2].view(),
                plan.lists[3].view(),
            );
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&hv)
                .arg(&bv)
                .arg(&ts)
                .arg(&tl)
                .arg(&tsl)
                .arg(&th)
                .arg(&rv)
                .arg(&scv)
                .arg(&mut yv)
                .arg(&n_out)
                .arg(&r)
                .arg(&ks)
                .arg(&rows);
            let shared = (SGMV_TILE * s.max_rank * 4) as u32;
            // SAFETY: sgmv_expand_<T>(h, bt, tile lists, ranks, scales, y, int out, int
            // max_rank, int ksplits, int rows) with SGMV_TILE*max_rank floats (<= 32 KiB for max_rank <= 512)
            // of dynamic shared memory; tiles as built by the plan.
            unsafe { launch(OP, &mut args, cfg((n, col_blocks, 1), 256, shared)) }
        }
        LoraMode::Grouped => {
            check_grouped(OP, s)?;
            let f = dev.function(ModuleId::Lora, &kname::<T>("grouped_expand"))?;
            let (pv, ts, tl, tsl) = (
                plan.lists[0].view(),
                plan.lists[1].view(),
                plan.lists[2].view(),
                plan.lists[3].view(),
            );
            let mut args = dev.stream().launch_builder(&f);
            args.arg(&hv)
                .arg(&bv)
                .arg(&pv)
                .arg(&ts)
                .arg(&tl)
                .arg(&tsl)
                .arg(&rv)
                .arg(&scv)
                .arg(&mut yv)
                .arg(&n_out)
                .arg(&r)
                .arg(&ks)
                .arg(&rows);
            // 128 threads x 8 columns per block.
            let blocks = as_u32(OP, "column blocks", s.out_features.div_ceil(1024))?;
            let shared = (SGMV_TILE * s.max_rank * 4) as u32;
            // SAFETY: grouped_expand_<T>(h, bt, perm, tile_start, tile_len, tile_slot,
            // ranks, scales, y, int out, int max_rank, int ksplits, int rows), 128 threads,
            // SGMV_TILE*max_rank floats (<= 32 KiB) of dynamic shared memory for the
            // tile's len*rank sums. Tiles and perm as in the shrink; threads with a first
            // column >= out return after the barrier, and out % 8 == 0 keeps each 8-column
            // (16-byte for f16) access aligned and inside the row.
            unsafe { launch(OP, &mut args, cfg((n, blocks, 1), 128, shared)) }
        }
    }
}

/// Shrink then expand: `y += LoRA(x)` for every token that has a slot.
pub fn lora_apply<T: Activation>(
    dev: &CudaDevice,
    stack: &LoraStack<T>,
    plan: &LoraPlan,
    x: &DeviceBuffer<T>,
    y: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    if plan.rows == 0 {
        return Ok(());
    }
    let mut h = dev.alloc::<f32>(shrink_scratch_len(stack, plan))?;
    lora_shrink(dev, stack, plan, x, &mut h)?;
    lora_expand(dev, stack, plan, &h, y)
}

/// The launch lists of a plan, on the host. BGMV: [token, slot] per active token.
/// SGMV: [start, len, slot, first h row] per tile of <= SGMV_TILE consecutive tokens
/// sharing a slot. Active tokens take h rows in token order in both modes.
fn host_lists(mode: LoraMode, token_slots: &[Option<SlotIdx>]) -> Vec<Vec<i32>> {
    match mode {
        LoraMode::Bgmv => {
            let (tok, slot): (Vec<i32>, Vec<i32>) = token_slots
                .iter()
                .enumerate()
                .filter_map(|(t, s)| s.map(|s| (t as i32, s.index() as i32)))
                .unzip();
            vec![tok, slot]
        }
        LoraMode::Sgmv => {
            let (mut start, mut len, mut slot, mut hrow) = (vec![], vec![], vec![], vec![]);
            let (mut t, mut row) = (0, 0usize);
            while t < token_slots.len() {
                let Some(s) = token_slots[t] else {
                    t += 1;
                    continue;
                };
                let mut end = t + 1;
                while end < token_slots.len() && token_slots[end] == Some(s) && end - t < SGMV_TILE
                {
                    end += 1;
                }
                start.push(t as i32);
                len.push((end - t) as i32);
                slot.push(s.index() as i32);
                hrow.push(row as i32);
                row += end - t;
                t = end;
            }
            vec![start, len, slot, hrow]
        }
        LoraMode::Grouped => {
            // Stable sort of the active tokens by slot: token order within a slot stays.
            let mut active: Vec<(u16, i32)> = token_slots
                .iter()
                .enumerate()
                .filter_map(|(t, s)| s.map(|s| (s.0, t as i32)))
                .collect();
            active.sort_by_key(|(s, _)| *s);
            let perm: Vec<i32> = active.iter().map(|(_, t)| *t).collect();
            let (mut start, mut len, mut slot) = (vec![], vec![], vec![]);
            let mut p = 0;
            while p < active.len() {
                let s = active[p].0;
                let mut end = p + 1;
                while end < active.len() && active[end].0 == s && end - p < SGMV_TILE {
                    end += 1;
                }
                start.push(p as i32);
                len.push((end - p) as i32);
                slot.push(i32::from(s));
                p = end;
            }
            vec![perm, start, len, slot]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots(v: &[Option<u16>]) -> Vec<Option<SlotIdx>> {
        v.iter().map(|s| s.map(SlotIdx)).collect()
    }

    #[test]
    fn stack_bytes_count_rows_ranks_and_scales() {
        let shape = |in_features, out_features| LoraShape {
            slots: 16,
            max_rank: 16,
            in_features,
            out_features,
        };
        // SmolLM2's seven projections, 30 layers: one r16 adapter is 19.5 MB in f32.
        let per_layer: u64 = [
            (576, 576),
            (576, 192),
            (576, 192),
            (576, 576),
            (576, 1536),
            (576, 1536),
            (1536, 576),
        ]
        .iter()
        .map(|&(i, o)| LoraStack::<f32>::device_bytes(shape(i, o)))
        .sum();
        let meta = 7 * 16 * 8;
        assert_eq!((per_layer - meta) * 30 / 16, 10_176 * 16 * 30 * 4);
        assert_eq!(
            LoraStack::<half::f16>::device_bytes(shape(576, 576)),
            16 * 16 * 1152 * 2 + 16 * 8
        );
    }

    #[test]
    fn bgmv_lists_skip_tokens_without_adapter() {
        let l = host_lists(LoraMode::Bgmv, &slots(&[Some(2), None, Some(0), None]));
        assert_eq!(l, vec![vec![0, 2], vec![2, 0]]);
    }

    #[test]
    fn grouped_lists_sort_tokens_by_slot_and_cut_tiles() {
        let mut v = vec![Some(2), None, Some(0), Some(2), Some(0), None];
        v.extend(vec![Some(1); 17]);
        let l = host_lists(LoraMode::Grouped, &slots(&v));
        let mut perm = vec![2, 4, 0, 3];
        perm.splice(2..2, 6..23);
        assert_eq!(
            l[0], perm,
            "slot 0 tokens, then slot 1, then slot 2, each in token order"
        );
        assert_eq!(l[1], vec![0, 2, 18, 19], "tile starts in the sorted list");
        assert_eq!(
            l[2],
            vec![2, 16, 1, 2],
            "17 tokens of slot 1 make tiles of 16 and 1"
        );
        assert_eq!(l[3], vec![0, 1, 1, 2], "slots");
        let none = host_lists(LoraMode::Grouped, &slots(&[None, None]));
        assert!(none.iter().all(|l| l.is_empty()));
    }

    #[test]
    fn sgmv_tiles_cut_runs_at_slot_changes_gaps_and_tile_size() {
        let mut v = vec![Some(1); 20];
        v.extend([None, None, Some(3), Some(3), Some(1)]);
        let l = host_lists(LoraMode::Sgmv, &slots(&v));
        // 20 tokens of slot 1 -> tiles of 16 and 4; gap; run of slot 3; run of slot 1.
        assert_eq!(l[0], vec![0, 16, 22, 24], "starts");
        assert_eq!(l[1], vec![16, 4, 2, 1], "lengths");
        assert_eq!(l[2], vec![1, 1, 3, 1], "slots");
        assert_eq!(l[3], vec![0, 16, 20, 22], "h rows follow the active tokens");
        let none = host_lists(LoraMode::Sgmv, &slots(&[None, None]));
        assert!(none.iter().all(|l| l.is_empty()));
    }
}
