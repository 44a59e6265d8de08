//! The crate's one error type.

use thiserror::Error;

/// Everything a kernel call can reject. Bad shapes and ids are reported with the
/// operation name and the sizes involved; kernels never panic on bad input.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum KernelError {
    /// A buffer does not have the length the other arguments imply.
    #[error("{op}: `{what}` has {got} elements, expected {expected}")]
    LengthMismatch {
        op: &'static str,
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A buffer's length is not a whole number of rows.
    #[error("{op}: `{what}` has {len} elements, not a multiple of the row length {row_len}")]
    NotWholeRows {
        op: &'static str,
        what: &'static str,
        len: usize,
        row_len: usize,
    },
    /// A shape or configuration value is out of its domain.
    #[error("{op}: invalid {what}: {reason}")]
    InvalidShape {
        op: &'static str,
        what: &'static str,
        reason: String,
    },
    /// A token id is not a row of the embedding table.
    #[error("{op}: token id {id} is out of range for a table of {rows} rows")]
    TokenOutOfRange {
        op: &'static str,
        id: u32,
        rows: usize,
    },
    /// A KV-cache slot lies outside the cache.
    #[error("{op}: slot {slot} is out of range for a cache of {capacity} slots")]
    SlotOutOfRange {
        op: &'static str,
        slot: usize,
        capacity: usize,
    },
    /// A block table names a block outside the cache, or is too short for its context.
    #[error("{op}: sequence {seq}: {reason}")]
    BadBlockTable {
        op: &'static str,
        seq: usize,
        reason: String,
    },
    /// A sampling parameter is outside its valid range.
    #[error("invalid sampling parameter `{name}` = {value}: expected {expected}")]
    InvalidSamplingParam {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A kernel path was forced that this CPU cannot run (its instructions are missing).
    #[error("{op}: the {path} path needs CPU features this machine lacks ({needs})")]
    CpuPathUnavailable {
        op: &'static str,
        path: &'static str,
        needs: &'static str,
    },
    /// A CUDA device was asked for, but this build has no CUDA backend.
    #[error(
        "{op}: CUDA device {ordinal} requested, but batos-kernels was built without the `cuda` feature"
    )]
    CudaNotCompiled { op: &'static str, ordinal: usize },
    /// The CUDA backend failed: no driver or device, NVRTC, or a driver call.
    #[cfg(feature = "cuda")]
    #[error("{op}: {source}")]
    Cuda {
        op: &'static str,
        source: crate::cuda::SharedCudaError,
    },
}

/// Shorthand used throughout the crate.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;
