//! Per-layer model weights with one internal naming, validated against the config.

use std::collections::HashMap;
use std::fmt;

use batos_types::DType;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::gguf::GgufFile;
use crate::tensor::Tensor;

/// A tensor inside one transformer block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum LayerTensor {
    /// RMSNorm before attention, `[hidden]`.
    AttnNorm,
    /// Query projection, `[q_dim, hidden]`.
    Q,
    /// Key projection, `[kv_dim, hidden]`.
    K,
    /// Value projection, `[kv_dim, hidden]`.
    V,
    /// Attention output projection, `[hidden, q_dim]`.
    O,
    /// RMSNorm before the MLP, `[hidden]`.
    MlpNorm,
    /// MLP gate projection, `[intermediate, hidden]`.
    Gate,
    /// MLP up projection, `[intermediate, hidden]`.
    Up,
    /// MLP down projection, `[hidden, intermediate]`.
    Down,
}

impl LayerTensor {
    /// All tensors of a block, in a fixed order.
    pub const ALL: [LayerTensor; 9] = [
        LayerTensor::AttnNorm,
        LayerTensor::Q,
        LayerTensor::K,
        LayerTensor::V,
        LayerTensor::O,
        LayerTensor::MlpNorm,
        LayerTensor::Gate,
        LayerTensor::Up,
        LayerTensor::Down,
    ];

    fn hf_suffix(self) -> &'static str {
        match self {
            LayerTensor::AttnNorm => "input_layernorm.weight",
            LayerTensor::Q => "self_attn.q_proj.weight",
            LayerTensor::K => "self_attn.k_proj.weight",
            LayerTensor::V => "self_attn.v_proj.weight",
            LayerTensor::O => "self_attn.o_proj.weight",
            LayerTensor::MlpNorm => "post_attention_layernorm.weight",
            LayerTensor::Gate => "mlp.gate_proj.weight",
            LayerTensor::Up => "mlp.up_proj.weight",
            LayerTensor::Down => "mlp.down_proj.weight",
        }
    }

    fn gguf_suffix(self) -> &'static str {
        match self {
            LayerTensor::AttnNorm => "attn_norm.weight",
            LayerTensor::Q => "attn_q.weight",
            LayerTensor::K => "attn_k.weight",
            LayerTensor::V => "attn_v.weight",
            LayerTensor::O => "attn_output.weight",
            LayerTensor::MlpNorm => "ffn_norm.weight",
            LayerTensor::Gate => "ffn_gate.weight",
            LayerTensor::Up => "ffn_up.weight",
            LayerTensor::Down => "ffn_down.weight",
        }
    }
}

/// Which weight of a Llama model a tensor is: the one internal naming that both the HF
/// and the GGUF names map to. `Display` gives the HF name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum TensorRole {
    /// Token embedding, `[vocab, hidden]`.
    TokenEmbedding,
    /// A tensor of block `layer`.
    Layer {
        /// Block index.
        layer: usize,
        /// Which tensor.
        tensor: LayerTensor,
    },
    /// Final RMSNorm, `[hidden]`.
    FinalNorm,
    /// Output projection, `[vocab, hidden]` (absent when tied to the embedding).
    LmHead,
}

impl TensorRole {
    /// The HF transformers name (`model.layers.3.self_attn.q_proj.weight`).
    pub fn hf_name(&self) -> String {
        match self {
            TensorRole::TokenEmbedding => "model.embed_tokens.weight".into(),
            TensorRole::Layer { layer, tensor } => {
                format!("model.layers.{layer}.{}", tensor.hf_suffix())
            }
            TensorRole::FinalNorm => "model.norm.weight".into(),
            TensorRole::LmHead => "lm_head.weight".into(),
        }
    }

    /// The llama.cpp GGUF name (`blk.3.attn_q.weight`).
    pub fn gguf_name(&self) -> String {
        match self {
            TensorRole::TokenEmbedding => "token_embd.weight".into(),
            TensorRole::Layer { layer, tensor } => format!("blk.{layer}.{}", tensor.gguf_suffix()),
            TensorRole::FinalNorm => "output_norm.weight".into(),
            TensorRole::LmHead => "output.weight".into(),
        }
    }

    /// Parses an HF name.
    pub fn from_hf_name(name: &str) -> Option<Self> {
        Some(match name {
            "model.embed_tokens.weight" => TensorRole::TokenEmbedding,
            "model.norm.weight" => TensorRole::FinalNorm,
            "lm_head.weight" => TensorRole::LmHead,
            _ => {
                let rest = name.strip_prefix("model.layers.")?;
                let (idx, suffix) = rest.split_once('.')?;
                let layer = parse_index(idx)?;
                let tensor = LayerTensor::ALL
                    .into_iter()
                    .find(|t| t.hf_suffix() == suffix)?;
                TensorRole::Layer { layer, tensor }
            }
        })
    }

    /// Parses a GGUF name.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        Some(match name {
            "token_embd.weight" => TensorRole::TokenEmbedding,
            "output_norm.weight" => TensorRole::FinalNorm,
            "output.weight" => TensorRole::LmHead,
            _ => {
                let rest = name.strip_prefix("blk.")?;
                let (idx, suffix) = rest.split_once('.')?;
                let layer = parse_index(idx)?;
                let tensor = LayerTensor::ALL
                    .into_iter()
                    .find(|t| t.gguf_suffix() == suffix)?;
                TensorRole::Layer { layer, tensor }
            }
        })
    }

    /// The shape `cfg` implies for this tensor (row-major).
    pub fn expected_shape(&self, cfg: &LlamaConfig) -> Vec<usize> {
        let h = cfg.hidden_size;
        match self {
            TensorRole::TokenEmbedding | TensorRole::LmHead => vec![cfg.vocab_size, h],
            TensorRole::FinalNorm => vec![h],
            TensorRole::Layer { tensor, .. } => match tensor {
                LayerTensor::AttnNorm | LayerTensor::MlpNorm => vec![h],
                LayerTensor::Q => vec![cfg.q_dim(), h],
                LayerTensor::K | LayerTensor::V => vec![cfg.kv_dim(), h],
                LayerTensor::O => vec![h, cfg.q_dim()],
                LayerTensor::Gate | LayerTensor::Up => vec![cfg.intermediate_size, h],
                LayerTensor::Down => vec![h, cfg.intermediate_size],
            },
        }
    }

    /// Every role a model with `cfg` needs, in load order.
    pub fn all_for(cfg: &LlamaConfig) -> Vec<TensorRole> {
        let mut v = vec![TensorRole::TokenEmbedding];
        for layer in 0..cfg.num_hidden_layers {
            v.extend(
                LayerTensor::ALL
                    .into_iter()
                    .map(|tensor| TensorRole::Layer { layer, tensor }),
            );
        }
        v.push(TensorRole::FinalNorm);
        if !cfg.tie_word_embeddings {
            v.push(TensorRole::LmHead);
        }
        v
    }
}

/// Layer indices are plain decimal: no sign, no leading zeros (so names map one-to-one).
fn parse_index(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for TensorRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hf_name())
    }
}

/// The weights of one transformer block.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct LayerWeights {
    /// RMSNorm before attention, `[hidden]`.
    pub attn_norm: Tensor,
    /// `[q_dim, hidden]`, HF row layout (rotate-half RoPE pairs `i` and `i + head_dim/2`).
    pub q_proj: Tensor,
    /// `[kv_dim, hidden]`, HF row layout.
    pub k_proj: Tensor,
    /// `[kv_dim, hidden]`.
    pub v_proj: Tensor,
    /// `[hidden, q_dim]`.
    pub o_proj: Tensor,
    /// RMSNorm before the MLP, `[hidden]`.
    pub mlp_norm: Tensor,
    /// `[intermediate, hidden]`.
    pub gate_proj: Tensor,
    /// `[intermediate, hidden]`.
    pub up_proj: Tensor,
    /// `[hidden, intermediate]`.
    pub down_proj: Tensor,
}

impl LayerWeights {
    /// The tensor for `t`.
    pub fn get(&self, t: LayerTensor) -> &Tensor {
        match t {
            LayerTensor::AttnNorm => &self.attn_norm,
            LayerTensor::Q => &self.q_proj,
            LayerTensor::K => &self.k_proj,
            LayerTensor::V => &self.v_proj,
            LayerTensor::O => &self.o_proj,
            LayerTensor::MlpNorm => &self.mlp_norm,
            LayerTensor::Gate => &self.gate_proj,
            LayerTensor::Up => &self.up_proj,
            LayerTensor::Down => &self.down_proj,
        }
    }
}

/// Whether long loads draw a progress bar on stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Progress {
    /// Log with `tracing` only.
    #[default]
    Hidden,
    /// Also draw an `indicatif` bar (hidden automatically when stderr is not a terminal).
    Bar,
}

/// How to load weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadOptions {
    /// Storage type of every tensor after loading (GGUF tensors are dequantized to f32 first).
    pub dtype: DType,
    /// Progress display.
    pub progress: Progress,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: DType::F32,
            progress: Progress::Hidden,
        }
    }
}

impl LoadOptions {
    /// Loads into `dtype`.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// Sets the progress display.
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }
}

pub(crate) fn progress_bar(progress: Progress, len: u64, what: &str) -> indicatif::ProgressBar {
    match progress {
        Progress::Hidden => indicatif::ProgressBar::hidden(),
        Progress::Bar => {
            let bar = indicatif::ProgressBar::new(len);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} tensors ({elapsed})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.to_owned());
            bar
        }
    }
}

/// All weights of a Llama model, each checked against the config's shapes.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelWeights {
    embed_tokens: Tensor,
    layers: Vec<LayerWeights>,
    norm: Tensor,
    lm_head: Option<Tensor>,
}

impl ModelWeights {
    /// Assembles weights from `(role, tensor)` pairs (any order), checking that every tensor
    /// the config needs is present with the implied shape. This is also how to build a
    /// synthetic model in code (iterate [`TensorRole::all_for`] and
    /// [`TensorRole::expected_shape`]), or to rebuild one read back from storage. `source` names where the tensors
    /// came from, for error messages. A `LmHead` for a tied config is dropped (some
    /// checkpoints store the tied copy).
    pub fn from_tensors(
        cfg: &LlamaConfig,
        tensors: impl IntoIterator<Item = (TensorRole, Tensor)>,
        source: &str,
    ) -> Result<Self> {
        let mut map: HashMap<TensorRole, Tensor> = HashMap::new();
        for (role, t) in tensors {
            if let TensorRole::Layer { layer, .. } = role {
                if layer >= cfg.num_hidden_layers {
                    return Err(ModelError::UnexpectedTensor {
                        name: role.hf_name(),
                        source_desc: format!(
                            "{source} (config has {} layers)",
                            cfg.num_hidden_layers
                        ),
                    });
                }
            }
            check_shape(cfg, role, t.shape())?;
            map.insert(role, t);
        }
        let mut take = |role: TensorRole| {
            map.remove(&role).ok_or_else(|| ModelError::MissingTensor {
                name: role.hf_name(),
                source_desc: source.to_owned(),
            })
        };
        let embed_tokens = take(TensorRole::TokenEmbedding)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for layer in 0..cfg.num_hidden_layers {
            let mut t = |tensor| take(TensorRole::Layer { layer, tensor });
            layers.push(LayerWeights {
                attn_norm: t(LayerTensor::AttnNorm)?,
                q_proj: t(LayerTensor::Q)?,
                k_proj: t(LayerTensor::K)?,
                v_proj: t(LayerTensor::V)?,
                o_proj: t(LayerTensor::O)?,
                mlp_norm: t(LayerTensor::MlpNorm)?,
                gate_proj: t(LayerTensor::Gate)?,
                up_proj: t(LayerTensor::Up)?,
                down_proj: t(LayerTensor::Down)?,
            });
        }
        let norm = take(TensorRole::FinalNorm)?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(take(TensorRole::LmHead)?)
        };
        Ok(ModelWeights {
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Imports a llama.cpp GGUF: every tensor is dequantized to f32, the Q and K rows are
    /// un-permuted back to HF layout (see [`unpermute_rope_rows`]), then converted to
    /// `opts.dtype`.
    pub fn from_gguf(gguf: &GgufFile, cfg: &LlamaConfig, opts: &LoadOptions) -> Result<Self> {
        let source = gguf.path().display().to_string();
        let bar = progress_bar(opts.progress, gguf.tensors().len() as u64, "import GGUF");
        let started = std::time::Instant::now();
        let mut tensors = Vec::with_capacity(gguf.tensors().len());
        for info in gguf.tensors() {
            let role = match TensorRole::from_gguf_name(&info.name) {
                Some(r) => r,
                None if info.name == "rope_freqs.weight" => {
                    return Err(ModelError::UnsupportedRopeScaling {
                        kind: "per-dimension rope_freqs tensor (Llama 3.1-style GGUF)".into(),
                    })
                }
                None => {
                    return Err(ModelError::UnexpectedTensor {
                        name: info.name.clone(),
                        source_desc: source.clone(),
                    })
                }
            };
            // Check the shape before paying for dequantization.
            check_shape(cfg, role, &info.shape())?;
            let shape = info.shape();
            let mut values = gguf.tensor_f32(info)?;
            if let TensorRole::Layer { tensor, .. } = role {
                match tensor {
                    LayerTensor::Q => unpermute_rope_rows(
                        &mut values,
                        cfg.num_attention_heads,
                        cfg.head_dim,
                        cfg.hidden_size,
                    ),
                    LayerTensor::K => unpermute_rope_rows(
                        &mut values,
                        cfg.num_key_value_heads,
                        cfg.head_dim,
                        cfg.hidden_size,
                    ),
                    _ => {}
                }
            }
            tensors.push((role, Tensor::from_f32(shape, values)?.to_dtype(opts.dtype)?));
            bar.inc(1);
        }
        bar.finish_and_clear();
        tracing::info!(path = %source, tensors = tensors.len(), dtype = %opts.dtype, secs = started.elapsed().as_secs_f32(), "imported GGUF weights");
        Self::from_tensors(cfg, tensors, &source)
    }

    /// Token embedding, `[vocab, hidden]`.
    pub fn embed_tokens(&self) -> &Tensor {
        &self.embed_tokens
    }

    /// The blocks, in order.
    pub fn layers(&self) -> &[LayerWeights] {
        &self.layers
    }

    /// Final RMSNorm, `[hidden]`.
    pub fn norm(&self) -> &Tensor {
        &self.norm
    }

    /// The output projection, `[vocab, hidden]`: the embedding itself when tied.
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Whether the output projection is the token embedding.
    pub fn is_tied(&self) -> bool {
        self.lm_head.is_none()
    }

    /// The tensor for `role` (`LmHead` of a tied model gives `None`; use [`Self::lm_head`]).
    pub fn get(&self, role: TensorRole) -> Option<&Tensor> {
        match role {
            TensorRole::TokenEmbedding => Some(&self.embed_tokens),
            TensorRole::FinalNorm => Some(&self.norm),
            TensorRole::LmHead => self.lm_head.as_ref(),
            TensorRole::Layer { layer, tensor } => self.layers.get(layer).map(|l| l.get(tensor)),
        }
    }

    /// The tensor with HF name `name`.
    pub fn get_by_name(&self, name: &str) -> Option<&Tensor> {
        TensorRole::from_hf_name(name).and_then(|r| self.get(r))
    }

    /// Every stored tensor with its role (the tied head is not repeated).
    pub fn iter(&self) -> impl Iterator<Item = (TensorRole, &Tensor)> + '_ {
        let layers = self.layers.iter().enumerate().flat_map(|(layer, lw)| {
            LayerTensor::ALL
                .into_iter()
                .map(move |tensor| (TensorRole::Layer { layer, tensor }, lw.get(tensor)))
        });
        std::iter::once((TensorRole::TokenEmbedding, &self.embed_tokens))
            .chain(layers)
            .chain(std::iter::once((TensorRole::FinalNorm, &self.norm)))
            .chain(self.lm_head.iter().map(|t| (TensorRole::LmHead, t)))
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> usize {
        self.iter().map(|(_, t)| t.as_bytes().len()).sum()
    }

    /// Converts every tensor to `dtype`.
    pub fn into_dtype(self, dtype: DType) -> Result<Self> {
        let conv = |t: Tensor| t.to_dtype(dtype);
        let layers = self
            .layers
            .into_iter()
            .map(|l| {
                Ok(LayerWeights {
                    attn_norm: conv(l.attn_norm)?,
                    q_proj: conv(l.q_proj)?,
                    k_proj: conv(l.k_proj)?,
                    v_proj: conv(l.v_proj)?,
                    o_proj: conv(l.o_proj)?,
                    mlp_norm: conv(l.mlp_norm)?,
                    gate_proj: conv(l.gate_proj)?,
                    up_proj: conv(l.up_proj)?,
                    down_proj: conv(l.down_proj)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(ModelWeights {
            embed_tokens: conv(self.embed_tokens)?,
            layers,
            norm: conv(self.norm)?,
            lm_head: self.lm_head.map(conv).transpose()?,
        })
    }
}

pub(crate) fn check_shape(cfg: &LlamaConfig, role: TensorRole, got: &[usize]) -> Result<()> {
    let expected = role.expected_shape(cfg);
    if got != expected.as_slice() {
        return Err(ModelError::ShapeMismatch {
            name: role.hf_name(),
            expected,
            got: got.to_vec(),
        });
    }
    Ok(())
}

/// Undoes llama.cpp's Q/K row permutation, in place.
///
/// HF Llama checkpoints apply RoPE with `rotate_half`: within each head, dimension `i` pairs
/// with `i + head_dim/2`. llama.cpp rotates adjacent pairs `(2i, 2i+1)` instead, so its
/// converter (`convert_hf_to_gguf.py`, `permute`) reorders each head's rows: GGUF row
/// `2i + j` of a head is HF row `j * head_dim/2 + i` (`j` in {0, 1}). This maps them back,
/// so the same weights work with an HF-style rotate-half RoPE. `n_heads` is the query head
/// count for `attn_q` and the key/value head count for `attn_k`.
pub fn unpermute_rope_rows(values: &mut [f32], n_heads: usize, head_dim: usize, row_len: usize) {
    let half = head_dim / 2;
    let head_len = head_dim * row_len;
    let mut scratch = vec![0.0f32; head_len];
    for head in values.chunks_exact_mut(head_len).take(n_heads) {
        for i in 0..half {
            for j in 0..2 {
                let src = (2 * i + j) * row_len;
                let dst = (j * half + i) * row_len;
                scratch[dst..dst + row_len].copy_from_slice(&head[src..src + row_len]);
            }
        }
        head.copy_from_slice(&scratch);
    }
}

/// The inverse of [`unpermute_rope_rows`]: HF layout to llama.cpp layout (used by tests and
/// by tools that write GGUF).
pub fn permute_rope_rows(values: &mut [f32], n_heads: usize, head_dim: usize, row_len: usize) {
    let half = head_dim / 2;
    let head_len = head_dim * row_len;
    let mut scratch = vec![0.0f32; head_len];
    for head in values.chunks_exact_mut(head_len).take(n_heads) {
        for i in 0..half {
            for j in 0..2 {
                let src = (j * half + i) * row_len;
                let dst = (2 * i + j) * row_len;
                scratch[dst..dst + row_len].copy_from_slice(&head[src..src + row_len]);
            }
        }
        head.copy_from_slice(&scratch);
    }
}
