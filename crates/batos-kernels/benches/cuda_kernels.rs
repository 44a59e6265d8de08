//! GPU figures for docs/perf/gpu-kernels.md (device-synchronised with CUDA events):
//! int4 AWQ matvec bandwidth vs the card's peak, AWQ GEMM throughput, batched
//! LoRA overhead (64 tokens over 16 adapters vs none), paged-attention decode
//! bandwidth and prefill throughput.
//!
//! `cargo bench -p batos-kernels --features cuda --bench cuda_kernels`
//! (prints "SKIPPED" without a GPU). Weights are replicated past the L2 size and
//! cycled so that figures are DRAM figures, not cache hits.

use std::sync::Arc;

use batos_kernels::cuda::ops::attention::{self, AttentionBatch, PagedKvLayout, SeqQuery};
use batos_kernels::cuda::ops::awq::{self, AwqShape, AwqWeights};
use batos_kernels::cuda::ops::lora::{self, LoraMode, LoraPlan, LoraShape, LoraStack};
use batos_kernels::cuda::ops::Activation;
use batos_kernels::cuda::{CudaDevice, CudaDeviceConfig, CudaResult, KernelSource};
use batos_types::{BlockId, SlotIdx};
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags};
use half::f16;

struct Rng(u64);
impl Rng {
    fn u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
    fn f(&mut self) -> f32 {
        (self.u32() as f32 / u32::MAX as f32) * 2.0 - 1.0
    }
}

/// Mean microseconds per call of `f`, after warm-up, timed with CUDA events.
fn time_us(dev: &CudaDevice, iters: usize, mut f: impl FnMut() -> CudaResult<()>) -> f64 {
    for _ in 0..3 {
        f().expect("warm-up");
    }
    dev.synchronize().expect("sync");
    let ctx = dev.context();
    let start = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .expect("event");
    let end = ctx
        .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
        .expect("event");
    start.record(dev.stream()).expect("record");
    for _ in 0..iters {
        f().expect("bench body");
    }
    end.record(dev.stream()).expect("record");
    end.synchronize().expect("sync");
    start.elapsed_ms(&end).expect("elapsed") as f64 * 1000.0 / iters as f64
}

fn attr(dev: &CudaDevice, a: CUdevice_attribute) -> i64 {
    dev.context().attribute(a).map(i64::from).unwrap_or(0)
}

/// Theoretical DRAM bandwidth in bytes/s: from the driver's memory clock and bus
/// width, or, where the driver reports no clock, the datasheet figure by name.
fn peak_bandwidth(dev: &CudaDevice) -> (f64, &'static str) {
    let khz = attr(
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE,
    ) as f64;
    let bits = attr(
        dev,
        CUdevice_attribute::CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH,
    ) as f64;
    if khz > 0.0 && bits > 0.0 {
        return (2.0 * khz * 1e3 * bits / 8.0, "memory clock x bus width");
    }
    let name = dev.name();
    let table: [(&str, f64); 4] = [
        ("H200", 4.8e12),
        ("H100 NVL", 3.9e12),
        ("H100 PCIe", 2.0e12),
        ("H100", 3.35e12),
    ];
    table
        .iter()
        .find(|(n, _)| name.contains(n))
        .map(|(_, bw)| (*bw, "datasheet, by device name"))
        .unwrap_or((0.0, "unknown"))
}

fn copy_bandwidth(dev: &CudaDevice) -> f64 {
    let n = 256usize << 20; // 1 GiB of f32
    let src = dev.zeros::<f32>(n).expect("alloc");
    let mut dst = dev.zeros::<f32>(n).expect("alloc");
    let us = time_us(dev, 10, || {
        let s = src.view();
        let mut d = dst.view_mut();
        dev.stream()
            .memcpy_dtod(&s, &mut d)
            .map_err(|e| batos_kernels::cuda::CudaError::Driver {
                op: "memcpy_dtod",
                source: e,
            })
    });
    2.0 * (n * 4) as f64 / (us * 1e-6)
}

fn awq_layer(dev: &CudaDevice, shape: AwqShape, rng: &mut Rng) -> AwqWeights {
    let qw: Vec<u32> = (0..shape.qweight_len()).map(|_| rng.u32()).collect();
    let qz: Vec<u32> = (0..shape.qzeros_len()).map(|_| rng.u32()).collect();
    let sc: Vec<f16> = (0..shape.scales_len())
        .map(|_| f16::from_f32(0.01 + 0.01 * rng.f()))
        .collect();
    AwqWeights::upload(dev, shape, &qw, &qz, &sc).expect("upload AWQ layer")
}

/// Enough copies of a layer to cover `bytes` (well past L2).
fn copies_for(layer_bytes: usize, bytes: usize) -> usize {
    bytes.div_ceil(layer_bytes).clamp(1, 64)
}

trait FromF32 {
    fn from_f32(x: f32) -> Self;
}
impl FromF32 for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl FromF32 for f16 {
    fn from_f32(x: f32) -> Self {
        f16::from_f32(x)
    }
}

fn bench_awq_gemv<T: Activation + FromF32>(dev: &CudaDevice, peak: f64, tokens: usize) {
    let mut rng = Rng(1);
    for (k, n) in [
        (4096, 4096),
        (4096, 14336),
        (14336, 4096),
        (8192, 8192),
        (8192, 28672),
    ] {
        let shape = AwqShape {
            in_features: k,
            out_features: n,
            group_size: 128,
        };
        let one = awq_layer(dev, shape, &mut rng);
        let copies = copies_for(one.weight_bytes(), 512 << 20);
        let mut layers = vec![one];
        for _ in 1..copies {
            layers.push(awq_layer(dev, shape, &mut rng));
        }
        let x = dev
            .upload(
                &(0..tokens * k)
                    .map(|_| T::from_f32(rng.f()))
                    .collect::<Vec<T>>(),
            )
            .expect("x");
        let mut y = dev.zeros::<T>(tokens * n).expect("y");
        // Built once, as a serving loop does: the timed region holds only launches.
        let mut plan = awq::AwqGemvPlan::<T>::new(dev, shape, tokens).expect("gemv plan");
        let us = time_us(dev, 10, || {
            for l in &layers {
                plan.run(dev, l, &x, &mut y)?;
            }
            Ok(())
        }) / copies as f64;
        let bytes = layers[0].weight_bytes() + tokens * (k + n) * std::mem::size_of::<T>();
        let bw = bytes as f64 / (us * 1e-6);
        println!(
            "| awq_gemv {} T={tokens} | {k}x{n} g128 | {us:.1} us | {:.0} GB/s | {:.0}% of peak |",
            T::SUFFIX,
            bw / 1e9,
            100.0 * bw / peak
        );
    }
}

/// The real model's (SmolLM2-135M) decode shapes, f16, one token: latency-bound
/// layers of 0.1-0.5 MB. 256 MiB of distinct copies keep the figure a DRAM figure.
fn bench_awq_gemv_small(dev: &CudaDevice, peak: f64) {
    let mut rng = Rng(4);
    for (k, n, what) in [
        (576, 960, "qkv"),
        (576, 576, "o"),
        (576, 1536, "gate/up"),
        (1536, 576, "down"),
    ] {
        // Groups of 64: SmolLM2's hidden size (576) is not a multiple of 128.
        let shape = AwqShape {
            in_features: k,
            out_features: n,
            group_size: 64,
        };
        // One host copy uploaded many times: distinct device buffers, same bytes.
        let qw: Vec<u32> = (0..shape.qweight_len()).map(|_| rng.u32()).collect();
        let qz: Vec<u32> = (0..shape.qzeros_len()).map(|_| rng.u32()).collect();
        let sc: Vec<f16> = (0..shape.scales_len())
            .map(|_| f16::from_f32(0.01 + 0.01 * rng.f()))
            .collect();
        let up = || AwqWeights::upload(dev, shape, &qw, &qz, &sc).expect("upload AWQ layer");
        let one = up();
        let copies = (256usize << 20).div_ceil(one.weight_bytes()).clamp(1, 1024);
        let mut layers = vec![one];
        for _ in 1..copies {
            layers.push(up());
        }
        let x = dev
            .upload(&(0..k).map(|_| f16::from_f32(rng.f())).collect::<Vec<_>>())
            .expect("x");
        let mut y = dev.zeros::<f16>(n).expect("y");
        let mut plan = awq::AwqGemvPlan::<f16>::new(dev, shape, 1).expect("gemv plan");
        let us = time_us(dev, 3, || {
            for l in &layers {
                plan.run(dev, l, &x, &mut y)?;
            }
            Ok(())
        }) / copies as f64;
        let bw = (layers[0].weight_bytes() + 2 * (k + n)) as f64 / (us * 1e-6);
        println!(
            "| awq_gemv f16 T=1 SmolLM2 {what} | {k}x{n} g64 | {us:.2} us | {:.0} GB/s | {:.0}% of peak |",
            bw / 1e9,
            100.0 * bw / peak
        );
    }
}

fn bench_awq_gemm(dev: &CudaDevice) {
    let mut rng = Rng(2);
    for (k, n) in [(4096, 4096), (8192, 8192)] {
        let shape = AwqShape {
            in_features: k,
            out_features: n,
            group_size: 128,
        };
        let w = awq_layer(dev, shape, &mut rng);
        for m in [64, 512, 2048] {
            let x = dev
                .upload(
                    &(0..m * k)
                        .map(|_| f16::from_f32(rng.f()))
                        .collect::<Vec<_>>(),
                )
                .expect("x");
            let mut y = dev.zeros::<f16>(m * n).expect("y");
            let us = time_us(dev, 10, || awq::awq_gemm(dev, &w, &x, m, &mut y));
            let tflops = 2.0 * (m * k * n) as f64 / (us * 1e-6) / 1e12;
            println!("| awq_gemm f16 M={m} | {k}x{n} g128 | {us:.1} us | {tflops:.1} TFLOP/s | |");
        }
    }
}

fn bench_lora_overhead(dev: &CudaDevice) {
    let mut rng = Rng(3);
    let (tokens, k, n, slots, rank) = (64usize, 4096usize, 4096usize, 16usize, 16usize);
    let shape = AwqShape {
        in_features: k,
        out_features: n,
        group_size: 128,
    };
    let lshape = LoraShape {
        slots,
        max_rank: rank,
        in_features: k,
        out_features: n,
    };
    let copies = 16;
    let layers: Vec<AwqWeights> = (0..copies)
        .map(|_| awq_layer(dev, shape, &mut rng))
        .collect();
    let stacks: Vec<LoraStack<f16>> = (0..copies)
        .map(|_| {
            let a: Vec<f16> = (0..slots * rank * k)
                .map(|_| f16::from_f32(0.05 * rng.f()))
                .collect();
            let b: Vec<f16> = (0..slots * rank * n)
                .map(|_| f16::from_f32(0.05 * rng.f()))
                .collect();
            LoraStack::upload(dev, lshape, &a, &b, &vec![rank; slots], &vec![2.0; slots])
                .expect("stack")
        })
        .collect();
    let x = dev
        .upload(
            &(0..tokens * k)
                .map(|_| f16::from_f32(rng.f()))
                .collect::<Vec<_>>(),
        )
        .expect("x");
    let mut y = dev.zeros::<f16>(tokens * n).expect("y");
    // Decode-like: token i of 64 independent sequences uses adapter i % 16.
    let interleaved: Vec<Option<SlotIdx>> = (0..tokens)
        .map(|t| Some(SlotIdx((t % slots) as u16)))
        .collect();
    // Prefill-like: 16 runs of 4 tokens.
    let runs: Vec<Option<SlotIdx>> = (0..tokens).map(|t| Some(SlotIdx((t / 4) as u16))).collect();
    let none: Vec<Option<SlotIdx>> = vec![None; tokens];
    let plans = [
        (
            "none (all tokens base-only)",
            LoraPlan::new(dev, LoraMode::Bgmv, slots, &none).expect("plan"),
        ),
        (
            "BGMV, 16 adapters interleaved",
            LoraPlan::new(dev, LoraMode::Bgmv, slots, &interleaved).expect("plan"),
        ),
        (
            "SGMV, 16 adapters x 4-token runs",
            LoraPlan::new(dev, LoraMode::Sgmv, slots, &runs).expect("plan"),
        ),
        (
            "SGMV on interleaved tokens",
            LoraPlan::new(dev, LoraMode::Sgmv, slots, &interleaved).expect("plan"),
        ),
        (
            "grouped, 16 adapters interleaved",
            LoraPlan::new(dev, LoraMode::Grouped, slots, &interleaved).expect("plan"),
        ),
        (
            "grouped, 16 adapters x 4-token runs",
            LoraPlan::new(dev, LoraMode::Grouped, slots, &runs).expect("plan"),
        ),
    ];
    let base = time_us(dev, 10, || {
        for l in &layers {
            awq::awq_linear(dev, l, &x, tokens, &mut y)?;
        }
        Ok(())
    }) / copies as f64;
    println!("| base awq_linear f16, 64 tokens | 4096x4096 g128 | {base:.1} us | | |");
    for (name, plan) in &plans {
        // The shrink scratch is allocated once per plan, outside the timed region.
        let mut h = dev
            .alloc::<f32>(lora::shrink_scratch_len(&stacks[0], plan).max(1))
            .expect("scratch");
        let t = time_us(dev, 10, || {
            for (l, s) in layers.iter().zip(&stacks) {
                awq::awq_linear(dev, l, &x, tokens, &mut y)?;
                if plan.rows() > 0 {
                    lora::lora_shrink(dev, s, plan, &x, &mut h)?;
                    lora::lora_expand(dev, s, plan, &h, &mut y)?;
                }
            }
            Ok(())
        }) / copies as f64;
        println!(
            "| + LoRA r16: {name} | 4096x4096 | {t:.1} us | overhead {:+.1}% | |",
            100.0 * (t - base) / base
        );
    }
}

fn bench_attention(dev: &CudaDevice, peak: f64) {
    // (heads, kv_heads, head_dim, sequences, context, label)
    let cases = [
        (9, 3, 64, 64, 1024, "SmolLM2 geometry"),
        (9, 3, 64, 16, 4096, "SmolLM2 geometry"),
        (9, 3, 64, 4, 16384, "SmolLM2 geometry, split-K"),
        (9, 3, 64, 1, 4096, "SmolLM2 geometry, one sequence"),
        (9, 3, 64, 8, 512, "SmolLM2 geometry, short contexts"),
        (32, 8, 128, 32, 2048, "Llama-8B geometry"),
    ];
    for (heads, kvh, hd, seqs, ctx, label) in cases {
        decode_case::<f32>(dev, peak, heads, kvh, hd, seqs, ctx, label);
        decode_case::<f16>(dev, peak, heads, kvh, hd, seqs, ctx, label);
    }
    // Prefill: 4 prompts of 1024 tokens, SmolLM2 geometry.
    let (heads, kvh, hd, seqs, len) = (9, 3, 64, 4, 1024);
    let layout = PagedKvLayout {
        num_blocks: seqs * len / 16,
        block_size: 16,
        num_kv_heads: kvh,
        head_dim: hd,
    };
    let tables: Vec<Vec<BlockId>> = (0..seqs)
        .map(|s| {
            (0..len / 16)
                .map(|b| BlockId((s * len / 16 + b) as u32))
                .collect()
        })
        .collect();
    let queries: Vec<SeqQuery<'_>> = tables
        .iter()
        .map(|t| SeqQuery {
            block_table: t,
            first_pos: 0,
            tokens: len,
        })
        .collect();
    let batch = AttentionBatch::new(dev, layout, &queries).expect("batch");
    let kc = dev.zeros::<f16>(layout.cache_len()).expect("k");
    let vc = dev.zeros::<f16>(layout.cache_len()).expect("v");
    let q = dev.zeros::<f16>(seqs * len * heads * hd).expect("q");
    let mut out = dev.zeros::<f16>(seqs * len * heads * hd).expect("out");
    let us = time_us(dev, 5, || {
        attention::paged_attention_prefill(dev, &batch, heads, &q, &kc, &vc, &mut out)
    });
    let flops = 4.0 * (seqs * heads * hd) as f64 * (len * len) as f64 / 2.0;
    println!(
        "| paged_prefill f16 | {seqs}x{len} tokens, 9/3 heads, hd 64 | {us:.0} us | {:.1} TFLOP/s | |",
        flops / (us * 1e-6) / 1e12
    );
}

#[allow(clippy::too_many_arguments)]
fn decode_case<T: Activation>(
    dev: &CudaDevice,
    peak: f64,
    heads: usize,
    kvh: usize,
    hd: usize,
    seqs: usize,
    ctx: usize,
    label: &str,
) {
    let bs = 16;
    let per = ctx.div_ceil(bs);
    let layout = PagedKvLayout {
        num_blocks: seqs * per,
        block_size: bs,
        num_kv_heads: kvh,
        head_dim: hd,
    };
    // Interleave the sequences' blocks so tables are not contiguous.
    let tables: Vec<Vec<BlockId>> = (0..seqs)
        .map(|s| (0..per).map(|b| BlockId((b * seqs + s) as u32)).collect())
        .collect();
    let queries: Vec<SeqQuery<'_>> = tables
        .iter()
        .map(|t| SeqQuery {
            block_table: t,
            first_pos: ctx - 1,
            tokens: 1,
        })
        .collect();
    let batch = AttentionBatch::new(dev, layout, &queries).expect("batch");
    let kc = dev.zeros::<T>(layout.cache_len()).expect("k");
    let vc = dev.zeros::<T>(layout.cache_len()).expect("v");
    let q = dev.zeros::<T>(seqs * heads * hd).expect("q");
    let mut out = dev.zeros::<T>(seqs * heads * hd).expect("out");
    let us = time_us(dev, 20, || {
        attention::paged_attention_decode(dev, &batch, heads, &q, &kc, &vc, &mut out)
    });
    let bytes = 2 * seqs * ctx * kvh * hd * std::mem::size_of::<T>();
    let bw = bytes as f64 / (us * 1e-6);
    println!(
        "| paged_decode {} ({label}) | {seqs} seqs x {ctx} ctx, {heads}/{kvh} heads, hd {hd} | {us:.1} us | {:.0} GB/s | {:.0}% of peak |",
        T::SUFFIX,
        bw / 1e9,
        100.0 * bw / peak
    );
}

/// `BATOS_BENCH_PROFILE=1`: launch only the round-3 kernels, each twice on
/// representative shapes, for `ncu` (scripts/gpu-check.sh); nothing is timed.
fn profile_launches(dev: &CudaDevice) -> CudaResult<()> {
    let mut rng = Rng(7);
    for (k, n) in [(4096, 4096), (8192, 28672), (576, 960), (1536, 576)] {
        let shape = AwqShape {
            in_features: k,
            out_features: n,
            group_size: 128,
        };
        let w = awq_layer(dev, shape, &mut rng);
        let x = dev.upload(&(0..k).map(|_| f16::from_f32(rng.f())).collect::<Vec<_>>())?;
        let mut y = dev.zeros::<f16>(n)?;
        let mut plan = awq::AwqGemvPlan::<f16>::new(dev, shape, 1)?;
        for _ in 0..2 {
            plan.run(dev, &w, &x, &mut y)?;
        }
    }
    let (tokens, k, n, slots, rank) = (64usize, 4096usize, 4096usize, 16usize, 16usize);
    let lshape = LoraShape {
        slots,
        max_rank: rank,
        in_features: k,
        out_features: n,
    };
    let a: Vec<f16> = (0..slots * rank * k)
        .map(|_| f16::from_f32(0.05 * rng.f()))
        .collect();
    let b: Vec<f16> = (0..slots * rank * n)
        .map(|_| f16::from_f32(0.05 * rng.f()))
        .collect();
    let stack = LoraStack::upload(dev, lshape, &a, &b, &vec![rank; slots], &vec![2.0; slots])?;
    let x = dev.upload(
        &(0..tokens * k)
            .map(|_| f16::from_f32(rng.f()))
            .collect::<Vec<_>>(),
    )?;
    let mut y = dev.zeros::<f16>(tokens * n)?;
    let interleaved: Vec<Option<SlotIdx>> = (0..tokens)
        .map(|t| Some(SlotIdx((t % slots) as u16)))
        .collect();
    let plan = LoraPlan::new(dev, LoraMode::Grouped, slots, &interleaved)?;
    let mut h = dev.alloc::<f32>(lora::shrink_scratch_len(&stack, &plan))?;
    for _ in 0..2 {
        lora::lora_shrink(dev, &stack, &plan, &x, &mut h)?;
        lora::lora_expand(dev, &stack, &plan, &h, &mut y)?;
    }
    for (heads, kvh, hd, seqs, ctx) in [
        (9, 3, 64, 64, 1024),
        (9, 3, 64, 1, 4096),
        (32, 8, 128, 32, 2048),
    ] {
        let bs = 16;
        let per = ctx / bs;
        let layout = PagedKvLayout {
            num_blocks: seqs * per,
            block_size: bs,
            num_kv_heads: kvh,
            head_dim: hd,
        };
        let tables: Vec<Vec<BlockId>> = (0..seqs)
            .map(|s| (0..per).map(|b| BlockId((b * seqs + s) as u32)).collect())
            .collect();
        let queries: Vec<SeqQuery<'_>> = tables
            .iter()
            .map(|t| SeqQuery {
                block_table: t,
                first_pos: ctx - 1,
                tokens: 1,
            })
            .collect();
        let batch = AttentionBatch::new(dev, layout, &queries)?;
        let kc = dev.zeros::<f16>(layout.cache_len())?;
        let vc = dev.zeros::<f16>(layout.cache_len())?;
        let q = dev.zeros::<f16>(seqs * heads * hd)?;
        let mut out = dev.zeros::<f16>(seqs * heads * hd)?;
        for _ in 0..2 {
            attention::paged_attention_decode(dev, &batch, heads, &q, &kc, &vc, &mut out)?;
        }
    }
    dev.synchronize()
}

fn main() {
    let dev: Arc<CudaDevice> = match CudaDevice::with_config(CudaDeviceConfig {
        kernels: KernelSource::from_env(),
        ..Default::default()
    }) {
        Ok(d) => d,
        Err(e) => {
            println!("SKIPPED cuda_kernels bench: {e}");
            return;
        }
    };
    dev.warm_up().expect("compile kernels");
    if std::env::var_os("BATOS_BENCH_PROFILE").is_some() {
        profile_launches(&dev).expect("profile launches");
        println!("profile launches done");
        return;
    }
    let (theoretical, source) = peak_bandwidth(&dev);
    let copy = copy_bandwidth(&dev);
    // Percentages are of the theoretical peak, or of the measured copy rate if the
    // peak is unknown.
    let peak = if theoretical > 0.0 { theoretical } else { copy };
    let l2 = attr(&dev, CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE);
    println!(
        "device: {} ({:?}, {} SMs, L2 {} MiB); peak DRAM {:.0} GB/s ({source}); device-to-device copy {:.0} GB/s (read+write, {:.0}% of peak)",
        dev.name(),
        dev.arch(),
        dev.multiprocessors(),
        l2 >> 20,
        theoretical / 1e9,
        copy / 1e9,
        100.0 * copy / peak
    );
    println!("\n| kernel | shape | time | throughput | vs peak |\n|---|---|---|---|---|");
    // Each section runs on its own: a failure is reported and the rest still run.
    let section = |name: &str, f: &dyn Fn()| {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
            println!("| {name} | FAILED (see the panic message above) | | | |");
        }
    };
    section("awq_gemv f16 T=1", &|| bench_awq_gemv::<f16>(&dev, peak, 1));
    section("awq_gemv f16 T=1 SmolLM2", &|| {
        bench_awq_gemv_small(&dev, peak)
    });
    section("awq_gemv f32 T=1", &|| bench_awq_gemv::<f32>(&dev, peak, 1));
    section("awq_gemv f16 T=4", &|| bench_awq_gemv::<f16>(&dev, peak, 4));
    section("awq_gemm", &|| bench_awq_gemm(&dev));
    section("lora overhead", &|| bench_lora_overhead(&dev));
    section("paged attention", &|| bench_attention(&dev, peak));
}
