//! The CUDA backend's error type, a sub-enum of the crate's error.

use std::path::PathBuf;

/// Everything that can go wrong on the CUDA path. Absence of a GPU or of the
/// driver library is an ordinary, typed outcome ([`CudaError::NoDriver`],
/// [`CudaError::NoDevice`]), never a panic.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// The NVIDIA driver library (libcuda.so.1) could not be loaded.
    #[error("no CUDA driver library found (tried {tried:?}); install an NVIDIA driver or put libcuda on LD_LIBRARY_PATH")]
    NoDriver {
        /// The library names that were tried.
        tried: Vec<String>,
    },
    /// The driver loaded but the requested device does not exist.
    #[error("CUDA device {ordinal} not present ({count} device(s) visible)")]
    NoDevice {
        /// The ordinal that was asked for.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },
    /// The device is older than the kernels support.
    #[error("CUDA device {ordinal} has compute capability {major}.{minor}; batos kernels need 8.0 or newer")]
    UnsupportedDevice {
        /// Device ordinal.
        ordinal: usize,
        /// Compute capability, major.
        major: i32,
        /// Compute capability, minor.
        minor: i32,
    },
    /// NVRTC is needed (no precompiled PTX) but could not be loaded.
    #[error("NVRTC library not found (tried {tried:?}) and no precompiled PTX for module `{module}`; set LD_LIBRARY_PATH or use KernelSource::PrecompiledPtx")]
    NoNvrtc {
        /// The module that needed compiling.
        module: &'static str,
        /// The library names that were tried.
        tried: Vec<String>,
    },
    /// NVRTC rejected a module.
    #[error("NVRTC failed to compile module `{module}` for {arch}: {log}")]
    Compile {
        /// Module name.
        module: &'static str,
        /// Target architecture, e.g. `sm_90`.
        arch: &'static str,
        /// The compiler's log or error.
        log: String,
    },
    /// A precompiled PTX file could not be read.
    #[error("cannot read precompiled PTX {path}: {source}")]
    PtxFile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A CUDA driver call failed.
    #[error("CUDA driver error in {op}: {source}")]
    Driver {
        /// What was being done.
        op: &'static str,
        /// The driver's status.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// The CUDA library panicked (for example on a missing symbol); caught and reported.
    #[error("CUDA library panicked in {op}: {message}")]
    LibraryPanic {
        /// What was being done.
        op: &'static str,
        /// The panic message.
        message: String,
    },
    /// A buffer has the wrong number of elements for the requested operation.
    #[error("{op}: `{what}` has {got} elements, expected {expected}")]
    Shape {
        /// Operation.
        op: &'static str,
        /// Which argument.
        what: &'static str,
        /// Required element count.
        expected: usize,
        /// Actual element count.
        got: usize,
    },
    /// Arguments that are individually well-formed but not acceptable together.
    #[error("{op}: invalid argument: {reason}")]
    InvalidArgument {
        /// Operation.
        op: &'static str,
        /// Why.
        reason: String,
    },
}

impl CudaError {
    pub(crate) fn driver(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Self {
        move |source| CudaError::Driver { op, source }
    }

    pub(crate) fn invalid(op: &'static str, reason: impl Into<String>) -> Self {
        CudaError::InvalidArgument {
            op,
            reason: reason.into(),
        }
    }

    /// Checks `got == expected` for argument `what` of `op`.
    pub(crate) fn check_len(
        op: &'static str,
        what: &'static str,
        expected: usize,
        got: usize,
    ) -> Result<(), Self> {
        if expected == got {
            Ok(())
        } else {
            Err(CudaError::Shape {
                op,
                what,
                expected,
                got,
            })
        }
    }
}

/// Result alias of the CUDA backend.
pub type CudaResult<T> = Result<T, CudaError>;

/// A [`CudaError`] behind an `Arc`, so that the crate's `KernelError` (which is
/// `Clone + PartialEq`) can carry it as its `Cuda` variant's source.
#[derive(Clone, Debug)]
pub struct SharedCudaError(pub std::sync::Arc<CudaError>);

impl SharedCudaError {
    /// The underlying error.
    pub fn get(&self) -> &CudaError {
        &self.0
    }
}

impl From<CudaError> for SharedCudaError {
    fn from(e: CudaError) -> Self {
        SharedCudaError(std::sync::Arc::new(e))
    }
}

/// Two shared errors are equal when they are the same error or render the same.
impl PartialEq for SharedCudaError {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl std::fmt::Display for SharedCudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedCudaError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}
