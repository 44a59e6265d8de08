//! A small Llama built in code from seeded random weights, for offline tests and
//! benches: the same config and seed give the same model on every machine.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::forward::{ForwardError, LlamaModel, WeightDType};
use crate::{ArchFamily, LayerTensor, LlamaConfig, LlamaParams, ModelWeights, Tensor, TensorRole};

/// A tiny GQA model: 2 layers, hidden 64, 4 query / 2 KV heads of 16, MLP 96, vocab
/// 256, context 512, untied output projection. Big enough to exercise every code path,
/// fast even in debug builds.
///
/// Untied because random tied embeddings make every token predict itself (the residual
/// stream stays close to its own embedding row), so greedy output would be one token
/// repeated.
pub fn tiny_params() -> LlamaParams {
    LlamaParams {
        family: ArchFamily::Llama,
        num_hidden_layers: 2,
        hidden_size: 64,
        intermediate_size: 96,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        vocab_size: 256,
        max_position_embeddings: 512,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        sliding_window: None,
        bos_token_id: None,
        eos_token_ids: Vec::new(),
    }
}

/// One decoder layer's tensors in f32, HF layout (`[out_features, in_features]`).
#[derive(Clone, Debug)]
pub struct SyntheticLayer {
    pub input_layernorm: Vec<f32>,
    pub q_proj: Vec<f32>,
    pub k_proj: Vec<f32>,
    pub v_proj: Vec<f32>,
    pub o_proj: Vec<f32>,
    pub post_attention_layernorm: Vec<f32>,
    pub gate_proj: Vec<f32>,
    pub up_proj: Vec<f32>,
    pub down_proj: Vec<f32>,
}

/// A synthetic model's config and f32 tensors; tests compute reference outputs from
/// the tensors directly.
#[derive(Clone, Debug)]
pub struct SyntheticLlama {
    pub config: LlamaConfig,
    pub embed_tokens: Vec<f32>,
    pub layers: Vec<SyntheticLayer>,
    pub norm: Vec<f32>,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Vec<f32>>,
}

impl SyntheticLlama {
    /// Draws every tensor for `config` from a ChaCha8 stream seeded with `seed`.
    ///
    /// Linear weights are uniform in ±1/√in (the usual init scale, so activations stay
    /// O(1) through the layers); norm weights are near 1; the embedding and output
    /// projection are uniform in ±1, so logits spread over a few units and greedy
    /// choices are rarely near-ties.
    pub fn new(config: LlamaConfig, seed: u64) -> SyntheticLlama {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut uniform = |n: usize, scale: f32| -> Vec<f32> {
            (0..n).map(|_| rng.random_range(-scale..scale)).collect()
        };
        let hid = config.hidden_size;
        let (qw, kvw, ffn) = (config.q_dim(), config.kv_dim(), config.intermediate_size);
        let lin = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        let near_one = |v: Vec<f32>| v.into_iter().map(|x| 1.0 + x).collect();
        let embed_tokens = uniform(config.vocab_size * hid, 1.0);
        let layers = (0..config.num_hidden_layers)
            .map(|_| SyntheticLayer {
                input_layernorm: near_one(uniform(hid, 0.1)),
                q_proj: uniform(qw * hid, lin(hid)),
                k_proj: uniform(kvw * hid, lin(hid)),
                v_proj: uniform(kvw * hid, lin(hid)),
                o_proj: uniform(hid * qw, lin(qw)),
                post_attention_layernorm: near_one(uniform(hid, 0.1)),
                gate_proj: uniform(ffn * hid, lin(hid)),
                up_proj: uniform(ffn * hid, lin(hid)),
                down_proj: uniform(hid * ffn, lin(ffn)),
            })
            .collect();
        let norm = near_one(uniform(hid, 0.1));
        let lm_head = (!config.tie_word_embeddings).then(|| uniform(config.vocab_size * hid, 1.0));
        SyntheticLlama {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
        }
    }

    /// The tensors as loaded weights, the same path a real checkpoint takes.
    pub fn weights(&self) -> ModelWeights {
        let c = &self.config;
        let (hid, qw, kvw, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let t = |shape: Vec<usize>, v: &[f32]| {
            Tensor::from_f32(shape, v.to_vec()).expect("synthetic tensor sized from its shape")
        };
        let mut tensors = vec![
            (
                TensorRole::TokenEmbedding,
                t(vec![c.vocab_size, hid], &self.embed_tokens),
            ),
            (TensorRole::FinalNorm, t(vec![hid], &self.norm)),
        ];
        if let Some(head) = &self.lm_head {
            tensors.push((TensorRole::LmHead, t(vec![c.vocab_size, hid], head)));
        }
        for (layer, l) in self.layers.iter().enumerate() {
            let role = |tensor| TensorRole::Layer { layer, tensor };
            tensors.extend([
                (
                    role(LayerTensor::AttnNorm),
                    t(vec![hid], &l.input_layernorm),
                ),
                (role(LayerTensor::Q), t(vec![qw, hid], &l.q_proj)),
                (role(LayerTensor::K), t(vec![kvw, hid], &l.k_proj)),
                (role(LayerTensor::V), t(vec![kvw, hid], &l.v_proj)),
                (role(LayerTensor::O), t(vec![hid, qw], &l.o_proj)),
                (
                    role(LayerTensor::MlpNorm),
                    t(vec![hid], &l.post_attention_layernorm),
                ),
                (role(LayerTensor::Gate), t(vec![ffn, hid], &l.gate_proj)),
                (role(LayerTensor::Up), t(vec![ffn, hid], &l.up_proj)),
                (role(LayerTensor::Down), t(vec![hid, ffn], &l.down_proj)),
            ]);
        }
        ModelWeights::from_tensors(c, tensors, "synthetic model")
            .expect("synthetic tensors are drawn with the config's shapes")
    }

    /// The runnable model, its matrices stored in `dtype`.
    pub fn model(&self, dtype: WeightDType) -> Result<LlamaModel, ForwardError> {
        LlamaModel::from_weights(&self.config, &self.weights(), dtype)
    }
}
