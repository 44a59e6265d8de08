//! batos-lora: many LoRA adapters over one base model.
//!
//! - [`audit`](mod@audit): PEFT adapters (`adapter_config.json` +
//!   `adapter_model.safetensors`) are parsed and audited before any tier accepts them; a rejection carries an
//!   [`AuditReport`] naming every problem.
//! - [`LoraAdapter`]: the decoded f32 pairs per (layer, projection) and the adapter's
//!   content-hash [`AdapterGeneration`](batos_types::AdapterGeneration).
//! - The batched kernels that apply adapters per token live in
//!   `batos_kernels::cpu::lora`; this crate feeds them [`LoraSlots`] views.
//!
//! Layering: depends on `batos-types`, `batos-store` and `batos-kernels` only.

pub mod adapter;
pub mod audit;
pub mod config;
mod error;
mod hot;
mod manager;
pub mod peft;
mod prefetch;
pub mod repo;
mod shapes;
mod tiers;

pub use adapter::{generation_of, LoraAdapter, LoraPair, LoraWeights};
pub use audit::{
    audit, audit_dir, AdapterFiles, AuditPolicy, AuditProblem, AuditReport, BaseModelCheck,
    PairHalf,
};
pub use batos_kernels::cpu::lora::{LoraDType, LoraMatrix, LoraSlot, LoraSlots};
pub use config::{LoraConfig, TargetModules};
pub use error::{LoraError, Result};
pub use hot::{HotFormat, HotWeights};
pub use manager::{
    AdapterLease, AdapterManager, HotPin, HotStorage, LoraStats, ManagerConfig, MaterialisedAdapter,
};
pub use prefetch::{PrefetchPolicy, PrefetchStats, TransitionModel};
pub use repo::{AdapterRecord, AdapterRepository, Expect};
pub use shapes::{BaseShapes, Projection};
pub use tiers::{HotFillId, HotSnapshot, HotTables, Resident};
