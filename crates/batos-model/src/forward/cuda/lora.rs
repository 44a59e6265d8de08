//! Hot adapter slots on the device: a mirror of `batos-lora`'s hot tier.
//!
//! The adapter manager keeps deciding which adapter sits in which hot slot (leases,
//! pins, LRU, its own budget for the host copy); before each step the runtime compares
//! the manager's [`HotSnapshot`] with what it uploaded and re-uploads the stacks of the
//! (layer, projection) pairs whose slots changed. Each pair is one `ops::lora`
//! [`LoraStack`] (`A` `[slots, max_rank, in]`, `Bᵀ` `[slots, max_rank, out]`, per-slot
//! rank and scale), which the BGMV/SGMV launchers read by slot. Its bytes are reserved
//! from the device budget as [`ReservationKind::AdapterHot`] before the upload.
//!
//! `LoraStack` has no per-slot write (its buffers are private to the kernels crate), so
//! a change rebuilds the whole stack of a pair: the cold → hot cost is the upload of
//! every hot slot of that pair, measured by the `cuda_forward` bench.

use batos_kernels::cpu::lora::BLayout;
use batos_kernels::cuda::ops::lora::{LoraShape, LoraStack};
use batos_kernels::cuda::CudaDevice;
use batos_lora::{HotSnapshot, Projection};
use batos_types::{MemoryBudget, Reservation, ReservationKind};

use super::{cuda_err, Act};
use crate::forward::error::ForwardError;

/// What identifies a slot's weights for one pair: the addresses of `A` and `B` (kept
/// alive by the snapshot held in [`DeviceLora::held`], so an address cannot be reused
/// while it is compared), the rank and the scale's bits.
type SlotKey = Option<(usize, usize, usize, u32)>;

/// The hot slots on the device.
pub(super) struct DeviceLora {
    /// Per (layer, projection), `layer * 7 + projection index`.
    stacks: Vec<Option<LoraStack<Act>>>,
    keys: Vec<Vec<SlotKey>>,
    bytes: Vec<u64>,
    /// The snapshot the keys were taken from.
    held: HotSnapshot,
    reservation: Reservation,
    /// Stacks uploaded since construction (for benches and tests).
    pub uploads: u64,
}

impl std::fmt::Debug for DeviceLora {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceLora")
            .field("bytes", &self.reservation.bytes())
            .field("uploads", &self.uploads)
            .finish_non_exhaustive()
    }
}

/// `(in, out)` of every projection, in [`Projection::ALL`] order.
pub(super) type ProjShapes = [(usize, usize); 7];

impl DeviceLora {
    /// No slots yet; stacks are reserved from `budget` as they are uploaded.
    pub(super) fn new(budget: &MemoryBudget, num_layers: usize) -> Result<Self, ForwardError> {
        let n = num_layers * Projection::ALL.len();
        Ok(DeviceLora {
            stacks: (0..n).map(|_| None).collect(),
            keys: vec![Vec::new(); n],
            bytes: vec![0; n],
            held: HotSnapshot::default(),
            reservation: budget
                .reserve(ReservationKind::AdapterHot, 0)
                .map_err(|source| ForwardError::DeviceBudget {
                    what: "hot adapter slots",
                    source,
                })?,
            uploads: 0,
        })
    }

    /// Bytes of every uploaded stack.
    pub(super) fn bytes(&self) -> u64 {
        self.reservation.bytes()
    }

    /// The stack of `proj` in `layer`; `None` when no hot adapter adapts it.
    pub(super) fn stack(&self, layer: usize, proj: Projection) -> Option<&LoraStack<Act>> {
        self.stacks[layer * Projection::ALL.len() + proj.index()].as_ref()
    }

    /// Brings the device stacks in line with `snap`.
    pub(super) fn sync(
        &mut self,
        dev: &CudaDevice,
        snap: &HotSnapshot,
        shapes: &ProjShapes,
    ) -> Result<(), ForwardError> {
        let layers = self.stacks.len() / Projection::ALL.len();
        for layer in 0..layers {
            for (p, &proj) in Projection::ALL.iter().enumerate() {
                let i = layer * Projection::ALL.len() + p;
                let table = snap.table(layer, proj);
                let keys: Vec<SlotKey> = table
                    .iter()
                    .map(|s| {
                        s.as_ref().map(|s| {
                            (
                                s.a().data_addr(),
                                s.b().data_addr(),
                                s.rank(),
                                s.scale().to_bits(),
                            )
                        })
                    })
                    .collect();
                if keys == self.keys[i] {
                    continue;
                }
                let (n_in, n_out) = shapes[p];
                let max_rank = table.iter().flatten().map(|s| s.rank()).max().unwrap_or(0);
                let (stack, bytes) = if max_rank == 0 {
                    (None, 0)
                } else {
                    let slots = table.len();
                    let mut a = vec![0.0 as Act; slots * max_rank * n_in];
                    let mut bt = vec![0.0 as Act; slots * max_rank * n_out];
                    let mut ranks = vec![0usize; slots];
                    let mut scales = vec![0f32; slots];
                    for (s, slot) in table.iter().enumerate() {
                        let Some(slot) = slot else { continue };
                        let r = slot.rank();
                        if slot.a().len() != r * n_in || slot.b().len() != n_out * r {
                            return Err(ForwardError::WeightShape {
                                name: format!("hot slot {s}, layer {layer}, {proj:?}"),
                                expected: vec![r, n_in, n_out],
                                got: slot.a().len() + slot.b().len(),
                            });
                        }
                        let base = s * max_rank;
                        a[base * n_in..(base + r) * n_in].copy_from_slice(&slot.a().to_f32_vec());
                        let b = slot.b().to_f32_vec();
                        let dst = &mut bt[base * n_out..(base + r) * n_out];
                        match slot.b_layout() {
                            // Already Bᵀ ([rank, out]).
                            BLayout::RankOut => dst.copy_from_slice(&b),
                            // Bᵀ: row j of the stack is column j of B ([out, rank]).
                            BLayout::OutRank => {
                                for (o, row) in b.chunks_exact(r).enumerate() {
                                    for (j, &v) in row.iter().enumerate() {
                                        dst[j * n_out + o] = v;
                                    }
                                }
                            }
                        }
                        ranks[s] = r;
                        scales[s] = slot.scale();
                    }
                    let bytes = ((a.len() + bt.len()) * std::mem::size_of::<Act>()
                        + slots * (4 + 4)) as u64;
                    self.grow(bytes, i)?;
                    let shape = LoraShape {
                        slots,
                        max_rank,
                        in_features: n_in,
                        out_features: n_out,
                    };
                    let stack = LoraStack::upload(dev, shape, &a, &bt, &ranks, &scales)
                        .map_err(cuda_err("upload LoRA stack"))?;
                    self.uploads += 1;
                    (Some(stack), bytes)
                };
                // The old stack's buffers go back to the pool now.
                self.stacks[i] = stack;
                let old = std::mem::replace(&mut self.bytes[i], bytes);
                self.reservation.shrink(old);
                self.keys[i] = keys;
            }
        }
        self.held = snap.clone();
        Ok(())
    }

    /// Reserves `bytes` for stack `i` on top of what is held (its old bytes are given
    /// back by the caller once the new stack replaced it).
    fn grow(&mut self, bytes: u64, i: usize) -> Result<(), ForwardError> {
        self.reservation
            .grow(bytes)
            .map_err(|source| ForwardError::DeviceBudget {
                what: "hot adapter slots",
                source,
            })
            .inspect_err(|_| tracing::warn!(stack = i, bytes, "no room for a LoRA stack"))
    }
}
