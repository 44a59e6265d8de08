//! The generation harness on a synthetic model: chunked prefill, stops, max tokens,
//! logprobs and bad requests.

use std::num::NonZeroUsize;

use batos_kernels::sampling::{log_softmax, SamplingParams};
use batos_model::forward::{ForwardBatch, ForwardError, SeqStep, WeightDType};
use batos_model::generate::{
    FinishReason, GenerationParams, GeneratorConfig, SimpleGenerator, TokenDecoder,
};
use batos_model::synthetic::{tiny_params, SyntheticLlama};
use batos_model::LlamaConfig;
use batos_types::BlockId;

mod forward_common;
use forward_common::{kv_manager, tokens, TestCache};

fn config(chunk: usize, budget: usize) -> GeneratorConfig {
    GeneratorConfig {
        prefill_chunk: NonZeroUsize::new(chunk).unwrap(),
        max_batch_tokens: NonZeroUsize::new(budget).unwrap(),
    }
}

/// Decodes every id to one letter, so stop strings can be placed exactly.
fn letters(ids: &[u32]) -> String {
    ids.iter()
        .map(|&t| char::from(b'a' + (t % 26) as u8))
        .collect()
}

#[test]
fn prefill_chunk_size_does_not_change_greedy_tokens() {
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 21);
    let model = synth.model(WeightDType::F32).unwrap();
    let d = *model.dims();
    let prompt = tokens(41, 5, d.vocab_size);
    let params = GenerationParams::greedy(20);
    let mut runs = Vec::new();
    for chunk in [1, 7, 16, 512] {
        let mut gen = SimpleGenerator::new(&model, kv_manager(&d, 16, 8), config(chunk, 512));
        let out = gen.generate(&prompt, &params, None).unwrap();
        assert_eq!(out.finish, FinishReason::Length);
        assert_eq!(out.tokens.len(), 20);
        assert_eq!(gen.stats().prefill_tokens, 41);
        assert_eq!(gen.kv().stats().used_blocks, 0, "blocks released");
        runs.push(out.tokens);
    }
    assert!(runs.windows(2).all(|w| w[0] == w[1]), "{runs:?}");
}

#[test]
fn stop_token_and_stop_string_end_generation() {
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 22);
    let model = synth.model(WeightDType::F32).unwrap();
    let d = *model.dims();
    let prompt = tokens(9, 1, d.vocab_size);
    let mut gen = SimpleGenerator::new(&model, kv_manager(&d, 16, 4), config(4, 64));
    let free = gen
        .generate(&prompt, &GenerationParams::greedy(12), None)
        .unwrap();
    assert_eq!(free.tokens.len(), 12);

    // Stop on the 5th generated token: the ids keep it.
    let stop = free.tokens[4];
    let first = free.tokens.iter().position(|&t| t == stop).unwrap();
    let mut params = GenerationParams::greedy(12);
    params.stop_token_ids = vec![stop];
    let out = gen.generate(&prompt, &params, None).unwrap();
    assert_eq!(out.finish, FinishReason::StopToken(stop));
    assert_eq!(out.tokens, free.tokens[..=first]);

    // Stop on the letters of generated tokens 3..5: text is cut before them.
    let text = letters(&free.tokens);
    let needle = text[3..5].to_owned();
    let at = text.find(&needle).unwrap();
    let mut params = GenerationParams::greedy(12);
    params.stop_strings = vec!["not-there".into(), needle.clone()];
    let decoder: &dyn TokenDecoder = &letters;
    let out = gen.generate(&prompt, &params, Some(decoder)).unwrap();
    assert_eq!(out.finish, FinishReason::StopString(needle.clone()));
    assert_eq!(out.text.as_deref(), Some(&text[..at]));
    assert_eq!(out.tokens, free.tokens[..at + needle.len()]);
}

#[test]
fn logprobs_match_the_forward_logits() {
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 23);
    let model = synth.model(WeightDType::F32).unwrap();
    let d = *model.dims();
    let prompt = tokens(6, 2, d.vocab_size);
    let mut params = GenerationParams::greedy(3);
    params.sampling.logprobs = Some(4);
    let mut gen = SimpleGenerator::new(&model, kv_manager(&d, 8, 4), config(8, 64));
    let out = gen.generate(&prompt, &params, None).unwrap();
    let logprobs = out.logprobs.unwrap();
    assert_eq!(logprobs.len(), 3);

    // Recompute the first step's distribution with a direct forward call.
    let mut cache = TestCache::new(&d, 4, 4);
    let table: Vec<BlockId> = (0..4).map(BlockId).collect();
    let fwd = model
        .forward(
            &ForwardBatch::new(vec![SeqStep::new(prompt.clone(), 0, table)]),
            &mut cache,
        )
        .unwrap();
    let raw = log_softmax(fwd.last_logits(0).unwrap());
    let first = &logprobs[0];
    assert_eq!(first.token, out.tokens[0]);
    assert!((first.logprob - raw[first.token as usize]).abs() < 1e-6);
    assert_eq!(first.top_logprobs.len(), 4);
    // Greedy: the chosen token is the most likely one.
    assert_eq!(first.top_logprobs[0].token, first.token);
    assert!(first
        .top_logprobs
        .windows(2)
        .all(|w| w[0].logprob >= w[1].logprob));

    params.sampling.logprobs = None;
    let plain = gen.generate(&prompt, &params, None).unwrap();
    assert!(plain.logprobs.is_none());
    assert_eq!(plain.tokens, out.tokens);
}

#[test]
fn seeded_sampling_repeats() {
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 24);
    let model = synth.model(WeightDType::F32).unwrap();
    let d = *model.dims();
    let prompt = tokens(5, 3, d.vocab_size);
    let mut params = GenerationParams::greedy(16);
    params.sampling = SamplingParams {
        temperature: 0.9,
        top_p: 0.95,
        seed: Some(42),
        ..SamplingParams::default()
    };
    let mut gen = SimpleGenerator::new(&model, kv_manager(&d, 8, 4), config(8, 64));
    let a = gen.generate(&prompt, &params, None).unwrap();
    let b = gen.generate(&prompt, &params, None).unwrap();
    assert_eq!(a.tokens, b.tokens);
    let greedy = gen
        .generate(&prompt, &GenerationParams::greedy(16), None)
        .unwrap();
    assert_ne!(
        a.tokens, greedy.tokens,
        "temperature 0.9 should leave greedy"
    );
}

#[test]
fn context_end_finishes_with_length() {
    let mut params = tiny_params();
    params.max_position_embeddings = 12;
    let synth = SyntheticLlama::new(LlamaConfig::new(params).unwrap(), 25);
    let model = synth.model(WeightDType::F32).unwrap();
    let d = *model.dims();
    let mut gen = SimpleGenerator::new(&model, kv_manager(&d, 8, 4), config(8, 64));
    let out = gen
        .generate(
            &tokens(10, 4, d.vocab_size),
            &GenerationParams::greedy(50),
            None,
        )
        .unwrap();
    // Tokens at positions 10 and 11 fill the context; the 3rd could not be fed back.
    assert_eq!(out.finish, FinishReason::Length);
    assert_eq!(out.tokens.len(), 3);
}

#[test]
fn bad_requests_are_typed_errors() {
    let mut params = tiny_params();
    params.max_position_embeddings = 32;
    let synth = SyntheticLlama::new(LlamaConfig::new(params).unwrap(), 26);
    let model = synth.model(WeightDType::F32).unwrap();
    let d = *model.dims();
    let mut gen = SimpleGenerator::new(&model, kv_manager(&d, 4, 4), config(8, 64));
    let greedy = GenerationParams::greedy(4);
    assert!(matches!(
        gen.generate(&[], &greedy, None),
        Err(ForwardError::EmptyPrompt { request: 0 })
    ));
    assert!(matches!(
        gen.generate(&[1; 33], &greedy, None),
        Err(ForwardError::PromptTooLong {
            prompt_len: 33,
            max_position: 32,
            ..
        })
    ));
    assert!(matches!(
        gen.generate(&[1, 256], &greedy, None),
        Err(ForwardError::TokenOutOfVocab { token: 256, .. })
    ));
    assert!(matches!(
        gen.generate(&[1], &GenerationParams::greedy(0), None),
        Err(ForwardError::InvalidParam {
            name: "max_tokens",
            ..
        })
    ));
    let mut stops = GenerationParams::greedy(4);
    stops.stop_strings = vec!["x".into()];
    assert!(matches!(
        gen.generate(&[1], &stops, None),
        Err(ForwardError::StopStringsNeedDecoder { .. })
    ));
    // 4 blocks of 4 tokens cannot hold a 20-token prompt: the cache's answer, typed.
    let err = gen.generate(&[1; 20], &greedy, None).unwrap_err();
    assert!(matches!(err, ForwardError::OutOfBlocks(_)), "{err}");
    // Nothing leaked: a fitting request still runs.
    assert_eq!(
        gen.generate(&[1; 8], &greedy, None).unwrap().tokens.len(),
        4
    );
}

/// A repeated prompt reuses the cached K/V of its full blocks and continues the same.
#[test]
fn prefix_cache_hit_gives_the_same_tokens() {
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 27);
    let model = synth.model(WeightDType::F32).unwrap();
    let d = *model.dims();
    let prompt = tokens(41, 6, d.vocab_size);
    let params = GenerationParams::greedy(10);
    let mut gen = SimpleGenerator::new(&model, kv_manager(&d, 16, 8), config(16, 64));
    let first = gen.generate(&prompt, &params, None).unwrap();
    assert_eq!(first.cached_prompt_tokens, 0);
    let again = gen.generate(&prompt, &params, None).unwrap();
    assert_eq!(
        again.cached_prompt_tokens, 40,
        "five full blocks of 8 reused"
    );
    assert_eq!(gen.stats().prefill_tokens, 41 + 1);
    assert_eq!(again.tokens, first.tokens);
}
