//! batos-kernels: see docs/ARCHITECTURE.md.

#[cfg(feature = "cuda")]
pub mod cuda;
