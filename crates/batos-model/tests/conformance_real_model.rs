//! Conformance of the forward pass on the real model, SmolLM2-135M-Instruct (its Q4_1
//! GGUF dequantized to f32), against ../shared/reference/base.json:
//! - step-1 logits: identical top-10 ids, values within 1e-3;
//! - identical 32-token greedy continuations (and the stop-at-EOS variant) for every
//!   reference prompt, raw and chat;
//! - the same tokens for a prompt alone and inside a mixed batch of 16 sequences at
//!   different positions and lengths.
//!
//! Token ids of the reference strings are checked by `tests/real_model.rs`. Each test
//! fetches the model into the cache (`batos_model::fetch`) and prints a SKIP line when
//! it cannot.

mod common;
mod forward_common;

use std::num::NonZeroUsize;
use std::sync::OnceLock;

use batos_model::forward::{ForwardBatch, LlamaModel, SeqStep, WeightDType};
use batos_model::generate::{
    FinishReason, GenerationParams, GenerationRequest, GeneratorConfig, SimpleGenerator,
};
use batos_model::gguf::GgufFile;
use batos_model::{LlamaConfig, LoadOptions, ModelTokenizer, ModelWeights, SpecialTokenText};
use common::{ids, real_model, reference_json};
use forward_common::kv_manager;

struct Real {
    model: LlamaModel,
    tokenizer: ModelTokenizer,
    base: serde_json::Value,
}

/// The f32 model, its tokenizer and base.json, loaded once per test binary; `None`
/// (after a SKIP line) when the model or the reference cannot be had.
fn real(test: &str) -> Option<&'static Real> {
    static REAL: OnceLock<Option<Real>> = OnceLock::new();
    let loaded = REAL.get_or_init(|| {
        let base = reference_json(test, "base.json")?;
        let path = real_model(test)?;
        let gguf = GgufFile::open(&path).expect("open GGUF");
        let config = LlamaConfig::from_gguf(&gguf).expect("config from GGUF");
        let weights =
            ModelWeights::from_gguf(&gguf, &config, &LoadOptions::default()).expect("weights");
        let model = LlamaModel::from_weights(&config, &weights, WeightDType::F32).expect("model");
        let tokenizer = ModelTokenizer::from_gguf(gguf.metadata()).expect("tokenizer");
        Some(Real {
            model,
            tokenizer,
            base,
        })
    });
    if loaded.is_none() {
        println!("SKIP {test}: real model or reference unavailable (see the SKIP line above)");
    }
    loaded.as_ref()
}

fn prompts(real: &Real) -> &Vec<serde_json::Value> {
    real.base["prompts"].as_array().expect("prompts")
}

fn generator(
    model: &LlamaModel,
    blocks: usize,
    chunk: usize,
    budget: usize,
) -> SimpleGenerator<'_> {
    SimpleGenerator::new(
        model,
        kv_manager(model.dims(), blocks, 16),
        GeneratorConfig {
            prefill_chunk: NonZeroUsize::new(chunk).unwrap(),
            max_batch_tokens: NonZeroUsize::new(budget).unwrap(),
        },
    )
}

#[test]
fn step1_logits_match_reference_top10() {
    let Some(real) = real("step1_logits_match_reference_top10") else {
        return;
    };
    let d = *real.model.dims();
    let mut worst = 0.0f32;
    for p in prompts(real) {
        let name = p["name"].as_str().unwrap();
        let input = ids(&p["input_ids"]);
        let want_ids = ids(&p["step1_top10"]["ids"]);
        let want_values: Vec<f32> = p["step1_top10"]["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let blocks = input.len().div_ceil(16);
        let mut kv = kv_manager(&d, blocks, 16);
        let table = (0..blocks as u32).map(batos_types::BlockId).collect();
        let out = real
            .model
            .forward(
                &ForwardBatch::new(vec![SeqStep::new(input.clone(), 0, table)]),
                kv.storage_mut(),
            )
            .unwrap();
        let logits = out.last_logits(0).unwrap();
        let mut order: Vec<u32> = (0..d.vocab_size as u32).collect();
        order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        assert_eq!(order[..10], want_ids[..], "{name}: top-10 ids");
        let err = want_ids
            .iter()
            .zip(&want_values)
            .map(|(&id, &v)| (logits[id as usize] - v).abs())
            .fold(0.0f32, f32::max);
        println!("{name}: step-1 top-10 max |logit - reference| = {err:.2e}");
        worst = worst.max(err);
    }
    assert!(worst < 1e-3, "max top-10 logit error {worst} >= 1e-3");
}

#[test]
fn greedy_continuations_match_reference() {
    let Some(real) = real("greedy_continuations_match_reference") else {
        return;
    };
    let mut gen = generator(&real.model, 64, 16, 256);
    for p in prompts(real) {
        let name = p["name"].as_str().unwrap();
        let input = ids(&p["input_ids"]);
        let want = ids(&p["greedy_ids_32"]);
        let out = gen
            .generate(&input, &GenerationParams::greedy(32), Some(&real.tokenizer))
            .unwrap();
        assert_eq!(out.tokens, want, "{name}: greedy 32 ids");
        assert_eq!(out.finish, FinishReason::Length);
        assert_eq!(
            out.text.as_deref(),
            p["greedy_text_32"].as_str(),
            "{name}: greedy text"
        );

        // Stopping at <|im_end|> keeps the stop token, as the reference does.
        let eos = real.tokenizer.special_tokens().eos.expect("eos token");
        let mut params = GenerationParams::greedy(32);
        params.stop_token_ids = vec![eos];
        let stopped = gen.generate(&input, &params, None).unwrap();
        assert_eq!(
            stopped.tokens,
            ids(&p["greedy_ids_stop_at_eos"]),
            "{name}: greedy ids stopping at EOS"
        );
        let expect_finish = match p["first_eos_index"].as_u64() {
            Some(_) => FinishReason::StopToken(eos),
            None => FinishReason::Length,
        };
        assert_eq!(stopped.finish, expect_finish, "{name}");
        println!(
            "{name}: greedy 32 ids identical, finish at EOS {:?}",
            stopped.finish
        );
    }
}

/// 16 sequences of different lengths (the reference prompts among them), stepped
/// together with 8-token prefill chunks under a 32-token step budget, so long prompts
/// are still prefilling while short ones decode.
#[test]
fn mixed_batch_of_16_matches_alone() {
    let Some(real) = real("mixed_batch_of_16_matches_alone") else {
        return;
    };
    let texts = [
        "Hello, world! 12345",
        "def fibonacci(n):\n    return n if n < 2 else fibonacci(n-1) + fibonacci(n-2)\n",
        "Once upon a time",
        "The capital of Germany is",
        "1, 2, 3, 4, 5,",
        "Rust is a programming language that",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
        "Water boils at",
        "A",
        "In 2026, the most important scientific discovery was",
        "List three colors:",
        "SELECT name FROM users WHERE",
        "The quick brown fox jumps over the lazy dog. The quick brown fox",
    ];
    let mut requests: Vec<(GenerationRequest, Option<Vec<u32>>)> = prompts(real)
        .iter()
        .map(|p| {
            (
                GenerationRequest {
                    prompt: ids(&p["input_ids"]),
                    params: GenerationParams::greedy(32),
                },
                Some(ids(&p["greedy_ids_32"])),
            )
        })
        .collect();
    for (i, text) in texts.iter().enumerate() {
        requests.push((
            GenerationRequest {
                prompt: real.tokenizer.encode(text).unwrap(),
                params: GenerationParams::greedy(4 + (i * 5) % 13),
            },
            None,
        ));
    }
    assert_eq!(requests.len(), 16);

    let batch: Vec<GenerationRequest> = requests.iter().map(|(r, _)| r.clone()).collect();
    let mut gen = generator(&real.model, 96, 8, 32);
    let mixed = gen.generate_batch(&batch, None).unwrap();
    assert!(gen.stats().mixed_steps > 0, "{:?}", gen.stats());

    for (i, ((req, reference), got)) in requests.iter().zip(&mixed).enumerate() {
        let alone = match reference {
            // The reference continuation is what these give alone (checked above).
            Some(ids) => ids.clone(),
            None => {
                let mut solo = generator(&real.model, 8, 16, 48);
                solo.generate(&req.prompt, &req.params, None)
                    .unwrap()
                    .tokens
            }
        };
        assert_eq!(
            got.tokens,
            alone,
            "request {i} ({:?}): mixed batch vs alone",
            real.tokenizer
                .decode(&req.prompt, SpecialTokenText::Keep)
                .unwrap()
        );
    }
    println!(
        "16 sequences: identical alone and mixed ({} steps, {} of them mixing prefill and decode)",
        gen.stats().steps,
        gen.stats().mixed_steps
    );
}
