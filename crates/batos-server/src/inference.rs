//! `/v1/completions` and `/v1/chat/completions`: request checks, submission to the
//! engine, and the two ways an answer leaves — one JSON body, or server-sent events.
//!
//! Streaming costs one poll of the connection's own task per wake-up: the engine's
//! [`TokenStream`] stores the task's waker, and each poll drains every event already
//! queued into one buffer (one write, however many tokens arrived since the last).
//! Text deltas come from the engine (no re-decoding here); a chunk is serialised
//! straight into that buffer from borrowed data. Dropping the body (the client left)
//! drops the stream, which cancels the request in the engine.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use batos_engine::{
    FinishReason, GenerateRequest, GenerationParams, Prompt, StopReason, StreamEvent, TokenStream,
    Usage,
};
use batos_kernels::sampling::{Sampled, SamplingParams};
use batos_model::{ChatMessage, GenerationPrompt, Role};
use futures_util::Stream;
use serde::Serialize;

use crate::error::{Result, ServerError};
use crate::metrics::Finished;
use crate::protocol::{
    ChatChoice, ChatChunk, ChatChunkChoice, ChatDelta, ChatLogprobs, ChatMessageOut, ChatRequest,
    ChatResponse, ChatTokenLogprob, ChatTopLogprob, CompletionChoice, CompletionLogprobs,
    CompletionRequest, CompletionResponse, LogprobsOut, MessageContent, PromptInput,
    SamplingFields, StopReasonOut, UsageOut,
};
use crate::server::{unix_now, AppState, JsonBody};

/// Which endpoint a request came through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// What `max_tokens` is when a request leaves it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DefaultMax {
    /// OpenAI's (and vLLM's) 16 for text completions.
    Fixed(u64),
    /// The rest of the context (capped by the server's `max_tokens`), for chat.
    Remaining,
}

/// A request checked and ready to submit.
struct Job {
    prompt: Prompt,
    adapter: Option<String>,
    params: GenerationParams,
    max_tokens: Option<u64>,
    default_max: DefaultMax,
}

/// The answer's framing, shared by both endpoints.
struct Reply {
    kind: Kind,
    id: String,
    created: u64,
    /// The `model` echoed back: the base name or the adapter's.
    model: Arc<str>,
    stream: bool,
    include_usage: bool,
    /// Stop tokens with their text, cut from the answer's end.
    stop_texts: Vec<(u32, String)>,
    /// The request's own `stop_token_ids` (reported as `stop_reason`; EOS is not).
    requested_stop_ids: Vec<u32>,
    /// Whether to report logprobs (the alternatives asked for are in the params).
    logprobs: bool,
}

/// The most alternatives per token a request may ask for (vLLM's default
/// `max_logprobs`).
const MAX_LOGPROBS: usize = 20;

fn unsupported(what: &str, param: &'static str) -> ServerError {
    ServerError::bad_request(
        format!("{what} is not supported by batos-server"),
        Some(param),
    )
}

impl AppState {
    /// The adapter `model` names (`None`: the base model), or 404.
    fn resolve(&self, model: Option<&str>) -> Result<(Arc<str>, Option<String>)> {
        match model {
            None => Ok((self.model_name.clone(), None)),
            Some(m) if *m == *self.model_name => Ok((self.model_name.clone(), None)),
            Some(m) if self.adapters().contains_key(m) => Ok((Arc::from(m), Some(m.to_owned()))),
            Some(m) => Err(ServerError::ModelNotFound { name: m.to_owned() }),
        }
    }

    /// Sampling, stops and `n` from the request; `max_tokens` is settled at submission.
    fn params(
        &self,
        s: &SamplingFields,
        logprobs: Option<usize>,
    ) -> Result<(GenerationParams, Vec<(u32, String)>)> {
        if let Some(n) = logprobs {
            if n > MAX_LOGPROBS {
                return Err(ServerError::bad_request(
                    format!("{n} alternatives per token asked for; at most {MAX_LOGPROBS}"),
                    Some("logprobs"),
                ));
            }
        }
        if let Some(n) = s.n {
            if n != 1 {
                return Err(ServerError::bad_request(
                    format!("n = {n} is not supported: batos-server returns one choice per request (n must be 1)"),
                    Some("n"),
                ));
            }
        }
        if s.logit_bias.as_ref().is_some_and(|b| !b.is_empty()) {
            return Err(unsupported("logit_bias", "logit_bias"));
        }
        let top_k = match s.top_k {
            None | Some(0) | Some(-1) => None,
            Some(k) if k > 0 => Some(k as usize),
            Some(k) => {
                return Err(ServerError::bad_request(
                    format!("top_k must be -1 (disabled) or at least 1, got {k}"),
                    Some("top_k"),
                ))
            }
        };
        let sampling = SamplingParams {
            temperature: s.temperature.unwrap_or(1.0),
            top_k,
            top_p: s.top_p.unwrap_or(1.0),
            min_p: s.min_p.unwrap_or(0.0),
            repetition_penalty: s.repetition_penalty.unwrap_or(1.0),
            presence_penalty: s.presence_penalty.unwrap_or(0.0),
            frequency_penalty: s.frequency_penalty.unwrap_or(0.0),
            seed: s.seed,
            logprobs,
        };
        sampling
            .validate()
            .map_err(|e| ServerError::bad_request(e.to_string(), None))?;
        let stop_strings = s.stop.clone().map(|s| s.into_vec()).unwrap_or_default();
        if stop_strings.iter().any(String::is_empty) {
            return Err(ServerError::bad_request(
                "a stop string is empty",
                Some("stop"),
            ));
        }
        let mut stop_token_ids = Vec::new();
        let mut stop_texts = Vec::new();
        if !s.ignore_eos.unwrap_or(false) {
            stop_token_ids.extend_from_slice(&self.eos_token_ids);
            stop_texts.extend(self.eos_texts.iter().cloned());
        }
        for &id in s.stop_token_ids.as_deref().unwrap_or(&[]) {
            if id as usize >= self.vocab_size {
                return Err(ServerError::bad_request(
                    format!(
                        "stop token id {id} is outside the vocabulary of {}",
                        self.vocab_size
                    ),
                    Some("stop_token_ids"),
                ));
            }
            stop_token_ids.push(id);
            // A requested stop token's text is cut from the answer like EOS's.
            if let Some(text) = self
                .engine
                .tokenizer()
                .and_then(|t| t.decode(&[id], batos_model::SpecialTokenText::Keep).ok())
            {
                stop_texts.push((id, text));
            }
        }
        stop_token_ids.sort_unstable();
        stop_token_ids.dedup();
        let params = GenerationParams {
            sampling,
            max_tokens: 1,
            stop_token_ids,
            stop_strings,
        };
        Ok((params, stop_texts))
    }

    /// Tokenises, settles `max_tokens` against the limits and the context, and
    /// submits. Runs on a blocking thread (tokenising and a cold adapter load take
    /// time).
    fn submit(&self, job: Job) -> Result<(TokenStream, usize)> {
        let prompt = match job.prompt {
            Prompt::Tokens(t) => t,
            Prompt::Text(text) => self
                .engine
                .tokenizer()
                .ok_or(ServerError::Engine(
                    batos_engine::EngineError::NoTokenizer {
                        what: "a text prompt",
                    },
                ))?
                .encode_prompt(&text)
                .map_err(|e| {
                    ServerError::bad_request(
                        format!("cannot tokenise the prompt: {e}"),
                        Some("prompt"),
                    )
                })?,
        };
        let n = prompt.len();
        if n == 0 {
            return Err(ServerError::bad_request(
                "the prompt is empty",
                Some("prompt"),
            ));
        }
        if let Some(limit) = self.settings.max_prompt_tokens {
            if n > limit {
                return Err(ServerError::bad_request(
                    format!("the prompt has {n} tokens; this server accepts at most {limit}"),
                    Some("prompt"),
                ));
            }
        }
        let cap = self.settings.max_tokens as u64;
        let context = self.max_model_len as u64;
        let remaining = context.saturating_sub(n as u64);
        let max_tokens = match job.max_tokens {
            Some(0) => {
                return Err(ServerError::bad_request(
                    "max_tokens must be at least 1",
                    Some("max_tokens"),
                ))
            }
            Some(m) if m > cap => {
                return Err(ServerError::bad_request(
                    format!("max_tokens = {m} is above this server's limit of {cap}"),
                    Some("max_tokens"),
                ))
            }
            Some(m) => m,
            None => match job.default_max {
                DefaultMax::Fixed(d) => d.min(remaining.max(1)),
                DefaultMax::Remaining => cap.min(remaining.max(1)),
            },
        };
        if n as u64 + max_tokens > context {
            return Err(ServerError::bad_request(
                format!(
                    "This model's maximum context length is {context} tokens. However, you requested {} tokens ({n} in the messages, {max_tokens} in the completion). Please reduce the length of the messages or completion.",
                    n as u64 + max_tokens
                ),
                Some("max_tokens"),
            ));
        }
        let mut params = job.params;
        params.max_tokens = max_tokens as usize;
        let request = GenerateRequest {
            prompt: Prompt::Tokens(prompt),
            adapter: job.adapter,
            params,
        };
        let stream = self.engine.generate(request)?;
        Ok((stream, n))
    }
}

/// `POST /v1/completions`.
pub(crate) async fn completions(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<CompletionRequest>,
) -> Result<Response> {
    if req.echo == Some(true) {
        return Err(unsupported("echo", "echo"));
    }
    if req.best_of.is_some_and(|b| b > 1) {
        return Err(unsupported("best_of above 1", "best_of"));
    }
    if req.suffix.is_some() {
        return Err(unsupported("suffix", "suffix"));
    }
    let prompt = match req.prompt {
        PromptInput::Text(t) => Prompt::Text(t),
        PromptInput::Tokens(t) => Prompt::Tokens(t),
        PromptInput::Texts(mut v) if v.len() == 1 => Prompt::Text(v.remove(0)),
        PromptInput::TokenLists(mut v) if v.len() == 1 => Prompt::Tokens(v.remove(0)),
        PromptInput::Texts(_) | PromptInput::TokenLists(_) => {
            return Err(ServerError::bad_request(
                "a batch of prompts is not supported: send one prompt per request",
                Some("prompt"),
            ))
        }
    };
    let (model, adapter) = state.resolve(req.model.as_deref())?;
    let logprobs = req.logprobs.map(|n| n as usize);
    let (params, stop_texts) = state.params(&req.sampling, logprobs)?;
    let job = Job {
        prompt,
        adapter,
        params,
        max_tokens: req.sampling.max_tokens,
        default_max: DefaultMax::Fixed(16),
    };
    let reply = Reply {
        kind: Kind::Completion,
        id: state.response_id("cmpl"),
        created: unix_now(),
        model,
        stream: req.sampling.stream.unwrap_or(false),
        include_usage: req.sampling.stream_options.is_some_and(|o| o.include_usage),
        stop_texts,
        requested_stop_ids: req.sampling.stop_token_ids.clone().unwrap_or_default(),
        logprobs: logprobs.is_some(),
    };
    answer(state, job, reply).await
}

fn role(r: &str) -> Result<Role> {
    match r {
        "system" | "developer" => Ok(Role::System),
        "user" => Ok(Role::User),
        "assistant" => Ok(Role::Assistant),
        "tool" => Ok(Role::Tool),
        other => Err(ServerError::bad_request(
            format!("unknown message role '{other}' (system, developer, user, assistant, tool)"),
            Some("messages"),
        )),
    }
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<ChatRequest>,
) -> Result<Response> {
    let logprobs = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (true, top) => Some(top.unwrap_or(0) as usize),
        (false, None) => None,
        (false, Some(_)) => {
            return Err(ServerError::bad_request(
                "top_logprobs needs logprobs: true",
                Some("top_logprobs"),
            ))
        }
    };
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(unsupported("tools", "tools"));
    }
    if req.messages.is_empty() {
        return Err(ServerError::bad_request(
            "messages is empty",
            Some("messages"),
        ));
    }
    let Some(template) = &state.chat_template else {
        return Err(ServerError::bad_request(
            format!(
                "the model '{}' has no chat template: use /v1/completions",
                state.model_name
            ),
            None,
        ));
    };
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        let content = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), &p.text) {
                        ("text", Some(t)) => text.push_str(t),
                        (kind, _) => {
                            return Err(ServerError::bad_request(
                                format!(
                                    "content part of type '{kind}' is not supported (text only)"
                                ),
                                Some("messages"),
                            ))
                        }
                    }
                }
                text
            }
        };
        messages.push(ChatMessage::new(role(&m.role)?, content));
    }
    let text = template
        .render(&messages, GenerationPrompt::Add)
        .map_err(|e| ServerError::bad_request(format!("chat template: {e}"), Some("messages")))?;
    let (model, adapter) = state.resolve(req.model.as_deref())?;
    let (params, stop_texts) = state.params(&req.sampling, logprobs)?;
    let job = Job {
        prompt: Prompt::Text(text),
        adapter,
        params,
        max_tokens: req.max_completion_tokens.or(req.sampling.max_tokens),
        default_max: DefaultMax::Remaining,
    };
    let reply = Reply {
        kind: Kind::Chat,
        id: state.response_id("chatcmpl"),
        created: unix_now(),
        model,
        stream: req.sampling.stream.unwrap_or(false),
        include_usage: req.sampling.stream_options.is_some_and(|o| o.include_usage),
        stop_texts,
        requested_stop_ids: req.sampling.stop_token_ids.clone().unwrap_or_default(),
        logprobs: logprobs.is_some(),
    };
    answer(state, job, reply).await
}

/// Submits `job` and answers as `reply` says.
async fn answer(state: Arc<AppState>, job: Job, reply: Reply) -> Result<Response> {
    let st = state.clone();
    let (tokens, prompt_tokens) = tokio::task::spawn_blocking(move || st.submit(job))
        .await
        .map_err(|e| ServerError::Task(e.to_string()))??;
    if reply.stream {
        let body = EventStream {
            tokens,
            reply,
            state,
            emitted: String::new(),
            prompt_tokens,
            completion_tokens: 0,
            phase: Phase::Start,
            pending_logprobs: Vec::new(),
            token_offset: 0,
        };
        let mut response = Body::from_stream(body).into_response();
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(response);
    }
    // If the client leaves first, this future is dropped with the stream (which
    // cancels the request): count it as aborted.
    let mut pending = AbortOnDrop {
        state: &state,
        prompt_tokens,
        armed: true,
    };
    let done = tokens.collect().await;
    pending.armed = false;
    log_finish(&reply, &done.usage, &done.reason);
    let how = finish(&done.reason, &reply)?;
    state.stats.record(&done.usage, how.finished);
    let text = final_text(done.text.as_deref().unwrap_or(""), &done.reason, &reply);
    let usage = UsageOut::new(done.usage.prompt_tokens, done.usage.completion_tokens);
    let logprobs = match (&done.logprobs, reply.logprobs) {
        (Some(l), true) => Some(logprobs_out(&state, reply.kind, l, &mut 0)),
        _ => None,
    };
    let body = match reply.kind {
        Kind::Completion => serde_json::to_vec(&CompletionResponse {
            id: &reply.id,
            object: "text_completion",
            created: reply.created,
            model: &reply.model,
            choices: &[CompletionChoice {
                index: 0,
                text,
                logprobs,
                finish_reason: Some(how.reason),
                stop_reason: how.stop_reason,
            }],
            usage: Some(usage),
        }),
        Kind::Chat => serde_json::to_vec(&ChatResponse {
            id: &reply.id,
            object: "chat.completion",
            created: reply.created,
            model: &reply.model,
            choices: [ChatChoice {
                index: 0,
                message: ChatMessageOut {
                    role: "assistant",
                    content: text,
                },
                logprobs,
                finish_reason: Some(how.reason),
                stop_reason: how.stop_reason,
            }],
            usage,
        }),
    }
    .map_err(|e| ServerError::Task(format!("encoding the answer: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response())
}

/// Logprobs of `sampled` in the endpoint's shape. `offset` is the length of the
/// tokens' text reported before them (completions' `text_offset`), advanced past them.
/// A logprob of -inf (a masked token) is reported as -9999, as vLLM does: JSON has no
/// infinity.
fn logprobs_out(
    state: &AppState,
    kind: Kind,
    sampled: &[Sampled],
    offset: &mut usize,
) -> LogprobsOut {
    let text = |id: u32| {
        state
            .engine
            .tokenizer()
            .and_then(|t| t.decode(&[id], batos_model::SpecialTokenText::Keep).ok())
            .unwrap_or_default()
    };
    let lp = |x: f32| if x.is_finite() { x } else { -9999.0 };
    match kind {
        Kind::Completion => {
            let mut out = CompletionLogprobs::default();
            for s in sampled {
                let t = text(s.token);
                out.text_offset.push(*offset);
                *offset += t.len();
                out.token_logprobs.push(lp(s.logprob));
                out.top_logprobs.push(
                    s.top_logprobs
                        .iter()
                        .map(|a| (text(a.token), serde_json::json!(lp(a.logprob))))
                        .collect(),
                );
                out.tokens.push(t);
            }
            LogprobsOut::Completion(out)
        }
        Kind::Chat => LogprobsOut::Chat(ChatLogprobs {
            content: sampled
                .iter()
                .map(|s| {
                    let t = text(s.token);
                    ChatTokenLogprob {
                        bytes: t.as_bytes().to_vec(),
                        token: t,
                        logprob: lp(s.logprob),
                        top_logprobs: s
                            .top_logprobs
                            .iter()
                            .map(|a| {
                                let t = text(a.token);
                                ChatTopLogprob {
                                    bytes: t.as_bytes().to_vec(),
                                    token: t,
                                    logprob: lp(a.logprob),
                                }
                            })
                            .collect(),
                    }
                })
                .collect(),
        }),
    }
}

/// One line per finished request (`RUST_LOG=batos_server=debug`).
fn log_finish(reply: &Reply, usage: &Usage, reason: &StopReason) {
    tracing::debug!(
        id = %reply.id,
        model = %reply.model,
        stream = reply.stream,
        prompt_tokens = usage.prompt_tokens,
        completion_tokens = usage.completion_tokens,
        cached_prompt_tokens = usage.cached_prompt_tokens,
        ?reason,
        "request finished"
    );
}

/// Counts a non-streamed request as aborted unless disarmed (it finished).
struct AbortOnDrop<'a> {
    state: &'a AppState,
    prompt_tokens: usize,
    armed: bool,
}

impl Drop for AbortOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.state.stats.record_abort(self.prompt_tokens, 0);
        }
    }
}

/// How a request finished, in OpenAI's and vLLM's terms.
struct How<'a> {
    reason: &'static str,
    stop_reason: Option<StopReasonOut<'a>>,
    finished: Finished,
}

fn finish<'a>(reason: &'a StopReason, reply: &Reply) -> Result<How<'a>> {
    let requested = |t: u32| reply.requested_stop_ids.contains(&t);
    Ok(match reason {
        StopReason::Finished(FinishReason::Length) => How {
            reason: "length",
            stop_reason: None,
            finished: Finished::Length,
        },
        StopReason::Finished(FinishReason::StopToken(t)) => How {
            reason: "stop",
            // vLLM reports end-of-sequence as null, a requested stop id as itself.
            stop_reason: requested(*t).then_some(StopReasonOut::Token(*t)),
            finished: Finished::Stop,
        },
        StopReason::Finished(FinishReason::StopString(s)) => How {
            reason: "stop",
            stop_reason: Some(StopReasonOut::Text(s)),
            finished: Finished::Stop,
        },
        StopReason::Cancelled => How {
            reason: "abort",
            stop_reason: None,
            finished: Finished::Abort,
        },
        StopReason::Failed { message } => {
            return Err(ServerError::Aborted {
                id: reply.id.clone(),
                reason: message.clone(),
            })
        }
    })
}

/// The answer text: the engine's (already cut before a stop string), less the text
/// of the stop token that ended it.
fn final_text<'t>(text: &'t str, reason: &StopReason, reply: &Reply) -> &'t str {
    match reason {
        StopReason::Finished(FinishReason::StopToken(t)) => strip_stop(text, *t, reply),
        _ => text,
    }
}

fn strip_stop<'t>(text: &'t str, token: u32, reply: &Reply) -> &'t str {
    reply
        .stop_texts
        .iter()
        .find(|(id, _)| *id == token)
        .and_then(|(_, s)| text.strip_suffix(s.as_str()))
        .unwrap_or(text)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Nothing sent yet (chat opens with the assistant role).
    Start,
    /// Tokens flowing.
    Running,
    /// `[DONE]` sent.
    Done,
}

/// The SSE body of one streamed request.
struct EventStream {
    tokens: TokenStream,
    reply: Reply,
    state: Arc<AppState>,
    /// Text sent so far (to send the rest the engine held back, at the finish).
    emitted: String,
    prompt_tokens: usize,
    completion_tokens: usize,
    phase: Phase,
    /// Logprobs of tokens not yet sent (a token whose text is held back sends its
    /// logprob with the next chunk).
    pending_logprobs: Vec<Sampled>,
    /// Bytes of token text reported in logprobs so far (completions' `text_offset`).
    token_offset: usize,
}

/// Appends one `data: <json>\n\n` event.
fn event<T: Serialize>(buf: &mut Vec<u8>, value: &T) {
    let mark = buf.len();
    buf.extend_from_slice(b"data: ");
    if let Err(e) = serde_json::to_writer(&mut *buf, value) {
        // Plain data with string keys does not fail to encode; never send half an event.
        tracing::error!("encoding a stream chunk: {e}");
        buf.truncate(mark);
        return;
    }
    buf.extend_from_slice(b"\n\n");
}

impl EventStream {
    /// The logprobs of the tokens not yet reported, if the request asked for them.
    fn take_logprobs(&mut self) -> Option<LogprobsOut> {
        if !self.reply.logprobs || self.pending_logprobs.is_empty() {
            return None;
        }
        let out = logprobs_out(
            &self.state,
            self.reply.kind,
            &self.pending_logprobs,
            &mut self.token_offset,
        );
        self.pending_logprobs.clear();
        Some(out)
    }

    fn text_chunk(&mut self, buf: &mut Vec<u8>, text: &str) {
        let logprobs = self.take_logprobs();
        match self.reply.kind {
            Kind::Completion => self.completion_chunk(buf, text, logprobs, None, None),
            Kind::Chat => self.chat_chunk(buf, Some(text), logprobs, None, None),
        }
    }

    fn completion_chunk(
        &self,
        buf: &mut Vec<u8>,
        text: &str,
        logprobs: Option<LogprobsOut>,
        finish: Option<&'static str>,
        stop_reason: Option<StopReasonOut<'_>>,
    ) {
        let r = &self.reply;
        event(
            buf,
            &CompletionResponse {
                id: &r.id,
                object: "text_completion",
                created: r.created,
                model: &r.model,
                choices: &[CompletionChoice {
                    index: 0,
                    text,
                    logprobs,
                    finish_reason: finish,
                    stop_reason,
                }],
                usage: None,
            },
        );
    }

    fn chat_chunk(
        &self,
        buf: &mut Vec<u8>,
        content: Option<&str>,
        logprobs: Option<LogprobsOut>,
        finish: Option<&'static str>,
        stop_reason: Option<StopReasonOut<'_>>,
    ) {
        let r = &self.reply;
        let role = (self.phase == Phase::Start).then_some("assistant");
        event(
            buf,
            &ChatChunk {
                id: &r.id,
                object: "chat.completion.chunk",
                created: r.created,
                model: &r.model,
                choices: &[ChatChunkChoice {
                    index: 0,
                    delta: ChatDelta { role, content },
                    logprobs,
                    finish_reason: finish,
                    stop_reason,
                }],
                usage: None,
            },
        );
    }

    /// The last chunks: the held-back text, the finish reason, usage if asked, `[DONE]`.
    fn finish(
        &mut self,
        buf: &mut Vec<u8>,
        reason: &StopReason,
        text: Option<&str>,
        usage: &Usage,
    ) {
        log_finish(&self.reply, usage, reason);
        let how = match finish(reason, &self.reply) {
            Ok(h) => h,
            Err(e) => {
                event(buf, &e.envelope());
                buf.extend_from_slice(b"data: [DONE]\n\n");
                self.state.stats.record(usage, Finished::Abort);
                return;
            }
        };
        self.state.stats.record(usage, how.finished);
        let logprobs = self.take_logprobs();
        let full = final_text(text.unwrap_or(""), reason, &self.reply);
        let rest = full.strip_prefix(self.emitted.as_str()).unwrap_or_default();
        let r = &self.reply;
        match r.kind {
            Kind::Completion => {
                self.completion_chunk(buf, rest, logprobs, Some(how.reason), how.stop_reason)
            }
            Kind::Chat => {
                let content = (!rest.is_empty()).then_some(rest);
                self.chat_chunk(buf, content, logprobs, Some(how.reason), how.stop_reason);
            }
        }
        if r.include_usage {
            let usage = Some(UsageOut::new(usage.prompt_tokens, usage.completion_tokens));
            match r.kind {
                Kind::Completion => event(
                    buf,
                    &CompletionResponse {
                        id: &r.id,
                        object: "text_completion",
                        created: r.created,
                        model: &r.model,
                        choices: &[],
                        usage,
                    },
                ),
                Kind::Chat => event(
                    buf,
                    &ChatChunk {
                        id: &r.id,
                        object: "chat.completion.chunk",
                        created: r.created,
                        model: &r.model,
                        choices: &[],
                        usage,
                    },
                ),
            }
        }
        buf.extend_from_slice(b"data: [DONE]\n\n");
    }
}

impl Stream for EventStream {
    type Item = std::result::Result<Bytes, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.phase == Phase::Done {
            return Poll::Ready(None);
        }
        let mut buf = Vec::new();
        if this.phase == Phase::Start && this.reply.kind == Kind::Chat {
            this.chat_chunk(&mut buf, Some(""), None, None, None);
            this.phase = Phase::Running;
        }
        loop {
            match this.tokens.poll_next_event(cx) {
                Poll::Ready(Some(StreamEvent::Token(t))) => {
                    this.completion_tokens += 1;
                    if let Some(lp) = t.logprobs {
                        this.pending_logprobs.push(lp);
                    }
                    let Some(text) = t.text.as_deref() else {
                        continue;
                    };
                    let text = strip_stop(text, t.token, &this.reply);
                    if !text.is_empty() {
                        this.text_chunk(&mut buf, text);
                        this.emitted.push_str(text);
                    }
                    this.phase = Phase::Running;
                }
                Poll::Ready(Some(StreamEvent::Finished(f))) => {
                    this.finish(&mut buf, &f.reason, f.text.as_deref(), &f.usage);
                    this.phase = Phase::Done;
                    break;
                }
                Poll::Ready(None) => {
                    // The engine stopped without finishing this request.
                    let e = ServerError::Aborted {
                        id: this.reply.id.clone(),
                        reason: "the engine stopped".into(),
                    };
                    event(&mut buf, &e.envelope());
                    buf.extend_from_slice(b"data: [DONE]\n\n");
                    this.state
                        .stats
                        .record_abort(this.prompt_tokens, this.completion_tokens);
                    this.phase = Phase::Done;
                    break;
                }
                Poll::Pending => break,
            }
        }
        if buf.is_empty() {
            // Pending with the waker stored by the token stream.
            Poll::Pending
        } else {
            Poll::Ready(Some(Ok(Bytes::from(buf))))
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if self.phase != Phase::Done {
            // The client went away mid-stream: dropping `tokens` cancels the request.
            self.state
                .stats
                .record_abort(self.prompt_tokens, self.completion_tokens);
        }
    }
}
