//! [`AdapterResidency`] over `batos-lora`'s [`AdapterManager`]: the cold (image) →
//! warm (host) → hot (slot) tiers, leases that keep a generation alive, and pins that
//! keep a slot filled while a request runs.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use batos_lora::{AdapterLease, AdapterManager, Expect, HotPin, LoraError};
use batos_model::forward::{ForwardBatch, ForwardOutput, KvCacheMut, LlamaModel};
use batos_types::SlotIdx;

use crate::adapters::{AdapterInfo, AdapterResidency, AdapterSource, AdapterTicket, LeaseId};
use crate::error::{EngineError, SlotsBusy};

/// One request's lease and, while it runs, its pin.
struct Held {
    lease: AdapterLease,
    pin: Option<HotPin>,
}

/// Adapters served by a [`AdapterManager`]. Leases are kept here under [`LeaseId`]s, so
/// the scheduler handles plain ids.
pub struct LoraResidency {
    manager: AdapterManager,
    held: Mutex<HashMap<LeaseId, Held>>,
    next: AtomicU64,
}

impl std::fmt::Debug for LoraResidency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraResidency")
            .field("manager", &self.manager)
            .finish_non_exhaustive()
    }
}

impl LoraResidency {
    /// Serves the adapters of `manager`.
    pub fn new(manager: AdapterManager) -> Self {
        LoraResidency {
            manager,
            held: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
        }
    }

    /// The manager (stats, prefetch, materialise).
    pub fn manager(&self) -> &AdapterManager {
        &self.manager
    }

    /// Leases not yet released (for leak checks).
    pub fn live_leases(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseId, Held>> {
        // Entries are inserted or removed whole; a panic elsewhere leaves them valid.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn lora_error(name: &str, op: &'static str, e: LoraError) -> EngineError {
    match e {
        LoraError::UnknownAdapter { name } => EngineError::UnknownAdapter { name },
        LoraError::GenerationConflict { name, .. } if op == "load" => {
            EngineError::AdapterExists { name }
        }
        e => EngineError::Adapter {
            name: name.into(),
            op,
            source: Box::new(e),
        },
    }
}

impl AdapterResidency for LoraResidency {
    fn acquire(&self, name: &str) -> Result<AdapterTicket, EngineError> {
        let lease = self
            .manager
            .acquire(name)
            .map_err(|e| lora_error(name, "acquire", e))?;
        let id = LeaseId(self.next.fetch_add(1, Ordering::Relaxed));
        let ticket = AdapterTicket {
            lease: id,
            name: name.into(),
            generation: lease.generation(),
        };
        self.lock().insert(id, Held { lease, pin: None });
        Ok(ticket)
    }

    fn pin_hot(&self, lease: LeaseId) -> Result<Result<SlotIdx, SlotsBusy>, EngineError> {
        let mut held = self.lock();
        let h = held
            .get_mut(&lease)
            .ok_or_else(|| EngineError::InvalidRequest {
                field: "lease",
                reason: format!("lease {} is not held", lease.0),
            })?;
        if let Some(pin) = &h.pin {
            return Ok(Ok(pin.slot()));
        }
        match self.manager.pin_hot(&h.lease) {
            Ok(pin) => {
                let slot = pin.slot();
                h.pin = Some(pin);
                Ok(Ok(slot))
            }
            Err(LoraError::SlotsBusy { name, slots }) => Ok(Err(SlotsBusy { name, slots })),
            Err(e) => Err(lora_error(h.lease.name(), "pin_hot", e)),
        }
    }

    fn unpin(&self, lease: LeaseId) {
        // Dropping the pin frees the slot for refilling; the lease stays.
        let pin = self.lock().get_mut(&lease).and_then(|h| h.pin.take());
        drop(pin);
    }

    fn release(&self, lease: LeaseId) {
        let held = self.lock().remove(&lease);
        drop(held);
    }

    fn forward(
        &self,
        model: &LlamaModel,
        batch: &ForwardBatch,
        cache: &mut dyn KvCacheMut,
    ) -> Result<ForwardOutput, EngineError> {
        // Every slot the batch names is pinned, so the snapshot holds its adapter.
        let hot = self.manager.hot_snapshot();
        Ok(model.forward_with_adapters(batch, cache, &hot)?)
    }

    fn load(&self, name: &str, source: &AdapterSource) -> Result<AdapterInfo, EngineError> {
        let generation = match source {
            AdapterSource::PeftDir(dir) => {
                self.manager
                    .add_dir(name, dir, Expect::Absent)
                    .map_err(|e| lora_error(name, "load", e))?
                    .0
            }
            AdapterSource::Image => {
                let g = self
                    .manager
                    .current(name)
                    .map_err(|e| lora_error(name, "load", e))?
                    .ok_or_else(|| EngineError::UnknownAdapter { name: name.into() })?;
                self.manager
                    .prefetch(name)
                    .map_err(|e| lora_error(name, "load", e))?;
                g
            }
        };
        Ok(AdapterInfo {
            name: name.into(),
            generation,
        })
    }

    fn replace(&self, name: &str, source: &AdapterSource) -> Result<AdapterInfo, EngineError> {
        match source {
            AdapterSource::PeftDir(dir) => {
                let (generation, _report) = self
                    .manager
                    .add_dir(name, dir, Expect::Any)
                    .map_err(|e| lora_error(name, "replace", e))?;
                Ok(AdapterInfo {
                    name: name.into(),
                    generation,
                })
            }
            AdapterSource::Image => self.load(name, source),
        }
    }

    fn unload(&self, name: &str) -> Result<(), EngineError> {
        if self
            .manager
            .current(name)
            .map_err(|e| lora_error(name, "unload", e))?
            .is_none()
        {
            return Err(EngineError::UnknownAdapter { name: name.into() });
        }
        self.manager.unload(name);
        Ok(())
    }

    fn list(&self) -> Result<Vec<AdapterInfo>, EngineError> {
        Ok(self
            .manager
            .list()
            .map_err(|e| lora_error("*", "list", e))?
            .into_iter()
            .map(|(name, generation)| AdapterInfo { name, generation })
            .collect())
    }

    fn hot_slots(&self) -> usize {
        self.manager.stats().hot_slots
    }

    fn hot_snapshot(&self) -> Option<batos_lora::HotSnapshot> {
        Some(self.manager.hot_snapshot())
    }
}
