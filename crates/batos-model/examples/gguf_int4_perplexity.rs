//! Perplexity of SmolLM2-135M-Instruct on the shipped held-out text: the Q4_1 GGUF
//! dequantised to f32 (the reference) vs the same GGUF's 4-bit projections kept as int4
//! (`QuantizedModel::from_gguf_int4`, group offsets for Q4_1's minima), with the dense
//! embedding/head in f32 and in f16, and the resident weight bytes of each: the figures of
//! docs/perf/awq.md ("GGUF 4-bit kept as int4").
//!
//! ```text
//! cargo run --release -p batos-model --example gguf_int4_perplexity -- [window]
//! ```

use std::time::Instant;

use anyhow::Result;
use batos_model::forward::{Int4Activations, LlamaModel, WeightDType};
use batos_model::quant::{perplexity, QuantizedModel, SHIPPED_HELDOUT_TEXT};
use batos_model::{LoadOptions, LoadedModel, Progress};

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let window: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(256);
    let path = batos_model::fetch::smollm2_gguf()?;
    let model = LoadedModel::from_gguf(&path, &LoadOptions::default())?;
    let heldout = model.tokenizer.encode(SHIPPED_HELDOUT_TEXT)?;
    println!("held-out: {} tokens, window {window}", heldout.len());

    let f32_model = LlamaModel::from_weights(&model.config, &model.weights, WeightDType::F32)?;
    let t = Instant::now();
    let p_f32 = perplexity(&f32_model, &heldout, window)?;
    println!(
        "f32 (GGUF dequantised): ppl {:.4} over {} tokens ({:.1}s), weights {} bytes",
        p_f32.perplexity,
        p_f32.tokens,
        t.elapsed().as_secs_f32(),
        f32_model.weight_bytes()
    );
    drop(f32_model);
    drop(model);

    let t = Instant::now();
    let read = QuantizedModel::from_gguf_int4(&path, Progress::Bar)?;
    println!(
        "int4-native import: kept {:?} in {:.1}s",
        read.kept_types,
        t.elapsed().as_secs_f32()
    );
    let q = read.model;
    let modes = [
        (WeightDType::F32, Int4Activations::F32),
        (WeightDType::F16, Int4Activations::F32),
        (WeightDType::F16, Int4Activations::Int8),
    ];
    for (dense, act) in modes {
        let m = LlamaModel::from_quantized_with(&q.config, &q.weights, dense, act)?;
        let t = Instant::now();
        let p = perplexity(&m, &heldout, window)?;
        println!(
            "int4-native, embedding {dense:?}, {act:?} activations: ppl {:.4} ({:+.3}% vs f32, {:.1}s), weights {} bytes",
            p.perplexity,
            100.0 * (p.perplexity / p_f32.perplexity - 1.0),
            t.elapsed().as_secs_f32(),
            m.weight_bytes()
        );
    }
    let blocks: usize = q.weights.layers.iter().map(|l| l.size_in_bytes()).sum();
    println!("int4 blocks (codes, zeros, scales, f16 offsets, norms): {blocks} bytes");
    Ok(())
}
