//! The plain data that crosses the scheduler ↔ model boundary for one forward step.
//!
//! Shaped after vLLM v1's runner inputs: the scheduler decides, per sequence, which new
//! tokens to compute this step and hands over the block table it allocated for them; the
//! model only reads and writes the cache through those tables. Prefill chunks (many new
//! tokens) and decode steps (one new token) mix freely in one batch.

use std::collections::HashSet;
use std::ops::Range;

use batos_types::{BlockId, SlotIdx};

use super::error::ForwardError;

/// Which of a sequence's new tokens need a row of logits in the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogitsRows {
    /// None: an intermediate prefill chunk whose logits nobody samples.
    None,
    /// The last new token only: what sampling the next token needs.
    #[default]
    Last,
    /// Every new token: prompt logprobs and perplexity.
    All,
}

/// One sequence's share of a forward step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqStep {
    /// Token ids to compute this step (a prefill chunk, or one decode token).
    pub token_ids: Vec<u32>,
    /// Number of this sequence's tokens already in the KV cache: the first new token sits
    /// at this position, the rest follow contiguously.
    pub num_cached: usize,
    /// The sequence's blocks, covering at least `num_cached + token_ids.len()` tokens.
    pub block_table: Vec<BlockId>,
    /// The hot LoRA slot every token of this sequence uses; `None` runs the base model.
    /// Flattened to one entry per token by [`ForwardBatch::token_adapters`]. Slots index
    /// the hot snapshot given to `LlamaModel::forward_with_adapters`; the base-only
    /// `LlamaModel::forward` refuses a step naming a slot
    /// ([`ForwardError::AdapterUnsupported`]) rather than silently run the base.
    pub adapter: Option<SlotIdx>,
    /// Which new tokens get logits.
    pub logits: LogitsRows,
}

impl SeqStep {
    /// A step with the default choices: no adapter, logits for the last token.
    pub fn new(token_ids: Vec<u32>, num_cached: usize, block_table: Vec<BlockId>) -> Self {
        SeqStep {
            token_ids,
            num_cached,
            block_table,
            adapter: None,
            logits: LogitsRows::Last,
        }
    }

    /// Sets which tokens get logits.
    pub fn with_logits(mut self, logits: LogitsRows) -> Self {
        self.logits = logits;
        self
    }

    /// Positions of the new tokens.
    pub fn positions(&self) -> Range<usize> {
        self.num_cached..self.context_len()
    }

    /// Tokens in the cache once this step has run (the attention span of its last token).
    pub fn context_len(&self) -> usize {
        self.num_cached + self.token_ids.len()
    }

    /// How many logits rows this sequence contributes.
    pub fn num_logits_rows(&self) -> usize {
        match self.logits {
            LogitsRows::None => 0,
            LogitsRows::Last => 1,
            LogitsRows::All => self.token_ids.len(),
        }
    }
}

/// All sequences computed together in one forward step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ForwardBatch {
    /// The sequences, in the order their logits rows appear in [`ForwardOutput`].
    pub seqs: Vec<SeqStep>,
}

impl ForwardBatch {
    /// A batch of the given sequences.
    pub fn new(seqs: Vec<SeqStep>) -> Self {
        ForwardBatch { seqs }
    }

    /// Total new tokens across sequences (the `T` of every activation `[T, d]`).
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.token_ids.len()).sum()
    }

    /// Total logits rows the output will hold.
    pub fn num_logits_rows(&self) -> usize {
        self.seqs.iter().map(SeqStep::num_logits_rows).sum()
    }

    /// The LoRA slot of every new token, flattened in batch order.
    pub fn token_adapters(&self) -> Vec<Option<SlotIdx>> {
        self.seqs
            .iter()
            .flat_map(|s| std::iter::repeat_n(s.adapter, s.token_ids.len()))
            .collect()
    }
}

/// Geometry the batch is checked against before any work starts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct BatchLimits {
    pub vocab_size: usize,
    pub max_position: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    pub adapters: AdapterSupport,
}

impl BatchLimits {
    /// The limits of one step of a model shaped `dims` into `cache`; a step may name
    /// LoRA slots only when it runs with a hot snapshot.
    pub fn for_step(
        dims: &super::LlamaDims,
        cache: &dyn super::KvCacheMut,
        adapters: Option<&batos_lora::HotSnapshot>,
    ) -> Self {
        BatchLimits {
            vocab_size: dims.vocab_size,
            max_position: dims.max_position,
            block_size: cache.layout().block_size(),
            num_blocks: cache.num_blocks(),
            adapters: match adapters {
                Some(_) => AdapterSupport::HotSlots,
                None => AdapterSupport::BaseOnly,
            },
        }
    }
}

/// Whether the step may name LoRA slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AdapterSupport {
    /// `LlamaModel::forward`: a step naming a slot is refused.
    BaseOnly,
    /// `LlamaModel::forward_with_adapters`: slots index the given hot snapshot.
    HotSlots,
}

/// A validated batch, flattened into the per-token arrays the kernels consume.
#[derive(Debug)]
pub(crate) struct StepPlan {
    pub token_ids: Vec<u32>,
    pub positions: Vec<usize>,
    /// Cache slot (`block * block_size + offset`) each new token's K/V goes to.
    pub slots: Vec<usize>,
    /// Per sequence: the rows of its new tokens in the flat `[T, …]` activations.
    pub seq_rows: Vec<Range<usize>>,
    /// Flat token rows that get logits, in output order.
    pub logits_rows: Vec<usize>,
    /// Per sequence: its rows in the output logits.
    pub output_rows: Vec<Range<usize>>,
}

impl StepPlan {
    /// Checks `batch` against the model and cache geometry and flattens it.
    pub fn new(batch: &ForwardBatch, limits: BatchLimits) -> Result<StepPlan, ForwardError> {
        if batch.seqs.is_empty() {
            return Err(ForwardError::EmptyBatch);
        }
        let total = batch.num_tokens();
        let mut plan = StepPlan {
            token_ids: Vec::with_capacity(total),
            positions: Vec::with_capacity(total),
            slots: Vec::with_capacity(total),
            seq_rows: Vec::with_capacity(batch.seqs.len()),
            logits_rows: Vec::with_capacity(batch.num_logits_rows()),
            output_rows: Vec::with_capacity(batch.seqs.len()),
        };
        let mut written = HashSet::with_capacity(total);
        let bs = limits.block_size;
        for (seq, step) in batch.seqs.iter().enumerate() {
            let n = step.token_ids.len();
            if n == 0 {
                return Err(ForwardError::NoNewTokens { seq });
            }
            if let (Some(slot), AdapterSupport::BaseOnly) = (step.adapter, limits.adapters) {
                return Err(ForwardError::AdapterUnsupported { seq, slot });
            }
            let context_len = step.context_len();
            if context_len > limits.max_position {
                return Err(ForwardError::ContextTooLong {
                    seq,
                    context_len,
                    max_position: limits.max_position,
                });
            }
            let blocks_needed = context_len.div_ceil(bs);
            if step.block_table.len() < blocks_needed {
                return Err(ForwardError::BlockTableTooShort {
                    seq,
                    context_len,
                    blocks: step.block_table.len(),
                    needed: blocks_needed,
                });
            }
            if let Some(block) = step.block_table[..blocks_needed]
                .iter()
                .find(|b| b.index() >= limits.num_blocks)
            {
                return Err(ForwardError::BlockOutOfRange {
                    seq,
                    block: *block,
                    num_blocks: limits.num_blocks,
                });
            }
            let first_row = plan.token_ids.len();
            for (&token, pos) in step.token_ids.iter().zip(step.positions()) {
                if token as usize >= limits.vocab_size {
                    return Err(ForwardError::TokenOutOfVocab {
                        seq,
                        token,
                        vocab_size: limits.vocab_size,
                    });
                }
                let slot = step.block_table[pos / bs].index() * bs + pos % bs;
                if !written.insert(slot) {
                    return Err(ForwardError::SlotWrittenTwice { seq, slot });
                }
                plan.token_ids.push(token);
                plan.positions.push(pos);
                plan.slots.push(slot);
            }
            plan.seq_rows.push(first_row..first_row + n);
            let out_start = plan.logits_rows.len();
            match step.logits {
                LogitsRows::None => {}
                LogitsRows::Last => plan.logits_rows.push(first_row + n - 1),
                LogitsRows::All => plan.logits_rows.extend(first_row..first_row + n),
            }
            plan.output_rows.push(out_start..plan.logits_rows.len());
        }
        Ok(plan)
    }
}

/// What one forward step returns: logits rows for the tokens that asked for them.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardOutput {
    /// Row-major `[rows, vocab_size]`, rows in batch order (see [`LogitsRows`]).
    pub logits: Vec<f32>,
    /// Columns of `logits`.
    pub vocab_size: usize,
    /// Per sequence of the batch: its rows in `logits`.
    pub seq_rows: Vec<Range<usize>>,
}

impl ForwardOutput {
    /// Number of logits rows.
    pub fn num_rows(&self) -> usize {
        self.seq_rows.last().map_or(0, |r| r.end)
    }

    /// One row of logits; `None` past the last row.
    pub fn row(&self, row: usize) -> Option<&[f32]> {
        self.logits
            .get(row * self.vocab_size..(row + 1) * self.vocab_size)
    }

    /// The logits rows of sequence `seq` (empty when it asked for none); `None` when the
    /// batch had no sequence `seq`.
    pub fn seq_logits(&self, seq: usize) -> Option<impl ExactSizeIterator<Item = &[f32]>> {
        let rows = self.seq_rows.get(seq)?.clone();
        Some(rows.map(|r| &self.logits[r * self.vocab_size..(r + 1) * self.vocab_size]))
    }

    /// The logits of sequence `seq`'s last new token, when it asked for any.
    pub fn last_logits(&self, seq: usize) -> Option<&[f32]> {
        let rows = self.seq_rows.get(seq)?;
        rows.clone().last().and_then(|r| self.row(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BatchLimits {
        BatchLimits {
            vocab_size: 100,
            max_position: 64,
            block_size: 4,
            num_blocks: 8,
            adapters: AdapterSupport::BaseOnly,
        }
    }

    #[test]
    fn plan_flattens_mixed_prefill_and_decode() {
        let batch = ForwardBatch::new(vec![
            SeqStep::new(vec![1, 2, 3, 4, 5], 0, vec![BlockId(3), BlockId(1)]),
            SeqStep::new(vec![7], 6, vec![BlockId(0), BlockId(2)]).with_logits(LogitsRows::All),
            SeqStep::new(vec![8, 9], 2, vec![BlockId(4)]).with_logits(LogitsRows::None),
        ]);
        let plan = StepPlan::new(&batch, limits()).unwrap();
        assert_eq!(plan.token_ids, vec![1, 2, 3, 4, 5, 7, 8, 9]);
        assert_eq!(plan.positions, vec![0, 1, 2, 3, 4, 6, 2, 3]);
        assert_eq!(plan.slots, vec![12, 13, 14, 15, 4, 10, 18, 19]);
        assert_eq!(plan.seq_rows, vec![0..5, 5..6, 6..8]);
        assert_eq!(plan.logits_rows, vec![4, 5]);
        assert_eq!(plan.output_rows, vec![0..1, 1..2, 2..2]);
        assert_eq!(batch.token_adapters(), vec![None; 8]);
    }

    #[test]
    fn plan_rejects_bad_batches() {
        let l = limits();
        let err = |b: ForwardBatch| StepPlan::new(&b, l).unwrap_err();
        assert!(matches!(
            err(ForwardBatch::default()),
            ForwardError::EmptyBatch
        ));
        assert!(matches!(
            err(ForwardBatch::new(vec![SeqStep::new(vec![], 0, vec![])])),
            ForwardError::NoNewTokens { seq: 0 }
        ));
        assert!(matches!(
            err(ForwardBatch::new(vec![SeqStep::new(
                vec![1; 5],
                0,
                vec![BlockId(0)]
            )])),
            ForwardError::BlockTableTooShort { needed: 2, .. }
        ));
        assert!(matches!(
            err(ForwardBatch::new(vec![SeqStep::new(
                vec![100],
                0,
                vec![BlockId(0)]
            )])),
            ForwardError::TokenOutOfVocab { token: 100, .. }
        ));
        assert!(matches!(
            err(ForwardBatch::new(vec![SeqStep::new(
                vec![1],
                0,
                vec![BlockId(8)]
            )])),
            ForwardError::BlockOutOfRange { .. }
        ));
        assert!(matches!(
            err(ForwardBatch::new(vec![SeqStep::new(
                vec![1],
                64,
                vec![BlockId(0); 17]
            )])),
            ForwardError::ContextTooLong {
                context_len: 65,
                ..
            }
        ));
        assert!(matches!(
            err(ForwardBatch::new(vec![
                SeqStep::new(vec![1], 0, vec![BlockId(0)]),
                SeqStep::new(vec![1], 0, vec![BlockId(0)]),
            ])),
            ForwardError::SlotWrittenTwice { seq: 1, slot: 0 }
        ));
        let mut lora = SeqStep::new(vec![1], 0, vec![BlockId(0)]);
        lora.adapter = Some(SlotIdx(3));
        assert!(matches!(
            err(ForwardBatch::new(vec![lora])),
            ForwardError::AdapterUnsupported {
                seq: 0,
                slot: SlotIdx(3)
            }
        ));
    }
}
