//! What callers submit and what comes back: plain data.

use std::time::Duration;

use batos_kernels::sampling::Sampled;
pub use batos_model::generate::{FinishReason, GenerationParams};
use batos_types::RequestId;

/// The prompt of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// Token ids, used as given.
    Tokens(Vec<u32>),
    /// Text, encoded with the model's tokenizer (special tokens in the text are parsed,
    /// so a rendered chat template can be passed as is).
    Text(String),
}

/// One generation request.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    /// What to continue.
    pub prompt: Prompt,
    /// The adapter to run under; `None` runs the base model.
    pub adapter: Option<String>,
    /// Sampling, length and stop conditions.
    pub params: GenerationParams,
}

impl GenerateRequest {
    /// A base-model request for `prompt` with `params`.
    pub fn new(prompt: Prompt, params: GenerationParams) -> Self {
        GenerateRequest {
            prompt,
            adapter: None,
            params,
        }
    }

    /// Runs the request under adapter `name`.
    pub fn with_adapter(mut self, name: impl Into<String>) -> Self {
        self.adapter = Some(name.into());
        self
    }
}

/// Token counts of one request, as OpenAI's `usage` reports them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Leading prompt tokens served from the prefix cache on first admission.
    pub cached_prompt_tokens: usize,
    /// Times the request was preempted and recomputed.
    pub preemptions: u32,
}

/// Why a request stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// It ran to a normal end: length, stop token or stop string.
    Finished(FinishReason),
    /// [`crate::Engine::cancel`], a dropped stream, or a cancelling shutdown.
    Cancelled,
    /// The forward pass failed while the request was in flight.
    Failed {
        /// The error, as text (the step's error went to the log in full).
        message: String,
    },
}

/// One generated token.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenEvent {
    /// The token id.
    pub token: u32,
    /// The text this token added, when the engine has a tokenizer. Text is held back
    /// while it ends in an incomplete character or in what may be the start of a stop
    /// string; the last token of a request carries all that remains, so the texts of a
    /// request's tokens add up to its [`FinishEvent::text`].
    pub text: Option<String>,
    /// Its logprob and the top alternatives, when the request asked for logprobs.
    pub logprobs: Option<Sampled>,
}

/// The end of a request.
#[derive(Clone, Debug, PartialEq)]
pub struct FinishEvent {
    /// Why it stopped.
    pub reason: StopReason,
    /// Token counts.
    pub usage: Usage,
    /// The whole output text, cut before a stop string, when the engine has a
    /// tokenizer.
    pub text: Option<String>,
    /// Latencies measured by the engine's step loop (`None` from a bare
    /// [`crate::Scheduler`], which knows no clocks).
    pub timings: Option<Timings>,
}

/// Latencies of one request, taken in the step loop when events are produced (not when
/// a reader gets to them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timings {
    /// From submission to the first token, if one came.
    pub time_to_first_token: Option<Duration>,
    /// From submission to the finish.
    pub total: Duration,
}

/// What a [`crate::TokenStream`] yields: tokens, then exactly one finish.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    /// A new token.
    Token(TokenEvent),
    /// The request ended; nothing follows.
    Finished(FinishEvent),
}

/// A whole request, collected from its stream.
#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    /// The request.
    pub id: RequestId,
    /// Generated ids, in order.
    pub tokens: Vec<u32>,
    /// Per-token logprobs, when asked for.
    pub logprobs: Option<Vec<Sampled>>,
    /// The output text, when the engine has a tokenizer.
    pub text: Option<String>,
    /// Why it stopped.
    pub reason: StopReason,
    /// Token counts.
    pub usage: Usage,
    /// Time from submission to the first token, if one came.
    pub time_to_first_token: Option<Duration>,
    /// Time from submission to the finish.
    pub total_time: Duration,
}
