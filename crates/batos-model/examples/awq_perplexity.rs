//! Perplexity of SmolLM2-135M-Instruct on the shipped held-out text in f32, RTN int4 and
//! AWQ int4 (same group size), the AWQ model with f32 and with int8 activations
//! (`Int4Activations`), with quantisation time and resident weight bytes: the figures
//! of docs/perf/awq.md.
//!
//! ```text
//! cargo run --release -p batos-model --example awq_perplexity -- [samples] [sample_len] [search_tokens] [grid] [clip:0|1] [group] [gptq_damp:0=off] [embed:0|1] [save_dir]
//! ```

use std::time::Instant;

use anyhow::Result;
use batos_model::forward::{Int4Activations, LlamaModel, WeightDType};
use batos_model::quant::{
    perplexity, quantize_awq, quantize_rtn, AwqConfig, Calibration, ClipSearch, Compensation,
    EmbeddingQuant, SHIPPED_CALIBRATION_TEXT, SHIPPED_HELDOUT_TEXT,
};
use batos_model::{LoadOptions, LoadedModel, Progress};

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (samples, sample_len, search, grid, clip) =
        (arg(0, 16), arg(1, 128), arg(2, 256), arg(3, 20), arg(4, 1));
    let group = arg(5, 64);
    let damp: f32 = args.get(6).and_then(|s| s.parse().ok()).unwrap_or(0.01);
    let embed = arg(7, 1);
    let window = 256;

    let model =
        LoadedModel::from_gguf(batos_model::fetch::smollm2_gguf()?, &LoadOptions::default())?;
    let heldout = model.tokenizer.encode(SHIPPED_HELDOUT_TEXT)?;
    let calib_tokens = model.tokenizer.encode(SHIPPED_CALIBRATION_TEXT)?;
    println!(
        "held-out: {} tokens, calibration text: {} tokens",
        heldout.len(),
        calib_tokens.len()
    );

    let f32_model = LlamaModel::from_weights(&model.config, &model.weights, WeightDType::F32)?;
    let f16_model = LlamaModel::from_weights(&model.config, &model.weights, WeightDType::F16)?;
    let t = Instant::now();
    let p_f32 = perplexity(&f32_model, &heldout, window)?;
    println!(
        "f32: ppl {:.4} over {} tokens ({:.1}s), weights {} bytes",
        p_f32.perplexity,
        p_f32.tokens,
        t.elapsed().as_secs_f32(),
        f32_model.weight_bytes()
    );
    println!("f16: weights {} bytes", f16_model.weight_bytes());

    // BATOS_AWQ_SKIP_RTN=1 skips the round-to-nearest baseline (for sweeps).
    if std::env::var_os("BATOS_AWQ_SKIP_RTN").is_none() {
        let t = Instant::now();
        let rtn = quantize_rtn(&model, group)?;
        let rtn_secs = t.elapsed().as_secs_f32();
        let rtn_model = LlamaModel::from_quantized(&rtn.config, &rtn.weights, WeightDType::F16)?;
        let p_rtn = perplexity(&rtn_model, &heldout, window)?;
        println!(
            "rtn g{group}: ppl {:.4} ({:+.2}% vs f32), quantise {rtn_secs:.1}s, weights {} bytes",
            p_rtn.perplexity,
            100.0 * (p_rtn.perplexity / p_f32.perplexity - 1.0),
            rtn_model.weight_bytes()
        );
    }

    let calibration = Calibration::from_tokens(&calib_tokens, sample_len, samples)?;
    let cfg = AwqConfig::default()
        .with_group_size(group)
        .with_grid(grid)
        .with_search_tokens(search)
        .with_clip(if clip == 1 {
            ClipSearch::Grid {
                grid: 20,
                max_shrink: 0.5,
            }
        } else {
            ClipSearch::Off
        })
        .with_compensation(if damp > 0.0 {
            Compensation::Gptq { damp }
        } else {
            Compensation::Off
        })
        .with_embedding(if embed == 1 {
            EmbeddingQuant::Int4
        } else {
            EmbeddingQuant::Dense
        })
        .with_progress(Progress::Bar);
    let t = Instant::now();
    let awq = quantize_awq(&model, &cfg, &calibration)?;
    let awq_secs = t.elapsed().as_secs_f32();
    let awq_model = LlamaModel::from_quantized(&awq.config, &awq.weights, WeightDType::F16)?;
    let p_awq = perplexity(&awq_model, &heldout, window)?;
    println!(
        "awq g{group} ({} calibration tokens = {samples}x{sample_len}, search {search}, grid {grid}, clip {clip}, gptq damp {damp}, int4 embedding {embed}): ppl {:.4} ({:+.2}% vs f32), quantise {awq_secs:.1}s, weights {} bytes",
        calibration.num_tokens(),
        p_awq.perplexity,
        100.0 * (p_awq.perplexity / p_f32.perplexity - 1.0),
        awq_model.weight_bytes()
    );
    drop(awq_model);
    let int8_model = LlamaModel::from_quantized_with(
        &awq.config,
        &awq.weights,
        WeightDType::F16,
        Int4Activations::Int8,
    )?;
    let t = Instant::now();
    let p_int8 = perplexity(&int8_model, &heldout, window)?;
    println!(
        "awq g{group}, int8 activations: ppl {:.4} ({:+.2}% vs f32, {:+.2}% vs f32 activations, {:.1}s), weights {} bytes",
        p_int8.perplexity,
        100.0 * (p_int8.perplexity / p_f32.perplexity - 1.0),
        100.0 * (p_int8.perplexity / p_awq.perplexity - 1.0),
        t.elapsed().as_secs_f32(),
        int8_model.weight_bytes()
    );
    drop(int8_model);
    let int4_linear: usize = awq.weights.layers.iter().map(|l| l.size_in_bytes()).sum();
    println!("int4 blocks (projections + norms): {int4_linear} bytes");
    if let Some(dir) = args.get(8) {
        awq.save_autoawq(dir)?;
        println!("saved AutoAWQ checkpoint to {dir}");
    }
    Ok(())
}
