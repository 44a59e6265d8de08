//! Perplexity of a model on a token stream: the accuracy measure for quantisation.

use batos_kernels::KvCacheLayout;
use batos_types::BlockId;

use crate::forward::{ForwardBatch, KvCacheMut, LlamaModel, LogitsRows, SeqStep};

use super::error::QuantError;

/// Tokens per block of the evaluation's private cache.
const BLOCK: usize = 16;

/// A private paged cache sized for one window.
struct WindowCache {
    layout: KvCacheLayout,
    num_blocks: usize,
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl WindowCache {
    fn new(model: &LlamaModel, tokens: usize) -> Result<Self, QuantError> {
        let d = model.dims();
        let layout = KvCacheLayout::new(BLOCK, d.num_kv_heads, d.head_dim).map_err(|source| {
            QuantError::Kernel {
                op: "perplexity cache",
                source,
            }
        })?;
        let num_blocks = tokens.div_ceil(BLOCK).max(1);
        let len = num_blocks * layout.block_stride();
        Ok(WindowCache {
            layout,
            num_blocks,
            layers: (0..d.num_layers)
                .map(|_| (vec![0.0; len], vec![0.0; len]))
                .collect(),
        })
    }
}

impl KvCacheMut for WindowCache {
    fn layout(&self) -> KvCacheLayout {
        self.layout
    }
    fn num_layers(&self) -> usize {
        self.layers.len()
    }
    fn num_blocks(&self) -> usize {
        self.num_blocks
    }
    fn layer_mut(&mut self, layer: usize) -> Option<(&mut [f32], &mut [f32])> {
        let (k, v) = self.layers.get_mut(layer)?;
        Some((k, v))
    }
}

/// Logits `[tokens.len(), vocab]` for every position of one sequence, computed in one
/// prefill step from an empty cache.
pub fn sequence_logits(model: &LlamaModel, tokens: &[u32]) -> Result<Vec<f32>, QuantError> {
    let mut cache = WindowCache::new(model, tokens.len())?;
    let table = (0..cache.num_blocks as u32).map(BlockId).collect();
    let step = SeqStep::new(tokens.to_vec(), 0, table).with_logits(LogitsRows::All);
    let out = model.forward(&ForwardBatch::new(vec![step]), &mut cache)?;
    Ok(out.logits)
}

/// The result of [`perplexity`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perplexity {
    /// `exp(mean negative log-likelihood)`.
    pub perplexity: f64,
    /// Mean negative log-likelihood per predicted token (nats).
    pub mean_nll: f64,
    /// Tokens predicted.
    pub tokens: usize,
}

/// Perplexity on `tokens`, cut into non-overlapping windows of `window` tokens, each
/// scored from an empty context (every token after a window's first is predicted).
/// Sums run in f64 in token order, so the result is deterministic.
pub fn perplexity(
    model: &LlamaModel,
    tokens: &[u32],
    window: usize,
) -> Result<Perplexity, QuantError> {
    if window < 2 || tokens.len() < 2 {
        return Err(QuantError::InvalidConfig {
            field: "perplexity window",
            reason: format!(
                "need a window of at least 2 tokens and 2 tokens of text (window {window}, text {})",
                tokens.len()
            ),
        });
    }
    let vocab = model.dims().vocab_size;
    let (mut nll, mut count) = (0f64, 0usize);
    for chunk in tokens.chunks(window).filter(|c| c.len() >= 2) {
        let logits = sequence_logits(model, chunk)?;
        for (row, &next) in logits.chunks_exact(vocab).zip(&chunk[1..]) {
            nll += neg_log_softmax(row, next as usize);
            count += 1;
        }
    }
    let mean_nll = nll / count as f64;
    Ok(Perplexity {
        perplexity: mean_nll.exp(),
        mean_nll,
        tokens: count,
    })
}

/// `−log softmax(row)[target]`, in f64.
fn neg_log_softmax(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    max + sum.ln() - row[target] as f64
}
