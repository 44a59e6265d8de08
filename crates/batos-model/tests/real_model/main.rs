//! Conformance of the I/O half on the real model, SmolLM2-135M-Instruct (Q4_1 GGUF), against
//! ../shared/reference. Each test fetches the model into the cache (see `batos_model::fetch`)
//! and prints a SKIP line if it cannot.

#[path = "../common/mod.rs"]
mod common;
mod logits;

use std::collections::BTreeMap;

use batos_model::gguf::{GgmlType, GgufFile};
use batos_model::{
    ChatMessage, ChatTemplate, GenerationPrompt, LlamaConfig, ModelTokenizer, SpecialTokenText,
};
use common::{ids, real_model, reference_json};

#[test]
fn config_from_gguf_matches_hf_summary() {
    let (Some(path), Some(summary)) = (
        real_model("config_from_gguf_matches_hf_summary"),
        reference_json(
            "config_from_gguf_matches_hf_summary",
            "hf_model_summary.json",
        ),
    ) else {
        return;
    };
    let gguf = GgufFile::open(&path).unwrap();
    let cfg = LlamaConfig::from_gguf(&gguf).unwrap();
    let u = |k: &str| summary[k].as_u64().unwrap() as usize;
    assert_eq!(cfg.num_hidden_layers, u("num_hidden_layers"));
    assert_eq!(cfg.hidden_size, u("hidden_size"));
    assert_eq!(cfg.num_attention_heads, u("num_attention_heads"));
    assert_eq!(cfg.num_key_value_heads, u("num_key_value_heads"));
    assert_eq!(cfg.head_dim, u("head_dim"));
    assert_eq!(cfg.intermediate_size, u("intermediate_size"));
    assert_eq!(cfg.vocab_size, u("vocab_size"));
    assert_eq!(cfg.max_position_embeddings, u("max_position_embeddings"));
    assert_eq!(
        cfg.rope_theta,
        summary["rope_theta"].as_f64().unwrap() as f32
    );
    assert_eq!(cfg.rope_scaling, None, "reference rope_type is 'default'");
    assert_eq!(
        cfg.rms_norm_eps,
        summary["rms_norm_eps"].as_f64().unwrap() as f32
    );
    assert_eq!(
        cfg.tie_word_embeddings,
        summary["tie_word_embeddings"].as_bool().unwrap()
    );
    assert_eq!(
        cfg.bos_token_id,
        Some(summary["bos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        cfg.eos_token_ids,
        vec![summary["eos_token_id"].as_u64().unwrap() as u32]
    );
}

#[test]
fn gguf_tensor_inventory() {
    let Some(path) = real_model("gguf_tensor_inventory") else {
        return;
    };
    let gguf = GgufFile::open(&path).unwrap();
    assert_eq!(gguf.version(), 3);
    let mut by_type: BTreeMap<String, usize> = BTreeMap::new();
    for t in gguf.tensors() {
        *by_type.entry(t.ggml_type.to_string()).or_default() += 1;
        assert!(
            t.ggml_type.can_dequantize(),
            "{} is {}",
            t.name,
            t.ggml_type
        );
    }
    println!("tensor types in the real GGUF: {by_type:?}");
    // 30 blocks x 7 linear weights are Q4_1; the embedding is Q8_0; the 61 norms are F32;
    // there is no output.weight (tied head).
    assert_eq!(by_type.get("Q4_1"), Some(&210));
    assert_eq!(by_type.get("Q8_0"), Some(&1));
    assert_eq!(by_type.get("F32"), Some(&61));
    assert_eq!(gguf.tensors().len(), 272);
    assert_eq!(
        gguf.tensor("token_embd.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    assert!(gguf.tensor("output.weight").is_none());
}

#[test]
fn tokenizer_matches_reference_ids() {
    let (Some(path), Some(reference)) = (
        real_model("tokenizer_matches_reference_ids"),
        reference_json("tokenizer_matches_reference_ids", "tokenize.json"),
    ) else {
        return;
    };
    let gguf = GgufFile::open(&path).unwrap();
    let tok = ModelTokenizer::from_gguf(gguf.metadata()).unwrap();
    assert_eq!(tok.vocab_size(), 49152);
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected = ids(&case["ids"]);
        let got = tok.encode(text).unwrap();
        assert_eq!(got, expected, "ids of {text:?}");
        // add_bos is false for this model, so a prompt encodes the same.
        assert_eq!(
            tok.encode_prompt(text).unwrap(),
            expected,
            "prompt ids of {text:?}"
        );
        let decoded = tok.decode(&got, SpecialTokenText::Keep).unwrap();
        assert_eq!(
            decoded,
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
    }
    let sp = tok.special_tokens();
    assert_eq!(
        (sp.bos, sp.eos, sp.pad, sp.unk, sp.add_bos),
        (Some(1), Some(2), Some(2), Some(0), false)
    );
    assert_eq!(
        tok.decode(&[1, 4093, 2], SpecialTokenText::Skip).unwrap(),
        "user"
    );
}

#[test]
fn tokenizer_matches_base_prompts_and_round_trips_through_json() {
    let (Some(path), Some(base)) = (
        real_model("tokenizer_matches_base_prompts"),
        reference_json("tokenizer_matches_base_prompts", "base.json"),
    ) else {
        return;
    };
    let gguf = GgufFile::open(&path).unwrap();
    let tok = ModelTokenizer::from_gguf(gguf.metadata()).unwrap();
    let stored = ModelTokenizer::from_json(&tok.to_json().unwrap()).unwrap();
    for p in base["prompts"].as_array().unwrap() {
        let text = p["prompt_text"].as_str().unwrap();
        let expected = ids(&p["input_ids"]);
        assert_eq!(
            tok.encode_prompt(text).unwrap(),
            expected,
            "prompt {}",
            p["name"]
        );
        assert_eq!(
            stored.encode_prompt(text).unwrap(),
            expected,
            "stored tokenizer, prompt {}",
            p["name"]
        );
        let greedy = ids(&p["greedy_ids_32"]);
        assert_eq!(
            tok.decode(&greedy, SpecialTokenText::Keep).unwrap(),
            p["greedy_text_32"].as_str().unwrap(),
            "decode of greedy ids, prompt {}",
            p["name"]
        );
    }
    assert_eq!(stored.special_tokens(), tok.special_tokens());
}

#[test]
fn chat_template_reproduces_reference_chat_prompt() {
    let (Some(path), Some(base)) = (
        real_model("chat_template_reproduces_reference_chat_prompt"),
        reference_json(
            "chat_template_reproduces_reference_chat_prompt",
            "base.json",
        ),
    ) else {
        return;
    };
    let gguf = GgufFile::open(&path).unwrap();
    let tmpl = ChatTemplate::from_gguf(gguf.metadata())
        .unwrap()
        .expect("the GGUF carries a template");
    assert_eq!(
        (tmpl.bos_token(), tmpl.eos_token()),
        (Some("<|im_start|>"), Some("<|im_end|>"))
    );
    let tok = ModelTokenizer::from_gguf(gguf.metadata()).unwrap();
    let chat = base["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "chat_capital")
        .expect("reference has the chat prompt");
    // prompt_kind: chat_template(user='What is the capital of France?', add_generation_prompt=True)
    let text = tmpl
        .render(
            &[ChatMessage::user("What is the capital of France?")],
            GenerationPrompt::Add,
        )
        .unwrap();
    assert_eq!(text, chat["prompt_text"].as_str().unwrap());
    assert_eq!(tok.encode_prompt(&text).unwrap(), ids(&chat["input_ids"]));

    // An explicit system message replaces the default one; without the generation prompt
    // the text ends after the last message.
    let text = tmpl
        .render(
            &[
                ChatMessage::system("Be brief."),
                ChatMessage::user("Hi"),
                ChatMessage::assistant("Hello"),
            ],
            GenerationPrompt::Omit,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    );
}
