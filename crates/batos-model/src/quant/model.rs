//! A Llama model whose seven linear projections per block are int4.

use crate::chat_template::ChatTemplate;
use crate::config::LlamaConfig;
use crate::tensor::Tensor;
use crate::tokenizer::ModelTokenizer;
use crate::weights::{LayerTensor, TensorRole};

use super::error::QuantError;
use super::int4::Int4Weight;

/// The seven quantised projections of a block, in [`LayerTensor`] order.
pub const LINEARS: [LayerTensor; 7] = [
    LayerTensor::Q,
    LayerTensor::K,
    LayerTensor::V,
    LayerTensor::O,
    LayerTensor::Gate,
    LayerTensor::Up,
    LayerTensor::Down,
];

/// One decoder block: f32 norms (AWQ folds its input scales into them) and int4
/// projections.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedLayer {
    /// RMSNorm weight before attention, `[hidden]`.
    pub attn_norm: Vec<f32>,
    pub q_proj: Int4Weight,
    pub k_proj: Int4Weight,
    pub v_proj: Int4Weight,
    pub o_proj: Int4Weight,
    /// RMSNorm weight before the MLP, `[hidden]`.
    pub mlp_norm: Vec<f32>,
    pub gate_proj: Int4Weight,
    pub up_proj: Int4Weight,
    pub down_proj: Int4Weight,
}

impl QuantizedLayer {
    /// The projection `t` (`None` for the norms).
    pub fn linear(&self, t: LayerTensor) -> Option<&Int4Weight> {
        Some(match t {
            LayerTensor::Q => &self.q_proj,
            LayerTensor::K => &self.k_proj,
            LayerTensor::V => &self.v_proj,
            LayerTensor::O => &self.o_proj,
            LayerTensor::Gate => &self.gate_proj,
            LayerTensor::Up => &self.up_proj,
            LayerTensor::Down => &self.down_proj,
            _ => return None,
        })
    }

    /// Bytes held by the block.
    pub fn size_in_bytes(&self) -> usize {
        LINEARS
            .iter()
            .filter_map(|&t| self.linear(t))
            .map(Int4Weight::size_in_bytes)
            .sum::<usize>()
            + 4 * (self.attn_norm.len() + self.mlp_norm.len())
    }
}

/// The token embedding of an int4 model: dense, or int4 (`[vocab, hidden]` as an
/// output-major linear layer, groups along `hidden`) when the head is tied to it and
/// quantised with it.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantizedEmbedding {
    /// Kept in its original element type (what AutoAWQ does).
    Dense(Tensor),
    /// int4 in AutoAWQ's layout; the embedding gathers dequantised rows, the tied head
    /// multiplies them on the fly.
    Int4(Int4Weight),
}

impl QuantizedEmbedding {
    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            QuantizedEmbedding::Dense(t) => match t.shape() {
                [r, c] => [*r, *c],
                other => [other.iter().product(), 1],
            },
            QuantizedEmbedding::Int4(w) => [w.rows(), w.cols()],
        }
    }

    /// The table as row-major f32 (dequantised when int4).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            QuantizedEmbedding::Dense(t) => t.to_f32_vec(),
            QuantizedEmbedding::Int4(w) => w.dequantize(),
        }
    }

    /// Bytes held.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            QuantizedEmbedding::Dense(t) => t.as_bytes().len(),
            QuantizedEmbedding::Int4(w) => w.size_in_bytes(),
        }
    }
}

/// All weights of an int4 Llama: embedding (dense or int4), final norm and (untied)
/// head, int4 blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedWeights {
    pub embed_tokens: QuantizedEmbedding,
    pub layers: Vec<QuantizedLayer>,
    pub norm: Tensor,
    /// `None` when the head is tied to the embedding.
    pub lm_head: Option<Tensor>,
    /// Inputs sharing one scale and zero point (the same in every projection).
    pub group_size: usize,
}

impl QuantizedWeights {
    /// Checks every tensor against `config` (shapes, one group size).
    pub fn validate(&self, config: &LlamaConfig) -> Result<(), QuantError> {
        let shape = |name: String, t: &Tensor, expected: Vec<usize>| {
            if t.shape() == expected.as_slice() {
                Ok(())
            } else {
                Err(QuantError::Shape {
                    name,
                    expected,
                    got: t.len(),
                })
            }
        };
        let (h, v) = (config.hidden_size, config.vocab_size);
        let embed = self.embed_tokens.shape();
        if embed != [v, h] {
            return Err(QuantError::Shape {
                name: TensorRole::TokenEmbedding.hf_name(),
                expected: vec![v, h],
                got: embed[0] * embed[1],
            });
        }
        if let QuantizedEmbedding::Int4(w) = &self.embed_tokens {
            if !config.tie_word_embeddings {
                return Err(QuantError::InvalidConfig {
                    field: "embed_tokens",
                    reason: "an int4 embedding needs the head tied to it".into(),
                });
            }
            if w.offsets().is_some() {
                return Err(QuantError::OffsetsUnsupported {
                    name: TensorRole::TokenEmbedding.hf_name(),
                    target: "the int4 embedding gather",
                });
            }
            if w.layout().group_size() != self.group_size {
                return Err(QuantError::InvalidConfig {
                    field: "group_size",
                    reason: format!(
                        "the int4 embedding has group size {}, the model {}",
                        w.layout().group_size(),
                        self.group_size
                    ),
                });
            }
        }
        shape(TensorRole::FinalNorm.hf_name(), &self.norm, vec![h])?;
        match (&self.lm_head, config.tie_word_embeddings) {
            (Some(t), false) => shape(TensorRole::LmHead.hf_name(), t, vec![v, h])?,
            (None, true) => {}
            (_, tied) => {
                return Err(QuantError::InvalidConfig {
                    field: "lm_head",
                    reason: format!(
                    "the config says tie_word_embeddings = {tied} but the weights {} an lm_head",
                    if tied { "have" } else { "lack" }
                ),
                })
            }
        }
        if self.layers.len() != config.num_hidden_layers {
            return Err(QuantError::InvalidConfig {
                field: "num_hidden_layers",
                reason: format!(
                    "{} quantised blocks, config says {}",
                    self.layers.len(),
                    config.num_hidden_layers
                ),
            });
        }
        for (layer, l) in self.layers.iter().enumerate() {
            for (what, norm) in [("attn_norm", &l.attn_norm), ("mlp_norm", &l.mlp_norm)] {
                if norm.len() != h {
                    return Err(QuantError::Shape {
                        name: format!("model.layers.{layer}.{what}"),
                        expected: vec![h],
                        got: norm.len(),
                    });
                }
            }
            for t in LINEARS {
                let role = TensorRole::Layer { layer, tensor: t };
                let expected = role.expected_shape(config);
                let w = l.linear(t).expect("LINEARS are projections");
                if [w.rows(), w.cols()] != expected[..] {
                    return Err(QuantError::Shape {
                        name: role.hf_name(),
                        expected,
                        got: w.rows() * w.cols(),
                    });
                }
                if w.layout().group_size() != self.group_size {
                    return Err(QuantError::InvalidConfig {
                        field: "group_size",
                        reason: format!(
                            "{} has group size {}, the model {}",
                            role.hf_name(),
                            w.layout().group_size(),
                            self.group_size
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// The first projection with nonzero group offsets (GGUF Q4_1 minima), by name.
    pub fn first_with_offsets(&self) -> Option<String> {
        self.layers.iter().enumerate().find_map(|(layer, l)| {
            LINEARS.iter().find_map(|&t| {
                let w = l.linear(t).expect("LINEARS are projections");
                w.has_nonzero_offsets()
                    .then(|| TensorRole::Layer { layer, tensor: t }.hf_name())
            })
        })
    }

    /// Bytes held by all weights.
    pub fn size_in_bytes(&self) -> usize {
        let dense = |t: &Tensor| t.as_bytes().len();
        self.embed_tokens.size_in_bytes()
            + dense(&self.norm)
            + self.lm_head.as_ref().map_or(0, dense)
            + self
                .layers
                .iter()
                .map(QuantizedLayer::size_in_bytes)
                .sum::<usize>()
    }
}

/// An int4 model ready to run or save: config, weights, tokenizer, chat template.
#[derive(Clone, Debug)]
pub struct QuantizedModel {
    pub config: LlamaConfig,
    pub weights: QuantizedWeights,
    pub tokenizer: ModelTokenizer,
    pub chat_template: Option<ChatTemplate>,
}
