//! What the server serves: an [`Engine`] plus the facts about its base model the HTTP
//! layer needs (name, chat template, end-of-sequence ids), and
//! [`ServedModel::from_image`], which builds all of it from a living image alone.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use batos_engine::{Engine, LoraResidency};
use batos_lora::{AdapterManager, AdapterRepository, AuditPolicy, ManagerConfig};
use batos_model::forward::{LlamaModel, WeightDType};
use batos_model::image::{model_summary, open_model_with, ModelSource};
use batos_model::{ChatTemplate, LoadedModel, Progress, SpecialTokenText};
use batos_store::{LivingImage, OpenMode, ProgressMode, StoreConfig};
use batos_types::{DType, MemoryBudget};

use crate::config::EngineSettings;
use crate::error::{Result, ServerError};

/// An engine and its base model's serving facts. Build one with
/// [`ServedModel::from_image`], or wrap an engine built by hand with
/// [`ServedModel::new`].
pub struct ServedModel {
    pub(crate) engine: Engine,
    pub(crate) name: String,
    pub(crate) chat_template: Option<ChatTemplate>,
    pub(crate) eos_token_ids: Vec<u32>,
    pub(crate) repository: Option<AdapterRepository>,
    /// Keeps the image open (and locked) while the adapter repository reads it.
    pub(crate) image: Option<LivingImage>,
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel")
            .field("name", &self.name)
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl ServedModel {
    /// Serves `engine` under `name`, with no chat template and no end-of-sequence ids
    /// until they are given.
    pub fn new(engine: Engine, name: impl Into<String>) -> Self {
        ServedModel {
            engine,
            name: name.into(),
            chat_template: None,
            eos_token_ids: Vec::new(),
            repository: None,
            image: None,
        }
    }

    /// The chat template `/v1/chat/completions` renders conversations with.
    pub fn with_chat_template(mut self, template: Option<ChatTemplate>) -> Self {
        self.chat_template = template;
        self
    }

    /// The ids that end a generation unless a request sets `ignore_eos`.
    pub fn with_eos_token_ids(mut self, mut ids: Vec<u32>) -> Self {
        ids.sort_unstable();
        ids.dedup();
        self.eos_token_ids = ids;
        self
    }

    /// The repository adapters come from (for `/v1/models` roots of image adapters).
    pub fn with_repository(mut self, repository: AdapterRepository) -> Self {
        self.repository = Some(repository);
        self
    }

    /// The served name of the base model.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Opens the living image at `dir`, its model and its adapter repository (on the
    /// same store, which stays open), and builds the engine with `settings`. `name`
    /// is the served model name (default: from the image's provenance: the GGUF file
    /// stem or HF directory name).
    pub fn from_image(
        dir: &Path,
        settings: &EngineSettings,
        name: Option<&str>,
        progress: Progress,
    ) -> Result<ServedModel> {
        let started = Instant::now();
        let image_err = |what: &'static str| {
            let path = dir.to_path_buf();
            move |e: &dyn std::fmt::Display| ServerError::Image {
                path: path.clone(),
                what,
                reason: e.to_string(),
            }
        };
        let image = LivingImage::open(
            dir,
            StoreConfig {
                open_mode: OpenMode::OpenExisting,
                progress: match progress {
                    Progress::Bar => ProgressMode::Auto,
                    _ => ProgressMode::Hidden,
                },
                ..StoreConfig::default()
            },
        )
        .map_err(|e| image_err("open")(&e))?;
        let summary = model_summary(&image).map_err(|e| image_err("model")(&e))?;
        let name = match name {
            Some(n) => n.to_owned(),
            None => default_name(&summary.provenance.source),
        };
        let loaded = open_model_with(&image, progress).map_err(|e| image_err("model")(&e))?;
        let dtype = match settings.weights {
            Some(w) => w.weight_dtype(),
            None => match loaded.weights.embed_tokens().dtype() {
                DType::F16 => WeightDType::F16,
                DType::BF16 => WeightDType::BF16,
                _ => WeightDType::F32,
            },
        };
        let LoadedModel {
            config,
            weights,
            tokenizer,
            chat_template,
            ..
        } = loaded;
        let model = LlamaModel::from_weights(&config, &weights, dtype)
            .map_err(|e| image_err("runtime model")(&e))?;
        // The runtime model holds its own copy of the matrices.
        drop(weights);
        let mut eos = config.eos_token_ids.clone();
        eos.extend(tokenizer.special_tokens().eos);

        let base = model.dims().lora_base_shapes(name.clone());
        let budget = MemoryBudget::new(
            "batos-server",
            settings
                .kv_cache_bytes
                .saturating_add(settings.max_cpu_lora_bytes),
        );
        let manager_config = ManagerConfig {
            max_loras: settings.max_loras,
            max_lora_rank: settings.max_lora_rank,
            max_cpu_loras: settings.max_cpu_loras,
            max_cpu_bytes: settings.max_cpu_lora_bytes,
            hot_format: settings.lora_dtype.hot_format(),
            audit: AuditPolicy {
                max_rank: settings.max_lora_rank,
                base_model: settings.adapter_base_check.lora(),
                ..AuditPolicy::default()
            },
            ..ManagerConfig::default()
        };
        let manager = AdapterManager::open(&image, base, budget.clone(), manager_config)
            .map_err(|e| image_err("adapter repository")(&e))?;
        let repository = manager.repository().clone();
        let residency = Arc::new(LoraResidency::new(manager));
        let engine = Engine::builder()
            .runtime_model(model, Some(tokenizer))
            .adapters(residency)
            .memory_budget(budget)
            .device(settings.device.device())
            .kv_pool_bytes(settings.kv_cache_bytes)
            .block_size(settings.block_size)
            .max_num_seqs(settings.max_num_seqs)
            .max_batch_tokens(settings.max_batch_tokens)
            .prefill_chunk(settings.prefill_chunk)
            .max_loras(settings.max_loras)
            .build()
            .map_err(ServerError::EngineStart)?;
        tracing::info!(
            image = %dir.display(),
            model = %name,
            ?dtype,
            seconds = started.elapsed().as_secs_f64(),
            "model ready"
        );
        let mut served = ServedModel::new(engine, name)
            .with_chat_template(chat_template)
            .with_eos_token_ids(eos)
            .with_repository(repository);
        served.image = Some(image);
        Ok(served)
    }

    /// The text of token `id` as the engine renders it (special tokens kept).
    pub(crate) fn token_text(&self, id: u32) -> Option<String> {
        self.engine
            .tokenizer()
            .and_then(|t| t.decode(&[id], SpecialTokenText::Keep).ok())
    }
}

/// The served name an image's provenance suggests.
fn default_name(source: &ModelSource) -> String {
    let last = |p: &str| {
        let p = Path::new(p);
        p.file_stem()
            .or_else(|| p.file_name())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "batos".into())
    };
    match source {
        ModelSource::Gguf { path, .. } => last(path),
        ModelSource::HfDir { path } => Path::new(path)
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "batos".into()),
        ModelSource::InMemory { description } => description.clone(),
        _ => "batos".into(),
    }
}
