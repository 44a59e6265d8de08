//! Bookkeeping cost of the paged KV cache (no K/V math): what the scheduler pays per
//! step. Run: `cargo bench -p batos-kv --bench block_pool`.

use std::hint::black_box;

use batos_kv::{KvCacheConfig, KvCacheManager, KvShape};
use batos_types::MemoryBudget;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

/// SmolLM2-135M's KV shape: 30 layers, 3 KV heads of 64.
const SHAPE: KvShape = KvShape {
    num_layers: 30,
    num_kv_heads: 3,
    head_dim: 64,
};

fn manager(blocks: usize) -> KvCacheManager {
    let cfg = KvCacheConfig::new(SHAPE, 1 << 20)
        .and_then(|c| c.with_num_blocks(blocks))
        .expect("valid config");
    let budget = MemoryBudget::new("bench", cfg.bytes_per_block() * blocks as u64);
    KvCacheManager::new(cfg, &budget).expect("fits")
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| i.wrapping_mul(2654435761) % 49152)
        .collect()
}

fn bench(c: &mut Criterion) {
    let p = prompt(512);
    let mut g = c.benchmark_group("cpu/kv");

    g.bench_function("allocate_prompt_512_miss+free", |b| {
        let mut kv = manager(256);
        b.iter(|| {
            let a = kv.allocate_prompt(black_box(&p), None).unwrap().unwrap();
            kv.free(a.seq).unwrap();
        })
    });

    g.bench_function("allocate_prompt_512_hit+free", |b| {
        let mut kv = manager(256);
        let a = kv.allocate_prompt(&p, None).unwrap().unwrap();
        kv.mark_computed(a.seq, p.len()).unwrap();
        kv.free(a.seq).unwrap();
        b.iter(|| {
            let a = kv.allocate_prompt(black_box(&p), None).unwrap().unwrap();
            assert_eq!(a.cached_tokens, 496);
            kv.free(a.seq).unwrap();
        })
    });

    // One decode step of 16 sequences: append one token each and mark it computed.
    g.bench_function("decode_step_16_seqs", |b| {
        b.iter_batched_ref(
            || {
                let mut kv = manager(1024);
                let seqs: Vec<_> = (0..16u32)
                    .map(|s| {
                        let mut q = prompt(100);
                        q[0] = s;
                        let a = kv.allocate_prompt(&q, None).unwrap().unwrap();
                        kv.mark_computed(a.seq, q.len()).unwrap();
                        a.seq
                    })
                    .collect();
                (kv, seqs)
            },
            |(kv, seqs)| {
                for &s in seqs.iter() {
                    let slots = kv.append_tokens(s, &[7]).unwrap().unwrap();
                    let n = kv.tokens(s).unwrap().len();
                    kv.mark_computed(s, n).unwrap();
                    black_box(slots);
                }
            },
            BatchSize::LargeInput,
        )
    });

    // Fork a 100-token sequence and write one token into the shared partial block:
    // one 30-layer block copy.
    g.bench_function("fork+cow_append+free", |b| {
        let mut kv = manager(64);
        let a = kv.allocate_prompt(&prompt(100), None).unwrap().unwrap();
        b.iter(|| {
            let f = kv.fork(a.seq).unwrap();
            black_box(kv.append_tokens(f, &[1]).unwrap().unwrap());
            kv.free(f).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
