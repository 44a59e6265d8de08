//! Errors of quantisation, calibration and AutoAWQ checkpoint I/O.

use std::path::PathBuf;

use crate::forward::ForwardError;
use crate::ModelError;

/// Why a quantisation, a calibration run or an AutoAWQ checkpoint failed. Each variant
/// names the tensor, file or setting at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// An int4 layout or its tensors are inconsistent.
    #[error("int4 weight '{name}': {source}")]
    BadInt4 {
        name: String,
        #[source]
        source: batos_kernels::KernelError,
    },
    /// A GGUF tensor cannot be kept as int4 (block type or shape).
    #[error("GGUF tensor '{name}' ({ggml_type}) cannot be kept as int4: {reason}")]
    GgufInt4 {
        name: String,
        ggml_type: String,
        reason: String,
    },
    /// A layer has float group offsets (GGUF Q4_1 minima), which the target format
    /// (an AutoAWQ checkpoint, the CUDA runtime) cannot represent.
    #[error("int4 weight '{name}' has nonzero group offsets (GGUF Q4_1 minima): {target} cannot hold them")]
    OffsetsUnsupported { name: String, target: &'static str },
    /// A tensor does not have the shape its role needs.
    #[error("tensor '{name}': expected shape {expected:?}, got {got} elements")]
    Shape {
        name: String,
        expected: Vec<usize>,
        got: usize,
    },
    /// A quantisation setting is out of range.
    #[error("invalid quantisation setting `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    /// The calibration text is too short for the settings.
    #[error("calibration: {reason}")]
    Calibration { reason: String },
    /// A checkpoint's `quantization_config` is missing or not AutoAWQ int4 GEMM.
    #[error("{}: {reason}", path.display())]
    UnsupportedCheckpoint { path: PathBuf, reason: String },
    /// A quantised layer of a checkpoint lacks one of its tensors.
    #[error("{}: '{name}' is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },
    /// A checkpoint tensor has the wrong type or shape.
    #[error("{}: tensor '{name}': {reason}", path.display())]
    BadTensor {
        path: PathBuf,
        name: String,
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Model I/O failed (config, tensors, tokenizer).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The forward pass failed (calibration or evaluation).
    #[error(transparent)]
    Forward(#[from] ForwardError),
    /// A kernel rejected its arguments.
    #[error("kernel call failed in {op}: {source}")]
    Kernel {
        op: &'static str,
        #[source]
        source: batos_kernels::KernelError,
    },
}

impl QuantError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        QuantError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
