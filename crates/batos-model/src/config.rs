//! The Llama-family model config: one validated struct, read from an HF `config.json` or
//! from GGUF metadata.

use std::ops::Deref;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;

/// Which member of the Llama family a checkpoint declares. They share one forward pass;
/// the variant is kept for provenance and for family-specific knobs (Mistral's window).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum ArchFamily {
    /// Llama 1/2/3, SmolLM and other `LlamaForCausalLM` checkpoints.
    Llama,
    /// `MistralForCausalLM` (Llama layout, optional sliding-window attention).
    Mistral,
}

/// RoPE frequency scaling beyond the plain `theta^(-2i/d)` schedule.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
#[non_exhaustive]
pub enum RopeScaling {
    /// Positions divided by `factor` (HF `rope_type: linear`, GGUF `rope.scaling.type = linear`).
    Linear {
        /// Position divisor.
        factor: f32,
    },
    /// Llama 3.x frequency-dependent scaling (HF `rope_type: llama3`).
    Llama3 {
        /// Scale for low frequencies.
        factor: f32,
        /// Wavelengths longer than `original_max_position_embeddings / low_freq_factor` are
        /// divided by `factor`.
        low_freq_factor: f32,
        /// Wavelengths shorter than `original_max_position_embeddings / high_freq_factor` are
        /// kept; those in between are interpolated smoothly.
        high_freq_factor: f32,
        /// The pre-training context length.
        original_max_position_embeddings: usize,
    },
}

/// The plain fields of a Llama config. Read them through [`LlamaConfig`] (which derefs to
/// this); build one here and pass it to [`LlamaConfig::new`] to have it validated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaParams {
    /// The declared family.
    pub family: ArchFamily,
    /// Transformer blocks.
    pub num_hidden_layers: usize,
    /// Residual stream width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head dimension (RoPE rotates all of it).
    pub head_dim: usize,
    /// Vocabulary size (rows of the embedding and the LM head).
    pub vocab_size: usize,
    /// Longest context the model was trained for.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f32,
    /// RoPE scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f32,
    /// Whether the LM head reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Sliding attention window (Mistral), if the model uses one.
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token, if declared.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (generation stops at any of them).
    pub eos_token_ids: Vec<u32>,
}

/// A validated Llama-family config.
///
/// ```
/// use batos_model::LlamaConfig;
/// let cfg = LlamaConfig::from_hf_json(r#"{
///   "architectures": ["LlamaForCausalLM"], "model_type": "llama",
///   "num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
///   "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
///   "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
///   "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2 }"#)?;
/// assert_eq!(cfg.head_dim, 64);
/// assert_eq!(cfg.kv_dim(), 192);
/// # Ok::<(), batos_model::ModelError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "LlamaParams", into = "LlamaParams")]
pub struct LlamaConfig {
    params: LlamaParams,
}

impl Deref for LlamaConfig {
    type Target = LlamaParams;
    fn deref(&self) -> &LlamaParams {
        &self.params
    }
}

impl From<LlamaConfig> for LlamaParams {
    fn from(c: LlamaConfig) -> Self {
        c.params
    }
}

impl TryFrom<LlamaParams> for LlamaConfig {
    type Error = ModelError;
    fn try_from(p: LlamaParams) -> Result<Self> {
        LlamaConfig::new(p)
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ModelError {
    ModelError::InvalidConfig {
        field,
        reason: reason.into(),
    }
}

const SUPPORTED_HF: &str = "LlamaForCausalLM, MistralForCausalLM (model_type llama, mistral)";
const SUPPORTED_GGUF: &str = "general.architecture = llama";

impl LlamaConfig {
    /// Validates `params`.
    pub fn new(params: LlamaParams) -> Result<Self> {
        let p = &params;
        for (field, v) in [
            ("num_hidden_layers", p.num_hidden_layers),
            ("hidden_size", p.hidden_size),
            ("intermediate_size", p.intermediate_size),
            ("num_attention_heads", p.num_attention_heads),
            ("num_key_value_heads", p.num_key_value_heads),
            ("head_dim", p.head_dim),
            ("vocab_size", p.vocab_size),
            ("max_position_embeddings", p.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(invalid(field, "must be positive"));
            }
        }
        if !p.num_attention_heads.is_multiple_of(p.num_key_value_heads) {
            return Err(invalid(
                "num_key_value_heads",
                format!(
                    "{} query heads are not a multiple of {} key/value heads",
                    p.num_attention_heads, p.num_key_value_heads
                ),
            ));
        }
        if !p.head_dim.is_multiple_of(2) {
            return Err(invalid(
                "head_dim",
                format!("{} is odd; RoPE rotates pairs", p.head_dim),
            ));
        }
        if p.vocab_size > u32::MAX as usize {
            return Err(invalid(
                "vocab_size",
                format!("{} does not fit token ids (u32)", p.vocab_size),
            ));
        }
        if !(p.rope_theta.is_finite() && p.rope_theta > 0.0) {
            return Err(invalid(
                "rope_theta",
                format!("{} is not a positive number", p.rope_theta),
            ));
        }
        if !(p.rms_norm_eps.is_finite() && p.rms_norm_eps > 0.0) {
            return Err(invalid(
                "rms_norm_eps",
                format!("{} is not a positive number", p.rms_norm_eps),
            ));
        }
        match p.rope_scaling {
            Some(RopeScaling::Linear { factor }) if !(factor.is_finite() && factor > 0.0) => {
                return Err(invalid(
                    "rope_scaling.factor",
                    format!("{factor} is not a positive number"),
                ))
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                if !(factor > 0.0 && low_freq_factor > 0.0 && high_freq_factor > low_freq_factor) {
                    return Err(invalid(
                        "rope_scaling",
                        format!("llama3 needs factor > 0 and high_freq_factor > low_freq_factor > 0, got {factor}, {low_freq_factor}, {high_freq_factor}"),
                    ));
                }
                if original_max_position_embeddings == 0 {
                    return Err(invalid(
                        "rope_scaling.original_max_position_embeddings",
                        "must be positive",
                    ));
                }
            }
            _ => {}
        }
        if p.sliding_window == Some(0) {
            return Err(invalid("sliding_window", "must be positive when set"));
        }
        for &id in p.bos_token_id.iter().chain(&p.eos_token_ids) {
            if id as usize >= p.vocab_size {
                return Err(invalid(
                    "bos/eos_token_id",
                    format!("token id {id} is outside the vocabulary ({})", p.vocab_size),
                ));
            }
        }
        Ok(LlamaConfig { params })
    }

    /// The plain fields.
    pub fn params(&self) -> &LlamaParams {
        &self.params
    }

    /// Width of all query heads together (`num_attention_heads * head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of all key (or value) heads together (`num_key_value_heads * head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Query heads per key/value head.
    pub fn gqa_group(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Reads an HF `config.json`.
    pub fn from_hf_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io("read", path, e))?;
        let raw: HfConfig = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        raw.into_config()
    }

    /// Parses the text of an HF `config.json`.
    pub fn from_hf_json(json: &str) -> Result<Self> {
        let raw: HfConfig = serde_json::from_str(json).map_err(|source| ModelError::Json {
            path: "<config.json text>".into(),
            source,
        })?;
        raw.into_config()
    }

    /// Reads the config from a GGUF file's `llama.*` metadata. The tensor table decides
    /// `tie_word_embeddings` (no `output.weight` means the head reuses `token_embd.weight`).
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let m = gguf.metadata();
        let arch = m.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(ModelError::UnknownArchitecture {
                found: arch.to_owned(),
                supported: SUPPORTED_GGUF,
            });
        }
        let k = |s: &str| format!("llama.{s}");
        let hidden_size = m.get_usize(&k("embedding_length"))?;
        let num_attention_heads = m.get_usize(&k("attention.head_count"))?;
        let num_key_value_heads = m
            .opt_usize(&k("attention.head_count_kv"))?
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0 {
            return Err(invalid("num_attention_heads", "must be positive"));
        }
        let head_dim = match m.opt_usize(&k("attention.key_length"))? {
            Some(d) => d,
            None => hidden_size / num_attention_heads,
        };
        if let Some(rot) = m.opt_usize(&k("rope.dimension_count"))? {
            if rot != head_dim {
                return Err(invalid(
                    "rope.dimension_count",
                    format!("partial rotary ({rot} of head_dim {head_dim}) is not supported"),
                ));
            }
        }
        let vocab_size = match m.opt_usize(&k("vocab_size"))? {
            Some(v) => v,
            None => m.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_scaling = match m.opt_str(&k("rope.scaling.type"))? {
            None | Some("none") => None,
            Some("linear") => {
                let factor = m.get_f64(&k("rope.scaling.factor"))? as f32;
                (factor != 1.0).then_some(RopeScaling::Linear { factor })
            }
            Some(other) => {
                return Err(ModelError::UnsupportedRopeScaling {
                    kind: other.to_owned(),
                });
            }
        };
        let mut eos_token_ids = Vec::new();
        if let Some(eos) = m.opt_u32("tokenizer.ggml.eos_token_id")? {
            eos_token_ids.push(eos);
        }
        if let Some(eot) = m.opt_u32("tokenizer.ggml.eot_token_id")? {
            if !eos_token_ids.contains(&eot) {
                eos_token_ids.push(eot);
            }
        }
        LlamaConfig::new(LlamaParams {
            family: ArchFamily::Llama,
            num_hidden_layers: m.get_usize(&k("block_count"))?,
            hidden_size,
            intermediate_size: m.get_usize(&k("feed_forward_length"))?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size,
            max_position_embeddings: m.get_usize(&k("context_length"))?,
            rope_theta: m.opt_f64(&k("rope.freq_base"))?.unwrap_or(10_000.0) as f32,
            rope_scaling,
            rms_norm_eps: m.get_f64(&k("attention.layer_norm_rms_epsilon"))? as f32,
            tie_word_embeddings: gguf.tensor("output.weight").is_none(),
            sliding_window: None,
            bos_token_id: m.opt_u32("tokenizer.ggml.bos_token_id")?,
            eos_token_ids,
        })
    }
}

/// The subset of an HF `config.json` that a Llama-family model uses.
#[derive(Deserialize)]
struct HfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    model_type: Option<String>,
    num_hidden_layers: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: usize,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5 name for `rope_scaling` (which may also carry `rope_theta`).
    rope_parameters: Option<serde_json::Value>,
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: bool,
    sliding_window: Option<usize>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<OneOrMany>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    hidden_act: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

impl HfConfig {
    fn family(&self) -> Result<ArchFamily> {
        let from_name = |s: &str| match s {
            "LlamaForCausalLM" | "llama" => Some(ArchFamily::Llama),
            "MistralForCausalLM" | "mistral" => Some(ArchFamily::Mistral),
            _ => None,
        };
        match (self.architectures.first(), &self.model_type) {
            (Some(a), _) => from_name(a).ok_or_else(|| a.clone()),
            (None, Some(t)) => from_name(t).ok_or_else(|| t.clone()),
            (None, None) => Err("<none declared>".to_owned()),
        }
        .map_err(|found| ModelError::UnknownArchitecture {
            found,
            supported: SUPPORTED_HF,
        })
    }

    fn into_config(self) -> Result<LlamaConfig> {
        let family = self.family()?;
        if self.attention_bias || self.mlp_bias {
            return Err(invalid(
                "attention_bias/mlp_bias",
                "linear biases are not supported",
            ));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(invalid(
                    "hidden_act",
                    format!("'{act}' is not supported (silu only)"),
                ));
            }
        }
        if self.num_attention_heads == 0 {
            return Err(invalid("num_attention_heads", "must be positive"));
        }
        let rope_block = self
            .rope_scaling
            .as_ref()
            .or(self.rope_parameters.as_ref())
            .filter(|v| !v.is_null());
        let rope_theta = self
            .rope_theta
            .or_else(|| {
                rope_block
                    .and_then(|v| v.get("rope_theta"))
                    .and_then(serde_json::Value::as_f64)
            })
            .unwrap_or(10_000.0) as f32;
        let rope_scaling = match rope_block {
            None => None,
            Some(v) => parse_hf_rope_scaling(v)?,
        };
        let eos_token_ids = match self.eos_token_id {
            None => Vec::new(),
            Some(OneOrMany::One(x)) => vec![x],
            Some(OneOrMany::Many(v)) => v,
        };
        // Mistral configs set sliding_window to the full context when the window is off.
        let sliding_window = self
            .sliding_window
            .filter(|&w| w < self.max_position_embeddings);
        LlamaConfig::new(LlamaParams {
            family,
            num_hidden_layers: self.num_hidden_layers,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads),
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            rope_theta,
            rope_scaling,
            rms_norm_eps: self.rms_norm_eps as f32,
            tie_word_embeddings: self.tie_word_embeddings,
            sliding_window,
            bos_token_id: self.bos_token_id,
            eos_token_ids,
        })
    }
}

fn parse_hf_rope_scaling(v: &serde_json::Value) -> Result<Option<RopeScaling>> {
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(|t| t.as_str())
        .unwrap_or("default");
    let num = |key: &'static str| -> Result<f64> {
        v.get(key)
            .and_then(serde_json::Value::as_f64)
            .ok_or_else(|| {
                invalid(
                    "rope_scaling",
                    format!("rope_type '{kind}' needs numeric '{key}'"),
                )
            })
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")? as f32,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")? as f32,
            low_freq_factor: num("low_freq_factor")? as f32,
            high_freq_factor: num("high_freq_factor")? as f32,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        })),
        other => Err(ModelError::UnsupportedRopeScaling {
            kind: other.to_owned(),
        }),
    }
}
