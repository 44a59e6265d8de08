//! The same prompt gives the same tokens alone and inside a mixed batch of 16
//! sequences at different positions and lengths (synthetic model, offline).

use std::num::NonZeroUsize;

use batos_kernels::sampling::SamplingParams;
use batos_model::forward::WeightDType;
use batos_model::generate::{
    GenerationParams, GenerationRequest, GeneratorConfig, SimpleGenerator,
};
use batos_model::synthetic::{tiny_params, SyntheticLlama};
use batos_model::LlamaConfig;

mod forward_common;
use forward_common::{kv_manager, tokens};

#[test]
fn sixteen_sequences_alone_and_mixed_give_the_same_tokens() {
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 31);
    for dtype in [WeightDType::F32, WeightDType::BF16] {
        let model = synth.model(dtype).unwrap();
        let d = *model.dims();
        let requests: Vec<GenerationRequest> = (0..16u32)
            .map(|i| {
                let prompt_len = 1 + (i as usize * 37) % 61;
                let mut params = GenerationParams::greedy(6 + (i as usize * 5) % 19);
                if i % 4 == 3 {
                    // Seeded sampling is per sequence, so it must repeat too.
                    params.sampling = SamplingParams {
                        temperature: 0.8,
                        top_k: Some(40),
                        seed: Some(u64::from(i)),
                        ..SamplingParams::default()
                    };
                }
                GenerationRequest {
                    prompt: tokens(prompt_len, i + 100, d.vocab_size),
                    params,
                }
            })
            .collect();
        let config = GeneratorConfig {
            prefill_chunk: NonZeroUsize::new(8).unwrap(),
            max_batch_tokens: NonZeroUsize::new(40).unwrap(),
        };

        let alone: Vec<Vec<u32>> = requests
            .iter()
            .map(|r| {
                let mut gen = SimpleGenerator::new(&model, kv_manager(&d, 8, 16), config);
                gen.generate(&r.prompt, &r.params, None).unwrap().tokens
            })
            .collect();

        let mut gen = SimpleGenerator::new(&model, kv_manager(&d, 128, 16), config);
        let mixed = gen.generate_batch(&requests, None).unwrap();
        let stats = gen.stats();
        assert!(
            stats.mixed_steps > 0,
            "no step mixed prefill and decode: {stats:?}"
        );
        for (i, (a, m)) in alone.iter().zip(&mixed).enumerate() {
            assert_eq!(a, &m.tokens, "{dtype:?} request {i}: alone vs mixed batch");
            assert_eq!(a.len(), requests[i].params.max_tokens);
        }
    }
}
