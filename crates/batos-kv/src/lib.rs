//! Paged KV cache of batos.
//!
//! K/V live in fixed-size blocks ([`KvCacheConfig::block_size`] tokens, 16 by default)
//! of one pool whose bytes are reserved from the shared
//! [`MemoryBudget`](batos_types::MemoryBudget) as
//! [`ReservationKind::KvCache`](batos_types::ReservationKind::KvCache). Per layer there
//! is one K and one V buffer of f32, `[num_blocks, block_size, num_kv_heads, head_dim]`
//! ([`KvLayout`]); token `p` of a sequence lives in slot
//! `table[p / block_size] * block_size + p % block_size`.
//!
//! - [`KvCacheManager`]: the facade the engine owns. Sequences by [`SeqId`]; it hands out
//!   plain data ([`BlockTable`], slot lists) and the [`KvStorage`] buffers.
//! - [`BlockPool`]: reference counts, free list, prefix cache and its LRU queue.
//! - Forks share blocks; the first write into a shared, partly filled block copies it.
//! - Prefix caching: full, computed blocks are keyed by a 256-bit BLAKE3 chain
//!   ([`BlockHash`]) over (parent hash, adapter generation, token ids), so a hit never
//!   crosses adapters or differs in a token. Freed blocks stay cached until a fresh
//!   block is needed, then the least recently released goes first.
//! - "Does not fit" is [`OutOfBlocks`], an expected outcome the scheduler preempts on,
//!   kept apart from failures: `Result<Result<T, OutOfBlocks>, KvError>`. It never panics
//!   and changes nothing.
//!
//! Invariant: `kv` never sees adapter weights, only [`AdapterGeneration`](batos_types::AdapterGeneration)
//! in hashes.

mod config;
mod error;
mod hash;
mod manager;
mod pool;
mod storage;
mod table;

pub use config::{KvCacheConfig, KvLayout, KvShape};
pub use error::{KvError, OutOfBlocks};
pub use hash::BlockHash;
pub use manager::{KvCacheManager, KvStats, PromptAllocation, SeqId};
pub use pool::BlockPool;
pub use storage::{KvStorage, LayerKv, LayerKvMut};
pub use table::BlockTable;
