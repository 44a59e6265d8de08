//! `batos import gguf|hf`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use batos::model::image::{import_model, import_quantized, ModelSource};
use batos::model::quant::QuantizedModel;
use batos::model::{LoadOptions, LoadedModel, Progress};
use batos::store::OpenMode;
use clap::Subcommand;

use crate::{runtime, DTypeArg, ImageArg};

#[derive(Debug, Subcommand)]
pub enum ImportSource {
    /// A llama.cpp GGUF file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K; quantized
    /// tensors are dequantized).
    Gguf {
        /// The GGUF file.
        #[arg(value_name = "PATH")]
        path: PathBuf,
        #[command(flatten)]
        image: ImageArg,
        /// Element type of the stored weights. `int4` keeps Q4_0/Q4_1 projections as
        /// int4 without requantising (Q4_1's float minima become group offsets); the
        /// embedding and norms are stored f32.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: GgufDTypeArg,
    },
    /// An HF model directory (config.json, *.safetensors, tokenizer.json).
    Hf {
        /// The model directory.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        #[command(flatten)]
        image: ImageArg,
        /// Element type of the stored weights.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DTypeArg,
    },
}

/// Element type of an imported GGUF's stored weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufDTypeArg {
    /// 32-bit floats (exact against the reference).
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
    /// The GGUF's 4-bit projections as they are (Q4_0 / Q4_1 only).
    Int4,
}

impl GgufDTypeArg {
    fn dense(self) -> Option<DTypeArg> {
        match self {
            GgufDTypeArg::F32 => Some(DTypeArg::F32),
            GgufDTypeArg::F16 => Some(DTypeArg::F16),
            GgufDTypeArg::Bf16 => Some(DTypeArg::Bf16),
            GgufDTypeArg::Int4 => None,
        }
    }
}

/// `batos import gguf PATH --dtype int4`: the 4-bit projections stored as int4.
fn import_gguf_int4(path: &Path, image: &ImageArg) -> anyhow::Result<()> {
    let started = Instant::now();
    let read = QuantizedModel::from_gguf_int4(path, Progress::Bar)
        .with_context(|| format!("cannot import GGUF {} as int4", path.display()))?;
    let read_secs = started.elapsed().as_secs_f64();
    let source = ModelSource::gguf_int4(path, &read.kept_types);
    let db = runtime::open_image(&image.image, OpenMode::CreateIfMissing)?;
    let report = import_quantized(&db, &read.model, source.clone(), Progress::Bar)
        .with_context(|| format!("cannot store the model in {}", image.image.display()))?;
    println!(
        "imported {source} into {}: {} tensors, {:.1} MiB (int4 projections, f32 embedding and norms), commit {} (read {:.1} s, store {:.1} s)",
        display(&image.image),
        report.tensors,
        report.bytes as f64 / (1 << 20) as f64,
        report.tid,
        read_secs,
        report.seconds
    );
    Ok(())
}

pub fn run(source: ImportSource) -> anyhow::Result<()> {
    let started = Instant::now();
    let (image_dir, model, source) = match source {
        ImportSource::Gguf { path, image, dtype } => {
            let Some(dtype) = dtype.dense() else {
                return import_gguf_int4(&path, &image);
            };
            let model = LoadedModel::from_gguf(&path, &opts(dtype))
                .with_context(|| format!("cannot import GGUF {}", path.display()))?;
            (image.image, model, ModelSource::gguf(&path))
        }
        ImportSource::Hf { dir, image, dtype } => {
            let model = LoadedModel::from_hf_dir(&dir, &opts(dtype))
                .with_context(|| format!("cannot import HF model directory {}", dir.display()))?;
            (image.image, model, ModelSource::hf_dir(&dir))
        }
    };
    let read_secs = started.elapsed().as_secs_f64();
    let db = runtime::open_image(&image_dir, OpenMode::CreateIfMissing)?;
    let report = import_model(&db, &model, source.clone(), Progress::Bar)
        .with_context(|| format!("cannot store the model in {}", image_dir.display()))?;
    println!(
        "imported {source} into {}: {} tensors, {:.1} MiB ({}), commit {} (read {:.1} s, store {:.1} s)",
        display(&image_dir),
        report.tensors,
        report.bytes as f64 / (1 << 20) as f64,
        model
            .weights
            .iter()
            .next()
            .map(|(_, t)| t.dtype().to_string())
            .unwrap_or_default(),
        report.tid,
        read_secs,
        report.seconds
    );
    Ok(())
}

fn opts(dtype: DTypeArg) -> LoadOptions {
    LoadOptions::default()
        .with_dtype(dtype.dtype())
        .with_progress(Progress::Bar)
}

fn display(p: &Path) -> String {
    p.display().to_string()
}
