//! GPU bench of the device-resident runtime (feature `cuda`; prints SKIP without a
//! device or the real model). Run: `cargo bench -p batos-model --features cuda --bench
//! cuda_forward` (the device check runs the prebuilt executable).
//!
//! Prints, on the real model (`BATOS_GPU_MODEL` or the model cache):
//! - decode tok/s at batch 1 / 16 / 64 with 0, 4 and 16 distinct r16 adapters (each
//!   step: one token per sequence, logits downloaded and argmax on the host: the
//!   engine's path);
//! - achieved weight-read bandwidth at batch 1 against `BATOS_PEAK_GBPS` (default
//!   4800, the H200's measured DRAM peak in docs/perf/gpu-kernels.md);
//! - cold → hot latency of one r16 adapter: image → warm → hot slot on the host, then
//!   the device stacks.
//!
//! Timings are wall clock over whole steps after a warm-up step, median of 3 runs.

#[path = "../tests/cuda_common/mod.rs"]
mod cuda_common;
#[path = "../tests/forward_common/mod.rs"]
mod forward_common;

use std::time::Instant;

use batos_lora::HotSnapshot;
use batos_model::forward::cuda::CudaLlama;
use batos_model::forward::{ForwardBatch, LlamaModel, SeqStep, WeightDType};
use batos_model::gguf::GgufFile;
use batos_model::{LlamaConfig, LoadOptions, ModelWeights};
use batos_types::{MemoryBudget, SlotIdx};

const PROMPT: usize = 32;
const DECODE_STEPS: usize = 32;

fn decode_tok_s(
    gpu: &mut CudaLlama,
    snap: &HotSnapshot,
    slots: &[Option<SlotIdx>],
    batch: usize,
) -> f64 {
    let d = *gpu.dims();
    let mut kv = forward_common::kv_manager(&d, 4096, 16);
    gpu.reset_kv();
    let mut seqs = Vec::new();
    let mut steps = Vec::new();
    for i in 0..batch {
        let prompt = forward_common::tokens(PROMPT, i as u32 + 1, d.vocab_size);
        let a = kv.allocate_prompt(&prompt, None).unwrap().unwrap();
        let table = kv.block_table(a.seq).unwrap().blocks().to_vec();
        let mut s = SeqStep::new(prompt[a.cached_tokens..].to_vec(), a.cached_tokens, table);
        s.adapter = slots[i % slots.len()];
        steps.push(s);
        seqs.push(a.seq);
    }
    let out = gpu
        .forward(&ForwardBatch::new(steps), kv.storage_mut(), Some(snap))
        .expect("prefill");
    let mut next: Vec<u32> = (0..batch)
        .map(|i| batos_kernels::cpu::argmax(out.last_logits(i).unwrap()).unwrap() as u32)
        .collect();
    for &s in &seqs {
        kv.mark_computed(s, PROMPT).unwrap();
    }
    let mut run = |n: usize| {
        for _ in 0..n {
            let mut steps = Vec::with_capacity(batch);
            for (i, &s) in seqs.iter().enumerate() {
                let cached = kv.num_computed(s).unwrap();
                kv.append_tokens(s, &[next[i]]).unwrap().unwrap();
                let table = kv.block_table(s).unwrap().blocks().to_vec();
                let mut st = SeqStep::new(vec![next[i]], cached, table);
                st.adapter = slots[i % slots.len()];
                steps.push(st);
            }
            let out = gpu
                .forward(&ForwardBatch::new(steps), kv.storage_mut(), Some(snap))
                .expect("decode");
            for (i, &s) in seqs.iter().enumerate() {
                next[i] = batos_kernels::cpu::argmax(out.last_logits(i).unwrap()).unwrap() as u32;
                let c = kv.num_computed(s).unwrap();
                kv.mark_computed(s, c + 1).unwrap();
            }
        }
    };
    run(1);
    let t = Instant::now();
    run(DECODE_STEPS);
    (batch * DECODE_STEPS) as f64 / t.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let test = "cuda_forward bench";
    let Some(dev) = cuda_common::device(test) else {
        return;
    };
    let Some(path) = cuda_common::model_path(test) else {
        return;
    };
    let gguf = GgufFile::open(&path).expect("open GGUF");
    let config = LlamaConfig::from_gguf(&gguf).expect("config");
    let weights = ModelWeights::from_gguf(&gguf, &config, &LoadOptions::default()).unwrap();
    let cpu = LlamaModel::from_weights(&config, &weights, WeightDType::F16).unwrap();
    let d = *cpu.dims();
    let budget = MemoryBudget::new("bench device", 1 << 36);
    let mut gpu = CudaLlama::upload(&cpu, dev.clone(), &budget).unwrap();
    println!(
        "device {} ({}), model {} ({} layers), weights on device {} MiB, read per step {} MiB",
        dev.name(),
        dev.arch().as_str(),
        path.display(),
        d.num_layers,
        gpu.memory().weights >> 20,
        gpu.memory().weight_bytes_per_step >> 20
    );

    let hot = cuda_common::hot_adapters(&d, 16, 16);
    let snap = hot.snapshot();
    gpu.sync_adapters(&snap).unwrap();
    println!(
        "16 hot r16 adapters on the device: {} MiB",
        gpu.memory().adapters >> 20
    );
    println!("| batch | adapters | decode tok/s | vs no adapters |");
    println!("|---|---|---|---|");
    let mut base_b1 = 0.0;
    for batch in [1usize, 16, 64] {
        let mut base = 0.0;
        for n in [0usize, 4, 16] {
            let slots: Vec<Option<SlotIdx>> = if n == 0 {
                vec![None]
            } else {
                hot.slots[..n].iter().copied().map(Some).collect()
            };
            let tps = median(
                (0..3)
                    .map(|_| decode_tok_s(&mut gpu, &snap, &slots, batch))
                    .collect(),
            );
            if n == 0 {
                base = tps;
                if batch == 1 {
                    base_b1 = tps;
                }
            }
            println!("| {batch} | {n} | {tps:.0} | {:.2}x |", tps / base);
        }
    }
    let peak: f64 = std::env::var("BATOS_PEAK_GBPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4800.0);
    let gbps = gpu.memory().weight_bytes_per_step as f64 * base_b1 / 1e9;
    println!(
        "weight-read bandwidth at batch 1: {gbps:.0} GB/s = {:.1}% of {peak:.0} GB/s ({:.3} ms/step)",
        100.0 * gbps / peak,
        1e3 / base_b1
    );

    // Cold → hot for one more r16 adapter: evicting an unpinned slot of a 1-slot manager.
    let one = cuda_common::hot_adapters(&d, 1, 16);
    drop(one.pins);
    let mut times = Vec::new();
    for i in 0..3 {
        let name = format!("cold-{i}");
        one.mgr
            .add_files(
                &name,
                cuda_common::synthetic_adapter(&d, 16, 100 + i),
                "bench",
                batos_lora::Expect::Absent,
            )
            .unwrap();
        one.mgr.unload(&name);
        let t0 = Instant::now();
        let lease = one.mgr.acquire(&name).unwrap();
        let pin = one.mgr.pin_hot(&lease).unwrap();
        let t1 = Instant::now();
        gpu.sync_adapters(&one.mgr.hot_snapshot()).unwrap();
        let t2 = Instant::now();
        times.push(((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64()));
        drop(pin);
    }
    let host = median(times.iter().map(|t| t.0 * 1e3).collect());
    let device = median(times.iter().map(|t| t.1 * 1e3).collect());
    println!(
        "cold -> hot r16 adapter: {host:.2} ms image -> warm -> host slot, {device:.2} ms device stacks, {:.2} ms total",
        host + device
    );
}
