//! The iteration-level scheduler: [`Scheduler::schedule`] plans one step as plain data,
//! the runner executes the plan's [`ForwardBatch`], [`Scheduler::commit`] samples,
//! appends and finishes.
//!
//! # Policy
//!
//! Each step first serves the running requests, oldest first: a pending decode token,
//! or the next prefill chunk (at most `prefill_chunk` tokens), while the step's token
//! budget (`max_batch_tokens`) lasts. Then, if nothing was preempted, it admits waiting
//! requests into the remaining budget and seats (`max_num_seqs`), so prefill chunks mix
//! with decodes.
//!
//! **Adapters.** A step uses at most `max_loras` distinct adapters: a request whose
//! adapter is not already running is admitted only while fewer than `max_loras`
//! adapters run, and only once the residency pins it hot. The base model needs no slot.
//!
//! **Fairness.** Waiting requests sit in one FIFO queue per adapter (the base model is
//! a queue too). Each queue carries a virtual token counter: it is charged a request's
//! prompt tokens when the request is first admitted and one token per generated token.
//! Admission always takes the head of the queue with the lowest counter (ties: the
//! older head). A queue that goes from idle to backlogged is lifted to the lowest
//! counter among backlogged queues, so idle time banks no credit. If the chosen queue
//! waits for a LoRA slot, only base-model requests (which hold no slot) are admitted
//! behind it, so the slots drain toward it; if it waits for seats or KV blocks,
//! admission stops for the step.
//!
//! *Bound.* Let `S` be the most steps a request runs once admitted (with every running
//! request advancing each step — `max_batch_tokens ≥ max_num_seqs · prefill_chunk` —
//! `S = ⌈(prompt + max_tokens) / prefill_chunk⌉ + max_tokens` for the longest
//! request), and assume no preemption. When a request arrives on adapter B while
//! another adapter A floods, at most one A request (a counter tie) is admitted ahead
//! of it, and it is admitted at the latest when the second running request after its
//! arrival finishes (a seat), or when every request of one running adapter has drained
//! (a slot): it waits at most `2·S` steps, however many A requests queue. The test
//! `fairness_bound` checks this.
//!
//! **Batch order.** A planned batch is grouped by adapter (base model first, then by
//! slot, admission order within each): the LoRA kernels read an adapter's matrices once
//! per run of tokens sharing it, so 64 decodes over 4 adapters read 4 adapters' worth a
//! layer, not 64 ([`StepPlan::group_by_adapter`]).
//!
//! **Preemption.** When a running request needs a KV block and the pool is out, the
//! youngest running request is preempted by recompute: its blocks are freed, it
//! returns to the head of its queue keeping its output and its sampler state, and on
//! readmission its prompt and output are prefilled again (prefix-cache hits included).
//! No request is admitted in a step that preempted.
//!
//! **Cancellation** frees a request's blocks and adapter lease at once.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::sync::Arc;

use batos_kernels::sampling::{Sampler, TokenHistory};
use batos_kv::{KvCacheManager, KvStats, SeqId};
use batos_model::forward::{ForwardBatch, ForwardOutput, KvCacheMut, LogitsRows, SeqStep};
use batos_model::generate::TokenDecoder;
use batos_types::{RequestId, SlotIdx};

use crate::adapters::{AdapterResidency, AdapterTicket};
use crate::detokenize::OutputText;
use crate::error::{EngineError, Result};
use crate::request::{
    FinishEvent, FinishReason, GenerationParams, StopReason, StreamEvent, TokenEvent, Usage,
};

/// How the scheduler batches work; checked by [`SchedulerConfig::validate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Requests running at once at most (seats).
    pub max_num_seqs: NonZeroUsize,
    /// New tokens of all requests in one step at most.
    pub max_batch_tokens: NonZeroUsize,
    /// Prompt tokens of one request computed in one step at most.
    pub prefill_chunk: NonZeroUsize,
    /// Distinct adapters in one step at most (0: base model only).
    pub max_loras: usize,
}

impl Default for SchedulerConfig {
    /// 64 seats, 2048 tokens a step, 512-token chunks, 4 adapters.
    fn default() -> Self {
        SchedulerConfig {
            max_num_seqs: NonZeroUsize::new(64).expect("non-zero"),
            max_batch_tokens: NonZeroUsize::new(2048).expect("non-zero"),
            prefill_chunk: NonZeroUsize::new(512).expect("non-zero"),
            max_loras: 4,
        }
    }
}

impl SchedulerConfig {
    /// Checks the fields against each other.
    pub fn validate(&self) -> Result<()> {
        if self.prefill_chunk > self.max_batch_tokens {
            return Err(EngineError::InvalidConfig {
                field: "prefill_chunk",
                value: self.prefill_chunk.to_string(),
                reason: format!(
                    "larger than max_batch_tokens ({}): a chunk must fit one step",
                    self.max_batch_tokens
                ),
            });
        }
        Ok(())
    }
}

/// What a request is checked against before it is queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Token ids must be below this.
    pub vocab_size: usize,
    /// The model's context length.
    pub max_position: usize,
    /// Tokens the whole KV pool holds: a request longer than this could never run.
    pub kv_capacity_tokens: usize,
    /// Whether stop strings can be checked (the engine has a tokenizer).
    pub has_decoder: bool,
}

impl RequestLimits {
    /// Refuses what could never run: an empty or too-long prompt, ids outside the
    /// vocabulary, bad sampling parameters, `max_tokens == 0`, empty stop strings or
    /// stop strings without a tokenizer.
    pub fn check(&self, prompt: &[u32], params: &GenerationParams) -> Result<()> {
        let bad = |field, reason: String| Err(EngineError::InvalidRequest { field, reason });
        if prompt.is_empty() {
            return bad("prompt", "empty prompt".into());
        }
        if prompt.len() >= self.max_position {
            return bad(
                "prompt",
                format!(
                    "{} tokens; the model's context holds {} and at least one token must be generated",
                    prompt.len(),
                    self.max_position
                ),
            );
        }
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= self.vocab_size) {
            return bad(
                "prompt",
                format!(
                    "token id {t} is outside the vocabulary of {}",
                    self.vocab_size
                ),
            );
        }
        if let Err(e) = params.sampling.validate() {
            return bad("sampling", e.to_string());
        }
        if params.max_tokens == 0 {
            return bad("max_tokens", "must be at least 1".into());
        }
        let longest = (prompt.len() + params.max_tokens).min(self.max_position);
        if longest > self.kv_capacity_tokens {
            return bad(
                "max_tokens",
                format!(
                    "prompt ({}) + max_tokens ({}) = {longest} tokens; the whole KV pool holds {}",
                    prompt.len(),
                    params.max_tokens,
                    self.kv_capacity_tokens
                ),
            );
        }
        if params.stop_strings.iter().any(String::is_empty) {
            return bad("stop_strings", "a stop string is empty".into());
        }
        if !params.stop_strings.is_empty() && !self.has_decoder {
            return bad(
                "stop_strings",
                "stop strings need a tokenizer; the engine has none".into(),
            );
        }
        Ok(())
    }
}

/// One request's share of a planned step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedSeq {
    /// The request.
    pub request: RequestId,
    /// New tokens computed this step.
    pub num_tokens: usize,
    /// Whether the step reaches the end of its known tokens, so a token is sampled.
    pub samples: bool,
    /// Whether these are prompt (or recompute) tokens rather than one decode token.
    pub prefill: bool,
}

/// One step, as plain data: the batch for the model and who is in it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// What the model computes; `batch.seqs[i]` belongs to `seqs[i]`.
    pub batch: ForwardBatch,
    /// The requests in the batch, in batch order.
    pub seqs: Vec<PlannedSeq>,
    /// Requests preempted (blocks freed, requeued) while planning this step.
    pub preempted: Vec<RequestId>,
}

impl StepPlan {
    /// Whether the step computes nothing.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Orders the sequences by adapter slot (the base model first), keeping the order
    /// within each adapter. The LoRA kernels read an adapter's matrices once per run of
    /// consecutive tokens that share it (SGMV) and once per token otherwise (BGMV):
    /// 64 decodes over 4 adapters in admission order interleave them and read the
    /// matrices 64 times a layer; grouped, 4 times.
    pub fn group_by_adapter(&mut self) {
        let seqs = &self.batch.seqs;
        if seqs.windows(2).all(|w| w[0].adapter <= w[1].adapter) {
            return;
        }
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        // Stable: within an adapter, the oldest admission stays first.
        order.sort_by_key(|&i| seqs[i].adapter);
        let mut batch: Vec<Option<SeqStep>> = std::mem::take(&mut self.batch.seqs)
            .into_iter()
            .map(Some)
            .collect();
        self.batch.seqs = order
            .iter()
            .map(|&i| batch[i].take().expect("each index once"))
            .collect();
        self.seqs = order.iter().map(|&i| self.seqs[i]).collect();
    }

    /// Distinct adapter slots the step uses.
    pub fn distinct_adapters(&self) -> usize {
        let mut slots: Vec<SlotIdx> = self.batch.seqs.iter().filter_map(|s| s.adapter).collect();
        slots.sort_unstable();
        slots.dedup();
        slots.len()
    }
}

/// An event for one request, produced by [`Scheduler::commit`] or
/// [`Scheduler::cancel`].
#[derive(Clone, Debug, PartialEq)]
pub struct RequestEvent {
    /// The request.
    pub request: RequestId,
    /// What happened.
    pub event: StreamEvent,
}

/// Requests of one queue, for metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueCounts {
    /// The adapter; `None` is the base model.
    pub adapter: Option<Arc<str>>,
    /// Requests running.
    pub running: usize,
    /// Requests waiting.
    pub waiting: usize,
    /// The queue's virtual token counter.
    pub virtual_tokens: u64,
}

/// Counters since the scheduler was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerCounters {
    /// Steps planned (non-empty).
    pub steps: u64,
    /// Preemptions.
    pub preemptions: u64,
    /// Prompt tokens computed (recompute included, prefix hits excluded).
    pub prefill_tokens: u64,
    /// Tokens generated.
    pub generated_tokens: u64,
    /// Requests finished normally.
    pub finished: u64,
    /// Requests cancelled.
    pub cancelled: u64,
}

type QueueKey = Option<Arc<str>>;

#[derive(Debug, Default)]
struct Queue {
    waiting: VecDeque<RequestId>,
    running: usize,
    vtc: u64,
}

impl Queue {
    fn backlogged(&self) -> bool {
        self.running > 0 || !self.waiting.is_empty()
    }
}

struct Request {
    key: QueueKey,
    adapter: Option<AdapterTicket>,
    slot: Option<SlotIdx>,
    prompt: Vec<u32>,
    params: GenerationParams,
    sampler: Sampler,
    output: Vec<u32>,
    /// The KV sequence while admitted.
    seq: Option<SeqId>,
    /// Tokens held by the KV sequence.
    kv_len: usize,
    /// Tokens whose K/V are computed.
    computed: usize,
    admitted_once: bool,
    usage: Usage,
    /// The output's text, decoded token by token (when there is a decoder).
    text: OutputText,
}

impl Request {
    fn len(&self) -> usize {
        self.prompt.len() + self.output.len()
    }

    fn tokens(&self, range: std::ops::Range<usize>) -> Vec<u32> {
        range
            .map(|i| {
                if i < self.prompt.len() {
                    self.prompt[i]
                } else {
                    self.output[i - self.prompt.len()]
                }
            })
            .collect()
    }
}

/// The scheduler: sole owner of the KV cache manager; holds requests from submission
/// to finish. See the module docs for the policy.
pub struct Scheduler {
    config: SchedulerConfig,
    limits: RequestLimits,
    kv: KvCacheManager,
    residency: Arc<dyn AdapterResidency>,
    decoder: Option<Arc<dyn TokenDecoder + Send + Sync>>,
    queues: BTreeMap<QueueKey, Queue>,
    /// Admitted requests, oldest admission first.
    running: Vec<RequestId>,
    requests: HashMap<RequestId, Request>,
    counters: SchedulerCounters,
}

impl Scheduler {
    /// A scheduler over `kv`, pinning adapters through `residency`. `decoder` turns
    /// ids into text (stop strings, text deltas).
    pub fn new(
        config: SchedulerConfig,
        kv: KvCacheManager,
        residency: Arc<dyn AdapterResidency>,
        vocab_size: usize,
        max_position: usize,
        decoder: Option<Arc<dyn TokenDecoder + Send + Sync>>,
    ) -> Result<Scheduler> {
        config.validate()?;
        let capacity = kv.stats().total_blocks * kv.config().block_size();
        Ok(Scheduler {
            config,
            limits: RequestLimits {
                vocab_size,
                max_position,
                kv_capacity_tokens: capacity,
                has_decoder: decoder.is_some(),
            },
            kv,
            residency,
            decoder,
            queues: BTreeMap::new(),
            running: Vec::new(),
            requests: HashMap::new(),
            counters: SchedulerCounters::default(),
        })
    }

    /// What requests are checked against.
    pub fn limits(&self) -> RequestLimits {
        self.limits
    }

    /// The configuration.
    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// KV block figures.
    pub fn kv_stats(&self) -> KvStats {
        self.kv.stats()
    }

    /// The KV buffers, for the runner to execute a plan against.
    pub fn kv_storage_mut(&mut self) -> &mut dyn KvCacheMut {
        self.kv.storage_mut()
    }

    /// Counters since creation.
    pub fn counters(&self) -> SchedulerCounters {
        self.counters
    }

    /// Whether any request is waiting or running.
    pub fn has_work(&self) -> bool {
        !self.requests.is_empty()
    }

    /// Whether `id` is waiting or running.
    pub fn contains(&self, id: RequestId) -> bool {
        self.requests.contains_key(&id)
    }

    /// Requests running now, oldest admission first.
    pub fn running(&self) -> &[RequestId] {
        &self.running
    }

    /// Per-queue counts.
    pub fn queue_counts(&self) -> Vec<QueueCounts> {
        self.queues
            .iter()
            .filter(|(_, q)| q.backlogged())
            .map(|(k, q)| QueueCounts {
                adapter: k.clone(),
                running: q.running,
                waiting: q.waiting.len(),
                virtual_tokens: q.vtc,
            })
            .collect()
    }

    /// Queues request `id`: `prompt` with `params`, under `adapter` (a lease the caller
    /// acquired; the scheduler releases it when the request ends, also on error here).
    pub fn add(
        &mut self,
        id: RequestId,
        prompt: Vec<u32>,
        params: GenerationParams,
        adapter: Option<AdapterTicket>,
    ) -> Result<()> {
        let release = |adapter: &Option<AdapterTicket>| {
            if let Some(t) = adapter {
                self.residency.release(t.lease);
            }
        };
        if let Err(e) = self.limits.check(&prompt, &params) {
            release(&adapter);
            return Err(e);
        }
        if let (Some(t), 0) = (&adapter, self.config.max_loras) {
            let name = t.name.to_string();
            release(&adapter);
            return Err(EngineError::InvalidRequest {
                field: "adapter",
                reason: format!("'{name}': this engine runs no adapters (max_loras = 0)"),
            });
        }
        if self.requests.contains_key(&id) {
            release(&adapter);
            return Err(EngineError::InvalidRequest {
                field: "id",
                reason: format!("request {id:?} is already queued"),
            });
        }
        let sampler = match Sampler::new(params.sampling.clone()) {
            Ok(s) => s,
            Err(source) => {
                release(&adapter);
                return Err(EngineError::Sampling {
                    request: id,
                    source,
                });
            }
        };
        let key: QueueKey = adapter.as_ref().map(|t| t.name.clone());
        // Lift an idle queue to the lowest backlogged counter: idle time banks no credit.
        let floor = self
            .queues
            .iter()
            .filter(|(k, q)| **k != key && q.backlogged())
            .map(|(_, q)| q.vtc)
            .min();
        let queue = self.queues.entry(key.clone()).or_default();
        if !queue.backlogged() {
            if let Some(floor) = floor {
                queue.vtc = queue.vtc.max(floor);
            }
        }
        queue.waiting.push_back(id);
        let usage = Usage {
            prompt_tokens: prompt.len(),
            ..Usage::default()
        };
        self.requests.insert(
            id,
            Request {
                key,
                adapter,
                slot: None,
                prompt,
                params,
                sampler,
                output: Vec::new(),
                seq: None,
                kv_len: 0,
                computed: 0,
                admitted_once: false,
                usage,
                text: OutputText::default(),
            },
        );
        Ok(())
    }

    /// Plans the next step (see the module docs). An empty plan means nothing can run.
    pub fn schedule(&mut self) -> Result<StepPlan> {
        let mut plan = StepPlan::default();
        let mut budget = self.config.max_batch_tokens.get();
        let mut i = 0;
        'running: while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let (seq, kv_len, total) = {
                let r = &self.requests[&id];
                (
                    r.seq.expect("running requests hold a sequence"),
                    r.kv_len,
                    r.len(),
                )
            };
            if kv_len < total {
                let new = self.requests[&id].tokens(kv_len..total);
                loop {
                    match self.kv.append_tokens(seq, &new)? {
                        Ok(_) => break,
                        Err(_full) => {
                            let victim = *self.running.last().expect("`id` is running");
                            self.preempt(victim)?;
                            plan.preempted.push(victim);
                            if victim == id {
                                continue 'running;
                            }
                        }
                    }
                }
                self.requests.get_mut(&id).expect("running").kv_len = total;
            }
            self.plan_seq(&mut plan, id, &mut budget)?;
            i += 1;
        }
        if plan.preempted.is_empty() {
            self.admit(&mut plan, &mut budget)?;
        }
        if !plan.is_empty() {
            self.counters.steps += 1;
        }
        plan.group_by_adapter();
        Ok(plan)
    }

    /// Adds `id`'s next tokens (its pending decode token or next prefill chunk) to
    /// the plan.
    fn plan_seq(&mut self, plan: &mut StepPlan, id: RequestId, budget: &mut usize) -> Result<()> {
        let r = &self.requests[&id];
        let total = r.len();
        let pending = total - r.computed;
        let take = pending.min(self.config.prefill_chunk.get()).min(*budget);
        if take == 0 {
            return Ok(());
        }
        let seq = r.seq.expect("planned requests hold a sequence");
        let samples = r.computed + take == total;
        let prefill = pending > 1 || r.output.is_empty();
        let table = self.kv.block_table(seq)?.blocks().to_vec();
        let mut step = SeqStep::new(r.tokens(r.computed..r.computed + take), r.computed, table)
            .with_logits(if samples {
                LogitsRows::Last
            } else {
                LogitsRows::None
            });
        step.adapter = r.slot;
        plan.batch.seqs.push(step);
        plan.seqs.push(PlannedSeq {
            request: id,
            num_tokens: take,
            samples,
            prefill,
        });
        *budget -= take;
        Ok(())
    }

    fn running_adapters(&self) -> usize {
        self.queues
            .iter()
            .filter(|(k, q)| k.is_some() && q.running > 0)
            .count()
    }

    /// The queue admission takes from next: lowest counter, then oldest head.
    fn pick_queue(&self, base_only: bool) -> Option<QueueKey> {
        self.queues
            .iter()
            .filter(|(k, q)| !q.waiting.is_empty() && (!base_only || k.is_none()))
            .min_by_key(|(_, q)| (q.vtc, q.waiting[0]))
            .map(|(k, _)| k.clone())
    }

    fn admit(&mut self, plan: &mut StepPlan, budget: &mut usize) -> Result<()> {
        let mut base_only = false;
        while *budget > 0 && self.running.len() < self.config.max_num_seqs.get() {
            let Some(key) = self.pick_queue(base_only) else {
                break;
            };
            let id = self.queues[&key].waiting[0];
            // A LoRA slot first: the adapter must already run, or a slot be free.
            let mut slot = None;
            let lease = self.requests[&id].adapter.as_ref().map(|t| t.lease);
            if let Some(lease) = lease {
                let already = self.queues[&key].running > 0;
                if !already && self.running_adapters() >= self.config.max_loras {
                    base_only = true;
                    continue;
                }
                match self.residency.pin_hot(lease)? {
                    Ok(s) => slot = Some(s),
                    Err(_busy) => {
                        base_only = true;
                        continue;
                    }
                }
            }
            let r = &self.requests[&id];
            let tokens = r.tokens(0..r.len());
            let generation = r.adapter.as_ref().map(|t| t.generation);
            let alloc = match self.kv.allocate_prompt(&tokens, generation)? {
                Ok(a) => a,
                Err(_full) => {
                    if let Some(lease) = lease {
                        self.residency.unpin(lease);
                    }
                    break;
                }
            };
            let queue = self.queues.get_mut(&key).expect("picked");
            queue.waiting.pop_front();
            queue.running += 1;
            let r = self.requests.get_mut(&id).expect("queued");
            if !r.admitted_once {
                r.admitted_once = true;
                r.usage.cached_prompt_tokens = alloc.cached_tokens;
                queue.vtc += r.prompt.len() as u64;
            }
            r.seq = Some(alloc.seq);
            r.kv_len = tokens.len();
            r.computed = alloc.cached_tokens;
            r.slot = slot;
            self.running.push(id);
            self.plan_seq(plan, id, budget)?;
        }
        Ok(())
    }

    /// Frees `id`'s blocks and pin and puts it back at the head of its queue.
    fn preempt(&mut self, id: RequestId) -> Result<()> {
        self.running.retain(|&r| r != id);
        let r = self
            .requests
            .get_mut(&id)
            .expect("preempting a live request");
        if let Some(seq) = r.seq.take() {
            self.kv.free(seq)?;
        }
        if let (Some(t), Some(_)) = (&r.adapter, r.slot.take()) {
            self.residency.unpin(t.lease);
        }
        r.kv_len = 0;
        r.computed = 0;
        r.usage.preemptions += 1;
        let q = self
            .queues
            .get_mut(&r.key)
            .expect("queue of a live request");
        q.running -= 1;
        q.waiting.push_front(id);
        self.counters.preemptions += 1;
        tracing::debug!(request = id.0, "preempted (recompute)");
        Ok(())
    }

    /// Removes `id` wherever it is, freeing its blocks and lease; returns its usage
    /// and output text.
    fn remove(&mut self, id: RequestId) -> Result<Option<(Usage, Option<String>)>> {
        let Some(r) = self.requests.remove(&id) else {
            return Ok(None);
        };
        let q = self
            .queues
            .get_mut(&r.key)
            .expect("queue of a live request");
        if r.seq.is_some() {
            q.running -= 1;
            self.running.retain(|&x| x != id);
        } else {
            q.waiting.retain(|&x| x != id);
        }
        if let Some(t) = &r.adapter {
            self.residency.release(t.lease);
        }
        if let Some(seq) = r.seq {
            self.kv.free(seq)?;
        }
        let text = self.decoder.as_ref().map(|_| r.text.into_text());
        Ok(Some((r.usage, text)))
    }

    /// Cancels `id`: its blocks go back to the pool and its lease is released before
    /// this returns. `None` if it is not live.
    pub fn cancel(&mut self, id: RequestId) -> Result<Option<RequestEvent>> {
        let Some((usage, text)) = self.remove(id)? else {
            return Ok(None);
        };
        self.counters.cancelled += 1;
        Ok(Some(RequestEvent {
            request: id,
            event: StreamEvent::Finished(FinishEvent {
                reason: StopReason::Cancelled,
                usage,
                text,
                timings: None,
            }),
        }))
    }

    /// Ends every live request with `reason` (shutdown, a failed step).
    pub fn abort_all(&mut self, reason: &StopReason) -> Result<Vec<RequestEvent>> {
        let mut ids: Vec<RequestId> = self.requests.keys().copied().collect();
        ids.sort_unstable();
        let mut events = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some((usage, text)) = self.remove(id)? {
                if *reason == StopReason::Cancelled {
                    self.counters.cancelled += 1;
                }
                events.push(RequestEvent {
                    request: id,
                    event: StreamEvent::Finished(FinishEvent {
                        reason: reason.clone(),
                        usage,
                        text,
                        timings: None,
                    }),
                });
            }
        }
        Ok(events)
    }

    /// Takes the model's output for `plan`: marks the computed tokens, samples where
    /// the plan says so, and finishes requests that reached a stop.
    pub fn commit(&mut self, plan: &StepPlan, out: &ForwardOutput) -> Result<Vec<RequestEvent>> {
        let mut events = Vec::new();
        for (b, p) in plan.seqs.iter().enumerate() {
            let Some(r) = self.requests.get_mut(&p.request) else {
                continue;
            };
            let Some(seq) = r.seq else { continue };
            r.computed += p.num_tokens;
            self.kv.mark_computed(seq, r.computed)?;
            if p.prefill {
                self.counters.prefill_tokens += p.num_tokens as u64;
            }
            if !p.samples {
                continue;
            }
            let logits = out
                .last_logits(b)
                .ok_or_else(|| EngineError::InvalidRequest {
                    field: "plan",
                    reason: format!("the output has no logits for batch entry {b}"),
                })?;
            let history = TokenHistory {
                prompt: &r.prompt,
                output: &r.output,
            };
            let sampled =
                r.sampler
                    .sample(logits, &history)
                    .map_err(|source| EngineError::Sampling {
                        request: p.request,
                        source,
                    })?;
            let token = sampled.token;
            r.output.push(token);
            r.usage.completion_tokens += 1;
            self.counters.generated_tokens += 1;
            if let Some(q) = self.queues.get_mut(&r.key) {
                q.vtc += 1;
            }
            let stop_string = match &self.decoder {
                Some(d) => r
                    .text
                    .update(&r.output, d.as_ref(), &r.params.stop_strings)?,
                None => None,
            };
            let finish = if let Some(s) = stop_string {
                Some(FinishReason::StopString(s))
            } else if r.params.stop_token_ids.contains(&token) {
                Some(FinishReason::StopToken(token))
            } else if r.output.len() >= r.params.max_tokens || r.len() > self.limits.max_position {
                // The next step would compute this token at position len - 1.
                Some(FinishReason::Length)
            } else {
                None
            };
            // The last token's text carries everything not yet sent (a tail held back
            // as a possible stop-string start, a character left incomplete).
            let text = match &self.decoder {
                Some(d) => {
                    if finish.is_some() {
                        r.text.flush(&r.output, d.as_ref())?;
                    }
                    Some(r.text.take_delta(&r.params.stop_strings, finish.is_some()))
                }
                None => None,
            };
            let logprobs = r.params.sampling.logprobs.map(|_| sampled);
            events.push(RequestEvent {
                request: p.request,
                event: StreamEvent::Token(TokenEvent {
                    token,
                    text,
                    logprobs,
                }),
            });
            if let Some(finish) = finish {
                let (usage, text) = self.remove(p.request)?.expect("finishing a live request");
                self.counters.finished += 1;
                events.push(RequestEvent {
                    request: p.request,
                    event: StreamEvent::Finished(FinishEvent {
                        reason: StopReason::Finished(finish),
                        usage,
                        text,
                        timings: None,
                    }),
                });
            }
        }
        Ok(events)
    }
}
