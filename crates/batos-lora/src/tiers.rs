//! The warm and hot tiers as plain data structures with their eviction policies. The
//! locking and the orchestration between tiers live in [`crate::manager`].

use crate::adapter::{LoraAdapter, LoraWeights};
use crate::hot::HotWeights;
use crate::shapes::Projection;
use batos_kernels::cpu::lora::LoraSlot;
use batos_types::{AdapterGeneration, Reservation, SlotIdx};
use std::collections::HashMap;
use std::sync::Arc;

/// A decoded adapter in host memory. It owns its warm-tier reservation, so the bytes
/// go back to the budget exactly when the last holder (warm cache, hot slot, lease)
/// lets go — even if the name was unloaded or replaced meanwhile.
#[derive(Debug)]
pub struct Resident {
    name: String,
    adapter: LoraAdapter,
    /// The matrices narrowed to the hot format, when it is not f32.
    hot: Option<HotWeights>,
    _reservation: Reservation,
}

impl Resident {
    /// `reservation` must cover [`Resident::bytes`].
    pub(crate) fn new(
        name: String,
        adapter: LoraAdapter,
        hot: Option<HotWeights>,
        reservation: Reservation,
    ) -> Self {
        Resident {
            name,
            adapter,
            hot,
            _reservation: reservation,
        }
    }

    /// The name it was loaded under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The decoded adapter.
    pub fn adapter(&self) -> &LoraAdapter {
        &self.adapter
    }

    /// Its content-hash generation.
    pub fn generation(&self) -> AdapterGeneration {
        self.adapter.generation
    }

    /// The hot-format copy of the narrowed matrices, if any.
    pub fn hot(&self) -> Option<&HotWeights> {
        self.hot.as_ref()
    }

    /// Decoded bytes: the f32 weights plus the hot-format copy.
    pub fn bytes(&self) -> u64 {
        self.adapter.bytes() + self.hot.as_ref().map_or(0, HotWeights::bytes)
    }
}

struct WarmEntry {
    resident: Arc<Resident>,
    last_used: u64,
    /// Loaded by the prefetcher and not yet asked for.
    prefetched: bool,
}

/// Decoded adapters in host RAM, bounded by count and bytes, evicted LRU-first among
/// entries nobody else holds.
pub(crate) struct Warm {
    entries: HashMap<AdapterGeneration, WarmEntry>,
    tick: u64,
    bytes: u64,
    /// Admitted loads still in progress (counted against the bounds).
    pending_count: usize,
    pending_bytes: u64,
    pub(crate) max_count: usize,
    pub(crate) max_bytes: u64,
}

/// What a lookup found.
pub(crate) struct WarmHit {
    pub(crate) resident: Arc<Resident>,
    pub(crate) was_prefetched: bool,
}

impl Warm {
    pub(crate) fn new(max_count: usize, max_bytes: u64) -> Self {
        Warm {
            entries: HashMap::new(),
            tick: 0,
            bytes: 0,
            pending_count: 0,
            pending_bytes: 0,
            max_count,
            max_bytes,
        }
    }

    /// Looks `g` up and marks it used (a demand use clears the prefetched flag).
    pub(crate) fn get(&mut self, g: AdapterGeneration, demand: bool) -> Option<WarmHit> {
        self.tick += 1;
        let e = self.entries.get_mut(&g)?;
        e.last_used = self.tick;
        let was_prefetched = e.prefetched && demand;
        if demand {
            e.prefetched = false;
        }
        Some(WarmHit {
            resident: e.resident.clone(),
            was_prefetched,
        })
    }

    pub(crate) fn contains(&self, g: AdapterGeneration) -> bool {
        self.entries.contains_key(&g)
    }

    /// Whether admitting `bytes` more would break the count or byte bound.
    pub(crate) fn would_exceed(&self, bytes: u64) -> bool {
        self.entries.len() + self.pending_count + 1 > self.max_count
            || self.bytes + self.pending_bytes + bytes > self.max_bytes
    }

    pub(crate) fn add_pending(&mut self, bytes: u64) {
        self.pending_count += 1;
        self.pending_bytes += bytes;
    }

    pub(crate) fn remove_pending(&mut self, bytes: u64) {
        self.pending_count -= 1;
        self.pending_bytes -= bytes;
    }

    pub(crate) fn insert(&mut self, r: Arc<Resident>, prefetched: bool) {
        self.tick += 1;
        self.bytes += r.bytes();
        let old = self.entries.insert(
            r.generation(),
            WarmEntry {
                resident: r,
                last_used: self.tick,
                prefetched,
            },
        );
        if let Some(old) = old {
            self.bytes -= old.resident.bytes();
        }
    }

    /// Evicts the least recently used entry that nobody else holds. Returns whether
    /// it evicted one and whether that one was an unused prefetch.
    pub(crate) fn evict_idle_lru(&mut self) -> Option<Evicted> {
        let g = self
            .entries
            .iter()
            .filter(|(_, e)| Arc::strong_count(&e.resident) == 1)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(g, _)| *g)?;
        self.remove(g)
    }

    /// Removes `g` whoever holds it (its memory goes when the last holder drops).
    pub(crate) fn remove(&mut self, g: AdapterGeneration) -> Option<Evicted> {
        let e = self.entries.remove(&g)?;
        self.bytes -= e.resident.bytes();
        Some(Evicted {
            unused_prefetch: e.prefetched,
        })
    }

    /// Generations cached under `name`.
    pub(crate) fn generations_named(&self, name: &str) -> Vec<AdapterGeneration> {
        self.entries
            .iter()
            .filter(|(_, e)| e.resident.name() == name)
            .map(|(g, _)| *g)
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// An eviction from the warm tier.
pub(crate) struct Evicted {
    pub(crate) unused_prefetch: bool,
}

/// What a hot slot holds: the warm copy itself (CPU: the kernels read host memory
/// directly) or a copy of its own with its own reservation (a device-style slot).
#[derive(Debug)]
pub(crate) enum SlotData {
    Shared(Arc<Resident>),
    Copied {
        weights: LoraWeights,
        hot: Option<HotWeights>,
        _reservation: Reservation,
    },
}

impl SlotData {
    /// The kernels' view of one (layer, projection), in the hot format.
    fn slot(&self, layer: usize, proj: Projection) -> Option<LoraSlot<'_>> {
        let (weights, hot) = match self {
            SlotData::Shared(r) => (&r.adapter().weights, r.hot()),
            SlotData::Copied { weights, hot, .. } => (weights, hot.as_ref()),
        };
        match hot {
            Some(h) => h.slot(weights, layer, proj),
            None => weights.pair(layer, proj).map(|p| p.slot()),
        }
    }
}

/// The slot tables of one step, built at once by [`HotSnapshot::tables`] and borrowed
/// from its snapshot.
#[derive(Clone, Debug, Default)]
pub struct HotTables<'a> {
    slots: usize,
    num_layers: usize,
    /// `[layer][projection][slot]`.
    entries: Vec<Option<LoraSlot<'a>>>,
}

/// Where the table of (`layer`, `proj`) stands among a step's tables.
fn table_index(layer: usize, proj: Projection) -> usize {
    layer * Projection::ALL.len() + proj.index()
}

impl<'a> HotTables<'a> {
    /// The table of one projection of one layer (as [`HotSnapshot::table`], less the
    /// slots that were not asked for); empty for a layer past those built.
    pub fn table(&self, layer: usize, proj: Projection) -> &[Option<LoraSlot<'a>>] {
        if layer >= self.num_layers {
            return &[];
        }
        self.nth(table_index(layer, proj))
    }

    /// Every table, layer by layer and within a layer in [`Projection::ALL`]'s order.
    pub fn iter(&self) -> impl Iterator<Item = &[Option<LoraSlot<'a>>]> + '_ {
        (0..self.num_layers * Projection::ALL.len()).map(|i| self.nth(i))
    }

    fn nth(&self, i: usize) -> &[Option<LoraSlot<'a>>] {
        &self.entries[i * self.slots..(i + 1) * self.slots]
    }
}

/// One filling of a hot slot. Ids are never reused in a process, so a mirror of the
/// slots (the device runtime's) can tell new contents from old by comparing ids,
/// without holding the old contents alive to keep their addresses unique.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HotFillId(u64);

impl HotFillId {
    fn next() -> HotFillId {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        HotFillId(NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }
}

pub(crate) struct HotSlot {
    pub(crate) name: String,
    pub(crate) generation: AdapterGeneration,
    pub(crate) fill: HotFillId,
    pub(crate) data: Arc<SlotData>,
    pub(crate) pins: usize,
    pub(crate) last_used: u64,
    /// Unloaded or replaced while pinned: cleared when the last pin goes.
    pub(crate) retired: bool,
}

/// The hot slots the kernels read.
pub(crate) struct Hot {
    pub(crate) slots: Vec<Option<HotSlot>>,
    tick: u64,
}

impl Hot {
    pub(crate) fn new(max_loras: usize) -> Self {
        Hot {
            slots: (0..max_loras).map(|_| None).collect(),
            tick: 0,
        }
    }

    /// The slot holding `g` (not retired), marked used.
    pub(crate) fn find(&mut self, g: AdapterGeneration) -> Option<usize> {
        self.tick += 1;
        let tick = self.tick;
        let i = self
            .slots
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.generation == g && !s.retired))?;
        if let Some(s) = &mut self.slots[i] {
            s.last_used = tick;
        }
        Some(i)
    }

    pub(crate) fn free_slot(&self) -> Option<usize> {
        self.slots.iter().position(Option::is_none)
    }

    /// Empties the least recently used unpinned slot; returns its index.
    pub(crate) fn evict_lru_unpinned(&mut self) -> Option<usize> {
        let i = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.as_ref().filter(|s| s.pins == 0).map(|s| (i, s.last_used)))
            .min_by_key(|&(_, t)| t)
            .map(|(i, _)| i)?;
        self.slots[i] = None;
        Some(i)
    }

    pub(crate) fn fill(&mut self, i: usize, name: String, g: AdapterGeneration, data: SlotData) {
        self.tick += 1;
        self.slots[i] = Some(HotSlot {
            name,
            generation: g,
            fill: HotFillId::next(),
            data: Arc::new(data),
            pins: 0,
            last_used: self.tick,
            retired: false,
        });
    }

    /// Retires every slot matching `pred`: unpinned ones empty now, pinned ones when
    /// their last pin drops.
    pub(crate) fn retire(&mut self, pred: impl Fn(&HotSlot) -> bool) {
        for s in &mut self.slots {
            if let Some(slot) = s {
                if pred(slot) {
                    if slot.pins == 0 {
                        *s = None;
                    } else {
                        slot.retired = true;
                    }
                }
            }
        }
    }

    pub(crate) fn unpin(&mut self, i: usize) {
        if let Some(slot) = &mut self.slots[i] {
            slot.pins -= 1;
            if slot.pins == 0 && slot.retired {
                self.slots[i] = None;
            }
        }
    }

    pub(crate) fn snapshot(&self) -> HotSnapshot {
        HotSnapshot {
            slots: self
                .slots
                .iter()
                .map(|s| s.as_ref().map(|s| (s.fill, s.data.clone())))
                .collect(),
        }
    }

    pub(crate) fn filled(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }
}

/// A consistent view of the hot slots for one forward step: the data stays alive for
/// as long as the snapshot does, whatever the manager does meanwhile. The default
/// snapshot has no slots.
#[derive(Clone, Debug, Default)]
pub struct HotSnapshot {
    slots: Vec<Option<(HotFillId, Arc<SlotData>)>>,
}

impl HotSnapshot {
    /// Number of slots (filled or not).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The slot table of one projection of one layer, for
    /// [`LoraSlots::new`](batos_kernels::cpu::lora::LoraSlots::new): slot `i` holds the
    /// adapter in hot slot `i` if it adapts this module.
    pub fn table(&self, layer: usize, proj: Projection) -> Vec<Option<LoraSlot<'_>>> {
        self.slots
            .iter()
            .map(|s| s.as_ref().and_then(|(_, d)| d.slot(layer, proj)))
            .collect()
    }

    /// The slot tables of every projection of layers `0..num_layers` at once, for the
    /// slots `used` marks (the others, and slots past `used`'s end, are left empty, as
    /// are empty slots). Each adapter's metadata is read once for all of its tables:
    /// read table by table, as [`HotSnapshot::table`] does, a decode step over 64
    /// adapters found it evicted by the adapters' own weight streams every time (about
    /// 5 ms of pointer chasing per step on SmolLM2-135M's 210 tables).
    ///
    /// ```
    /// use batos_lora::{HotSnapshot, Projection};
    /// let none = HotSnapshot::default();
    /// let tables = none.tables(2, &[true]);
    /// assert!(tables.table(1, Projection::Q).is_empty());
    /// ```
    pub fn tables(&self, num_layers: usize, used: &[bool]) -> HotTables<'_> {
        let n = self.slots.len();
        let mut entries = vec![None; num_layers * Projection::ALL.len() * n];
        for (i, s) in self.slots.iter().enumerate() {
            let Some((_, data)) = s.as_ref().filter(|_| used.get(i) == Some(&true)) else {
                continue;
            };
            for layer in 0..num_layers {
                for p in Projection::ALL {
                    entries[table_index(layer, p) * n + i] = data.slot(layer, p);
                }
            }
        }
        HotTables {
            slots: n,
            num_layers,
            entries,
        }
    }

    /// Which filling of slot `slot` this snapshot holds (`None`: empty or out of
    /// range). Equal ids mean equal contents.
    pub fn fill_id(&self, slot: SlotIdx) -> Option<HotFillId> {
        self.slots
            .get(slot.index())
            .and_then(|s| s.as_ref().map(|(id, _)| *id))
    }

    /// Whether slot `i` is filled.
    pub fn is_filled(&self, slot: SlotIdx) -> bool {
        self.slots.get(slot.index()).is_some_and(Option::is_some)
    }
}
