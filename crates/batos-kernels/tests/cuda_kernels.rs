#![cfg(feature = "cuda")]
//! GPU parity tests: every CUDA kernel against a scalar CPU reference, on odd
//! shapes, mixed LoRA ranks and ragged paged-attention batches.
//!
//! Without a GPU (no libcuda, or no device) each test prints a loud SKIPPED line
//! and returns, unless `BATOS_REQUIRE_GPU=1` makes that a failure (the GPU
//! check script sets it). `BATOS_CUDA_PTX_DIR` selects precompiled PTX.
//!
//! Tolerances, stated per test, are relative to the magnitude of the exact
//! result's terms (sum of |products|), so they do not depend on cancellation:
//! f32 paths 1e-5..1e-4, f16/bf16 activations 4e-3 / 2e-2 (their rounding),
//! the tensor-core AWQ GEMM 4e-3 (activations and weights rounded to f16).

use std::sync::{Arc, OnceLock};

use batos_kernels::cpu::lora::{BLayout, LoraSlot};
use batos_kernels::cuda::ops::attention::{self, AttentionBatch, PagedKvLayout, SeqQuery};
use batos_kernels::cuda::ops::awq::{self, AwqShape, AwqWeights};
use batos_kernels::cuda::ops::elementwise::{self, RopeShape};
use batos_kernels::cuda::ops::lora::{
    self, write_slots, LoraMode, LoraPlan, LoraShape, LoraStack, SlotRows, SlotStaging, SlotWrite,
};
use batos_kernels::cuda::ops::sampling::{self, TopP};
use batos_kernels::cuda::ops::Activation;
use batos_kernels::cuda::{CudaDevice, CudaDeviceConfig, CudaError, KernelSource, UploadStream};
use batos_types::{BlockId, SlotIdx};
use half::{bf16, f16};

// ---- harness ----------------------------------------------------------------

fn device() -> Option<Arc<CudaDevice>> {
    static DEV: OnceLock<Result<Arc<CudaDevice>, String>> = OnceLock::new();
    let r = DEV.get_or_init(|| {
        CudaDevice::with_config(CudaDeviceConfig {
            kernels: KernelSource::from_env(),
            ..Default::default()
        })
        .map_err(|e| match e {
            CudaError::NoDriver { .. } | CudaError::NoDevice { .. } => e.to_string(),
            other => panic!("a CUDA device is present but could not be opened: {other}"),
        })
    });
    match r {
        Ok(d) => Some(d.clone()),
        Err(msg) => {
            let required = std::env::var("BATOS_REQUIRE_GPU").is_ok_and(|v| v == "1");
            assert!(!required, "BATOS_REQUIRE_GPU=1 but no GPU: {msg}");
            eprintln!("\n*** SKIPPED (no CUDA GPU): {msg} ***\n");
            None
        }
    }
}

/// Small deterministic generator (tests must not depend on a RNG crate's stream).
struct Rng(u64);
impl Rng {
    fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        (self.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f()).collect()
    }
    fn below(&mut self, n: u32) -> u32 {
        self.next_u32() % n
    }
}

trait Elem: Activation {
    fn of(x: f32) -> Self;
    fn f32(self) -> f32;
    /// Relative tolerance for results stored in this type.
    const RTOL: f32;
}
impl Elem for f32 {
    fn of(x: f32) -> Self {
        x
    }
    fn f32(self) -> f32 {
        self
    }
    const RTOL: f32 = 1e-5;
}
impl Elem for f16 {
    fn of(x: f32) -> Self {
        f16::from_f32(x)
    }
    fn f32(self) -> f32 {
        self.to_f32()
    }
    const RTOL: f32 = 4e-3;
}
impl Elem for bf16 {
    fn of(x: f32) -> Self {
        bf16::from_f32(x)
    }
    fn f32(self) -> f32 {
        self.to_f32()
    }
    const RTOL: f32 = 2e-2;
}

fn conv<T: Elem>(v: &[f32]) -> Vec<T> {
    v.iter().map(|x| T::of(*x)).collect()
}
/// The values a kernel actually sees after rounding to T.
fn rounded<T: Elem>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| T::of(*x).f32()).collect()
}

/// Asserts |got - want| <= rtol * scale + atol element-wise (scale per element).
fn assert_close(what: &str, got: &[f32], want: &[f64], scale: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0.0f64);
    for (i, ((g, w), s)) in got.iter().zip(want).zip(scale).enumerate() {
        let err = (*g as f64 - w).abs();
        let lim = rtol * s + atol;
        assert!(
            err <= lim && g.is_finite(),
            "{what}: element {i}: got {g}, want {w} (|err| {err:.3e} > {lim:.3e})"
        );
        if err > worst.1 {
            worst = (i, err);
        }
    }
    eprintln!("{what}: ok, max |err| {:.3e} at {}", worst.1, worst.0);
}

// ---- no-device behaviour -----------------------------------------------------

#[test]
fn missing_device_is_a_typed_error_not_a_panic() {
    // On a machine without libcuda this must be NoDriver; with a GPU, an absurd
    // ordinal must be NoDevice. Either way: an error value, no panic.
    match CudaDevice::new(4096) {
        Err(CudaError::NoDriver { .. }) | Err(CudaError::NoDevice { .. }) => {}
        other => panic!("expected NoDriver/NoDevice, got {other:?}"),
    }
}

// ---- elementwise -------------------------------------------------------------

fn rms_norm_case<T: Elem>(dev: &CudaDevice) {
    let (rows, d) = (3, 577);
    let mut rng = Rng(11);
    let x = rounded::<T>(&rng.vec(rows * d));
    let w = rounded::<T>(&rng.vec(d));
    let eps = 1e-5;
    let (xd, wd) = (
        dev.upload(&conv::<T>(&x)).unwrap(),
        dev.upload(&conv::<T>(&w)).unwrap(),
    );
    let mut out = dev.alloc::<T>(rows * d).unwrap();
    elementwise::rms_norm(dev, &xd, &wd, eps, &mut out).unwrap();
    let got: Vec<f32> = out.to_host().unwrap().into_iter().map(Elem::f32).collect();
    let (mut want, mut scale) = (vec![], vec![]);
    for r in 0..rows {
        let row = &x[r * d..(r + 1) * d];
        let ms = row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        for i in 0..d {
            want.push(row[i] as f64 * inv * w[i] as f64);
            scale.push((row[i] as f64 * inv * w[i] as f64).abs() + 1e-3);
        }
    }
    assert_close(
        &format!("rms_norm {}", T::SUFFIX),
        &got,
        &want,
        &scale,
        (T::RTOL as f64).max(1e-5),
        1e-6,
    );
}

#[test]
fn rms_norm_matches_reference() {
    let Some(dev) = device() else { return };
    rms_norm_case::<f32>(&dev);
    rms_norm_case::<f16>(&dev);
    rms_norm_case::<bf16>(&dev);
}

fn rope_case<T: Elem>(dev: &CudaDevice) {
    let shape = RopeShape {
        tokens: 5,
        heads: 9,
        kv_heads: 3,
        head_dim: 64,
    };
    let hd = shape.head_dim;
    let mut rng = Rng(7);
    let q = rounded::<T>(&rng.vec(shape.tokens * shape.heads * hd));
    let k = rounded::<T>(&rng.vec(shape.tokens * shape.kv_heads * hd));
    let pos: Vec<i32> = vec![0, 1, 17, 513, 4095];
    let inv_freq: Vec<f32> = (0..hd / 2)
        .map(|i| 1.0 / 10000f32.powf(2.0 * i as f32 / hd as f32))
        .collect();
    let mut qd = dev.upload(&conv::<T>(&q)).unwrap();
    let mut kd = dev.upload(&conv::<T>(&k)).unwrap();
    let (pd, fd) = (dev.upload(&pos).unwrap(), dev.upload(&inv_freq).unwrap());
    elementwise::rope(dev, &mut qd, &mut kd, &pd, &fd, shape).unwrap();
    let rot = |x: &[f32], heads: usize| -> Vec<f64> {
        let mut out = vec![0.0; x.len()];
        for (t, p) in pos.iter().enumerate() {
            for h in 0..heads {
                let base = (t * heads + h) * hd;
                for i in 0..hd / 2 {
                    // Angle as the kernel forms it (f32 product), then exact trig.
                    let ang = (*p as f32 * inv_freq[i]) as f64;
                    let (s, c) = ang.sin_cos();
                    let (x1, x2) = (x[base + i] as f64, x[base + i + hd / 2] as f64);
                    out[base + i] = x1 * c - x2 * s;
                    out[base + i + hd / 2] = x2 * c + x1 * s;
                }
            }
        }
        out
    };
    let gq: Vec<f32> = qd.to_host().unwrap().into_iter().map(Elem::f32).collect();
    let gk: Vec<f32> = kd.to_host().unwrap().into_iter().map(Elem::f32).collect();
    let (wq, wk) = (rot(&q, shape.heads), rot(&k, shape.kv_heads));
    let one = |n| vec![1.0; n];
    let rtol = (T::RTOL as f64).max(2e-6);
    assert_close(
        &format!("rope q {}", T::SUFFIX),
        &gq,
        &wq,
        &one(wq.len()),
        rtol,
        1e-5,
    );
    assert_close(
        &format!("rope k {}", T::SUFFIX),
        &gk,
        &wk,
        &one(wk.len()),
        rtol,
        1e-5,
    );
}

#[test]
fn rope_matches_reference() {
    let Some(dev) = device() else { return };
    rope_case::<f32>(&dev);
    rope_case::<f16>(&dev);
    rope_case::<bf16>(&dev);
}

fn silu_case<T: Elem>(dev: &CudaDevice) {
    let n = 1001;
    let mut rng = Rng(3);
    let g: Vec<f32> = rounded::<T>(&rng.vec(n).iter().map(|v| v * 6.0).collect::<Vec<_>>());
    let u = rounded::<T>(&rng.vec(n));
    let (gd, ud) = (
        dev.upload(&conv::<T>(&g)).unwrap(),
        dev.upload(&conv::<T>(&u)).unwrap(),
    );
    let mut od = dev.alloc::<T>(n).unwrap();
    elementwise::silu_mul(dev, &gd, &ud, &mut od).unwrap();
    let got: Vec<f32> = od.to_host().unwrap().into_iter().map(Elem::f32).collect();
    let want: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(g, u)| (*g as f64 / (1.0 + (-*g as f64).exp())) * *u as f64)
        .collect();
    let scale: Vec<f64> = want.iter().map(|w| w.abs() + 1e-3).collect();
    assert_close(
        &format!("silu_mul {}", T::SUFFIX),
        &got,
        &want,
        &scale,
        (T::RTOL as f64).max(1e-5),
        1e-6,
    );
}

#[test]
fn silu_mul_matches_reference() {
    let Some(dev) = device() else { return };
    silu_case::<f32>(&dev);
    silu_case::<f16>(&dev);
    silu_case::<bf16>(&dev);
}

#[test]
fn embedding_gathers_rows_and_rejects_bad_ids() {
    let Some(dev) = device() else { return };
    let (vocab, d) = (50, 37);
    let mut rng = Rng(5);
    let table = rng.vec(vocab * d);
    let ids = [0u32, 49, 7, 7, 23];
    let td = dev.upload(&table).unwrap();
    let mut out = dev.alloc::<f32>(ids.len() * d).unwrap();
    elementwise::embedding(&dev, &td, d, &ids, &mut out).unwrap();
    let got = out.to_host().unwrap();
    for (t, id) in ids.iter().enumerate() {
        let id = *id as usize;
        assert_eq!(
            &got[t * d..(t + 1) * d],
            &table[id * d..(id + 1) * d],
            "row {t}"
        );
    }
    let err = elementwise::embedding(
        &dev,
        &td,
        d,
        &[3, 50],
        &mut dev.alloc::<f32>(2 * d).unwrap(),
    );
    assert!(
        matches!(err, Err(CudaError::InvalidArgument { .. })),
        "{err:?}"
    );
}

// ---- sampling ----------------------------------------------------------------

#[test]
fn argmax_picks_lowest_index_of_the_maximum() {
    let Some(dev) = device() else { return };
    let (rows, vocab) = (3, 49_157);
    let mut rng = Rng(9);
    let mut logits = rng.vec(rows * vocab);
    logits[vocab + 4000] = 5.0;
    logits[vocab + 30_000] = 5.0; // tie: the lower index wins
    logits[2 * vocab + vocab - 1] = 7.0; // last element
    let ld = dev.upload(&logits).unwrap();
    let mut out = dev.alloc::<u32>(rows).unwrap();
    sampling::argmax(&dev, &ld, vocab, &mut out).unwrap();
    let got = out.to_host().unwrap();
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let mut best = 0;
        for (i, v) in row.iter().enumerate() {
            if *v > row[best] {
                best = i;
            }
        }
        assert_eq!(got[r] as usize, best, "row {r}");
    }
    // f16 logits agree with the f32 decision on well-separated maxima.
    let ld16 = dev.upload(&conv::<f16>(&logits)).unwrap();
    sampling::argmax(&dev, &ld16, vocab, &mut out).unwrap();
    assert_eq!(out.to_host().unwrap()[1..], got[1..]);
}

/// Reference nucleus in f64: returns (kept flags, kept mass, probabilities).
fn nucleus(logits: &[f32], temp: f32, top_p: f32) -> (Vec<bool>, Vec<f64>) {
    let m = logits
        .iter()
        .fold(f64::NEG_INFINITY, |a, b| a.max(*b as f64 / temp as f64));
    let e: Vec<f64> = logits
        .iter()
        .map(|l| (*l as f64 / temp as f64 - m).exp())
        .collect();
    let z: f64 = e.iter().sum();
    let p: Vec<f64> = e.iter().map(|v| v / z).collect();
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|a, b| p[*b].total_cmp(&p[*a]));
    let mut keep = vec![false; p.len()];
    let mut acc = 0.0;
    for i in order {
        keep[i] = true;
        acc += p[i];
        if acc >= top_p as f64 {
            break;
        }
    }
    (keep, p)
}

#[test]
fn top_p_samples_inside_the_nucleus_at_the_right_quantile() {
    let Some(dev) = device() else { return };
    let (rows, vocab) = (6, 1000);
    let mut rng = Rng(21);
    let logits: Vec<f32> = rng.vec(rows * vocab).iter().map(|v| v * 4.0).collect();
    let uniforms: Vec<f32> = vec![0.0, 0.1, 0.35, 0.5, 0.77, 0.999];
    let params = TopP {
        temperature: 0.7,
        top_p: 0.9,
    };
    let (ld, ud) = (dev.upload(&logits).unwrap(), dev.upload(&uniforms).unwrap());
    let mut out = dev.alloc::<u32>(rows).unwrap();
    sampling::top_p_sample(&dev, &ld, vocab, params, &ud, &mut out).unwrap();
    let got = out.to_host().unwrap();
    for r in 0..rows {
        let row = &logits[r * vocab..(r + 1) * vocab];
        let (keep, p) = nucleus(row, params.temperature, params.top_p);
        let g = got[r] as usize;
        assert!(keep[g], "row {r}: token {g} is outside the nucleus");
        // Inverse CDF in index order over the nucleus: the kept mass before g must
        // be <= u * mass < the mass up to and including g (within f32 rounding).
        let mass: f64 = (0..vocab).filter(|i| keep[*i]).map(|i| p[i]).sum();
        let before: f64 = (0..g).filter(|i| keep[*i]).map(|i| p[i]).sum();
        let target = uniforms[r] as f64 * mass;
        assert!(
            before <= target + 1e-4 && target <= before + p[g] + 1e-4,
            "row {r}: token {g} covers [{before}, {}) but the draw is {target}",
            before + p[g]
        );
    }
    // A tiny top_p keeps only the most likely token.
    let tiny = TopP {
        temperature: 1.0,
        top_p: 1e-6,
    };
    sampling::top_p_sample(&dev, &ld, vocab, tiny, &ud, &mut out).unwrap();
    let mut am = dev.alloc::<u32>(rows).unwrap();
    sampling::argmax(&dev, &ld, vocab, &mut am).unwrap();
    assert_eq!(out.to_host().unwrap(), am.to_host().unwrap());
    let bad = TopP {
        temperature: 0.0,
        top_p: 0.9,
    };
    assert!(sampling::top_p_sample(&dev, &ld, vocab, bad, &ud, &mut out).is_err());
}

// ---- AWQ ---------------------------------------------------------------------

/// AutoAWQ packs column 8j + ORDER[i] into nibble i of word j.
const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

fn pack_awq(vals: &[u8], rows: usize, cols: usize) -> Vec<u32> {
    let mut out = vec![0u32; rows * cols / 8];
    for r in 0..rows {
        for j in 0..cols / 8 {
            let mut w = 0u32;
            for (i, o) in AWQ_ORDER.iter().enumerate() {
                w |= (vals[r * cols + 8 * j + o] as u32 & 0xf) << (4 * i);
            }
            out[r * cols / 8 + j] = w;
        }
    }
    out
}

struct AwqCase {
    shape: AwqShape,
    w: Vec<f32>, // dequantised [in, out]
    qweight: Vec<u32>,
    qzeros: Vec<u32>,
    scales: Vec<f16>,
}

fn awq_case(shape: AwqShape, seed: u64) -> AwqCase {
    let (k, n, g) = (shape.in_features, shape.out_features, shape.group_size);
    assert_eq!(
        k % g,
        0,
        "test shape {k}x{n}: in_features must be a multiple of the group"
    );
    let mut rng = Rng(seed);
    let q: Vec<u8> = (0..k * n).map(|_| rng.below(16) as u8).collect();
    let z: Vec<u8> = (0..k / g * n).map(|_| rng.below(16) as u8).collect();
    let scales: Vec<f16> = (0..k / g * n)
        .map(|_| f16::from_f32(0.002 + 0.02 * (rng.f() + 1.0)))
        .collect();
    let mut w = vec![0.0f32; k * n];
    for r in 0..k {
        for c in 0..n {
            let gi = (r / g) * n + c;
            w[r * n + c] = (q[r * n + c] as f32 - z[gi] as f32) * scales[gi].to_f32();
        }
    }
    AwqCase {
        shape,
        w,
        qweight: pack_awq(&q, k, n),
        qzeros: pack_awq(&z, k / g, n),
        scales,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum AwqPath {
    Gemv,
    Gemm,
    /// `awq_linear`: the planner picks.
    Linear,
}

fn awq_check<T: Elem>(dev: &CudaDevice, case: &AwqCase, tokens: usize, path: AwqPath, rtol: f64) {
    let s = case.shape;
    let (k, n) = (s.in_features, s.out_features);
    let wts = AwqWeights::upload(dev, s, &case.qweight, &case.qzeros, &case.scales).unwrap();
    let mut rng = Rng(tokens as u64 + 99);
    let x = rounded::<T>(&rng.vec(tokens * k));
    let xd = dev.upload(&conv::<T>(&x)).unwrap();
    let mut yd = dev.alloc::<T>(tokens * n).unwrap();
    match path {
        AwqPath::Gemm => awq::awq_gemm(dev, &wts, &xd, tokens, &mut yd).unwrap(),
        AwqPath::Gemv => awq::awq_gemv(dev, &wts, &xd, tokens, &mut yd).unwrap(),
        AwqPath::Linear => awq::awq_linear(dev, &wts, &xd, tokens, &mut yd).unwrap(),
    }
    let got: Vec<f32> = yd.to_host().unwrap().into_iter().map(Elem::f32).collect();
    let (mut want, mut scale) = (vec![0.0f64; tokens * n], vec![0.0f64; tokens * n]);
    for t in 0..tokens {
        for r in 0..k {
            let xv = x[t * k + r] as f64;
            for c in 0..n {
                let p = xv * case.w[r * n + c] as f64;
                want[t * n + c] += p;
                scale[t * n + c] += p.abs();
            }
        }
    }
    let what = format!(
        "awq {:?} {} {}x{}x{} g{}",
        path,
        T::SUFFIX,
        tokens,
        k,
        n,
        s.group_size
    );
    assert_close(&what, &got, &want, &scale, rtol, 1e-6);
}

#[test]
fn awq_gemv_matches_dequantised_reference() {
    let Some(dev) = device() else { return };
    // out/8 = 25 (scalar loads) and 64 (16-byte loads); groups 64 and 128.
    let a = awq_case(
        AwqShape {
            in_features: 384,
            out_features: 200,
            group_size: 128,
        },
        1,
    );
    let b = awq_case(
        AwqShape {
            in_features: 512,
            out_features: 512,
            group_size: 64,
        },
        2,
    );
    for case in [&a, &b] {
        for tokens in [1, 3, 4, 7] {
            awq_check::<f32>(&dev, case, tokens, AwqPath::Gemv, 2e-5);
        }
        awq_check::<f16>(&dev, case, 1, AwqPath::Gemv, 4e-3);
        awq_check::<bf16>(&dev, case, 2, AwqPath::Gemv, 2e-2);
    }
}

#[test]
fn awq_gemv_packed_half2_matches_reference_and_is_deterministic() {
    let Some(dev) = device() else { return };
    // f16, 1-4 tokens: the packed-half2 kernels with the fused split sum. The real
    // model's fused qkv (576x960, groups of 64: 576 is not a multiple of 128) and
    // down (1536x576) shapes, scalar columns (out/8 = 25), several column blocks with
    // a ragged last one (out/8 = 257), and groups 16/32/64/128 (f16 segments of 16
    // and 32 rows).
    for (k, n, g, seed) in [
        (576, 960, 64, 31),
        (1536, 576, 128, 32),
        (384, 200, 128, 33),
        (256, 2056, 32, 34),
        (96, 48, 16, 35),
        (4096, 1024, 128, 36),
    ] {
        let shape = AwqShape {
            in_features: k,
            out_features: n,
            group_size: g,
        };
        let case = awq_case(shape, seed);
        // 1 token: h2v4/h2v1; 2-4 tokens: h2t4 (3 leaves a padded token slot).
        for tokens in [1, 2, 3, 4] {
            awq_check::<f16>(&dev, &case, tokens, AwqPath::Gemv, 4e-3);
        }
    }
    // One plan launched back to back: the split tickets are reset by every launch,
    // and the split sum runs in split order, so each result is bit-identical.
    let shape = AwqShape {
        in_features: 4096,
        out_features: 1024,
        group_size: 128,
    };
    let c = awq_case(shape, 41);
    let w = AwqWeights::upload(&dev, shape, &c.qweight, &c.qzeros, &c.scales).unwrap();
    let mut rng = Rng(6);
    let x = dev.upload(&conv::<f16>(&rng.vec(4096))).unwrap();
    let mut plan = awq::AwqGemvPlan::<f16>::new(&dev, shape, 1).unwrap();
    let mut first = dev.alloc::<f16>(1024).unwrap();
    plan.run(&dev, &w, &x, &mut first).unwrap();
    let first = first.to_host().unwrap();
    for _ in 0..3 {
        let mut y = dev.alloc::<f16>(1024).unwrap();
        plan.run(&dev, &w, &x, &mut y).unwrap();
        plan.run(&dev, &w, &x, &mut y).unwrap();
        assert_eq!(y.to_host().unwrap(), first);
    }
}

#[test]
fn awq_gemv_plan_is_reusable_across_layers_and_checks_the_shape() {
    let Some(dev) = device() else { return };
    // Several column blocks (one block covers 32*vec packed columns), a ragged last
    // block (out/8 = 257) and group 32 (smaller x chunks).
    for (shape, seed) in [
        (
            AwqShape {
                in_features: 1024,
                out_features: 3072,
                group_size: 128,
            },
            11,
        ),
        (
            AwqShape {
                in_features: 256,
                out_features: 2056,
                group_size: 32,
            },
            12,
        ),
    ] {
        let case = awq_case(shape, seed);
        for tokens in [1, 3] {
            awq_check::<f32>(&dev, &case, tokens, AwqPath::Gemv, 2e-5);
        }
    }
    // One plan, two layers of the same shape, run alternately: each result matches
    // a plan-free call on the same layer (the shared workspace carries nothing over).
    let shape = AwqShape {
        in_features: 512,
        out_features: 512,
        group_size: 64,
    };
    let (a, b) = (awq_case(shape, 21), awq_case(shape, 22));
    let up =
        |c: &AwqCase| AwqWeights::upload(&dev, shape, &c.qweight, &c.qzeros, &c.scales).unwrap();
    let (wa, wb) = (up(&a), up(&b));
    let mut rng = Rng(5);
    let x = dev.upload(&rng.vec(512)).unwrap();
    let mut plan = awq::AwqGemvPlan::<f32>::new(&dev, shape, 1).unwrap();
    for w in [&wa, &wb, &wa] {
        let mut got = dev.alloc::<f32>(512).unwrap();
        let mut want = dev.alloc::<f32>(512).unwrap();
        plan.run(&dev, w, &x, &mut got).unwrap();
        awq::awq_gemv(&dev, w, &x, 1, &mut want).unwrap();
        assert_eq!(got.to_host().unwrap(), want.to_host().unwrap());
    }
    // A layer of another shape is a typed error, not a wrong launch.
    let other = awq_case(
        AwqShape {
            in_features: 384,
            out_features: 200,
            group_size: 128,
        },
        3,
    );
    let wo = AwqWeights::upload(
        &dev,
        other.shape,
        &other.qweight,
        &other.qzeros,
        &other.scales,
    )
    .unwrap();
    let mut y = dev.alloc::<f32>(512).unwrap();
    let err = plan.run(&dev, &wo, &x, &mut y);
    assert!(
        matches!(err, Err(CudaError::InvalidArgument { .. })),
        "{err:?}"
    );
    assert!(awq::AwqGemvPlan::<f32>::new(&dev, shape, 0).is_err());
}

#[test]
fn awq_gemm_matches_dequantised_reference() {
    let Some(dev) = device() else { return };
    let a = awq_case(
        AwqShape {
            in_features: 384,
            out_features: 200,
            group_size: 128,
        },
        3,
    );
    let b = awq_case(
        AwqShape {
            in_features: 576,
            out_features: 1536,
            group_size: 64,
        },
        4,
    );
    for case in [&a, &b] {
        for tokens in [1, 5, 64, 97] {
            awq_check::<f32>(&dev, case, tokens, AwqPath::Gemm, 4e-3);
        }
        awq_check::<f16>(&dev, case, 33, AwqPath::Gemm, 6e-3);
        awq_check::<bf16>(&dev, case, 33, AwqPath::Gemm, 2e-2);
        // The planner: 2 tokens take the matvec (f32-exact), 40 the tensor cores.
        awq_check::<f32>(&dev, case, 2, AwqPath::Linear, 2e-5);
        awq_check::<f32>(&dev, case, 40, AwqPath::Linear, 4e-3);
    }
    // awq_linear's plan: few tokens -> gemv, many -> gemm.
    assert_eq!(awq::awq_plan(1), awq::AwqKernel::Gemv);
    assert_eq!(awq::awq_plan(64), awq::AwqKernel::Gemm);
}

#[test]
fn awq_rejects_bad_shapes() {
    let Some(dev) = device() else { return };
    let bad = AwqShape {
        in_features: 100,
        out_features: 64,
        group_size: 64,
    };
    assert!(AwqWeights::upload(&dev, bad, &[], &[], &[]).is_err());
    let s = AwqShape {
        in_features: 64,
        out_features: 64,
        group_size: 64,
    };
    let err = AwqWeights::upload(&dev, s, &[0; 3], &[0; 8], &[f16::ZERO; 64]);
    assert!(matches!(err, Err(CudaError::Shape { .. })), "{err:?}");
}

// ---- LoRA --------------------------------------------------------------------

struct LoraCase {
    shape: LoraShape,
    ranks: Vec<usize>,
    scales: Vec<f32>,
    a: Vec<f32>,  // [slots, max_rank, in]
    bt: Vec<f32>, // [slots, max_rank, out]
}

fn lora_case(seed: u64) -> LoraCase {
    // in > 256 so the shrink splits K over blocks.
    lora_case_with(seed, vec![8, 16, 0, 4, 16, 1], 16, 600, 136)
}

fn lora_case_with(
    seed: u64,
    ranks: Vec<usize>,
    max_rank: usize,
    in_features: usize,
    out_features: usize,
) -> LoraCase {
    let shape = LoraShape {
        slots: ranks.len(),
        max_rank,
        in_features,
        out_features,
    };
    let mut rng = Rng(seed);
    let mut a = rng.vec(shape.slots * shape.max_rank * shape.in_features);
    let mut bt = rng.vec(shape.slots * shape.max_rank * shape.out_features);
    // Padding rows beyond each slot's rank hold garbage: the kernels must ignore them.
    for (s, r) in ranks.iter().enumerate() {
        for rr in *r..shape.max_rank {
            let ar = (s * shape.max_rank + rr) * shape.in_features;
            a[ar..ar + shape.in_features].fill(1e6);
            let br = (s * shape.max_rank + rr) * shape.out_features;
            bt[br..br + shape.out_features].fill(-1e6);
        }
    }
    let scales = ranks.iter().map(|r| 2.0 / (*r).max(1) as f32).collect();
    LoraCase {
        shape,
        ranks,
        scales,
        a,
        bt,
    }
}

fn lora_reference(
    c: &LoraCase,
    x: &[f32],
    y0: &[f32],
    slots: &[Option<SlotIdx>],
) -> (Vec<f64>, Vec<f64>) {
    let LoraShape {
        max_rank,
        in_features: k,
        out_features: n,
        ..
    } = c.shape;
    let mut y: Vec<f64> = y0.iter().map(|v| *v as f64).collect();
    let mut scale: Vec<f64> = y0.iter().map(|v| v.abs() as f64 + 1e-3).collect();
    for (t, s) in slots.iter().enumerate() {
        let Some(s) = s else { continue };
        let s = s.index();
        for r in 0..c.ranks[s] {
            let mut h = 0.0f64;
            let mut hs = 0.0f64;
            for i in 0..k {
                let p = x[t * k + i] as f64 * c.a[(s * max_rank + r) * k + i] as f64;
                h += p;
                hs += p.abs();
            }
            for o in 0..n {
                let b = c.bt[(s * max_rank + r) * n + o] as f64 * c.scales[s] as f64;
                y[t * n + o] += h * b;
                scale[t * n + o] += hs * b.abs();
            }
        }
    }
    (y, scale)
}

fn lora_run<T: Elem>(dev: &CudaDevice, c: &LoraCase, mode: LoraMode, slots: &[Option<SlotIdx>]) {
    let tokens = slots.len();
    let (k, n) = (c.shape.in_features, c.shape.out_features);
    let mut rng = Rng(tokens as u64);
    let x = rounded::<T>(&rng.vec(tokens * k));
    let y0 = rounded::<T>(&rng.vec(tokens * n));
    let a = rounded::<T>(&c.a);
    let bt = rounded::<T>(&c.bt);
    let stack = LoraStack::<T>::upload(
        dev,
        c.shape,
        &conv::<T>(&a),
        &conv::<T>(&bt),
        &c.ranks,
        &c.scales,
    )
    .unwrap();
    let plan = LoraPlan::new(dev, mode, c.shape.slots, slots).unwrap();
    let xd = dev.upload(&conv::<T>(&x)).unwrap();
    let mut yd = dev.upload(&conv::<T>(&y0)).unwrap();
    lora::lora_apply(dev, &stack, &plan, &xd, &mut yd).unwrap();
    let got: Vec<f32> = yd.to_host().unwrap().into_iter().map(Elem::f32).collect();
    let rc = LoraCase {
        shape: c.shape,
        ranks: c.ranks.clone(),
        scales: c.scales.clone(),
        a,
        bt,
    };
    let (want, scale) = lora_reference(&rc, &x, &y0, slots);
    // Tokens without an adapter must be bit-for-bit untouched.
    for (t, s) in slots.iter().enumerate() {
        if s.is_none() {
            assert_eq!(
                &got[t * n..(t + 1) * n],
                &y0[t * n..(t + 1) * n],
                "token {t} changed"
            );
        }
    }
    let rtol = (T::RTOL as f64).max(1e-5);
    assert_close(
        &format!("lora {mode:?} {} T={tokens}", T::SUFFIX),
        &got,
        &want,
        &scale,
        rtol,
        1e-6,
    );
}

fn decode_slots() -> Vec<Option<SlotIdx>> {
    [
        Some(1),
        None,
        Some(0),
        Some(0),
        Some(4),
        None,
        Some(3),
        Some(1),
        Some(2),
        Some(5),
        None,
        Some(4),
        Some(1),
    ]
    .iter()
    .map(|s| s.map(SlotIdx))
    .collect()
}

fn prefill_slots() -> Vec<Option<SlotIdx>> {
    // Runs of 37, 3, 16, 17, 1 and 40 tokens, including runs with no adapter.
    let runs: [(Option<u16>, usize); 7] = [
        (Some(1), 37),
        (None, 3),
        (Some(0), 16),
        (Some(4), 17),
        (Some(2), 1),
        (None, 5),
        (Some(3), 40),
    ];
    runs.iter()
        .flat_map(|(s, n)| std::iter::repeat_n(s.map(SlotIdx), *n))
        .collect()
}

#[test]
fn lora_bgmv_matches_reference_with_mixed_ranks() {
    let Some(dev) = device() else { return };
    let c = lora_case(31);
    lora_run::<f32>(&dev, &c, LoraMode::Bgmv, &decode_slots());
    lora_run::<f16>(&dev, &c, LoraMode::Bgmv, &decode_slots());
    lora_run::<bf16>(&dev, &c, LoraMode::Bgmv, &decode_slots());
    // BGMV is also correct (if slower) on a prefill-shaped batch.
    lora_run::<f32>(&dev, &c, LoraMode::Bgmv, &prefill_slots());
}

#[test]
fn lora_sgmv_matches_reference_with_mixed_ranks() {
    let Some(dev) = device() else { return };
    let c = lora_case(32);
    lora_run::<f32>(&dev, &c, LoraMode::Sgmv, &prefill_slots());
    lora_run::<f16>(&dev, &c, LoraMode::Sgmv, &prefill_slots());
    lora_run::<bf16>(&dev, &c, LoraMode::Sgmv, &prefill_slots());
    lora_run::<f32>(&dev, &c, LoraMode::Sgmv, &decode_slots());
}

#[test]
fn lora_grouped_matches_reference_with_mixed_ranks() {
    let Some(dev) = device() else { return };
    let c = lora_case(33);
    for slots in [decode_slots(), prefill_slots()] {
        lora_run::<f32>(&dev, &c, LoraMode::Grouped, &slots);
        lora_run::<f16>(&dev, &c, LoraMode::Grouped, &slots);
        lora_run::<bf16>(&dev, &c, LoraMode::Grouped, &slots);
    }
    // Ranks above 16 (several passes of rank rows per warp), more than 1024 output
    // columns (several expand column blocks), a slot with more than one tile.
    let big = lora_case_with(34, vec![40, 3, 17, 0, 33], 40, 776, 1288);
    let mut slots: Vec<Option<SlotIdx>> = (0..45).map(|t| Some(SlotIdx((t % 5) as u16))).collect();
    slots.extend(vec![Some(SlotIdx(0)); 20]);
    slots.push(None);
    lora_run::<f32>(&dev, &big, LoraMode::Grouped, &slots);
    lora_run::<f16>(&dev, &big, LoraMode::Grouped, &slots);
    // Features that are not multiples of 8 are a typed error for this mode.
    let odd = lora_case_with(35, vec![4, 2], 4, 60, 36);
    let stack = LoraStack::<f32>::upload(&dev, odd.shape, &odd.a, &odd.bt, &odd.ranks, &odd.scales)
        .unwrap();
    let plan = LoraPlan::new(&dev, LoraMode::Grouped, 2, &[Some(SlotIdx(1))]).unwrap();
    let x = dev.upload(&[0.0f32; 60]).unwrap();
    let mut y = dev.upload(&[0.0f32; 36]).unwrap();
    let err = lora::lora_apply(&dev, &stack, &plan, &x, &mut y);
    assert!(
        matches!(err, Err(CudaError::InvalidArgument { .. })),
        "{err:?}"
    );
}

#[test]
fn lora_plan_rejects_unknown_slots_and_skips_empty_batches() {
    let Some(dev) = device() else { return };
    let c = lora_case(33);
    let err = LoraPlan::new(&dev, LoraMode::Bgmv, c.shape.slots, &[Some(SlotIdx(6))]);
    assert!(
        matches!(err, Err(CudaError::InvalidArgument { .. })),
        "{err:?}"
    );
    let plan = LoraPlan::new(&dev, LoraMode::Sgmv, c.shape.slots, &[None, None]).unwrap();
    assert_eq!(plan.rows(), 0);
    lora_run::<f32>(&dev, &c, LoraMode::Sgmv, &[None, None]);
}

/// Slot `s`'s rows of a case: `A` `[rank, in]` and `Bᵀ` `[rank, out]`.
fn case_rows(c: &LoraCase, s: usize) -> (Vec<f32>, Vec<f32>) {
    let (r, k, n, m) = (
        c.ranks[s],
        c.shape.in_features,
        c.shape.out_features,
        c.shape.max_rank,
    );
    (
        c.a[s * m * k..(s * m + r) * k].to_vec(),
        c.bt[s * m * n..(s * m + r) * n].to_vec(),
    )
}

#[test]
fn lora_write_slots_equals_write_slot_and_reuses_its_staging() {
    let Some(dev) = device() else { return };
    let cases = [
        lora_case_with(71, vec![8, 16, 0, 4], 16, 600, 136),
        lora_case_with(72, vec![16, 2, 5, 3], 16, 96, 40),
    ];
    let upload = UploadStream::new(&dev).unwrap();
    let mut staging = SlotStaging::default();
    let zeros = |c: &LoraCase| LoraStack::<f32>::zeros(&dev, c.shape).unwrap();
    let mut one: Vec<LoraStack<f32>> = cases.iter().map(zeros).collect();
    let many: Vec<LoraStack<f32>> = cases.iter().map(zeros).collect();
    // Round 0 writes slots 0 and 1 of each stack, round 1 empties slot 1 of the first,
    // round 2 writes every slot (more words than the staging holds: it grows).
    for round in 0..3 {
        let picks: Vec<(usize, usize, bool)> = match round {
            0 => vec![(0, 0, true), (0, 1, true), (1, 0, true), (1, 1, true)],
            1 => vec![(0, 1, false)],
            _ => (0..2)
                .flat_map(|i| (0..4).map(move |s| (i, s, true)))
                .collect(),
        };
        let rows: Vec<(Vec<f32>, Vec<f32>)> = picks
            .iter()
            .map(|&(i, s, fill)| {
                if fill {
                    case_rows(&cases[i], s)
                } else {
                    (vec![], vec![])
                }
            })
            .collect();
        upload.begin(&dev).unwrap();
        for (&(i, s, fill), (a, bt)) in picks.iter().zip(&rows) {
            let (rank, scale) = if fill {
                (cases[i].ranks[s], cases[i].scales[s])
            } else {
                (0, 0.0)
            };
            one[i]
                .write_slot(upload.stream(), SlotIdx(s as u16), a, bt, rank, scale)
                .unwrap();
        }
        let writes: Vec<SlotWrite<'_>> = picks
            .iter()
            .zip(&rows)
            .map(|(&(i, s, fill), (a, bt))| SlotWrite {
                stack: &many[i],
                slot: SlotIdx(s as u16),
                // Stack 1 is staged from a host slot (widened while staged), stack 0
                // from f32 rows.
                rows: if i == 1 && fill {
                    SlotRows::Slot(
                        LoraSlot::new(a, bt, cases[i].ranks[s], cases[i].scales[s])
                            .with_b_layout(BLayout::RankOut),
                    )
                } else {
                    SlotRows::F32 { a, bt }
                },
                rank: if fill { cases[i].ranks[s] } else { 0 },
                scale: if fill { cases[i].scales[s] } else { 0.0 },
            })
            .collect();
        write_slots(&dev, &upload, &mut staging, &writes).unwrap();
        let fence = upload.finish().unwrap();
        staging.in_flight(fence.clone());
        fence.wait_on_compute(&dev).unwrap();
    }
    // A bad write is refused before anything is staged.
    let bad = [SlotWrite {
        stack: &many[0],
        slot: SlotIdx(4),
        rows: SlotRows::F32 { a: &[], bt: &[] },
        rank: 0,
        scale: 1.0,
    }];
    assert!(matches!(
        write_slots(&dev, &upload, &mut staging, &bad),
        Err(CudaError::InvalidArgument { .. })
    ));
    // Both stacks of each pair give the same bits for tokens of every slot.
    for (i, c) in cases.iter().enumerate() {
        let slots: Vec<Option<SlotIdx>> = (0..4).map(|s| Some(SlotIdx(s))).collect();
        let plan = LoraPlan::new(&dev, LoraMode::Bgmv, c.shape.slots, &slots).unwrap();
        let mut rng = Rng(i as u64 + 5);
        let x = dev.upload(&rng.vec(4 * c.shape.in_features)).unwrap();
        let y0 = rng.vec(4 * c.shape.out_features);
        let mut y1 = dev.upload(&y0).unwrap();
        let mut y2 = dev.upload(&y0).unwrap();
        lora::lora_apply(&dev, &one[i], &plan, &x, &mut y1).unwrap();
        lora::lora_apply(&dev, &many[i], &plan, &x, &mut y2).unwrap();
        let (y1, y2) = (y1.to_host().unwrap(), y2.to_host().unwrap());
        assert_eq!(y1, y2, "stack {i}");
        assert_ne!(y1, y0, "stack {i}: the adapters changed the output");
    }
}

// ---- paged attention -----------------------------------------------------------

struct AttnCase {
    layout: PagedKvLayout,
    heads: usize,
    /// Per sequence: (block table, first new position, new tokens).
    seqs: Vec<(Vec<BlockId>, usize, usize)>,
}

fn attn_case(
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    seqs: &[(usize, usize)],
    seed: u64,
) -> AttnCase {
    let block_size = 16;
    let need: usize = seqs.iter().map(|(p, t)| (p + t).div_ceil(block_size)).sum();
    let num_blocks = need + 7;
    // Hand out blocks in a scrambled order so tables are not contiguous.
    let mut rng = Rng(seed);
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..free.len()).rev() {
        free.swap(i, rng.below(i as u32 + 1) as usize);
    }
    let mut tables = vec![];
    for (p, t) in seqs {
        let nb = (p + t).div_ceil(block_size);
        tables.push((free.drain(..nb).map(BlockId).collect(), *p, *t));
    }
    AttnCase {
        layout: PagedKvLayout {
            num_blocks,
            block_size,
            num_kv_heads: kv_heads,
            head_dim,
        },
        heads,
        seqs: tables,
    }
}

/// Writes random K/V for every position of every sequence (old context through
/// `write_kv` too), runs attention with the given kernel and compares.
/// `kernel`: a specific kernel, or `None` for the planner ([`attention::paged_attention`]).
fn attn_run<T: Elem>(dev: &CudaDevice, c: &AttnCase, kernel: Option<attention::AttentionKernel>) {
    let l = c.layout;
    let (hd, row) = (l.head_dim, l.row_len());
    let mut rng = Rng(l.num_blocks as u64 * 7 + hd as u64);
    let mut kc = dev.zeros::<T>(l.cache_len()).unwrap();
    let mut vc = dev.zeros::<T>(l.cache_len()).unwrap();
    // Host mirror: per sequence, per position, the K and V rows.
    let mut seq_k: Vec<Vec<f32>> = vec![];
    let mut seq_v: Vec<Vec<f32>> = vec![];
    let mut slots = vec![];
    for (table, p, t) in &c.seqs {
        let ctx = p + t;
        let k = rounded::<T>(&rng.vec(ctx * row));
        let v = rounded::<T>(&rng.vec(ctx * row));
        for pos in 0..ctx {
            slots.push(table[pos / l.block_size].index() * l.block_size + pos % l.block_size);
        }
        seq_k.push(k);
        seq_v.push(v);
    }
    let all_k: Vec<f32> = seq_k.concat();
    let all_v: Vec<f32> = seq_v.concat();
    let (kd, vd) = (
        dev.upload(&conv::<T>(&all_k)).unwrap(),
        dev.upload(&conv::<T>(&all_v)).unwrap(),
    );
    attention::write_kv(dev, l, &kd, &vd, &slots, &mut kc, &mut vc).unwrap();

    let tokens: usize = c.seqs.iter().map(|s| s.2).sum();
    let q = rounded::<T>(
        &rng.vec(tokens * c.heads * hd)
            .iter()
            .map(|v| v * 3.0)
            .collect::<Vec<_>>(),
    );
    let queries: Vec<SeqQuery<'_>> = c
        .seqs
        .iter()
        .map(|(table, p, t)| SeqQuery {
            block_table: table,
            first_pos: *p,
            tokens: *t,
        })
        .collect();
    let batch = AttentionBatch::new(dev, l, &queries).unwrap();
    let qd = dev.upload(&conv::<T>(&q)).unwrap();
    let mut od = dev.alloc::<T>(tokens * c.heads * hd).unwrap();
    match kernel {
        None => attention::paged_attention(dev, &batch, c.heads, &qd, &kc, &vc, &mut od).unwrap(),
        Some(attention::AttentionKernel::Decode) => {
            attention::paged_attention_decode(dev, &batch, c.heads, &qd, &kc, &vc, &mut od).unwrap()
        }
        Some(attention::AttentionKernel::Prefill) => {
            attention::paged_attention_prefill(dev, &batch, c.heads, &qd, &kc, &vc, &mut od)
                .unwrap()
        }
    }
    let got: Vec<f32> = od.to_host().unwrap().into_iter().map(Elem::f32).collect();

    let group = c.heads / l.num_kv_heads;
    let sc = 1.0 / (hd as f64).sqrt();
    let (mut want, mut scale) = (vec![], vec![]);
    for (si, (_, p, t)) in c.seqs.iter().enumerate() {
        for i in 0..*t {
            let pos = p + i;
            let qrow = (queries[..si].iter().map(|q| q.tokens).sum::<usize>() + i) * c.heads * hd;
            for h in 0..c.heads {
                let kvh = h / group;
                let qh = &q[qrow + h * hd..qrow + (h + 1) * hd];
                let s: Vec<f64> = (0..=pos)
                    .map(|j| {
                        let kr = &seq_k[si][j * row + kvh * hd..j * row + (kvh + 1) * hd];
                        qh.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * sc
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|v| (v - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for d in 0..hd {
                    let mut o = 0.0;
                    let mut mag = 0.0;
                    for j in 0..=pos {
                        let v = seq_v[si][j * row + kvh * hd + d] as f64;
                        o += e[j] / z * v;
                        mag += e[j] / z * v.abs();
                    }
                    want.push(o);
                    scale.push(mag + 1e-3);
                }
            }
        }
    }
    let rtol = (T::RTOL as f64).max(1e-4);
    assert_close(
        &format!(
            "attention {kernel:?} {} hd={hd} heads={}/{}",
            T::SUFFIX,
            c.heads,
            l.num_kv_heads
        ),
        &got,
        &want,
        &scale,
        rtol,
        1e-5,
    );
}

#[test]
fn paged_decode_matches_reference_across_splits() {
    let Some(dev) = device() else { return };
    use attention::AttentionKernel::Decode;
    // SmolLM2 geometry; contexts from 1 to 1000 positions (1..4 split partitions).
    let c = attn_case(
        9,
        3,
        64,
        &[(0, 1), (16, 1), (299, 1), (999, 1), (255, 1), (256, 1)],
        41,
    );
    attn_run::<f32>(&dev, &c, Some(Decode));
    attn_run::<f16>(&dev, &c, Some(Decode));
    attn_run::<bf16>(&dev, &c, Some(Decode));
    // Wider heads and a bigger group; and a tiny head_dim.
    attn_run::<f32>(
        &dev,
        &attn_case(8, 2, 128, &[(700, 1), (3, 1)], 42),
        Some(Decode),
    );
    attn_run::<f32>(
        &dev,
        &attn_case(4, 4, 32, &[(40, 1), (513, 1)], 43),
        Some(Decode),
    );
    // The decode kernel also handles multi-token chunks.
    attn_run::<f32>(
        &dev,
        &attn_case(9, 3, 64, &[(5, 20), (0, 3)], 44),
        Some(Decode),
    );
}

#[test]
fn paged_prefill_matches_reference_with_chunked_context() {
    let Some(dev) = device() else { return };
    use attention::AttentionKernel::Prefill;
    // Fresh prompt, chunk after cached context, tiny chunk, tile-boundary lengths.
    let c = attn_case(
        9,
        3,
        64,
        &[(0, 37), (40, 20), (5, 3), (0, 16), (300, 17)],
        51,
    );
    attn_run::<f32>(&dev, &c, Some(Prefill));
    attn_run::<f16>(&dev, &c, Some(Prefill));
    attn_run::<bf16>(&dev, &c, Some(Prefill));
    attn_run::<f32>(
        &dev,
        &attn_case(8, 2, 128, &[(0, 33), (70, 5)], 52),
        Some(Prefill),
    );
    attn_run::<f32>(&dev, &attn_case(4, 1, 32, &[(17, 40)], 53), Some(Prefill));
    // Mixed decode + prefill batch through the planner (picks prefill here).
    attn_run::<f32>(
        &dev,
        &attn_case(9, 3, 64, &[(100, 1), (0, 24), (33, 1)], 54),
        None,
    );
}

#[test]
fn paged_decode_rejects_head_dims_it_cannot_load_in_16_bytes() {
    let Some(dev) = device() else { return };
    // f16 rows are read 8 elements at a time: head_dim 36 is fine for f32 (9 x 4)
    // but a typed error for f16.
    let layout = PagedKvLayout {
        num_blocks: 2,
        block_size: 16,
        num_kv_heads: 1,
        head_dim: 36,
    };
    let table = [BlockId(0)];
    let q = [SeqQuery {
        block_table: &table,
        first_pos: 3,
        tokens: 1,
    }];
    let batch = AttentionBatch::new(&dev, layout, &q).unwrap();
    let n = layout.cache_len();
    let err = attention::paged_attention_decode(
        &dev,
        &batch,
        1,
        &dev.zeros::<f16>(36).unwrap(),
        &dev.zeros::<f16>(n).unwrap(),
        &dev.zeros::<f16>(n).unwrap(),
        &mut dev.zeros::<f16>(36).unwrap(),
    );
    assert!(
        matches!(err, Err(CudaError::InvalidArgument { .. })),
        "{err:?}"
    );
    attention::paged_attention_decode(
        &dev,
        &batch,
        1,
        &dev.zeros::<f32>(36).unwrap(),
        &dev.zeros::<f32>(n).unwrap(),
        &dev.zeros::<f32>(n).unwrap(),
        &mut dev.zeros::<f32>(36).unwrap(),
    )
    .unwrap();
}

#[test]
fn attention_batch_rejects_short_tables() {
    let Some(dev) = device() else { return };
    let layout = PagedKvLayout {
        num_blocks: 4,
        block_size: 16,
        num_kv_heads: 1,
        head_dim: 32,
    };
    let table = [BlockId(0)];
    let q = [SeqQuery {
        block_table: &table,
        first_pos: 16,
        tokens: 1,
    }];
    assert!(matches!(
        AttentionBatch::new(&dev, layout, &q),
        Err(CudaError::InvalidArgument { .. })
    ));
    let bad = [BlockId(9)];
    let q = [SeqQuery {
        block_table: &bad,
        first_pos: 0,
        tokens: 1,
    }];
    assert!(AttentionBatch::new(&dev, layout, &q).is_err());
    let err = attention::write_kv(
        &dev,
        layout,
        &dev.zeros::<f32>(32).unwrap(),
        &dev.zeros::<f32>(32).unwrap(),
        &[64],
        &mut dev.zeros::<f32>(layout.cache_len()).unwrap(),
        &mut dev.zeros::<f32>(layout.cache_len()).unwrap(),
    );
    assert!(err.is_err());
}

// ---- pool --------------------------------------------------------------------

#[test]
fn pool_reuses_freed_buffers() {
    let Some(dev) = device() else { return };
    let pool = batos_kernels::cuda::MemoryPool::new(dev.stream().clone(), 1 << 24);
    let a = pool.alloc::<f32>(1000).unwrap();
    drop(a);
    let before = pool.stats();
    let b = pool.upload(&[1.0f32; 900]).unwrap();
    let after = pool.stats();
    assert_eq!(after.hits, before.hits + 1, "{before:?} -> {after:?}");
    assert_eq!(b.to_host().unwrap(), vec![1.0f32; 900]);
    drop(b);
    pool.trim();
    assert_eq!(pool.stats().cached_bytes, 0);
}

// ---- the Device seam against the shared CPU reference ----------------------------

#[test]
fn device_cuda_seam_matches_cpu_reference() {
    use batos_kernels::cpu::reference;
    use batos_kernels::{
        AttentionHeads, Device, KernelError, KvCache, KvCacheLayout, Rope, RopeConfig, RopeScaling,
        SeqAttention,
    };
    let gpu = Device::Cuda(0);
    let Some(_dev) = device() else {
        // No GPU: the seam answers with a typed error, never a panic.
        let mut out = [0.0f32; 2];
        let err = gpu
            .rms_norm(&[1.0, 2.0], &[1.0, 1.0], 1e-5, &mut out)
            .unwrap_err();
        assert!(matches!(err, KernelError::Cuda { .. }), "{err:?}");
        return;
    };
    let mut rng = Rng(77);
    let close = |what: &str, got: &[f32], want: &[f32], tol: f32| {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{what}[{i}]: gpu {g} vs reference {w}"
            );
        }
    };
    // rms_norm, silu_mul (tolerance 1e-5 relative).
    let (rows, d) = (4, 577);
    let x = rng.vec(rows * d);
    let w = rng.vec(d);
    let (mut a, mut b) = (vec![0.0; rows * d], vec![0.0; rows * d]);
    gpu.rms_norm(&x, &w, 1e-5, &mut a).unwrap();
    reference::rms_norm(&x, &w, 1e-5, &mut b).unwrap();
    close("rms_norm", &a, &b, 1e-5);
    let up = rng.vec(rows * d);
    gpu.silu_mul(&x, &up, &mut a).unwrap();
    reference::silu_mul(&x, &up, &mut b).unwrap();
    close("silu_mul", &a, &b, 1e-5);
    // rope with Llama-3-free default frequencies (tolerance 1e-5 relative).
    let heads = AttentionHeads::new(9, 3, 64).unwrap();
    let rope = Rope::new(&RopeConfig {
        theta: 10_000.0,
        head_dim: 64,
        scaling: RopeScaling::Default,
    })
    .unwrap();
    let positions = [0usize, 3, 100, 2047];
    let q0 = rng.vec(positions.len() * heads.q_width());
    let k0 = rng.vec(positions.len() * heads.kv_width());
    let (mut qg, mut kg, mut qr, mut kr) = (q0.clone(), k0.clone(), q0.clone(), k0.clone());
    gpu.rope(&rope, &heads, &positions, &mut qg, &mut kg)
        .unwrap();
    reference::rope(&rope, &heads, &positions, &mut qr, &mut kr).unwrap();
    close("rope q", &qg, &qr, 1e-5);
    close("rope k", &kg, &kr, 1e-5);
    // paged attention: a decode row and a prefill chunk after cached context
    // (tolerance 1e-4 relative).
    let layout = KvCacheLayout::new(16, 3, 64).unwrap();
    let num_blocks = 40;
    let kc = rng.vec(num_blocks * layout.block_stride());
    let vc = rng.vec(num_blocks * layout.block_stride());
    let t1: Vec<BlockId> = [7u32, 3, 30, 12, 0].map(BlockId).to_vec();
    let t2: Vec<BlockId> = [5u32, 9, 21].map(BlockId).to_vec();
    let seqs = [
        SeqAttention {
            block_table: &t1,
            context_len: 70,
            query_start: 0,
            query_len: 1,
        },
        SeqAttention {
            block_table: &t2,
            context_len: 41,
            query_start: 1,
            query_len: 19,
        },
    ];
    let q = rng.vec(20 * heads.q_width());
    let cache = KvCache {
        k: &kc,
        v: &vc,
        layout,
    };
    let (mut og, mut or) = (vec![0.0; q.len()], vec![0.0; q.len()]);
    gpu.paged_attention(&q, &heads, &cache, &seqs, &mut og)
        .unwrap();
    reference::paged_attention(&q, &heads, &cache, &seqs, &mut or).unwrap();
    close("paged_attention", &og, &or, 1e-4);
}
