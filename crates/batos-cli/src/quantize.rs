//! `batos quantize --awq --image DIR`: AWQ int4 of the image's base model, stored as the
//! image's new current base in one commit (the earlier base stays in history until a
//! pack).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use batos::model::image::{
    import_quantized, model_summary, open_base_with, BaseModel, ModelSource,
};
use batos::model::quant::{
    quantize_awq, AwqConfig, Calibration, ClipSearch, Compensation, EmbeddingQuant,
    SHIPPED_CALIBRATION_TEXT,
};
use batos::model::Progress;
use batos::store::OpenMode;
use clap::ValueEnum;

use crate::{runtime, ImageArg};

/// Error compensation after the AWQ scale search.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompensationArg {
    /// Round each weight independently (AutoAWQ).
    Off,
    /// GPTQ: spread each column's rounding error over the later columns.
    Gptq,
}

/// How the tied embedding/head is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EmbeddingArg {
    /// Unchanged (f16 or whatever the base stores).
    Dense,
    /// int4 like the projections when the head is tied to it (else unchanged).
    Int4,
}

#[derive(Debug, clap::Args)]
pub struct QuantizeArgs {
    #[command(flatten)]
    image: ImageArg,
    /// Activation-aware weight quantisation to int4 (the only method).
    #[arg(long, required = true)]
    awq: bool,
    /// Inputs sharing one scale and zero point (must divide every projection's input
    /// width).
    #[arg(long, default_value_t = 32)]
    group: usize,
    /// Calibration text (UTF-8); default: the public-domain text shipped with batos.
    #[arg(long, value_name = "FILE")]
    calibration: Option<PathBuf>,
    /// Calibration samples at most.
    #[arg(long, default_value_t = 16)]
    samples: usize,
    /// Tokens per calibration sample.
    #[arg(long, default_value_t = 128)]
    sample_len: usize,
    /// Calibration tokens the scale and clipping searches evaluate on.
    #[arg(long, default_value_t = 256)]
    search_tokens: usize,
    /// Points of the scaling-exponent grid.
    #[arg(long, default_value_t = 20)]
    grid: usize,
    /// Skip the per-group clipping/zero-point search.
    #[arg(long)]
    no_clip: bool,
    /// Error compensation.
    #[arg(long, value_enum, default_value = "gptq")]
    compensation: CompensationArg,
    /// How the tied embedding/head is stored (int4 brings SmolLM2 under 30 % of its
    /// f16 bytes: docs/perf/awq.md).
    #[arg(long, value_enum, default_value = "int4")]
    embedding: EmbeddingArg,
}

pub fn run(args: &QuantizeArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.awq, "choose a method: --awq");
    let started = Instant::now();
    let dir = &args.image.image;
    let db = runtime::open_image(dir, OpenMode::OpenExisting)?;
    let summary = model_summary(&db)
        .with_context(|| format!("cannot read the model in {}", dir.display()))?;
    let base = match open_base_with(&db, Progress::Bar)
        .with_context(|| format!("cannot load the model from {}", dir.display()))?
    {
        BaseModel::Dense(m) => m,
        BaseModel::Int4(_) => anyhow::bail!(
            "the base model in {} is already int4 ({}); import a dense model first",
            dir.display(),
            summary.provenance.source
        ),
        other => anyhow::bail!(
            "unsupported base model kind in {}: {other:?}",
            dir.display()
        ),
    };
    let text = match &args.calibration {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the calibration text {}", path.display()))?,
        None => SHIPPED_CALIBRATION_TEXT.to_owned(),
    };
    let calibration = Calibration::from_text(&base.tokenizer, &text, args.sample_len, args.samples)
        .context("cannot build the calibration set")?;
    let clip = if args.no_clip {
        ClipSearch::Off
    } else {
        ClipSearch::Grid {
            grid: 20,
            max_shrink: 0.5,
        }
    };
    let compensation = match args.compensation {
        CompensationArg::Off => Compensation::Off,
        CompensationArg::Gptq => Compensation::Gptq { damp: 0.01 },
    };
    let embedding = match args.embedding {
        EmbeddingArg::Dense => EmbeddingQuant::Dense,
        EmbeddingArg::Int4 => EmbeddingQuant::Int4,
    };
    let cfg = AwqConfig::default()
        .with_group_size(args.group)
        .with_grid(args.grid)
        .with_search_tokens(args.search_tokens)
        .with_clip(clip)
        .with_compensation(compensation)
        .with_embedding(embedding)
        .with_progress(Progress::Bar);
    tracing::info!(
        image = %dir.display(),
        group = args.group,
        calibration_tokens = calibration.num_tokens(),
        ?cfg,
        "AWQ quantisation starts"
    );
    let q = quantize_awq(&base, &cfg, &calibration).context("AWQ quantisation failed")?;
    let quant_secs = started.elapsed().as_secs_f64();
    drop(base);
    let source = ModelSource::Awq {
        base: summary.provenance.source.to_string(),
        group_size: args.group as u64,
        calibration_tokens: calibration.num_tokens() as u64,
    };
    let report = import_quantized(&db, &q, source, Progress::Bar)
        .with_context(|| format!("cannot store the int4 model in {}", dir.display()))?;
    println!(
        "quantized {} to AWQ int4 (group {}, {} calibration tokens): {} tensors, {:.1} MiB (was {:.1} MiB), commit {} (quantize {:.1} s, store {:.1} s)",
        dir.display(),
        args.group,
        calibration.num_tokens(),
        report.tensors,
        report.bytes as f64 / (1 << 20) as f64,
        summary.bytes as f64 / (1 << 20) as f64,
        report.tid,
        quant_secs,
        report.seconds
    );
    Ok(())
}
