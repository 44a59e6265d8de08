//! Criterion benches of the int4 (AutoAWQ GEMM layout) CPU matmul against the dense
//! f16 and f32 paths at SmolLM2-135M's shapes, group size 32 (the `batos quantize`
//! default), named `<impl>/matmul_<dtype>/<out>x<in>/t=<tokens>` (`<impl>` is
//! `cpu::implementation()`), plus the int4 tied LM head (49152x576) and the decode
//! matvec on one thread (`matmul_int4_serial`) to show the fork/join cost, and
//! `int4_decode_step`: every projection of one step of the 30-layer model plus the
//! head, each from its own buffers (75 MB, so the weights come from DRAM as in a real
//! decode step, unlike the single-matrix benches where they stay in cache).
//!
//! The integer-dot kernels (`cpu::int4_dot`: int8 activations, weights repacked at
//! load) run the same shapes as `<impl>/matmul_int4_int8/<path>/...` for each SIMD
//! path this CPU has (quantising the activations included) and as
//! `<impl>/int4_int8_decode_step` on the fastest.
//!
//! `cargo bench --bench int4` (filter with a trailing substring, e.g. `-- t=1`).
//! Throughput: FLOPs (2·T·out·in). Figures: docs/perf/awq.md.

use batos_kernels::cpu::int4_dot::{self, DotPath, Int4DotWeight};
use batos_kernels::cpu::{self, int4::pack_word, ThreadBackend};
use batos_kernels::{Int4Data, Int4Layout, WeightView};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use std::hint::black_box;
use std::time::Duration;

/// (out_features, in_features) of the projections of SmolLM2-135M (q/k/v and
/// gate/up fused as the forward pass runs them).
const SHAPES: [(usize, usize); 4] = [(960, 576), (576, 576), (3072, 576), (576, 1536)];
const TOKENS: [usize; 4] = [1, 16, 128, 512];
const GROUP: usize = 32;
/// The tied embedding/LM head, int4 only (the dense copies would be 57-113 MB).
const HEAD: (usize, usize) = (49152, 576);

fn data(n: usize, seed: u32) -> Vec<u32> {
    let mut s = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            s
        })
        .collect()
}

fn floats(n: usize, seed: u32) -> Vec<f32> {
    data(n, seed)
        .into_iter()
        .map(|v| (v >> 8) as f32 / (1u32 << 23) as f32 - 1.0)
        .collect()
}

struct Int4Owned {
    layout: Int4Layout,
    qweight: Vec<u32>,
    qzeros: Vec<u32>,
    scales: Vec<f16>,
}

impl Int4Owned {
    fn data(&self) -> Int4Data<'_> {
        Int4Data::new(self.layout, &self.qweight, &self.qzeros, &self.scales).unwrap()
    }
}

fn int4(n: usize, k: usize) -> Int4Owned {
    let layout = Int4Layout::new(k, n, GROUP).unwrap();
    let qweight = data(layout.qweight_len(), 3);
    let qzeros = (0..layout.qzeros_len())
        .map(|_| pack_word([8; 8]))
        .collect();
    let scales = vec![f16::from_f32(0.01); layout.scales_len()];
    Int4Owned {
        layout,
        qweight,
        qzeros,
        scales,
    }
}

fn matmul(c: &mut Criterion) {
    let imp = cpu::implementation();
    for dtype in ["int4", "f16", "f32"] {
        let mut g = c.benchmark_group(format!("{imp}/matmul_{dtype}"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        // The head only as int4 (the model's dense heads are measured by the f16/f32
        // groups at the projection shapes), at the decode batch sizes.
        let head: &[(usize, usize)] = if dtype == "int4" { &[HEAD] } else { &[] };
        for &(n, k) in SHAPES.iter().chain(head) {
            let q = int4(n, k);
            let w32 = floats(n * k, 1);
            let w16: Vec<f16> = w32.iter().map(|&v| f16::from_f32(v)).collect();
            let view = match dtype {
                "int4" => WeightView::int4(q.data()),
                "f16" => WeightView::f16(&w16, n, k).unwrap(),
                _ => WeightView::f32(&w32, n, k).unwrap(),
            };
            let tokens: &[usize] = if (n, k) == HEAD { &[1, 16] } else { &TOKENS };
            for &t in tokens {
                let x = floats(t * k, 2);
                let mut out = vec![0f32; t * n];
                g.throughput(Throughput::Elements((2 * t * n * k) as u64));
                g.bench_with_input(
                    BenchmarkId::new(format!("{n}x{k}"), format!("t={t}")),
                    &t,
                    |b, _| b.iter(|| cpu::matmul(black_box(&x), &view, &mut out).unwrap()),
                );
            }
        }
        g.finish();
    }
    // Decode on the calling thread only: the gap to `matmul_int4` at t=1 is what the
    // fork/join buys (or costs).
    let mut g = c.benchmark_group(format!("{imp}/matmul_int4_serial"));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    cpu::set_thread_backend(ThreadBackend::Serial);
    for &(n, k) in SHAPES.iter().chain([&HEAD]) {
        let q = int4(n, k);
        let view = WeightView::int4(q.data());
        let x = floats(k, 2);
        let mut out = vec![0f32; n];
        g.throughput(Throughput::Elements((2 * n * k) as u64));
        g.bench_with_input(BenchmarkId::new(format!("{n}x{k}"), "t=1"), &1, |b, _| {
            b.iter(|| cpu::matmul(black_box(&x), &view, &mut out).unwrap())
        });
    }
    cpu::set_thread_backend(ThreadBackend::SpinPool);
    g.finish();
}

/// One decode step's weights: 30 layers of projections, each with its own codes
/// (different seeds, so no buffer is shared), then the head.
fn step_weights() -> Vec<Int4Owned> {
    let mut mats = Vec::new();
    for layer in 0..30u32 {
        for &(n, k) in &SHAPES {
            let mut q = int4(n, k);
            q.qweight = data(q.layout.qweight_len(), 5 + layer);
            mats.push(q);
        }
    }
    mats.push(int4(HEAD.0, HEAD.1));
    mats
}

/// One step's projections ([`step_weights`]) at T tokens.
fn decode_step(c: &mut Criterion) {
    let imp = cpu::implementation();
    let mut g = c.benchmark_group(format!("{imp}/int4_decode_step"));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let mats = step_weights();
    for t in [1usize, 16] {
        let xs: Vec<Vec<f32>> = mats
            .iter()
            .map(|q| floats(t * q.layout.in_features(), 2))
            .collect();
        let mut outs: Vec<Vec<f32>> = mats
            .iter()
            .map(|q| vec![0f32; t * q.layout.out_features()])
            .collect();
        let flops: usize = mats
            .iter()
            .map(|q| 2 * t * q.layout.in_features() * q.layout.out_features())
            .sum();
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_with_input(
            BenchmarkId::new("30 layers + head", format!("t={t}")),
            &t,
            |b, _| {
                b.iter(|| {
                    for ((q, x), out) in mats.iter().zip(&xs).zip(outs.iter_mut()) {
                        let view = WeightView::int4(q.data());
                        cpu::matmul(black_box(x), &view, out).unwrap();
                    }
                })
            },
        );
    }
    g.finish();
}

fn dot_weight(q: &Int4Owned) -> Int4DotWeight {
    Int4DotWeight::from_int4(&q.data(), None).unwrap()
}

/// The integer-dot kernels at the same shapes, per SIMD path.
fn matmul_int8(c: &mut Criterion) {
    let imp = cpu::implementation();
    for path in [DotPath::Avx2, DotPath::Avx512Vnni] {
        if !path.is_available() {
            continue;
        }
        let mut g = c.benchmark_group(format!("{imp}/matmul_int4_int8/{}", path.name()));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(2));
        for (n, k) in SHAPES.into_iter().chain([HEAD]) {
            let w = dot_weight(&int4(n, k));
            let tokens: &[usize] = if (n, k) == HEAD { &[1, 16] } else { &TOKENS };
            for &t in tokens {
                let x = floats(t * k, 2);
                let mut out = vec![0f32; t * n];
                g.throughput(Throughput::Elements((2 * t * n * k) as u64));
                g.bench_with_input(
                    BenchmarkId::new(format!("{n}x{k}"), format!("t={t}")),
                    &t,
                    |b, _| {
                        b.iter(|| int4_dot::matmul_with(path, black_box(&x), &w, &mut out).unwrap())
                    },
                );
            }
        }
        g.finish();
    }
}

/// [`decode_step`] on the integer-dot kernels (fastest path).
fn decode_step_int8(c: &mut Criterion) {
    let imp = cpu::implementation();
    let mut g = c.benchmark_group(format!("{imp}/int4_int8_decode_step"));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let mats: Vec<Int4DotWeight> = step_weights().iter().map(dot_weight).collect();
    for t in [1usize, 16] {
        let xs: Vec<Vec<f32>> = mats.iter().map(|w| floats(t * w.cols(), 2)).collect();
        let mut outs: Vec<Vec<f32>> = mats.iter().map(|w| vec![0f32; t * w.rows()]).collect();
        let flops: usize = mats.iter().map(|w| 2 * t * w.cols() * w.rows()).sum();
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_with_input(
            BenchmarkId::new("30 layers + head", format!("t={t}")),
            &t,
            |b, _| {
                b.iter(|| {
                    for ((w, x), out) in mats.iter().zip(&xs).zip(outs.iter_mut()) {
                        int4_dot::matmul(black_box(x), w, out).unwrap();
                    }
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, matmul, decode_step, matmul_int8, decode_step_int8);
criterion_main!(benches);
