//! batos-engine: the engine a Rust program links to serve one base model and many LoRA
//! adapters.
//!
//! The step loop has the vLLM-v1 shape: the [`Scheduler`] plans a step as plain data
//! ([`StepPlan`], holding the model's [`ForwardBatch`](batos_model::forward::ForwardBatch)),
//! the runner executes it through the [`AdapterResidency`] (the model's forward with the
//! adapters pinned for the step), and the scheduler commits the
//! [`ForwardOutput`](batos_model::forward::ForwardOutput): it samples, appends, finishes.
//! The scheduler is the sole owner of the KV cache manager; see [`scheduler`] for the
//! batching, fairness, preemption and cancellation policy and its fairness bound.
//!
//! [`Engine`] runs that loop on its own thread:
//!
//! ```
//! use batos_engine::{Engine, GenerateRequest, GenerationParams, Prompt, StopReason};
//! use batos_model::{forward::WeightDType, synthetic::{tiny_params, SyntheticLlama}, LlamaConfig};
//!
//! let model = SyntheticLlama::new(LlamaConfig::new(tiny_params())?, 7).model(WeightDType::F32)?;
//! let engine = Engine::builder()
//!     .runtime_model(model, None)
//!     .kv_pool_blocks(64)
//!     .build()?;
//! let stream = engine.generate(GenerateRequest::new(
//!     Prompt::Tokens(vec![1, 2, 3]),
//!     GenerationParams::greedy(5),
//! ))?;
//! let done = stream.wait(); // or: while let Some(ev) = stream.next().await { … }
//! assert_eq!(done.tokens.len(), 5);
//! assert!(matches!(done.reason, StopReason::Finished(_)));
//! engine.shutdown(batos_engine::ShutdownMode::Drain)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Invariant: the engine never holds adapter weights (the residency does) and never
//! shares the KV cache: other threads see it only through [`MetricsSnapshot`].

pub mod adapters;
mod detokenize;
mod engine;
mod error;
mod lora;
pub mod metrics;
mod request;
mod runner;
pub mod scheduler;
mod stream;

pub use adapters::{
    AdapterInfo, AdapterResidency, AdapterSource, AdapterTicket, BaseOnly, LeaseId,
};
pub use engine::{
    Engine, EngineBuilder, KvPoolSize, ModelSource, ShutdownMode, DEFAULT_TOKENS_PER_SEQ,
};
pub use error::{EngineError, Result, SlotsBusy};
pub use lora::LoraResidency;
pub use metrics::{LatencyHistogram, MetricsSnapshot};
pub use request::{
    Completion, FinishEvent, FinishReason, GenerateRequest, GenerationParams, Prompt, StopReason,
    StreamEvent, Timings, TokenEvent, Usage,
};
pub use scheduler::{
    PlannedSeq, QueueCounts, RequestEvent, RequestLimits, Scheduler, SchedulerConfig,
    SchedulerCounters, StepPlan,
};
pub use stream::TokenStream;
