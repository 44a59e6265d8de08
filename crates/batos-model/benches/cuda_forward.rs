//! GPU bench of the device-resident runtime (feature `cuda`; prints SKIP without a
//! device). Run: `cargo bench -p batos-model --features cuda --bench cuda_forward`
//! (the device check runs the prebuilt executable).
//!
//! Models, each a section of the output, chosen by `BATOS_BENCH_MODELS` (a comma list,
//! default `real`):
//! - `real`: the real model (`BATOS_GPU_MODEL` or the model cache; the device check
//!   carries its first 4 layers), skipped when absent;
//! - `f16`, `int4`: a synthetic model with
//!   SmolLM2-135M's full shapes (30 layers, hidden 576, 9/3 heads of 64, MLP 1536,
//!   vocab 49 152, tied embedding), random weights built here (speed does not depend
//!   on the values), dense f16 or int4 (round-to-nearest, groups of 64).
//!
//! Per model it prints:
//! - decode tok/s at batch 1 / 16 / 64 with 0, 4 and 16 distinct r16 adapters (each
//!   step: one token per sequence, logits downloaded and argmax on the host: the
//!   engine's path), after a prompt of 32 tokens, 32 timed steps, median of 3 runs;
//! - achieved weight-read bandwidth at batch 1 against `BATOS_PEAK_GBPS` (default
//!   4800, the H200's measured DRAM peak in docs/perf/gpu-kernels.md);
//! - cold → hot latency of one r16 adapter into a slot freed among 16 hot ones: image
//!   → warm → host slot, then the device slot write (one adapter's rows per stack, on
//!   the upload stream, waited for);
//! - one machine-readable line per model: `BATOS_BENCH {json}` (the device script
//!   compares it with the Hugging Face + PEFT bench, `scripts/hf_peft_bench.py`).

#[path = "../tests/cuda_common/mod.rs"]
mod cuda_common;
#[path = "../tests/forward_common/mod.rs"]
mod forward_common;

use std::sync::Arc;
use std::time::Instant;

use batos_kernels::cuda::CudaDevice;
use batos_lora::HotSnapshot;
use batos_model::forward::cuda::{CudaLlama, LoraCapacity};
use batos_model::forward::{ForwardBatch, Int4Activations, LlamaModel, SeqStep, WeightDType};
use batos_model::gguf::GgufFile;
use batos_model::synthetic::SyntheticLlama;
use batos_model::{ArchFamily, LlamaConfig, LlamaParams, LoadOptions, ModelWeights};
use batos_types::{MemoryBudget, SlotIdx};

/// Prompt tokens per sequence (the HF bench uses the same).
const PROMPT: usize = 32;
/// Timed decode steps (the HF bench uses the same).
const DECODE_STEPS: usize = 32;
/// Adapter rank of the bench adapters.
const RANK: usize = 16;
const BLOCK: usize = 16;

/// Where a decode step's greedy token is chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sampler {
    /// Logits downloaded, argmax on the host (the engine's path today).
    Host,
    /// `CudaLlama::forward_greedy`: argmax on the device, ids downloaded.
    Device,
}

fn decode_tok_s(
    gpu: &mut CudaLlama,
    snap: &HotSnapshot,
    slots: &[Option<SlotIdx>],
    batch: usize,
    sampler: Sampler,
) -> f64 {
    let d = *gpu.dims();
    // Prompt, one warm-up step and the timed steps, per sequence.
    let blocks = batch * (PROMPT + DECODE_STEPS + 2).div_ceil(BLOCK) + 4;
    let mut kv = forward_common::kv_manager(&d, blocks, BLOCK);
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
            let step = ForwardBatch::new(steps);
            match sampler {
                Sampler::Host => {
                    let out = gpu
                        .forward(&step, kv.storage_mut(), Some(snap))
                        .expect("decode");
                    for (i, t) in next.iter_mut().enumerate() {
                        *t =
                            batos_kernels::cpu::argmax(out.last_logits(i).unwrap()).unwrap() as u32;
                    }
                }
                Sampler::Device => {
                    let out = gpu
                        .forward_greedy(&step, kv.storage_mut(), Some(snap))
                        .expect("decode");
                    for (i, t) in next.iter_mut().enumerate() {
                        *t = out.last_token(i).unwrap();
                    }
                }
            }
            for &s in &seqs {
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

/// SmolLM2-135M's shapes (`/work/shared/reference/hf_model_summary.json`).
fn smollm2_params() -> LlamaParams {
    LlamaParams {
        family: ArchFamily::Llama,
        num_hidden_layers: 30,
        hidden_size: 576,
        intermediate_size: 1536,
        num_attention_heads: 9,
        num_key_value_heads: 3,
        head_dim: 64,
        vocab_size: 49_152,
        max_position_embeddings: 8192,
        rope_theta: 100_000.0,
        rope_scaling: None,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: true,
        sliding_window: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// Runs the whole bench on `cpu` (uploaded to `dev`), printing under `label`.
fn bench_model(dev: &Arc<CudaDevice>, cpu: &LlamaModel, label: &str) {
    let d = *cpu.dims();
    let budget = MemoryBudget::new("bench device", 1 << 36);
    let mut gpu = CudaLlama::upload(cpu, dev.clone(), &budget).unwrap();
    println!(
        "\n## {label}\n\ndevice {} ({}), {} layers, weights on device {} MiB, read per step {} MiB",
        dev.name(),
        dev.arch().as_str(),
        d.num_layers,
        gpu.memory().weights >> 20,
        gpu.memory().weight_bytes_per_step >> 20
    );

    // The hot tier's stacks, sized once: 16 slots of rank 16.
    gpu.reserve_adapters(LoraCapacity {
        slots: 16,
        max_rank: RANK,
    })
    .unwrap();
    let mut hot = cuda_common::hot_adapters(&d, 16, RANK);
    let snap = hot.snapshot();
    let t = Instant::now();
    gpu.sync_adapters(&snap).unwrap();
    println!(
        "16 hot r{RANK} adapters on the device: {} MiB of stacks, first upload {:.1} ms ({} MiB written)",
        gpu.memory().adapters >> 20,
        t.elapsed().as_secs_f64() * 1e3,
        gpu.memory().adapter_uploads.bytes_written >> 20
    );
    println!("\n| batch | adapters | decode tok/s | vs no adapters |");
    println!("|---|---|---|---|");
    let mut base_b1 = 0.0;
    let mut rows = Vec::new();
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
                    .map(|_| decode_tok_s(&mut gpu, &snap, &slots, batch, Sampler::Host))
                    .collect(),
            );
            if n == 0 {
                base = tps;
                if batch == 1 {
                    base_b1 = tps;
                }
            }
            println!("| {batch} | {n} | {tps:.0} | {:.2}x |", tps / base);
            rows.push(serde_json::json!({"batch": batch, "adapters": n, "tok_s": tps}));
        }
    }
    for batch in [1usize, 64] {
        let tps = median(
            (0..3)
                .map(|_| decode_tok_s(&mut gpu, &snap, &[None], batch, Sampler::Device))
                .collect(),
        );
        println!("| {batch} | 0, argmax on the device | {tps:.0} | |");
        rows.push(serde_json::json!({
            "batch": batch, "adapters": 0, "tok_s": tps, "sampler": "device",
        }));
    }
    let peak: f64 = std::env::var("BATOS_PEAK_GBPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4800.0);
    let gbps = gpu.memory().weight_bytes_per_step as f64 * base_b1 / 1e9;
    println!(
        "\nweight-read bandwidth at batch 1: {gbps:.0} GB/s = {:.1}% of {peak:.0} GB/s ({:.3} ms/step)",
        100.0 * gbps / peak,
        1e3 / base_b1
    );
    drop(snap);

    // Cold → hot: free one of the 16 slots and load a new r16 adapter into it.
    let mut times = Vec::new();
    for i in 0..3 {
        drop(hot.pins.pop());
        let name = format!("cold-{i}");
        hot.mgr
            .add_files(
                &name,
                cuda_common::synthetic_adapter(&d, RANK, 100 + i),
                "bench",
                batos_lora::Expect::Absent,
            )
            .unwrap();
        hot.mgr.unload(&name);
        let before = gpu.memory().adapter_uploads;
        let t0 = Instant::now();
        let lease = hot.mgr.acquire(&name).unwrap();
        let pin = hot.mgr.pin_hot(&lease).unwrap();
        let t1 = Instant::now();
        gpu.sync_adapters(&hot.mgr.hot_snapshot()).unwrap();
        let t2 = Instant::now();
        let after = gpu.memory().adapter_uploads;
        times.push((
            (t1 - t0).as_secs_f64() * 1e3,
            (t2 - t1).as_secs_f64() * 1e3,
            after.slot_writes - before.slot_writes,
            after.bytes_written - before.bytes_written,
        ));
        hot.pins.push(pin);
    }
    let host = median(times.iter().map(|t| t.0).collect());
    let device = median(times.iter().map(|t| t.1).collect());
    let (writes, bytes) = (times[2].2, times[2].3);
    println!(
        "cold -> hot r{RANK} adapter: {host:.2} ms image -> warm -> host slot, {device:.2} ms device slot write ({writes} stack slots, {:.1} MiB), {:.2} ms total",
        bytes as f64 / (1 << 20) as f64,
        host + device
    );
    let line = serde_json::json!({
        "model": label,
        "layers": d.num_layers,
        "device": dev.name(),
        "prompt": PROMPT,
        "decode_steps": DECODE_STEPS,
        "rank": RANK,
        "decode": rows,
        "weight_gbps_b1": gbps,
        "peak_gbps": peak,
        "cold_hot_ms": {"host": host, "device": device},
    });
    println!("BATOS_BENCH {line}");
}

fn main() {
    let test = "cuda_forward bench";
    let Some(dev) = cuda_common::device(test) else {
        return;
    };
    let models = std::env::var("BATOS_BENCH_MODELS").unwrap_or_else(|_| "real".into());
    let mut synth: Option<SyntheticLlama> = None;
    for kind in models.split(',').map(str::trim).filter(|k| !k.is_empty()) {
        if kind == "real" {
            let Some(path) = cuda_common::model_path(test) else {
                continue;
            };
            let gguf = GgufFile::open(&path).expect("open GGUF");
            let config = LlamaConfig::from_gguf(&gguf).expect("config");
            let weights = ModelWeights::from_gguf(&gguf, &config, &LoadOptions::default()).unwrap();
            let cpu = LlamaModel::from_weights(&config, &weights, WeightDType::F16).unwrap();
            bench_model(
                &dev,
                &cpu,
                &format!("real weights f16 ({})", path.display()),
            );
            continue;
        }
        if !matches!(kind, "f16" | "int4") {
            panic!("BATOS_BENCH_MODELS: unknown model '{kind}' (real, f16 or int4)");
        }
        let synth = synth.get_or_insert_with(|| {
            let t = Instant::now();
            let s = SyntheticLlama::new(LlamaConfig::new(smollm2_params()).unwrap(), 7);
            println!(
                "synthetic SmolLM2-shaped model built in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            s
        });
        let cpu = if kind == "f16" {
            synth.model(WeightDType::F16).unwrap()
        } else {
            let q = batos_model::quant::quantize_weights_rtn(&synth.config, &synth.weights(), 64)
                .expect("quantize the synthetic model");
            LlamaModel::from_quantized_with(
                &synth.config,
                &q,
                WeightDType::F16,
                Int4Activations::F32,
            )
            .unwrap()
        };
        bench_model(
            &dev,
            &cpu,
            &format!("synthetic SmolLM2-135M shapes, 30 layers, {kind}"),
        );
    }
}
