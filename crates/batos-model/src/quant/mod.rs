//! int4 quantisation of the base model: AutoAWQ-compatible weights, round-to-nearest
//! and activation-aware (AWQ) quantisers, checkpoint I/O, perplexity.
//!
//! - [`Int4Weight`]: one projection in AutoAWQ's GEMM layout (`qweight`, `qzeros`,
//!   `scales`), asymmetric int4 with a zero point per group of inputs.
//! - [`QuantizedModel`]: config, int4 blocks, dense embedding/norms/head, tokenizer;
//!   [`QuantizedModel::save_autoawq`] / [`QuantizedModel::load_autoawq`] read and write
//!   AutoAWQ checkpoint directories.
//!
//! LoRA adapters stay f32 beside the int4 base: nothing here touches them.

mod awq;
mod checkpoint;
mod error;
mod eval;
mod gguf_int4;
mod gptq;
mod int4;
mod model;
mod rtn;

pub use awq::{
    quantize_awq, quantize_weights_awq, AwqConfig, AwqOutcome, Calibration, ClipSearch,
    Compensation, EmbeddingQuant, LayerSearch, SHIPPED_CALIBRATION_TEXT, SHIPPED_HELDOUT_TEXT,
};
pub use checkpoint::AwqCheckpointConfig;
pub use checkpoint::OFFSETS_SUFFIX;
pub use error::QuantError;
pub use eval::{perplexity, sequence_logits, Perplexity};
pub use gguf_int4::{int4_from_gguf, GgufInt4Model, GGUF_Q4_GROUP};
pub use int4::{fake_quantize, Int4Weight};
pub use model::{QuantizedEmbedding, QuantizedLayer, QuantizedModel, QuantizedWeights, LINEARS};
pub use rtn::{quantize_rtn, quantize_weights_rtn};
