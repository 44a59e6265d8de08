//! Criterion benches of one batched forward step of the real model (SmolLM2-135M,
//! GGUF dequantized, weights stored as f32 / bf16 / f16), named
//! `<impl>/forward_<dtype>/<what>`:
//!
//! - `prefill/t=128`, `prefill/t=512`: one sequence's prompt in one step, logits for
//!   its last token (throughput in tokens);
//! - `decode/seqs=N` for N = 1, 4, 16: one decode token for each of N sequences whose
//!   64-token prompts are already cached (throughput in generated tokens).
//!
//! `cargo bench -p batos-model --bench forward` (filter with a trailing substring, e.g.
//! `-- bf16/decode`). The model is fetched like the tests do; without it the bench says
//! so and measures nothing.

use std::hint::black_box;
use std::time::Duration;

use batos_kernels::cpu;
use batos_kv::{KvCacheConfig, KvCacheManager, KvShape};
use batos_model::forward::{ForwardBatch, LlamaModel, SeqStep, WeightDType};
use batos_model::gguf::GgufFile;
use batos_model::{LlamaConfig, LoadOptions, ModelWeights};
use batos_types::{BlockId, MemoryBudget};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BLOCK: usize = 16;

fn kv(model: &LlamaModel, blocks: usize) -> KvCacheManager {
    let d = model.dims();
    let shape = KvShape {
        num_layers: d.num_layers,
        num_kv_heads: d.num_kv_heads,
        head_dim: d.head_dim,
    };
    let config = KvCacheConfig::new(shape, 1 << 20)
        .and_then(|c| c.with_num_blocks(blocks))
        .expect("cache config");
    KvCacheManager::new(config, &MemoryBudget::new("bench", 1 << 34)).expect("cache")
}

/// Deterministic token ids spread over the vocabulary.
fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(7919) ^ seed.wrapping_mul(104_729)) % 49_152)
        .collect()
}

fn table(first: u32, n: usize) -> Vec<BlockId> {
    (first..first + n as u32).map(BlockId).collect()
}

fn forward(c: &mut Criterion) {
    let path = match batos_model::fetch::smollm2_gguf() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("forward bench: real model unavailable ({e}); nothing measured");
            return;
        }
    };
    let gguf = GgufFile::open(&path).expect("open GGUF");
    let config = LlamaConfig::from_gguf(&gguf).expect("config");
    let weights = ModelWeights::from_gguf(&gguf, &config, &LoadOptions::default()).expect("load");
    let imp = cpu::implementation();
    for (dtype, name) in [
        (WeightDType::F32, "f32"),
        (WeightDType::BF16, "bf16"),
        (WeightDType::F16, "f16"),
    ] {
        let model = LlamaModel::from_weights(&config, &weights, dtype).expect("model");
        let mut g = c.benchmark_group(format!("{imp}/forward_{name}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(3));

        let mut cache = kv(&model, 16 * 5 + 32);
        for t in [128usize, 512] {
            let batch = ForwardBatch::new(vec![SeqStep::new(
                tokens(t, 1),
                0,
                table(0, t.div_ceil(BLOCK)),
            )]);
            g.throughput(Throughput::Elements(t as u64));
            g.bench_function(format!("prefill/t={t}"), |b| {
                b.iter(|| black_box(model.forward(&batch, cache.storage_mut()).unwrap()))
            });
        }

        for seqs in [1usize, 4, 16] {
            // Sequence s owns blocks 5s..5s+5: a 64-token prompt and room for its next.
            let steps = |from: usize, n: usize| -> ForwardBatch {
                ForwardBatch::new(
                    (0..seqs)
                        .map(|s| {
                            SeqStep::new(
                                tokens(64 + 1, s as u32 + 2)[from..from + n].to_vec(),
                                from,
                                table(5 * s as u32, 5),
                            )
                        })
                        .collect(),
                )
            };
            model
                .forward(&steps(0, 64), cache.storage_mut())
                .expect("prefill the prompts");
            let decode = steps(64, 1);
            g.throughput(Throughput::Elements(seqs as u64));
            g.bench_function(format!("decode/seqs={seqs}"), |b| {
                b.iter(|| black_box(model.forward(&decode, cache.storage_mut()).unwrap()))
            });
        }
        g.finish();
    }
}

criterion_group!(benches, forward);
criterion_main!(benches);
