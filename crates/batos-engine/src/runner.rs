//! Where a step's forward pass runs: the host model (CPU kernels, the default) or the
//! device-resident CUDA runtime (`Device::Cuda(n)`, feature `cuda`).
//!
//! The scheduler, the KV cache manager and adapter residency are the same either way;
//! on CUDA the manager's block decisions are mirrored by the runtime's device storage
//! and the hot adapter slots by its device stacks (see `batos_model::forward::cuda`).

use std::path::PathBuf;

use batos_kernels::{Device, KernelError};
use batos_model::forward::{ForwardBatch, ForwardOutput, KvCacheMut, LlamaModel};
use batos_types::MemoryBudget;

use crate::adapters::AdapterResidency;
use crate::error::{EngineError, Result};

/// How the CUDA runtime is opened (ignored on the CPU).
#[derive(Clone, Debug, Default)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) struct CudaOptions {
    /// Load kernels as PTX made ahead of time from this folder (`<module>-<arch>.ptx`)
    /// instead of compiling them with NVRTC on first use.
    pub ptx_dir: Option<PathBuf>,
}

/// The model a step runs on.
pub(crate) enum Runner {
    /// The host model; the residency runs it (base only or with hot adapters).
    Host(Box<LlamaModel>),
    /// The device-resident runtime.
    #[cfg(feature = "cuda")]
    Cuda(Box<batos_model::forward::cuda::CudaLlama>),
}

impl Runner {
    /// The runner for `device`, and the budget the KV pool must draw from: on CUDA the
    /// device's budget (`budget` if given, else 90% of the device's free memory), which
    /// the weights were reserved from; on the CPU `budget` unchanged.
    pub(crate) fn new(
        model: LlamaModel,
        device: Device,
        budget: Option<MemoryBudget>,
        cuda: &CudaOptions,
    ) -> Result<(Runner, Option<MemoryBudget>)> {
        match device {
            Device::Cpu => Ok((Runner::Host(Box::new(model)), budget)),
            Device::Cuda(ordinal) => cuda_runner(model, ordinal, budget, cuda),
            // A device added later runs through the kernels' host-slice seam.
            other => Ok((Runner::Host(Box::new(model.with_device(other))), budget)),
        }
    }

    /// Runs one step.
    pub(crate) fn forward(
        &mut self,
        residency: &dyn AdapterResidency,
        batch: &ForwardBatch,
        cache: &mut dyn KvCacheMut,
    ) -> Result<ForwardOutput> {
        match self {
            Runner::Host(model) => residency.forward(model, batch, cache),
            #[cfg(feature = "cuda")]
            Runner::Cuda(rt) => {
                let hot = residency.hot_snapshot();
                Ok(rt.forward(batch, cache, hot.as_ref())?)
            }
        }
    }

    /// Whether the KV cache manager must log its block copies for a device mirror.
    pub(crate) fn mirrors_kv(&self) -> bool {
        !matches!(self, Runner::Host(_))
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_runner(
    _model: LlamaModel,
    ordinal: usize,
    _budget: Option<MemoryBudget>,
    _cuda: &CudaOptions,
) -> Result<(Runner, Option<MemoryBudget>)> {
    Err(EngineError::Device {
        device: format!("cuda:{ordinal}"),
        source: KernelError::CudaNotCompiled {
            op: "EngineBuilder::build",
            ordinal,
        },
    })
}

#[cfg(feature = "cuda")]
fn cuda_runner(
    model: LlamaModel,
    ordinal: usize,
    budget: Option<MemoryBudget>,
    cuda: &CudaOptions,
) -> Result<(Runner, Option<MemoryBudget>)> {
    use batos_kernels::cuda::{CudaDevice, CudaDeviceConfig, KernelSource};
    use batos_model::forward::cuda::CudaLlama;

    let device = format!("cuda:{ordinal}");
    let fail = |op: &'static str| {
        let device = device.clone();
        move |e: batos_kernels::cuda::CudaError| EngineError::Device {
            device,
            source: KernelError::Cuda {
                op,
                source: e.into(),
            },
        }
    };
    let config = CudaDeviceConfig {
        ordinal,
        kernels: match &cuda.ptx_dir {
            Some(dir) => KernelSource::PrecompiledPtx(dir.clone()),
            None => KernelSource::Nvrtc,
        },
        ..Default::default()
    };
    let dev = CudaDevice::with_config(config).map_err(fail("open device"))?;
    let budget = match budget {
        Some(b) => b,
        None => {
            let (free, _total) = dev
                .context()
                .mem_get_info()
                .map_err(|e| batos_kernels::cuda::CudaError::Driver {
                    op: "cuMemGetInfo",
                    source: e,
                })
                .map_err(fail("memory info"))?;
            MemoryBudget::new(device.clone(), free as u64 / 10 * 9)
        }
    };
    dev.warm_up().map_err(fail("load kernels"))?;
    let rt = CudaLlama::upload(&model, dev, &budget)?;
    tracing::info!(%device, memory = ?rt.memory(), "device-resident model ready");
    Ok((Runner::Cuda(Box::new(rt)), Some(budget)))
}
