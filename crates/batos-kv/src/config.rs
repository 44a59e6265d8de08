use batos_types::DType;

use crate::KvError;

/// The per-model shape of the KV cache: what one token costs in every layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvShape {
    /// Transformer layers (one K and one V buffer each).
    pub num_layers: usize,
    /// Key/value heads per layer (GQA: fewer than query heads).
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

/// A validated KV-cache configuration. Build with [`KvCacheConfig::new`], then adjust
/// with the `with_*` methods; every constructor checks its fields.
///
/// ```
/// use batos_kv::{KvCacheConfig, KvShape};
/// let shape = KvShape { num_layers: 30, num_kv_heads: 3, head_dim: 64 };
/// let cfg = KvCacheConfig::new(shape, 64 << 20).unwrap();
/// assert_eq!(cfg.block_size(), 16);
/// // 30 layers * (K + V) * 16 tokens * 3 heads * 64 dims * 4 bytes
/// assert_eq!(cfg.bytes_per_block(), 30 * 2 * 16 * 3 * 64 * 4);
/// assert_eq!(cfg.num_blocks(), (64 << 20) / cfg.bytes_per_block() as usize);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvCacheConfig {
    shape: KvShape,
    block_size: usize,
    dtype: DType,
    pool_bytes: u64,
    bytes_per_block: u64,
}

impl KvCacheConfig {
    /// Tokens per block unless set otherwise.
    pub const DEFAULT_BLOCK_SIZE: usize = 16;

    /// A pool of at most `pool_bytes` bytes (rounded down to whole blocks) for a model of
    /// `shape`, with 16-token blocks and f32 storage.
    pub fn new(shape: KvShape, pool_bytes: u64) -> Result<Self, KvError> {
        Self::build(shape, Self::DEFAULT_BLOCK_SIZE, DType::F32, pool_bytes)
    }

    /// The same configuration with `block_size` tokens per block.
    pub fn with_block_size(self, block_size: usize) -> Result<Self, KvError> {
        Self::build(self.shape, block_size, self.dtype, self.pool_bytes)
    }

    /// The same configuration storing `dtype` (only [`DType::F32`] for now).
    pub fn with_dtype(self, dtype: DType) -> Result<Self, KvError> {
        Self::build(self.shape, self.block_size, dtype, self.pool_bytes)
    }

    /// The same configuration with a pool of `pool_bytes` bytes.
    pub fn with_pool_bytes(self, pool_bytes: u64) -> Result<Self, KvError> {
        Self::build(self.shape, self.block_size, self.dtype, pool_bytes)
    }

    /// The same configuration with a pool of exactly `num_blocks` blocks.
    pub fn with_num_blocks(self, num_blocks: usize) -> Result<Self, KvError> {
        let bytes =
            self.bytes_per_block
                .checked_mul(num_blocks as u64)
                .ok_or(KvError::InvalidConfig {
                    field: "num_blocks",
                    value: num_blocks as u64,
                    reason: "pool size overflows u64 bytes",
                })?;
        Self::build(self.shape, self.block_size, self.dtype, bytes)
    }

    fn build(
        shape: KvShape,
        block_size: usize,
        dtype: DType,
        pool_bytes: u64,
    ) -> Result<Self, KvError> {
        let nonzero = |field, value: usize| {
            if value == 0 {
                Err(KvError::InvalidConfig {
                    field,
                    value: 0,
                    reason: "must be at least 1",
                })
            } else {
                Ok(value as u64)
            }
        };
        let dims = [
            nonzero("block_size", block_size)?,
            nonzero("num_layers", shape.num_layers)?,
            nonzero("num_kv_heads", shape.num_kv_heads)?,
            nonzero("head_dim", shape.head_dim)?,
        ];
        if dtype != DType::F32 {
            return Err(KvError::UnsupportedDType {
                got: dtype,
                supported: DType::F32,
            });
        }
        let elem = 4u64; // f32
        let overflow = KvError::InvalidConfig {
            field: "block_size",
            value: block_size as u64,
            reason: "bytes per block overflow u64",
        };
        // layers * (K and V) * block_size * kv_heads * head_dim * bytes per element
        let bytes_per_block = dims
            .iter()
            .try_fold(2 * elem, |acc, &d| acc.checked_mul(d))
            .ok_or(overflow)?;
        let num_blocks = pool_bytes / bytes_per_block;
        if num_blocks == 0 {
            return Err(KvError::InvalidConfig {
                field: "pool_bytes",
                value: pool_bytes,
                reason: "smaller than one block",
            });
        }
        if num_blocks > u64::from(u32::MAX) {
            return Err(KvError::InvalidConfig {
                field: "pool_bytes",
                value: pool_bytes,
                reason: "more blocks than a BlockId (u32) can address",
            });
        }
        // Every slot index (block * block_size + offset) and every element index of one
        // layer buffer must fit a usize.
        let layer_elems = num_blocks
            .checked_mul(dims[0] * dims[2] * dims[3])
            .filter(|&n| usize::try_from(n).is_ok());
        if layer_elems.is_none() {
            return Err(KvError::InvalidConfig {
                field: "pool_bytes",
                value: pool_bytes,
                reason: "one layer buffer would not be addressable by usize",
            });
        }
        Ok(KvCacheConfig {
            shape,
            block_size,
            dtype,
            pool_bytes,
            bytes_per_block,
        })
    }

    /// The model shape.
    pub fn shape(&self) -> KvShape {
        self.shape
    }
    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Element type of the K/V buffers.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    /// Pool size asked for, in bytes (the pool uses `num_blocks() * bytes_per_block()`).
    pub fn pool_bytes(&self) -> u64 {
        self.pool_bytes
    }
    /// Bytes one block costs across all layers, K and V.
    pub fn bytes_per_block(&self) -> u64 {
        self.bytes_per_block
    }
    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        (self.pool_bytes / self.bytes_per_block) as usize
    }
    /// The storage layout of a pool of [`Self::num_blocks`] blocks.
    pub fn layout(&self) -> KvLayout {
        KvLayout {
            num_blocks: self.num_blocks(),
            block_size: self.block_size,
            num_kv_heads: self.shape.num_kv_heads,
            head_dim: self.shape.head_dim,
        }
    }
}

/// How one layer's K (or V) buffer is laid out: f32, row-major
/// `[num_blocks, block_size, num_kv_heads, head_dim]`, contiguous. Plain data the
/// kernels receive alongside the buffers.
///
/// A token at position `p` of a sequence with block table `t` lives in slot
/// `t[p / block_size] * block_size + p % block_size`; its K row is
/// `k[slot * slot_width() .. (slot + 1) * slot_width()]`, heads then dims.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvLayout {
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl KvLayout {
    /// Elements of one token (slot) in one layer's K or V: `num_kv_heads * head_dim`.
    pub fn slot_width(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Elements of one block in one layer's K or V.
    pub fn block_elems(&self) -> usize {
        self.block_size * self.slot_width()
    }
    /// Elements of one layer's K (or V) buffer.
    pub fn layer_elems(&self) -> usize {
        self.num_blocks * self.block_elems()
    }
    /// Slots in the pool (`num_blocks * block_size`).
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }
    /// Element range of `slot` in one layer's K or V buffer.
    pub fn slot_range(&self, slot: usize) -> std::ops::Range<usize> {
        let w = self.slot_width();
        slot * w..(slot + 1) * w
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> KvShape {
        KvShape {
            num_layers: 2,
            num_kv_heads: 3,
            head_dim: 4,
        }
    }

    #[test]
    fn rejects_zero_fields_and_names_them() {
        let err = KvCacheConfig::new(
            KvShape {
                num_kv_heads: 0,
                ..shape()
            },
            1 << 20,
        )
        .unwrap_err();
        assert!(err.to_string().contains("num_kv_heads"), "{err}");
        let err = KvCacheConfig::new(shape(), 1 << 20)
            .unwrap()
            .with_block_size(0)
            .unwrap_err();
        assert!(err.to_string().contains("block_size"), "{err}");
    }

    #[test]
    fn rejects_pool_smaller_than_a_block() {
        let per_block = 2 * 2 * 16 * 3 * 4 * 4;
        assert!(KvCacheConfig::new(shape(), per_block - 1).is_err());
        let cfg = KvCacheConfig::new(shape(), per_block).unwrap();
        assert_eq!(cfg.num_blocks(), 1);
    }

    #[test]
    fn rejects_non_f32() {
        let err = KvCacheConfig::new(shape(), 1 << 20)
            .unwrap()
            .with_dtype(DType::F16)
            .unwrap_err();
        assert!(matches!(
            err,
            KvError::UnsupportedDType {
                got: DType::F16,
                ..
            }
        ));
    }

    #[test]
    fn rejects_overflowing_sizes() {
        let huge = KvShape {
            num_layers: usize::MAX,
            ..shape()
        };
        assert!(KvCacheConfig::new(huge, u64::MAX).is_err());
        let tiny = KvShape {
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 1,
        };
        let cfg = KvCacheConfig::new(tiny, 1 << 20)
            .unwrap()
            .with_block_size(1)
            .unwrap();
        assert!(
            cfg.with_pool_bytes(u64::MAX).is_err(),
            "more blocks than u32 ids"
        );
    }

    #[test]
    fn layout_matches_contract() {
        let cfg = KvCacheConfig::new(shape(), 1 << 20)
            .unwrap()
            .with_num_blocks(5)
            .unwrap();
        let l = cfg.layout();
        assert_eq!(l.num_blocks, 5);
        assert_eq!(l.slot_width(), 12);
        assert_eq!(l.block_elems(), 16 * 12);
        assert_eq!(l.layer_elems(), 5 * 16 * 12);
        assert_eq!(l.slot_range(17), 17 * 12..18 * 12);
    }
}
