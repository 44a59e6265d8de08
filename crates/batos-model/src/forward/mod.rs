//! The batched Llama forward pass over a paged KV cache.
//!
//! The scheduler (or [`crate::generate::SimpleGenerator`] in tests and benches) builds a
//! [`ForwardBatch`] — per sequence its new tokens, where they start, its block table —
//! and [`LlamaModel::forward`] computes them in one step, writing their K/V into the
//! cache it is handed and returning the logits rows asked for. The model never
//! allocates blocks.

mod batch;
mod cache;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
mod llama;
mod weights;

pub use batch::{ForwardBatch, ForwardOutput, LogitsRows, SeqStep};
pub use cache::KvCacheMut;
pub use error::ForwardError;
pub(crate) use llama::rope_config;
pub use llama::{LlamaDims, LlamaModel};
pub use weights::{Int4Activations, WeightDType};
