//! What the commands share: opening an image, building the runtime model from it, a KV
//! cache sized for the work, thread count, memory figures.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use batos::kv::{KvCacheConfig, KvCacheManager, KvShape};
use batos::model::forward::{Int4Activations, LlamaModel, WeightDType};
use batos::model::image::{open_base_with, BaseModel};
use batos::model::quant::{QuantizedEmbedding, QuantizedModel};
use batos::model::{ChatTemplate, LlamaConfig, LoadedModel, ModelTokenizer, Progress};
use batos::store::{LivingImage, OpenMode, ProgressMode, StoreConfig};
use batos::types::{DType, MemoryBudget};

use crate::{DTypeArg, Int4ActivationsArg};

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

/// Reads the image's model and builds the runtime model, with dense matrices in
/// `weights` (default: the stored element type; f16 beside an int4 base's projections)
/// and an int4 base's projections taking `int4_activations` (default:
/// [`Int4Activations::default`]; f32 on a CUDA device, which has no int8 path).
pub fn load(
    image_dir: &Path,
    weights: Option<DTypeArg>,
    int4_activations: Option<Int4ActivationsArg>,
    cuda: bool,
) -> anyhow::Result<Runtime> {
    let started = Instant::now();
    let db = open_image(image_dir, OpenMode::OpenExisting)?;
    let base = open_base_with(&db, Progress::Bar)
        .with_context(|| format!("cannot load the model from {}", image_dir.display()))?;
    // The image's lock is not needed once the model is in memory.
    drop(db);
    let stored_dtype = |d: DType| match d {
        DType::F16 => WeightDType::F16,
        DType::BF16 => WeightDType::BF16,
        _ => WeightDType::F32,
    };
    let (model, config, tokenizer, chat_template) = match base {
        BaseModel::Dense(loaded) => {
            let dtype = weights.map_or_else(
                || stored_dtype(loaded.weights.embed_tokens().dtype()),
                DTypeArg::weight_dtype,
            );
            let model = LlamaModel::from_weights(&loaded.config, &loaded.weights, dtype)
                .context("cannot build the runtime model")?;
            tracing::info!(?dtype, "runtime model ready");
            let LoadedModel {
                config,
                tokenizer,
                chat_template,
                ..
            } = loaded;
            (model, config, tokenizer, chat_template)
        }
        BaseModel::Int4(q) => {
            let dtype = match (&q.weights.embed_tokens, weights) {
                (_, Some(w)) => w.weight_dtype(),
                (QuantizedEmbedding::Dense(t), None) => stored_dtype(t.dtype()),
                (_, None) => WeightDType::F16,
            };
            let activations = match (int4_activations, cuda) {
                (Some(a), _) => a.mode(),
                (None, true) => Int4Activations::F32,
                (None, false) => Int4Activations::default(),
            };
            let model = LlamaModel::from_quantized_with(&q.config, &q.weights, dtype, activations)
                .context("cannot build the int4 runtime model")?;
            tracing::info!(dense = ?dtype, group = q.weights.group_size, ?activations, "int4 runtime model ready");
            let QuantizedModel {
                config,
                tokenizer,
                chat_template,
                ..
            } = q;
            (model, config, tokenizer, chat_template)
        }
        other => anyhow::bail!(
            "unsupported base model kind in {}: {other:?}",
            image_dir.display()
        ),
    };
    // The runtime model holds its own copy: the loaded one is gone; hand its pages back
    // to the OS.
    release_free_memory();
    let load_seconds = started.elapsed().as_secs_f64();
    tracing::info!(seconds = load_seconds, "model loaded");
    Ok(Runtime {
        config,
        model,
        tokenizer,
        chat_template,
        load_seconds,
    })
}

/// Returns freed heap pages to the OS. glibc keeps the pages of freed mid-sized blocks
/// (the per-tensor copies made while loading) for reuse, which would otherwise inflate
/// the resident size for the rest of the run.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim only walks glibc's own allocator state, under its lock; it takes
    // no pointers from us and is safe to call at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

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

/// Sets the number of threads the kernels use. The default pool (batos-kernels' spin
/// pool) has one thread per available core; another count runs the kernels on a rayon
/// pool of that size instead.
pub fn set_threads(threads: Option<usize>) -> anyhow::Result<()> {
    use batos::kernels::cpu;
    let Some(n) = threads else {
        return Ok(());
    };
    anyhow::ensure!(n >= 1, "--threads must be at least 1");
    if n != cpu::num_threads() {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("cannot size the thread pool")?;
        cpu::set_thread_backend(cpu::ThreadBackend::Rayon);
    }
    tracing::info!(threads = cpu::num_threads(), backend = ?cpu::thread_backend(), "kernel threads");
    Ok(())
}

/// Threads the kernels use and the pool they run on, for reports.
pub fn threads_description() -> String {
    use batos::kernels::cpu;
    format!(
        "{} threads ({:?} pool)",
        cpu::num_threads(),
        cpu::thread_backend()
    )
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

/// CPU time, in seconds, that the whole machine (`/proc/stat`) and this process
/// (`/proc/self/stat`) have used so far. Both count in USER_HZ ticks, 100 per second on
/// Linux.
fn cpu_seconds() -> Option<(f64, f64)> {
    const USER_HZ: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq: everything but idle and iowait is busy.
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name start with the state (field 3);
    // utime and stime are fields 14 and 15. Some fields before them can be -1.
    let rest = own.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let mine = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some((busy as f64 / USER_HZ, mine as f64 / USER_HZ))
}

/// Measures how busy the rest of the machine was while something ran: the other
/// processes' CPU time divided by the wall time (0 on an idle machine, 2.0 = two
/// cores' worth of competition).
pub struct Contention {
    start: Option<(f64, f64)>,
    wall: std::time::Instant,
}

impl Contention {
    /// Starts measuring.
    pub fn start() -> Self {
        Contention {
            start: cpu_seconds(),
            wall: std::time::Instant::now(),
        }
    }

    /// Other processes' average number of busy cores since `start`, if readable.
    pub fn other_cores(&self) -> Option<f64> {
        let (busy0, own0) = self.start?;
        let (busy1, own1) = cpu_seconds()?;
        let wall = self.wall.elapsed().as_secs_f64();
        (wall > 0.0).then(|| (((busy1 - busy0) - (own1 - own0)) / wall).max(0.0))
    }
}
