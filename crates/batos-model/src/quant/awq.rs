//! Activation-aware weight quantisation (AWQ, Lin et al. 2023), in the manner of
//! AutoAWQ, on the CPU.
//!
//! Per decoder block, with the block's inputs from the full-precision model:
//! 1. capture the inputs of each group of projections that share one input — q/k/v
//!    (after the attention norm), o (attention output), gate/up (after the MLP norm),
//!    down (the gated activation) — and their per-channel mean magnitude `x̄`;
//! 2. for α on a grid in `[0, 1)`, scale input channel `c` by `s_c = x̄_c^α`
//!    (normalised so `√(max·min) = 1`), quantise `W·diag(s)`, and measure the error of
//!    the group's outputs on calibration tokens, `‖X·Wᵀ − (X/s)·Q(W·diag(s))ᵀ‖²`; keep
//!    the best α (α = 0 is plain round to nearest, so AWQ never does worse on the
//!    calibration tokens);
//! 3. fold `1/s` into the op before: the norm weights for q/k/v and gate/up, the rows
//!    of v_proj for o_proj (with grouped-query attention the scale is shared by the
//!    query heads that read one KV head, so it can be folded), the rows of up_proj for
//!    down_proj;
//! 4. optionally search, per output row and input group, a clipping bound
//!    `max|w|·(1 − i/grid)` minimising that group's output error (not for q/k, whose
//!    errors the attention scores amplify — as AutoAWQ);
//! 5. optionally compensate rounding errors GPTQ-style ([`Compensation::Gptq`]: each
//!    input column's error is spread over the later columns through the inverse input
//!    Hessian, the parameter search of step 4 running per group as it is reached);
//! 6. quantise (asymmetric int4, groups of `group_size` inputs), and, with
//!    [`EmbeddingQuant::Int4`], the tied embedding/head too, its inputs being the final
//!    norm's output on the calibration tokens.
//!
//! The search objective is each projection group's output (AutoAWQ inspects the
//! attention block as a whole for q/k/v; the projection outputs are what the int4
//! error enters through and are much cheaper to evaluate on a CPU).

use batos_kernels::{
    cpu, AttentionHeads, Int4Layout, KvCache, KvCacheLayout, Rope, SeqAttention, WeightView,
};
use batos_types::BlockId;
use rayon::prelude::*;

use crate::config::LlamaConfig;
use crate::forward::rope_config;
use crate::model::LoadedModel;
use crate::tokenizer::ModelTokenizer;
use crate::weights::{LayerTensor, ModelWeights, Progress, TensorRole};

use super::error::QuantError;
use super::gptq::{gptq, hessian, InverseFactor};
use super::int4::{fake_quantize, group_params, GroupParams, Int4Weight};
use super::model::{QuantizedEmbedding, QuantizedLayer, QuantizedModel, QuantizedWeights};

/// The public-domain calibration text shipped with batos (see `data/README.md`).
pub const SHIPPED_CALIBRATION_TEXT: &str = include_str!("../../data/calibration.txt");

/// The public-domain held-out text perplexity is reported on (never used to calibrate).
pub const SHIPPED_HELDOUT_TEXT: &str = include_str!("../../data/heldout.txt");

/// The clipping search of [`AwqConfig`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum ClipSearch {
    /// Quantise over each group's full range.
    Off,
    /// Try bounds `max|w|·(1 − i/grid)` for `i < max_shrink·grid` per (row, group).
    Grid { grid: usize, max_shrink: f32 },
}

/// Error compensation after the scale search (see [`AwqConfig::compensation`]).
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Compensation {
    /// Each weight rounds independently (AutoAWQ).
    Off,
    /// GPTQ: columns quantised in order, each one's rounding error spread over the
    /// later columns through the inverse input Hessian, damped by `damp · mean(diag H)`.
    Gptq { damp: f32 },
}

/// How [`AwqConfig`] stores the token embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum EmbeddingQuant {
    /// Unchanged (AutoAWQ's choice): the tied 49,152 × 576 table of SmolLM2 is then
    /// half of the int4 model's bytes.
    Dense,
    /// int4 like the projections when the head is tied to the embedding, with the
    /// head's inputs (the final norm's output on the calibration tokens) as the
    /// quantisation's activations; an untied model keeps its dense embedding and head.
    Int4,
}

/// Settings of [`quantize_awq`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct AwqConfig {
    /// Inputs sharing one scale and zero point (32 by default: 576 is not a multiple of
    /// 128, and at 32 SmolLM2 with GPTQ and an int4 head is both the smallest and the
    /// most accurate model measured; see docs/perf/awq.md).
    pub group_size: usize,
    /// Points of the α grid in `[0, 1)`.
    pub grid: usize,
    /// Calibration tokens (the first ones) the scale and clip searches evaluate on; the
    /// activation statistics use every calibration token.
    pub search_tokens: usize,
    /// The clipping search: with GPTQ, the parameter search each group runs when the
    /// compensation reaches it.
    pub clip: ClipSearch,
    /// Error compensation within each projection.
    pub compensation: Compensation,
    /// How the (tied) embedding is stored.
    pub embedding: EmbeddingQuant,
    /// Progress display.
    pub progress: Progress,
}

impl Default for AwqConfig {
    /// AutoAWQ's defaults where they apply: 20-point α grid, clip search over 10
    /// bounds down to half the range; then group size 32, 256 search tokens, GPTQ
    /// (damping 0.01) and an int4 tied embedding/head — on SmolLM2 the configuration
    /// that is within 30 % of the f16 bytes at the best measured perplexity
    /// (docs/perf/awq.md).
    fn default() -> Self {
        AwqConfig {
            group_size: 32,
            grid: 20,
            search_tokens: 256,
            clip: ClipSearch::Grid {
                grid: 20,
                max_shrink: 0.5,
            },
            compensation: Compensation::Gptq { damp: 0.01 },
            embedding: EmbeddingQuant::Int4,
            progress: Progress::Hidden,
        }
    }
}

impl AwqConfig {
    /// Sets the group size.
    pub fn with_group_size(mut self, group_size: usize) -> Self {
        self.group_size = group_size;
        self
    }
    /// Sets the α grid.
    pub fn with_grid(mut self, grid: usize) -> Self {
        self.grid = grid;
        self
    }
    /// Sets the tokens the searches evaluate on.
    pub fn with_search_tokens(mut self, tokens: usize) -> Self {
        self.search_tokens = tokens;
        self
    }
    /// Sets the clipping search.
    pub fn with_clip(mut self, clip: ClipSearch) -> Self {
        self.clip = clip;
        self
    }
    /// Sets the error compensation.
    pub fn with_compensation(mut self, compensation: Compensation) -> Self {
        self.compensation = compensation;
        self
    }
    /// Sets how the embedding is stored.
    pub fn with_embedding(mut self, embedding: EmbeddingQuant) -> Self {
        self.embedding = embedding;
        self
    }
    /// Sets the progress display.
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    fn validate(&self) -> Result<(), QuantError> {
        let bad = |field, reason: String| Err(QuantError::InvalidConfig { field, reason });
        if self.group_size == 0 {
            return bad("group_size", "must be positive".into());
        }
        if self.grid == 0 {
            return bad("grid", "must be positive".into());
        }
        if self.search_tokens == 0 {
            return bad("search_tokens", "must be positive".into());
        }
        if let ClipSearch::Grid { grid, max_shrink } = self.clip {
            if grid == 0 || !(0.0..1.0).contains(&max_shrink) {
                return bad(
                    "clip",
                    format!("grid {grid} must be positive and max_shrink {max_shrink} in [0, 1)"),
                );
            }
        }
        if let Compensation::Gptq { damp } = self.compensation {
            if !(damp > 0.0 && damp < 1.0) {
                return bad(
                    "compensation",
                    format!("GPTQ damping {damp} must be in (0, 1)"),
                );
            }
        }
        Ok(())
    }
}

/// Calibration samples: token sequences of equal length, each run from an empty
/// context.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calibration {
    samples: Vec<Vec<u32>>,
}

impl Calibration {
    /// Cuts `tokens` into up to `max_samples` consecutive samples of `sample_len`.
    pub fn from_tokens(
        tokens: &[u32],
        sample_len: usize,
        max_samples: usize,
    ) -> Result<Self, QuantError> {
        if sample_len < 2 {
            return Err(QuantError::Calibration {
                reason: format!("sample length {sample_len} is below 2 tokens"),
            });
        }
        let samples: Vec<Vec<u32>> = tokens
            .chunks_exact(sample_len)
            .take(max_samples)
            .map(<[u32]>::to_vec)
            .collect();
        if samples.is_empty() {
            return Err(QuantError::Calibration {
                reason: format!(
                    "{} tokens of text do not fill one sample of {sample_len}",
                    tokens.len()
                ),
            });
        }
        Ok(Calibration { samples })
    }

    /// Tokenises `text` (no special tokens) and cuts it as [`Calibration::from_tokens`].
    pub fn from_text(
        tokenizer: &ModelTokenizer,
        text: &str,
        sample_len: usize,
        max_samples: usize,
    ) -> Result<Self, QuantError> {
        let tokens = tokenizer.encode(text)?;
        Self::from_tokens(&tokens, sample_len, max_samples)
    }

    /// The samples.
    pub fn samples(&self) -> &[Vec<u32>] {
        &self.samples
    }

    /// Tokens in all samples.
    pub fn num_tokens(&self) -> usize {
        self.samples.iter().map(Vec::len).sum()
    }
}

/// What the search chose for one block (for logs and reports).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerSearch {
    /// Best α for q/k/v, o, gate/up, down.
    pub alpha: [f32; 4],
    /// Output error at the best α relative to α = 0 (round to nearest), per group.
    pub error_ratio: [f32; 4],
}

/// The outcome of [`quantize_weights_awq`].
#[derive(Clone, Debug)]
pub struct AwqOutcome {
    pub weights: QuantizedWeights,
    /// One entry per block.
    pub layers: Vec<LayerSearch>,
}

/// Quantises a loaded model with AWQ; the result keeps its tokenizer and template.
/// This is the one call `batos quantize --awq` makes.
pub fn quantize_awq(
    model: &LoadedModel,
    config: &AwqConfig,
    calibration: &Calibration,
) -> Result<QuantizedModel, QuantError> {
    let out = quantize_weights_awq(&model.config, &model.weights, config, calibration)?;
    Ok(QuantizedModel {
        config: model.config.clone(),
        weights: out.weights,
        tokenizer: model.tokenizer.clone(),
        chat_template: model.chat_template.clone(),
    })
}

/// f32 copies of one block's tensors, modified in place by the scale folding.
struct Block {
    attn_norm: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    mlp_norm: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    down: Vec<f32>,
}

/// The inputs each projection group saw during calibration.
struct BlockInputs {
    /// Attention-norm output, `[T, hidden]` (q/k/v input).
    attn_in: Vec<f32>,
    /// Attention output, `[T, q_dim]` (o input).
    o_in: Vec<f32>,
    /// MLP-norm output, `[T, hidden]` (gate/up input).
    mlp_in: Vec<f32>,
    /// `silu(gate)·up`, `[T, ffn]` (down input).
    down_in: Vec<f32>,
}

fn kern(op: &'static str) -> impl FnOnce(batos_kernels::KernelError) -> QuantError {
    move |source| QuantError::Kernel { op, source }
}

fn matmul(
    op: &'static str,
    x: &[f32],
    w: &[f32],
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, QuantError> {
    let view = WeightView::f32(w, rows, cols).map_err(kern(op))?;
    let mut out = vec![0f32; x.len() / cols * rows];
    cpu::matmul(x, &view, &mut out).map_err(kern(op))?;
    Ok(out)
}

/// The full-precision calibration forward of one block: its projection groups' inputs,
/// with `x` (`[T, hidden]`) advanced to the block's output.
struct CalibForward<'a> {
    config: &'a LlamaConfig,
    heads: AttentionHeads,
    rope: Rope,
    positions: Vec<usize>,
    sample_len: usize,
    samples: usize,
}

impl CalibForward<'_> {
    fn run(&self, b: &Block, x: &mut [f32]) -> Result<BlockInputs, QuantError> {
        let c = self.config;
        let (h, qd, kvd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
        let eps = c.rms_norm_eps;
        let t = x.len() / h;
        let mut attn_in = vec![0f32; t * h];
        cpu::rms_norm(x, &b.attn_norm, eps, &mut attn_in).map_err(kern("calib rms_norm"))?;
        let mut q = matmul("calib q_proj", &attn_in, &b.q, qd, h)?;
        let mut k = matmul("calib k_proj", &attn_in, &b.k, kvd, h)?;
        let v = matmul("calib v_proj", &attn_in, &b.v, kvd, h)?;
        cpu::rope(&self.rope, &self.heads, &self.positions, &mut q, &mut k)
            .map_err(kern("calib rope"))?;
        // One cache block per sample, so each sample attends only to itself.
        let layout = KvCacheLayout::new(self.sample_len, c.num_key_value_heads, c.head_dim)
            .map_err(kern("calib cache"))?;
        let mut kc = vec![0f32; self.samples * layout.block_stride()];
        let mut vc = vec![0f32; kc.len()];
        let slots: Vec<usize> = (0..t).collect();
        cpu::write_kv(&k, &v, &slots, &mut kc, &mut vc, &layout).map_err(kern("calib write_kv"))?;
        let tables: Vec<[BlockId; 1]> = (0..self.samples as u32).map(|s| [BlockId(s)]).collect();
        let seqs: Vec<SeqAttention<'_>> = tables
            .iter()
            .enumerate()
            .map(|(s, table)| SeqAttention {
                block_table: table,
                context_len: self.sample_len,
                query_start: s * self.sample_len,
                query_len: self.sample_len,
            })
            .collect();
        let cache = KvCache {
            k: &kc,
            v: &vc,
            layout,
        };
        let mut o_in = vec![0f32; t * qd];
        cpu::paged_attention(&q, &self.heads, &cache, &seqs, &mut o_in)
            .map_err(kern("calib attention"))?;
        let o = matmul("calib o_proj", &o_in, &b.o, h, qd)?;
        add_assign(x, &o);
        let mut mlp_in = vec![0f32; t * h];
        cpu::rms_norm(x, &b.mlp_norm, eps, &mut mlp_in).map_err(kern("calib rms_norm"))?;
        let g = matmul("calib gate_proj", &mlp_in, &b.gate, ffn, h)?;
        let u = matmul("calib up_proj", &mlp_in, &b.up, ffn, h)?;
        let mut down_in = vec![0f32; t * ffn];
        cpu::silu_mul(&g, &u, &mut down_in).map_err(kern("calib silu_mul"))?;
        let d = matmul("calib down_proj", &down_in, &b.down, h, ffn)?;
        add_assign(x, &d);
        Ok(BlockInputs {
            attn_in,
            o_in,
            mlp_in,
            down_in,
        })
    }
}

fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Mean |x| per channel of `[T, width]` activations (f64 sums, token order).
fn channel_mean_abs(x: &[f32], width: usize) -> Vec<f32> {
    let t = x.len() / width;
    let mut acc = vec![0f64; width];
    for row in x.chunks_exact(width) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += f64::from(v.abs());
        }
    }
    acc.into_iter().map(|a| (a / t as f64) as f32).collect()
}

/// Scales `x̄^α`, clamped away from zero and normalised to `√(max·min) = 1`.
fn scales_for(x_mean: &[f32], alpha: f32) -> Vec<f32> {
    let mut s: Vec<f32> = x_mean
        .iter()
        .map(|&m| m.max(1e-4).powf(alpha).max(1e-4))
        .collect();
    let (lo, hi) = s
        .iter()
        .fold((f32::INFINITY, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let norm = (lo * hi).sqrt();
    s.iter_mut().for_each(|v| *v /= norm);
    s
}

/// `w[r, c] *= s[c]` for a row-major matrix with `s.len()` columns.
fn scale_cols(w: &mut [f32], s: &[f32]) {
    for row in w.chunks_exact_mut(s.len()) {
        for (v, &f) in row.iter_mut().zip(s) {
            *v *= f;
        }
    }
}

/// `w[r, :] /= s[r]`.
fn unscale_rows(w: &mut [f32], s: &[f32]) {
    let cols = w.len() / s.len();
    for (row, &f) in w.chunks_exact_mut(cols).zip(s) {
        row.iter_mut().for_each(|v| *v /= f);
    }
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = f64::from(x - y);
            d * d
        })
        .sum::<f64>()
        / a.len().max(1) as f64
}

/// The α search for one group of projections sharing input `x` (`[T, cols]`):
/// returns (α, scales, error at α / error at 0).
fn search_scales(
    op: &'static str,
    x: &[f32],
    x_mean: &[f32],
    w: &[f32],
    rows: usize,
    cols: usize,
    cfg: &AwqConfig,
) -> Result<(f32, Vec<f32>, f32), QuantError> {
    let reference = matmul(op, x, w, rows, cols)?;
    let mut ws = vec![0f32; w.len()];
    let mut q = vec![0f32; w.len()];
    let mut best: Option<(f64, f32, Vec<f32>)> = None;
    let mut base = 0f64;
    for i in 0..cfg.grid {
        let alpha = i as f32 / cfg.grid as f32;
        let s = scales_for(x_mean, alpha);
        ws.copy_from_slice(w);
        scale_cols(&mut ws, &s);
        fake_quantize(&ws, cols, cfg.group_size, None, &mut q);
        let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
        scale_cols(&mut q, &inv);
        let err = mse(&matmul(op, x, &q, rows, cols)?, &reference);
        if i == 0 {
            base = err;
        }
        if best.as_ref().is_none_or(|b| err < b.0) {
            best = Some((err, alpha, s));
        }
    }
    let (err, alpha, s) = best.expect("grid has at least one point");
    let ratio = if base > 0.0 { (err / base) as f32 } else { 1.0 };
    Ok((alpha, s, ratio))
}

/// Per-channel importance `hᵢ = mean(xᵢ²)` of inputs `x` (`[T, cols]`), floored at
/// 1e-3 of the mean so channels never excited during calibration still count: the
/// diagonal of a projection's output-error form, as llama.cpp's importance-weighted
/// k-quants use it.
fn channel_importance(x: &[f32], cols: usize) -> Vec<f32> {
    let t = (x.len() / cols).max(1) as f64;
    let mut h = vec![0f64; cols];
    for row in x.chunks_exact(cols) {
        for (a, &v) in h.iter_mut().zip(row) {
            *a += f64::from(v) * f64::from(v);
        }
    }
    let mean_h = h.iter().sum::<f64>() / (cols as f64 * t);
    h.iter().map(|&v| (v / t + 1e-3 * mean_h) as f32).collect()
}

/// Quantisation parameters for one group `wg` minimising its weighted error
/// `Σᵢ hᵢ·(wᵢ − ŵᵢ)²`.
///
/// Candidates: AutoAWQ's clipping bounds `max|w|·(1 − i/grid)`, each refined by a
/// weighted least-squares refit of the scale for the zero point and its two
/// neighbours (the zero point must stay an integer code).
fn search_group(wg: &[f32], hg: &[f32], grid: usize, max_shrink: f32) -> GroupParams {
    let steps = ((max_shrink * grid as f32) as usize).max(1);
    let err = |p: &GroupParams| -> f32 {
        wg.iter()
            .zip(hg)
            .map(|(&v, &hv)| {
                let d = v - p.dequant(p.code(v));
                hv * d * d
            })
            .sum()
    };
    let max = wg.iter().fold(0f32, |m, &v| m.max(v.abs()));
    let mut best_p = group_params(wg, None);
    let mut best = err(&best_p);
    for i in 0..steps {
        let bound = max * (1.0 - i as f32 / grid as f32);
        let p = group_params(wg, Some(bound));
        let e = err(&p);
        if e < best {
            (best, best_p) = (e, p);
        }
        for dz in [-1i32, 0, 1] {
            let z = i32::from(p.zero) + dz;
            if !(0..=15).contains(&z) {
                continue;
            }
            // Weighted least squares for the scale given the codes.
            let (mut num, mut den) = (0f64, 0f64);
            for (&v, &hv) in wg.iter().zip(hg) {
                let c = f64::from(i32::from(p.code(v)) - z);
                num += f64::from(hv) * f64::from(v) * c;
                den += f64::from(hv) * c * c;
            }
            if den <= 0.0 || num <= 0.0 {
                continue;
            }
            let scale = half::f16::from_f64(num / den);
            if !(scale.to_f32() > 0.0 && scale.is_finite()) {
                continue;
            }
            let q = GroupParams {
                scale,
                zero: z as u8,
            };
            let e = err(&q);
            if e < best {
                (best, best_p) = (e, q);
            }
        }
    }
    best_p
}

/// What one projection group's quantisation needs from its (scaled) inputs.
struct InputStats {
    /// Per-channel importance (see [`channel_importance`]).
    importance: Vec<f32>,
    /// GPTQ's inverse-Hessian factor, when compensation is on.
    factor: Option<InverseFactor>,
}

impl InputStats {
    /// From inputs `x` (`[T, cols]`) as the unscaled model sees them and the AWQ
    /// scales `s` the projection's columns were multiplied by.
    fn new(name: &str, x: &[f32], s: &[f32], cfg: &AwqConfig) -> Result<InputStats, QuantError> {
        let cols = s.len();
        let needs_inputs = !matches!(
            (cfg.clip, cfg.compensation),
            (ClipSearch::Off, Compensation::Off)
        );
        if !needs_inputs {
            return Ok(InputStats {
                importance: Vec::new(),
                factor: None,
            });
        }
        let mut xs = x.to_vec();
        let inv: Vec<f32> = s.iter().map(|v| 1.0 / v).collect();
        scale_cols(&mut xs, &inv);
        let factor = match cfg.compensation {
            Compensation::Off => None,
            Compensation::Gptq { damp } => Some(InverseFactor::new(
                name,
                &hessian(&xs, cols)?,
                cols,
                f64::from(damp),
            )?),
        };
        Ok(InputStats {
            importance: channel_importance(&xs, cols),
            factor,
        })
    }
}

/// Quantises one projection `w` (`[rows, cols]`, columns already scaled) as `cfg`
/// says: round to nearest or the parameter search per group, optionally under GPTQ.
fn quantize_linear(
    name: &str,
    w: &[f32],
    rows: usize,
    cols: usize,
    cfg: &AwqConfig,
    stats: &InputStats,
) -> Result<Int4Weight, QuantError> {
    let gs = cfg.group_size;
    let layout = Int4Layout::new(cols, rows, gs).map_err(|source| QuantError::BadInt4 {
        name: name.to_owned(),
        source,
    })?;
    let choose = |wg: &[f32], g0: usize| match cfg.clip {
        ClipSearch::Off => group_params(wg, None),
        ClipSearch::Grid { grid, max_shrink } => {
            search_group(wg, &stats.importance[g0..g0 + wg.len()], grid, max_shrink)
        }
    };
    match &stats.factor {
        Some(factor) => {
            let (params, values) = gptq(w, cols, gs, factor, choose);
            Int4Weight::quantize_with_params(name, &values, layout, &params)
        }
        None => match cfg.clip {
            ClipSearch::Off => Int4Weight::quantize(name, w, rows, cols, gs, None),
            ClipSearch::Grid { .. } => {
                let params: Vec<GroupParams> = w
                    .par_chunks(cols)
                    .flat_map_iter(|row| {
                        row.chunks(gs)
                            .enumerate()
                            .map(move |(g, wg)| choose(wg, g * gs))
                    })
                    .collect();
                Int4Weight::quantize_with_params(name, w, layout, &params)
            }
        },
    }
}

/// AWQ of `weights` (the method is documented in `src/quant/awq.rs`). Deterministic:
/// the same inputs give bit-identical weights.
pub fn quantize_weights_awq(
    config: &LlamaConfig,
    weights: &ModelWeights,
    cfg: &AwqConfig,
    calibration: &Calibration,
) -> Result<AwqOutcome, QuantError> {
    cfg.validate()?;
    let started = std::time::Instant::now();
    let c = config;
    let (h, qd, kvd, ffn) = (c.hidden_size, c.q_dim(), c.kv_dim(), c.intermediate_size);
    // Every projection's input width must be whole groups.
    for (what, width, out) in [
        ("q/k/v and gate/up", h, kvd),
        ("o_proj", qd, h),
        ("down_proj", ffn, h),
    ] {
        batos_kernels::Int4Layout::new(width, out, cfg.group_size).map_err(|source| {
            QuantError::BadInt4 {
                name: format!("{what} inputs ({width} wide)"),
                source,
            }
        })?;
    }
    let sample_len = calibration.samples[0].len();
    if calibration.samples.iter().any(|s| s.len() != sample_len) {
        return Err(QuantError::Calibration {
            reason: "samples differ in length".into(),
        });
    }
    if sample_len > c.max_position_embeddings {
        return Err(QuantError::Calibration {
            reason: format!(
                "samples of {sample_len} tokens exceed the model's context of {}",
                c.max_position_embeddings
            ),
        });
    }
    let samples = calibration.samples.len();
    let t = samples * sample_len;
    let heads = AttentionHeads::new(c.num_attention_heads, c.num_key_value_heads, c.head_dim)
        .map_err(kern("calib heads"))?;
    let rope = Rope::new(&rope_config(config)?).map_err(kern("calib rope"))?;
    let fwd = CalibForward {
        config,
        heads,
        rope,
        positions: (0..t).map(|i| i % sample_len).collect(),
        sample_len,
        samples,
    };
    let tokens: Vec<u32> = calibration.samples.concat();
    let table = weights.embed_tokens().to_f32_vec();
    let mut x = vec![0f32; t * h];
    cpu::embedding(
        &WeightView::f32(&table, c.vocab_size, h).map_err(kern("calib embedding"))?,
        &tokens,
        &mut x,
    )
    .map_err(kern("calib embedding"))?;
    drop(table);
    let ts = cfg.search_tokens.min(t);
    let bar = layer_bar(cfg.progress, weights.layers().len() as u64);
    let mut layers = Vec::with_capacity(weights.layers().len());
    let mut searches = Vec::with_capacity(weights.layers().len());
    let gqa = c.num_attention_heads / c.num_key_value_heads;
    for (li, lw) in weights.layers().iter().enumerate() {
        let mut b = Block {
            attn_norm: lw.attn_norm.to_f32_vec(),
            q: lw.q_proj.to_f32_vec(),
            k: lw.k_proj.to_f32_vec(),
            v: lw.v_proj.to_f32_vec(),
            o: lw.o_proj.to_f32_vec(),
            mlp_norm: lw.mlp_norm.to_f32_vec(),
            gate: lw.gate_proj.to_f32_vec(),
            up: lw.up_proj.to_f32_vec(),
            down: lw.down_proj.to_f32_vec(),
        };
        let inputs = fwd.run(&b, &mut x)?;

        // q/k/v: one scale on the attention-norm output, folded into the norm.
        let qkv_w = [b.q.as_slice(), &b.k, &b.v].concat();
        let (a_qkv, s_qkv, r_qkv) = search_scales(
            "awq q/k/v",
            &inputs.attn_in[..ts * h],
            &channel_mean_abs(&inputs.attn_in, h),
            &qkv_w,
            qd + 2 * kvd,
            h,
            cfg,
        )?;
        drop(qkv_w);

        // o: one scale per v channel, shared by the query heads reading that KV head.
        let o_mean = channel_mean_abs(&inputs.o_in, qd);
        let hd = c.head_dim;
        let mut v_mean = vec![0f32; kvd];
        for (ch, &m) in o_mean.iter().enumerate() {
            let (head, d) = (ch / hd, ch % hd);
            v_mean[(head / gqa) * hd + d] += m / gqa as f32;
        }
        let o_tied: Vec<f32> = (0..qd)
            .map(|ch| v_mean[(ch / hd / gqa) * hd + ch % hd])
            .collect();
        let (a_o, s_o, r_o) =
            search_scales("awq o", &inputs.o_in[..ts * qd], &o_tied, &b.o, h, qd, cfg)?;
        let s_v: Vec<f32> = (0..kvd)
            .map(|ch| s_o[(ch / hd) * gqa * hd + ch % hd])
            .collect();

        // gate/up: one scale on the MLP-norm output, folded into the norm.
        let gu_w = [b.gate.as_slice(), &b.up].concat();
        let (a_gu, s_gu, r_gu) = search_scales(
            "awq gate/up",
            &inputs.mlp_in[..ts * h],
            &channel_mean_abs(&inputs.mlp_in, h),
            &gu_w,
            2 * ffn,
            h,
            cfg,
        )?;
        drop(gu_w);

        // down: scale on the gated activation, folded into up_proj's rows.
        let (a_d, s_d, r_d) = search_scales(
            "awq down",
            &inputs.down_in[..ts * ffn],
            &channel_mean_abs(&inputs.down_in, ffn),
            &b.down,
            h,
            ffn,
            cfg,
        )?;

        // Fold: the previous op takes 1/s, the projection s.
        unscale_rows_vec(&mut b.attn_norm, &s_qkv);
        scale_cols(&mut b.q, &s_qkv);
        scale_cols(&mut b.k, &s_qkv);
        scale_cols(&mut b.v, &s_qkv);
        unscale_rows(&mut b.v, &s_v);
        scale_cols(&mut b.o, &s_o);
        unscale_rows_vec(&mut b.mlp_norm, &s_gu);
        scale_cols(&mut b.gate, &s_gu);
        scale_cols(&mut b.up, &s_gu);
        unscale_rows(&mut b.up, &s_d);
        scale_cols(&mut b.down, &s_d);

        // Parameter search (clipping and zero-point refits) and GPTQ compensation, on
        // the scaled weights and correspondingly scaled inputs (every calibration token).
        let st_qkv = InputStats::new("q/k/v", &inputs.attn_in, &s_qkv, cfg)?;
        let st_o = InputStats::new("o_proj", &inputs.o_in, &s_o, cfg)?;
        let st_gu = InputStats::new("gate/up", &inputs.mlp_in, &s_gu, cfg)?;
        let st_d = InputStats::new("down_proj", &inputs.down_in, &s_d, cfg)?;
        let lin = |t: LayerTensor, w: &[f32], stats: &InputStats| {
            let role = TensorRole::Layer {
                layer: li,
                tensor: t,
            };
            let shape = role.expected_shape(config);
            quantize_linear(&role.hf_name(), w, shape[0], shape[1], cfg, stats)
        };
        layers.push(QuantizedLayer {
            q_proj: lin(LayerTensor::Q, &b.q, &st_qkv)?,
            k_proj: lin(LayerTensor::K, &b.k, &st_qkv)?,
            v_proj: lin(LayerTensor::V, &b.v, &st_qkv)?,
            o_proj: lin(LayerTensor::O, &b.o, &st_o)?,
            gate_proj: lin(LayerTensor::Gate, &b.gate, &st_gu)?,
            up_proj: lin(LayerTensor::Up, &b.up, &st_gu)?,
            down_proj: lin(LayerTensor::Down, &b.down, &st_d)?,
            attn_norm: b.attn_norm,
            mlp_norm: b.mlp_norm,
        });
        let search = LayerSearch {
            alpha: [a_qkv, a_o, a_gu, a_d],
            error_ratio: [r_qkv, r_o, r_gu, r_d],
        };
        tracing::debug!(layer = li, alpha = ?search.alpha, error_ratio = ?search.error_ratio, "awq block");
        searches.push(search);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let embed_tokens = match cfg.embedding {
        EmbeddingQuant::Int4 if weights.is_tied() => {
            // The head's inputs: the final norm of the last block's output.
            let mut y = vec![0f32; t * h];
            cpu::rms_norm(&x, &weights.norm().to_f32_vec(), c.rms_norm_eps, &mut y)
                .map_err(kern("calib final norm"))?;
            let stats = InputStats::new("lm_head", &y, &vec![1.0; h], cfg)?;
            let table = weights.embed_tokens().to_f32_vec();
            let q = quantize_linear("model.embed_tokens", &table, c.vocab_size, h, cfg, &stats)?;
            tracing::debug!(bytes = q.size_in_bytes(), "int4 embedding/head");
            QuantizedEmbedding::Int4(q)
        }
        EmbeddingQuant::Int4 | EmbeddingQuant::Dense => {
            QuantizedEmbedding::Dense(weights.embed_tokens().clone())
        }
    };
    let weights = QuantizedWeights {
        embed_tokens,
        layers,
        norm: weights.norm().clone(),
        lm_head: (!weights.is_tied()).then(|| weights.lm_head().clone()),
        group_size: cfg.group_size,
    };
    weights.validate(config)?;
    tracing::info!(
        blocks = searches.len(),
        calibration_tokens = t,
        search_tokens = ts,
        secs = started.elapsed().as_secs_f32(),
        "AWQ quantisation done"
    );
    Ok(AwqOutcome {
        weights,
        layers: searches,
    })
}

/// `norm[c] /= s[c]`.
fn unscale_rows_vec(norm: &mut [f32], s: &[f32]) {
    for (v, &f) in norm.iter_mut().zip(s) {
        *v /= f;
    }
}

fn layer_bar(progress: Progress, len: u64) -> indicatif::ProgressBar {
    match progress {
        Progress::Bar => {
            let bar = indicatif::ProgressBar::new(len);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {pos}/{len} blocks ({elapsed}, eta {eta})",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message("AWQ");
            bar
        }
        _ => indicatif::ProgressBar::hidden(),
    }
}
