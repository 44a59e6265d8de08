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

use batos_model::forward::cuda::{CudaLlama, LoraCapacity};
use batos_model::forward::{
    ForwardBatch, ForwardError, Int4Activations, LlamaModel, LogitsRows, SeqStep, WeightDType,
};
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

/// Cold → hot on the device writes one adapter into its slot of every stack (on the
/// upload stream) and leaves the other slots and the stacks alone; an adapter whose
/// rank outgrows the stacks rebuilds them. The CPU agrees after each change.
#[test]
fn a_cold_adapter_is_written_into_its_slot_only() {
    let test = "a_cold_adapter_is_written_into_its_slot_only";
    let Some(dev) = device(test) else { return };
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 3);
    let cpu = synth.model(WeightDType::F16).unwrap();
    let d = *cpu.dims();
    let pairs = (d.num_layers * batos_lora::Projection::ALL.len()) as u64;
    let mut gpu = CudaLlama::upload(&cpu, dev, &budget()).unwrap();
    gpu.reserve_adapters(LoraCapacity {
        slots: 2,
        max_rank: 8,
    })
    .unwrap();
    let reserved = gpu.memory().adapters;
    assert!(reserved > 0);
    assert_eq!(gpu.memory().adapter_uploads.stack_builds, pairs);
    let prompts: Vec<Vec<u32>> = (0..3)
        .map(|i| tokens(5 + 4 * i, i as u32 + 11, d.vocab_size))
        .collect();
    let mut hot = hot_adapters(&d, 2, 8);
    let check = |gpu: &mut CudaLlama, snap: &batos_lora::HotSnapshot, what: &str| {
        let slots: Vec<_> = (0..snap.len())
            .map(|s| Some(batos_types::SlotIdx(s as u16)))
            .chain([None])
            .collect();
        let mut kv = kv_manager(&d, 64, 4);
        let r = lockstep(
            &cpu,
            gpu,
            Some(snap),
            &mut kv,
            &mixed_specs(&prompts, &slots),
            6,
        );
        assert!(
            r.max_rel_err <= LOGIT_TOL,
            "{what}: logit error {}",
            r.max_rel_err
        );
        assert_same_greedy(test, &r, MIN_MARGIN);
    };
    check(&mut gpu, &hot.snapshot(), "two r8 adapters");
    let before = gpu.memory().adapter_uploads;
    assert_eq!(
        before.slot_writes,
        2 * pairs,
        "each adapter written once per stack"
    );

    // Slot 1's adapter goes cold; a new r4 adapter takes the slot.
    drop(hot.pins.remove(1));
    hot.mgr
        .add_files(
            "cold-r4",
            cuda_common::synthetic_adapter(&d, 4, 77),
            "synthetic",
            batos_lora::Expect::Absent,
        )
        .unwrap();
    let lease = hot.mgr.acquire("cold-r4").unwrap();
    let pin = hot.mgr.pin_hot(&lease).unwrap();
    // Queued ahead on the upload stream; the first step using slot 1 waits for it.
    gpu.prefetch_adapters(&hot.snapshot()).unwrap();
    check(&mut gpu, &hot.snapshot(), "after a cold r4 load");
    let after = gpu.memory().adapter_uploads;
    assert_eq!(
        after.slot_writes - before.slot_writes,
        pairs,
        "one slot per stack"
    );
    assert_eq!(after.stack_builds, before.stack_builds, "no stack rebuilt");
    assert_eq!(
        gpu.memory().adapters,
        reserved,
        "no bytes beyond the reservation"
    );

    // A rank-16 adapter outgrows the rank-8 stacks: they are rebuilt and refilled.
    // (The r4 adapter's lease goes too: with two warm entries, one pinned, a third
    // adapter loads only once nothing holds the second.)
    drop((pin, lease));
    hot.mgr
        .add_files(
            "cold-r16",
            cuda_common::synthetic_adapter(&d, 16, 78),
            "synthetic",
            batos_lora::Expect::Absent,
        )
        .unwrap();
    let lease = hot.mgr.acquire("cold-r16").unwrap();
    let _pin = hot.mgr.pin_hot(&lease).unwrap();
    check(&mut gpu, &hot.snapshot(), "after a cold r16 load");
    let grown = gpu.memory().adapter_uploads;
    assert_eq!(grown.stack_builds, after.stack_builds + pairs);
    assert!(gpu.memory().adapters > reserved);
}

/// `forward_greedy` (argmax on the device, ids downloaded) picks the argmax of the
/// logits `forward` downloads for the same step, row for row, with and without
/// adapters, in a prefill step (several rows kept per sequence: none, one, all).
#[test]
fn greedy_on_the_device_is_the_argmax_of_the_logits() {
    let test = "greedy_on_the_device_is_the_argmax_of_the_logits";
    let Some(dev) = device(test) else { return };
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 9);
    let cpu = synth.model(WeightDType::F16).unwrap();
    let d = *cpu.dims();
    let mut gpu = CudaLlama::upload(&cpu, dev, &budget()).unwrap();
    let hot = hot_adapters(&d, 2, 8);
    let snap = hot.snapshot();
    for adapters in [None, Some(&snap)] {
        let mut kv = kv_manager(&d, 32, 4);
        gpu.reset_kv();
        let mut steps = Vec::new();
        for i in 0..3 {
            let prompt = tokens(6 + i, i as u32 + 5, d.vocab_size);
            let a = kv.allocate_prompt(&prompt, None).unwrap().unwrap();
            let table = kv.block_table(a.seq).unwrap().blocks().to_vec();
            let mut s = SeqStep::new(prompt[a.cached_tokens..].to_vec(), a.cached_tokens, table);
            s.logits = [LogitsRows::None, LogitsRows::Last, LogitsRows::All][i];
            s.adapter = adapters.and(Some(hot.slots[i % 2]));
            steps.push(s);
        }
        let batch = ForwardBatch::new(steps);
        let out = gpu.forward(&batch, kv.storage_mut(), adapters).unwrap();
        // Same tokens at the same positions: the K/V rewrite is the same bytes.
        let greedy = gpu
            .forward_greedy(&batch, kv.storage_mut(), adapters)
            .unwrap();
        assert_eq!(greedy.seq_rows, out.seq_rows);
        assert_eq!(greedy.tokens.len(), out.num_rows());
        assert!(out.num_rows() > 2, "rows: {:?}", out.seq_rows);
        for r in 0..out.num_rows() {
            let want = batos_kernels::cpu::argmax(out.row(r).unwrap()).unwrap() as u32;
            assert_eq!(
                greedy.tokens[r],
                want,
                "row {r}, adapters {}",
                adapters.is_some()
            );
        }
        assert_eq!(greedy.last_token(0), None);
        assert_eq!(greedy.last_token(1), Some(greedy.tokens[0]));
    }
}

#[test]
fn int4_synthetic_model_runs_on_the_awq_kernels() {
    let test = "int4_synthetic_model_runs_on_the_awq_kernels";
    let Some(dev) = device(test) else { return };
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 5);
    let q = batos_model::quant::quantize_weights_rtn(&synth.config, &synth.weights(), 32)
        .expect("quantize synthetic model");
    let cpu =
        LlamaModel::from_quantized_with(&synth.config, &q, WeightDType::F16, Int4Activations::F32)
            .unwrap();
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
