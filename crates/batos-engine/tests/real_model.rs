//! The engine on the real model (SmolLM2-135M-Instruct, fetched into the cache): chat
//! prompts from several personas run concurrently give the tokens the reference
//! harness gives each alone, and streamed text adds up to the final text. Prints a
//! SKIP line and passes when the model cannot be had (no network, no python).

use batos_engine::{
    Engine, GenerateRequest, GenerationParams, Prompt, ShutdownMode, StopReason, StreamEvent,
};
use batos_kv::{KvCacheConfig, KvCacheManager, KvShape};
use batos_model::chat_template::{ChatMessage, GenerationPrompt};
use batos_model::forward::{LlamaModel, WeightDType};
use batos_model::generate::{GeneratorConfig, SimpleGenerator};
use batos_model::{LoadOptions, LoadedModel};
use batos_types::MemoryBudget;

#[test]
fn personas_concurrently_match_the_reference_harness() {
    let test = "personas_concurrently_match_the_reference_harness";
    let path = match batos_model::fetch::smollm2_gguf() {
        Ok(p) => p,
        Err(e) => {
            println!("SKIP {test}: real model unavailable: {e}");
            eprintln!("SKIP {test}: real model unavailable: {e}");
            return;
        }
    };
    let loaded = LoadedModel::from_gguf(&path, &LoadOptions::default()).expect("load GGUF");
    let template = loaded
        .chat_template
        .clone()
        .expect("SmolLM2 ships a chat template");
    let model =
        LlamaModel::from_weights(&loaded.config, &loaded.weights, WeightDType::F16).unwrap();
    let tokenizer = loaded.tokenizer.clone();

    let personas = [
        ("You are a terse pirate.", "Where is the treasure?"),
        (
            "You are a helpful chemistry tutor.",
            "What is water made of?",
        ),
        ("You are a poet.", "Describe the sea in one line."),
        (
            "You are a strict grammar teacher.",
            "Fix: me and him goes home.",
        ),
    ];
    let prompts: Vec<Vec<u32>> = personas
        .iter()
        .map(|(system, user)| {
            let text = template
                .render(
                    &[ChatMessage::system(*system), ChatMessage::user(*user)],
                    GenerationPrompt::Add,
                )
                .unwrap();
            tokenizer.encode_prompt(&text).unwrap()
        })
        .collect();
    let mut params = GenerationParams::greedy(24);
    params.stop_strings = vec!["<|im_end|>".into()];

    // The reference: each prompt alone through SimpleGenerator.
    let d = *model.dims();
    let shape = KvShape {
        num_layers: d.num_layers,
        num_kv_heads: d.num_kv_heads,
        head_dim: d.head_dim,
    };
    let kv_config = KvCacheConfig::new(shape, 1 << 30)
        .unwrap()
        .with_num_blocks(64)
        .unwrap();
    let kv = KvCacheManager::new(kv_config, &MemoryBudget::new("test", 1 << 34)).unwrap();
    let mut reference = SimpleGenerator::new(&model, kv, GeneratorConfig::default());
    let expected: Vec<_> = prompts
        .iter()
        .map(|p| reference.generate(p, &params, Some(&tokenizer)).unwrap())
        .collect();

    let engine = Engine::builder()
        .runtime_model(model.clone(), Some(tokenizer))
        .kv_pool_blocks(256)
        .prefill_chunk(32)
        .max_batch_tokens(96)
        .build()
        .unwrap();
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| {
            engine
                .generate(GenerateRequest::new(
                    Prompt::Tokens(p.clone()),
                    params.clone(),
                ))
                .unwrap()
        })
        .collect();
    for (i, (mut s, e)) in streams.into_iter().zip(&expected).enumerate() {
        let mut streamed = String::new();
        let mut toks = Vec::new();
        let mut finish = None;
        while let Some(ev) = s.next_blocking() {
            match ev {
                StreamEvent::Token(t) => {
                    toks.push(t.token);
                    streamed.push_str(t.text.as_deref().unwrap());
                }
                StreamEvent::Finished(f) => finish = Some(f),
            }
        }
        let f = finish.expect("a finish event");
        assert_eq!(toks, e.tokens, "persona {i}");
        assert_eq!(
            f.reason,
            StopReason::Finished(e.finish.clone()),
            "persona {i}"
        );
        assert_eq!(f.text.as_deref(), e.text.as_deref(), "persona {i}");
        assert_eq!(
            Some(streamed.as_str()),
            f.text.as_deref(),
            "persona {i}: streamed text"
        );
        assert!(!streamed.contains("<|im_end|>"));
        println!("persona {i}: {:?}", f.text.unwrap());
    }
    let m = engine.metrics().unwrap();
    assert!(
        m.counters.steps
            < expected
                .iter()
                .map(|e| e.tokens.len() as u64 + 4)
                .sum::<u64>(),
        "requests were not batched: {} steps",
        m.counters.steps
    );
    engine.shutdown(ShutdownMode::Drain).unwrap();
}
