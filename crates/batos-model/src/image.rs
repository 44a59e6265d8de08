//! The model inside the living image: import once, then open from the image alone.
//!
//! [`import_model`] writes a [`LoadedModel`] into a [`LivingImage`] in one transaction:
//!
//! - a [`ModelRecord`] under the named root [`MODEL_ROOT`] — the *current* base model;
//! - its config, tokenizer (HF JSON plus special tokens), chat template and
//!   [`Provenance`] as objects it refers to;
//! - one [`TensorRecord`] object per weight tensor (name, dtype, shape), each pointing to a
//!   streaming, checksummed blob with the tensor's little-endian bytes.
//!
//! Re-importing (or, later, quantizing) writes a new record and moves the root in one
//! commit; the old record stays reachable through history (`Db::snapshot_at`) until a
//! pack. Tensor records are separate objects so a later base (e.g. AWQ) can share the
//! records of the tensors it does not change.
//!
//! [`open_model`] reads everything back with no other file: the store checks every blob
//! chunk's checksum and the whole-blob hash; this module checks dtype, shape and byte
//! length against the record and the shapes against the config. Every problem is an
//! [`ImageError`] naming the tensor or object at fault.
//!
//! ```no_run
//! use batos_model::image::{import_model, open_model, ModelSource};
//! use batos_model::{LoadOptions, LoadedModel, Progress};
//! use batos_store::{Db, StoreConfig};
//!
//! let gguf = batos_model::fetch::smollm2_gguf()?;
//! let model = LoadedModel::from_gguf(&gguf, &LoadOptions::default())?;
//! let image = Db::open("/tmp/batos-image", StoreConfig::default())?;
//! import_model(&image, &model, ModelSource::gguf(&gguf), Progress::Bar)?;
//! let back = open_model(&image)?;
//! assert_eq!(back.weights, model.weights);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use batos_store::{BlobRef, LivingImage, Ref, StoreError, Tid, Txn};
use batos_types::DType;
use half::{bf16, f16};
use serde::{Deserialize, Serialize};

use crate::chat_template::ChatTemplate;
use crate::config::LlamaConfig;
use crate::error::ModelError;
use crate::model::LoadedModel;
use crate::quant::{QuantError, QuantizedModel, QuantizedWeights};
use crate::tensor::{Tensor, TensorData};
use crate::tokenizer::ModelTokenizer;
use crate::weights::{ModelWeights, Progress, TensorRole};

/// The named root that points to the current base model's [`ModelRecord`].
pub const MODEL_ROOT: &str = "model";

/// Errors of storing a model in, or reading it from, the living image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// The image holds no model (nothing under the root [`MODEL_ROOT`]).
    #[error("the living image at {} holds no model (no '{MODEL_ROOT}' root); import one first (`batos import gguf PATH --image DIR`)", image.display())]
    NoModel {
        /// The image directory.
        image: PathBuf,
    },
    /// A tensor's blob failed the store's checks (checksum, hash, truncation, missing file).
    #[error("tensor '{tensor}' in the living image is unreadable: {source}")]
    CorruptTensor {
        /// The tensor's HF name.
        tensor: String,
        /// What the store found.
        #[source]
        source: StoreError,
    },
    /// A tensor's stored dtype, shape or byte length disagrees with its record or the config.
    #[error("tensor '{tensor}' in the living image: {detail}")]
    TensorMismatch {
        /// The tensor's HF name.
        tensor: String,
        /// Expected versus found.
        detail: String,
    },
    /// A stored object (config, tokenizer, template) does not decode into its model type.
    #[error("stored {what} is invalid: {source}")]
    BadObject {
        /// Which object.
        what: &'static str,
        /// Why it was rejected.
        #[source]
        source: ModelError,
    },
    /// The image's base is int4: [`open_model`] returns dense models only; use
    /// [`open_base`].
    #[error("the base model in the living image at {} is int4 (AWQ); it opens with open_base, not as a dense model", image.display())]
    QuantizedBase {
        /// The image directory.
        image: PathBuf,
    },
    /// The image's int4 tensors do not form a valid quantised model.
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// The model itself is not storable (e.g. a tensor dtype the image cannot hold).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The store failed (I/O, corruption of object records, conflicts exhausted).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Result alias of this module.
pub type Result<T, E = ImageError> = std::result::Result<T, E>;

/// Where an imported model came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ModelSource {
    /// A llama.cpp GGUF file.
    Gguf {
        /// The file (as given at import time).
        path: String,
        /// Its size in bytes, if it could be read.
        file_bytes: Option<u64>,
    },
    /// An HF model directory (config.json, safetensors, tokenizer.json).
    HfDir {
        /// The directory (as given at import time).
        path: String,
    },
    /// Built in a program (tests, synthetic models).
    InMemory {
        /// What it is.
        description: String,
    },
    /// A llama.cpp GGUF whose 4-bit projections (Q4_0 / Q4_1) were kept as int4, not
    /// requantised; Q4_1's float minima are the layers' group offsets.
    GgufInt4 {
        /// The file (as given at import time).
        path: String,
        /// Its size in bytes, if it could be read.
        file_bytes: Option<u64>,
        /// The block types kept (`Q4_1`, `Q4_0`), comma-separated.
        kept: String,
    },
    /// AWQ int4 quantisation of an earlier base of the same image.
    Awq {
        /// The earlier base's source, as it displayed.
        base: String,
        /// Inputs sharing one scale and zero point.
        group_size: u64,
        /// Calibration tokens the quantiser ran on.
        calibration_tokens: u64,
    },
}

impl ModelSource {
    /// A GGUF file; records its size.
    pub fn gguf(path: impl AsRef<Path>) -> Self {
        let path = path.as_ref();
        ModelSource::Gguf {
            path: path.display().to_string(),
            file_bytes: std::fs::metadata(path).ok().map(|m| m.len()),
        }
    }

    /// A GGUF file whose 4-bit projections of types `kept` were kept as int4.
    pub fn gguf_int4(path: impl AsRef<Path>, kept: &[crate::gguf::GgmlType]) -> Self {
        let path = path.as_ref();
        ModelSource::GgufInt4 {
            path: path.display().to_string(),
            file_bytes: std::fs::metadata(path).ok().map(|m| m.len()),
            kept: kept
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        }
    }

    /// An HF model directory.
    pub fn hf_dir(path: impl AsRef<Path>) -> Self {
        ModelSource::HfDir {
            path: path.as_ref().display().to_string(),
        }
    }

    /// A model built in a program.
    pub fn in_memory(description: impl Into<String>) -> Self {
        ModelSource::InMemory {
            description: description.into(),
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Gguf { path, .. } => write!(f, "GGUF {path}"),
            ModelSource::GgufInt4 { path, kept, .. } => {
                write!(f, "GGUF {path} ({kept} kept as int4)")
            }
            ModelSource::HfDir { path } => write!(f, "HF directory {path}"),
            ModelSource::InMemory { description } => write!(f, "in-memory model ({description})"),
            ModelSource::Awq {
                base,
                group_size,
                calibration_tokens,
            } => write!(
                f,
                "AWQ int4 (group {group_size}, {calibration_tokens} calibration tokens) of {base}"
            ),
        }
    }
}

/// How and when a model entered the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Provenance {
    /// The source.
    pub source: ModelSource,
    /// Seconds since the Unix epoch at import.
    pub imported_at_unix_s: u64,
    /// The batos-model version that imported it.
    pub importer_version: String,
}

/// Element type of a stored tensor (the image's own enum, so its encoding never changes
/// when `batos_types::DType` grows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum StoredDType {
    /// 32-bit floats.
    F32,
    /// IEEE halves.
    F16,
    /// bfloat16s.
    BF16,
    /// 32-bit words of packed int4 codes or zero points (AutoAWQ's `qweight`/`qzeros`).
    I32,
}

impl StoredDType {
    /// The runtime dtype (packed int4 words are [`DType::Int4`]).
    pub fn dtype(self) -> DType {
        match self {
            StoredDType::F32 => DType::F32,
            StoredDType::F16 => DType::F16,
            StoredDType::BF16 => DType::BF16,
            StoredDType::I32 => DType::Int4,
        }
    }

    fn st_dtype(self) -> safetensors::Dtype {
        match self {
            StoredDType::F32 => safetensors::Dtype::F32,
            StoredDType::F16 => safetensors::Dtype::F16,
            StoredDType::BF16 => safetensors::Dtype::BF16,
            StoredDType::I32 => safetensors::Dtype::I32,
        }
    }

    fn from_st_dtype(dtype: safetensors::Dtype, tensor: &str) -> Result<Self> {
        match dtype {
            safetensors::Dtype::F32 => Ok(StoredDType::F32),
            safetensors::Dtype::F16 => Ok(StoredDType::F16),
            safetensors::Dtype::BF16 => Ok(StoredDType::BF16),
            safetensors::Dtype::I32 => Ok(StoredDType::I32),
            other => Err(ModelError::UnsupportedDType {
                name: tensor.to_owned(),
                dtype: format!("{other:?}"),
            }
            .into()),
        }
    }

    fn from_dtype(dtype: DType, tensor: &str) -> Result<Self> {
        match dtype {
            DType::F32 => Ok(StoredDType::F32),
            DType::F16 => Ok(StoredDType::F16),
            DType::BF16 => Ok(StoredDType::BF16),
            other => Err(ModelError::UnsupportedDType {
                name: tensor.to_owned(),
                dtype: other.to_string(),
            }
            .into()),
        }
    }

    fn size(self) -> usize {
        match self {
            StoredDType::F32 | StoredDType::I32 => 4,
            StoredDType::F16 | StoredDType::BF16 => 2,
        }
    }
}

/// One weight tensor: its name, element type and shape, and the blob with its bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRecord {
    /// HF name (`model.layers.3.self_attn.q_proj.weight`).
    pub name: String,
    /// Element type.
    pub dtype: StoredDType,
    /// Row-major shape.
    pub shape: Vec<u64>,
    /// Little-endian element bytes.
    pub blob: BlobRef,
}

/// The config as its JSON text: self-describing, so it survives additions to
/// [`LlamaConfig`], and it keeps serde's tagged enums (rope scaling) intact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigRecord {
    /// [`LlamaConfig`] as JSON.
    pub json: String,
}

/// The tokenizer as [`ModelTokenizer::to_json`] writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerRecord {
    /// HF tokenizer JSON plus the special tokens.
    pub json: String,
}

/// The chat template's source and the BOS/EOS strings it may insert.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTemplateRecord {
    /// Jinja source.
    pub source: String,
    /// BOS string.
    pub bos_token: Option<String>,
    /// EOS string.
    pub eos_token: Option<String>,
}

/// A base model in the image. [`MODEL_ROOT`] points to the current one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    /// The validated config.
    pub config: Ref<ConfigRecord>,
    /// The tokenizer.
    pub tokenizer: Ref<TokenizerRecord>,
    /// The chat template, if the model has one.
    pub chat_template: Option<Ref<ChatTemplateRecord>>,
    /// Where it came from.
    pub provenance: Ref<Provenance>,
    /// Every stored tensor, in load order (the tied LM head is not stored twice).
    pub tensors: Vec<Ref<TensorRecord>>,
    /// Sum of the tensors' byte lengths.
    pub total_bytes: u64,
}

/// What [`import_model`] wrote.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ImportReport {
    /// The commit that made the model current.
    pub tid: Tid,
    /// The new model record.
    pub record: Ref<ModelRecord>,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Wall time of the import.
    pub seconds: f64,
}

/// A summary of the image's current model, read without touching the weight blobs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ModelSummary {
    /// The model record.
    pub record: Ref<ModelRecord>,
    /// Its config.
    pub config: LlamaConfig,
    /// Its provenance.
    pub provenance: Provenance,
    /// Number of tensors.
    pub tensors: usize,
    /// Bytes of tensor data.
    pub bytes: u64,
    /// Element types of the stored tensors, each once, in first-seen order.
    pub dtypes: Vec<StoredDType>,
    /// Whether a chat template is stored.
    pub has_chat_template: bool,
    /// Tokenizer vocabulary size (with added tokens).
    pub vocab_size: usize,
    /// Commits that changed the image's named roots, oldest first (every import is one).
    pub root_history: Vec<Tid>,
}

fn bytes_bar(progress: Progress, len: u64, what: &str) -> indicatif::ProgressBar {
    match progress {
        Progress::Hidden => indicatif::ProgressBar::hidden(),
        Progress::Bar => {
            let bar = indicatif::ProgressBar::new(len);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {elapsed})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.to_owned());
            bar
        }
    }
}

fn json_err(what: &'static str, source: serde_json::Error) -> ImageError {
    ImageError::BadObject {
        what,
        source: ModelError::Json {
            path: PathBuf::from(format!("<stored {what}>")),
            source,
        },
    }
}

/// One tensor on its way into the image.
struct PendingTensor<'a> {
    name: String,
    dtype: StoredDType,
    shape: Vec<usize>,
    bytes: std::borrow::Cow<'a, [u8]>,
}

/// What a base model brings besides its tensors.
struct ModelParts<'a> {
    config: &'a LlamaConfig,
    tokenizer: &'a ModelTokenizer,
    chat_template: Option<&'a ChatTemplate>,
}

/// Writes `model` into `image` in one transaction and makes it the current base model
/// (the root [`MODEL_ROOT`]). A model already there stays in history. Retries on a
/// conflicting commit (another writer moved a root meanwhile).
pub fn import_model(
    image: &LivingImage,
    model: &LoadedModel,
    source: ModelSource,
    progress: Progress,
) -> Result<ImportReport> {
    let tensors = model
        .weights
        .iter()
        .map(|(role, tensor)| {
            let name = role.hf_name();
            Ok(PendingTensor {
                dtype: StoredDType::from_dtype(tensor.dtype(), &name)?,
                name,
                shape: tensor.shape().to_vec(),
                bytes: std::borrow::Cow::Borrowed(tensor.as_bytes()),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let parts = ModelParts {
        config: &model.config,
        tokenizer: &model.tokenizer,
        chat_template: model.chat_template.as_ref(),
    };
    import_tensors(image, &parts, tensors, source, progress)
}

/// Writes an int4 model into `image` in one transaction and makes it the current base
/// (the root [`MODEL_ROOT`]); the earlier base stays in history until a pack. Tensors
/// are stored under AutoAWQ's names (`….qweight`/`….qzeros` as [`StoredDType::I32`],
/// `….scales` F16, norms F32, a dense embedding in its own type).
pub fn import_quantized(
    image: &LivingImage,
    model: &QuantizedModel,
    source: ModelSource,
    progress: Progress,
) -> Result<ImportReport> {
    model.weights.validate(&model.config)?;
    let tensors = model
        .weights
        .stored_tensors()
        .into_iter()
        .map(|(name, dt, shape, bytes)| {
            Ok(PendingTensor {
                dtype: StoredDType::from_st_dtype(dt, &name)?,
                name,
                shape,
                bytes: std::borrow::Cow::Owned(bytes),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let parts = ModelParts {
        config: &model.config,
        tokenizer: &model.tokenizer,
        chat_template: model.chat_template.as_ref(),
    };
    import_tensors(image, &parts, tensors, source, progress)
}

fn import_tensors(
    image: &LivingImage,
    parts: &ModelParts<'_>,
    tensors: Vec<PendingTensor<'_>>,
    source: ModelSource,
    progress: Progress,
) -> Result<ImportReport> {
    let started = Instant::now();
    let total: u64 = tensors.iter().map(|t| t.bytes.len() as u64).sum();
    let count = tensors.len();
    tracing::info!(image = %image.path().display(), %source, tensors = count, bytes = total, "storing model in the living image");
    let provenance = Provenance {
        source,
        imported_at_unix_s: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        importer_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let config_json = serde_json::to_string(parts.config).map_err(|e| json_err("config", e))?;
    let tokenizer_json = parts.tokenizer.to_json()?;
    let record = image.transact(|txn| {
        let bar = bytes_bar(progress, total, "store in image");
        let record = write_model(
            txn,
            parts,
            &tensors,
            &provenance,
            &config_json,
            &tokenizer_json,
            &bar,
        )?;
        bar.finish_and_clear();
        let r = txn.insert_new(&record)?;
        txn.set_named_root(MODEL_ROOT, r)?;
        Ok::<_, ImageError>(r)
    })?;
    // The record's first revision is the commit that made it current.
    let tid = image
        .history(record.oid())?
        .first()
        .copied()
        .unwrap_or_else(|| image.last_tid());
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(%tid, tensors = count, bytes = total, seconds, "model stored");
    Ok(ImportReport {
        tid,
        record,
        tensors: count,
        bytes: total,
        seconds,
    })
}

fn write_model(
    txn: &mut Txn,
    parts: &ModelParts<'_>,
    pending: &[PendingTensor<'_>],
    provenance: &Provenance,
    config_json: &str,
    tokenizer_json: &str,
    bar: &indicatif::ProgressBar,
) -> Result<ModelRecord> {
    let config = txn.insert_new(&ConfigRecord {
        json: config_json.to_owned(),
    })?;
    let tokenizer = txn.insert_new(&TokenizerRecord {
        json: tokenizer_json.to_owned(),
    })?;
    let chat_template = parts
        .chat_template
        .map(|t| {
            txn.insert_new(&ChatTemplateRecord {
                source: t.source().to_owned(),
                bos_token: t.bos_token().map(str::to_owned),
                eos_token: t.eos_token().map(str::to_owned),
            })
        })
        .transpose()?;
    let provenance = txn.insert_new(provenance)?;
    let mut tensors = Vec::new();
    let mut total_bytes = 0u64;
    for t in pending {
        let bytes: &[u8] = &t.bytes;
        let mut w = txn.blob_writer()?;
        // Chunked so the bar moves within big tensors (the embedding is ~100 MiB in f32).
        for chunk in bytes.chunks(4 << 20) {
            w.write_all(chunk).map_err(|e| ImageError::CorruptTensor {
                tensor: t.name.clone(),
                source: StoreError::Io {
                    op: "write tensor blob",
                    path: PathBuf::from(format!("<blob {}>", w.id())),
                    source: e,
                },
            })?;
            bar.inc(chunk.len() as u64);
        }
        let blob = w.finish()?;
        tracing::debug!(tensor = %t.name, dtype = ?t.dtype, shape = ?t.shape, bytes = bytes.len(), "tensor stored");
        total_bytes += bytes.len() as u64;
        tensors.push(txn.insert_new(&TensorRecord {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.iter().map(|&d| d as u64).collect(),
            blob,
        })?);
    }
    Ok(ModelRecord {
        config,
        tokenizer,
        chat_template,
        provenance,
        tensors,
        total_bytes,
    })
}

/// The current model record, or `None` when the image holds no model.
pub fn current_record(txn: &Txn) -> Result<Option<(Ref<ModelRecord>, ModelRecord)>> {
    match txn.named_root::<ModelRecord>(MODEL_ROOT)? {
        None => Ok(None),
        Some(r) => Ok(Some((r, txn.load(r)?))),
    }
}

/// Whether the image holds a model.
pub fn has_model(image: &LivingImage) -> Result<bool> {
    Ok(image
        .begin()
        .named_root::<ModelRecord>(MODEL_ROOT)?
        .is_some())
}

fn load_config(txn: &Txn, r: Ref<ConfigRecord>) -> Result<LlamaConfig> {
    let rec = txn.load(r)?;
    serde_json::from_str(&rec.json).map_err(|e| json_err("config", e))
}

fn record_or_missing(image: &LivingImage, txn: &Txn) -> Result<(Ref<ModelRecord>, ModelRecord)> {
    current_record(txn)?.ok_or_else(|| ImageError::NoModel {
        image: image.path().to_owned(),
    })
}

/// Describes the current model without reading its weights.
pub fn model_summary(image: &LivingImage) -> Result<ModelSummary> {
    let txn = image.begin();
    let (r, rec) = record_or_missing(image, &txn)?;
    let config = load_config(&txn, rec.config)?;
    let provenance = txn.load(rec.provenance)?;
    let tokenizer = ModelTokenizer::from_json(&txn.load(rec.tokenizer)?.json).map_err(|e| {
        ImageError::BadObject {
            what: "tokenizer",
            source: e,
        }
    })?;
    let mut dtypes = Vec::new();
    for t in &rec.tensors {
        let d = txn.load(*t)?.dtype;
        if !dtypes.contains(&d) {
            dtypes.push(d);
        }
    }
    Ok(ModelSummary {
        record: r,
        config,
        provenance,
        tensors: rec.tensors.len(),
        bytes: rec.total_bytes,
        dtypes,
        has_chat_template: rec.chat_template.is_some(),
        vocab_size: tokenizer.vocab_size(),
        root_history: image.history(batos_store::Oid::ROOT)?,
    })
}

/// A base model as the image holds it: dense (imported), or int4 (quantised with
/// `batos quantize --awq`).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum BaseModel {
    /// f32/f16/bf16 weights.
    Dense(LoadedModel),
    /// int4 projections in AutoAWQ's layout.
    Int4(QuantizedModel),
}

impl BaseModel {
    /// The config.
    pub fn config(&self) -> &LlamaConfig {
        match self {
            BaseModel::Dense(m) => &m.config,
            BaseModel::Int4(m) => &m.config,
        }
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &ModelTokenizer {
        match self {
            BaseModel::Dense(m) => &m.tokenizer,
            BaseModel::Int4(m) => &m.tokenizer,
        }
    }

    /// The chat template, if any.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        match self {
            BaseModel::Dense(m) => m.chat_template.as_ref(),
            BaseModel::Int4(m) => m.chat_template.as_ref(),
        }
    }
}

/// Whether a record's tensors are an int4 model (AutoAWQ's packed names).
fn is_int4(txn: &Txn, rec: &ModelRecord) -> Result<bool> {
    for r in &rec.tensors {
        if txn.load(*r)?.dtype == StoredDType::I32 {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Opens the current (dense) model from the image alone (no other file), checking every
/// blob (the store verifies chunk checksums and the content hash) and every shape. An
/// int4 base is [`ImageError::QuantizedBase`]: open it with [`open_base`].
pub fn open_model(image: &LivingImage) -> Result<LoadedModel> {
    open_model_with(image, Progress::Hidden)
}

/// [`open_model`] with a progress display.
pub fn open_model_with(image: &LivingImage, progress: Progress) -> Result<LoadedModel> {
    let txn = image.begin();
    let (_, rec) = record_or_missing(image, &txn)?;
    if is_int4(&txn, &rec)? {
        return Err(ImageError::QuantizedBase {
            image: image.path().to_owned(),
        });
    }
    match open_record(image, &txn, &rec, progress)? {
        BaseModel::Dense(m) => Ok(m),
        BaseModel::Int4(_) => Err(ImageError::QuantizedBase {
            image: image.path().to_owned(),
        }),
    }
}

/// Opens the current base model, dense or int4, from the image alone, with the same
/// checks as [`open_model`] (and, for int4, every packed tensor's type and shape).
pub fn open_base(image: &LivingImage) -> Result<BaseModel> {
    open_base_with(image, Progress::Hidden)
}

/// [`open_base`] with a progress display.
pub fn open_base_with(image: &LivingImage, progress: Progress) -> Result<BaseModel> {
    let txn = image.begin();
    let (_, rec) = record_or_missing(image, &txn)?;
    open_record(image, &txn, &rec, progress)
}

fn open_record(
    image: &LivingImage,
    txn: &Txn,
    rec: &ModelRecord,
    progress: Progress,
) -> Result<BaseModel> {
    let started = Instant::now();
    let config = load_config(txn, rec.config)?;
    let tokenizer = ModelTokenizer::from_json(&txn.load(rec.tokenizer)?.json).map_err(|e| {
        ImageError::BadObject {
            what: "tokenizer",
            source: e,
        }
    })?;
    let chat_template = match rec.chat_template {
        None => None,
        Some(r) => {
            let t = txn.load(r)?;
            Some(
                ChatTemplate::new(t.source, t.bos_token, t.eos_token).map_err(|e| {
                    ImageError::BadObject {
                        what: "chat template",
                        source: e,
                    }
                })?,
            )
        }
    };
    let bar = bytes_bar(progress, rec.total_bytes, "load from image");
    let source = format!("living image {}", image.path().display());
    let base = if is_int4(txn, rec)? {
        let mut tensors = Vec::with_capacity(rec.tensors.len());
        let mut group_size = None;
        for r in &rec.tensors {
            let t = txn.load(*r)?;
            let bytes = read_bytes(txn, &t)?;
            bar.inc(t.blob.len());
            let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
            if t.name == "model.layers.0.self_attn.q_proj.scales" {
                group_size = shape
                    .first()
                    .filter(|&&g| g > 0)
                    .map(|&g| config.hidden_size / g);
            }
            tensors.push((t.name, t.dtype.st_dtype(), shape, bytes));
        }
        let group_size = group_size.ok_or_else(|| ImageError::TensorMismatch {
            tensor: "model.layers.0.self_attn.q_proj.scales".into(),
            detail: "missing or empty in an int4 model: the group size is unknown".into(),
        })?;
        let weights = QuantizedWeights::from_stored(image.path(), &config, group_size, tensors)?;
        BaseModel::Int4(QuantizedModel {
            config,
            weights,
            tokenizer,
            chat_template,
        })
    } else {
        let mut tensors = Vec::with_capacity(rec.tensors.len());
        for r in &rec.tensors {
            let t = txn.load(*r)?;
            let role =
                TensorRole::from_hf_name(&t.name).ok_or_else(|| ImageError::TensorMismatch {
                    tensor: t.name.clone(),
                    detail: "no Llama weight has this name".into(),
                })?;
            let tensor = read_tensor(txn, &t)?;
            bar.inc(t.blob.len());
            tensors.push((role, tensor));
        }
        // Checks every shape against the config and that no tensor is missing.
        let weights =
            ModelWeights::from_tensors(&config, tensors, &source).map_err(|e| match e {
                ModelError::ShapeMismatch {
                    name,
                    expected,
                    got,
                } => ImageError::TensorMismatch {
                    tensor: name,
                    detail: format!("shape {got:?}, the stored config implies {expected:?}"),
                },
                other => ImageError::Model(other),
            })?;
        BaseModel::Dense(LoadedModel {
            config,
            weights,
            tokenizer,
            chat_template,
        })
    };
    bar.finish_and_clear();
    tracing::info!(
        image = %image.path().display(),
        tensors = rec.tensors.len(),
        bytes = rec.total_bytes,
        int4 = matches!(base, BaseModel::Int4(_)),
        seconds = started.elapsed().as_secs_f64(),
        "model opened from the living image"
    );
    Ok(base)
}

/// A tensor's blob as bytes, length checked against its record.
fn read_bytes(txn: &Txn, t: &TensorRecord) -> Result<Vec<u8>> {
    let n = t
        .shape
        .iter()
        .try_fold(1u64, |a, &d| a.checked_mul(d))
        .ok_or_else(|| ImageError::TensorMismatch {
            tensor: t.name.clone(),
            detail: format!("shape {:?} overflows", t.shape),
        })?;
    let want = n * t.dtype.size() as u64;
    if t.blob.len() != want {
        return Err(ImageError::TensorMismatch {
            tensor: t.name.clone(),
            detail: format!(
                "blob holds {} bytes, {:?} of shape {:?} needs {want}",
                t.blob.len(),
                t.dtype,
                t.shape
            ),
        });
    }
    let corrupt = |source: StoreError| ImageError::CorruptTensor {
        tensor: t.name.clone(),
        source,
    };
    let mut reader = txn.open_blob(&t.blob).map_err(corrupt)?;
    let mut buf = Vec::with_capacity(want as usize);
    let got = reader.copy_to(&mut buf).map_err(corrupt)?;
    if got != want {
        return Err(ImageError::TensorMismatch {
            tensor: t.name.clone(),
            detail: format!("read {got} bytes, expected {want}"),
        });
    }
    Ok(buf)
}

/// Reads one tensor's blob straight into a typed buffer (no second copy).
fn read_tensor(txn: &Txn, t: &TensorRecord) -> Result<Tensor> {
    let mismatch = |detail: String| ImageError::TensorMismatch {
        tensor: t.name.clone(),
        detail,
    };
    let shape: Vec<usize> = t
        .shape
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| mismatch(format!("shape {:?} does not fit this machine", t.shape)))?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| mismatch(format!("shape {shape:?} overflows")))?;
    let want = n as u64 * t.dtype.size() as u64;
    if t.blob.len() != want {
        return Err(mismatch(format!(
            "blob holds {} bytes, {} of shape {:?} needs {want}",
            t.blob.len(),
            t.dtype.dtype(),
            shape
        )));
    }
    let corrupt = |source: StoreError| ImageError::CorruptTensor {
        tensor: t.name.clone(),
        source,
    };
    let mut reader = txn.open_blob(&t.blob).map_err(corrupt)?;
    let mut fill = |buf: &mut [u8]| -> Result<()> {
        let mut out: &mut [u8] = buf;
        let got = reader.copy_to(&mut out).map_err(corrupt)?;
        if got != want {
            return Err(mismatch(format!("read {got} bytes, expected {want}")));
        }
        Ok(())
    };
    let data = match t.dtype {
        StoredDType::F32 => {
            let mut v = vec![0f32; n];
            fill(bytemuck::cast_slice_mut(&mut v))?;
            TensorData::F32(v)
        }
        StoredDType::F16 => {
            let mut v = vec![f16::ZERO; n];
            fill(bytemuck::cast_slice_mut(&mut v))?;
            TensorData::F16(v)
        }
        StoredDType::BF16 => {
            let mut v = vec![bf16::ZERO; n];
            fill(bytemuck::cast_slice_mut(&mut v))?;
            TensorData::BF16(v)
        }
        StoredDType::I32 => {
            return Err(mismatch(
                "packed int4 words where a dense tensor belongs".into(),
            ))
        }
    };
    Ok(Tensor::new(shape, data)?)
}

/// The current model's tensor records (name, dtype, shape, blob), in load order.
pub fn tensor_records(image: &LivingImage) -> Result<Vec<TensorRecord>> {
    let txn = image.begin();
    let (_, rec) = record_or_missing(image, &txn)?;
    rec.tensors.iter().map(|r| Ok(txn.load(*r)?)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat_template::{ChatMessage, GenerationPrompt};
    use crate::config::{ArchFamily, LlamaParams};
    use batos_store::{Db, StoreConfig};

    fn tiny_config() -> LlamaConfig {
        LlamaConfig::new(LlamaParams {
            family: ArchFamily::Llama,
            num_hidden_layers: 2,
            hidden_size: 16,
            intermediate_size: 40,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 4,
            vocab_size: 8,
            max_position_embeddings: 64,
            rope_theta: 10_000.0,
            rope_scaling: Some(crate::config::RopeScaling::Linear { factor: 2.0 }),
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            sliding_window: None,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
        })
        .unwrap()
    }

    /// A word-level tokenizer over the 8-token vocabulary.
    fn tiny_tokenizer() -> ModelTokenizer {
        let words = [
            "<unk>", "<s>", "</s>", "the", "quick", "brown", "fox", "jumps",
        ];
        let vocab: serde_json::Map<String, serde_json::Value> = words
            .iter()
            .enumerate()
            .map(|(i, w)| ((*w).to_owned(), serde_json::json!(i)))
            .collect();
        let json = serde_json::json!({
            "special_tokens": {"bos": 1, "eos": 2, "pad": null, "unk": 0, "add_bos": true, "add_eos": false},
            "tokenizer": {
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
                "post_processor": null, "decoder": null,
                "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
            }
        });
        ModelTokenizer::from_json(&json.to_string()).unwrap()
    }

    /// Distinct values per tensor, in `dtype`.
    fn tiny_model(dtype: DType) -> LoadedModel {
        let config = tiny_config();
        let tensors = TensorRole::all_for(&config)
            .into_iter()
            .enumerate()
            .map(|(r, role)| {
                let shape = role.expected_shape(&config);
                let n: usize = shape.iter().product();
                let v = (0..n)
                    .map(|i| ((i * 7 + r * 13) % 97) as f32 / 97.0 - 0.5)
                    .collect();
                (
                    role,
                    Tensor::from_f32(shape, v).unwrap().to_dtype(dtype).unwrap(),
                )
            });
        let weights = ModelWeights::from_tensors(&config, tensors, "test").unwrap();
        let template = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}",
            Some("<s>".into()),
            Some("</s>".into()),
        )
        .unwrap();
        LoadedModel {
            config,
            weights,
            tokenizer: tiny_tokenizer(),
            chat_template: Some(template),
        }
    }

    fn open_db(dir: &Path) -> Db {
        Db::open(
            dir.join("image"),
            StoreConfig {
                progress: batos_store::ProgressMode::Hidden,
                ..StoreConfig::default()
            },
        )
        .unwrap()
    }

    #[test]
    fn round_trip_is_identical_in_every_dtype() {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let dir = tempfile::tempdir().unwrap();
            let model = tiny_model(dtype);
            {
                let db = open_db(dir.path());
                assert!(!has_model(&db).unwrap());
                let report = import_model(
                    &db,
                    &model,
                    ModelSource::in_memory("tiny"),
                    Progress::Hidden,
                )
                .unwrap();
                assert_eq!(report.tensors, model.weights.iter().count());
                assert_eq!(report.bytes, model.weights.total_bytes() as u64);
            }
            // Reopen: everything comes from the image directory alone.
            let db = open_db(dir.path());
            let back = open_model(&db).unwrap();
            assert_eq!(back.config, model.config);
            assert_eq!(back.weights, model.weights);
            assert_eq!(
                back.tokenizer.to_json().unwrap(),
                model.tokenizer.to_json().unwrap()
            );
            assert_eq!(
                back.tokenizer.encode("the quick brown fox").unwrap(),
                vec![3, 4, 5, 6]
            );
            let (a, b) = (
                back.chat_template.unwrap(),
                model.chat_template.clone().unwrap(),
            );
            assert_eq!(
                (a.source(), a.bos_token(), a.eos_token()),
                (b.source(), b.bos_token(), b.eos_token())
            );
            let msgs = [ChatMessage::user("hi")];
            assert_eq!(
                a.render(&msgs, GenerationPrompt::Add).unwrap(),
                "<s>[user] hi\n"
            );
            let summary = model_summary(&db).unwrap();
            assert_eq!(
                summary.dtypes,
                vec![StoredDType::from_dtype(dtype, "x").unwrap()]
            );
            assert_eq!(summary.vocab_size, 8);
            assert!(summary.has_chat_template);
            assert_eq!(summary.provenance.source, ModelSource::in_memory("tiny"));
        }
    }

    #[test]
    fn reimport_swaps_the_base_and_history_keeps_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path());
        let first = tiny_model(DType::F32);
        let r1 =
            import_model(&db, &first, ModelSource::in_memory("one"), Progress::Hidden).unwrap();
        let second = tiny_model(DType::BF16);
        let r2 = import_model(
            &db,
            &second,
            ModelSource::in_memory("two"),
            Progress::Hidden,
        )
        .unwrap();
        assert!(r2.tid > r1.tid);
        assert_eq!(open_model(&db).unwrap().weights, second.weights);
        assert!(model_summary(&db).unwrap().root_history.len() >= 2);
        // The old base is still readable as of its commit.
        let old = db.snapshot_at(r1.tid).unwrap();
        let (r, _) = current_record(&old).unwrap().unwrap();
        assert_eq!(r, r1.record);
    }

    #[test]
    fn quantized_base_replaces_the_dense_one_and_opens_as_int4() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path());
        let dense = tiny_model(DType::F32);
        let r1 = import_model(
            &db,
            &dense,
            ModelSource::in_memory("dense"),
            Progress::Hidden,
        )
        .unwrap();
        let weights = crate::quant::quantize_weights_rtn(&dense.config, &dense.weights, 8).unwrap();
        let q = QuantizedModel {
            config: dense.config.clone(),
            weights,
            tokenizer: dense.tokenizer.clone(),
            chat_template: dense.chat_template.clone(),
        };
        let source = ModelSource::Awq {
            base: ModelSource::in_memory("dense").to_string(),
            group_size: 8,
            calibration_tokens: 0,
        };
        let r2 = import_quantized(&db, &q, source.clone(), Progress::Hidden).unwrap();
        assert!(r2.tid > r1.tid);
        match open_base(&db).unwrap() {
            BaseModel::Int4(back) => {
                assert_eq!(back.config, q.config);
                assert_eq!(back.weights, q.weights);
                assert_eq!(
                    back.chat_template.map(|t| t.source().to_owned()),
                    q.chat_template.as_ref().map(|t| t.source().to_owned())
                );
            }
            other => panic!("expected an int4 base, got {other:?}"),
        }
        assert!(matches!(
            open_model(&db),
            Err(ImageError::QuantizedBase { .. })
        ));
        let summary = model_summary(&db).unwrap();
        assert_eq!(summary.provenance.source, source);
        assert!(summary.dtypes.contains(&StoredDType::I32));
        // The dense base is still readable as of its commit, until a pack.
        let old = db.snapshot_at(r1.tid).unwrap();
        let (r, _) = current_record(&old).unwrap().unwrap();
        assert_eq!(r, r1.record);
    }

    /// Int4 layers with group offsets (GGUF Q4_1 minima) store `<proj>.qoffsets` and
    /// read back equal; an AutoAWQ checkpoint refuses them.
    #[test]
    fn int4_group_offsets_round_trip_through_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path());
        let dense = tiny_model(DType::F32);
        let mut weights =
            crate::quant::quantize_weights_rtn(&dense.config, &dense.weights, 8).unwrap();
        for (i, l) in weights.layers.iter_mut().enumerate() {
            let w = l.q_proj.clone();
            let n = w.layout().scales_len();
            let off = (0..n)
                .map(|j| half::f16::from_f32((j as f32 - i as f32) * 1e-3))
                .collect();
            l.q_proj = w.with_offsets("q", off).unwrap();
        }
        let q = QuantizedModel {
            config: dense.config.clone(),
            weights,
            tokenizer: dense.tokenizer.clone(),
            chat_template: dense.chat_template.clone(),
        };
        let source = ModelSource::gguf_int4("model.gguf", &[crate::gguf::GgmlType::Q4_1]);
        assert!(source.to_string().contains("Q4_1 kept as int4"), "{source}");
        import_quantized(&db, &q, source, Progress::Hidden).unwrap();
        let names: Vec<String> = tensor_records(&db)
            .unwrap()
            .into_iter()
            .map(|t| t.name)
            .collect();
        assert!(names.contains(&"model.layers.0.self_attn.q_proj.qoffsets".to_owned()));
        assert!(!names.iter().any(|n| n.contains("k_proj.qoffsets")));
        match open_base(&db).unwrap() {
            BaseModel::Int4(back) => assert_eq!(back.weights, q.weights),
            other => panic!("expected an int4 base, got {other:?}"),
        }
        let err = q.save_autoawq(dir.path().join("awq")).unwrap_err();
        assert!(
            matches!(&err, QuantError::OffsetsUnsupported { name, .. } if name.contains("q_proj")),
            "{err}"
        );
        assert!(!dir.path().join("awq").exists(), "nothing written");
    }

    #[test]
    fn empty_image_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path());
        match open_model(&db) {
            Err(ImageError::NoModel { image }) => assert_eq!(image, db.path()),
            other => panic!("expected NoModel, got {other:?}"),
        }
        assert!(matches!(
            model_summary(&db),
            Err(ImageError::NoModel { .. })
        ));
    }

    /// The file of `blob` inside the image (the store names blob files by their id).
    fn blob_file(db: &Db, blob: &BlobRef) -> PathBuf {
        let hex = format!("{:032x}", blob.id().get());
        std::fs::read_dir(db.path().join("blobs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&hex))
            .expect("blob file exists")
    }

    #[test]
    fn corrupt_blob_names_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path());
        import_model(
            &db,
            &tiny_model(DType::F32),
            ModelSource::in_memory("tiny"),
            Progress::Hidden,
        )
        .unwrap();
        let victim = tensor_records(&db).unwrap().into_iter().nth(5).unwrap();
        let path = blob_file(&db, &victim.blob);
        let mut bytes = std::fs::read(&path).unwrap();
        // A flipped bit in the middle of the content (past the 32-byte header).
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x10;
        std::fs::write(&path, bytes).unwrap();
        match open_model(&db) {
            Err(e @ ImageError::CorruptTensor { .. }) => {
                let ImageError::CorruptTensor { tensor, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(tensor, &victim.name);
                assert!(e.to_string().contains(&victim.name), "{e}");
            }
            other => panic!("expected CorruptTensor, got {other:?}"),
        }
    }

    #[test]
    fn missing_and_truncated_blobs_name_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path());
        import_model(
            &db,
            &tiny_model(DType::F16),
            ModelSource::in_memory("tiny"),
            Progress::Hidden,
        )
        .unwrap();
        let recs = tensor_records(&db).unwrap();
        let truncated = &recs[1];
        let p = blob_file(&db, &truncated.blob);
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 70)
            .unwrap();
        match open_model(&db) {
            Err(ImageError::CorruptTensor {
                tensor,
                source: StoreError::BlobTruncated { .. } | StoreError::BlobCorrupt { .. },
            }) => {
                assert_eq!(tensor, truncated.name)
            }
            other => panic!("expected CorruptTensor (truncated), got {other:?}"),
        }
        std::fs::remove_file(&p).unwrap();
        match open_model(&db) {
            Err(ImageError::CorruptTensor {
                tensor,
                source: StoreError::BlobMissing { .. },
            }) => {
                assert_eq!(tensor, truncated.name)
            }
            other => panic!("expected CorruptTensor (missing), got {other:?}"),
        }
    }

    #[test]
    fn record_that_disagrees_with_config_is_a_shape_error() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_db(dir.path());
        import_model(
            &db,
            &tiny_model(DType::F32),
            ModelSource::in_memory("tiny"),
            Progress::Hidden,
        )
        .unwrap();
        // Rewrite one record with a transposed shape (same byte count, so only the config
        // check can catch it).
        let mut txn = db.begin();
        let (_, rec) = current_record(&txn).unwrap().unwrap();
        let (r, mut t) = rec
            .tensors
            .iter()
            .map(|&r| (r, txn.load(r).unwrap()))
            .find(|(_, t)| t.shape.len() == 2 && t.shape[0] != t.shape[1])
            .unwrap();
        t.shape.reverse();
        let name = t.name.clone();
        txn.set(r, &t).unwrap();
        txn.commit().unwrap();
        match open_model(&db) {
            Err(ImageError::TensorMismatch { tensor, detail }) => {
                assert_eq!(tensor, name);
                assert!(detail.contains("shape"), "{detail}");
            }
            other => panic!("expected TensorMismatch, got {other:?}"),
        }
        // A record whose blob is too short for its shape is caught before reading.
        let mut txn = db.begin();
        t.shape.reverse();
        t.shape[0] += 1;
        txn.set(r, &t).unwrap();
        txn.commit().unwrap();
        match open_model(&db) {
            Err(ImageError::TensorMismatch { tensor, detail }) => {
                assert_eq!(tensor, name);
                assert!(detail.contains("bytes"), "{detail}");
            }
            other => panic!("expected TensorMismatch, got {other:?}"),
        }
    }
}
