//! GGUF, llama.cpp's single-file model format: a reader (memory-mapped), dequantization of
//! the common tensor types to f32, and a small writer used to build test models in code.
//!
//! Layout (all little-endian): magic `GGUF`, `u32` version (2 or 3), `u64` tensor count,
//! `u64` metadata count, the metadata key/value pairs, the tensor infos (name, dims with the
//! fastest-varying first, ggml type, offset relative to the data section), padding to
//! `general.alignment` (default 32), then the tensor data.

mod dequant;
mod metadata;
mod reader;
mod types;
mod write;

pub use dequant::dequantize;
pub use metadata::{GgufMetadata, GgufValue, GgufValueType};
pub use reader::{GgufFile, GgufTensorInfo};
pub use types::GgmlType;
pub use write::{GgufWriter, WriterTensor};

/// The default alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
