//! Hot adapter slots on the device: a mirror of `batos-lora`'s hot tier.
//!
//! The adapter manager keeps deciding which adapter sits in which hot slot (leases,
//! pins, LRU, its own budget for the host copy); before each step the runtime compares
//! the manager's [`HotSnapshot`] with what it wrote and rewrites only the slots that
//! changed. Each (layer, projection) pair is one `ops::lora` [`LoraStack`] (`A`
//! `[slots, max_rank, in]`, `Bᵀ` `[slots, max_rank, out]`, per-slot rank and scale)
//! sized once for the hot tier ([`LoraCapacity`], or the first snapshot's slots and
//! rank rounded up to a power of two), reserved from the device budget as
//! [`ReservationKind::AdapterHot`]. A cold → hot load then writes one adapter's rows
//! into each pair, all pairs at once ([`write_slots`]: one page-locked staging copy and
//! one scatter kernel); a stack is rebuilt only when an adapter's rank or the slot count
//! outgrows it.
//!
//! The writes go on an [`UploadStream`] of their own. Each sync waits (on the device)
//! for the compute work queued before it, so a slot the previous step still reads is
//! not overwritten early, and ends with an [`UploadFence`] that the compute stream
//! waits on only before a step whose tokens use a freshly written slot: steps of other
//! adapters run while the upload is in flight.

use batos_kernels::cpu::lora::LoraSlot;
use batos_kernels::cuda::ops::lora::{
    write_slots, LoraShape, LoraStack, SlotRows, SlotStaging, SlotWrite, MAX_RANK,
};
use batos_kernels::cuda::{CudaDevice, UploadFence, UploadStream};
use batos_lora::{HotFillId, HotSnapshot, Projection};
use batos_types::{MemoryBudget, Reservation, ReservationKind, SlotIdx};

use super::{cuda_err, Act};
use crate::forward::error::ForwardError;

/// Room for hot adapters on the device, per (layer, projection) stack: `slots`
/// adapters of rank up to `max_rank` (the adapter manager's `max_loras` and
/// `max_lora_rank`). Reserved from the device budget up front by
/// [`CudaLlama::reserve_adapters`](super::CudaLlama::reserve_adapters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoraCapacity {
    /// Hot slots.
    pub slots: usize,
    /// Largest adapter rank.
    pub max_rank: usize,
}

/// What a stack's slot holds: the hot tier's fill of that slot, when its adapter
/// adapts the stack's projection. Fill ids are never reused, so the runtime does not
/// keep old snapshots alive to compare them (holding one would keep an evicted
/// adapter's warm copy, and its budget, from being freed).
type SlotKey = Option<HotFillId>;

fn key(snap: &HotSnapshot, s: usize, slot: Option<&LoraSlot<'_>>) -> SlotKey {
    slot.and_then(|_| snap.fill_id(SlotIdx(s as u16)))
}

/// One (layer, projection) stack and what each of its slots holds.
struct PairStack {
    stack: LoraStack<Act>,
    keys: Vec<SlotKey>,
    bytes: u64,
}

/// Counters of the device's adapter slots (for benches and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoraCounters {
    /// Slot writes (one adapter into one (layer, projection) stack, or a slot emptied).
    pub slot_writes: u64,
    /// Stacks allocated (sized for the hot tier; a rebuild when an adapter outgrew one).
    pub stack_builds: u64,
    /// Host → device bytes of the slot writes.
    pub bytes_written: u64,
}

/// The hot slots on the device.
pub(super) struct DeviceLora {
    /// Per (layer, projection), `layer * 7 + projection index`.
    pairs: Vec<Option<PairStack>>,
    capacity: Option<LoraCapacity>,
    upload: UploadStream,
    /// Per slot, the fence of its last write that no step has waited on yet.
    pending: Vec<Option<UploadFence>>,
    /// Page-locked and device buffers the slot writes are staged through.
    staging: SlotStaging,
    reservation: Reservation,
    pub counters: LoraCounters,
}

impl std::fmt::Debug for DeviceLora {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLora")
            .field("bytes", &self.reservation.bytes())
            .field("capacity", &self.capacity)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// `(in, out)` of every projection, in [`Projection::ALL`] order.
pub(super) type ProjShapes = [(usize, usize); 7];

impl DeviceLora {
    /// No slots yet; stacks are reserved from `budget` when they are built.
    pub(super) fn new(
        dev: &CudaDevice,
        budget: &MemoryBudget,
        num_layers: usize,
    ) -> Result<Self, ForwardError> {
        let n = num_layers * Projection::ALL.len();
        Ok(DeviceLora {
            pairs: (0..n).map(|_| None).collect(),
            capacity: None,
            upload: UploadStream::new(dev).map_err(cuda_err("create upload stream"))?,
            pending: Vec::new(),
            staging: SlotStaging::default(),
            reservation: budget
                .reserve(ReservationKind::AdapterHot, 0)
                .map_err(|source| ForwardError::DeviceBudget {
                    what: "hot adapter slots",
                    source,
                })?,
            counters: LoraCounters::default(),
        })
    }

    /// Bytes of every stack.
    pub(super) fn bytes(&self) -> u64 {
        self.reservation.bytes()
    }

    /// The stack of `proj` in `layer`; `None` when no hot adapter adapts it.
    pub(super) fn stack(&self, layer: usize, proj: Projection) -> Option<&LoraStack<Act>> {
        self.pairs[layer * Projection::ALL.len() + proj.index()]
            .as_ref()
            .map(|p| &p.stack)
    }

    /// Builds every stack for `capacity` now (reserving its bytes), so slot writes
    /// never allocate. Stacks already at least that large are kept.
    pub(super) fn reserve(
        &mut self,
        dev: &CudaDevice,
        capacity: LoraCapacity,
        shapes: &ProjShapes,
    ) -> Result<(), ForwardError> {
        if capacity.slots == 0 || capacity.max_rank == 0 || capacity.max_rank > MAX_RANK {
            return Err(ForwardError::BadConfig {
                reason: format!(
                    "adapter capacity {} slots x rank {}: needs slots >= 1 and rank in 1..={MAX_RANK}",
                    capacity.slots, capacity.max_rank
                ),
            });
        }
        self.capacity = Some(capacity);
        self.fence_old_uploads(dev)?;
        for i in 0..self.pairs.len() {
            self.ensure(dev, i, shapes, capacity.slots, capacity.max_rank)?;
        }
        Ok(())
    }

    /// Before dropping or replacing stacks: the compute stream (which reuses pooled
    /// buffers) waits for every copy already queued on the upload stream.
    fn fence_old_uploads(&self, dev: &CudaDevice) -> Result<(), ForwardError> {
        self.upload
            .finish()
            .and_then(|f| f.wait_on_compute(dev))
            .map_err(cuda_err("order uploads before a stack rebuild"))
    }

    /// Makes stack `i` hold at least `slots` slots of rank `rank` (a new stack copies
    /// nothing: its slots are written afresh by the caller).
    fn ensure(
        &mut self,
        dev: &CudaDevice,
        i: usize,
        shapes: &ProjShapes,
        slots: usize,
        rank: usize,
    ) -> Result<(), ForwardError> {
        if let Some(p) = &self.pairs[i] {
            let s = p.stack.shape();
            if s.slots >= slots && s.max_rank >= rank {
                return Ok(());
            }
        }
        let cap = self.capacity.unwrap_or(LoraCapacity {
            slots: 0,
            max_rank: 0,
        });
        let old = self.pairs[i].as_ref().map(|p| p.stack.shape());
        let (n_in, n_out) = shapes[i % Projection::ALL.len()];
        let shape = LoraShape {
            slots: slots.max(cap.slots).max(old.map_or(0, |s| s.slots)),
            max_rank: rank
                .next_power_of_two()
                .max(cap.max_rank)
                .max(old.map_or(0, |s| s.max_rank))
                .min(MAX_RANK),
            in_features: n_in,
            out_features: n_out,
        };
        let bytes = LoraStack::<Act>::device_bytes(shape);
        self.reservation
            .grow(bytes)
            .map_err(|source| ForwardError::DeviceBudget {
                what: "hot adapter slots",
                source,
            })
            .inspect_err(|_| tracing::warn!(stack = i, bytes, "no room for a LoRA stack"))?;
        let stack = match LoraStack::zeros(dev, shape) {
            Ok(s) => s,
            Err(e) => {
                self.reservation.shrink(bytes);
                return Err(cuda_err("allocate LoRA stack")(e));
            }
        };
        self.counters.stack_builds += 1;
        // The old stack's buffers go back to the pool now (after `fence_old_uploads`).
        if let Some(old) = self.pairs[i].replace(PairStack {
            stack,
            keys: vec![None; shape.slots],
            bytes,
        }) {
            self.reservation.shrink(old.bytes);
        }
        Ok(())
    }

    /// Brings the device stacks in line with `snap`: rebuilds the stacks an adapter
    /// outgrew, then writes the slots that changed on the upload stream.
    pub(super) fn sync(
        &mut self,
        dev: &CudaDevice,
        snap: &HotSnapshot,
        shapes: &ProjShapes,
    ) -> Result<(), ForwardError> {
        let layers = self.pairs.len() / Projection::ALL.len();
        // Every slot's tables in one pass, adapter by adapter (the order of `pairs`).
        let all = snap.tables(layers, &vec![true; snap.len()]);
        let tables: Vec<&[Option<LoraSlot<'_>>]> = all.iter().collect();
        // Pass 1 (compute stream): stacks that must grow.
        let mut fenced = false;
        for (i, table) in tables.iter().enumerate() {
            let rank = table
                .iter()
                .flatten()
                .map(LoraSlot::rank)
                .max()
                .unwrap_or(0);
            let fits = match &self.pairs[i] {
                Some(p) => {
                    let s = p.stack.shape();
                    s.slots >= table.len() && s.max_rank >= rank
                }
                // No stack and nothing to hold: nothing to build.
                None => rank == 0,
            };
            if !fits {
                if !fenced {
                    self.fence_old_uploads(dev)?;
                    fenced = true;
                }
                self.ensure(dev, i, shapes, table.len(), rank)?;
            }
        }
        // Pass 2 (host): the slots whose contents changed.
        let mut changes: Vec<(usize, usize, Option<&LoraSlot<'_>>)> = Vec::new();
        for (i, table) in tables.iter().enumerate() {
            let Some(pair) = &self.pairs[i] else {
                continue;
            };
            for (s, held) in pair.keys.iter().enumerate() {
                let slot = table.get(s).and_then(Option::as_ref);
                if key(snap, s, slot) != *held {
                    changes.push((i, s, slot));
                }
            }
        }
        if changes.is_empty() {
            return Ok(());
        }
        // Every shape is checked before the first copy: a refused slot leaves the
        // stacks as they were.
        for &(i, s, slot) in &changes {
            let Some(slot) = slot else { continue };
            let (n_in, n_out) = shapes[i % Projection::ALL.len()];
            check_slot(slot, n_in, n_out).map_err(|got| ForwardError::WeightShape {
                name: format!(
                    "hot slot {s}, layer {}, {:?}",
                    i / Projection::ALL.len(),
                    Projection::ALL[i % Projection::ALL.len()]
                ),
                expected: vec![slot.rank(), n_in, n_out],
                got,
            })?;
        }
        // Pass 3 (upload stream): one staged copy and one scatter launch for every
        // changed slot, after the compute work queued so far; the host slots are
        // widened to f32 rows (and transposed) while they are staged, in parallel.
        let writes: Vec<SlotWrite<'_>> = changes
            .iter()
            .map(|&(i, s, slot)| {
                let rows = slot.map_or(SlotRows::F32 { a: &[], bt: &[] }, |sl| SlotRows::Slot(*sl));
                let (rank, scale) = slot.map_or((0, 0.0), |sl| (sl.rank(), sl.scale()));
                SlotWrite {
                    stack: &self.pairs[i]
                        .as_ref()
                        .expect("changes name only pairs with a stack")
                        .stack,
                    slot: SlotIdx(s as u16),
                    rows,
                    rank,
                    scale,
                }
            })
            .collect();
        write_slots(dev, &self.upload, &mut self.staging, &writes)
            .map_err(cuda_err("write LoRA slots"))?;
        let bytes: usize = changes
            .iter()
            .filter_map(|&(_, _, slot)| slot.map(|sl| sl.a().len() + sl.b().len()))
            .sum();
        drop(writes);
        self.counters.slot_writes += changes.len() as u64;
        self.counters.bytes_written += (bytes * std::mem::size_of::<Act>()) as u64;
        let mut written = vec![false; tables.first().map_or(0, |t| t.len())];
        for &(i, s, slot) in &changes {
            let pair = self.pairs[i]
                .as_mut()
                .expect("changes name only pairs with a stack");
            pair.keys[s] = key(snap, s, slot);
            if written.len() <= s {
                written.resize(s + 1, false);
            }
            written[s] = true;
        }
        let fence = self
            .upload
            .finish()
            .map_err(cuda_err("fence LoRA slot writes"))?;
        self.staging.in_flight(fence.clone());
        if self.pending.len() < written.len() {
            self.pending.resize(written.len(), None);
        }
        for (s, w) in written.iter().enumerate() {
            if *w {
                self.pending[s] = Some(fence.clone());
            }
        }
        Ok(())
    }

    /// Makes the compute stream wait for the writes of every slot in `used` that has
    /// one in flight (called before the first kernel of a step that reads them).
    pub(super) fn wait_for(
        &mut self,
        dev: &CudaDevice,
        used: impl IntoIterator<Item = SlotIdx>,
    ) -> Result<(), ForwardError> {
        for s in used {
            if let Some(fence) = self.pending.get_mut(s.index()).and_then(Option::take) {
                fence
                    .wait_on_compute(dev)
                    .map_err(cuda_err("wait for LoRA slot writes"))?;
            }
        }
        Ok(())
    }

    /// Waits on the host for every slot write queued so far.
    pub(super) fn synchronize(&mut self) -> Result<(), ForwardError> {
        self.upload
            .synchronize()
            .map_err(cuda_err("upload LoRA slots"))?;
        self.pending.iter_mut().for_each(|p| *p = None);
        Ok(())
    }
}

impl Drop for DeviceLora {
    fn drop(&mut self) {
        // The stacks' buffers go back to the device pool: no copy may still be writing them.
        if let Err(e) = self.upload.synchronize() {
            tracing::warn!(error = %e, "upload stream failed while dropping the adapter slots");
        }
    }
}

/// `Err(elements)` when a slot's matrices are not `[rank, in]` and `[out, rank]`.
fn check_slot(slot: &LoraSlot<'_>, n_in: usize, n_out: usize) -> Result<(), usize> {
    let r = slot.rank();
    if slot.a().len() != r * n_in || slot.b().len() != n_out * r {
        return Err(slot.a().len() + slot.b().len());
    }
    Ok(())
}
