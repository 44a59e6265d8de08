//! Helpers shared by the AWQ tests: a synthetic model with a word-level tokenizer.
#![allow(dead_code)]

use batos_model::synthetic::{tiny_params, SyntheticLlama};
use batos_model::{LlamaConfig, LlamaParams, ModelTokenizer};

/// Synthetic parameters whose widths suit int4 groups of 32 (AWQ needs `out % 8 == 0`
/// and `in % group == 0`).
pub fn awq_params() -> LlamaParams {
    LlamaParams {
        hidden_size: 64,
        intermediate_size: 128,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        ..tiny_params()
    }
}

pub fn synthetic(seed: u64) -> SyntheticLlama {
    SyntheticLlama::new(LlamaConfig::new(awq_params()).unwrap(), seed)
}

/// A word-level tokenizer over tokens `t0 … t{vocab-1}`.
pub fn word_tokenizer(vocab: usize) -> ModelTokenizer {
    let words: serde_json::Map<String, serde_json::Value> = (0..vocab)
        .map(|i| (format!("t{i}"), serde_json::Value::from(i)))
        .collect();
    let json = serde_json::json!({
        "special_tokens": {
            "bos": null, "eos": 1, "pad": null, "unk": 0,
            "add_bos": false, "add_eos": false
        },
        "tokenizer": {
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [],
            "normalizer": null,
            "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null,
            "decoder": null,
            "model": {"type": "WordLevel", "vocab": words, "unk_token": "t0"}
        }
    });
    ModelTokenizer::from_json(&json.to_string()).unwrap()
}

/// A deterministic token stream with some structure (a repeated pattern plus noise).
pub fn token_stream(len: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if i % 3 == 0 {
                (s % vocab as u64) as u32
            } else {
                ((i * 7 + 3) % vocab) as u32
            }
        })
        .collect()
}
