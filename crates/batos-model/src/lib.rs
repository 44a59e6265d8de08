//! batos-model: the Llama-family model for batos.
//!
//! This half is model I/O: a validated [`LlamaConfig`] (from HF `config.json` or GGUF
//! metadata), weight loaders (native [`gguf`] reader with dequantization, HF safetensors),
//! [`ModelWeights`] checked against the config, the [`ModelTokenizer`] and [`ChatTemplate`],
//! and [`fetch`] for the real model (SmolLM2-135M-Instruct).
//!
//! Conventions: tensors are row-major; linear weights are `[out_features, in_features]`;
//! Q/K rows are in HF layout (rotate-half RoPE) whatever the source format.

pub mod config;
mod error;
pub mod fetch;
pub mod gguf;
mod mmap;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

pub use config::{ArchFamily, LlamaConfig, LlamaParams, RopeScaling};
pub use error::{ModelError, Result};
pub use tensor::{Tensor, TensorData};
pub use tokenizer::{ModelTokenizer, SpecialTokenText, SpecialTokens};
pub use weights::{LayerTensor, LayerWeights, LoadOptions, ModelWeights, Progress, TensorRole};
