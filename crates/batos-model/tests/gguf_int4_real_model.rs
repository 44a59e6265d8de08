//! The real model's GGUF (SmolLM2-135M-Instruct, Q4_1) imported with its 4-bit
//! projections kept as int4 (`QuantizedModel::from_gguf_int4`: no requantising, Q4_1's
//! float minima as group offsets) against the f32 reference, which is the same GGUF
//! dequantised:
//! - base (../shared/reference/base.json) and LoRA r16 beside the int4 projections in f32
//!   (lora_r16.json): along each prompt's 32-token greedy continuation, teacher-forced in
//!   one step, the int4 model's argmax is the reference token at every position (so free
//!   greedy decoding gives the same 32 ids), and the step-1 top-10 ids are the
//!   reference's with values within `TOP10_TOL`;
//! - logits are bit-identical for a sequence alone or inside a mixed batch (with and
//!   without the adapter);
//! - with int8 activations (`Int4Activations::Int8`, the integer-dot kernels) the
//!   teacher-forced argmax is the reference token at ≥ `INT8_MIN_AGREEMENT` of each
//!   prompt's 32 positions (base and adapter), and the bit-identity above holds too;
//! - with int8 activations and int8 hot slots, a decode step over six distinct adapters
//!   (the interleaved path, reading the base's int8 inputs) gives each sequence the
//!   bits it gets with its adapter alone in the batch.
//!
//! Prints a SKIP line when the model or the reference cannot be had.

mod common;
mod forward_common;
mod lora_common;

use std::sync::OnceLock;

use batos_lora::{HotFormat, HotSnapshot};
use batos_model::forward::{Int4Activations, LlamaModel, WeightDType};
use batos_model::gguf::GgmlType;
use batos_model::quant::QuantizedModel;
use batos_model::weights::Progress;
use batos_types::SlotIdx;
use common::{ids, real_model, reference_json};
use lora_common::{batch_logits, check_mixed_batch, hot_adapter};

/// Largest accepted |logit − reference| over the step-1 top-10 ids. The weights are the
/// reference's exactly; only the summation order differs (codes × scale, then the
/// offset term), which the reference's own hint puts at ~1e-3 for an f32 engine.
const TOP10_TOL: f32 = 1e-3;

/// Lowest number of the 32 teacher-forced positions per prompt at which the model with
/// int8 activations predicts the reference token (measured: see docs/perf/awq.md).
const INT8_MIN_AGREEMENT: usize = 30;

/// The int4-native model with f32 activations, loaded once per test binary; `None`
/// after a SKIP line.
fn int4_model(test: &str) -> Option<&'static LlamaModel> {
    static MODEL: OnceLock<Option<LlamaModel>> = OnceLock::new();
    load_once(&MODEL, test, Int4Activations::F32)
}

/// The same with int8 activations.
fn int4_int8_model(test: &str) -> Option<&'static LlamaModel> {
    static MODEL: OnceLock<Option<LlamaModel>> = OnceLock::new();
    load_once(&MODEL, test, Int4Activations::Int8)
}

fn load_once<'a>(
    cell: &'a OnceLock<Option<LlamaModel>>,
    test: &str,
    activations: Int4Activations,
) -> Option<&'a LlamaModel> {
    let m = cell.get_or_init(|| {
        let path = real_model(test)?;
        let read = QuantizedModel::from_gguf_int4(&path, Progress::Hidden).unwrap();
        assert_eq!(read.kept_types, vec![GgmlType::Q4_1]);
        let q = read.model;
        Some(
            LlamaModel::from_quantized_with(&q.config, &q.weights, WeightDType::F32, activations)
                .unwrap(),
        )
    });
    if m.is_none() {
        println!("SKIP {test}: real model unavailable (see the SKIP line above)");
    }
    m.as_ref()
}

/// One reference prompt run teacher-forced along its 32 greedy ids in one batch.
struct TeacherForced<'a> {
    name: &'a str,
    prompt_len: usize,
    vocab: usize,
    /// The reference's greedy ids.
    want: Vec<u32>,
    /// Prompt plus the first 31 greedy ids: what was fed.
    toks: Vec<u32>,
    logits: Vec<f32>,
}

impl<'a> TeacherForced<'a> {
    fn run(
        model: &LlamaModel,
        snapshot: &HotSnapshot,
        p: &'a serde_json::Value,
        adapter: Option<SlotIdx>,
    ) -> TeacherForced<'a> {
        let input = ids(&p["input_ids"]);
        let want = ids(&p["greedy_ids_32"]);
        let mut toks = input.clone();
        toks.extend_from_slice(&want[..31]);
        let logits = batch_logits(model, snapshot, &[(toks.clone(), adapter)]).remove(0);
        TeacherForced {
            name: p["name"].as_str().unwrap(),
            prompt_len: input.len(),
            vocab: model.dims().vocab_size,
            want,
            toks,
            logits,
        }
    }

    /// The logits that predict greedy id `i`.
    fn row(&self, i: usize) -> &[f32] {
        let at = self.prompt_len - 1 + i;
        &self.logits[at * self.vocab..(at + 1) * self.vocab]
    }

    fn argmax(&self, i: usize) -> u32 {
        batos_kernels::cpu::argmax(self.row(i)).unwrap() as u32
    }
}

/// Checks every prompt of `reference` (greedy ids, step-1 top-10) with `adapter`;
/// returns each prompt's teacher-forced tokens and logits.
fn check_against(
    model: &LlamaModel,
    snapshot: &HotSnapshot,
    reference: &serde_json::Value,
    adapter: Option<SlotIdx>,
) -> Vec<(Vec<u32>, Vec<f32>)> {
    let vocab = model.dims().vocab_size;
    let mut out = Vec::new();
    let mut worst = 0f32;
    for p in reference["prompts"].as_array().unwrap() {
        let run = TeacherForced::run(model, snapshot, p, adapter);
        let name = run.name;
        let got: Vec<u32> = (0..32).map(|i| run.argmax(i)).collect();
        assert_eq!(got, run.want, "{name}: greedy ids (adapter {adapter:?})");

        let step1 = run.row(0);
        let want_ids = ids(&p["step1_top10"]["ids"]);
        let mut order: Vec<u32> = (0..vocab as u32).collect();
        order.sort_by(|&a, &b| step1[b as usize].total_cmp(&step1[a as usize]));
        assert_eq!(order[..10], want_ids[..], "{name}: step-1 top-10 ids");
        let err = p["step1_top10"]["values"]
            .as_array()
            .unwrap()
            .iter()
            .zip(&want_ids)
            .map(|(v, &id)| (step1[id as usize] - v.as_f64().unwrap() as f32).abs())
            .fold(0f32, f32::max);
        println!(
            "{name} (adapter {adapter:?}): 32/32 greedy ids, step-1 top-10 max |Δ| = {err:.2e}"
        );
        worst = worst.max(err);
        out.push((run.toks, run.logits));
    }
    assert!(
        worst <= TOP10_TOL,
        "step-1 top-10 error {worst} > {TOP10_TOL}"
    );
    out
}

#[test]
fn int4_native_base_matches_the_f32_reference() {
    let test = "int4_native_base_matches_the_f32_reference";
    let (Some(base), Some(model)) = (reference_json(test, "base.json"), int4_model(test)) else {
        return;
    };
    check_against(model, &HotSnapshot::default(), &base, None);
}

#[test]
fn int4_native_lora_matches_the_f32_reference_and_is_deterministic() {
    let test = "int4_native_lora_matches_the_f32_reference_and_is_deterministic";
    let (Some(lora), Some(model)) = (reference_json(test, "lora_r16.json"), int4_model(test))
    else {
        return;
    };
    let hot = hot_adapter(model, HotFormat::default());
    let seqs = check_against(model, &hot.snapshot, &lora, Some(hot.slot));

    // Alone vs inside a mixed batch (base and adapter rows): the same bits.
    let (a, b) = (&seqs[0], &seqs[seqs.len() - 1]);
    let base_mixed = check_mixed_batch(model, &hot.snapshot, hot.slot, a, b);
    let base_alone = batch_logits(model, &hot.snapshot, &[(b.0.clone(), None)]).remove(0);
    assert_eq!(
        base_mixed, base_alone,
        "base sequence alone vs in a mixed batch"
    );
}

#[test]
fn int4_native_int8_activations_agree_with_the_f32_reference() {
    let test = "int4_native_int8_activations_agree_with_the_f32_reference";
    let (Some(base), Some(lora), Some(model)) = (
        reference_json(test, "base.json"),
        reference_json(test, "lora_r16.json"),
        int4_int8_model(test),
    ) else {
        return;
    };
    let hot = hot_adapter(model, HotFormat::default());
    let mut seqs = Vec::new();
    for (reference, adapter) in [(&base, None), (&lora, Some(hot.slot))] {
        for p in reference["prompts"].as_array().unwrap() {
            let run = TeacherForced::run(model, &hot.snapshot, p, adapter);
            let name = run.name;
            let agree = (0..32).filter(|&i| run.argmax(i) == run.want[i]).count();
            println!("{name} (adapter {adapter:?}, int8 activations): {agree}/32 greedy ids");
            assert!(
                agree >= INT8_MIN_AGREEMENT,
                "{name} (adapter {adapter:?}): {agree}/32 < {INT8_MIN_AGREEMENT}"
            );
            seqs.push((run.toks, run.logits, adapter));
        }
    }
    // Alone vs inside a mixed batch: the same bits.
    let (a, b) = (&seqs[0], &seqs[seqs.len() - 1]);
    let mixed = batch_logits(
        model,
        &hot.snapshot,
        &[(b.0.clone(), b.2), (a.0.clone(), a.2), (a.0.clone(), b.2)],
    );
    assert_eq!(mixed[0], b.1, "sequence alone vs in a mixed batch");
    assert_eq!(mixed[1], a.1, "sequence alone vs in a mixed batch");
}

/// A random r16 adapter on all seven projections (values ±0.02, alpha 32), as PEFT files.
fn random_adapter(base: &batos_lora::BaseShapes, seed: u64) -> batos_lora::AdapterFiles {
    use batos_lora::{LoraPair, LoraWeights, Projection};
    let r = 16;
    let mut state = seed;
    let mut vec = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.04
            })
            .collect()
    };
    let mut w = LoraWeights::empty(base.num_layers);
    for layer in 0..base.num_layers {
        for p in Projection::ALL {
            let (i, o) = base.dims(p);
            let pair = LoraPair {
                rank: r,
                scale: 2.0,
                a: vec(r * i),
                b: vec(o * r),
            };
            w.insert(layer, p, pair).unwrap();
        }
    }
    let config = format!(
        r#"{{"peft_type":"LORA","r":{r},"lora_alpha":32,"target_modules":["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"],"bias":"none","use_dora":false,"base_model_name_or_path":"{}"}}"#,
        base.model_name
    );
    batos_lora::AdapterFiles::from_bytes(
        config.into_bytes(),
        batos_lora::peft::to_safetensors(&w).unwrap(),
    )
}

/// Decode over many distinct adapters, the path a 64 × 64 step takes: the int8
/// activations' model with int8 hot slots, one token per adapter, so the LoRA runs
/// four adapters' streams at a time and its shrink reads the base matmul's int8 inputs.
/// Each sequence's decode logits equal, bit for bit, those it gets in the same batch
/// with every other sequence's adapter removed (its LoRA then runs as a task alone).
#[test]
fn int8_slots_over_int8_activations_decode_many_adapters_as_one_at_a_time() {
    use batos_lora::{AdapterManager, Expect, ManagerConfig, PrefetchPolicy};
    use batos_model::forward::{ForwardBatch, SeqStep};
    use batos_store::{Db, StoreConfig};
    use batos_types::{BlockId, MemoryBudget};
    use forward_common::TestCache;

    let test = "int8_slots_over_int8_activations_decode_many_adapters_as_one_at_a_time";
    let (Some(base_ref), Some(model)) = (reference_json(test, "base.json"), int4_int8_model(test))
    else {
        return;
    };
    let shapes = model.dims().lora_base_shapes("SmolLM2-135M-Instruct");
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("image"), StoreConfig::default()).unwrap();
    let adapters = 6;
    let cfg = ManagerConfig {
        max_loras: adapters,
        max_cpu_loras: adapters,
        hot_format: HotFormat::I8,
        prefetch: PrefetchPolicy::Off,
        ..ManagerConfig::default()
    };
    let mgr =
        AdapterManager::open(&db, shapes.clone(), MemoryBudget::new("host", 1 << 30), cfg).unwrap();
    let mut held = Vec::new();
    for a in 0..adapters {
        let name = format!("a{a}");
        mgr.add_files(
            &name,
            random_adapter(&shapes, 1 + a as u64),
            "test",
            Expect::Absent,
        )
        .unwrap();
        let lease = mgr.acquire(&name).unwrap();
        held.push((mgr.pin_hot(&lease).unwrap(), lease));
    }
    let snapshot = mgr.hot_snapshot();
    // Seven sequences over the reference prompts: six with their own adapter, one without.
    let prompts: Vec<Vec<u32>> = base_ref["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ids(&p["input_ids"]))
        .collect();
    let seqs: Vec<(Vec<u32>, Option<SlotIdx>)> = (0..=adapters)
        .map(|i| {
            let adapter = held.get(i).map(|(pin, _)| pin.slot());
            (prompts[i % prompts.len()].clone(), adapter)
        })
        .collect();
    let per_seq = seqs
        .iter()
        .map(|s| s.0.len() + 1)
        .max()
        .unwrap()
        .div_ceil(16);
    let mut cache = TestCache::new(model.dims(), per_seq * seqs.len(), 16);
    let table = |i: usize| -> Vec<BlockId> {
        (0..per_seq)
            .map(|b| BlockId((i * per_seq + b) as u32))
            .collect()
    };
    let step = |cache: &mut TestCache, adapters: &[Option<SlotIdx>], decode: bool| {
        let steps = seqs
            .iter()
            .zip(adapters)
            .enumerate()
            .map(|(i, ((prompt, _), a))| {
                let mut s = if decode {
                    SeqStep::new(vec![42], prompt.len(), table(i))
                } else {
                    SeqStep::new(prompt.clone(), 0, table(i))
                };
                s.adapter = *a;
                s
            })
            .collect();
        let out = model
            .forward_with_adapters(&ForwardBatch::new(steps), cache, &snapshot)
            .unwrap();
        (0..seqs.len())
            .map(|i| out.last_logits(i).unwrap().to_vec())
            .collect::<Vec<_>>()
    };
    let all: Vec<Option<SlotIdx>> = seqs.iter().map(|s| s.1).collect();
    step(&mut cache, &all, false);
    // The decode step writes each sequence's new K/V at the same place every time, from
    // the same inputs for the sequence compared, so the cache can be reused.
    let together = step(&mut cache, &all, true);
    for k in 0..adapters {
        let only: Vec<Option<SlotIdx>> = (0..seqs.len())
            .map(|i| if i == k { all[i] } else { None })
            .collect();
        let alone = step(&mut cache, &only, true);
        assert_eq!(
            together[k], alone[k],
            "sequence {k}: with five other adapters vs alone"
        );
        let none = step(&mut cache, &vec![None; seqs.len()], true);
        assert_ne!(
            together[k], none[k],
            "sequence {k}: its adapter changes its logits"
        );
    }
}
