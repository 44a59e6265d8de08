//! batos-model: the Llama-family model for batos.
//!
//! This half is model I/O: a validated [`LlamaConfig`] (from HF `config.json` or GGUF
//! metadata), weight loaders (a native [`gguf`] reader with dequantization, and HF
//! [`safetensors_io`]), [`ModelWeights`] checked against the config, the [`ModelTokenizer`]
//! and [`ChatTemplate`], [`LoadedModel`] to get all of them in one call, and [`fetch`] for
//! the real model (SmolLM2-135M-Instruct).
//!
//! Conventions: tensors are row-major; linear weights are `[out_features, in_features]`;
//! Q/K rows are in HF layout (rotate-half RoPE) whatever the source format.
//!
//! ```no_run
//! use batos_model::{chat_template::{ChatMessage, GenerationPrompt}, LoadOptions, LoadedModel};
//! let path = batos_model::fetch::smollm2_gguf()?;
//! let model = LoadedModel::from_gguf(&path, &LoadOptions::default())?;
//! let prompt = model.chat_template.as_ref().unwrap()
//!     .render(&[ChatMessage::user("What is the capital of France?")], GenerationPrompt::Add)?;
//! let ids = model.tokenizer.encode_prompt(&prompt)?;
//! let q0 = &model.weights.layers()[0].q_proj; // [576, 576], f32, HF row layout
//! # Ok::<(), batos_model::ModelError>(())
//! ```

pub mod chat_template;
pub mod config;
mod error;
pub mod fetch;
pub mod forward;
pub mod generate;
pub mod gguf;
pub mod image;
mod mmap;
mod model;
pub mod quant;
pub mod safetensors_io;
pub mod synthetic;
pub mod tensor;
pub mod tokenizer;
pub mod weights;

pub use chat_template::{ChatMessage, ChatTemplate, GenerationPrompt, Role};
pub use config::{ArchFamily, LlamaConfig, LlamaParams, RopeScaling};
pub use error::{ModelError, Result};
pub use model::LoadedModel;
pub use tensor::{Tensor, TensorData};
pub use tokenizer::{ModelTokenizer, SpecialTokenText, SpecialTokens};
pub use weights::{LayerTensor, LayerWeights, LoadOptions, ModelWeights, Progress, TensorRole};
