//! Shared vocabulary of batos: identifiers, element types, device kinds, and the one
//! memory budget that the paged KV cache and the adapter tiers both draw from.
//!
//! This crate is the leaf of the workspace: it depends on nothing but `thiserror`, so
//! any crate may name these types without creating an upward edge.

mod budget;
mod ids;

pub use budget::{BudgetError, MemoryBudget, Reservation, ReservationKind};
pub use ids::{AdapterGeneration, AdapterId, BlockId, DType, DeviceKind, RequestId, SlotIdx};
