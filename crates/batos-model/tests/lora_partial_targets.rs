//! An adapter that adapts only some projections (PEFT's common `q_proj`/`v_proj`
//! adapters) runs in a mixed batch: a projection it leaves out gets nothing added, so
//! it gives the same logits as the same adapter with the other five projections present
//! but their `lora_B` all zero. Before this was handled, such a token's empty table
//! entry failed the whole step.

mod forward_common;

use batos_lora::audit::AdapterFiles;
use batos_lora::{
    AdapterManager, Expect, LoraPair, LoraWeights, ManagerConfig, PrefetchPolicy, Projection,
};
use batos_model::forward::{ForwardBatch, LlamaDims, SeqStep, WeightDType};
use batos_model::synthetic::{tiny_params, SyntheticLlama};
use batos_model::LlamaConfig;
use batos_store::{Db, StoreConfig};
use batos_types::{BlockId, MemoryBudget};
use forward_common::{tokens, TestCache};

fn values(seed: u64, n: usize, amp: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * amp
        })
        .collect()
}

/// A rank-`rank` adapter on `targets`; with `zero_rest`, also on every other projection
/// with `lora_B` = 0 (so those add exactly nothing).
fn adapter(dims: &LlamaDims, rank: usize, targets: &[Projection], zero_rest: bool) -> AdapterFiles {
    let base = dims.lora_base_shapes("synthetic");
    let mut w = LoraWeights::empty(dims.num_layers);
    let mut names = Vec::new();
    for p in Projection::ALL {
        let on = targets.contains(&p);
        if !on && !zero_rest {
            continue;
        }
        names.push(p.module_name().to_string());
        for layer in 0..dims.num_layers {
            let (n_in, n_out) = base.dims(p);
            let seed = 1000 + 16 * layer as u64 + p as u64;
            let b = if on {
                values(seed + 7, n_out * rank, 0.5 / (rank as f32).sqrt())
            } else {
                vec![0.0; n_out * rank]
            };
            let pair = LoraPair {
                rank,
                scale: 2.0,
                a: values(seed, rank * n_in, 0.5 / (n_in as f32).sqrt()),
                b,
            };
            w.insert(layer, p, pair).unwrap();
        }
    }
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": names,
        "bias": "none",
        "base_model_name_or_path": "synthetic",
    });
    AdapterFiles::from_bytes(
        serde_json::to_vec(&config).unwrap(),
        batos_lora::peft::to_safetensors(&w).unwrap(),
    )
}

#[test]
fn an_adapter_on_some_projections_adds_nothing_to_the_others() {
    let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params()).unwrap(), 11);
    let model = synth.model(WeightDType::F32).unwrap();
    let d = *model.dims();

    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("image"), StoreConfig::default()).unwrap();
    let cfg = ManagerConfig {
        max_loras: 2,
        max_cpu_loras: 2,
        prefetch: PrefetchPolicy::Off,
        ..ManagerConfig::default()
    };
    let mgr = AdapterManager::open(
        &db,
        d.lora_base_shapes("synthetic"),
        MemoryBudget::new("host", 1 << 34),
        cfg,
    )
    .unwrap();
    let qv = [Projection::Q, Projection::V];
    mgr.add_files(
        "qv",
        adapter(&d, 8, &qv, false),
        "synthetic",
        Expect::Absent,
    )
    .unwrap();
    mgr.add_files(
        "all",
        adapter(&d, 8, &qv, true),
        "synthetic",
        Expect::Absent,
    )
    .unwrap();
    let (lq, la) = (mgr.acquire("qv").unwrap(), mgr.acquire("all").unwrap());
    let (pq, pa) = (mgr.pin_hot(&lq).unwrap(), mgr.pin_hot(&la).unwrap());
    let snap = mgr.hot_snapshot();

    // One step: base, the partial adapter and the zero-padded one, on one prompt each.
    let prompt = tokens(9, 3, d.vocab_size);
    let bs = 4;
    let blocks = prompt.len().div_ceil(bs);
    let step = |i: usize, slot| {
        let table = (0..blocks)
            .map(|b| BlockId((i * blocks + b) as u32))
            .collect();
        let mut s = SeqStep::new(prompt.clone(), 0, table);
        s.adapter = slot;
        s
    };
    let batch = ForwardBatch::new(vec![
        step(0, None),
        step(1, Some(pq.slot())),
        step(2, Some(pa.slot())),
    ]);
    let mut cache = TestCache::new(&d, 3 * blocks, bs);
    let out = model
        .forward_with_adapters(&batch, &mut cache, &snap)
        .expect("a step with a partial adapter runs");
    let (base, qv, all) = (
        out.row(0).unwrap(),
        out.row(1).unwrap(),
        out.row(2).unwrap(),
    );
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max)
    };
    assert!(diff(base, qv) > 1e-3, "the partial adapter changed nothing");
    assert!(
        diff(qv, all) <= 1e-5,
        "partial vs zero-padded adapter differ by {}",
        diff(qv, all)
    );
}
