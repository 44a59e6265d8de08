//! batos-kernels: every numeric kernel of batos, and the [`Device`] they run on.
//!
//! - [`cpu::reference`]: scalar kernels, the specification.
//! - [`cpu`]: the same operations, dispatched at run time to AVX2/FMA code when the CPU
//!   has it (no `target-cpu=native`), multithreaded over output rows / sequences.
//! - [`sampling`]: next-token selection from a logits row.
//! - [`Device`] / [`Kernels`]: the seam model code calls through; `Device::Cuda` exists
//!   on every build and answers [`KernelError::CudaNotCompiled`] without the `cuda`
//!   feature.
//!
//! Conventions (see `CONTRACTS.md`): row-major f32 activations; a linear weight is
//! `[out_features, in_features]` and `y = x · Wᵀ`; one layer's paged K or V cache is
//! f32 `[num_blocks, block_size, num_kv_heads, head_dim]`.
//!
//! This crate does no IO and knows nothing of requests.
//!
//! ## For the CUDA backend
//! With the `cuda` feature, `crate::cuda` must provide
//! `pub fn kernels(ordinal: usize) -> Result<&'static dyn Kernels, KernelError>`;
//! [`Device::Cuda`] dispatches every operation through it, so model code that calls
//! `device.matmul(..)` etc. does not change.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod device;
mod error;
pub mod sampling;
mod shapes;
mod weights;

pub use cpu::int4::{Int4Data, Int4Layout};
pub use device::{CpuKernels, Device, Kernels};
pub use error::{KernelError, Result};
pub use shapes::{
    AttentionHeads, KvCacheLayout, Llama3RopeScaling, Rope, RopeConfig, RopeScaling, SeqAttention,
};
pub use weights::{WeightData, WeightView};

/// Borrowed view of one layer's paged K and V caches (f32, both laid out as `layout`).
#[derive(Clone, Copy, Debug)]
pub struct KvCache<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub layout: KvCacheLayout,
}
