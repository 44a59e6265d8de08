//! Tiny synthetic Llama models written as GGUF files or HF directories.

use std::path::Path;

use batos_model::gguf::{GgmlType, GgufValue, GgufValueType, GgufWriter, WriterTensor};
use batos_model::weights::permute_rope_rows;
use batos_model::{ArchFamily, LayerTensor, LlamaConfig, LlamaParams, TensorRole};

pub fn tiny_params() -> LlamaParams {
    LlamaParams {
        family: ArchFamily::Llama,
        num_hidden_layers: 2,
        hidden_size: 32,
        intermediate_size: 64,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        vocab_size: 40,
        max_position_embeddings: 128,
        rope_theta: 10_000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        sliding_window: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

pub fn tiny_config() -> LlamaConfig {
    LlamaConfig::new(tiny_params()).unwrap()
}

/// Deterministic weights, all multiples of 1/64 in [-0.5, 0.5] so they are exact in f16,
/// bf16 and in Q8_0 with scale 1/64.
pub fn tiny_weights(cfg: &LlamaConfig) -> Vec<(TensorRole, Vec<f32>)> {
    TensorRole::all_for(cfg)
        .into_iter()
        .enumerate()
        .map(|(r, role)| {
            let n: usize = role.expected_shape(cfg).iter().product();
            let v = (0..n)
                .map(|i| (((i * 31 + r * 17) % 65) as f32 - 32.0) / 64.0)
                .collect();
            (role, v)
        })
        .collect()
}

/// Q8_0 blocks with scale 1/64 for values that are multiples of 1/64.
pub fn q8_0_exact(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    for block in values.chunks(32) {
        out.extend(half::f16::from_f32(1.0 / 64.0).to_le_bytes());
        out.extend(block.iter().map(|v| ((v * 64.0).round() as i8) as u8));
    }
    out
}

/// A GGUF writer holding `cfg`'s metadata and `weights` the way llama.cpp's converter
/// stores them: GGUF names, Q/K rows permuted; `ffn_down` as Q8_0 and norms as F16 to
/// exercise the decoders.
pub fn tiny_gguf(cfg: &LlamaConfig, weights: &[(TensorRole, Vec<f32>)]) -> GgufWriter {
    let mut w = GgufWriter::new();
    let u32v = |x: usize| GgufValue::U32(x as u32);
    w.metadata("general.architecture", GgufValue::String("llama".into()))
        .metadata("llama.block_count", u32v(cfg.num_hidden_layers))
        .metadata("llama.context_length", u32v(cfg.max_position_embeddings))
        .metadata("llama.embedding_length", u32v(cfg.hidden_size))
        .metadata("llama.feed_forward_length", u32v(cfg.intermediate_size))
        .metadata("llama.attention.head_count", u32v(cfg.num_attention_heads))
        .metadata(
            "llama.attention.head_count_kv",
            u32v(cfg.num_key_value_heads),
        )
        .metadata("llama.rope.freq_base", GgufValue::F32(cfg.rope_theta))
        .metadata("llama.rope.dimension_count", u32v(cfg.head_dim))
        .metadata(
            "llama.attention.layer_norm_rms_epsilon",
            GgufValue::F32(cfg.rms_norm_eps),
        )
        .metadata("llama.vocab_size", u32v(cfg.vocab_size))
        .metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(1))
        .metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(2));
    for (role, values) in weights {
        let shape = role.expected_shape(cfg);
        let mut v = values.clone();
        let t = match role {
            TensorRole::Layer {
                tensor: LayerTensor::Q,
                ..
            } => {
                permute_rope_rows(
                    &mut v,
                    cfg.num_attention_heads,
                    cfg.head_dim,
                    cfg.hidden_size,
                );
                WriterTensor::f32(role.gguf_name(), &shape, &v)
            }
            TensorRole::Layer {
                tensor: LayerTensor::K,
                ..
            } => {
                permute_rope_rows(
                    &mut v,
                    cfg.num_key_value_heads,
                    cfg.head_dim,
                    cfg.hidden_size,
                );
                WriterTensor::f32(role.gguf_name(), &shape, &v)
            }
            TensorRole::Layer {
                tensor: LayerTensor::Down,
                ..
            } => WriterTensor::raw(role.gguf_name(), &shape, GgmlType::Q8_0, q8_0_exact(&v)),
            TensorRole::Layer {
                tensor: LayerTensor::AttnNorm | LayerTensor::MlpNorm,
                ..
            } => WriterTensor::f16(role.gguf_name(), &shape, &v),
            _ => WriterTensor::f32(role.gguf_name(), &shape, &v),
        };
        w.tensor(t);
    }
    w
}

/// The GPT-2 byte-level alphabet, sorted: one token per byte.
pub fn byte_alphabet() -> Vec<String> {
    let mut a: Vec<String> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .map(String::from)
        .collect();
    a.sort();
    a
}

/// Tokenizer metadata of a small byte-level BPE: 3 control tokens, the byte alphabet, and
/// merges building "th", "the", "Ġthe", "42".
pub fn tokenizer_metadata(w: &mut GgufWriter, pre: &str) {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    tokens.extend(byte_alphabet());
    let merges = ["t h", "th e", "Ġ the", "4 2"];
    tokens.extend(["th", "the", "Ġthe", "42"].map(String::from));
    let types: Vec<GgufValue> = (0..tokens.len())
        .map(|i| GgufValue::I32(if i < 3 { 3 } else { 1 }))
        .collect();
    w.metadata("tokenizer.ggml.model", GgufValue::String("gpt2".into()))
        .metadata("tokenizer.ggml.pre", GgufValue::String(pre.into()))
        .metadata(
            "tokenizer.ggml.tokens",
            GgufValue::Array(GgufValueType::String, tokens.into_iter().map(GgufValue::String).collect()),
        )
        .metadata(
            "tokenizer.ggml.merges",
            GgufValue::Array(
                GgufValueType::String,
                merges.iter().map(|m| GgufValue::String((*m).into())).collect(),
            ),
        )
        .metadata("tokenizer.ggml.token_type", GgufValue::Array(GgufValueType::I32, types))
        .metadata("tokenizer.ggml.bos_token_id", GgufValue::U32(1))
        .metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(2))
        .metadata("tokenizer.ggml.padding_token_id", GgufValue::U32(2))
        .metadata("tokenizer.ggml.add_bos_token", GgufValue::Bool(false))
        .metadata(
            "tokenizer.chat_template",
            GgufValue::String(
                "{% for m in messages %}{{ bos_token }}{{ m.role }}\n{{ m.content }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}{{ bos_token }}assistant\n{% endif %}".into(),
            ),
        );
}

/// An HF `config.json` for `cfg`.
pub fn hf_config_json(cfg: &LlamaConfig) -> String {
    serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "num_hidden_layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
    })
    .to_string()
}

/// A safetensors tensor to write: HF name, dtype, shape, f32 values (encoded to `dtype`).
pub struct StTensor {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

pub fn st_tensor(
    role: &TensorRole,
    cfg: &LlamaConfig,
    values: &[f32],
    dtype: safetensors::Dtype,
) -> StTensor {
    StTensor {
        name: role.hf_name(),
        dtype,
        shape: role.expected_shape(cfg),
        values: values.to_vec(),
    }
}

pub fn encode(t: &StTensor) -> Vec<u8> {
    match t.dtype {
        safetensors::Dtype::F32 => t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        safetensors::Dtype::F16 => t
            .values
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        safetensors::Dtype::BF16 => t
            .values
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        safetensors::Dtype::I32 => t
            .values
            .iter()
            .flat_map(|&v| (v as i32).to_le_bytes())
            .collect(),
        other => panic!("test helper does not encode {other:?}"),
    }
}

pub fn write_safetensors(path: &Path, tensors: &[StTensor]) {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(encode).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            (
                t.name.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}
