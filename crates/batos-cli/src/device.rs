//! `--device` and the CUDA settings, shared by every command that runs the model
//! (`batos generate`, `batos bench`, and `batos serve` when it lands).

use std::path::PathBuf;

use batos::engine::EngineBuilder;
use batos::kernels::Device;
use batos::kv::KvCacheManager;
use batos::model::forward::{ForwardBatch, ForwardError, ForwardOutput, LlamaModel};

/// Where the model runs.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArgs {
    /// `cpu` (default), or `cuda` / `cuda:N`: weights, KV cache and hot adapters in GPU
    /// memory (needs a build with `--features cuda`, an NVIDIA driver and a GPU).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: Device,
    /// With a CUDA device: load the kernels as PTX made ahead of time
    /// (`<module>-<arch>.ptx`, see scripts/gpu-prepare.sh) instead of compiling them
    /// with NVRTC.
    #[arg(long, value_name = "DIR")]
    pub cuda_ptx_dir: Option<PathBuf>,
}

impl DeviceArgs {
    /// Whether the model runs on the host CPU.
    pub fn is_cpu(&self) -> bool {
        self.device == Device::Cpu
    }

    /// `builder` set up for this device.
    pub fn configure(&self, builder: EngineBuilder) -> EngineBuilder {
        let builder = builder.device(self.device);
        match &self.cuda_ptx_dir {
            Some(dir) => builder.cuda_ptx_dir(dir),
            None => builder,
        }
    }
}

/// `cpu`, `cuda` (device 0) or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("unknown device '{s}' (expected cpu, cuda or cuda:N)")),
    }
}

/// The forward pass of a command that drives the model step by step (`batos bench`):
/// the host model, or the device-resident runtime built from it.
pub enum Stepper<'m> {
    /// The host model.
    Cpu(&'m LlamaModel),
    /// The model resident on a GPU.
    #[cfg(feature = "cuda")]
    Cuda(Box<std::cell::RefCell<batos::model::forward::cuda::CudaLlama>>),
}

impl<'m> Stepper<'m> {
    /// Runs `model` where `args` says (uploading it to the GPU for CUDA).
    pub fn new(model: &'m LlamaModel, args: &DeviceArgs) -> anyhow::Result<Self> {
        match args.device {
            Device::Cpu => Ok(Stepper::Cpu(model)),
            Device::Cuda(ordinal) => cuda_stepper(model, ordinal, args),
            other => anyhow::bail!("device {other:?} is not supported by this command"),
        }
    }

    /// Prepares for a fresh KV cache (the GPU mirror is re-allocated to its size).
    pub fn new_cache(&self, kv: &mut KvCacheManager) {
        match self {
            Stepper::Cpu(_) => {}
            #[cfg(feature = "cuda")]
            Stepper::Cuda(rt) => {
                kv.storage_mut().log_block_copies();
                rt.borrow_mut().reset_kv();
            }
        }
        let _ = kv;
    }

    /// One forward step.
    pub fn forward(
        &self,
        batch: &ForwardBatch,
        kv: &mut KvCacheManager,
    ) -> Result<ForwardOutput, ForwardError> {
        match self {
            Stepper::Cpu(m) => m.forward(batch, kv.storage_mut()),
            #[cfg(feature = "cuda")]
            Stepper::Cuda(rt) => rt.borrow_mut().forward(batch, kv.storage_mut(), None),
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn cuda_stepper<'m>(
    _model: &'m LlamaModel,
    ordinal: usize,
    _args: &DeviceArgs,
) -> anyhow::Result<Stepper<'m>> {
    anyhow::bail!("--device cuda:{ordinal}: this batos was built without CUDA support (rebuild with --features cuda)")
}

#[cfg(feature = "cuda")]
fn cuda_stepper<'m>(
    model: &'m LlamaModel,
    ordinal: usize,
    args: &DeviceArgs,
) -> anyhow::Result<Stepper<'m>> {
    use anyhow::Context;
    use batos::kernels::cuda::{CudaDevice, CudaDeviceConfig, KernelSource};
    use batos::model::forward::cuda::CudaLlama;
    let config = CudaDeviceConfig {
        ordinal,
        kernels: match &args.cuda_ptx_dir {
            Some(dir) => KernelSource::PrecompiledPtx(dir.clone()),
            None => KernelSource::Nvrtc,
        },
        ..Default::default()
    };
    let dev =
        CudaDevice::with_config(config).with_context(|| format!("--device cuda:{ordinal}"))?;
    dev.warm_up().context("loading the CUDA kernels")?;
    let (free, _) = dev
        .context()
        .mem_get_info()
        .context("querying the GPU's free memory")?;
    let budget = batos::types::MemoryBudget::new(format!("cuda:{ordinal}"), free as u64 / 10 * 9);
    let rt = CudaLlama::upload(model, dev, &budget).context("uploading the model to the GPU")?;
    Ok(Stepper::Cuda(Box::new(std::cell::RefCell::new(rt))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_parse() {
        assert_eq!(parse_device("cpu"), Ok(Device::Cpu));
        assert_eq!(parse_device("cuda"), Ok(Device::Cuda(0)));
        assert_eq!(parse_device("cuda:3"), Ok(Device::Cuda(3)));
        assert!(parse_device("gpu").is_err());
        assert!(parse_device("cuda:x").is_err());
    }
}
