//! What the commands share: opening an image, building the runtime model from it, a KV
//! cache sized for the work, thread count, memory figures.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use batos::kv::{KvCacheConfig, KvCacheManager, KvShape};
use batos::model::forward::{LlamaModel, WeightDType};
use batos::model::image::open_model_with;
use batos::model::{ChatTemplate, LlamaConfig, ModelTokenizer, Progress};
use batos::store::{LivingImage, OpenMode, ProgressMode, StoreConfig};
use batos::types::{DType, MemoryBudget};

use crate::DTypeArg;

/// Opens the living image at `dir`.
pub fn open_image(dir: &Path, mode: OpenMode) -> anyhow::Result<LivingImage> {
    let config = StoreConfig {
        open_mode: mode,
        progress: ProgressMode::Auto,
        ..StoreConfig::default()
    };
    LivingImage::open(dir, config)
        .with_context(|| format!("cannot open the living image {}", dir.display()))
}

/// The runtime model and what goes with it, read from an image.
pub struct Runtime {
    pub config: LlamaConfig,
    pub model: LlamaModel,
    pub tokenizer: ModelTokenizer,
    pub chat_template: Option<ChatTemplate>,
    /// Seconds to read the image and build the runtime model.
    pub load_seconds: f64,
}

/// Reads the image's model and builds the runtime model, with matrices in `weights`
/// (default: the stored element type).
pub fn load(image_dir: &Path, weights: Option<DTypeArg>) -> anyhow::Result<Runtime> {
    let started = Instant::now();
    let db = open_image(image_dir, OpenMode::OpenExisting)?;
    let loaded = open_model_with(&db, Progress::Bar)
        .with_context(|| format!("cannot load the model from {}", image_dir.display()))?;
    // The image's lock is not needed once the model is in memory.
    drop(db);
    let dtype = match weights {
        Some(w) => w.weight_dtype(),
        None => match loaded.weights.embed_tokens().dtype() {
            DType::F16 => WeightDType::F16,
            DType::BF16 => WeightDType::BF16,
            _ => WeightDType::F32,
        },
    };
    let model = LlamaModel::from_weights(&loaded.config, &loaded.weights, dtype)
        .context("cannot build the runtime model")?;
    let load_seconds = started.elapsed().as_secs_f64();
    tracing::info!(seconds = load_seconds, ?dtype, "runtime model ready");
    // `loaded.weights` is dropped here: the runtime model holds its own copy.
    Ok(Runtime {
        config: loaded.config,
        model,
        tokenizer: loaded.tokenizer,
        chat_template: loaded.chat_template,
        load_seconds,
    })
}

/// A KV cache with room for `sequences` sequences of up to `tokens` tokens each.
pub fn kv_cache(
    model: &LlamaModel,
    sequences: usize,
    tokens: usize,
) -> anyhow::Result<KvCacheManager> {
    let d = model.dims();
    let shape = KvShape {
        num_layers: d.num_layers,
        num_kv_heads: d.num_kv_heads,
        head_dim: d.head_dim,
    };
    let per_seq = tokens.div_ceil(KvCacheConfig::DEFAULT_BLOCK_SIZE) + 1;
    let config = KvCacheConfig::new(shape, 1 << 20)
        .and_then(|c| c.with_num_blocks(per_seq * sequences.max(1)))
        .context("KV cache configuration")?;
    let budget = MemoryBudget::new("batos-cli", u64::MAX / 2);
    KvCacheManager::new(config, &budget).context("cannot allocate the KV cache")
}

/// Sets the number of threads the kernels use (rayon's global pool); `None` keeps one per
/// core.
pub fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(n) = threads {
        anyhow::ensure!(n >= 1, "--threads must be at least 1");
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot size the thread pool")?;
    }
    Ok(())
}

/// A `/proc/self/status` field in KiB (Linux), e.g. `VmHWM` (peak RSS) or `VmRSS`.
pub fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Resets the peak-RSS counter (`VmHWM`) to the current RSS (Linux 4.0+), so a later
/// reading covers only what follows. Returns whether it worked.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}
