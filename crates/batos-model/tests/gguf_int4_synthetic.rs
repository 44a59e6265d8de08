//! int4 layers with group offsets (GGUF Q4_1 minima kept as int4) on a synthetic model
//! (offline, fast): the forward pass computes the dequantised weights' function (with
//! f32 activations to 1e-5; with int8 activations, the integer-dot kernels, to
//! `INT8_REL_ERR`), and a sequence's logits are bit-identical alone or inside any batch
//! in both modes.

mod awq_common;
#[path = "forward_common/mod.rs"]
mod forward_common;

use awq_common::{synthetic, token_stream};
use batos_model::forward::{Int4Activations, LlamaModel, WeightDType};
use batos_model::quant::{quantize_weights_rtn, sequence_logits, QuantizedWeights, LINEARS};
use batos_model::{LayerTensor, ModelWeights, Tensor, TensorRole};
use forward_common::assert_one_step_matches_alone;
use half::f16;

/// RTN int4 of a synthetic model, then a float minimum on every projection's groups
/// (as Q4_1 has: some positive, some negative, a few zero).
fn with_offsets(seed: u64) -> (batos_model::LlamaConfig, QuantizedWeights) {
    let synth = synthetic(seed);
    let config = synth.config.clone();
    let mut q = quantize_weights_rtn(&config, &synth.weights(), 32).unwrap();
    let mut s = seed | 1;
    for l in &mut q.layers {
        for t in LINEARS {
            let w = l.linear(t).unwrap().clone();
            let n = w.layout().scales_len();
            let off: Vec<f16> = (0..n)
                .map(|_| {
                    s ^= s << 13;
                    s ^= s >> 7;
                    s ^= s << 17;
                    f16::from_f32(((s % 201) as f32 - 100.0) * 2e-4)
                })
                .collect();
            let w = w.with_offsets("p", off).unwrap();
            match t {
                LayerTensor::Q => l.q_proj = w,
                LayerTensor::K => l.k_proj = w,
                LayerTensor::V => l.v_proj = w,
                LayerTensor::O => l.o_proj = w,
                LayerTensor::Gate => l.gate_proj = w,
                LayerTensor::Up => l.up_proj = w,
                LayerTensor::Down => l.down_proj = w,
                _ => unreachable!(),
            }
        }
    }
    (config, q)
}

/// The dense f32 model of the same (dequantised) weights.
fn dequantised(config: &batos_model::LlamaConfig, q: &QuantizedWeights) -> ModelWeights {
    let mut tensors = vec![
        (
            TensorRole::TokenEmbedding,
            Tensor::from_f32(
                vec![config.vocab_size, config.hidden_size],
                q.embed_tokens.to_f32_vec(),
            )
            .unwrap(),
        ),
        (TensorRole::FinalNorm, q.norm.clone()),
    ];
    if let Some(h) = &q.lm_head {
        tensors.push((TensorRole::LmHead, h.clone()));
    }
    for (layer, l) in q.layers.iter().enumerate() {
        for (t, norm) in [
            (LayerTensor::AttnNorm, &l.attn_norm),
            (LayerTensor::MlpNorm, &l.mlp_norm),
        ] {
            tensors.push((
                TensorRole::Layer { layer, tensor: t },
                Tensor::from_f32(vec![norm.len()], norm.clone()).unwrap(),
            ));
        }
        for t in LINEARS {
            let w = l.linear(t).unwrap();
            tensors.push((
                TensorRole::Layer { layer, tensor: t },
                Tensor::from_f32(vec![w.rows(), w.cols()], w.dequantize()).unwrap(),
            ));
        }
    }
    ModelWeights::from_tensors(config, tensors, "dequantised").unwrap()
}

fn rel_rms(reference: &[f32], other: &[f32]) -> f64 {
    let sq = |v: &mut dyn Iterator<Item = f32>| v.map(|x| f64::from(x).powi(2)).sum::<f64>();
    let diff = sq(&mut reference.iter().zip(other).map(|(a, b)| a - b));
    (diff / sq(&mut reference.iter().copied())).sqrt()
}

/// Relative RMS logit error accepted with int8 activations: each group's inputs are
/// rounded to 1/254 of their largest magnitude (measured: 3.1e-3).
const INT8_REL_ERR: f64 = 1e-2;

#[test]
fn offsets_forward_matches_the_dequantised_dense_model() {
    let (config, q) = with_offsets(3);
    let int4 = LlamaModel::from_quantized_with(&config, &q, WeightDType::F32, Int4Activations::F32)
        .unwrap();
    let dense =
        LlamaModel::from_weights(&config, &dequantised(&config, &q), WeightDType::F32).unwrap();
    let tokens = token_stream(40, config.vocab_size, 9);
    let a = sequence_logits(&int4, &tokens).unwrap();
    let b = sequence_logits(&dense, &tokens).unwrap();
    // Same weights, different summation order (codes·scale, then the offset term).
    let err = rel_rms(&b, &a);
    assert!(err < 1e-5, "relative logit error {err}");
    let int8 =
        LlamaModel::from_quantized_with(&config, &q, WeightDType::F32, Int4Activations::Int8)
            .unwrap();
    let err8 = rel_rms(&b, &sequence_logits(&int8, &tokens).unwrap());
    println!("relative logit error: f32 activations {err:.2e}, int8 activations {err8:.2e}");
    assert!(
        err8 < INT8_REL_ERR,
        "int8 activations: relative logit error {err8}"
    );

    // Without the offset term the logits would be far off: the test can fail.
    let mut stripped = q.clone();
    for l in &mut stripped.layers {
        l.down_proj = batos_model::quant::Int4Weight::from_parts(
            "down",
            l.down_proj.layout(),
            l.down_proj.qweight().to_vec(),
            l.down_proj.qzeros().to_vec(),
            l.down_proj.scales().to_vec(),
        )
        .unwrap();
    }
    let c = sequence_logits(
        &LlamaModel::from_quantized(&config, &stripped, WeightDType::F32).unwrap(),
        &tokens,
    )
    .unwrap();
    assert!(rel_rms(&b, &c) > 100.0 * err.max(1e-7));
    assert!(rel_rms(&b, &c) > 5.0 * err8);
}

#[test]
fn offsets_logits_are_bit_identical_alone_and_in_any_batch() {
    for activations in [Int4Activations::F32, Int4Activations::Int8] {
        check_batch_invariance(activations);
    }
}

fn check_batch_invariance(activations: Int4Activations) {
    let (config, q) = with_offsets(5);
    let model =
        LlamaModel::from_quantized_with(&config, &q, WeightDType::F32, activations).unwrap();
    let d = *model.dims();
    // At least 4 tokens each (see awq_synthetic.rs: the dense head's decode path).
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|i| token_stream(4 + 7 * i, d.vocab_size, 70 + i as u64))
        .collect();
    assert_one_step_matches_alone(&model, &prompts, &[&[0, 1, 2, 3, 4], &[4, 2, 0, 3, 1]]);
}
