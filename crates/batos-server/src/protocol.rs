//! The OpenAI wire format, as vLLM speaks it: request bodies (unknown fields ignored,
//! as OpenAI clients send extras), responses and stream chunks (serialised from
//! borrowed data, so a stream chunk costs no copies of the model name or id).

use serde::{Deserialize, Serialize};

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// One value.
    One(T),
    /// A list.
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    /// The values as a list.
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A completion prompt: text, or token ids; a batch of one is accepted.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PromptInput {
    /// Text.
    Text(String),
    /// Token ids.
    Tokens(Vec<u32>),
    /// A batch of texts (only one is served per request).
    Texts(Vec<String>),
    /// A batch of token lists (only one is served per request).
    TokenLists(Vec<Vec<u32>>),
}

/// `stream_options`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct StreamOptions {
    /// Send a last chunk with `usage` (and no choices) before `[DONE]`.
    pub include_usage: bool,
}

/// Sampling and stopping fields shared by completions and chat (OpenAI's plus vLLM's
/// extensions `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct SamplingFields {
    /// Tokens to generate at most.
    pub max_tokens: Option<u64>,
    /// Temperature (default 1; 0 is greedy).
    pub temperature: Option<f32>,
    /// Nucleus mass.
    pub top_p: Option<f32>,
    /// Keep the k most likely tokens; 0 or -1 disables (vLLM).
    pub top_k: Option<i64>,
    /// Minimum probability relative to the most likely token (vLLM).
    pub min_p: Option<f32>,
    /// Presence penalty.
    pub presence_penalty: Option<f32>,
    /// Frequency penalty.
    pub frequency_penalty: Option<f32>,
    /// Multiplicative repetition penalty (vLLM).
    pub repetition_penalty: Option<f32>,
    /// RNG seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<OneOrMany<String>>,
    /// Stop token ids (vLLM).
    pub stop_token_ids: Option<Vec<u32>>,
    /// Keep generating past end-of-sequence (vLLM).
    pub ignore_eos: Option<bool>,
    /// Choices per prompt: only 1 is served.
    pub n: Option<u64>,
    /// Stream the answer as server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// `logit_bias`: refused when non-empty.
    pub logit_bias: Option<serde_json::Map<String, serde_json::Value>>,
}

/// `POST /v1/completions`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct CompletionRequest {
    /// The base model's name or an adapter's (default: the base model).
    #[serde(default)]
    pub model: Option<String>,
    /// What to continue.
    pub prompt: PromptInput,
    /// Sampling and stopping.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// `echo`: refused when true.
    #[serde(default)]
    pub echo: Option<bool>,
    /// `best_of`: refused when above 1.
    #[serde(default)]
    pub best_of: Option<u64>,
    /// `logprobs`: refused (not served yet).
    #[serde(default)]
    pub logprobs: Option<u32>,
    /// `suffix`: refused.
    #[serde(default)]
    pub suffix: Option<String>,
}

/// One part of a multi-part message content.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ContentPart {
    /// `text` is the only type served.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// A message's content: text, parts, or nothing.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Parts (text only).
    Parts(Vec<ContentPart>),
}

/// One chat message as sent.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ChatMessageIn {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Its content (`null` for an assistant turn with tool calls only).
    #[serde(default)]
    pub content: Option<MessageContent>,
}

/// `POST /v1/chat/completions`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct ChatRequest {
    /// The base model's name or an adapter's (default: the base model).
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatMessageIn>,
    /// Sampling and stopping.
    #[serde(flatten)]
    pub sampling: SamplingFields,
    /// OpenAI's newer name for `max_tokens`.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// `logprobs`: refused when true (not served yet).
    #[serde(default)]
    pub logprobs: Option<bool>,
    /// `top_logprobs`: refused (not served yet).
    #[serde(default)]
    pub top_logprobs: Option<u32>,
    /// `tools`: refused when non-empty.
    #[serde(default)]
    pub tools: Option<Vec<serde_json::Value>>,
}

/// `POST /v1/load_lora_adapter`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct LoadLoraRequest {
    /// The name requests will use as `model`.
    #[serde(default)]
    pub lora_name: String,
    /// A PEFT directory inside the configured `lora_dir`; omitted or `null`: the
    /// adapter stored under `lora_name` in the living image.
    #[serde(default)]
    pub lora_path: Option<String>,
    /// Replace an adapter already served under the name.
    #[serde(default)]
    pub load_inplace: bool,
}

/// `POST /v1/unload_lora_adapter`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct UnloadLoraRequest {
    /// The adapter to stop serving.
    #[serde(default)]
    pub lora_name: String,
    /// vLLM's internal id: accepted and ignored, as current vLLM does.
    #[serde(default)]
    pub lora_int_id: Option<i64>,
}

/// Token counts of one answer.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub struct UsageOut {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

impl UsageOut {
    /// From the engine's counts.
    pub fn new(prompt: usize, completion: usize) -> Self {
        UsageOut {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt + completion,
        }
    }
}

/// vLLM's `stop_reason`: the stop string or stop token id that ended the request
/// (`null` for end-of-sequence and length).
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum StopReasonOut<'a> {
    /// A stop token id from `stop_token_ids`.
    Token(u32),
    /// A stop string.
    Text(&'a str),
}

/// One choice of a text completion (also a stream chunk's choice).
#[derive(Serialize)]
pub struct CompletionChoice<'a> {
    pub index: u32,
    pub text: &'a str,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<StopReasonOut<'a>>,
}

/// A text completion, or one chunk of a streamed one.
#[derive(Serialize)]
pub struct CompletionResponse<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: &'a [CompletionChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
}

/// The assistant's message in a non-streamed chat answer.
#[derive(Serialize)]
pub struct ChatMessageOut<'a> {
    pub role: &'static str,
    pub content: &'a str,
}

/// One choice of a chat completion.
#[derive(Serialize)]
pub struct ChatChoice<'a> {
    pub index: u32,
    pub message: ChatMessageOut<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
    pub stop_reason: Option<StopReasonOut<'a>>,
}

/// A chat completion.
#[derive(Serialize)]
pub struct ChatResponse<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: [ChatChoice<'a>; 1],
    pub usage: UsageOut,
}

/// The delta of one chat stream chunk.
#[derive(Serialize)]
pub struct ChatDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<&'a str>,
}

/// One choice of a chat stream chunk.
#[derive(Serialize)]
pub struct ChatChunkChoice<'a> {
    pub index: u32,
    pub delta: ChatDelta<'a>,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_reason: Option<StopReasonOut<'a>>,
}

/// One chunk of a streamed chat completion.
#[derive(Serialize)]
pub struct ChatChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: &'a [ChatChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageOut>,
}

/// vLLM's model permission object (fixed values: batos has no per-model permissions).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelPermission {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub allow_create_engine: bool,
    pub allow_sampling: bool,
    pub allow_logprobs: bool,
    pub allow_search_indices: bool,
    pub allow_view: bool,
    pub allow_fine_tuning: bool,
    pub organization: &'static str,
    pub group: Option<()>,
    pub is_blocking: bool,
}

/// One entry of `/v1/models`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    pub root: String,
    pub parent: Option<String>,
    pub max_model_len: Option<usize>,
    pub permission: Vec<ModelPermission>,
}

/// `/v1/models`.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}
