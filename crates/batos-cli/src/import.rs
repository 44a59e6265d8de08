//! `batos import gguf|hf`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use batos::model::image::{import_model, ModelSource};
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
        /// Element type of the stored weights.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: DTypeArg,
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

pub fn run(source: ImportSource) -> anyhow::Result<()> {
    let started = Instant::now();
    let (image_dir, model, source) = match source {
        ImportSource::Gguf { path, image, dtype } => {
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
