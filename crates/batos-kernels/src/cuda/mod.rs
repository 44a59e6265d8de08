//! The CUDA backend (feature `cuda`): cudarc with dynamic loading, so it builds
//! on machines with no CUDA installed and reports a typed error at run time.
//!
//! - [`CudaDevice`]: context, compute stream, caching [`MemoryPool`], and the
//!   per-device cache of kernel modules.
//! - [`ModuleId`]: one id per `kernels/*.cu` file, embedded with `include_str!`,
//!   compiled with NVRTC on first use ([`KernelSource::Nvrtc`]) or loaded from
//!   PTX made ahead of time ([`KernelSource::PrecompiledPtx`]).
//! - [`ops`]: typed launchers, each validating its arguments before launching.
//! - [`CudaKernels`] / [`kernels`]: the crate's host-slice `Kernels` seam on a GPU
//!   (what `Device::Cuda(n)` dispatches to; a parity path, see its docs).
//!
//! Before any driver call the driver library is probed ([`probe_driver`]): a
//! machine without libcuda gets [`CudaError::NoDriver`], never a panic.

mod backend;
mod device;
mod error;
pub mod ops;
mod pool;
mod registry;
mod stream;

pub use backend::{kernels, CudaKernels};
pub use device::{device_count, probe_driver, CudaDevice, CudaDeviceConfig};
pub use error::{CudaError, CudaResult, SharedCudaError};
pub use pool::{CudaElem, DeviceBuffer, MemoryPool, PoolStats};
pub use registry::{
    compile_ptx, nvrtc_available, Arch, CompileConfig, KernelSource, ModuleId, PRELUDE,
};
pub use stream::{UploadFence, UploadStream};
