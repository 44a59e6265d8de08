//! Errors of the forward pass and the generation harness.

use batos_types::{BlockId, SlotIdx};

/// Why a forward step or a generation could not run.
///
/// Every variant names the sequence (its index in the batch) and the sizes involved, so
/// a scheduler bug is found from the message alone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// The batch holds no sequences.
    #[error("forward batch is empty")]
    EmptyBatch,
    /// A sequence contributes no new tokens.
    #[error("sequence {seq} of the batch has no new tokens")]
    NoNewTokens { seq: usize },
    /// A token id is not in the vocabulary.
    #[error("sequence {seq}: token id {token} is outside the vocabulary of {vocab_size}")]
    TokenOutOfVocab {
        seq: usize,
        token: u32,
        vocab_size: usize,
    },
    /// A sequence would grow past the model's context.
    #[error(
        "sequence {seq}: context of {context_len} tokens exceeds the model's maximum of {max_position}"
    )]
    ContextTooLong {
        seq: usize,
        context_len: usize,
        max_position: usize,
    },
    /// The block table does not cover the sequence's context.
    #[error(
        "sequence {seq}: block table has {blocks} blocks but a context of {context_len} tokens needs {needed}"
    )]
    BlockTableTooShort {
        seq: usize,
        context_len: usize,
        blocks: usize,
        needed: usize,
    },
    /// A block id is not in the cache.
    #[error("sequence {seq}: block {block:?} is outside a cache of {num_blocks} blocks")]
    BlockOutOfRange {
        seq: usize,
        block: BlockId,
        num_blocks: usize,
    },
    /// Two new tokens of the batch map to the same cache slot.
    #[error("sequence {seq}: cache slot {slot} is written twice in one step")]
    SlotWrittenTwice { seq: usize, slot: usize },
    /// A sequence names a LoRA slot, which this forward pass cannot apply yet.
    #[error("sequence {seq}: LoRA slot {slot:?} requested, but the forward pass runs the base model only")]
    AdapterUnsupported { seq: usize, slot: SlotIdx },
    /// A sequence names a hot slot the adapter snapshot does not fill.
    #[error("sequence {seq}: LoRA slot {slot:?} is empty (the snapshot has {slots} slots)")]
    EmptyAdapterSlot {
        seq: usize,
        slot: SlotIdx,
        slots: usize,
    },
    /// The device's byte budget cannot hold what is being placed there (weights, hot
    /// adapter stacks): an expected outcome of sizing, reported with the ledger's numbers.
    #[error("device memory budget: no room for {what}: {source}")]
    DeviceBudget {
        what: &'static str,
        #[source]
        source: batos_types::BudgetError,
    },
    /// The cache's shape does not match the model.
    #[error("KV cache {what}: expected {expected}, got {got}")]
    CacheMismatch {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    /// A weight tensor does not have the shape the config implies.
    #[error("weight `{name}`: expected shape {expected:?}, got {got} elements")]
    WeightShape {
        name: String,
        expected: Vec<usize>,
        got: usize,
    },
    /// The model configuration cannot be run.
    #[error("model config: {reason}")]
    BadConfig { reason: String },
    /// A kernel rejected its arguments (a bug in the forward pass, reported not panicked).
    #[error("kernel call failed in {op}")]
    Kernel {
        op: &'static str,
        #[source]
        source: batos_kernels::KernelError,
    },
    /// The paged KV cache failed an operation of the generation harness.
    #[error("KV cache: {0}")]
    Kv(#[from] batos_kv::KvError),
    /// The generation harness ran out of KV blocks (it does not preempt; the engine's
    /// scheduler does).
    #[error("generation harness: {0}")]
    OutOfBlocks(#[from] batos_kv::OutOfBlocks),
    /// A generation request with no prompt tokens.
    #[error("request {request}: the prompt is empty")]
    EmptyPrompt { request: usize },
    /// A prompt that does not fit the model's context.
    #[error("request {request}: prompt of {prompt_len} tokens exceeds the model's context of {max_position}")]
    PromptTooLong {
        request: usize,
        prompt_len: usize,
        max_position: usize,
    },
    /// A generation parameter out of its range.
    #[error("request {request}: invalid generation parameter `{name}`: {reason}")]
    InvalidParam {
        request: usize,
        name: &'static str,
        reason: String,
    },
    /// Stop strings were given but no way to turn tokens into text.
    #[error("request {request}: stop strings need a token decoder")]
    StopStringsNeedDecoder { request: usize },
    /// The token decoder failed.
    #[error("decoding generated tokens failed: {reason}")]
    Decode { reason: String },
}
