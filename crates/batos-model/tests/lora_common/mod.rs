//! The reference adapter `lora_r16` made hot over a model, and all-position logits of a
//! batch with per-sequence adapters: shared by the real-model LoRA tests.
// Each test binary uses a subset.
#![allow(dead_code)]

use batos_lora::{AdapterManager, Expect, HotFormat, HotSnapshot, ManagerConfig, PrefetchPolicy};
use batos_model::forward::{ForwardBatch, LlamaModel, LogitsRows, SeqStep};
use batos_store::{Db, StoreConfig};
use batos_types::{BlockId, MemoryBudget, SlotIdx};

use crate::common::reference_dir;
use crate::forward_common::TestCache;

/// `lora_r16` pinned in a hot slot, with everything that keeps it there.
pub struct Hot {
    _dir: tempfile::TempDir,
    _mgr: AdapterManager,
    _pin: batos_lora::HotPin,
    pub snapshot: HotSnapshot,
    pub slot: SlotIdx,
}

/// Loads ../shared/reference/adapters/lora_r16 through a fresh image and pins it hot in
/// `hot_format`.
pub fn hot_adapter(model: &LlamaModel, hot_format: HotFormat) -> Hot {
    let base = model.dims().lora_base_shapes("SmolLM2-135M-Instruct");
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("image"), StoreConfig::default()).unwrap();
    let cfg = ManagerConfig {
        prefetch: PrefetchPolicy::Off,
        hot_format,
        ..ManagerConfig::default()
    };
    let mgr = AdapterManager::open(&db, base, MemoryBudget::new("host", 1 << 30), cfg).unwrap();
    let adapter_dir = reference_dir().unwrap().join("adapters/lora_r16");
    mgr.add_dir("lora_r16", &adapter_dir, Expect::Absent)
        .unwrap();
    let lease = mgr.acquire("lora_r16").unwrap();
    let pin = mgr.pin_hot(&lease).unwrap();
    Hot {
        snapshot: mgr.hot_snapshot(),
        slot: pin.slot(),
        _pin: pin,
        _mgr: mgr,
        _dir: dir,
    }
}

/// All-position logits of `seqs` run as one batch, each in its own blocks.
pub fn batch_logits(
    model: &LlamaModel,
    snapshot: &HotSnapshot,
    seqs: &[(Vec<u32>, Option<SlotIdx>)],
) -> Vec<Vec<f32>> {
    let per_seq = seqs.iter().map(|s| s.0.len()).max().unwrap().div_ceil(16);
    let mut cache = TestCache::new(model.dims(), per_seq * seqs.len(), 16);
    let steps = seqs
        .iter()
        .enumerate()
        .map(|(i, (toks, adapter))| {
            let table = (0..per_seq)
                .map(|b| BlockId((i * per_seq + b) as u32))
                .collect();
            let mut s = SeqStep::new(toks.clone(), 0, table).with_logits(LogitsRows::All);
            s.adapter = *adapter;
            s
        })
        .collect();
    let out = model
        .forward_with_adapters(&ForwardBatch::new(steps), &mut cache, snapshot)
        .unwrap();
    (0..seqs.len())
        .map(|i| {
            out.seq_logits(i)
                .expect("every sequence of the step has rows")
                .flatten()
                .copied()
                .collect()
        })
        .collect()
}

/// Runs `b` without an adapter, `a` and `b` with `slot` in one batch; asserts the two
/// adapter rows equal `a.1` and `b.1` (their logits alone with the adapter) bit for bit
/// and that the adapter changes `b`'s logits. Returns the base row's logits.
pub fn check_mixed_batch(
    model: &LlamaModel,
    snapshot: &HotSnapshot,
    slot: SlotIdx,
    a: &(Vec<u32>, Vec<f32>),
    b: &(Vec<u32>, Vec<f32>),
) -> Vec<f32> {
    let mut mixed = batch_logits(
        model,
        snapshot,
        &[
            (b.0.clone(), None),
            (a.0.clone(), Some(slot)),
            (b.0.clone(), Some(slot)),
        ],
    );
    assert_eq!(mixed[1], a.1, "adapter sequence alone vs in a mixed batch");
    assert_eq!(mixed[2], b.1, "adapter sequence alone vs in a mixed batch");
    assert_ne!(mixed[0], b.1, "the adapter changes the logits");
    mixed.swap_remove(0)
}
