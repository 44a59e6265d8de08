use std::collections::HashMap;

use batos_types::{AdapterGeneration, BlockId, BudgetError, MemoryBudget};

use crate::{
    BlockHash, BlockPool, BlockTable, KvCacheConfig, KvError, KvLayout, KvStorage, OutOfBlocks,
};

/// Id of one sequence in a [`KvCacheManager`]; a request with `n > 1` owns several
/// (see [`KvCacheManager::fork`]). Ids are assigned by the manager and never reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SeqId(pub u64);

/// What [`KvCacheManager::allocate_prompt`] gives back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptAllocation {
    /// The new sequence.
    pub seq: SeqId,
    /// Leading prompt tokens whose K/V are already in the cache (a multiple of the block
    /// size, always less than the prompt length): the model computes from here on.
    pub cached_tokens: usize,
    /// Slots of the positions `cached_tokens..prompt.len()`, to scatter their K/V into.
    pub slots: Vec<usize>,
}

/// Block and prefix-cache figures for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvStats {
    /// Blocks in the pool.
    pub total_blocks: usize,
    /// Free, unregistered blocks.
    pub free_blocks: usize,
    /// Unreferenced blocks kept for prefix hits (evictable on demand).
    pub cached_blocks: usize,
    /// Blocks referenced by live sequences.
    pub used_blocks: usize,
    /// Live sequences.
    pub sequences: usize,
    /// Prompt tokens looked up in the prefix cache so far.
    pub prompt_tokens: u64,
    /// Of those, tokens served from the cache.
    pub hit_tokens: u64,
}

impl KvStats {
    /// Fraction of prompt tokens served from the prefix cache (0 before any prompt).
    pub fn hit_rate(&self) -> f64 {
        if self.prompt_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.prompt_tokens as f64
        }
    }
}

#[derive(Clone, Debug)]
struct Sequence {
    table: BlockTable,
    tokens: Vec<u32>,
    adapter: Option<AdapterGeneration>,
    /// Tokens whose K/V the model has written (see `mark_computed`).
    computed: usize,
    /// Chain hashes of the sequence's full blocks, in order.
    hashes: Vec<BlockHash>,
    /// Leading full blocks already offered to the prefix cache.
    registered: usize,
}

/// The paged KV cache the engine owns: block storage, the block pool with its prefix
/// cache, and one block table per live sequence.
///
/// The engine talks to it in sequence ids and token ids; the model receives only plain
/// data from it (block tables, slot lists, the [`KvStorage`] buffers) and never
/// allocates. Copy-on-write copies are performed inside [`Self::append_tokens`] on the
/// host storage before the new slots are returned, so returned slots are always safe to
/// write.
///
/// Lifecycle of a sequence: [`Self::allocate_prompt`] → the model writes K/V for the
/// uncached positions → [`Self::mark_computed`] (full blocks become prefix-cache entries)
/// → [`Self::append_tokens`] / [`Self::mark_computed`] per decode step →
/// [`Self::free`]. Blocks enter the prefix cache only once marked computed, so a hit
/// never reads K/V that has not been written yet.
///
/// ```
/// use batos_kv::{KvCacheConfig, KvCacheManager, KvError, KvShape};
/// use batos_types::MemoryBudget;
/// # fn main() -> Result<(), KvError> {
/// let shape = KvShape { num_layers: 2, num_kv_heads: 1, head_dim: 4 };
/// let cfg = KvCacheConfig::new(shape, 1 << 20)?.with_block_size(4)?;
/// let budget = MemoryBudget::new("host", 1 << 20);
/// let mut kv = KvCacheManager::new(cfg, &budget)?;
///
/// let prompt = [10, 11, 12, 13, 14, 15, 16, 17, 18];
/// // The outer `?` passes failures up; a scheduler matches the inner answer.
/// let a = match kv.allocate_prompt(&prompt, None)? {
///     Ok(a) => a,
///     Err(full) => unreachable!("an empty pool has room: {full}"),
/// };
/// assert_eq!((a.cached_tokens, a.slots.len()), (0, 9));
/// // ... the model writes K/V into a.slots ...
/// kv.mark_computed(a.seq, prompt.len())?;
///
/// // Same prompt again: the two full blocks come from the cache.
/// let b = kv.allocate_prompt(&prompt, None)??; // `??`: out of blocks as an error
/// assert_eq!(b.cached_tokens, 8);
/// let next = kv.append_tokens(b.seq, &[19])??;
/// assert_eq!(next.len(), 1);
/// kv.free(a.seq)?;
/// kv.free(b.seq)?;
/// assert_eq!(kv.stats().used_blocks, 0);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct KvCacheManager {
    config: KvCacheConfig,
    storage: KvStorage,
    pool: BlockPool,
    seqs: HashMap<SeqId, Sequence>,
    next_seq: u64,
    prompt_tokens: u64,
    hit_tokens: u64,
}

impl KvCacheManager {
    /// A cache of `config.num_blocks()` blocks whose bytes are reserved from `budget`
    /// ([`KvError::Budget`] if they do not fit).
    pub fn new(config: KvCacheConfig, budget: &MemoryBudget) -> Result<Self, KvError> {
        let storage = KvStorage::new(&config, budget)?;
        Ok(KvCacheManager {
            pool: BlockPool::new(config.num_blocks()),
            config,
            storage,
            seqs: HashMap::new(),
            next_seq: 0,
            prompt_tokens: 0,
            hit_tokens: 0,
        })
    }

    /// The configuration the cache was built with (pool size as first built).
    pub fn config(&self) -> &KvCacheConfig {
        &self.config
    }
    /// The current storage layout (follows grow/shrink).
    pub fn layout(&self) -> KvLayout {
        self.storage.layout()
    }
    /// The K/V buffers, read-only.
    pub fn storage(&self) -> &KvStorage {
        &self.storage
    }
    /// The K/V buffers, for the model's forward pass.
    pub fn storage_mut(&mut self) -> &mut KvStorage {
        &mut self.storage
    }
    /// The block pool, read-only (reference counts, cache state).
    pub fn pool(&self) -> &BlockPool {
        &self.pool
    }

    fn block_size(&self) -> usize {
        self.config.block_size()
    }

    fn seq(&self, seq: SeqId, op: &'static str) -> Result<&Sequence, KvError> {
        self.seqs
            .get(&seq)
            .ok_or(KvError::UnknownSequence { seq, op })
    }

    /// Whether a new prompt of `n_tokens` fits now, not counting prefix hits.
    pub fn can_allocate(&self, n_tokens: usize) -> bool {
        n_tokens.div_ceil(self.block_size()) <= self.pool.num_available()
    }

    /// Blocks that appending `n` tokens to `seq` would take (including a copy-on-write
    /// copy of a shared last block).
    pub fn blocks_needed_to_append(&self, seq: SeqId, n: usize) -> Result<usize, KvError> {
        let s = self.seq(seq, "blocks_needed_to_append")?;
        Ok(self.append_cost(s, n)?.0)
    }

    /// `(blocks needed, whether the last block must be copied first)`.
    fn append_cost(&self, s: &Sequence, n: usize) -> Result<(usize, bool), KvError> {
        if n == 0 {
            return Ok((0, false));
        }
        let bs = self.block_size();
        let t = &s.table;
        let cow = match t.blocks().last() {
            Some(&last) if !t.num_tokens().is_multiple_of(bs) => self.pool.ref_count(last)? > 1,
            _ => false,
        };
        let extra = (t.num_tokens() + n).div_ceil(bs) - t.blocks().len();
        Ok((extra + usize::from(cow), cow))
    }

    /// Starts a sequence for `prompt` under `adapter` (`None`: the base model). Reuses
    /// the longest run of cached full blocks with the same tokens and adapter, leaving
    /// at least the last prompt token to compute, and allocates the rest.
    /// `Ok(Err(OutOfBlocks))` if the rest does not fit (nothing changes).
    pub fn allocate_prompt(
        &mut self,
        prompt: &[u32],
        adapter: Option<AdapterGeneration>,
    ) -> Result<Result<PromptAllocation, OutOfBlocks>, KvError> {
        const OP: &str = "allocate_prompt";
        if prompt.is_empty() {
            return Err(KvError::EmptyPrompt);
        }
        let bs = self.block_size();
        let mut hashes = Vec::with_capacity(prompt.len() / bs);
        extend_chain(&mut hashes, prompt, bs, adapter.as_ref());
        let max_hit = (prompt.len() - 1) / bs;
        let hits: Vec<BlockId> = hashes[..max_hit]
            .iter()
            .map_while(|h| self.pool.lookup(h))
            .collect();
        let idle_hits = hits
            .iter()
            .filter(|&&b| self.pool.ref_count(b).is_ok_and(|r| r == 0))
            .count();
        let new = prompt.len().div_ceil(bs) - hits.len();
        let available = self.pool.num_available() - idle_hits;
        if new > available {
            return Ok(Err(OutOfBlocks {
                op: OP,
                needed: new,
                free: available,
            }));
        }
        // Retain the hits first: allocating may evict, and must not evict these.
        for &b in &hits {
            self.pool.retain(b)?;
        }
        let mut blocks = hits;
        let cached_blocks = blocks.len();
        blocks.extend(self.pool.allocate(OP, new)?);
        let table = BlockTable::new(blocks, prompt.len(), bs);
        let cached_tokens = cached_blocks * bs;
        let slots = table
            .slots(cached_tokens..prompt.len())
            .expect("range lies within the table");
        self.prompt_tokens += prompt.len() as u64;
        self.hit_tokens += cached_tokens as u64;
        let seq = SeqId(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(
            seq,
            Sequence {
                table,
                tokens: prompt.to_vec(),
                adapter,
                computed: cached_tokens,
                hashes,
                registered: cached_blocks,
            },
        );
        Ok(Ok(PromptAllocation {
            seq,
            cached_tokens,
            slots,
        }))
    }

    /// Appends `tokens` to `seq` and returns their slots. A shared, partly filled last
    /// block is first copied (all layers, K and V) into a private block. All or nothing:
    /// `Ok(Err(OutOfBlocks))` changes nothing.
    pub fn append_tokens(
        &mut self,
        seq: SeqId,
        tokens: &[u32],
    ) -> Result<Result<Vec<usize>, OutOfBlocks>, KvError> {
        const OP: &str = "append_tokens";
        let s = self.seq(seq, OP)?;
        let (needed, cow) = self.append_cost(s, tokens.len())?;
        if needed > self.pool.num_available() {
            return Ok(Err(OutOfBlocks {
                op: OP,
                needed,
                free: self.pool.num_available(),
            }));
        }
        let bs = self.block_size();
        let mut fresh = self.pool.allocate(OP, needed)?;
        let s = self.seqs.get_mut(&seq).expect("looked up above");
        if cow {
            let dst = fresh.pop().expect("one block was counted for the copy");
            let last = s.table.blocks().len() - 1;
            let src = s.table.blocks()[last];
            self.storage.copy_block(src, dst)?;
            self.pool.release(src)?;
            s.table.blocks_mut()[last] = dst;
        }
        s.table.blocks_mut().extend(fresh);
        let old = s.tokens.len();
        s.tokens.extend_from_slice(tokens);
        s.table.set_num_tokens(s.tokens.len());
        extend_chain(&mut s.hashes, &s.tokens, bs, s.adapter.as_ref());
        let slots = s.table.slots(old..s.tokens.len());
        Ok(Ok(slots.expect("range lies within the table")))
    }

    /// Records that the K/V of `seq`'s first `num_computed` tokens are written. Full
    /// blocks among them become prefix-cache entries. Going backwards or past the
    /// sequence is [`KvError::ComputedOutOfRange`].
    pub fn mark_computed(&mut self, seq: SeqId, num_computed: usize) -> Result<(), KvError> {
        let bs = self.block_size();
        let s = self.seqs.get_mut(&seq).ok_or(KvError::UnknownSequence {
            seq,
            op: "mark_computed",
        })?;
        if num_computed < s.computed || num_computed > s.tokens.len() {
            return Err(KvError::ComputedOutOfRange {
                seq,
                asked: num_computed,
                held: s.tokens.len(),
                computed: s.computed,
            });
        }
        s.computed = num_computed;
        let full = num_computed / bs;
        while s.registered < full {
            let i = s.registered;
            self.pool.register(s.table.blocks()[i], s.hashes[i])?;
            s.registered += 1;
        }
        Ok(())
    }

    /// A new sequence sharing all of `seq`'s blocks (n > 1 sampling, shared prompts).
    /// Takes no blocks now; the first append into a shared, partly filled block copies it.
    pub fn fork(&mut self, seq: SeqId) -> Result<SeqId, KvError> {
        let child = self.seq(seq, "fork")?.clone();
        for &b in child.table.blocks() {
            self.pool.retain(b)?;
        }
        let id = SeqId(self.next_seq);
        self.next_seq += 1;
        self.seqs.insert(id, child);
        Ok(id)
    }

    /// Ends `seq` and releases its blocks. Registered full blocks stay cached for later
    /// prompts; they are released last-block-first, so eviction takes a chain's tail
    /// before its head.
    pub fn free(&mut self, seq: SeqId) -> Result<(), KvError> {
        let s = self
            .seqs
            .remove(&seq)
            .ok_or(KvError::UnknownSequence { seq, op: "free" })?;
        for &b in s.table.blocks().iter().rev() {
            self.pool.release(b)?;
        }
        Ok(())
    }

    /// `seq`'s block table.
    pub fn block_table(&self, seq: SeqId) -> Result<&BlockTable, KvError> {
        Ok(&self.seq(seq, "block_table")?.table)
    }

    /// `seq`'s token ids (prompt and appended).
    pub fn tokens(&self, seq: SeqId) -> Result<&[u32], KvError> {
        Ok(&self.seq(seq, "tokens")?.tokens)
    }

    /// Tokens of `seq` marked computed.
    pub fn num_computed(&self, seq: SeqId) -> Result<usize, KvError> {
        Ok(self.seq(seq, "num_computed")?.computed)
    }

    /// Live sequence ids, in no particular order.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().copied()
    }

    /// Block, sequence and prefix-cache figures.
    pub fn stats(&self) -> KvStats {
        KvStats {
            total_blocks: self.pool.num_blocks(),
            free_blocks: self.pool.num_free(),
            cached_blocks: self.pool.num_cached(),
            used_blocks: self.pool.num_used(),
            sequences: self.seqs.len(),
            prompt_tokens: self.prompt_tokens,
            hit_tokens: self.hit_tokens,
        }
    }

    /// Adds `n` blocks, reserving their bytes from the budget first. `Ok(Err(_))` if the
    /// budget cannot grant them (an expected answer; nothing changes then).
    pub fn grow_blocks(&mut self, n: usize) -> Result<Result<(), BudgetError>, KvError> {
        if self.pool.num_blocks() + n > u32::MAX as usize {
            return Err(KvError::InvalidConfig {
                field: "num_blocks",
                value: (self.pool.num_blocks() + n) as u64,
                reason: "more blocks than a BlockId (u32) can address",
            });
        }
        if let Err(e) = self.storage.grow(n) {
            return Ok(Err(e));
        }
        self.pool.grow(n);
        Ok(Ok(()))
    }

    /// Gives back up to `max` blocks from the top of the pool while they are free or
    /// cached (evicting those), returning their bytes to the budget. Stops at the first
    /// block a sequence holds. Returns how many blocks went.
    pub fn shrink_blocks(&mut self, max: usize) -> usize {
        let removed = self.pool.shrink_tail(max);
        self.storage.shrink(removed);
        removed
    }
}

/// Extends `chain` (the hashes of the first `chain.len()` full blocks of `tokens`) to
/// every full block of `tokens`.
fn extend_chain(
    chain: &mut Vec<BlockHash>,
    tokens: &[u32],
    bs: usize,
    adapter: Option<&AdapterGeneration>,
) {
    for i in chain.len()..tokens.len() / bs {
        let h = BlockHash::chain(chain.last(), &tokens[i * bs..(i + 1) * bs], adapter);
        chain.push(h);
    }
}
