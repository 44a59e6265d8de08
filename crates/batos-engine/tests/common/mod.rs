//! Helpers shared by the engine's tests: the synthetic model, a KV cache, a stepping
//! driver, and a test double for adapter residency.
// Each test binary uses a different subset.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use batos_engine::{
    AdapterInfo, AdapterResidency, AdapterSource, AdapterTicket, EngineError, LeaseId,
    RequestEvent, Scheduler, SlotsBusy, StepPlan,
};
use batos_kv::{KvCacheConfig, KvCacheManager, KvShape};
use batos_model::forward::{
    ForwardBatch, ForwardOutput, KvCacheMut, LlamaDims, LlamaModel, WeightDType,
};
use batos_model::synthetic::{tiny_params, SyntheticLlama};
use batos_model::LlamaConfig;
use batos_types::{AdapterGeneration, MemoryBudget, SlotIdx};

/// The tiny synthetic model (vocab 256, context 512), f32 weights.
pub fn model() -> LlamaModel {
    SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 11)
        .model(WeightDType::F32)
        .unwrap()
}

/// A KV cache of `num_blocks` blocks of `block_size` tokens for `dims`.
pub fn kv(dims: &LlamaDims, num_blocks: usize, block_size: usize) -> KvCacheManager {
    let shape = KvShape {
        num_layers: dims.num_layers,
        num_kv_heads: dims.num_kv_heads,
        head_dim: dims.head_dim,
    };
    let config = KvCacheConfig::new(shape, 1 << 30)
        .and_then(|c| c.with_block_size(block_size))
        .and_then(|c| c.with_num_blocks(num_blocks))
        .unwrap();
    KvCacheManager::new(config, &MemoryBudget::new("test", 1 << 34)).unwrap()
}

/// Deterministic pseudo-random token ids below `vocab`.
pub fn tokens(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % vocab as u32)
        .collect()
}

/// Plans, runs and commits one step; returns the plan and the events.
pub fn step(
    sched: &mut Scheduler,
    model: &LlamaModel,
    residency: &dyn AdapterResidency,
) -> (StepPlan, Vec<RequestEvent>) {
    let plan = sched.schedule().unwrap();
    if plan.is_empty() {
        return (plan, Vec::new());
    }
    let out = residency
        .forward(model, &plan.batch, sched.kv_storage_mut())
        .unwrap();
    let events = sched.commit(&plan, &out).unwrap();
    (plan, events)
}

#[derive(Default)]
struct SlotState {
    /// Per slot: the adapter in it and its pin count.
    slots: Vec<Option<(String, usize)>>,
    /// Live leases: name and whether pinned.
    leases: HashMap<LeaseId, (String, bool)>,
}

/// A test double for adapter residency: named adapters, `slots` hot slots with pin
/// counts (a slot is refilled only when unpinned), and leases counted so tests can
/// check none leaks.
///
/// The LoRA math is not what these tests check, and the base forward refuses slots
/// until the LoRA forward is on this branch, so `forward` records how many distinct
/// slots each batch named and then runs the base model with the slots cleared.
pub struct TestAdapters {
    names: Vec<String>,
    state: Mutex<SlotState>,
    next_lease: AtomicU64,
    /// The most distinct slots any batch named.
    pub max_distinct_per_step: AtomicUsize,
}

impl TestAdapters {
    pub fn new(names: &[&str], slots: usize) -> Arc<TestAdapters> {
        Arc::new(TestAdapters {
            names: names.iter().map(|s| s.to_string()).collect(),
            state: Mutex::new(SlotState {
                slots: vec![None; slots],
                leases: HashMap::new(),
            }),
            next_lease: AtomicU64::new(1),
            max_distinct_per_step: AtomicUsize::new(0),
        })
    }

    /// Leases not yet released.
    pub fn live_leases(&self) -> usize {
        self.state.lock().unwrap().leases.len()
    }

    /// Pins held.
    pub fn live_pins(&self) -> usize {
        let s = self.state.lock().unwrap();
        s.slots.iter().flatten().map(|(_, n)| n).sum()
    }

    fn generation(name: &str) -> AdapterGeneration {
        let mut g = [0u8; 32];
        for (i, b) in name.bytes().enumerate() {
            g[i % 32] ^= b;
        }
        g[31] = 1;
        AdapterGeneration(g)
    }

    fn unpin_locked(s: &mut SlotState, lease: LeaseId) {
        let Some((name, pinned)) = s.leases.get_mut(&lease) else {
            return;
        };
        if !*pinned {
            return;
        }
        *pinned = false;
        let name = name.clone();
        for (n, pins) in s.slots.iter_mut().flatten() {
            if *n == name {
                *pins -= 1;
            }
        }
    }
}

impl AdapterResidency for TestAdapters {
    fn acquire(&self, name: &str) -> Result<AdapterTicket, EngineError> {
        if !self.names.iter().any(|n| n == name) {
            return Err(EngineError::UnknownAdapter { name: name.into() });
        }
        let lease = LeaseId(self.next_lease.fetch_add(1, Ordering::Relaxed));
        self.state
            .lock()
            .unwrap()
            .leases
            .insert(lease, (name.to_string(), false));
        Ok(AdapterTicket {
            lease,
            name: name.into(),
            generation: Self::generation(name),
        })
    }

    fn pin_hot(&self, lease: LeaseId) -> Result<Result<SlotIdx, SlotsBusy>, EngineError> {
        let mut s = self.state.lock().unwrap();
        let (name, pinned) = s.leases.get(&lease).cloned().expect("pin of a live lease");
        assert!(!pinned, "lease {lease:?} pinned twice");
        let n_slots = s.slots.len();
        let at = s
            .slots
            .iter()
            .position(|x| x.as_ref().is_some_and(|(n, _)| *n == name))
            .or_else(|| {
                s.slots
                    .iter()
                    .position(|x| x.as_ref().is_none_or(|(_, pins)| *pins == 0))
            });
        let Some(at) = at else {
            return Ok(Err(SlotsBusy {
                name,
                slots: n_slots,
            }));
        };
        match &mut s.slots[at] {
            Some((n, pins)) if *n == name => *pins += 1,
            slot => *slot = Some((name.clone(), 1)),
        }
        s.leases.get_mut(&lease).expect("live").1 = true;
        Ok(Ok(SlotIdx(at as u16)))
    }

    fn unpin(&self, lease: LeaseId) {
        Self::unpin_locked(&mut self.state.lock().unwrap(), lease);
    }

    fn release(&self, lease: LeaseId) {
        let mut s = self.state.lock().unwrap();
        Self::unpin_locked(&mut s, lease);
        s.leases.remove(&lease);
    }

    fn forward(
        &self,
        model: &LlamaModel,
        batch: &ForwardBatch,
        cache: &mut dyn KvCacheMut,
    ) -> Result<ForwardOutput, EngineError> {
        let mut slots: Vec<SlotIdx> = batch.seqs.iter().filter_map(|s| s.adapter).collect();
        slots.sort_unstable();
        slots.dedup();
        self.max_distinct_per_step
            .fetch_max(slots.len(), Ordering::Relaxed);
        let mut base = batch.clone();
        for s in &mut base.seqs {
            s.adapter = None;
        }
        Ok(model.forward(&base, cache)?)
    }

    fn load(&self, name: &str, _source: &AdapterSource) -> Result<AdapterInfo, EngineError> {
        Err(EngineError::AdaptersUnsupported { name: name.into() })
    }

    fn replace(&self, name: &str, _source: &AdapterSource) -> Result<AdapterInfo, EngineError> {
        Err(EngineError::AdaptersUnsupported { name: name.into() })
    }

    fn unload(&self, name: &str) -> Result<(), EngineError> {
        Err(EngineError::UnknownAdapter { name: name.into() })
    }

    fn list(&self) -> Result<Vec<AdapterInfo>, EngineError> {
        Ok(self
            .names
            .iter()
            .map(|n| AdapterInfo {
                name: n.clone(),
                generation: Self::generation(n),
            })
            .collect())
    }

    fn hot_slots(&self) -> usize {
        self.state.lock().unwrap().slots.len()
    }
}
