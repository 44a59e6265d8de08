//! AWQ on a synthetic model (offline, fast): it beats round to nearest when some input
//! channels carry outlier activations, it is deterministic, and the int4 forward pass
//! gives bit-identical logits for a sequence alone or inside any batch.

mod awq_common;
#[path = "forward_common/mod.rs"]
mod forward_common;

use std::num::NonZeroUsize;

use awq_common::{synthetic, token_stream};
use batos_model::forward::{Int4Activations, LlamaModel, WeightDType};
use batos_model::generate::{
    GenerationParams, GenerationRequest, GeneratorConfig, SimpleGenerator,
};
use batos_model::quant::{
    quantize_weights_awq, quantize_weights_rtn, sequence_logits, AwqConfig, Calibration,
    ClipSearch, QuantError,
};
use batos_model::synthetic::SyntheticLlama;
use forward_common::{assert_one_step_matches_alone, kv_manager};

/// A synthetic model whose norms make a few hidden channels large (as real LLMs have),
/// the situation AWQ is for.
fn with_outliers(seed: u64) -> SyntheticLlama {
    let mut s = synthetic(seed);
    for l in &mut s.layers {
        for (c, w) in l.input_layernorm.iter_mut().enumerate() {
            if c % 13 == 5 {
                *w *= 12.0;
            }
        }
        for (c, w) in l.post_attention_layernorm.iter_mut().enumerate() {
            if c % 11 == 3 {
                *w *= 10.0;
            }
        }
    }
    s
}

fn awq_cfg() -> AwqConfig {
    AwqConfig::default()
        .with_group_size(32)
        .with_grid(10)
        .with_search_tokens(128)
}

fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() / v.len() as f64).sqrt()
}

fn logit_error(reference: &[f32], other: &[f32]) -> f64 {
    let d: Vec<f32> = reference.iter().zip(other).map(|(a, b)| a - b).collect();
    rms(&d) / rms(reference)
}

#[test]
fn awq_beats_round_to_nearest_with_outlier_channels() {
    let synth = with_outliers(11);
    let config = synth.config.clone();
    let weights = synth.weights();
    let vocab = config.vocab_size;
    let calib = Calibration::from_tokens(&token_stream(512, vocab, 3), 64, 8).unwrap();
    let f32_model = synth.model(WeightDType::F32).unwrap();
    let heldout = token_stream(96, vocab, 99);
    let want = sequence_logits(&f32_model, &heldout).unwrap();

    let rtn = quantize_weights_rtn(&config, &weights, 32).unwrap();
    let rtn_model = LlamaModel::from_quantized(&config, &rtn, WeightDType::F32).unwrap();
    let rtn_err = logit_error(&want, &sequence_logits(&rtn_model, &heldout).unwrap());

    for clip in [
        ClipSearch::Off,
        ClipSearch::Grid {
            grid: 20,
            max_shrink: 0.5,
        },
    ] {
        let out =
            quantize_weights_awq(&config, &weights, &awq_cfg().with_clip(clip), &calib).unwrap();
        assert_eq!(out.layers.len(), config.num_hidden_layers);
        for l in &out.layers {
            assert!(l.alpha.iter().all(|a| (0.0..1.0).contains(a)));
            // α = 0 (round to nearest) is on the grid, so the search never does worse.
            assert!(l.error_ratio.iter().all(|&r| r <= 1.0), "{l:?}");
        }
        let awq_model =
            LlamaModel::from_quantized(&config, &out.weights, WeightDType::F32).unwrap();
        let awq_err = logit_error(&want, &sequence_logits(&awq_model, &heldout).unwrap());
        assert!(
            awq_err < 0.9 * rtn_err,
            "{clip:?}: AWQ relative logit error {awq_err:.4} vs RTN {rtn_err:.4}"
        );
    }
}

#[test]
fn awq_is_deterministic() {
    let synth = with_outliers(12);
    let calib =
        Calibration::from_tokens(&token_stream(256, synth.config.vocab_size, 4), 32, 8).unwrap();
    let cfg = awq_cfg().with_search_tokens(64);
    let a = quantize_weights_awq(&synth.config, &synth.weights(), &cfg, &calib).unwrap();
    let b = quantize_weights_awq(&synth.config, &synth.weights(), &cfg, &calib).unwrap();
    assert_eq!(a.weights, b.weights);
    assert_eq!(a.layers, b.layers);
}

#[test]
fn int4_logits_are_bit_identical_alone_and_in_any_batch() {
    check_batch_invariance(Int4Activations::F32);
}

#[test]
fn int4_int8_activation_logits_are_bit_identical_alone_and_in_any_batch() {
    check_batch_invariance(Int4Activations::Int8);
}

fn check_batch_invariance(activations: Int4Activations) {
    let synth = with_outliers(13);
    let config = synth.config.clone();
    let calib = Calibration::from_tokens(&token_stream(256, config.vocab_size, 5), 64, 4).unwrap();
    let q = quantize_weights_awq(&config, &synth.weights(), &awq_cfg(), &calib)
        .unwrap()
        .weights;
    let model =
        LlamaModel::from_quantized_with(&config, &q, WeightDType::F32, activations).unwrap();
    assert_eq!(model.int4_activations(), Some(activations));
    let d = *model.dims();
    // Prompts of at least 4 tokens: the int4 kernels are batch-invariant for every T
    // (tests/int4_kernels.rs in batos-kernels), but since the kernels branch's
    // sequential-row decode path, the dense f32 matmul (here: the lm_head) sums in
    // another order for T < 4 than for T >= 4, so a 1-3 token call alone is not
    // bit-identical to the same rows inside a larger batch.
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| token_stream(4 + 9 * i, d.vocab_size, 50 + i as u64))
        .collect();
    // All prompts in one step, each in its own blocks, in two different orders.
    assert_one_step_matches_alone(
        &model,
        &prompts,
        &[&[0, 1, 2, 3, 4, 5], &[5, 3, 1, 0, 4, 2]],
    );
    // Generation: the same tokens alone and in a mixed prefill/decode batch.
    let requests: Vec<GenerationRequest> = prompts
        .iter()
        .map(|p| GenerationRequest {
            prompt: p.clone(),
            params: GenerationParams::greedy(8),
        })
        .collect();
    let gcfg = GeneratorConfig {
        prefill_chunk: NonZeroUsize::new(8).unwrap(),
        max_batch_tokens: NonZeroUsize::new(24).unwrap(),
    };
    let alone: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| {
            let mut gen = SimpleGenerator::new(&model, kv_manager(&d, 8, 16), gcfg);
            gen.generate(&r.prompt, &r.params, None).unwrap().tokens
        })
        .collect();
    for _ in 0..2 {
        let mut gen = SimpleGenerator::new(&model, kv_manager(&d, 64, 16), gcfg);
        let mixed = gen.generate_batch(&requests, None).unwrap();
        for (i, (a, m)) in alone.iter().zip(&mixed).enumerate() {
            assert_eq!(a, &m.tokens, "request {i}: alone vs mixed batch");
        }
    }
}

#[test]
fn bad_settings_are_typed_errors() {
    let synth = synthetic(14);
    let calib = Calibration::from_tokens(&token_stream(64, 256, 6), 32, 2).unwrap();
    let bad_group = quantize_weights_awq(
        &synth.config,
        &synth.weights(),
        &awq_cfg().with_group_size(48),
        &calib,
    );
    assert!(
        matches!(bad_group, Err(QuantError::BadInt4 { .. })),
        "{bad_group:?}"
    );
    let zero_grid = quantize_weights_awq(
        &synth.config,
        &synth.weights(),
        &awq_cfg().with_grid(0),
        &calib,
    );
    assert!(matches!(
        zero_grid,
        Err(QuantError::InvalidConfig { field: "grid", .. })
    ));
    assert!(matches!(
        Calibration::from_tokens(&[1, 2, 3], 8, 4),
        Err(QuantError::Calibration { .. })
    ));
}
