//! The seam between the engine and adapter residency (cold → warm → hot).
//!
//! The engine never holds adapter weights. It talks to an [`AdapterResidency`] in plain
//! data: a request's adapter becomes an [`AdapterTicket`] (a lease id, the name, the
//! generation it pins) when it is submitted, a [`SlotIdx`] when it is admitted to a
//! step, and nothing once it finishes. Loading cold → warm happens in
//! [`AdapterResidency::acquire`], on the submitting thread, so a request for a cold
//! adapter never stalls the step loop; only the cheap warm → hot pin runs there.
//!
//! [`BaseOnly`] serves the base model and refuses every adapter;
//! [`LoraResidency`](crate::LoraResidency) serves `batos-lora`'s `AdapterManager`.

use std::path::PathBuf;
use std::sync::Arc;

use batos_model::forward::{ForwardBatch, ForwardOutput, KvCacheMut, LlamaModel};
use batos_types::{AdapterGeneration, SlotIdx};

use crate::error::{EngineError, SlotsBusy};

/// Id of one lease an [`AdapterResidency`] handed out; the residency keeps the real
/// lease (which holds the adapter's bytes alive) under it until
/// [`AdapterResidency::release`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LeaseId(pub u64);

/// A request's hold on one adapter generation, as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterTicket {
    /// The lease to pin, unpin and release.
    pub lease: LeaseId,
    /// The adapter's name (the scheduler's queue key).
    pub name: Arc<str>,
    /// The generation the lease pins; it keys the prefix cache, so a cache hit never
    /// crosses adapters or versions.
    pub generation: AdapterGeneration,
}

/// Where [`AdapterResidency::load`] takes an adapter from.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AdapterSource {
    /// A PEFT directory (`adapter_config.json` + `adapter_model.safetensors`).
    PeftDir(PathBuf),
    /// An adapter already stored in the living image under the name being loaded.
    Image,
}

/// One known adapter, for listings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdapterInfo {
    /// Its name.
    pub name: String,
    /// The generation the name points to now.
    pub generation: AdapterGeneration,
}

/// Adapter residency as the engine uses it. Implementations are shared between the
/// step loop and callers of [`crate::Engine`], hence `Send + Sync`; every method is
/// short except `acquire`, `load` and `replace`, which callers run on their own thread.
pub trait AdapterResidency: Send + Sync {
    /// Leases the current generation of `name`, loading it cold → warm if needed.
    /// Runs on the submitting thread.
    fn acquire(&self, name: &str) -> Result<AdapterTicket, EngineError>;

    /// Makes the lease's adapter hot and pins its slot for as long as the request
    /// runs. `Ok(Err(SlotsBusy))` when every slot is pinned: an expected answer, the
    /// request waits.
    fn pin_hot(&self, lease: LeaseId) -> Result<Result<SlotIdx, SlotsBusy>, EngineError>;

    /// Drops the hot pin of `lease` (the request was preempted); the lease stays.
    fn unpin(&self, lease: LeaseId);

    /// Ends `lease` and any pin it holds (the request finished or was cancelled).
    fn release(&self, lease: LeaseId);

    /// Runs one forward step with the slots pinned now.
    fn forward(
        &self,
        model: &LlamaModel,
        batch: &ForwardBatch,
        cache: &mut dyn KvCacheMut,
    ) -> Result<ForwardOutput, EngineError>;

    /// Adds `name` from `source`; an existing name is an error (see `replace`).
    fn load(&self, name: &str, source: &AdapterSource) -> Result<AdapterInfo, EngineError>;

    /// Points `name` at a new generation; running requests keep the one they leased.
    fn replace(&self, name: &str, source: &AdapterSource) -> Result<AdapterInfo, EngineError>;

    /// Drops `name` from the warm and hot tiers; running requests keep their leases.
    fn unload(&self, name: &str) -> Result<(), EngineError>;

    /// Every adapter that can be served by name.
    fn list(&self) -> Result<Vec<AdapterInfo>, EngineError>;

    /// Hot slots: the most distinct adapters one step can use.
    fn hot_slots(&self) -> usize;

    /// The hot slots now, for a runtime that keeps its own copy of them (the CUDA
    /// runtime mirrors them in device memory); `None` when this residency serves the
    /// base model only (the default).
    fn hot_snapshot(&self) -> Option<batos_lora::HotSnapshot> {
        None
    }
}

/// The base model only: every adapter name is refused with
/// [`EngineError::AdaptersUnsupported`], and steps run [`LlamaModel::forward`].
#[derive(Clone, Copy, Debug, Default)]
pub struct BaseOnly;

impl AdapterResidency for BaseOnly {
    fn acquire(&self, name: &str) -> Result<AdapterTicket, EngineError> {
        Err(EngineError::AdaptersUnsupported { name: name.into() })
    }

    fn pin_hot(&self, lease: LeaseId) -> Result<Result<SlotIdx, SlotsBusy>, EngineError> {
        Err(EngineError::AdaptersUnsupported {
            name: format!("lease {}", lease.0),
        })
    }

    fn unpin(&self, _lease: LeaseId) {}

    fn release(&self, _lease: LeaseId) {}

    fn forward(
        &self,
        model: &LlamaModel,
        batch: &ForwardBatch,
        cache: &mut dyn KvCacheMut,
    ) -> Result<ForwardOutput, EngineError> {
        Ok(model.forward(batch, cache)?)
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
        Ok(Vec::new())
    }

    fn hot_slots(&self) -> usize {
        0
    }
}
