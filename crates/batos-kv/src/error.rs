use batos_types::{BlockId, BudgetError, DType};

use crate::SeqId;

/// The expected "does not fit" outcome: the request needs more blocks than are free or
/// evictable right now. Nothing was changed; the scheduler preempts or waits.
///
/// Operations that can run out of blocks return `Result<Result<T, OutOfBlocks>, KvError>`
/// (as sled's `compare_and_swap` does): the outer error is a failure, the inner one an
/// answer. `?` converts it into [`KvError::OutOfBlocks`] where it is a failure after all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("KV cache out of blocks: {op} needs {needed} free blocks, {free} available")]
pub struct OutOfBlocks {
    /// The operation that was refused.
    pub op: &'static str,
    /// Blocks the operation needs.
    pub needed: usize,
    /// Blocks that are free or evictable now.
    pub free: usize,
}

/// Everything that can go wrong in `batos-kv`. Expected outcomes are not here but in
/// their own types ([`OutOfBlocks`], and [`BudgetError`] when growing the pool), nested
/// inside the `Ok` of the operations that can meet them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// An [`OutOfBlocks`] answer that a caller chose to treat as a failure (via `?`).
    #[error(transparent)]
    OutOfBlocks(#[from] OutOfBlocks),
    /// A configuration field is out of range.
    #[error("invalid KV cache config: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The cache stores only this element type for now.
    #[error("KV cache dtype {got} is not supported (supported: {supported})")]
    UnsupportedDType {
        /// The dtype asked for.
        got: DType,
        /// The one the cache stores.
        supported: DType,
    },
    /// The memory budget cannot hold the pool (or the growth asked for).
    #[error("KV cache pool of {blocks} blocks ({bytes} bytes) does not fit the memory budget")]
    Budget {
        /// Blocks the pool would hold.
        blocks: usize,
        /// Bytes the pool would hold.
        bytes: u64,
        /// The budget's answer (names the budget and what is free).
        #[source]
        source: BudgetError,
    },
    /// No live sequence has this id (never allocated, or already freed).
    #[error("{op}: unknown sequence {seq:?} (never allocated, or already freed)")]
    UnknownSequence {
        /// The id asked for.
        seq: SeqId,
        /// The operation that asked.
        op: &'static str,
    },
    /// A block id outside the pool.
    #[error("block {block:?} is outside the pool of {num_blocks} blocks")]
    BlockOutOfRange {
        /// The block asked for.
        block: BlockId,
        /// Blocks in the pool.
        num_blocks: usize,
    },
    /// Releasing a block whose reference count is already zero.
    #[error("block {0:?} is not allocated (reference count already zero)")]
    BlockNotAllocated(BlockId),
    /// A layer index outside the model.
    #[error("layer {layer} out of range: the cache has {num_layers} layers")]
    LayerOutOfRange {
        /// The layer asked for.
        layer: usize,
        /// Layers in the cache.
        num_layers: usize,
    },
    /// A prompt must contain at least one token.
    #[error("empty prompt: a sequence needs at least one token")]
    EmptyPrompt,
    /// `mark_computed` beyond the tokens the sequence holds, or going backwards.
    #[error("sequence {seq:?}: cannot mark {asked} tokens computed (holds {held}, already computed {computed})")]
    ComputedOutOfRange {
        /// The sequence.
        seq: SeqId,
        /// Tokens asked to mark computed.
        asked: usize,
        /// Tokens the sequence holds.
        held: usize,
        /// Tokens already marked computed.
        computed: usize,
    },
}

impl KvError {
    /// True for an [`OutOfBlocks`] answer passed up as an error.
    pub fn is_out_of_blocks(&self) -> bool {
        matches!(self, KvError::OutOfBlocks(_))
    }
}
