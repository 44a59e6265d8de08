//! Multi-LoRA benches at SmolLM2-135M's shapes (30 layers, hidden 576, q 576, kv 192,
//! MLP 1536), CPU:
//!
//! - `lora/cold_to_hot/{wall,thread_cpu}/r{8,16,64}`: an adapter in the image (not in memory) until it
//!   sits pinned in a hot slot: blob read + checksum, audit, decode, generation hash,
//!   budget reservation, slot fill.
//! - `lora/warm_to_hot/{shared,copy}/r16`: a decoded adapter into a hot slot (evicting
//!   another): shared = the slot refers to host memory; copy = a device-style copy.
//! - `lora/hot_convert/r16/{f16,i8}`: building an r16 adapter's hot copy (narrowing and
//!   packing; part of cold → hot with those formats).
//! - `lora/decode_cpu/...` (process CPU time): one decoder layer's seven projections for a decode batch,
//!   base matmuls alone vs base + per-token LoRA (16 sequences over 4 adapters; 64
//!   sequences over 64 adapters).
//! - `lora/decode_cold_cpu/64seq_64adapters_r16/per_layer_{f16,i8}`: the LoRA part of a
//!   64 × 64 decode step with its matrices streamed from DRAM (8 layers of distinct
//!   adapters in turn), per layer.
//! - `lora/prefill/...`: 2 × 64-token prefill runs, segmented (SGMV) vs gathered (BGMV).
//!
//! - `lora/decode_cpu/.../lora_fused_{f32,f16,bf16}`: the LoRA part alone as the
//!   forward pass runs it (q/k/v and gate/up as fused groups), hot slots in each
//!   `HotFormat`.
//! - `lora/real_decode_f32_cpu/...` (process CPU time): one decode step of the real model (f32 weights) for
//!   16 sequences over 4 adapters and 64 sequences over 64 adapters (r16), base vs
//!   adapters in each hot format (`lora_f32`, `lora_bf16`, `lora_f16`), back to back
//!   in one run; skipped with a message when the model cannot be fetched.
//!
//! `BATOS_BENCH_SERIAL=1` runs the decode kernels on the calling thread (no pool):
//! process CPU time is then that thread's alone, without the pool's spinning, for
//! comparing kernels on a noisy machine.
//!
//! Run: `cargo bench --bench lora` (figures in docs/perf/lora.md).

use batos::kernels::cpu::{self, lora as k};
use batos::kernels::WeightView;
use batos::lora::{
    AdapterFiles, AdapterManager, BaseShapes, Expect, HotFormat, HotStorage, HotWeights, LoraPair,
    LoraWeights, ManagerConfig, PrefetchPolicy, Projection,
};
use batos::store::{Db, StoreConfig};
use batos::types::{MemoryBudget, SlotIdx};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::hint::black_box;

fn cpu_clock(clock: libc::clockid_t) -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the thread and process CPU clocks are
    // supported on Linux, and on failure `ts` stays zero (the bench then reports zero).
    unsafe { libc::clock_gettime(clock, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time consumed by the calling thread.
fn thread_cpu() -> std::time::Duration {
    cpu_clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time consumed by every thread of the process (the kernels run on a pool).
fn process_cpu() -> std::time::Duration {
    cpu_clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// Benches `f` in process CPU time: on a loaded machine wall time mostly measures
/// waiting for a core, while CPU time is what the work costs.
fn bench_cpu(b: &mut criterion::Bencher<'_>, mut f: impl FnMut()) {
    b.iter_custom(|iters| {
        let start = process_cpu();
        for _ in 0..iters {
            f();
        }
        process_cpu() - start
    })
}

struct Lcg(u64);
impl Lcg {
    fn vec(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * amp
            })
            .collect()
    }
}

/// Random rank-`r` pairs on all seven projections of `layers` layers.
fn random_weights(base: &BaseShapes, layers: usize, r: usize, rng: &mut Lcg) -> LoraWeights {
    let mut w = LoraWeights::empty(layers);
    for layer in 0..layers {
        for p in Projection::ALL {
            let (i, o) = base.dims(p);
            let pair = LoraPair {
                rank: r,
                scale: 2.0,
                a: rng.vec(r * i, 0.02),
                b: rng.vec(o * r, 0.02),
            };
            w.insert(layer, p, pair).unwrap();
        }
    }
    w
}

fn adapter_files(base: &BaseShapes, r: usize, seed: u64) -> AdapterFiles {
    let w = random_weights(base, base.num_layers, r, &mut Lcg(seed));
    let config = format!(
        r#"{{"peft_type":"LORA","r":{r},"lora_alpha":{},"target_modules":["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"],"bias":"none","use_dora":false,"base_model_name_or_path":"{}"}}"#,
        2 * r,
        base.model_name
    );
    let weights = batos::lora::peft::to_safetensors(&w).unwrap();
    AdapterFiles::from_bytes(config.into_bytes(), weights)
}

fn manager(dir: &std::path::Path, max_loras: usize, storage: HotStorage) -> AdapterManager {
    let db = Db::open(dir.join("image"), StoreConfig::default()).unwrap();
    let cfg = ManagerConfig {
        max_loras,
        max_cpu_loras: 8,
        hot_storage: storage,
        prefetch: PrefetchPolicy::Off,
        ..ManagerConfig::default()
    };
    AdapterManager::open(
        &db,
        BaseShapes::smollm2_135m(),
        MemoryBudget::new("bench", 8 << 30),
        cfg,
    )
    .unwrap()
}

fn cold_to_hot(c: &mut Criterion) {
    let base = BaseShapes::smollm2_135m();
    let mut g = c.benchmark_group("lora/cold_to_hot");
    g.sample_size(20);
    for r in [8usize, 16, 64] {
        let dir = tempfile::tempdir().unwrap();
        let mgr = manager(dir.path(), 4, HotStorage::SharedHost);
        mgr.add_files(
            "a",
            adapter_files(&base, r, r as u64),
            "bench",
            Expect::Absent,
        )
        .unwrap();
        let cycle = || {
            mgr.unload("a"); // back to cold
            let lease = mgr.acquire("a").unwrap();
            let pin = mgr.pin_hot(&lease).unwrap();
            black_box(pin.slot());
        };
        g.bench_function(BenchmarkId::new("wall", format!("r{r}")), |b| b.iter(cycle));
        // The same cycle in this thread's CPU time: on a shared, loaded machine the
        // wall time above mostly measures waiting for a core.
        g.bench_function(BenchmarkId::new("thread_cpu", format!("r{r}")), |b| {
            b.iter_custom(|iters| {
                let start = thread_cpu();
                for _ in 0..iters {
                    cycle();
                }
                thread_cpu() - start
            })
        });
    }
    g.finish();
}

fn warm_to_hot(c: &mut Criterion) {
    let base = BaseShapes::smollm2_135m();
    let mut g = c.benchmark_group("lora/warm_to_hot");
    for (label, storage) in [
        ("shared", HotStorage::SharedHost),
        ("copy", HotStorage::Copy),
    ] {
        let dir = tempfile::tempdir().unwrap();
        // One slot, two warm adapters: every pin evicts the other and fills the slot.
        let mgr = manager(dir.path(), 1, storage);
        mgr.add_files("a", adapter_files(&base, 16, 1), "bench", Expect::Absent)
            .unwrap();
        mgr.add_files("b", adapter_files(&base, 16, 2), "bench", Expect::Absent)
            .unwrap();
        let leases = [mgr.acquire("a").unwrap(), mgr.acquire("b").unwrap()];
        let mut turn = 0usize;
        g.bench_function(BenchmarkId::new(label, "r16"), |b| {
            b.iter(|| {
                turn ^= 1;
                let pin = mgr.pin_hot(&leases[turn]).unwrap();
                black_box(pin.slot());
            })
        });
    }
    g.finish();
}

/// One layer's seven projections: base weights and `n` adapters of rank `r`.
struct Layer {
    base: Vec<(Projection, Vec<f32>)>,
    adapters: Vec<Vec<(Vec<f32>, Vec<f32>)>>, // [adapter][proj] -> (A, B)
}

/// The hot copy built when an adapter enters the warm tier (part of cold → hot):
/// narrowing and packing an r16 adapter's 210 matrices.
fn hot_convert(c: &mut Criterion) {
    let base = BaseShapes::smollm2_135m();
    let mut g = c.benchmark_group("lora/hot_convert");
    let w = random_weights(&base, base.num_layers, 16, &mut Lcg(5));
    for (label, format) in [("f16", HotFormat::F16), ("i8", HotFormat::I8)] {
        g.bench_function(format!("r16/{label}"), |b| {
            b.iter(|| black_box(HotWeights::convert(&w, format)))
        });
    }
    g.finish();
}

fn layer(base: &BaseShapes, n: usize, r: usize) -> Layer {
    let mut rng = Lcg(7);
    Layer {
        base: Projection::ALL
            .iter()
            .map(|&p| {
                let (i, o) = base.dims(p);
                (p, rng.vec(i * o, 0.05))
            })
            .collect(),
        adapters: (0..n)
            .map(|_| {
                Projection::ALL
                    .iter()
                    .map(|&p| {
                        let (i, o) = base.dims(p);
                        (rng.vec(r * i, 0.02), rng.vec(o * r, 0.02))
                    })
                    .collect()
            })
            .collect(),
    }
}

fn run_layer(
    base: &BaseShapes,
    l: &Layer,
    r: usize,
    tokens: &[Option<SlotIdx>],
    x: &[Vec<f32>],
    y: &mut [Vec<f32>],
    with_lora: bool,
) {
    for (pi, (p, w)) in l.base.iter().enumerate() {
        let (i, o) = base.dims(*p);
        cpu::matmul(&x[pi], &WeightView::f32(w, o, i).unwrap(), &mut y[pi]).unwrap();
        if with_lora {
            let table: Vec<_> = l
                .adapters
                .iter()
                .map(|a| Some(k::LoraSlot::new(&a[pi].0, &a[pi].1, r, 2.0)))
                .collect();
            let slots = k::LoraSlots::new(i, o, &table).unwrap();
            k::apply(&x[pi], tokens, &slots, &mut y[pi]).unwrap();
        }
    }
}

/// `BATOS_BENCH_SERIAL=1`: kernels on the calling thread (see the module docs).
fn serial_if_asked() {
    if std::env::var_os("BATOS_BENCH_SERIAL").is_some_and(|v| v == "1") {
        cpu::set_thread_backend(cpu::ThreadBackend::Serial);
    }
}

fn decode(c: &mut Criterion) {
    serial_if_asked();
    let base = BaseShapes::smollm2_135m();
    // Process CPU time (see `bench_cpu`).
    let mut g = c.benchmark_group("lora/decode_cpu");
    g.sample_size(20);
    for (seqs, adapters) in [(16usize, 4usize), (64, 64)] {
        let r = 16;
        let l = layer(&base, adapters, r);
        let tokens: Vec<Option<SlotIdx>> = (0..seqs)
            .map(|s| Some(SlotIdx((s % adapters) as u16)))
            .collect();
        let mut rng = Lcg(3);
        let x: Vec<Vec<f32>> = Projection::ALL
            .iter()
            .map(|&p| rng.vec(seqs * base.dims(p).0, 1.0))
            .collect();
        let mut y: Vec<Vec<f32>> = Projection::ALL
            .iter()
            .map(|&p| vec![0f32; seqs * base.dims(p).1])
            .collect();
        for with_lora in [false, true] {
            let id = format!(
                "{seqs}seq_{adapters}adapters_r{r}/{}",
                if with_lora { "base+lora" } else { "base" }
            );
            g.bench_function(id, |b| {
                bench_cpu(b, || {
                    run_layer(&base, &l, r, &tokens, &x, &mut y, with_lora)
                })
            });
        }
        // The LoRA part alone.
        g.bench_function(
            format!("{seqs}seq_{adapters}adapters_r{r}/lora_only"),
            |b| {
                bench_cpu(b, || {
                    for (pi, (p, _)) in l.base.iter().enumerate() {
                        let (i, o) = base.dims(*p);
                        let table: Vec<_> = l
                            .adapters
                            .iter()
                            .map(|a| Some(k::LoraSlot::new(&a[pi].0, &a[pi].1, r, 2.0)))
                            .collect();
                        let slots = k::LoraSlots::new(i, o, &table).unwrap();
                        k::bgmv(&x[pi], &tokens, &slots, &mut y[pi]).unwrap();
                    }
                })
            },
        );
        // The LoRA part as the forward pass runs it: q/k/v and gate/up as fused groups
        // into their fused outputs, o and down alone, slots in f32 or bf16.
        for (label, format) in [
            ("f32", HotFormat::F32),
            ("f16", HotFormat::F16),
            ("bf16", HotFormat::BF16),
            ("i8", HotFormat::I8),
        ] {
            // Each adapter as one-layer weights, narrowed exactly as the hot tier does.
            let weights: Vec<LoraWeights> = l
                .adapters
                .iter()
                .map(|a| {
                    let mut w = LoraWeights::empty(1);
                    for (pi, &p) in Projection::ALL.iter().enumerate() {
                        let pair = LoraPair {
                            rank: r,
                            scale: 2.0,
                            a: a[pi].0.clone(),
                            b: a[pi].1.clone(),
                        };
                        w.insert(0, p, pair).unwrap();
                    }
                    w
                })
                .collect();
            let hot: Vec<HotWeights> = weights
                .iter()
                .map(|w| HotWeights::convert(w, format))
                .collect();
            let tables: Vec<Vec<Option<k::LoraSlot<'_>>>> = Projection::ALL
                .iter()
                .map(|&p| {
                    weights
                        .iter()
                        .zip(&hot)
                        .map(|(w, h)| h.slot(w, 0, p))
                        .collect()
                })
                .collect();
            let slots: Vec<k::LoraSlots<'_>> = Projection::ALL
                .iter()
                .zip(&tables)
                .map(|(&p, t)| {
                    let (i, o) = base.dims(p);
                    k::LoraSlots::new(i, o, t).unwrap()
                })
                .collect();
            let pos = |p: Projection| Projection::ALL.iter().position(|&q| q == p).unwrap();
            // Groups: (members, input projection for x) with columns laid out in order.
            let groups: Vec<Vec<Projection>> = vec![
                vec![Projection::Q, Projection::K, Projection::V],
                vec![Projection::O],
                vec![Projection::Gate, Projection::Up],
                vec![Projection::Down],
            ];
            let mut fused_y: Vec<Vec<f32>> = groups
                .iter()
                .map(|m| {
                    let w: usize = m.iter().map(|&p| base.dims(p).1).sum();
                    vec![0f32; seqs * w]
                })
                .collect();
            g.bench_function(
                format!("{seqs}seq_{adapters}adapters_r{r}/lora_fused_{label}"),
                |b| {
                    bench_cpu(b, || {
                        for (members, yv) in groups.iter().zip(fused_y.iter_mut()) {
                            let mut col = 0;
                            let targets: Vec<k::LoraTarget<'_>> = members
                                .iter()
                                .map(|&p| {
                                    let t = k::LoraTarget::new(slots[pos(p)], col);
                                    col += base.dims(p).1;
                                    t
                                })
                                .collect();
                            let xin = &x[pos(members[0])];
                            k::apply_fused(xin, &tokens, &targets, yv, col).unwrap();
                        }
                    })
                },
            );
        }
    }
    g.finish();
}

/// The LoRA part of a 64 × 64 decode step with its matrices coming from DRAM, as in a
/// real step: `LAYERS` layers of distinct adapters (more than the L3 holds) run in
/// turn, each layer's four fused groups as the forward pass calls them. Reported per
/// layer (process CPU time of all layers / `LAYERS`).
fn decode_cold(c: &mut Criterion) {
    serial_if_asked();
    const LAYERS: usize = 8;
    let base = BaseShapes::smollm2_135m();
    let (seqs, adapters, r) = (64usize, 64usize, 16usize);
    let mut g = c.benchmark_group("lora/decode_cold_cpu");
    g.sample_size(20);
    let tokens: Vec<Option<SlotIdx>> = (0..seqs)
        .map(|s| Some(SlotIdx((s % adapters) as u16)))
        .collect();
    let mut rng = Lcg(11);
    let weights: Vec<LoraWeights> = (0..adapters)
        .map(|_| random_weights(&base, LAYERS, r, &mut rng))
        .collect();
    let groups: Vec<Vec<Projection>> = vec![
        vec![Projection::Q, Projection::K, Projection::V],
        vec![Projection::O],
        vec![Projection::Gate, Projection::Up],
        vec![Projection::Down],
    ];
    let x: Vec<Vec<f32>> = groups
        .iter()
        .map(|m| rng.vec(seqs * base.dims(m[0]).0, 1.0))
        .collect();
    let mut ys: Vec<Vec<f32>> = groups
        .iter()
        .map(|m| vec![0f32; seqs * m.iter().map(|&p| base.dims(p).1).sum::<usize>()])
        .collect();
    for (label, format) in [("f16", HotFormat::F16), ("i8", HotFormat::I8)] {
        let hot: Vec<HotWeights> = weights
            .iter()
            .map(|w| HotWeights::convert(w, format))
            .collect();
        // [layer][projection] -> slot table
        let tables: Vec<Vec<Vec<Option<k::LoraSlot<'_>>>>> = (0..LAYERS)
            .map(|layer| {
                Projection::ALL
                    .iter()
                    .map(|&p| {
                        weights
                            .iter()
                            .zip(&hot)
                            .map(|(w, h)| h.slot(w, layer, p))
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let pos = |p: Projection| Projection::ALL.iter().position(|&q| q == p).unwrap();
        g.bench_function(
            format!("{seqs}seq_{adapters}adapters_r{r}/per_layer_{label}"),
            |b| {
                b.iter_custom(|iters| {
                    let start = process_cpu();
                    for _ in 0..iters {
                        for t in &tables {
                            for ((members, yv), xin) in groups.iter().zip(ys.iter_mut()).zip(&x) {
                                let mut col = 0;
                                let targets: Vec<k::LoraTarget<'_>> = members
                                    .iter()
                                    .map(|&p| {
                                        let (i, o) = base.dims(p);
                                        let s = k::LoraSlots::new(i, o, &t[pos(p)]).unwrap();
                                        let tg = k::LoraTarget::new(s, col);
                                        col += o;
                                        tg
                                    })
                                    .collect();
                                k::apply_fused(xin, &tokens, &targets, yv, col).unwrap();
                            }
                        }
                    }
                    (process_cpu() - start) / LAYERS as u32
                })
            },
        );
    }
    g.finish();
}

fn prefill(c: &mut Criterion) {
    let base = BaseShapes::smollm2_135m();
    let mut g = c.benchmark_group("lora/prefill");
    g.sample_size(20);
    let r = 16;
    let l = layer(&base, 2, r);
    let tokens: Vec<Option<SlotIdx>> = (0..128).map(|t| Some(SlotIdx((t / 64) as u16))).collect();
    let segs = k::segments(&tokens);
    let mut rng = Lcg(5);
    let x: Vec<Vec<f32>> = Projection::ALL
        .iter()
        .map(|&p| rng.vec(128 * base.dims(p).0, 1.0))
        .collect();
    let mut y: Vec<Vec<f32>> = Projection::ALL
        .iter()
        .map(|&p| vec![0f32; 128 * base.dims(p).1])
        .collect();
    for mode in ["sgmv", "bgmv"] {
        g.bench_function(format!("2x64tok_r{r}/{mode}"), |b| {
            b.iter(|| {
                for (pi, (p, _)) in l.base.iter().enumerate() {
                    let (i, o) = base.dims(*p);
                    let table: Vec<_> = l
                        .adapters
                        .iter()
                        .map(|a| Some(k::LoraSlot::new(&a[pi].0, &a[pi].1, r, 2.0)))
                        .collect();
                    let slots = k::LoraSlots::new(i, o, &table).unwrap();
                    if mode == "sgmv" {
                        k::sgmv(&x[pi], &segs, &slots, &mut y[pi]).unwrap();
                    } else {
                        k::bgmv(&x[pi], &tokens, &slots, &mut y[pi]).unwrap();
                    }
                }
            })
        });
    }
    g.finish();
}

/// One decode step of the real model for `seqs` sequences whose 64-token prompts are
/// cached, without adapters and with sequence `i` on hot slot `i % adapters`.
fn real_decode(c: &mut Criterion) {
    use batos::kv::{KvCacheConfig, KvCacheManager, KvShape};
    use batos::model::forward::{ForwardBatch, LlamaModel, SeqStep, WeightDType};
    use batos::model::gguf::GgufFile;
    use batos::model::{LlamaConfig, LoadOptions, ModelWeights};
    use batos::types::BlockId;

    let path = match batos::model::fetch::smollm2_gguf() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("lora/real_decode: real model unavailable ({e}); nothing measured");
            return;
        }
    };
    let gguf = GgufFile::open(&path).expect("open GGUF");
    let config = LlamaConfig::from_gguf(&gguf).expect("config");
    let weights = ModelWeights::from_gguf(&gguf, &config, &LoadOptions::default()).expect("load");
    let model = LlamaModel::from_weights(&config, &weights, WeightDType::F32).expect("model");
    // The GGUF's Q4_1 projections kept as int4 with int8 activations: the fast CPU base,
    // imported only when the interleaved runs need it (not for every filtered run).
    let model_int4 = std::cell::OnceCell::new();
    let int4_model = || {
        model_int4.get_or_init(|| {
            let int4 = batos::model::quant::QuantizedModel::from_gguf_int4(
                &path,
                batos::model::weights::Progress::Hidden,
            )
            .expect("int4 import")
            .model;
            LlamaModel::from_quantized_with(
                &int4.config,
                &int4.weights,
                WeightDType::F32,
                batos::model::forward::Int4Activations::Int8,
            )
            .expect("int4 model")
        })
    };
    let base = BaseShapes::smollm2_135m();
    // Process CPU time (see `bench_cpu`).
    let mut g = c.benchmark_group("lora/real_decode_f32_cpu");
    g.sample_size(10)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(4));
    let formats = [
        ("f32", HotFormat::F32),
        ("bf16", HotFormat::BF16),
        ("f16", HotFormat::F16),
        ("i8", HotFormat::I8),
    ];
    for (seqs, adapters) in [(16usize, 4usize), (64, 64)] {
        let dir = tempfile::tempdir().unwrap();
        // One manager per hot format over one image: the same adapters in each.
        let db = Db::open(dir.path().join("image"), StoreConfig::default()).unwrap();
        let mgrs: Vec<(&str, AdapterManager)> = formats
            .iter()
            .map(|&(label, f)| (label, manager_sized(&db, adapters, f)))
            .collect();
        for a in 0..adapters {
            mgrs[0]
                .1
                .add_files(
                    &format!("a{a}"),
                    adapter_files(&base, 16, 100 + a as u64),
                    "bench",
                    Expect::Absent,
                )
                .unwrap();
        }
        // (label, snapshot, slot of adapter i, pins and leases kept alive)
        let mut hot = Vec::new();
        for (label, mgr) in &mgrs {
            let mut held = Vec::new();
            for a in 0..adapters {
                let lease = mgr.acquire(&format!("a{a}")).unwrap();
                held.push((mgr.pin_hot(&lease).unwrap(), lease));
            }
            let slots: Vec<SlotIdx> = held.iter().map(|(p, _)| p.slot()).collect();
            hot.push((*label, mgr.hot_snapshot(), slots, held));
        }
        let d = model.dims();
        let shape = KvShape {
            num_layers: d.num_layers,
            num_kv_heads: d.num_kv_heads,
            head_dim: d.head_dim,
        };
        let blocks_per_seq = 5; // 64 prompt tokens + the decode token, blocks of 16
        let kv_config = KvCacheConfig::new(shape, 1 << 20)
            .and_then(|c| c.with_num_blocks(seqs * blocks_per_seq))
            .expect("cache config");
        let mut kv =
            KvCacheManager::new(kv_config, &MemoryBudget::new("kv", 1 << 34)).expect("cache");
        let tables: Vec<Vec<BlockId>> = (0..seqs)
            .map(|i| {
                (0..blocks_per_seq)
                    .map(|b| BlockId((i * blocks_per_seq + b) as u32))
                    .collect()
            })
            .collect();
        let prompt = |i: usize| {
            (0..64u32)
                .map(|t| (t * 7919 + i as u32 * 104_729) % 49_152)
                .collect::<Vec<u32>>()
        };
        let prefill = ForwardBatch::new(
            (0..seqs)
                .map(|i| SeqStep::new(prompt(i), 0, tables[i].clone()))
                .collect(),
        );
        model.forward(&prefill, kv.storage_mut()).expect("prefill");
        // Base, then every hot format, back to back in one run (the machine is noisy).
        let empty = batos::lora::HotSnapshot::default();
        let runs: Vec<(String, ForwardBatch, &batos::lora::HotSnapshot)> = std::iter::once(None)
            .chain(hot.iter().map(Some))
            .map(|run| {
                let batch = ForwardBatch::new(
                    (0..seqs)
                        .map(|i| {
                            let mut s = SeqStep::new(vec![42], 64, tables[i].clone());
                            if let Some((_, _, slots, _)) = run {
                                s.adapter = Some(slots[i % adapters]);
                            }
                            s
                        })
                        .collect(),
                );
                match run {
                    Some((label, snap, _, _)) => (format!("lora_{label}"), batch, snap),
                    None => ("base".to_string(), batch, &empty),
                }
            })
            .collect();
        for (label, batch, snapshot) in &runs {
            g.throughput(criterion::Throughput::Elements(seqs as u64));
            let id = format!("{seqs}seq_{adapters}adapters_r16/{label}");
            g.bench_function(id, |b| {
                bench_cpu(b, || {
                    black_box(
                        model
                            .forward_with_adapters(batch, kv.storage_mut(), snapshot)
                            .expect("decode"),
                    );
                })
            });
        }
        // The same steps interleaved (base, f32, bf16, ... , base, ...) so that every
        // variant sees the same background load; the medians' ratios are printed.
        // Skipped when a filter names only other benches (it is not a criterion bench).
        let filters: Vec<String> = std::env::args()
            .skip(1)
            .filter(|a| a.contains('/') || a.contains('_'))
            .collect();
        if !filters.is_empty() && !filters.iter().any(|f| f.contains("real_decode")) {
            continue;
        }
        let all: Vec<(&str, &ForwardBatch, &batos::lora::HotSnapshot)> =
            runs.iter().map(|(l, b, s)| (l.as_str(), b, *s)).collect();
        interleaved("f32 base", &model, &all, &mut kv, seqs, adapters);
        // The same batches over the int4 base (base, f16 and int8 slots).
        let int4_runs: Vec<_> = all
            .iter()
            .filter(|(l, _, _)| matches!(*l, "base" | "lora_f16" | "lora_i8"))
            .copied()
            .collect();
        interleaved(
            "int4 base",
            int4_model(),
            &int4_runs,
            &mut kv,
            seqs,
            adapters,
        );
    }
    g.finish();
}

/// Runs `runs` (the first is the batch without adapters) interleaved for 20 rounds and
/// prints each one's median process CPU time and wall time, and its throughput against
/// the first by each (CPU time is steadier on a shared machine; wall time is what a
/// client sees).
fn interleaved(
    tag: &str,
    model: &batos::model::forward::LlamaModel,
    runs: &[(
        &str,
        &batos::model::forward::ForwardBatch,
        &batos::lora::HotSnapshot,
    )],
    kv: &mut batos::kv::KvCacheManager,
    seqs: usize,
    adapters: usize,
) {
    let rounds = 20;
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
    let mut walls: Vec<Vec<f64>> = vec![Vec::new(); runs.len()];
    // Each round starts one variant later: a step's cost depends on its place in the
    // round (measured with the LoRA kernels skipped: up to ±5 % for the same work), so
    // every variant takes every place equally often.
    for round in 0..rounds {
        for j in 0..runs.len() {
            let k = (j + round) % runs.len();
            let (_, batch, snapshot) = runs[k];
            let (start, wall) = (process_cpu(), std::time::Instant::now());
            black_box(
                model
                    .forward_with_adapters(batch, kv.storage_mut(), snapshot)
                    .expect("decode"),
            );
            times[k].push((process_cpu() - start).as_secs_f64() * 1e3);
            walls[k].push(wall.elapsed().as_secs_f64() * 1e3);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let medians: Vec<f64> = times.iter_mut().map(median).collect();
    let wall_medians: Vec<f64> = walls.iter_mut().map(median).collect();
    for (((label, _, _), m), w) in runs.iter().zip(&medians).zip(&wall_medians) {
        eprintln!(
            "lora/real_decode interleaved ({tag}) {seqs}seq_{adapters}adapters_r16/{label}: \
             median {m:.1} ms CPU over {rounds} rounds, throughput vs base {:.3}; \
             wall {w:.1} ms, {:.3}",
            medians[0] / m,
            wall_medians[0] / w
        );
    }
}

fn manager_sized(db: &Db, adapters: usize, hot_format: HotFormat) -> AdapterManager {
    let cfg = ManagerConfig {
        max_loras: adapters,
        max_cpu_loras: adapters,
        hot_format,
        prefetch: PrefetchPolicy::Off,
        ..ManagerConfig::default()
    };
    AdapterManager::open(
        db,
        BaseShapes::smollm2_135m(),
        MemoryBudget::new("bench", 8 << 30),
        cfg,
    )
    .unwrap()
}

criterion_group!(
    benches,
    cold_to_hot,
    warm_to_hot,
    hot_convert,
    decode,
    decode_cold,
    prefill,
    real_decode
);
criterion_main!(benches);
