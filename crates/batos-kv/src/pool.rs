use std::collections::{BTreeMap, HashMap};

use batos_types::BlockId;

use crate::{BlockHash, KvError, OutOfBlocks};

#[derive(Clone, Debug, Default)]
struct BlockMeta {
    ref_count: u32,
    /// Set once the block is full, computed and registered in the prefix cache.
    hash: Option<BlockHash>,
    /// Position in the eviction queue while the block is cached and unreferenced.
    lru_tick: Option<u64>,
}

/// Block bookkeeping for one pool: reference counts, the free list, the prefix cache of
/// full blocks and its LRU eviction queue. Holds no K/V data (see [`crate::KvStorage`]).
///
/// Every block is in exactly one state:
/// - **used**: `ref_count > 0`, owned by one or more block tables;
/// - **cached**: `ref_count == 0` but registered under a [`BlockHash`]; reusable by a
///   prefix hit, evicted least-recently-released first when a fresh block is needed;
/// - **free**: `ref_count == 0` and unregistered.
///
/// ```
/// use batos_kv::{BlockHash, BlockPool};
/// let mut pool = BlockPool::new(2);
/// let b = pool.allocate("demo", 1).unwrap()[0];
/// let h = BlockHash::chain(None, &[1, 2], None);
/// assert!(pool.register(b, h).unwrap());
/// pool.release(b).unwrap();                 // cached, not free: a later prompt may hit it
/// assert_eq!(pool.lookup(&h), Some(b));
/// let both = pool.allocate("demo", 2).unwrap(); // needs every block: evicts `b`
/// assert_eq!(both.len(), 2);
/// assert_eq!(pool.lookup(&h), None);
/// assert_eq!(pool.allocate("demo", 1).unwrap_err().free, 0);
/// ```
#[derive(Debug, Default)]
pub struct BlockPool {
    meta: Vec<BlockMeta>,
    /// Free, uncached blocks; popped from the end (lowest ids first after `new`).
    free: Vec<BlockId>,
    /// Cached blocks with `ref_count == 0`, oldest release first.
    lru: BTreeMap<u64, BlockId>,
    cached: HashMap<BlockHash, BlockId>,
    tick: u64,
}

impl BlockPool {
    /// A pool of `num_blocks` free blocks, ids `0..num_blocks`.
    pub fn new(num_blocks: usize) -> Self {
        let mut pool = BlockPool::default();
        pool.grow(num_blocks);
        pool
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.meta.len()
    }
    /// Blocks an allocation can take now: free plus cached-and-unreferenced.
    pub fn num_available(&self) -> usize {
        self.free.len() + self.lru.len()
    }
    /// Free, unregistered blocks.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }
    /// Unreferenced blocks kept for prefix hits (evictable).
    pub fn num_cached(&self) -> usize {
        self.lru.len()
    }
    /// Blocks referenced by at least one block table.
    pub fn num_used(&self) -> usize {
        self.meta.len() - self.num_available()
    }
    /// Blocks registered in the prefix cache, referenced or not.
    pub fn num_registered(&self) -> usize {
        self.cached.len()
    }

    fn meta(&self, block: BlockId) -> Result<&BlockMeta, KvError> {
        self.meta
            .get(block.index())
            .ok_or(KvError::BlockOutOfRange {
                block,
                num_blocks: self.meta.len(),
            })
    }

    fn meta_mut(&mut self, block: BlockId) -> Result<&mut BlockMeta, KvError> {
        let num_blocks = self.meta.len();
        self.meta
            .get_mut(block.index())
            .ok_or(KvError::BlockOutOfRange { block, num_blocks })
    }

    /// Reference count of `block`.
    pub fn ref_count(&self, block: BlockId) -> Result<u32, KvError> {
        Ok(self.meta(block)?.ref_count)
    }

    /// The prefix-cache hash `block` is registered under, if any.
    pub fn hash_of(&self, block: BlockId) -> Result<Option<BlockHash>, KvError> {
        Ok(self.meta(block)?.hash)
    }

    /// Takes `n` blocks (reference count 1 each), from the free list first, then by
    /// evicting the least recently released cached blocks. All or nothing: on
    /// [`OutOfBlocks`] (tagged with `op`) nothing changes.
    pub fn allocate(&mut self, op: &'static str, n: usize) -> Result<Vec<BlockId>, OutOfBlocks> {
        if n > self.num_available() {
            return Err(OutOfBlocks {
                op,
                needed: n,
                free: self.num_available(),
            });
        }
        Ok((0..n).map(|_| self.take_one()).collect())
    }

    fn take_one(&mut self) -> BlockId {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                // Checked by the caller: free + lru covers the request.
                let (_, b) = self.lru.pop_first().expect("available blocks were counted");
                let m = &mut self.meta[b.index()];
                m.lru_tick = None;
                if let Some(h) = m.hash.take() {
                    self.cached.remove(&h);
                }
                b
            }
        };
        self.meta[block.index()].ref_count = 1;
        block
    }

    /// Adds a reference to `block` (a fork sharing it, or a prefix hit). A cached,
    /// unreferenced block leaves the eviction queue. Taking a reference to a free,
    /// unregistered block is refused: only [`Self::allocate`] hands those out.
    pub fn retain(&mut self, block: BlockId) -> Result<(), KvError> {
        let m = self.meta_mut(block)?;
        if m.ref_count == 0 && m.hash.is_none() {
            return Err(KvError::BlockNotAllocated(block));
        }
        m.ref_count += 1;
        if let Some(t) = m.lru_tick.take() {
            self.lru.remove(&t);
        }
        Ok(())
    }

    /// Drops one reference. At zero a registered block becomes cached (newest in the
    /// eviction queue), an unregistered one becomes free.
    pub fn release(&mut self, block: BlockId) -> Result<(), KvError> {
        let tick = self.tick;
        let m = self.meta_mut(block)?;
        if m.ref_count == 0 {
            return Err(KvError::BlockNotAllocated(block));
        }
        m.ref_count -= 1;
        if m.ref_count == 0 {
            if m.hash.is_some() {
                m.lru_tick = Some(tick);
                self.lru.insert(tick, block);
                self.tick += 1;
            } else {
                self.free.push(block);
            }
        }
        Ok(())
    }

    /// The cached block registered under `hash`, if any (does not take a reference).
    pub fn lookup(&self, hash: &BlockHash) -> Option<BlockId> {
        self.cached.get(hash).copied()
    }

    /// Registers a used, full block under `hash` so later prompts can hit it. Returns
    /// `false` (and changes nothing) if the block is already registered or another block
    /// already holds this hash: the first copy stays the cached one.
    pub fn register(&mut self, block: BlockId, hash: BlockHash) -> Result<bool, KvError> {
        let m = self.meta(block)?;
        if m.ref_count == 0 {
            return Err(KvError::BlockNotAllocated(block));
        }
        if m.hash.is_some() || self.cached.contains_key(&hash) {
            return Ok(false);
        }
        self.meta[block.index()].hash = Some(hash);
        self.cached.insert(hash, block);
        Ok(true)
    }

    /// Adds `n` free blocks with the next ids.
    pub fn grow(&mut self, n: usize) {
        let start = self.meta.len();
        self.meta.resize(start + n, BlockMeta::default());
        // New ids go under the existing free ones, highest at the bottom, so `pop` hands
        // out low ids first and the top of the pool stays free for `shrink_tail`.
        self.free
            .splice(0..0, (start..start + n).rev().map(|i| BlockId(i as u32)));
    }

    /// Removes up to `max` blocks from the top of the id range while they are free or
    /// cached (evicting them); stops at the first used block. Returns how many went.
    pub fn shrink_tail(&mut self, max: usize) -> usize {
        let mut removed = 0;
        while removed < max {
            let Some(last) = self.meta.last() else { break };
            if last.ref_count > 0 {
                break;
            }
            let block = BlockId((self.meta.len() - 1) as u32);
            let m = self.meta.pop().expect("checked non-empty");
            if let Some(t) = m.lru_tick {
                self.lru.remove(&t);
            } else if let Some(pos) = self.free.iter().position(|&b| b == block) {
                self.free.remove(pos);
            }
            if let Some(h) = m.hash {
                self.cached.remove(&h);
            }
            removed += 1;
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(i: u32) -> BlockHash {
        BlockHash::chain(None, &[i], None)
    }

    #[test]
    fn lru_evicts_oldest_release_first() {
        let mut p = BlockPool::new(3);
        let bs = p.allocate("t", 3).unwrap();
        for (i, &b) in bs.iter().enumerate() {
            assert!(p.register(b, h(i as u32)).unwrap());
        }
        // Release order: 2, 0, 1 -> eviction order 2, 0, 1.
        for i in [2, 0, 1] {
            p.release(bs[i]).unwrap();
        }
        assert_eq!(p.num_cached(), 3);
        assert_eq!(p.allocate("t", 1).unwrap(), vec![bs[2]]);
        assert_eq!(p.lookup(&h(2)), None);
        // A hit refreshes nothing but removes the block from the queue.
        p.retain(bs[0]).unwrap();
        assert_eq!(p.allocate("t", 1).unwrap(), vec![bs[1]]);
        let err = p.allocate("t", 1).unwrap_err();
        assert_eq!(
            err,
            OutOfBlocks {
                op: "t",
                needed: 1,
                free: 0
            }
        );
        assert_eq!(p.lookup(&h(0)), Some(bs[0]));
    }

    #[test]
    fn misuse_is_a_typed_error() {
        let mut p = BlockPool::new(1);
        assert!(matches!(
            p.release(BlockId(0)),
            Err(KvError::BlockNotAllocated(_))
        ));
        assert!(matches!(
            p.retain(BlockId(0)),
            Err(KvError::BlockNotAllocated(_))
        ));
        assert!(matches!(
            p.ref_count(BlockId(9)),
            Err(KvError::BlockOutOfRange { .. })
        ));
        let b = p.allocate("t", 1).unwrap()[0];
        assert!(p.register(b, h(1)).unwrap());
        assert!(!p.register(b, h(2)).unwrap(), "already registered");
    }

    #[test]
    fn shrink_stops_at_used_block_and_evicts_cached() {
        let mut p = BlockPool::new(4);
        let bs = p.allocate("t", 4).unwrap();
        p.register(bs[3], h(3)).unwrap();
        p.release(bs[3]).unwrap();
        p.release(bs[2]).unwrap();
        assert_eq!(p.shrink_tail(10), 2);
        assert_eq!(p.num_blocks(), 2);
        assert_eq!(p.lookup(&h(3)), None);
        assert_eq!(p.num_available(), 0);
        p.grow(1);
        assert_eq!(p.allocate("t", 1).unwrap(), vec![BlockId(2)]);
    }
}
