//! LoRA conformance on the real model, SmolLM2-135M-Instruct (its Q4_1 GGUF dequantized
//! to f32), with the reference adapter `adapters/lora_r16` (r 16, alpha 32, all seven
//! projections) against ../shared/reference/lora_r16.json:
//! - step-1 logits: identical top-10 ids, values within 1e-3 with f32 and with f16 hot
//!   slots (f16 is the default), within [`TOL_BF16`] with bf16 ones;
//! - identical 32-token greedy continuations for every reference prompt, in every hot
//!   format;
//! - a mixed batch (no adapter + the adapter + the same adapter on another prompt at
//!   other positions) gives every sequence the tokens it gets alone.
//!
//! The adapter goes the production path: audited into a living image, leased, pinned
//! into a hot slot, and applied per token by `LlamaModel::forward_with_adapters`. Each
//! test prints a SKIP line when the model or the reference cannot be had.

mod common;
mod forward_common;
mod lora_common;

use std::sync::OnceLock;

use batos_lora::{HotFormat, HotSnapshot};
use batos_model::forward::{ForwardBatch, ForwardError, LlamaModel, SeqStep, WeightDType};
use batos_model::gguf::GgufFile;
use batos_model::{LlamaConfig, LoadOptions, ModelWeights};
use batos_types::{BlockId, SlotIdx};
use common::{ids, real_model, reference_json};
use forward_common::TestCache;
use lora_common::hot_adapter;

struct Real {
    model: LlamaModel,
    lora: serde_json::Value,
    base: serde_json::Value,
}

fn real(test: &str) -> Option<&'static Real> {
    static REAL: OnceLock<Option<Real>> = OnceLock::new();
    let loaded = REAL.get_or_init(|| {
        let lora = reference_json(test, "lora_r16.json")?;
        let base = reference_json(test, "base.json")?;
        let path = real_model(test)?;
        let gguf = GgufFile::open(&path).expect("open GGUF");
        let config = LlamaConfig::from_gguf(&gguf).expect("config from GGUF");
        let weights =
            ModelWeights::from_gguf(&gguf, &config, &LoadOptions::default()).expect("weights");
        let model = LlamaModel::from_weights(&config, &weights, WeightDType::F32).expect("model");
        Some(Real { model, lora, base })
    });
    if loaded.is_none() {
        println!("SKIP {test}: real model or reference unavailable (see the SKIP line above)");
    }
    loaded.as_ref()
}

/// Step-1 top-10 logit tolerance against the f32 PEFT reference with f32 and f16 hot
/// slots (measured: 1.5e-5 and 3.0e-4 at most over the three prompts).
const TOL: f32 = 1e-3;
/// The same with bf16 hot slots, 3 fewer significant bits (measured: 6.0e-3 at most).
const TOL_BF16: f32 = 1e-2;
/// The same with int8 hot slots (one scale per rank row).
const TOL_I8: f32 = 5e-2;

/// Greedy decoding of several sequences in one batch per step: the prompts prefill
/// together, then every sequence adds one token per step. Returns each sequence's
/// `steps` generated ids and its step-1 logits.
fn greedy_batch(
    model: &LlamaModel,
    snapshot: &HotSnapshot,
    seqs: &[(Vec<u32>, Option<SlotIdx>)],
    steps: usize,
) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let d = model.dims();
    let longest = seqs.iter().map(|s| s.0.len()).max().unwrap() + steps;
    let per_seq = longest.div_ceil(16);
    let mut cache = TestCache::new(d, per_seq * seqs.len(), 16);
    let tables: Vec<Vec<BlockId>> = (0..seqs.len())
        .map(|i| {
            (0..per_seq)
                .map(|b| BlockId((i * per_seq + b) as u32))
                .collect()
        })
        .collect();
    let mut out_ids: Vec<Vec<u32>> = vec![Vec::new(); seqs.len()];
    let mut step1 = Vec::new();
    let mut cached = vec![0usize; seqs.len()];
    let mut next: Vec<Vec<u32>> = seqs.iter().map(|s| s.0.clone()).collect();
    for step in 0..steps {
        let batch = ForwardBatch::new(
            seqs.iter()
                .enumerate()
                .map(|(i, (_, adapter))| {
                    let mut s = SeqStep::new(next[i].clone(), cached[i], tables[i].clone());
                    s.adapter = *adapter;
                    s
                })
                .collect(),
        );
        let out = model
            .forward_with_adapters(&batch, &mut cache, snapshot)
            .unwrap();
        for i in 0..seqs.len() {
            let logits = out.last_logits(i).unwrap();
            if step == 0 {
                step1.push(logits.to_vec());
            }
            let tok = batos_kernels::cpu::argmax(logits).unwrap() as u32;
            cached[i] += next[i].len();
            next[i] = vec![tok];
            out_ids[i].push(tok);
        }
    }
    (out_ids, step1)
}

fn top10(logits: &[f32]) -> Vec<u32> {
    let mut order: Vec<u32> = (0..logits.len() as u32).collect();
    order.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
    order.truncate(10);
    order
}

fn prompts(v: &serde_json::Value) -> &Vec<serde_json::Value> {
    v["prompts"].as_array().expect("prompts")
}

#[test]
fn lora_r16_step1_logits_and_greedy_match_reference() {
    let Some(real) = real("lora_r16_step1_logits_and_greedy_match_reference") else {
        return;
    };
    let formats = [
        ("f32", HotFormat::F32, TOL),
        ("f16", HotFormat::F16, TOL),
        ("bf16", HotFormat::BF16, TOL_BF16),
        ("i8", HotFormat::I8, TOL_I8),
        // Does the shrink's A need the precision? f32 A with bf16 B.
        (
            "f32A_bf16B",
            HotFormat {
                a: batos_lora::LoraDType::F32,
                b: batos_lora::LoraDType::BF16,
            },
            TOL_BF16,
        ),
    ];
    for (label, format, tol) in formats {
        let worst = reference_run(real, label, format);
        assert!(
            worst < tol,
            "{label}: max top-10 logit error {worst} >= {tol}"
        );
    }
}

/// Runs every reference prompt with the adapter hot in `format`; checks ids and
/// returns the largest step-1 top-10 logit error.
fn reference_run(real: &Real, label: &str, format: HotFormat) -> f32 {
    let hot = hot_adapter(&real.model, format);
    let mut worst = 0.0f32;
    for p in prompts(&real.lora) {
        let name = p["name"].as_str().unwrap();
        let input = ids(&p["input_ids"]);
        let (tokens, step1) =
            greedy_batch(&real.model, &hot.snapshot, &[(input, Some(hot.slot))], 32);
        let want_ids = ids(&p["step1_top10"]["ids"]);
        assert_eq!(
            top10(&step1[0]),
            want_ids,
            "{label} {name}: step-1 top-10 ids with the adapter"
        );
        let values = p["step1_top10"]["values"].as_array().unwrap();
        let err = want_ids
            .iter()
            .zip(values)
            .map(|(&id, v)| (step1[0][id as usize] - v.as_f64().unwrap() as f32).abs())
            .fold(0.0f32, f32::max);
        println!("{label} {name}: step-1 top-10 max |logit - reference| = {err:.2e}");
        worst = worst.max(err);
        assert_eq!(
            tokens[0],
            ids(&p["greedy_ids_32"]),
            "{label} {name}: greedy 32 ids with the adapter"
        );
    }
    worst
}

#[test]
fn mixed_batch_equals_each_sequence_alone() {
    let Some(real) = real("mixed_batch_equals_each_sequence_alone") else {
        return;
    };
    // The default hot format (f16): batching must not change any token's result.
    let hot = hot_adapter(&real.model, HotFormat::default());
    let lora = prompts(&real.lora);
    let base = prompts(&real.base);
    let fox = ids(&lora[0]["input_ids"]);
    let chat = ids(&lora[1]["input_ids"]);
    let slot = Some(hot.slot);
    // No adapter + the adapter + the same adapter on another prompt (other positions).
    let seqs = [
        (fox.clone(), None),
        (fox.clone(), slot),
        (chat.clone(), slot),
    ];
    let (mixed, mixed_step1) = greedy_batch(&real.model, &hot.snapshot, &seqs, 32);
    assert_eq!(
        mixed[0],
        ids(&base[0]["greedy_ids_32"]),
        "base sequence in the mixed batch"
    );
    assert_eq!(
        mixed[1],
        ids(&lora[0]["greedy_ids_32"]),
        "adapter sequence in the mixed batch"
    );
    assert_eq!(
        mixed[2],
        ids(&lora[1]["greedy_ids_32"]),
        "second adapter sequence in the mixed batch"
    );
    for (i, s) in seqs.iter().enumerate() {
        let (alone, alone_step1) =
            greedy_batch(&real.model, &hot.snapshot, std::slice::from_ref(s), 32);
        assert_eq!(mixed[i], alone[0], "sequence {i}: mixed batch vs alone");
        let diff = mixed_step1[i]
            .iter()
            .zip(&alone_step1[0])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!("sequence {i}: step-1 max |mixed - alone| = {diff:.2e}");
        assert!(diff < 1e-4, "sequence {i}: step-1 logits differ by {diff}");
    }
}

#[test]
fn batch_naming_an_unfilled_slot_is_a_typed_error() {
    let Some(real) = real("batch_naming_an_unfilled_slot_is_a_typed_error") else {
        return;
    };
    let d = real.model.dims();
    let mut cache = TestCache::new(d, 1, 16);
    let mut s = SeqStep::new(vec![1, 2, 3], 0, vec![BlockId(0)]);
    s.adapter = Some(SlotIdx(3));
    let batch = ForwardBatch::new(vec![s]);
    // The base-only forward refuses any slot.
    let err = real.model.forward(&batch, &mut cache).unwrap_err();
    assert!(
        matches!(err, ForwardError::AdapterUnsupported { seq: 0, .. }),
        "{err}"
    );
    // With adapters, a slot the snapshot does not fill is a kernel error naming it.
    let err = real
        .model
        .forward_with_adapters(&batch, &mut cache, &HotSnapshot::default())
        .unwrap_err();
    let ForwardError::Kernel { source, .. } = &err else {
        panic!("expected a kernel error, got {err}");
    };
    assert!(source.to_string().contains("slot 3"), "{source}");
}
