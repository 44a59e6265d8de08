//! The embeddable engine: a builder with a validated config, a step loop on its own
//! thread, and handles to submit, stream, cancel and shut down.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use batos_kernels::Device;
use batos_kv::{KvCacheConfig, KvCacheManager, KvShape};
use batos_model::forward::{LlamaModel, WeightDType};
use batos_model::generate::TokenDecoder;
use batos_model::{LoadedModel, ModelTokenizer};
use batos_types::{MemoryBudget, RequestId};

use crate::adapters::{AdapterInfo, AdapterResidency, AdapterSource, AdapterTicket, BaseOnly};
use crate::error::{EngineError, Result};
use crate::metrics::{LatencyHistogram, MetricsSnapshot, ITL_BUCKETS, TTFT_BUCKETS};
use crate::request::{GenerateRequest, GenerationParams, Prompt, StopReason, StreamEvent, Timings};
use crate::runner::{CudaOptions, Runner};
use crate::scheduler::{RequestEvent, RequestLimits, Scheduler, SchedulerConfig};
use crate::stream::{channel, Sink, TokenStream};

/// Where the engine's model comes from.
#[non_exhaustive]
pub enum ModelSource {
    /// A loaded checkpoint: its matrices are converted to the configured weight dtype,
    /// its tokenizer serves text prompts and output text.
    Loaded(Box<LoadedModel>),
    /// A model already built (the weight dtype setting is not used), with an optional
    /// tokenizer.
    Runtime {
        /// The model.
        model: Box<LlamaModel>,
        /// Its tokenizer, if text is wanted.
        tokenizer: Option<Box<ModelTokenizer>>,
    },
}

/// How large the KV pool is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvPoolSize {
    /// As many blocks as these bytes hold.
    Bytes(u64),
    /// Exactly this many blocks.
    Blocks(usize),
    /// Enough blocks for `max_num_seqs` sequences of this many tokens each (capped at
    /// the model's context), so every seat can hold a request of that length without
    /// preemption. The default, with [`DEFAULT_TOKENS_PER_SEQ`].
    TokensPerSeq(usize),
}

/// The default [`KvPoolSize::TokensPerSeq`]: 64 seats of 512 tokens are 32 768 tokens,
/// 1.4 GiB of f32 K/V for SmolLM2-135M (46 KiB a token). The buffers are zeroed
/// lazily by the OS, so memory is touched only as blocks are first used.
pub const DEFAULT_TOKENS_PER_SEQ: usize = 512;

/// How to shut down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Accept nothing new; let in-flight requests finish.
    Drain,
    /// Accept nothing new; cancel in-flight requests.
    Cancel,
}

/// Builds an [`Engine`]; every setting is checked in [`EngineBuilder::build`].
pub struct EngineBuilder {
    model: Option<ModelSource>,
    kv_pool: KvPoolSize,
    block_size: usize,
    max_num_seqs: usize,
    max_batch_tokens: usize,
    prefill_chunk: usize,
    max_loras: Option<usize>,
    weight_dtype: WeightDType,
    device: Device,
    adapters: Option<Arc<dyn AdapterResidency>>,
    budget: Option<MemoryBudget>,
    cuda: CudaOptions,
}

impl Default for EngineBuilder {
    fn default() -> Self {
        let s = SchedulerConfig::default();
        EngineBuilder {
            model: None,
            kv_pool: KvPoolSize::TokensPerSeq(DEFAULT_TOKENS_PER_SEQ),
            block_size: 16,
            max_num_seqs: s.max_num_seqs.get(),
            max_batch_tokens: s.max_batch_tokens.get(),
            prefill_chunk: s.prefill_chunk.get(),
            max_loras: None,
            weight_dtype: WeightDType::F16,
            device: Device::Cpu,
            adapters: None,
            budget: None,
            cuda: CudaOptions::default(),
        }
    }
}

fn nonzero(field: &'static str, v: usize) -> Result<NonZeroUsize> {
    NonZeroUsize::new(v).ok_or(EngineError::InvalidConfig {
        field,
        value: v.to_string(),
        reason: "must be at least 1".into(),
    })
}

impl EngineBuilder {
    /// Serves a loaded checkpoint.
    pub fn model(mut self, model: LoadedModel) -> Self {
        self.model = Some(ModelSource::Loaded(Box::new(model)));
        self
    }

    /// Serves a model already built, with an optional tokenizer.
    pub fn runtime_model(mut self, model: LlamaModel, tokenizer: Option<ModelTokenizer>) -> Self {
        self.model = Some(ModelSource::Runtime {
            model: Box::new(model),
            tokenizer: tokenizer.map(Box::new),
        });
        self
    }

    /// Sets the model source.
    pub fn source(mut self, source: ModelSource) -> Self {
        self.model = Some(source);
        self
    }

    /// KV pool size in bytes (default: [`KvPoolSize::TokensPerSeq`] of
    /// [`DEFAULT_TOKENS_PER_SEQ`]).
    pub fn kv_pool_bytes(mut self, bytes: u64) -> Self {
        self.kv_pool = KvPoolSize::Bytes(bytes);
        self
    }

    /// KV pool size in blocks.
    pub fn kv_pool_blocks(mut self, blocks: usize) -> Self {
        self.kv_pool = KvPoolSize::Blocks(blocks);
        self
    }

    /// KV pool size, in any of its forms.
    pub fn kv_pool(mut self, size: KvPoolSize) -> Self {
        self.kv_pool = size;
        self
    }

    /// Tokens per KV block (default 16).
    pub fn block_size(mut self, tokens: usize) -> Self {
        self.block_size = tokens;
        self
    }

    /// Requests running at once at most (default 64).
    pub fn max_num_seqs(mut self, n: usize) -> Self {
        self.max_num_seqs = n;
        self
    }

    /// New tokens per step at most (default 2048).
    pub fn max_batch_tokens(mut self, n: usize) -> Self {
        self.max_batch_tokens = n;
        self
    }

    /// Prompt tokens of one request per step at most (default 512).
    pub fn prefill_chunk(mut self, n: usize) -> Self {
        self.prefill_chunk = n;
        self
    }

    /// Distinct adapters per step at most (default: the adapter manager's hot slots;
    /// more than it has is an error).
    pub fn max_loras(mut self, n: usize) -> Self {
        self.max_loras = Some(n);
        self
    }

    /// The dtype a [`ModelSource::Loaded`] model's matrices are stored in (default f16).
    pub fn weight_dtype(mut self, dtype: WeightDType) -> Self {
        self.weight_dtype = dtype;
        self
    }

    /// Where the model runs (default the CPU). `Device::Cuda(n)` takes the
    /// device-resident path: weights, KV blocks and hot adapter slots in GPU memory
    /// (needs the `cuda` feature; without it, or without a driver or device, `build`
    /// fails with [`EngineError::Device`]).
    pub fn device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// On CUDA, load the kernels as PTX made ahead of time (`<module>-<arch>.ptx`, see
    /// `scripts/gpu-prepare.sh`) from `dir` instead of compiling them with NVRTC.
    /// Ignored on the CPU.
    pub fn cuda_ptx_dir(mut self, dir: impl Into<std::path::PathBuf>) -> Self {
        self.cuda.ptx_dir = Some(dir.into());
        self
    }

    /// The adapter manager (default [`BaseOnly`]).
    pub fn adapters(mut self, residency: Arc<dyn AdapterResidency>) -> Self {
        self.adapters = Some(residency);
        self
    }

    /// The memory budget the KV pool draws from (default: a budget of its own, exactly
    /// the pool's size). Share one with the adapter manager to bound both. On CUDA this
    /// is the device's budget: the weights, the KV pool and the device's hot adapter
    /// stacks are all reserved from it (default: 90% of the device's free memory).
    pub fn memory_budget(mut self, budget: MemoryBudget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Checks the settings, builds the model and KV cache, and starts the step loop.
    pub fn build(self) -> Result<Engine> {
        let residency = self.adapters.unwrap_or_else(|| Arc::new(BaseOnly));
        let max_loras = match self.max_loras {
            None => residency.hot_slots(),
            Some(n) if n > residency.hot_slots() => {
                return Err(EngineError::InvalidConfig {
                    field: "max_loras",
                    value: n.to_string(),
                    reason: format!(
                        "the adapter manager has {} hot slots",
                        residency.hot_slots()
                    ),
                })
            }
            Some(n) => n,
        };
        let sched_config = SchedulerConfig {
            max_num_seqs: nonzero("max_num_seqs", self.max_num_seqs)?,
            max_batch_tokens: nonzero("max_batch_tokens", self.max_batch_tokens)?,
            prefill_chunk: nonzero("prefill_chunk", self.prefill_chunk)?,
            max_loras,
        };
        sched_config.validate()?;
        let (model, tokenizer) = match self.model {
            None => {
                return Err(EngineError::InvalidConfig {
                    field: "model",
                    value: "none".into(),
                    reason: "no model given (EngineBuilder::model or ::runtime_model)".into(),
                })
            }
            Some(ModelSource::Loaded(m)) => {
                let model = LlamaModel::from_weights(&m.config, &m.weights, self.weight_dtype)?;
                (model, Some(m.tokenizer))
            }
            Some(ModelSource::Runtime { model, tokenizer }) => (*model, tokenizer.map(|t| *t)),
        };
        let dims = *model.dims();
        let (runner, budget) = Runner::new(model, self.device, self.budget, &self.cuda)?;
        let shape = KvShape {
            num_layers: dims.num_layers,
            num_kv_heads: dims.num_kv_heads,
            head_dim: dims.head_dim,
        };
        let kv_config = match self.kv_pool {
            KvPoolSize::Bytes(b) => {
                KvCacheConfig::new(shape, b).and_then(|c| c.with_block_size(self.block_size))
            }
            // Any pool that holds one block will do before sizing it by blocks.
            KvPoolSize::Blocks(n) => KvCacheConfig::new(shape, 1 << 30)
                .and_then(|c| c.with_block_size(self.block_size))
                .and_then(|c| c.with_num_blocks(n)),
            KvPoolSize::TokensPerSeq(tokens) => {
                let per_seq = tokens
                    .min(dims.max_position)
                    .div_ceil(self.block_size.max(1));
                let blocks = per_seq.saturating_mul(sched_config.max_num_seqs.get());
                KvCacheConfig::new(shape, 1 << 30)
                    .and_then(|c| c.with_block_size(self.block_size))
                    .and_then(|c| c.with_num_blocks(blocks))
            }
        }
        .map_err(|e| EngineError::InvalidConfig {
            field: "kv_pool",
            value: format!("{:?}, block_size {}", self.kv_pool, self.block_size),
            reason: e.to_string(),
        })?;
        let budget = budget.unwrap_or_else(|| {
            MemoryBudget::new(
                "engine KV pool",
                kv_config.num_blocks() as u64 * kv_config.bytes_per_block(),
            )
        });
        let mut kv = KvCacheManager::new(kv_config, &budget)?;
        if runner.mirrors_kv() {
            kv.storage_mut().log_block_copies();
        }
        let tokenizer = tokenizer.map(Arc::new);
        let decoder = tokenizer
            .clone()
            .map(|t| t as Arc<dyn TokenDecoder + Send + Sync>);
        let scheduler = Scheduler::new(
            sched_config,
            kv,
            residency.clone(),
            dims.vocab_size,
            dims.max_position,
            decoder,
        )?;
        let limits = scheduler.limits();
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            runner,
            scheduler,
            residency: residency.clone(),
            rx,
            sinks: HashMap::new(),
            ttft: LatencyHistogram::new(TTFT_BUCKETS),
            itl: LatencyHistogram::new(ITL_BUCKETS),
            stalled: false,
        };
        let thread = std::thread::Builder::new()
            .name("batos-engine".into())
            .spawn(move || worker.run())
            .map_err(|e| EngineError::Thread {
                reason: e.to_string(),
            })?;
        tracing::info!(
            blocks = limits.kv_capacity_tokens / self.block_size,
            max_loras,
            "engine started"
        );
        Ok(Engine {
            commands: tx,
            thread: Some(thread),
            residency,
            tokenizer,
            limits,
            max_loras,
            accepting: AtomicBool::new(true),
            next_id: AtomicU64::new(1),
        })
    }
}

/// How long the step loop waits before planning again after an empty plan.
const STALL_WAIT: Duration = Duration::from_millis(2);

/// A request on its way to the step loop.
pub(crate) struct Submission {
    id: RequestId,
    prompt: Vec<u32>,
    params: GenerationParams,
    adapter: Option<AdapterTicket>,
    sink: Sink,
    submitted: Instant,
}

/// What callers send the step loop.
pub(crate) enum Command {
    Submit(Box<Submission>),
    Cancel {
        id: RequestId,
        reply: Option<Sender<bool>>,
    },
    Metrics(Sender<MetricsSnapshot>),
    Shutdown {
        mode: ShutdownMode,
        reply: Sender<()>,
    },
}

/// An engine serving one base model (and its adapters) from a step loop on its own
/// thread. Cheap calls from any thread; see the crate docs for an example.
pub struct Engine {
    commands: Sender<Command>,
    thread: Option<JoinHandle<()>>,
    residency: Arc<dyn AdapterResidency>,
    tokenizer: Option<Arc<ModelTokenizer>>,
    limits: RequestLimits,
    max_loras: usize,
    accepting: AtomicBool,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("limits", &self.limits)
            .field("accepting", &self.accepting)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// A builder with the defaults.
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// The tokenizer, when the model came with one.
    pub fn tokenizer(&self) -> Option<&ModelTokenizer> {
        self.tokenizer.as_deref()
    }

    /// What requests are checked against.
    pub fn limits(&self) -> RequestLimits {
        self.limits
    }

    /// Submits a request and returns its stream. The request is checked here (and its
    /// adapter leased, loading it if cold) on the calling thread; the step loop never
    /// waits for a load.
    pub fn generate(&self, request: GenerateRequest) -> Result<TokenStream> {
        if !self.accepting.load(Ordering::Acquire) {
            return Err(EngineError::ShutDown);
        }
        let prompt = match request.prompt {
            Prompt::Tokens(t) => t,
            Prompt::Text(text) => self
                .tokenizer
                .as_ref()
                .ok_or(EngineError::NoTokenizer {
                    what: "a text prompt",
                })?
                .encode_prompt(&text)?,
        };
        self.limits.check(&prompt, &request.params)?;
        let adapter = match &request.adapter {
            Some(name) if self.max_loras == 0 && self.residency.hot_slots() > 0 => {
                return Err(EngineError::InvalidRequest {
                    field: "adapter",
                    reason: format!("'{name}': this engine runs no adapters (max_loras = 0)"),
                })
            }
            Some(name) => Some(self.residency.acquire(name)?),
            None => None,
        };
        let id = RequestId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let (sink, handle) = channel();
        let submitted = Instant::now();
        let lease = adapter.as_ref().map(|t| t.lease);
        let sent = self.commands.send(Command::Submit(Box::new(Submission {
            id,
            prompt,
            params: request.params,
            adapter,
            sink,
            submitted,
        })));
        if sent.is_err() {
            if let Some(lease) = lease {
                self.residency.release(lease);
            }
            return Err(EngineError::ShutDown);
        }
        Ok(TokenStream::new(
            id,
            handle,
            self.commands.clone(),
            submitted,
        ))
    }

    /// Cancels `id`. When this returns, its KV blocks are back in the pool and its
    /// adapter lease is released; its stream ends with [`StopReason::Cancelled`].
    /// Returns whether it was still live.
    pub fn cancel(&self, id: RequestId) -> bool {
        let (tx, rx) = mpsc::channel();
        if self
            .commands
            .send(Command::Cancel {
                id,
                reply: Some(tx),
            })
            .is_err()
        {
            return false;
        }
        rx.recv().unwrap_or(false)
    }

    /// A snapshot of queues, KV usage, counters and latencies.
    pub fn metrics(&self) -> Result<MetricsSnapshot> {
        let (tx, rx) = mpsc::channel();
        self.commands
            .send(Command::Metrics(tx))
            .map_err(|_| EngineError::ShutDown)?;
        rx.recv().map_err(|_| EngineError::ShutDown)
    }

    /// Adds adapter `name` from `source`.
    pub fn load_adapter(&self, name: &str, source: &AdapterSource) -> Result<AdapterInfo> {
        self.residency.load(name, source)
    }

    /// Points `name` at a new version; running requests keep the one they started with.
    pub fn replace_adapter(&self, name: &str, source: &AdapterSource) -> Result<AdapterInfo> {
        self.residency.replace(name, source)
    }

    /// Drops `name` from memory; running requests keep their leases.
    pub fn unload_adapter(&self, name: &str) -> Result<()> {
        self.residency.unload(name)
    }

    /// Adapters that can be served by name.
    pub fn list_adapters(&self) -> Result<Vec<AdapterInfo>> {
        self.residency.list()
    }

    /// Stops the engine: nothing new is accepted, in-flight requests drain or are
    /// cancelled, then the step loop ends.
    pub fn shutdown(mut self, mode: ShutdownMode) -> Result<()> {
        self.stop(mode)
    }

    fn stop(&mut self, mode: ShutdownMode) -> Result<()> {
        self.accepting.store(false, Ordering::Release);
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        let (tx, rx) = mpsc::channel();
        if self
            .commands
            .send(Command::Shutdown { mode, reply: tx })
            .is_ok()
        {
            // An error means the loop already ended; join tells how.
            let _ = rx.recv();
        }
        thread.join().map_err(|_| EngineError::Thread {
            reason: "the step loop panicked".into(),
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.stop(ShutdownMode::Cancel) {
            tracing::error!("engine shutdown: {e}");
        }
    }
}

struct SinkState {
    sink: Sink,
    submitted: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

/// The step loop's state; lives on the engine thread.
struct Worker {
    runner: Runner,
    scheduler: Scheduler,
    residency: Arc<dyn AdapterResidency>,
    rx: Receiver<Command>,
    sinks: HashMap<RequestId, SinkState>,
    ttft: LatencyHistogram,
    itl: LatencyHistogram,
    /// The last plan was empty: wait for a command before planning again.
    stalled: bool,
}

enum Flow {
    Continue,
    Exit,
}

impl Worker {
    fn run(mut self) {
        let mut drain_reply: Option<Sender<()>> = None;
        loop {
            loop {
                let cmd = if !self.scheduler.has_work() && drain_reply.is_none() {
                    match self.rx.recv() {
                        Ok(c) => c,
                        Err(_) => return self.abort(StopReason::Cancelled),
                    }
                } else if self.stalled {
                    // Nothing could be admitted (slots pinned outside this engine): wait
                    // a little for a command, then plan again.
                    match self.rx.recv_timeout(STALL_WAIT) {
                        Ok(c) => c,
                        Err(RecvTimeoutError::Timeout) => {
                            self.stalled = false;
                            break;
                        }
                        Err(RecvTimeoutError::Disconnected) => {
                            return self.abort(StopReason::Cancelled)
                        }
                    }
                } else {
                    match self.rx.try_recv() {
                        Ok(c) => c,
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            return self.abort(StopReason::Cancelled)
                        }
                    }
                };
                self.stalled = false;
                match self.handle(cmd, &mut drain_reply) {
                    Flow::Continue => {}
                    Flow::Exit => return,
                }
            }
            if drain_reply.is_some() && !self.scheduler.has_work() {
                tracing::info!("engine drained");
                return;
            }
            if self.scheduler.has_work() {
                self.step();
            }
        }
    }

    fn handle(&mut self, cmd: Command, drain_reply: &mut Option<Sender<()>>) -> Flow {
        match cmd {
            Command::Submit(sub) => {
                let Submission {
                    id,
                    prompt,
                    params,
                    adapter,
                    sink,
                    submitted,
                } = *sub;
                match self.scheduler.add(id, prompt, params, adapter) {
                    Ok(()) => {
                        self.sinks.insert(
                            id,
                            SinkState {
                                sink,
                                submitted,
                                first_token: None,
                                last_token: None,
                            },
                        );
                    }
                    Err(e) => sink.push(StreamEvent::Finished(crate::request::FinishEvent {
                        reason: StopReason::Failed {
                            message: e.to_string(),
                        },
                        usage: Default::default(),
                        text: None,
                        timings: None,
                    })),
                }
            }
            Command::Cancel { id, reply } => {
                let live = match self.scheduler.cancel(id) {
                    Ok(Some(event)) => {
                        self.dispatch(vec![event]);
                        true
                    }
                    Ok(None) => false,
                    Err(e) => {
                        self.fail(&e);
                        true
                    }
                };
                if let Some(reply) = reply {
                    let _ = reply.send(live);
                }
            }
            Command::Metrics(reply) => {
                let _ = reply.send(self.snapshot());
            }
            Command::Shutdown { mode, reply } => match mode {
                ShutdownMode::Cancel => {
                    self.abort(StopReason::Cancelled);
                    let _ = reply.send(());
                    return Flow::Exit;
                }
                ShutdownMode::Drain => *drain_reply = Some(reply),
            },
        }
        Flow::Continue
    }

    fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            queues: self.scheduler.queue_counts(),
            max_loras: self.scheduler.config().max_loras,
            kv: self.scheduler.kv_stats(),
            counters: self.scheduler.counters(),
            ttft: self.ttft.clone(),
            inter_token: self.itl.clone(),
        }
    }

    fn step(&mut self) {
        let plan = match self.scheduler.schedule() {
            Ok(p) => p,
            Err(e) => return self.fail(&e),
        };
        if plan.is_empty() {
            self.stalled = true;
            return;
        }
        let out = self.runner.forward(
            &*self.residency,
            &plan.batch,
            self.scheduler.kv_storage_mut(),
        );
        let events = out.and_then(|out| self.scheduler.commit(&plan, &out));
        match events {
            Ok(events) => self.dispatch(events),
            Err(e) => self.fail(&e),
        }
    }

    /// A fail-stop error in a step: every live request ends with it; the engine goes
    /// on serving new requests.
    fn fail(&mut self, e: &EngineError) {
        tracing::error!("engine step failed: {e}");
        self.abort(StopReason::Failed {
            message: e.to_string(),
        });
    }

    fn abort(&mut self, reason: StopReason) {
        match self.scheduler.abort_all(&reason) {
            Ok(events) => self.dispatch(events),
            Err(e) => tracing::error!("engine abort: {e}"),
        }
        // Any stream without a finish is closed by dropping its sink.
        self.sinks.clear();
    }

    fn dispatch(&mut self, events: Vec<RequestEvent>) {
        let now = Instant::now();
        for RequestEvent { request, mut event } in events {
            let finished = matches!(event, StreamEvent::Finished(_));
            if let Some(s) = self.sinks.get_mut(&request) {
                match &mut event {
                    StreamEvent::Token(_) => {
                        match s.last_token {
                            None => {
                                self.ttft.observe(now - s.submitted);
                                s.first_token = Some(now);
                            }
                            Some(t) => self.itl.observe(now - t),
                        }
                        s.last_token = Some(now);
                    }
                    StreamEvent::Finished(f) => {
                        f.timings = Some(Timings {
                            time_to_first_token: s.first_token.map(|t| t - s.submitted),
                            total: now - s.submitted,
                        });
                    }
                }
                s.sink.push(event);
            }
            if finished {
                self.sinks.remove(&request);
            }
        }
    }
}
