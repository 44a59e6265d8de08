use std::ops::Range;

use batos_types::BlockId;

/// The blocks of one sequence and how many of their slots hold tokens. Plain data: the
/// model reads [`BlockTable::blocks`] and slot indices, never the pool.
///
/// Token `p` lives in `blocks()[p / block_size]` at offset `p % block_size`; its slot is
/// `block * block_size + offset`. Only [`crate::KvCacheManager`] changes a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    num_tokens: usize,
    block_size: usize,
}

impl BlockTable {
    pub(crate) fn new(blocks: Vec<BlockId>, num_tokens: usize, block_size: usize) -> Self {
        debug_assert_eq!(blocks.len(), num_tokens.div_ceil(block_size));
        BlockTable {
            blocks,
            num_tokens,
            block_size,
        }
    }

    pub(crate) fn blocks_mut(&mut self) -> &mut Vec<BlockId> {
        &mut self.blocks
    }

    pub(crate) fn set_num_tokens(&mut self, n: usize) {
        self.num_tokens = n;
    }

    /// The block ids, in token order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }
    /// Tokens (filled slots) in the sequence.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }
    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Slots still empty in the last block.
    pub fn spare_slots(&self) -> usize {
        self.blocks.len() * self.block_size - self.num_tokens
    }

    /// The slot of the token at position `pos`, if the sequence holds it.
    pub fn slot(&self, pos: usize) -> Option<usize> {
        (pos < self.num_tokens).then(|| {
            self.blocks[pos / self.block_size].index() * self.block_size + pos % self.block_size
        })
    }

    /// The slots of positions `range`, or `None` if it reaches past the sequence.
    ///
    /// ```
    /// use batos_kv::{KvCacheConfig, KvCacheManager, KvShape};
    /// use batos_types::MemoryBudget;
    /// let shape = KvShape { num_layers: 1, num_kv_heads: 1, head_dim: 8 };
    /// let cfg = KvCacheConfig::new(shape, 1 << 20).unwrap().with_block_size(4).unwrap();
    /// let mut kv = KvCacheManager::new(cfg, &MemoryBudget::new("host", 1 << 20)).unwrap();
    /// let a = kv.allocate_prompt(&[1, 2, 3, 4, 5, 6], None).unwrap().unwrap();
    /// let t = kv.block_table(a.seq).unwrap();
    /// let b = t.blocks();
    /// let expect: Vec<usize> = (0..6).map(|p| b[p / 4].index() * 4 + p % 4).collect();
    /// assert_eq!(t.slots(0..6).unwrap(), expect);
    /// assert_eq!(t.slots(5..7), None);
    /// ```
    pub fn slots(&self, range: Range<usize>) -> Option<Vec<usize>> {
        if range.end > self.num_tokens {
            return None;
        }
        range.map(|p| self.slot(p)).collect()
    }
}
