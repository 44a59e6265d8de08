//! Plain-data descriptions of attention shapes, the paged KV layout, RoPE and the
//! per-sequence inputs of paged attention.

use crate::error::{KernelError, Result};
use batos_types::BlockId;

/// Head counts of one attention layer (grouped-query attention when
/// `num_kv_heads < num_heads`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionHeads {
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl AttentionHeads {
    /// Checks that every count is non-zero and that `num_heads` is a multiple of
    /// `num_kv_heads`.
    pub fn new(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> Result<Self> {
        let bad = |reason: String| KernelError::InvalidShape {
            op: "AttentionHeads::new",
            what: "head counts",
            reason,
        };
        if num_heads == 0 || num_kv_heads == 0 || head_dim == 0 {
            return Err(bad(format!(
                "num_heads={num_heads}, num_kv_heads={num_kv_heads}, head_dim={head_dim} must all be non-zero"
            )));
        }
        if !num_heads.is_multiple_of(num_kv_heads) {
            return Err(bad(format!(
                "num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}"
            )));
        }
        Ok(AttentionHeads {
            num_heads,
            num_kv_heads,
            head_dim,
        })
    }

    /// Number of query heads.
    pub fn num_heads(&self) -> usize {
        self.num_heads
    }

    /// Number of key/value heads.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }

    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Width of one token's query row, `num_heads * head_dim`.
    pub fn q_width(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of one token's key (or value) row, `num_kv_heads * head_dim`.
    pub fn kv_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// Layout of one layer's paged K (or V) cache: f32
/// `[num_blocks, block_size, num_kv_heads, head_dim]`, contiguous.
///
/// The slot of the token at position `p` of a sequence is
/// `block_table[p / block_size] * block_size + p % block_size`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvCacheLayout {
    block_size: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl KvCacheLayout {
    /// Checks that every dimension is non-zero.
    pub fn new(block_size: usize, num_kv_heads: usize, head_dim: usize) -> Result<Self> {
        if block_size == 0 || num_kv_heads == 0 || head_dim == 0 {
            return Err(KernelError::InvalidShape {
                op: "KvCacheLayout::new",
                what: "cache layout",
                reason: format!(
                    "block_size={block_size}, num_kv_heads={num_kv_heads}, head_dim={head_dim} must all be non-zero"
                ),
            });
        }
        Ok(KvCacheLayout {
            block_size,
            num_kv_heads,
            head_dim,
        })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Key/value heads per token.
    pub fn num_kv_heads(&self) -> usize {
        self.num_kv_heads
    }

    /// Elements per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// f32 elements per token (one slot), `num_kv_heads * head_dim`.
    pub fn slot_stride(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// f32 elements per block.
    pub fn block_stride(&self) -> usize {
        self.block_size * self.slot_stride()
    }

    /// The slot of position `pos` of a sequence with this block table, if the table
    /// is long enough.
    pub fn slot(&self, block_table: &[BlockId], pos: usize) -> Option<usize> {
        block_table
            .get(pos / self.block_size)
            .map(|b| b.index() * self.block_size + pos % self.block_size)
    }
}

/// One sequence's part of a paged-attention batch.
///
/// Its `query_len` new tokens are rows `query_start .. query_start + query_len` of the
/// query matrix and sit at positions `context_len - query_len .. context_len`; each
/// attends causally to positions `0 ..= its own`. Their K/V must already be in the
/// cache (`write_kv` before attention). A decode step is `query_len == 1`; a prefill
/// chunk has `query_len > 1`.
#[derive(Clone, Copy, Debug)]
pub struct SeqAttention<'a> {
    /// Blocks of this sequence, in position order.
    pub block_table: &'a [BlockId],
    /// Tokens in the cache for this sequence, the new ones included.
    pub context_len: usize,
    /// First query row of this sequence.
    pub query_start: usize,
    /// Number of new tokens (query rows) of this sequence.
    pub query_len: usize,
}

/// Llama-3 style frequency scaling of RoPE (transformers' `rope_type = "llama3"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f32,
    pub low_freq_factor: f32,
    pub high_freq_factor: f32,
    pub original_max_position_embeddings: usize,
}

/// How RoPE frequencies are derived from `theta`.
#[derive(Clone, Copy, Debug, PartialEq, Default)]
#[non_exhaustive]
pub enum RopeScaling {
    /// `inv_freq[i] = theta^(-2i/head_dim)`.
    #[default]
    Default,
    /// Llama-3 smoothing between low- and high-frequency bands.
    Llama3(Llama3RopeScaling),
}

/// Rotary position embedding configuration (HF Llama, non-interleaved "rotate_half").
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    /// Base of the frequencies (`rope_theta`).
    pub theta: f32,
    /// Rotated elements per head; must be even.
    pub head_dim: usize,
    pub scaling: RopeScaling,
}

/// Precomputed RoPE inverse frequencies for one [`RopeConfig`].
#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    head_dim: usize,
    inv_freq: Vec<f32>,
}

impl Rope {
    /// Validates the config and computes the inverse frequencies in f32, in the same
    /// order of operations as transformers (`_compute_default_rope_parameters`,
    /// `_compute_llama3_parameters`).
    pub fn new(config: &RopeConfig) -> Result<Self> {
        let bad = |what: &'static str, reason: String| KernelError::InvalidShape {
            op: "Rope::new",
            what,
            reason,
        };
        let dim = config.head_dim;
        if dim == 0 || !dim.is_multiple_of(2) {
            return Err(bad("head_dim", format!("{dim} must be even and non-zero")));
        }
        if !(config.theta.is_finite() && config.theta > 0.0) {
            return Err(bad(
                "theta",
                format!("{} must be finite and > 0", config.theta),
            ));
        }
        let base = config.theta;
        let mut inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / dim as f32;
                // torch: base ** exponent in f32, then 1.0 / that.
                let p = (base as f64).powf(exponent as f64) as f32;
                1.0f32 / p
            })
            .collect();
        if let RopeScaling::Llama3(s) = config.scaling {
            let positive = |v: f32| v.is_finite() && v > 0.0;
            let valid = positive(s.factor)
                && positive(s.low_freq_factor)
                && positive(s.high_freq_factor)
                && s.high_freq_factor > s.low_freq_factor
                && s.original_max_position_embeddings > 0;
            if !valid {
                return Err(bad(
                    "llama3 scaling",
                    format!("{s:?}: need factor > 0, 0 < low_freq_factor < high_freq_factor, original_max_position_embeddings > 0"),
                ));
            }
            let old_ctx = s.original_max_position_embeddings as f32;
            let low_freq_wavelen = old_ctx / s.low_freq_factor;
            let high_freq_wavelen = old_ctx / s.high_freq_factor;
            for f in &mut inv_freq {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                let llama = if wavelen > low_freq_wavelen {
                    *f / s.factor
                } else {
                    *f
                };
                // Frequencies are finite and positive, so the negations in transformers are
                // plain comparisons here.
                let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                *f = if is_medium {
                    let smooth = (old_ctx / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * llama / s.factor + smooth * llama
                } else {
                    llama
                };
            }
        }
        Ok(Rope {
            head_dim: dim,
            inv_freq,
        })
    }

    /// Rotated elements per head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The `head_dim / 2` inverse frequencies.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// `(cos, sin)` of every frequency at `pos`, each `head_dim / 2` long, written into
    /// the given buffers (angles are `pos as f32 * inv_freq`, in f32 as transformers).
    pub fn cos_sin(&self, pos: usize, cos: &mut [f32], sin: &mut [f32]) {
        let p = pos as f32;
        for ((c, s), &f) in cos.iter_mut().zip(sin.iter_mut()).zip(&self.inv_freq) {
            let angle = p * f;
            let (sn, cs) = (angle as f64).sin_cos();
            *c = cs as f32;
            *s = sn as f32;
        }
    }
}
