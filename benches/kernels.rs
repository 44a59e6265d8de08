//! Criterion benches of the CPU kernels at SmolLM2-135M's shapes, named
//! `<impl>/<kernel>/<shape>/<tokens>[/<threads>]`, e.g. `cpu-avx2/matmul_f16/576x1536/t=1`
//! (`<impl>` is `cpu::implementation()`, so a scalar fallback is never mistaken for
//! the AVX2 path).
//!
//! `cargo bench --bench kernels` (filter with a trailing substring, e.g. `-- matmul_f16`).
//! Matmul throughput is counted in FLOPs (2·T·out·in) for T > 1 and in weight bytes for
//! T = 1, where decode is bound by memory bandwidth. Figures and peaks:
//! docs/perf/kernels.md.

use batos_kernels::cpu::{self, ThreadBackend};
use batos_kernels::{AttentionHeads, KvCache, KvCacheLayout, SeqAttention, WeightView};
use batos_types::BlockId;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use std::hint::black_box;
use std::time::Duration;

/// (out_features, in_features) of every linear layer of SmolLM2-135M.
const SHAPES: [(usize, usize); 5] = [
    (576, 576),
    (192, 576),
    (1536, 576),
    (576, 1536),
    (49152, 576),
];
const TOKENS: [usize; 4] = [1, 16, 128, 512];

fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

fn configure<'a>(
    c: &'a mut Criterion,
    name: &str,
) -> criterion::BenchmarkGroup<'a, criterion::measurement::WallTime> {
    let mut g = c.benchmark_group(name);
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    g
}

fn matmul(c: &mut Criterion) {
    let imp = cpu::implementation();
    for dtype in ["f32", "f16", "bf16"] {
        let mut g = configure(c, &format!("{imp}/matmul_{dtype}"));
        for &(n, k) in &SHAPES {
            let w = data(n * k, 1);
            let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let view = match dtype {
                "f32" => WeightView::f32(&w, n, k),
                "f16" => WeightView::f16(&w16, n, k),
                _ => WeightView::bf16(&wb, n, k),
            }
            .unwrap();
            let wbytes = (n * k * if dtype == "f32" { 4 } else { 2 }) as u64;
            for &t in &TOKENS {
                // lm_head over a whole prompt is never run (only last tokens need logits).
                if n == 49152 && t > 16 {
                    continue;
                }
                let x = data(t * k, 2);
                let mut out = vec![0.0f32; t * n];
                g.throughput(if t == 1 {
                    Throughput::Bytes(wbytes)
                } else {
                    Throughput::Elements((2 * t * n * k) as u64)
                });
                g.bench_function(
                    BenchmarkId::new(format!("{n}x{k}"), format!("t={t}")),
                    |b| b.iter(|| cpu::matmul(black_box(&x), &view, &mut out).unwrap()),
                );
            }
        }
        g.finish();
    }
}

/// Every linear layer of SmolLM2-135M (30 layers × q, k, v, o, gate, up, down) with
/// distinct f16 weights (212 MB, far beyond the caches), plus the tied lm_head for the
/// last token: the matmul share of one forward step, with weights streamed from DRAM
/// as in the real model. tok/s = T / time.
fn model_stack(c: &mut Criterion) {
    let imp = cpu::implementation();
    let mut g = configure(c, &format!("{imp}/model_matmuls_f16"));
    g.measurement_time(Duration::from_secs(4));
    let layer: [(usize, usize); 7] = [
        (576, 576),
        (192, 576),
        (192, 576),
        (576, 576),
        (1536, 576),
        (1536, 576),
        (576, 1536),
    ];
    let weights: Vec<Vec<f16>> = (0..30)
        .flat_map(|l| {
            layer
                .iter()
                .enumerate()
                .map(move |(i, &(n, k))| (l * 7 + i, n, k))
        })
        .map(|(seed, n, k)| {
            data(n * k, seed as u32 + 10)
                .iter()
                .map(|&v| f16::from_f32(v))
                .collect()
        })
        .collect();
    let lm: Vec<f16> = data(49152 * 576, 99)
        .iter()
        .map(|&v| f16::from_f32(v))
        .collect();
    let lm_view = WeightView::f16(&lm, 49152, 576).unwrap();
    let bytes: usize = weights.iter().map(|w| w.len() * 2).sum::<usize>() + lm.len() * 2;
    for &t in &[1usize, 16, 128, 512] {
        let x = data(t * 1536, 2);
        let mut out = vec![0.0f32; t * 1536];
        let mut logits = vec![0.0f32; 49152];
        let flops = 2 * t * (bytes / 2 - lm.len()) + 2 * lm.len();
        g.throughput(if t == 1 {
            Throughput::Bytes(bytes as u64)
        } else {
            Throughput::Elements(flops as u64)
        });
        g.bench_function(format!("smollm2-135m/t={t}"), |b| {
            b.iter(|| {
                for (i, w) in weights.iter().enumerate() {
                    let (n, k) = layer[i % 7];
                    let view = WeightView::f16(w, n, k).unwrap();
                    cpu::matmul(&x[..t * k], &view, &mut out[..t * n]).unwrap();
                }
                cpu::matmul(&x[(t - 1) * 576..t * 576], &lm_view, &mut logits).unwrap();
            })
        });
    }
    g.finish();
}

/// A batch of `seqs` sequences of `ctx` cached tokens, each with `q_len` new queries.
struct AttnBatch {
    heads: AttentionHeads,
    layout: KvCacheLayout,
    k: Vec<f32>,
    v: Vec<f32>,
    tables: Vec<Vec<BlockId>>,
    ctx: usize,
    q_len: usize,
    q: Vec<f32>,
}

impl AttnBatch {
    fn new(seqs: usize, ctx: usize, q_len: usize) -> Self {
        let heads = AttentionHeads::new(9, 3, 64).unwrap();
        let layout = KvCacheLayout::new(16, 3, 64).unwrap();
        let per = ctx.div_ceil(16);
        let blocks = seqs * per;
        let tables = (0..seqs)
            .map(|s| (0..per).map(|b| BlockId((b * seqs + s) as u32)).collect())
            .collect();
        AttnBatch {
            heads,
            layout,
            k: data(blocks * layout.block_stride(), 3),
            v: data(blocks * layout.block_stride(), 4),
            tables,
            ctx,
            q_len,
            q: data(seqs * q_len * heads.q_width(), 5),
        }
    }

    fn run(&self, out: &mut [f32]) {
        let seqs: Vec<SeqAttention<'_>> = self
            .tables
            .iter()
            .enumerate()
            .map(|(i, t)| SeqAttention {
                block_table: t,
                context_len: self.ctx,
                query_start: i * self.q_len,
                query_len: self.q_len,
            })
            .collect();
        let cache = KvCache {
            k: &self.k,
            v: &self.v,
            layout: self.layout,
        };
        cpu::paged_attention(&self.q, &self.heads, &cache, &seqs, out).unwrap();
    }
}

fn attention(c: &mut Criterion) {
    let imp = cpu::implementation();
    let mut g = configure(c, &format!("{imp}/attention"));
    for &(seqs, ctx, q_len, name) in &[
        (1usize, 512usize, 1usize, "decode/seqs=1/ctx=512"),
        (16, 512, 1, "decode/seqs=16/ctx=512"),
        (1, 128, 128, "prefill/seqs=1/t=128"),
        (1, 512, 512, "prefill/seqs=1/t=512"),
    ] {
        let batch = AttnBatch::new(seqs, ctx, q_len);
        let mut out = vec![0.0f32; batch.q.len()];
        // QKᵀ and PV over the causal triangle: 4·hd FLOPs per (query, key, head).
        let pairs: usize = (0..q_len).map(|i| ctx - q_len + i + 1).sum::<usize>() * seqs;
        g.throughput(Throughput::Elements((4 * 64 * 9 * pairs) as u64));
        g.bench_function(name, |b| b.iter(|| batch.run(&mut out)));
    }
    g.finish();
}

fn norms(c: &mut Criterion) {
    let imp = cpu::implementation();
    let mut g = configure(c, &format!("{imp}/rms_norm"));
    let w = data(576, 6);
    for &t in &[1usize, 128, 512] {
        let x = data(t * 576, 7);
        let mut out = vec![0.0f32; t * 576];
        g.throughput(Throughput::Bytes((t * 576 * 8) as u64));
        g.bench_function(BenchmarkId::new("576", format!("t={t}")), |b| {
            b.iter(|| cpu::rms_norm(black_box(&x), &w, 1e-5, &mut out).unwrap())
        });
    }
    g.finish();
    let mut g = configure(c, &format!("{imp}/silu_mul"));
    for &t in &[1usize, 512] {
        let (gate, up) = (data(t * 1536, 8), data(t * 1536, 9));
        let mut out = vec![0.0f32; t * 1536];
        g.throughput(Throughput::Elements((t * 1536) as u64));
        g.bench_function(BenchmarkId::new("1536", format!("t={t}")), |b| {
            b.iter(|| cpu::silu_mul(black_box(&gate), &up, &mut out).unwrap())
        });
    }
    g.finish();
}

/// The same kernels under each thread backend, to choose the default.
fn threads(c: &mut Criterion) {
    let imp = cpu::implementation();
    let mut g = configure(c, &format!("{imp}/threads"));
    let (n, k) = (1536, 576);
    let w: Vec<f16> = data(n * k, 1).iter().map(|&v| f16::from_f32(v)).collect();
    let view = WeightView::f16(&w, n, k).unwrap();
    let decode = AttnBatch::new(16, 512, 1);
    let mut attn_out = vec![0.0f32; decode.q.len()];
    for (backend, label) in [
        (ThreadBackend::SpinPool, "spinpool"),
        (ThreadBackend::Rayon, "rayon"),
        (ThreadBackend::Serial, "serial"),
    ] {
        cpu::set_thread_backend(backend);
        for &t in &[1usize, 128] {
            let x = data(t * k, 2);
            let mut out = vec![0.0f32; t * n];
            g.bench_function(format!("matmul_f16/{n}x{k}/t={t}/{label}"), |b| {
                b.iter(|| cpu::matmul(black_box(&x), &view, &mut out).unwrap())
            });
        }
        // A decode step is ~210 small matmuls back to back: launch overhead matters.
        let (n2, k2) = (192, 576);
        let w2: Vec<f16> = data(n2 * k2, 1).iter().map(|&v| f16::from_f32(v)).collect();
        let view2 = WeightView::f16(&w2, n2, k2).unwrap();
        let x2 = data(k2, 2);
        let mut out2 = vec![0.0f32; n2];
        g.bench_function(format!("matmul_f16/{n2}x{k2}/t=1/{label}"), |b| {
            b.iter(|| cpu::matmul(black_box(&x2), &view2, &mut out2).unwrap())
        });
        g.bench_function(format!("attention/decode/seqs=16/ctx=512/{label}"), |b| {
            b.iter(|| decode.run(&mut attn_out))
        });
    }
    cpu::set_thread_backend(ThreadBackend::default());
    g.finish();
}

fn scalar_reference(c: &mut Criterion) {
    let mut g = configure(c, "cpu-scalar");
    let (n, k) = (576, 576);
    let w: Vec<f16> = data(n * k, 1).iter().map(|&v| f16::from_f32(v)).collect();
    let view = WeightView::f16(&w, n, k).unwrap();
    for &t in &[1usize, 16] {
        let x = data(t * k, 2);
        let mut out = vec![0.0f32; t * n];
        g.throughput(Throughput::Elements((2 * t * n * k) as u64));
        g.bench_function(format!("matmul_f16/{n}x{k}/t={t}"), |b| {
            b.iter(|| cpu::reference::matmul(black_box(&x), &view, &mut out).unwrap())
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    matmul,
    model_stack,
    attention,
    norms,
    threads,
    scalar_reference
);
criterion_main!(benches);
