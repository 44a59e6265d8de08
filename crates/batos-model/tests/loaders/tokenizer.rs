//! The tokenizer and chat template on small synthetic vocabularies (the real model's
//! conformance is in tests/real_model).

use batos_model::gguf::{GgufFile, GgufValue, GgufValueType, GgufWriter};
use batos_model::{
    ChatMessage, ChatTemplate, GenerationPrompt, ModelError, ModelTokenizer, SpecialTokenText,
};

use crate::synth::tokenizer_metadata;

fn build(pre: &str, edit: impl FnOnce(&mut GgufWriter)) -> batos_model::Result<ModelTokenizer> {
    let dir = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new();
    tokenizer_metadata(&mut w, pre);
    edit(&mut w);
    let path = dir.path().join("tok.gguf");
    w.write_to(&path).unwrap();
    ModelTokenizer::from_gguf(GgufFile::open(&path).unwrap().metadata())
}

#[test]
fn smollm_pre_tokenizer_splits_digits_before_bpe() {
    let tok = build("smollm", |_| {}).unwrap();
    let id = |s: &str| tok.token_to_id(s).unwrap();
    // "the the 42": "the" and "Ġthe" merge; digits are split one by one first, so the
    // "4 2" merge never applies.
    assert_eq!(
        tok.encode("the the 42").unwrap(),
        vec![id("the"), id("Ġthe"), id("Ġ"), id("4"), id("2")]
    );
    let plain = build("gpt-2", |_| {}).unwrap();
    assert_eq!(
        plain.encode("the the 42").unwrap(),
        vec![id("the"), id("Ġthe"), id("Ġ"), id("42")]
    );
    // Special-token text is the special token; decoding keeps or skips it.
    let ids = tok.encode("<|im_start|>the<|im_end|>").unwrap();
    assert_eq!(ids, vec![1, id("the"), 2]);
    assert_eq!(
        tok.decode(&ids, SpecialTokenText::Keep).unwrap(),
        "<|im_start|>the<|im_end|>"
    );
    assert_eq!(tok.decode(&ids, SpecialTokenText::Skip).unwrap(), "the");
    assert_eq!(tok.encode("").unwrap(), Vec::<u32>::new());
    // Bytes outside ASCII survive the round trip.
    let text = "Ünï 東京 🦇";
    assert_eq!(
        tok.decode(&tok.encode(text).unwrap(), SpecialTokenText::Keep)
            .unwrap(),
        text
    );
    assert_eq!(tok.vocab_size(), 3 + 256 + 4);
}

#[test]
fn add_bos_is_honoured_for_prompts() {
    let tok = build("smollm", |w| {
        w.metadata("tokenizer.ggml.add_bos_token", GgufValue::Bool(true));
    })
    .unwrap();
    let the = tok.token_to_id("the").unwrap();
    assert_eq!(tok.encode("the").unwrap(), vec![the]);
    assert_eq!(tok.encode_prompt("the").unwrap(), vec![1, the]);
    let json = tok.to_json().unwrap();
    let back = ModelTokenizer::from_json(&json).unwrap();
    assert_eq!(back.encode_prompt("the").unwrap(), vec![1, the]);
    assert!(ModelTokenizer::from_json("{}").is_err());
}

#[test]
fn unsupported_or_broken_tokenizer_metadata() {
    let err = build("smollm", |w| {
        w.metadata("tokenizer.ggml.model", GgufValue::String("llama".into()));
    })
    .unwrap_err();
    assert!(
        matches!(err, ModelError::Tokenizer { .. }) && err.to_string().contains("'llama'"),
        "{err}"
    );
    let err = build("qwen2", |_| {}).unwrap_err();
    assert!(err.to_string().contains("'qwen2'"), "{err}");
    let err = build("smollm", |w| {
        w.metadata(
            "tokenizer.ggml.merges",
            GgufValue::Array(
                GgufValueType::String,
                vec![GgufValue::String("nospace".into())],
            ),
        );
    })
    .unwrap_err();
    assert!(err.to_string().contains("nospace"), "{err}");
    let err = build("smollm", |w| {
        w.metadata("tokenizer.ggml.eos_token_id", GgufValue::U32(100_000));
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("tokenizer.ggml.eos_token_id"),
        "{err}"
    );
    let err = build("smollm", |w| {
        w.metadata(
            "tokenizer.ggml.token_type",
            GgufValue::Array(GgufValueType::I32, vec![]),
        );
    })
    .unwrap_err();
    assert!(err.to_string().contains("token_type"), "{err}");
    let err = build("smollm", |w| {
        w.metadata("tokenizer.ggml.tokens", GgufValue::U32(1));
    })
    .unwrap_err();
    assert!(
        matches!(&err, ModelError::MetadataType { key, .. } if key == "tokenizer.ggml.tokens"),
        "{err}"
    );
}

#[test]
fn chat_template_from_gguf_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = GgufWriter::new();
    tokenizer_metadata(&mut w, "smollm");
    let path = dir.path().join("t.gguf");
    w.write_to(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let t = ChatTemplate::from_gguf(g.metadata()).unwrap().unwrap();
    let text = t
        .render(
            &[ChatMessage::system("S"), ChatMessage::user("U")],
            GenerationPrompt::Add,
        )
        .unwrap();
    assert_eq!(
        text,
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    );
    let text = t
        .render(&[ChatMessage::user("U")], GenerationPrompt::Omit)
        .unwrap();
    assert_eq!(text, "<|im_start|>user\nU<|im_end|>\n");
    // No template in the file is not an error.
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", GgufValue::String("llama".into()));
    w.write_to(&path).unwrap();
    assert!(
        ChatTemplate::from_gguf(GgufFile::open(&path).unwrap().metadata())
            .unwrap()
            .is_none()
    );
}

#[test]
fn chat_template_errors() {
    let err = ChatTemplate::new("{% for m in messages %}", None, None).unwrap_err();
    assert!(matches!(err, ModelError::ChatTemplate { .. }), "{err}");
    let t = ChatTemplate::new(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok",
        None,
        None,
    )
    .unwrap();
    assert_eq!(
        t.render(&[ChatMessage::user("x")], GenerationPrompt::Add)
            .unwrap(),
        "ok"
    );
    let err = t
        .render(&[ChatMessage::assistant("x")], GenerationPrompt::Add)
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("first message must be from the user"),
        "{err}"
    );
}

#[test]
fn chat_template_trims_blocks_like_hf() {
    let t = ChatTemplate::new(
        "{% for m in messages %}\n    {{ m.content }}\n{% endfor %}\n",
        None,
        None,
    )
    .unwrap();
    // trim_blocks drops the newline after a block tag; lstrip_blocks the indentation before one.
    assert_eq!(
        t.render(
            &[ChatMessage::user("a"), ChatMessage::user("b")],
            GenerationPrompt::Omit
        )
        .unwrap(),
        "    a\n    b\n"
    );
}
