//! The Llama decoder over a paged KV cache.

use batos_kernels::{
    AttentionHeads, Device, KernelError, Kernels, KvCache, KvCacheLayout, Llama3RopeScaling, Rope,
    RopeConfig, RopeScaling, SeqAttention,
};

use batos_kernels::cpu::{self, lora::LoraTarget};
use batos_lora::{HotSnapshot, HotTables, LoraSlots, Projection};
use batos_types::SlotIdx;

use crate::config::RopeScaling as ConfigRopeScaling;
use crate::{LlamaConfig, ModelWeights, Tensor};

use super::batch::{BatchLimits, ForwardBatch, ForwardOutput, StepPlan};
use super::cache::KvCacheMut;
use super::error::ForwardError;
use super::weights::{Int4Activations, Linear, Matrix, WeightDType};
use crate::quant::{Int4Weight, QuantError, QuantizedEmbedding, QuantizedWeights};

fn kernel(op: &'static str) -> impl FnOnce(KernelError) -> ForwardError {
    move |source| ForwardError::Kernel { op, source }
}

/// The sizes the forward pass runs with, resolved from a [`LlamaConfig`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LlamaDims {
    pub hidden_size: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub vocab_size: usize,
    /// Longest context (`max_position_embeddings`).
    pub max_position: usize,
    pub rms_norm_eps: f32,
}

impl LlamaDims {
    /// The base-model geometry a LoRA adapter is audited against, under `model_name`
    /// (compared with the adapter's `base_model_name_or_path`).
    pub fn lora_base_shapes(&self, model_name: impl Into<String>) -> batos_lora::BaseShapes {
        batos_lora::BaseShapes {
            model_name: model_name.into(),
            num_layers: self.num_layers,
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            q_dim: self.num_heads * self.head_dim,
            kv_dim: self.num_kv_heads * self.head_dim,
        }
    }

    /// The sizes of `config`.
    pub fn from_config(config: &LlamaConfig) -> LlamaDims {
        LlamaDims {
            hidden_size: config.hidden_size,
            num_heads: config.num_attention_heads,
            num_kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            intermediate_size: config.intermediate_size,
            num_layers: config.num_hidden_layers,
            vocab_size: config.vocab_size,
            max_position: config.max_position_embeddings,
            rms_norm_eps: config.rms_norm_eps,
        }
    }

    fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// The kernels' RoPE settings for `config`, or why it cannot run.
pub(crate) fn rope_config(config: &LlamaConfig) -> Result<RopeConfig, ForwardError> {
    let scaling = match config.rope_scaling {
        None => RopeScaling::Default,
        Some(ConfigRopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => RopeScaling::Llama3(Llama3RopeScaling {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }),
        Some(other) => {
            return Err(ForwardError::BadConfig {
                reason: format!("RoPE scaling {other:?} is not supported by the forward pass"),
            })
        }
    };
    Ok(RopeConfig {
        theta: config.rope_theta,
        head_dim: config.head_dim,
        scaling,
    })
}

/// One decoder layer in runtime layout: q/k/v fused into one `[q + 2 kv, hidden]`
/// matrix and gate/up into one `[2 ffn, hidden]`, so each is one matmul per step.
#[derive(Clone, Debug)]
pub(super) struct LlamaLayer {
    pub(super) attn_norm: Vec<f32>,
    pub(super) qkv: Linear,
    pub(super) o_proj: Linear,
    pub(super) mlp_norm: Vec<f32>,
    pub(super) gate_up: Linear,
    pub(super) down: Linear,
}

/// Borrowed runtime tensors of a [`LlamaModel`], for a runtime that uploads them
/// elsewhere (the CUDA runtime in `forward::cuda`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) struct ModelParts<'a> {
    pub rope: &'a Rope,
    pub embed: &'a Matrix,
    pub layers: &'a [LlamaLayer],
    pub final_norm: &'a [f32],
    pub lm_head: Option<&'a Matrix>,
}

/// A Llama-family decoder ready to run batched forward steps.
///
/// ```
/// use batos_model::forward::{ForwardBatch, SeqStep, WeightDType};
/// use batos_model::synthetic::{tiny_params, SyntheticLlama};
/// use batos_model::LlamaConfig;
/// use batos_types::BlockId;
/// # use batos_model::forward::KvCacheMut;
/// # use batos_kernels::KvCacheLayout;
/// # struct Cache(KvCacheLayout, Vec<(Vec<f32>, Vec<f32>)>);
/// # impl KvCacheMut for Cache {
/// #     fn layout(&self) -> KvCacheLayout { self.0 }
/// #     fn num_layers(&self) -> usize { self.1.len() }
/// #     fn num_blocks(&self) -> usize { 4 }
/// #     fn layer_mut(&mut self, l: usize) -> Option<(&mut [f32], &mut [f32])> {
/// #         self.1.get_mut(l).map(|(k, v)| (k.as_mut_slice(), v.as_mut_slice()))
/// #     }
/// # }
/// let synth = SyntheticLlama::new(LlamaConfig::new(tiny_params())?, 1);
/// let model = synth.model(WeightDType::F32)?;
/// let d = *model.dims();
/// # let layout = KvCacheLayout::new(4, d.num_kv_heads, d.head_dim).unwrap();
/// # let mut cache = Cache(layout, vec![(vec![0.0; 4 * layout.block_stride()], vec![0.0; 4 * layout.block_stride()]); d.num_layers]);
/// // A 5-token prompt in blocks 2 and 0 (4 tokens per block), logits for its last token.
/// let step = SeqStep::new(vec![1, 2, 3, 4, 5], 0, vec![BlockId(2), BlockId(0)]);
/// let out = model.forward(&ForwardBatch::new(vec![step]), &mut cache)?;
/// assert_eq!(out.last_logits(0).unwrap().len(), d.vocab_size);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct LlamaModel {
    device: Device,
    dims: LlamaDims,
    heads: AttentionHeads,
    rope: Rope,
    /// The embedding table (int4 in a quantised model whose head is tied to it).
    embed: Linear,
    layers: Vec<LlamaLayer>,
    final_norm: Vec<f32>,
    /// `None` when the output projection is tied to the embedding table.
    lm_head: Option<Linear>,
    /// The dtype of the dense matrices.
    dense_dtype: WeightDType,
}

/// Per-step activations `[rows, width]`, allocated once per call.
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    proj: Vec<f32>,
    gate_up: Vec<f32>,
    act: Vec<f32>,
}

/// What every layer of one step shares.
struct Step<'a> {
    kern: &'a dyn Kernels,
    plan: &'a StepPlan,
    /// Attention of every new token.
    seqs: &'a [SeqAttention<'a>],
    /// Attention of the tokens that need logits, numbered by output row (the last
    /// layer computes only these; see [`Scratch::keep_rows`]).
    logits_seqs: &'a [SeqAttention<'a>],
    layout: KvCacheLayout,
    /// Per-token adapters of this step, when any token uses one.
    lora: Option<LoraStep<'a>>,
}

/// The adapters of one step: the hot slots' tables and each token's slot.
struct LoraStep<'a> {
    /// The slot tables of every layer and projection for the slots the step uses.
    tables: HotTables<'a>,
    /// One entry per new token, in batch order.
    tokens: Vec<Option<SlotIdx>>,
    /// One entry per token that gets logits (the rows the last layer keeps).
    kept: Vec<Option<SlotIdx>>,
}

/// One projection of a LoRA group: which, its output width, and the first column
/// it owns in the fused projection output.
struct GroupMember {
    proj: Projection,
    out: usize,
    column: usize,
}

impl<'a> LoraStep<'a> {
    /// The adapters of a step whose new tokens use `tokens`; every named slot must be
    /// filled in `slots` (a table entry left empty means "does not adapt this
    /// projection", so an empty slot would otherwise pass silently).
    fn new(
        slots: &'a HotSnapshot,
        num_layers: usize,
        tokens: Vec<Option<SlotIdx>>,
        logits_rows: &[usize],
    ) -> Result<Self, ForwardError> {
        if let Some((t, s)) = tokens
            .iter()
            .enumerate()
            .find_map(|(t, s)| s.filter(|s| !slots.is_filled(*s)).map(|s| (t, s)))
        {
            return Err(ForwardError::Kernel {
                op: "lora",
                source: KernelError::InvalidShape {
                    op: "forward_with_adapters",
                    what: "slot",
                    reason: format!(
                        "token {t} names hot slot {} but the snapshot of {} slots has \
                         nothing there",
                        s.0,
                        slots.len()
                    ),
                },
            });
        }
        let mut used = vec![false; slots.len()];
        for s in tokens.iter().flatten() {
            used[s.index()] = true;
        }
        Ok(LoraStep {
            tables: slots.tables(num_layers, &used),
            kept: logits_rows.iter().map(|&r| tokens[r]).collect(),
            tokens,
        })
    }

    /// The tokens of a step's rows: all new tokens, or only the kept rows (the last
    /// layer after [`Scratch::keep_rows`]).
    fn tokens_for(&self, rows: usize) -> &[Option<SlotIdx>] {
        if rows == self.tokens.len() {
            &self.tokens
        } else {
            &self.kept
        }
    }
}

/// `y = x · Wᵀ` through `linear`, then (when the step has adapters)
/// `y[:, column..column + out] += scale · (x · Aᵀ) · Bᵀ` for every member of the group
/// of projections of `layer` that read `x` (`[rows, n_in]`), into their fused output
/// `y` (`[rows, y_width]`), for every token whose adapter adapts the member. `x`/`y`
/// hold all new tokens or only the kept rows.
fn project(
    kern: &dyn Kernels,
    lora: Option<&LoraStep<'_>>,
    (linear, op): (&Linear, &'static str),
    (layer, group): (usize, &[GroupMember]),
    (x, n_in): (&[f32], usize),
    (y, y_width): (&mut [f32], usize),
) -> Result<(), ForwardError> {
    let Some(l) = lora else {
        return linear.matmul(kern, x, y).map_err(kernel(op));
    };
    let tokens = l.tokens_for(y.len() / y_width);
    let targets = group
        .iter()
        .map(|m| {
            let table = l.tables.table(layer, m.proj);
            let slots = LoraSlots::new(n_in, m.out, table).map_err(kernel("lora slots"))?;
            Ok(LoraTarget::new(slots, m.column))
        })
        .collect::<Result<Vec<_>, ForwardError>>()?;
    if let Linear::Int4Dot(w) = linear {
        // The CPU integer-dot base: its int8 activations serve the LoRA shrink too.
        return cpu::lora::matmul_int4_then_lora(x, w, tokens, &targets, y, y_width)
            .map_err(kernel(op));
    }
    linear.matmul(kern, x, y).map_err(kernel(op))?;
    kern.lora(x, tokens, &targets, y, y_width)
        .map_err(kernel("lora"))
}

impl LlamaModel {
    /// Builds the runtime model from loaded weights, storing matrices in `dtype` (the
    /// norms stay f32). `weights` must have been checked against `config`
    /// ([`ModelWeights::from_tensors`] does); any length that still disagrees is a
    /// [`ForwardError::WeightShape`].
    pub fn from_weights(
        config: &LlamaConfig,
        weights: &ModelWeights,
        dtype: WeightDType,
    ) -> Result<LlamaModel, ForwardError> {
        let dims = LlamaDims::from_config(config);
        let (heads, rope) = Self::attention_setup(config, &dims)?;
        if weights.layers().len() != dims.num_layers {
            return Err(ForwardError::BadConfig {
                reason: format!(
                    "{} layers of weights, config says {}",
                    weights.layers().len(),
                    dims.num_layers
                ),
            });
        }
        let hid = dims.hidden_size;
        let (qw, kvw, ffn) = (dims.q_width(), dims.kv_width(), dims.intermediate_size);
        let norm = |name: String, t: &Tensor| {
            let v = t.to_f32_vec();
            if v.len() == hid {
                Ok(v)
            } else {
                Err(ForwardError::WeightShape {
                    name,
                    expected: vec![hid],
                    got: v.len(),
                })
            }
        };
        let mut layers = Vec::with_capacity(dims.num_layers);
        for (i, l) in weights.layers().iter().enumerate() {
            let name = |what: &str| format!("model.layers.{i}.{what}");
            let (q, k, v) = (
                l.q_proj.to_f32_vec(),
                l.k_proj.to_f32_vec(),
                l.v_proj.to_f32_vec(),
            );
            let (gate, up) = (l.gate_proj.to_f32_vec(), l.up_proj.to_f32_vec());
            layers.push(LlamaLayer {
                attn_norm: norm(name("input_layernorm"), &l.attn_norm)?,
                qkv: Linear::Dense(Matrix::stack_f32(
                    &name("self_attn.qkv_proj"),
                    &[(&q, qw), (&k, kvw), (&v, kvw)],
                    hid,
                    dtype,
                )?),
                o_proj: Linear::Dense(Matrix::from_f32(
                    &name("self_attn.o_proj"),
                    &l.o_proj.to_f32_vec(),
                    hid,
                    qw,
                    dtype,
                )?),
                mlp_norm: norm(name("post_attention_layernorm"), &l.mlp_norm)?,
                gate_up: Linear::Dense(Matrix::stack_f32(
                    &name("mlp.gate_up_proj"),
                    &[(&gate, ffn), (&up, ffn)],
                    hid,
                    dtype,
                )?),
                down: Linear::Dense(Matrix::from_f32(
                    &name("mlp.down_proj"),
                    &l.down_proj.to_f32_vec(),
                    hid,
                    ffn,
                    dtype,
                )?),
            });
        }
        let embed = Linear::Dense(Matrix::from_f32(
            "model.embed_tokens",
            &weights.embed_tokens().to_f32_vec(),
            dims.vocab_size,
            hid,
            dtype,
        )?);
        let lm_head = if weights.is_tied() {
            None
        } else {
            Some(Linear::Dense(Matrix::from_f32(
                "lm_head",
                &weights.lm_head().to_f32_vec(),
                dims.vocab_size,
                hid,
                dtype,
            )?))
        };
        Ok(LlamaModel {
            device: Device::Cpu,
            dims,
            heads,
            rope,
            embed,
            layers,
            final_norm: norm("model.norm".into(), weights.norm())?,
            lm_head,
            dense_dtype: dtype,
        })
    }

    /// Builds the runtime model from int4 weights ([`crate::quant`]) with the default
    /// [`Int4Activations`]; see [`LlamaModel::from_quantized_with`].
    pub fn from_quantized(
        config: &LlamaConfig,
        weights: &QuantizedWeights,
        dense: WeightDType,
    ) -> Result<LlamaModel, QuantError> {
        Self::from_quantized_with(config, weights, dense, Int4Activations::default())
    }

    /// Builds the runtime model from int4 weights ([`crate::quant`]): the projections
    /// stay int4 (q/k/v and gate/up fused along the output dimension, which in
    /// AutoAWQ's layout is a per-row concatenation), in the layout `activations`
    /// needs (AutoAWQ's for f32, repacked for int8); the embedding and head are stored
    /// in `dense` when dense, the norms f32.
    pub fn from_quantized_with(
        config: &LlamaConfig,
        weights: &QuantizedWeights,
        dense: WeightDType,
        activations: Int4Activations,
    ) -> Result<LlamaModel, QuantError> {
        weights.validate(config)?;
        let dims = LlamaDims::from_config(config);
        let (heads, rope) = Self::attention_setup(config, &dims)?;
        let hid = dims.hidden_size;
        let mut layers = Vec::with_capacity(dims.num_layers);
        for (i, l) in weights.layers.iter().enumerate() {
            let name = |what: &str| format!("model.layers.{i}.{what}");
            layers.push(LlamaLayer {
                attn_norm: l.attn_norm.clone(),
                qkv: Linear::int4(
                    Int4Weight::concat_out(
                        &name("self_attn.qkv_proj"),
                        &[&l.q_proj, &l.k_proj, &l.v_proj],
                    )?,
                    activations,
                )?,
                o_proj: Linear::int4(l.o_proj.clone(), activations)?,
                mlp_norm: l.mlp_norm.clone(),
                gate_up: Linear::int4(
                    Int4Weight::concat_out(&name("mlp.gate_up_proj"), &[&l.gate_proj, &l.up_proj])?,
                    activations,
                )?,
                down: Linear::int4(l.down_proj.clone(), activations)?,
            });
        }
        let embed = match &weights.embed_tokens {
            QuantizedEmbedding::Int4(w) => Linear::int4(w.clone(), activations)?,
            QuantizedEmbedding::Dense(t) => Linear::Dense(Matrix::from_f32(
                "model.embed_tokens",
                &t.to_f32_vec(),
                dims.vocab_size,
                hid,
                dense,
            )?),
        };
        let lm_head = match &weights.lm_head {
            None => None,
            Some(h) => Some(Linear::Dense(Matrix::from_f32(
                "lm_head",
                &h.to_f32_vec(),
                dims.vocab_size,
                hid,
                dense,
            )?)),
        };
        Ok(LlamaModel {
            device: Device::Cpu,
            dims,
            heads,
            rope,
            embed,
            layers,
            final_norm: weights.norm.to_f32_vec(),
            lm_head,
            dense_dtype: dense,
        })
    }

    /// Attention head layout and RoPE tables for `config`, or why it cannot run.
    fn attention_setup(
        config: &LlamaConfig,
        dims: &LlamaDims,
    ) -> Result<(AttentionHeads, Rope), ForwardError> {
        if let Some(window) = config.sliding_window.filter(|&w| w < dims.max_position) {
            return Err(ForwardError::BadConfig {
                reason: format!(
                    "sliding-window attention ({window} tokens) is not supported by the forward pass"
                ),
            });
        }
        let heads =
            AttentionHeads::new(dims.num_heads, dims.num_kv_heads, dims.head_dim).map_err(|e| {
                ForwardError::BadConfig {
                    reason: e.to_string(),
                }
            })?;
        let rope = Rope::new(&rope_config(config)?).map_err(|e| ForwardError::BadConfig {
            reason: e.to_string(),
        })?;
        Ok((heads, rope))
    }

    /// Runs the kernels on `device` (the CPU by default). Weights stay host slices; a
    /// backend that is not compiled in fails the first forward with a typed error.
    pub fn with_device(mut self, device: Device) -> LlamaModel {
        self.device = device;
        self
    }

    /// The runtime tensors, borrowed. The device runtime uploads a dense embedding and
    /// head only: an int4 one (AWQ's `EmbeddingQuant::Int4`) is a typed error.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(super) fn parts(&self) -> Result<ModelParts<'_>, ForwardError> {
        fn dense<'m>(what: &str, l: &'m Linear) -> Result<&'m Matrix, ForwardError> {
            match l {
                Linear::Dense(m) => Ok(m),
                Linear::Int4(_) | Linear::Int4Dot(_) => Err(ForwardError::BadConfig {
                    reason: format!(
                        "{what} is int4; the device runtime needs it dense (quantize with \
                         `--embedding dense`)"
                    ),
                }),
            }
        }
        Ok(ModelParts {
            rope: &self.rope,
            embed: dense("the embedding", &self.embed)?,
            layers: &self.layers,
            final_norm: &self.final_norm,
            lm_head: self
                .lm_head
                .as_ref()
                .map(|l| dense("the LM head", l))
                .transpose()?,
        })
    }

    /// Where the kernels run.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The dtype the dense matrices are stored in (int4 projections aside).
    pub fn weight_dtype(&self) -> WeightDType {
        self.dense_dtype
    }

    /// How the int4 projections take their activations; `None` for a dense model.
    pub fn int4_activations(&self) -> Option<Int4Activations> {
        match self.layers.first().map(|l| &l.qkv) {
            Some(Linear::Int4(_)) => Some(Int4Activations::F32),
            Some(Linear::Int4Dot(_)) => Some(Int4Activations::Int8),
            _ => None,
        }
    }

    /// The sizes this model runs with.
    pub fn dims(&self) -> &LlamaDims {
        &self.dims
    }

    /// Bytes held by the weights.
    pub fn weight_bytes(&self) -> usize {
        let norms = (2 * self.layers.len() + 1) * self.dims.hidden_size * 4;
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.size_in_bytes()
                    + l.o_proj.size_in_bytes()
                    + l.gate_up.size_in_bytes()
                    + l.down.size_in_bytes()
            })
            .sum();
        self.embed.size_in_bytes()
            + self.lm_head.as_ref().map_or(0, Linear::size_in_bytes)
            + layers
            + norms
    }

    fn check_cache(&self, cache: &dyn KvCacheMut) -> Result<(), ForwardError> {
        let layout = cache.layout();
        let checks = [
            ("layers", self.dims.num_layers, cache.num_layers()),
            ("kv heads", self.dims.num_kv_heads, layout.num_kv_heads()),
            ("head dim", self.dims.head_dim, layout.head_dim()),
        ];
        for (what, expected, got) in checks {
            if expected != got {
                return Err(ForwardError::CacheMismatch {
                    what,
                    expected,
                    got,
                });
            }
        }
        Ok(())
    }

    /// Runs one step: computes every new token of `batch`, writes their K/V into `cache`
    /// through the batch's block tables, and returns the logits rows asked for.
    ///
    /// The projections run as one matmul per layer over all `T` new tokens of the step,
    /// whatever mix of prefill chunks and decode tokens they come from.
    pub fn forward(
        &self,
        batch: &ForwardBatch,
        cache: &mut dyn KvCacheMut,
    ) -> Result<ForwardOutput, ForwardError> {
        self.run(batch, cache, None)
    }

    /// [`LlamaModel::forward`] with LoRA adapters: a sequence whose
    /// [`SeqStep::adapter`](super::SeqStep::adapter) is `Some(slot)` gets
    /// `y += scale · (x · Aᵀ) · Bᵀ` on every projection that hot slot `slot` of
    /// `adapters` adapts; sequences without an adapter cost nothing extra. A batch that
    /// names a slot `adapters` does not fill fails with [`ForwardError::Kernel`].
    pub fn forward_with_adapters(
        &self,
        batch: &ForwardBatch,
        cache: &mut dyn KvCacheMut,
        adapters: &HotSnapshot,
    ) -> Result<ForwardOutput, ForwardError> {
        self.run(batch, cache, Some(adapters))
    }

    fn run(
        &self,
        batch: &ForwardBatch,
        cache: &mut dyn KvCacheMut,
        adapters: Option<&HotSnapshot>,
    ) -> Result<ForwardOutput, ForwardError> {
        self.check_cache(cache)?;
        let kern = self
            .device
            .kernels("LlamaModel::forward")
            .map_err(kernel("device"))?;
        let layout = cache.layout();
        let plan = StepPlan::new(batch, BatchLimits::for_step(&self.dims, cache, adapters))?;
        let d = self.dims;
        let t = plan.token_ids.len();
        let (qw, kvw, ffn) = (d.q_width(), d.kv_width(), d.intermediate_size);
        let mut s = Scratch {
            x: vec![0.0; t * d.hidden_size],
            h: vec![0.0; t * d.hidden_size],
            qkv: vec![0.0; t * (qw + 2 * kvw)],
            q: vec![0.0; t * qw],
            k: vec![0.0; t * kvw],
            v: vec![0.0; t * kvw],
            attn: vec![0.0; t * qw],
            proj: vec![0.0; t * d.hidden_size],
            gate_up: vec![0.0; t * 2 * ffn],
            act: vec![0.0; t * ffn],
        };
        let seqs: Vec<SeqAttention<'_>> = batch
            .seqs
            .iter()
            .zip(&plan.seq_rows)
            .map(|(step, rows)| SeqAttention {
                block_table: &step.block_table,
                context_len: step.context_len(),
                query_start: rows.start,
                query_len: rows.len(),
            })
            .collect();
        let logits_seqs: Vec<SeqAttention<'_>> = batch
            .seqs
            .iter()
            .zip(&plan.output_rows)
            .filter(|(_, rows)| !rows.is_empty())
            .map(|(step, rows)| SeqAttention {
                block_table: &step.block_table,
                context_len: step.context_len(),
                query_start: rows.start,
                query_len: rows.len(),
            })
            .collect();
        let tokens = batch.token_adapters();
        let no_slots = HotSnapshot::default();
        let lora = if tokens.iter().any(Option::is_some) {
            let slots = adapters.unwrap_or(&no_slots);
            Some(LoraStep::new(
                slots,
                self.dims.num_layers,
                tokens,
                &plan.logits_rows,
            )?)
        } else {
            None
        };
        let step = Step {
            kern,
            plan: &plan,
            seqs: &seqs,
            logits_seqs: &logits_seqs,
            layout,
            lora,
        };

        self.embed
            .embedding(kern, &plan.token_ids, &mut s.x)
            .map_err(kernel("embedding"))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let (k_cache, v_cache) = cache.layer_mut(i).ok_or(ForwardError::CacheMismatch {
                what: "layers",
                expected: self.dims.num_layers,
                got: i,
            })?;
            let last = i + 1 == self.layers.len();
            self.attention_block(&step, (i, layer), (k_cache, v_cache), &mut s, last)?;
            if !s.x.is_empty() {
                self.mlp_block(kern, (i, layer), step.lora.as_ref(), &mut s)?;
            }
        }
        self.logits(kern, &plan, &s.x)
    }

    /// Attention and its residual. In the `last` layer only the tokens that need
    /// logits go on past the K/V write: nothing after it reads the others.
    fn attention_block(
        &self,
        step: &Step<'_>,
        (index, layer): (usize, &LlamaLayer),
        (k_cache, v_cache): (&mut [f32], &mut [f32]),
        s: &mut Scratch,
        last: bool,
    ) -> Result<(), ForwardError> {
        let (d, kern, plan) = (&self.dims, step.kern, step.plan);
        let (qw, kvw) = (d.q_width(), d.kv_width());
        let row = qw + 2 * kvw;
        kern.rms_norm(&s.x, &layer.attn_norm, d.rms_norm_eps, &mut s.h)
            .map_err(kernel("attn rms_norm"))?;
        // q, k and v read the same normed input: one pass, into the fused output.
        let group = [
            GroupMember {
                proj: Projection::Q,
                out: qw,
                column: 0,
            },
            GroupMember {
                proj: Projection::K,
                out: kvw,
                column: qw,
            },
            GroupMember {
                proj: Projection::V,
                out: kvw,
                column: qw + kvw,
            },
        ];
        project(
            kern,
            step.lora.as_ref(),
            (&layer.qkv, "qkv_proj"),
            (index, &group),
            (&s.h, d.hidden_size),
            (&mut s.qkv, row),
        )?;
        for (r, fused) in s.qkv.chunks_exact(row).enumerate() {
            s.q[r * qw..(r + 1) * qw].copy_from_slice(&fused[..qw]);
            s.k[r * kvw..(r + 1) * kvw].copy_from_slice(&fused[qw..qw + kvw]);
            s.v[r * kvw..(r + 1) * kvw].copy_from_slice(&fused[qw + kvw..]);
        }
        kern.rope(&self.rope, &self.heads, &plan.positions, &mut s.q, &mut s.k)
            .map_err(kernel("rope"))?;
        kern.write_kv(&s.k, &s.v, &plan.slots, k_cache, v_cache, &step.layout)
            .map_err(kernel("write_kv"))?;
        let mut seqs = step.seqs;
        if last && plan.logits_rows.len() < plan.token_ids.len() {
            s.keep_rows(&plan.logits_rows, d);
            seqs = step.logits_seqs;
            if s.x.is_empty() {
                return Ok(());
            }
        }
        let cache = KvCache {
            k: k_cache,
            v: v_cache,
            layout: step.layout,
        };
        kern.paged_attention(&s.q, &self.heads, &cache, seqs, &mut s.attn)
            .map_err(kernel("paged_attention"))?;
        let hid = d.hidden_size;
        let o = [GroupMember {
            proj: Projection::O,
            out: hid,
            column: 0,
        }];
        project(
            kern,
            step.lora.as_ref(),
            (&layer.o_proj, "o_proj"),
            (index, &o),
            (&s.attn, qw),
            (&mut s.proj, hid),
        )?;
        add_assign(&mut s.x, &s.proj);
        Ok(())
    }

    fn mlp_block(
        &self,
        kern: &dyn Kernels,
        (index, layer): (usize, &LlamaLayer),
        lora: Option<&LoraStep<'_>>,
        s: &mut Scratch,
    ) -> Result<(), ForwardError> {
        let d = &self.dims;
        let ffn = d.intermediate_size;
        kern.rms_norm(&s.x, &layer.mlp_norm, d.rms_norm_eps, &mut s.h)
            .map_err(kernel("mlp rms_norm"))?;
        let hid = d.hidden_size;
        // gate and up read the same normed input: one pass, into the fused output.
        let group = [
            GroupMember {
                proj: Projection::Gate,
                out: ffn,
                column: 0,
            },
            GroupMember {
                proj: Projection::Up,
                out: ffn,
                column: ffn,
            },
        ];
        project(
            kern,
            lora,
            (&layer.gate_up, "gate_up_proj"),
            (index, &group),
            (&s.h, hid),
            (&mut s.gate_up, 2 * ffn),
        )?;
        kern.silu_mul_fused(&s.gate_up, ffn, &mut s.act)
            .map_err(kernel("silu_mul"))?;
        let down = [GroupMember {
            proj: Projection::Down,
            out: hid,
            column: 0,
        }];
        project(
            kern,
            lora,
            (&layer.down, "down_proj"),
            (index, &down),
            (&s.act, ffn),
            (&mut s.proj, hid),
        )?;
        add_assign(&mut s.x, &s.proj);
        Ok(())
    }

    /// Final norm and the output projection. `x` holds exactly the rows that asked
    /// for logits, in output order (the last layer kept only those).
    fn logits(
        &self,
        kern: &dyn Kernels,
        plan: &StepPlan,
        x: &[f32],
    ) -> Result<ForwardOutput, ForwardError> {
        let d = &self.dims;
        let rows = plan.logits_rows.len();
        debug_assert_eq!(x.len(), rows * d.hidden_size);
        let mut normed = vec![0.0; x.len()];
        let mut logits = vec![0.0; rows * d.vocab_size];
        if rows > 0 {
            kern.rms_norm(x, &self.final_norm, d.rms_norm_eps, &mut normed)
                .map_err(kernel("final rms_norm"))?;
            let head = self.lm_head.as_ref().unwrap_or(&self.embed);
            head.matmul(kern, &normed, &mut logits)
                .map_err(kernel("lm_head"))?;
        }
        Ok(ForwardOutput {
            logits,
            vocab_size: d.vocab_size,
            seq_rows: plan.output_rows.clone(),
        })
    }
}

impl Scratch {
    /// Keeps rows `rows` (ascending) of the residual stream and the queries, moved to
    /// the front, and shrinks every buffer to that many rows.
    fn keep_rows(&mut self, rows: &[usize], d: &LlamaDims) {
        let (hid, qw) = (d.hidden_size, d.q_width());
        for (dst, &src) in rows.iter().enumerate() {
            // Ascending rows: `src >= dst`, so each copy reads a row not yet overwritten.
            self.x.copy_within(src * hid..(src + 1) * hid, dst * hid);
            self.q.copy_within(src * qw..(src + 1) * qw, dst * qw);
        }
        let n = rows.len();
        let ffn = d.intermediate_size;
        self.x.truncate(n * hid);
        self.h.truncate(n * hid);
        self.q.truncate(n * qw);
        self.attn.truncate(n * qw);
        self.proj.truncate(n * hid);
        self.gate_up.truncate(n * 2 * ffn);
        self.act.truncate(n * ffn);
    }
}

/// The residual connection `x += y`.
fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
