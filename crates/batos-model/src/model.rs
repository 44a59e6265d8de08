//! Everything a model file provides, loaded in one call.

use std::path::Path;

use crate::chat_template::ChatTemplate;
use crate::config::LlamaConfig;
use crate::error::Result;
use crate::gguf::GgufFile;
use crate::tokenizer::ModelTokenizer;
use crate::weights::{LoadOptions, ModelWeights};

/// Config, weights, tokenizer and chat template of one model.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct LoadedModel {
    /// The validated config.
    pub config: LlamaConfig,
    /// The weights, checked against the config.
    pub weights: ModelWeights,
    /// The tokenizer.
    pub tokenizer: ModelTokenizer,
    /// The chat template, if the model ships one.
    pub chat_template: Option<ChatTemplate>,
}

impl LoadedModel {
    /// Imports a llama.cpp GGUF file (tokenizer and template from its metadata).
    pub fn from_gguf(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let gguf = GgufFile::open(path)?;
        let config = LlamaConfig::from_gguf(&gguf)?;
        let tokenizer = ModelTokenizer::from_gguf(gguf.metadata())?;
        let chat_template = ChatTemplate::from_gguf(gguf.metadata())?;
        let weights = ModelWeights::from_gguf(&gguf, &config, opts)?;
        Ok(LoadedModel {
            config,
            weights,
            tokenizer,
            chat_template,
        })
    }

    /// Loads an HF model directory: `config.json`, `model.safetensors` (or shards),
    /// `tokenizer.json` (+ `tokenizer_config.json`), chat template if present.
    pub fn from_hf_dir(dir: impl AsRef<Path>, opts: &LoadOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let config = LlamaConfig::from_hf_file(dir.join("config.json"))?;
        let tokenizer = ModelTokenizer::from_hf_dir(dir)?;
        let chat_template = ChatTemplate::from_hf_dir(dir)?;
        let weights = ModelWeights::from_safetensors_dir(dir, &config, opts)?;
        Ok(LoadedModel {
            config,
            weights,
            tokenizer,
            chat_template,
        })
    }
}
