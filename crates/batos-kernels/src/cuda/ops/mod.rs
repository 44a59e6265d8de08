//! Typed kernel launchers. Each validates its arguments (typed errors, never a
//! panic), picks a launch configuration ("plan"), then launches on the device's
//! compute stream. All launches are asynchronous; read results with
//! [`DeviceBuffer::to_host`](super::DeviceBuffer::to_host) or
//! [`CudaDevice::synchronize`](super::CudaDevice::synchronize).

pub mod attention;
pub mod awq;
pub mod dense;
pub mod elementwise;
pub mod lora;
pub mod sampling;

use batos_types::DType;
use cudarc::driver::{LaunchArgs, LaunchConfig};

use super::error::{CudaError, CudaResult};
use super::pool::CudaElem;

/// Activation element types with kernel instantiations (`<kernel>_<suffix>`).
pub trait Activation: CudaElem {
    /// Kernel-name suffix.
    const SUFFIX: &'static str;
    /// The matching [`DType`].
    const DTYPE: DType;
}

impl Activation for f32 {
    const SUFFIX: &'static str = "f32";
    const DTYPE: DType = DType::F32;
}
impl Activation for half::f16 {
    const SUFFIX: &'static str = "f16";
    const DTYPE: DType = DType::F16;
}
impl Activation for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    const DTYPE: DType = DType::BF16;
}

pub(crate) fn kname<T: Activation>(base: &str) -> String {
    format!("{base}_{}", T::SUFFIX)
}

/// Converts a size to the `i32` a kernel takes, or a typed error.
pub(crate) fn as_i32(op: &'static str, what: &'static str, v: usize) -> CudaResult<i32> {
    i32::try_from(v).map_err(|_| CudaError::invalid(op, format!("{what} = {v} exceeds i32")))
}

pub(crate) fn as_u32(op: &'static str, what: &'static str, v: usize) -> CudaResult<u32> {
    u32::try_from(v).map_err(|_| CudaError::invalid(op, format!("{what} = {v} exceeds u32")))
}

pub(crate) fn cfg(grid: (u32, u32, u32), block: u32, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// Launches a prepared argument list, mapping the driver status to a typed error.
///
/// # Safety
/// The caller guarantees that the arguments pushed on `args` match the kernel's
/// parameter list in number, order and type, and that every buffer is large
/// enough for the indices the kernel computes from the scalar arguments and `config`.
pub(crate) unsafe fn launch(
    op: &'static str,
    args: &mut LaunchArgs<'_>,
    config: LaunchConfig,
) -> CudaResult<()> {
    // SAFETY: forwarded from the caller's contract above.
    unsafe { args.launch(config) }
        .map(|_| ())
        .map_err(CudaError::driver(op))
}
