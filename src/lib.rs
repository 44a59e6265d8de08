//! batos: an embeddable engine that serves many LoRA adapters over one quantized base
//! LLM and keeps its whole state in a transactional object store (the living image).
//!
//! This facade re-exports the workspace crates; see `docs/ARCHITECTURE.md`.

pub use batos_kernels as kernels;
pub use batos_kv as kv;
pub use batos_lora as lora;
pub use batos_model as model;
pub use batos_store as store;
pub use batos_types as types;
