//! [`CudaDevice`]: a context, its compute stream, the memory pool and the
//! per-device cache of loaded kernel modules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};

use super::error::{CudaError, CudaResult};
use super::pool::{CudaElem, DeviceBuffer, MemoryPool};
use super::registry::{self, Arch, CompileConfig, KernelSource, ModuleId};

/// Checks that the NVIDIA driver library can be loaded, without calling into it.
///
/// cudarc loads libcuda lazily and panics on its first driver call when the
/// library is missing; probing first turns that into [`CudaError::NoDriver`].
pub fn probe_driver() -> CudaResult<()> {
    // SAFETY: `is_culib_present` only `dlopen`s cudarc's candidate names (the same
    // list its lazy loader uses) and drops the handles; no driver function runs.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::NoDriver {
            tried: registry::candidates("cuda"),
        })
    }
}

/// Number of CUDA devices, or the typed reason there are none to count.
pub fn device_count() -> CudaResult<usize> {
    probe_driver()?;
    registry::guard("device_count", || {
        CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .map_err(CudaError::driver("cuDeviceGetCount"))
    })
}

/// How to open a [`CudaDevice`].
#[derive(Clone, Debug)]
pub struct CudaDeviceConfig {
    /// Device ordinal.
    pub ordinal: usize,
    /// Where kernel PTX comes from.
    pub kernels: KernelSource,
    /// Bytes the memory pool may keep cached after buffers are dropped.
    pub pool_cache_bytes: usize,
}

impl Default for CudaDeviceConfig {
    fn default() -> Self {
        CudaDeviceConfig {
            ordinal: 0,
            kernels: KernelSource::Nvrtc,
            pool_cache_bytes: 1 << 30,
        }
    }
}

/// One GPU: context, compute stream, memory pool, kernel cache.
///
/// Every launcher and pooled buffer of this crate works in order on one compute
/// stream ([`CudaDevice::stream`]); cudarc's cross-stream event tracking is off.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    pool: MemoryPool,
    arch: Arch,
    name: String,
    sms: usize,
    kernels: KernelSource,
    modules: Mutex<HashMap<ModuleId, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ctx.ordinal())
            .field("name", &self.name)
            .field("arch", &self.arch)
            .finish()
    }
}

impl CudaDevice {
    /// Opens device `ordinal` with default settings (NVRTC kernels).
    pub fn new(ordinal: usize) -> CudaResult<Arc<Self>> {
        Self::with_config(CudaDeviceConfig {
            ordinal,
            ..Default::default()
        })
    }

    /// Opens a device. Fails with [`CudaError::NoDriver`] / [`CudaError::NoDevice`]
    /// on machines without a usable GPU.
    pub fn with_config(config: CudaDeviceConfig) -> CudaResult<Arc<Self>> {
        let count = device_count()?;
        if config.ordinal >= count {
            return Err(CudaError::NoDevice {
                ordinal: config.ordinal,
                count,
            });
        }
        registry::guard("open device", || {
            let ctx = CudaContext::new(config.ordinal).map_err(CudaError::driver("cuCtxCreate"))?;
            let (major, minor) = ctx
                .compute_capability()
                .map_err(CudaError::driver("compute capability"))?;
            let arch =
                Arch::for_compute_capability(major, minor).ok_or(CudaError::UnsupportedDevice {
                    ordinal: config.ordinal,
                    major,
                    minor,
                })?;
            // SAFETY: called before this context allocates anything. All pooled
            // buffers are allocated, used, copied and freed in order on the one compute
            // stream, so cudarc's per-buffer cross-stream events (a cuEventRecord per
            // kernel argument) are not needed; `new_stream` documents that callers
            // synchronise before sharing buffers with another stream.
            unsafe { ctx.disable_event_tracking() };
            let name = ctx.name().map_err(CudaError::driver("device name"))?;
            let sms = ctx
                .attribute(
                    cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
                )
                .map_err(CudaError::driver("device attribute"))?
                .max(1) as usize;
            let stream = ctx
                .new_stream()
                .map_err(CudaError::driver("cuStreamCreate"))?;
            let pool = MemoryPool::new(stream.clone(), config.pool_cache_bytes);
            tracing::info!(ordinal = config.ordinal, %name, arch = arch.as_str(), "opened CUDA device");
            Ok(Arc::new(CudaDevice {
                ctx,
                stream,
                pool,
                arch,
                name,
                sms,
                kernels: config.kernels.clone(),
                modules: Mutex::new(HashMap::new()),
                functions: Mutex::new(HashMap::new()),
            }))
        })
    }

    /// The device's name as the driver reports it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The architecture kernels are compiled for.
    pub fn arch(&self) -> Arch {
        self.arch
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// The underlying cudarc context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The compute stream every launcher in this crate uses.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A new stream on this device (for copies overlapping compute). Pool buffers
    /// are ordered on [`CudaDevice::stream`]; synchronise before sharing them.
    pub fn new_stream(&self) -> CudaResult<Arc<CudaStream>> {
        self.ctx
            .new_stream()
            .map_err(CudaError::driver("cuStreamCreate"))
    }

    /// The caching memory pool.
    pub fn pool(&self) -> &MemoryPool {
        &self.pool
    }

    /// Waits for all work queued on the compute stream.
    pub fn synchronize(&self) -> CudaResult<()> {
        self.stream
            .synchronize()
            .map_err(CudaError::driver("synchronize"))
    }

    /// Multiprocessor count (for sizing grids).
    pub fn multiprocessors(&self) -> usize {
        self.sms
    }

    /// Uploads `host` into a new pooled buffer.
    pub fn upload<T: CudaElem>(&self, host: &[T]) -> CudaResult<DeviceBuffer<T>> {
        self.pool.upload(host)
    }

    /// A new zeroed pooled buffer.
    pub fn zeros<T: CudaElem>(&self, len: usize) -> CudaResult<DeviceBuffer<T>> {
        self.pool.alloc_zeros(len)
    }

    /// A new pooled buffer with unspecified contents (for outputs a kernel fully writes).
    pub fn alloc<T: CudaElem>(&self, len: usize) -> CudaResult<DeviceBuffer<T>> {
        self.pool.alloc(len)
    }

    /// Loads (compiling on first use) a kernel module and caches it on this device.
    pub fn module(&self, id: ModuleId) -> CudaResult<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(&id) {
            return Ok(m.clone());
        }
        let ptx = match &self.kernels {
            KernelSource::PrecompiledPtx(dir) => {
                match registry::load_precompiled(dir, id, self.arch)? {
                    Some(text) => text,
                    None => {
                        tracing::warn!(module = id.name(), dir = %dir.display(), "no precompiled PTX; compiling with NVRTC");
                        registry::compile_ptx(id, self.arch, &CompileConfig::default())?
                    }
                }
            }
            KernelSource::Nvrtc => registry::compile_ptx(id, self.arch, &CompileConfig::default())?,
        };
        let module = registry::guard("load module", || {
            self.ctx
                .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                .map_err(CudaError::driver("cuModuleLoadData"))
        })?;
        tracing::debug!(
            module = id.name(),
            arch = self.arch.as_str(),
            "loaded CUDA module"
        );
        modules.insert(id, module.clone());
        Ok(module)
    }

    /// A kernel entry point of `id`, cached by name.
    pub fn function(&self, id: ModuleId, name: &str) -> CudaResult<CudaFunction> {
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(f.clone());
        }
        let module = self.module(id)?;
        let f = module
            .load_function(name)
            .map_err(CudaError::driver("cuModuleGetFunction"))?;
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Compiles and loads every module now (so first-token latency excludes NVRTC).
    pub fn warm_up(&self) -> CudaResult<()> {
        for id in ModuleId::ALL {
            self.module(id)?;
        }
        Ok(())
    }
}
