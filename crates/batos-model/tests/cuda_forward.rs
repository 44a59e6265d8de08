//! The device-resident runtime (`forward::cuda::CudaLlama`) against the CPU model, on a
//! GPU (feature `cuda`; every test prints a SKIP line and passes where there is no
//! driver or device, or no real model).
//!
//! Both sides run the same batches over one `KvCacheManager` (the CPU writes the host
//! storage, the GPU its device mirror), staggered so prefills and decodes mix in one
//! step, with and without adapters (synthetic r16 PEFT adapters through the real adapter
//! manager). Checked: every logit within `|cpu − gpu| ≤ 2e-3 · (1 + |cpu|)`, and the
//! same greedy token at every step whose CPU top-1/top-2 margin is at least 0.02.
//! Weights are f16 on both sides (the CPU model is built with `WeightDType::F16`;
//! the device always holds dense weights as f16), activations f32 on both.
#![cfg(feature = "cuda")]

mod common;
mod cuda_common;
mod forward_common;

use batos_model::forward::cuda::CudaLlama;
use batos_model::forward::{ForwardError, LlamaModel, WeightDType};
use batos_model::gguf::GgufFile;
use batos_model::synthetic::{tiny_params, SyntheticLlama};
use batos_model::{LlamaConfig, LoadOptions, ModelWeights};
use batos_types::{MemoryBudget, ReservationKind};
use cuda_common::{assert_same_greedy, device, hot_adapters, lockstep, model_path, SeqSpec};
use forward_common::{kv_manager, tokens};

const LOGIT_TOL: f32 = 2e-3;
const MIN_MARGIN: f32 = 0.02;

fn budget() -> MemoryBudget {
    MemoryBudget::new("test device", 1 << 36)
}

fn mixed_specs(prompts: &[Vec<u32>], slots: &[Option<batos_types::SlotIdx>]) -> Vec<SeqSpec> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| SeqSpec {
            prompt: p.clone(),
            adapter: slots[i % slots.len()],
            start: i * 2,
        })
        .collect()
}

/// Runs without a GPU: the synthetic adapters the GPU tests and bench use pass the
/// audit and fill hot slots.
#[test]
fn synthetic_adapters_pass_the_audit_and_go_hot() {
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 3);
    let d = *synth.model(WeightDType::F16).unwrap().dims();
    let hot = hot_adapters(&d, 3, 8);
    let snap = hot.snapshot();
    assert_eq!(snap.len(), 3);
    assert!(hot.slots.iter().all(|s| snap.is_filled(*s)));
    let table = snap.table(1, batos_lora::Projection::Down);
    assert!(table
        .iter()
        .all(|s| s.as_ref().is_some_and(|s| s.rank() == 8)));
}

#[test]
fn synthetic_model_matches_the_cpu_in_mixed_batches() {
    let test = "synthetic_model_matches_the_cpu_in_mixed_batches";
    let Some(dev) = device(test) else { return };
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 3);
    let cpu = synth.model(WeightDType::F16).unwrap();
    let d = *cpu.dims();
    let mut gpu = CudaLlama::upload(&cpu, dev, &budget()).unwrap();
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|i| tokens(3 + 7 * i, i as u32 + 1, d.vocab_size))
        .collect();
    let mut kv = kv_manager(&d, 64, 4);
    let r = lockstep(
        &cpu,
        &mut gpu,
        None,
        &mut kv,
        &mixed_specs(&prompts, &[None]),
        12,
    );
    assert!(r.mixed_steps > 0, "no step mixed prefill and decode");
    assert!(r.max_rel_err <= LOGIT_TOL, "logit error {}", r.max_rel_err);
    let (n, flips) = assert_same_greedy(test, &r, MIN_MARGIN);
    println!(
        "{test}: {n} greedy steps, {flips} near-tie flips, max rel logit err {:.2e}",
        r.max_rel_err
    );

    // With adapters: 3 hot slots, sequences on slots 0..2 and none, mixed.
    let hot = hot_adapters(&d, 3, 8);
    let snap = hot.snapshot();
    let slots = [
        Some(hot.slots[0]),
        None,
        Some(hot.slots[1]),
        Some(hot.slots[2]),
    ];
    let mut kv = kv_manager(&d, 64, 4);
    let r = lockstep(
        &cpu,
        &mut gpu,
        Some(&snap),
        &mut kv,
        &mixed_specs(&prompts, &slots),
        12,
    );
    assert!(
        r.max_rel_err <= LOGIT_TOL,
        "logit error with adapters {}",
        r.max_rel_err
    );
    let (n, flips) = assert_same_greedy(test, &r, MIN_MARGIN);
    println!(
        "{test} (adapters): {n} greedy steps, {flips} near-tie flips, max rel logit err {:.2e}",
        r.max_rel_err
    );
    assert!(gpu.memory().adapters > 0);
}

#[test]
fn int4_synthetic_model_runs_on_the_awq_kernels() {
    let test = "int4_synthetic_model_runs_on_the_awq_kernels";
    let Some(dev) = device(test) else { return };
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 5);
    let q = batos_model::quant::quantize_weights_rtn(&synth.config, &synth.weights(), 32)
        .expect("quantize synthetic model");
    let cpu = LlamaModel::from_quantized(&synth.config, &q, WeightDType::F16).unwrap();
    let d = *cpu.dims();
    let mut gpu = CudaLlama::upload(&cpu, dev, &budget()).unwrap();
    let prompts: Vec<Vec<u32>> = (0..3).map(|i| tokens(9, i + 7, d.vocab_size)).collect();
    let mut kv = kv_manager(&d, 32, 4);
    let r = lockstep(
        &cpu,
        &mut gpu,
        None,
        &mut kv,
        &mixed_specs(&prompts, &[None]),
        8,
    );
    // The AWQ kernels round activations to f16 on the tensor-core path (prefill).
    assert!(r.max_rel_err <= 2e-2, "int4 logit error {}", r.max_rel_err);
    println!("{test}: max rel logit err {:.2e}", r.max_rel_err);
}

#[test]
fn a_full_budget_is_a_typed_error() {
    let test = "a_full_budget_is_a_typed_error";
    let Some(dev) = device(test) else { return };
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 3);
    let cpu = synth.model(WeightDType::F16).unwrap();
    let small = MemoryBudget::new("tiny device", 1024);
    match CudaLlama::upload(&cpu, dev, &small) {
        Err(ForwardError::DeviceBudget { what, .. }) => assert_eq!(what, "model weights"),
        other => panic!("expected DeviceBudget, got {other:?}"),
    }
    assert_eq!(small.used_by(ReservationKind::Other), 0);
}

fn real_model(test: &str) -> Option<LlamaModel> {
    let path = model_path(test)?;
    let gguf = GgufFile::open(&path).expect("open GGUF");
    let config = LlamaConfig::from_gguf(&gguf).expect("config");
    let weights = ModelWeights::from_gguf(&gguf, &config, &LoadOptions::default()).unwrap();
    Some(LlamaModel::from_weights(&config, &weights, WeightDType::F16).unwrap())
}

/// The reference prompts' input ids (base.json), or pseudo-random prompts when the
/// reference is not at hand (the device check carries only the model).
fn reference_prompts(test: &str, vocab: usize) -> Vec<Vec<u32>> {
    match common::reference_json(test, "base.json") {
        Some(base) => base["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| common::ids(&p["input_ids"]))
            .collect(),
        None => (0..4)
            .map(|i| tokens(20 + 9 * i, i as u32, vocab))
            .collect(),
    }
}

#[test]
fn real_model_matches_the_cpu_with_and_without_adapters() {
    let test = "real_model_matches_the_cpu_with_and_without_adapters";
    let Some(dev) = device(test) else { return };
    let Some(cpu) = real_model(test) else { return };
    let d = *cpu.dims();
    let mut gpu = CudaLlama::upload(&cpu, dev, &budget()).unwrap();
    let prompts = reference_prompts(test, d.vocab_size);
    let steps = 32;

    let mut kv = kv_manager(&d, 256, 16);
    let r = lockstep(
        &cpu,
        &mut gpu,
        None,
        &mut kv,
        &mixed_specs(&prompts, &[None]),
        steps,
    );
    for (i, (c, g)) in r.first_logits.iter().enumerate() {
        let err = c
            .iter()
            .zip(g)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        println!("{test}: prompt {i}: step-1 max |cpu - gpu| logit {err:.3e}");
    }
    assert!(r.max_rel_err <= LOGIT_TOL, "logit error {}", r.max_rel_err);
    let (n, flips) = assert_same_greedy(test, &r, MIN_MARGIN);
    println!(
        "{test} (base): {n} greedy steps, {flips} near-tie flips, max rel logit err {:.2e}",
        r.max_rel_err
    );

    let hot = hot_adapters(&d, 2, 16);
    let snap = hot.snapshot();
    let slots = [Some(hot.slots[0]), None, Some(hot.slots[1])];
    let mut kv = kv_manager(&d, 256, 16);
    let r = lockstep(
        &cpu,
        &mut gpu,
        Some(&snap),
        &mut kv,
        &mixed_specs(&prompts, &slots),
        steps,
    );
    assert!(
        r.max_rel_err <= LOGIT_TOL,
        "logit error with adapters {}",
        r.max_rel_err
    );
    let (n, flips) = assert_same_greedy(test, &r, MIN_MARGIN);
    println!("{test} (adapters, mixed): {n} greedy steps, {flips} near-tie flips, max rel logit err {:.2e}", r.max_rel_err);
}
