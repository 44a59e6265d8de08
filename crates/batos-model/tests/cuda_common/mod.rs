//! Helpers of the GPU tests and the GPU bench (feature `cuda`): opening the device or
//! skipping loudly, synthetic PEFT adapters made hot through the real adapter manager,
//! and a lockstep driver that runs the same batches through the CPU model and the
//! device-resident runtime over one `KvCacheManager`.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;

use batos_kernels::cuda::{CudaDevice, CudaDeviceConfig, CudaError, KernelSource};
use batos_kv::KvCacheManager;
use batos_lora::audit::AdapterFiles;
use batos_lora::{
    AdapterManager, Expect, HotPin, HotSnapshot, LoraPair, LoraWeights, ManagerConfig,
    PrefetchPolicy, Projection,
};
use batos_model::forward::cuda::CudaLlama;
use batos_model::forward::{ForwardBatch, LlamaDims, LlamaModel, SeqStep};
use batos_store::{Db, StoreConfig};
use batos_types::{AdapterGeneration, MemoryBudget, SlotIdx};

/// Device 0, kernels from `BATOS_CUDA_PTX_DIR` when set (else NVRTC); `None` with a
/// SKIP line when this machine has no driver or no device. Any other failure panics.
pub fn device(test: &str) -> Option<Arc<CudaDevice>> {
    let kernels = match std::env::var_os("BATOS_CUDA_PTX_DIR") {
        Some(dir) => KernelSource::PrecompiledPtx(PathBuf::from(dir)),
        None => KernelSource::Nvrtc,
    };
    let config = CudaDeviceConfig {
        kernels,
        ..Default::default()
    };
    match CudaDevice::with_config(config) {
        Ok(d) => Some(d),
        Err(e @ (CudaError::NoDriver { .. } | CudaError::NoDevice { .. })) => {
            println!("SKIP {test}: no CUDA device: {e}");
            eprintln!("SKIP {test}: no CUDA device: {e}");
            None
        }
        Err(e) => panic!("{test}: opening the CUDA device failed: {e}"),
    }
}

/// The real model's GGUF: `BATOS_GPU_MODEL` when set (the device check carries a copy
/// there), else the model cache (fetched if missing); `None` with a SKIP line.
pub fn model_path(test: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BATOS_GPU_MODEL") {
        return Some(PathBuf::from(p));
    }
    match batos_model::fetch::smollm2_gguf() {
        Ok(p) => Some(p),
        Err(e) => {
            println!("SKIP {test}: real model unavailable: {e}");
            eprintln!("SKIP {test}: real model unavailable: {e}");
            None
        }
    }
}

fn values(seed: u64, n: usize, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) * amp
        })
        .collect()
}

/// Hot adapters: the manager, its pins (slots stay filled while held) and the slots.
pub struct HotAdapters {
    pub mgr: AdapterManager,
    pub pins: Vec<HotPin>,
    pub slots: Vec<SlotIdx>,
    _dir: tempfile::TempDir,
}

impl HotAdapters {
    pub fn snapshot(&self) -> HotSnapshot {
        self.mgr.hot_snapshot()
    }
}

/// The PEFT files of a synthetic rank-`rank` adapter on all seven projections.
pub fn synthetic_adapter(dims: &LlamaDims, rank: usize, seed: u64) -> AdapterFiles {
    let base = dims.lora_base_shapes("synthetic");
    let mut w = LoraWeights::empty(dims.num_layers);
    let mut s = seed * 1000;
    for layer in 0..dims.num_layers {
        for p in Projection::ALL {
            let (n_in, n_out) = base.dims(p);
            s += 2;
            let pair = LoraPair {
                rank,
                scale: 2.0,
                a: values(s, rank * n_in, 0.5 / (n_in as f32).sqrt()),
                b: values(s + 1, n_out * rank, 0.5 / (rank as f32).sqrt()),
            };
            w.insert(layer, p, pair).expect("synthetic pair fits");
        }
    }
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bias": "none",
        "base_model_name_or_path": "synthetic",
    });
    AdapterFiles::from_bytes(
        serde_json::to_vec(&config).unwrap(),
        batos_lora::peft::to_safetensors(&w).unwrap(),
    )
}

/// `n` synthetic adapters of rank `rank`, added to a fresh image, leased and pinned
/// into `n` hot slots (slots = `max(n, 1)`).
pub fn hot_adapters(dims: &LlamaDims, n: usize, rank: usize) -> HotAdapters {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("image"), StoreConfig::default()).unwrap();
    let cfg = ManagerConfig {
        max_loras: n.max(1),
        max_cpu_loras: n.max(1),
        prefetch: PrefetchPolicy::Off,
        ..ManagerConfig::default()
    };
    let base = dims.lora_base_shapes("synthetic");
    let mgr = AdapterManager::open(&db, base, MemoryBudget::new("host", 1 << 34), cfg).unwrap();
    let mut pins = Vec::new();
    for i in 0..n {
        let name = format!("synthetic-{i}");
        mgr.add_files(
            &name,
            synthetic_adapter(dims, rank, i as u64 + 1),
            "synthetic",
            Expect::Absent,
        )
        .unwrap();
        let lease = mgr.acquire(&name).unwrap();
        pins.push(mgr.pin_hot(&lease).unwrap());
    }
    let slots = pins.iter().map(HotPin::slot).collect();
    HotAdapters {
        mgr,
        pins,
        slots,
        _dir: dir,
    }
}

/// One sequence of a lockstep run: its prompt, its adapter slot, and the step it joins
/// (so prefills land in steps where others decode: mixed batches).
#[derive(Clone, Debug)]
pub struct SeqSpec {
    pub prompt: Vec<u32>,
    pub adapter: Option<SlotIdx>,
    pub start: usize,
}

/// What a lockstep run saw.
#[derive(Debug, Default)]
pub struct Lockstep {
    /// Per sequence, the CPU's greedy tokens (fed to both sides).
    pub cpu_tokens: Vec<Vec<u32>>,
    /// Per sequence, the GPU's greedy choice at the same steps.
    pub gpu_tokens: Vec<Vec<u32>>,
    /// Per sequence, the CPU's top-1 − top-2 margin at each step.
    pub margins: Vec<Vec<f32>>,
    /// Per sequence, the first step's CPU and GPU logits.
    pub first_logits: Vec<(Vec<f32>, Vec<f32>)>,
    /// Largest |cpu − gpu| / (1 + |cpu|) over every logit compared.
    pub max_rel_err: f32,
    /// Steps that mixed a prefill with decodes.
    pub mixed_steps: usize,
}

fn top2(l: &[f32]) -> (u32, f32) {
    let best = batos_kernels::cpu::argmax(l).unwrap();
    let second = l
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != best)
        .map(|(_, v)| *v)
        .fold(f32::NEG_INFINITY, f32::max);
    (best as u32, l[best] - second)
}

/// Runs `seqs` for `steps` generated tokens each through the CPU model and the GPU
/// runtime in the same batches (the CPU's tokens drive both, so a near-tie flipped on
/// one side does not fork the runs), comparing every logits row.
pub fn lockstep(
    cpu: &LlamaModel,
    gpu: &mut CudaLlama,
    adapters: Option<&HotSnapshot>,
    kv: &mut KvCacheManager,
    seqs: &[SeqSpec],
    steps: usize,
) -> Lockstep {
    let n = seqs.len();
    let mut out = Lockstep {
        cpu_tokens: vec![Vec::new(); n],
        gpu_tokens: vec![Vec::new(); n],
        margins: vec![Vec::new(); n],
        first_logits: vec![(Vec::new(), Vec::new()); n],
        ..Default::default()
    };
    kv.storage_mut().log_block_copies();
    gpu.reset_kv();
    let mut ids = vec![None; n];
    let last = seqs.iter().map(|s| s.start).max().unwrap_or(0) + steps;
    for step in 0..last {
        let mut batch = Vec::new();
        let mut members = Vec::new();
        let mut prefills = 0;
        for (i, s) in seqs.iter().enumerate() {
            if step < s.start || out.cpu_tokens[i].len() >= steps {
                continue;
            }
            let (seq, tokens, cached) = match ids[i] {
                None => {
                    // Prefix-cache entries are keyed by adapter, as the engine keys them.
                    let generation = s.adapter.map(|a| AdapterGeneration([a.0 as u8 + 1; 32]));
                    let a = kv.allocate_prompt(&s.prompt, generation).unwrap().unwrap();
                    ids[i] = Some(a.seq);
                    prefills += 1;
                    (a.seq, s.prompt[a.cached_tokens..].to_vec(), a.cached_tokens)
                }
                Some(seq) => {
                    let tok = *out.cpu_tokens[i].last().unwrap();
                    let cached = kv.num_computed(seq).unwrap();
                    kv.append_tokens(seq, &[tok]).unwrap().unwrap();
                    (seq, vec![tok], cached)
                }
            };
            let table = kv.block_table(seq).unwrap().blocks().to_vec();
            let mut st = SeqStep::new(tokens, cached, table);
            st.adapter = s.adapter;
            batch.push(st);
            members.push(i);
        }
        if batch.is_empty() {
            continue;
        }
        if prefills > 0 && prefills < batch.len() {
            out.mixed_steps += 1;
        }
        let batch = ForwardBatch::new(batch);
        let g = gpu
            .forward(&batch, kv.storage_mut(), adapters)
            .expect("GPU forward");
        let c = match adapters {
            Some(a) => cpu.forward_with_adapters(&batch, kv.storage_mut(), a),
            None => cpu.forward(&batch, kv.storage_mut()),
        }
        .expect("CPU forward");
        for (row, &i) in members.iter().enumerate() {
            let (cl, gl) = (c.last_logits(row).unwrap(), g.last_logits(row).unwrap());
            for (a, b) in cl.iter().zip(gl) {
                out.max_rel_err = out.max_rel_err.max((a - b).abs() / (1.0 + a.abs()));
            }
            if out.cpu_tokens[i].is_empty() {
                out.first_logits[i] = (cl.to_vec(), gl.to_vec());
            }
            let (ct, margin) = top2(cl);
            out.cpu_tokens[i].push(ct);
            out.gpu_tokens[i].push(top2(gl).0);
            out.margins[i].push(margin);
            let seq = ids[i].unwrap();
            let total = batch.seqs[row].context_len();
            kv.mark_computed(seq, total).unwrap();
        }
    }
    for seq in ids.into_iter().flatten() {
        kv.free(seq).unwrap();
    }
    out
}

/// Asserts the GPU chose the CPU's token at every step whose CPU margin is at least
/// `min_margin`, and returns how many steps were compared and how many flipped below it.
pub fn assert_same_greedy(test: &str, r: &Lockstep, min_margin: f32) -> (usize, usize) {
    let (mut compared, mut near_ties) = (0, 0);
    for (i, (c, g)) in r.cpu_tokens.iter().zip(&r.gpu_tokens).enumerate() {
        for (step, ((ct, gt), m)) in c.iter().zip(g).zip(&r.margins[i]).enumerate() {
            compared += 1;
            if ct != gt {
                assert!(
                    *m < min_margin,
                    "{test}: sequence {i} step {step}: CPU chose {ct}, GPU {gt} (CPU margin {m})"
                );
                near_ties += 1;
            }
        }
    }
    (compared, near_ties)
}
