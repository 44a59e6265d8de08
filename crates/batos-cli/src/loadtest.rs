//! `batos loadtest`: drives any OpenAI-compatible server (batos's, vLLM's, llama.cpp's)
//! with N concurrent streaming clients for a fixed time and reports what a user of the
//! server sees: output tokens/s, time to first token, inter-token latency, requests
//! completed, cut and failed.
//!
//! # Method
//!
//! Every client is a closed loop: it sends one streaming request (`"stream": true`),
//! reads it to its end, and sends the next at once. Client `i` always uses model
//! `models[i % models.len()]` (so 64 clients over 4 adapters put 16 streams on each), and
//! walks the prompt list from its own offset. All clients start together, so the first
//! wave measures a burst of N arrivals. At the end of the window every open stream is
//! dropped (its tokens so far still count; the request counts as *cut*, not failed).
//!
//! - **Tokens** are counted as SSE chunks that carry text (`choices[0].text` for
//!   completions, `choices[0].delta.content` for chat); role-only and finish-only chunks
//!   do not count. Both batos and llama-cpp-python's server send one chunk per token,
//!   except that both send a character split across tokens in one chunk once it is
//!   complete (and batos holds back text that may begin a stop string until it is known
//!   not to be one): rare for English text. When the server also reports `usage` in the
//!   stream (`stream_options.include_usage`, which this tool always asks for), the
//!   count is checked against it for every completed request and mismatches are
//!   reported.
//! - **Output tok/s** = tokens received inside the window ÷ the window.
//! - **TTFT** is from sending the request to its first text chunk. A request still
//!   waiting for its first token when the window closes contributes its wait so far (a
//!   lower bound), so a server that queues requests cannot hide its queue by never
//!   answering within the window; how many such samples there were is reported.
//! - **Inter-token latency** is the gap between consecutive text chunks of one request.
//! - **Failed**: a non-2xx status, a connection error, an `error` object in the stream,
//!   unparsable data, a stream that ended without `[DONE]`, or a request that exceeded
//!   `--request-timeout`.
//!
//! The client runs on a single-threaded tokio runtime: on a small machine it should take
//! as little CPU as possible from the server it measures. Plain `http://` only (the tool
//! is meant for loopback and private networks; no TLS stack is linked).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::time::Instant as TokioInstant;

/// Which OpenAI endpoint to drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Api {
    /// `POST /v1/chat/completions` with the prompt as one user message.
    Chat,
    /// `POST /v1/completions` with the prompt as raw text.
    Completions,
}

impl Api {
    fn path(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Completions => "/v1/completions",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct LoadtestArgs {
    /// The server's base URL, e.g. http://127.0.0.1:8000 (http only).
    #[arg(long)]
    url: String,
    /// The endpoint to drive.
    #[arg(long, value_enum, default_value = "chat")]
    api: Api,
    /// Concurrent streaming clients.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Model names (adapters) to spread the clients over: client i uses model i mod
    /// len.
    #[arg(long, value_delimiter = ',', required = true)]
    models: Vec<String>,
    /// How long to drive the server: 60s, 2m, 500ms (a bare number is seconds).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    duration: Duration,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Prompts, one per line (blank lines skipped); default: a built-in list.
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<PathBuf>,
    /// Sampling temperature of every request.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// A JSON object whose fields are added to every request body, e.g.
    /// '{"ignore_eos": true}'.
    #[arg(long, value_name = "JSON")]
    extra_body: Option<String>,
    /// Sent as `Authorization: Bearer KEY`.
    #[arg(long)]
    api_key: Option<String>,
    /// A request taking longer than this fails.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    request_timeout: Duration,
    /// A name for this run, carried into the JSON.
    #[arg(long)]
    label: Option<String>,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
}

/// Parses `60s`, `2m`, `500ms`, `1h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("'{s}': expected a number followed by ms, s, m or h"))?;
    let seconds = match unit.trim() {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("'{s}': unknown unit '{other}' (use ms, s, m or h)")),
    };
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("'{s}': must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Prompts used when no `--prompt-file` is given: short requests for stories and
/// explanations, which the model answers at length.
const DEFAULT_PROMPTS: &[&str] = &[
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle stays upright while it is moving.",
    "Describe a busy market in a mountain town early in the morning.",
    "Write a letter from a sailor to his family after a long voyage.",
    "Explain the water cycle to a ten-year-old.",
    "Tell the story of a robot that learns to paint.",
    "Describe how bread is made, from the field to the table.",
    "Write a diary entry of a cat watching the rain.",
];

/// The settings every client shares.
struct Ctx {
    http: reqwest::Client,
    endpoint: String,
    api: Api,
    models: Vec<String>,
    prompts: Vec<String>,
    clients: usize,
    max_tokens: usize,
    temperature: f32,
    extra: serde_json::Map<String, Value>,
    api_key: Option<String>,
    request_timeout: Duration,
}

impl Ctx {
    fn body(&self, model: &str, prompt: &str) -> Value {
        let mut body = json!({
            "model": model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": true,
            "stream_options": {"include_usage": true},
        });
        let obj = body.as_object_mut().expect("a JSON object");
        match self.api {
            Api::Chat => {
                obj.insert(
                    "messages".into(),
                    json!([{"role": "user", "content": prompt}]),
                );
            }
            Api::Completions => {
                obj.insert("prompt".into(), json!(prompt));
            }
        }
        for (k, v) in &self.extra {
            obj.insert(k.clone(), v.clone());
        }
        body
    }
}

/// Splits a byte stream into Server-Sent Events and returns their `data` payloads.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Option<String>,
}

impl SseParser {
    /// Feeds bytes; returns the data of every event they completed, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
            let mut line = &self.buf[start..start + nl];
            start += nl + 1;
            if line.last() == Some(&b'\r') {
                line = &line[..line.len() - 1];
            }
            if line.is_empty() {
                if let Some(d) = self.data.take() {
                    out.push(d);
                }
                continue;
            }
            // Comments (`: ping`), `event:`, `id:` and `retry:` lines carry no data.
            if let Some(rest) = line.strip_prefix(b"data:") {
                let rest = rest.strip_prefix(b" ").unwrap_or(rest);
                let text = String::from_utf8_lossy(rest);
                match &mut self.data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(&text);
                    }
                    None => self.data = Some(text.into_owned()),
                }
            }
        }
        self.buf.drain(..start);
        out
    }
}

/// What one SSE payload says.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ChunkInfo {
    /// The text it adds (empty for role-only or finish-only chunks).
    pub text: String,
    /// `finish_reason`, once present.
    pub finish_reason: Option<String>,
    /// `usage.completion_tokens`, when the server reports usage.
    pub completion_tokens: Option<usize>,
    /// The stream's terminator.
    pub done: bool,
}

/// Interprets one SSE payload of `api`'s stream; an `error` object or invalid JSON is
/// an error.
pub fn interpret(api: Api, payload: &str) -> Result<ChunkInfo, String> {
    if payload.trim() == "[DONE]" {
        return Ok(ChunkInfo {
            done: true,
            ..ChunkInfo::default()
        });
    }
    let v: Value = serde_json::from_str(payload)
        .map_err(|e| format!("unparsable stream data ({e}): {}", clip(payload)))?;
    if let Some(err) = v.get("error") {
        let msg = err
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| err.to_string());
        return Err(format!("error in stream: {msg}"));
    }
    let mut info = ChunkInfo::default();
    if let Some(choice) = v.get("choices").and_then(|c| c.get(0)) {
        let text = match api {
            Api::Chat => choice.get("delta").and_then(|d| d.get("content")),
            Api::Completions => choice.get("text"),
        };
        if let Some(t) = text.and_then(Value::as_str) {
            info.text = t.to_owned();
        }
        info.finish_reason = choice
            .get("finish_reason")
            .and_then(Value::as_str)
            .map(str::to_owned);
    }
    info.completion_tokens = v
        .get("usage")
        .and_then(|u| u.get("completion_tokens"))
        .and_then(Value::as_u64)
        .map(|n| n as usize);
    Ok(info)
}

fn clip(s: &str) -> String {
    let mut end = s.len().min(200);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// One request as observed by its client; filled in while it streams, so a request cut
/// at the end of the window keeps what it had.
#[derive(Debug)]
struct Observed {
    model: usize,
    sent: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    chunks: usize,
    gaps: Vec<Duration>,
    usage_tokens: Option<usize>,
    finish_reason: Option<String>,
}

impl Observed {
    fn new(model: usize) -> Self {
        Observed {
            model,
            sent: Instant::now(),
            first: None,
            last: None,
            chunks: 0,
            gaps: Vec::new(),
            usage_tokens: None,
            finish_reason: None,
        }
    }

    fn text_chunk(&mut self) {
        let now = Instant::now();
        match self.last {
            None => self.first = Some(now),
            Some(t) => self.gaps.push(now - t),
        }
        self.last = Some(now);
        self.chunks += 1;
    }
}

#[derive(Debug)]
enum Outcome {
    Completed,
    Failed(String),
    Cut,
}

/// Sends one streaming request and reads it to its end.
async fn stream_one(ctx: &Ctx, model: &str, prompt: &str, obs: &mut Observed) -> Outcome {
    let mut req = ctx
        .http
        .post(&ctx.endpoint)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(reqwest::header::ACCEPT, "text/event-stream")
        .body(ctx.body(model, prompt).to_string());
    if let Some(key) = &ctx.api_key {
        req = req.bearer_auth(key);
    }
    obs.sent = Instant::now();
    let mut resp = match req.send().await {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(format!("request: {e}")),
    };
    let status = resp.status();
    if !status.is_success() {
        let body = resp.text().await.unwrap_or_default();
        return Outcome::Failed(format!("HTTP {status}: {}", clip(&body)));
    }
    let mut parser = SseParser::default();
    loop {
        let bytes = match resp.chunk().await {
            Ok(Some(b)) => b,
            Ok(None) => return Outcome::Failed("stream ended without [DONE]".into()),
            Err(e) => return Outcome::Failed(format!("reading the stream: {e}")),
        };
        for payload in parser.push(&bytes) {
            let info = match interpret(ctx.api, &payload) {
                Ok(i) => i,
                Err(e) => return Outcome::Failed(e),
            };
            if info.done {
                return Outcome::Completed;
            }
            if !info.text.is_empty() {
                obs.text_chunk();
            }
            if info.finish_reason.is_some() {
                obs.finish_reason = info.finish_reason;
            }
            if info.completion_tokens.is_some() {
                obs.usage_tokens = info.completion_tokens;
            }
        }
    }
}

/// What one client saw.
#[derive(Debug, Default)]
struct ClientLog {
    requests: Vec<(Observed, Outcome)>,
}

async fn run_client(ctx: Arc<Ctx>, index: usize, deadline: Instant) -> ClientLog {
    let mut log = ClientLog::default();
    let model = index % ctx.models.len();
    let mut k = 0usize;
    while Instant::now() < deadline {
        let prompt = &ctx.prompts[(index + k * ctx.clients) % ctx.prompts.len()];
        k += 1;
        let mut obs = Observed::new(model);
        let limit = deadline.min(Instant::now() + ctx.request_timeout);
        let outcome = match tokio::time::timeout_at(
            TokioInstant::from_std(limit),
            stream_one(&ctx, &ctx.models[model], prompt, &mut obs),
        )
        .await
        {
            Ok(o) => o,
            Err(_) if limit < deadline => Outcome::Failed(format!(
                "no end after {:.1} s (--request-timeout)",
                ctx.request_timeout.as_secs_f64()
            )),
            Err(_) => Outcome::Cut,
        };
        let failed = matches!(outcome, Outcome::Failed(_));
        log.requests.push((obs, outcome));
        if failed {
            // Do not spin on a server that refuses at once.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    log
}

/// Percentiles of a latency sample, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Samples.
    pub count: usize,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

/// Nearest-rank percentiles of `samples`.
pub fn summarize(samples: &mut [Duration]) -> LatencySummary {
    if samples.is_empty() {
        return LatencySummary::default();
    }
    samples.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let rank = |p: f64| {
        let r = (p / 100.0 * samples.len() as f64).ceil() as usize;
        ms(samples[r.clamp(1, samples.len()) - 1])
    };
    let total: Duration = samples.iter().sum();
    LatencySummary {
        count: samples.len(),
        mean_ms: ms(total) / samples.len() as f64,
        p50_ms: rank(50.0),
        p90_ms: rank(90.0),
        p99_ms: rank(99.0),
        max_ms: ms(*samples.last().expect("non-empty")),
    }
}

/// Per-model figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ModelReport {
    /// Requests that ran to `[DONE]`.
    pub completed: usize,
    /// Tokens received in the window.
    pub tokens: usize,
    /// Time to first token of this model's requests.
    pub ttft: LatencySummary,
}

/// The results of one run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    /// `--label`.
    pub label: Option<String>,
    /// The server's base URL.
    pub url: String,
    /// The endpoint driven.
    pub api: Api,
    /// Concurrent clients.
    pub clients: usize,
    /// Model names.
    pub models: Vec<String>,
    /// `max_tokens` of every request.
    pub max_tokens: usize,
    /// The window, in seconds.
    pub duration_s: f64,
    /// Requests sent.
    pub requests: usize,
    /// Requests that ran to `[DONE]`.
    pub completed: usize,
    /// Requests still streaming (or queued) when the window closed.
    pub cut: usize,
    /// Failed requests.
    pub failed: usize,
    /// Up to 5 distinct failure messages, with counts.
    pub failures: BTreeMap<String, usize>,
    /// Text chunks (tokens) received in the window.
    pub output_tokens: usize,
    /// `output_tokens` ÷ `duration_s`.
    pub output_tokens_per_s: f64,
    /// Completed requests per second.
    pub requests_per_s: f64,
    /// Mean tokens of a completed request.
    pub mean_tokens_per_completed: f64,
    /// Time to first token, including lower-bound samples of requests that had none
    /// when the window closed.
    pub ttft: LatencySummary,
    /// How many TTFT samples are such lower bounds.
    pub ttft_censored: usize,
    /// Gaps between consecutive tokens of a request.
    pub inter_token: LatencySummary,
    /// Completed requests whose reported `usage.completion_tokens` was checked against
    /// their chunk count.
    pub usage_checked: usize,
    /// Of those, how many differed.
    pub usage_mismatches: usize,
    /// `finish_reason` counts of completed requests.
    pub finish_reasons: BTreeMap<String, usize>,
    /// Per model.
    pub per_model: BTreeMap<String, ModelReport>,
    /// `/proc/loadavg`'s 1-minute figure before and after the run.
    pub load_average: (Option<f64>, Option<f64>),
}

fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn build_report(
    args_label: Option<String>,
    ctx: &Ctx,
    url: &str,
    window: Duration,
    deadline: Instant,
    logs: Vec<ClientLog>,
    load: (Option<f64>, Option<f64>),
) -> Report {
    let mut ttft = Vec::new();
    let mut ttft_censored = 0;
    let mut gaps = Vec::new();
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut finish_reasons = BTreeMap::new();
    let mut per_model_ttft: Vec<Vec<Duration>> = vec![Vec::new(); ctx.models.len()];
    let mut per_model: BTreeMap<String, ModelReport> = BTreeMap::new();
    let (mut requests, mut completed, mut cut, mut failed, mut tokens) = (0, 0, 0, 0, 0);
    let (mut usage_checked, mut usage_mismatches, mut completed_tokens) = (0, 0, 0);
    for (obs, outcome) in logs.into_iter().flat_map(|l| l.requests) {
        requests += 1;
        tokens += obs.chunks;
        let m = per_model.entry(ctx.models[obs.model].clone()).or_default();
        m.tokens += obs.chunks;
        gaps.extend_from_slice(&obs.gaps);
        match obs.first {
            Some(f) => {
                ttft.push(f - obs.sent);
                per_model_ttft[obs.model].push(f - obs.sent);
            }
            None if matches!(outcome, Outcome::Cut) => {
                ttft.push(deadline.saturating_duration_since(obs.sent));
                ttft_censored += 1;
            }
            None => {}
        }
        match outcome {
            Outcome::Completed => {
                completed += 1;
                m.completed += 1;
                completed_tokens += obs.chunks;
                if let Some(u) = obs.usage_tokens {
                    usage_checked += 1;
                    if u != obs.chunks {
                        usage_mismatches += 1;
                    }
                }
                let reason = obs.finish_reason.unwrap_or_else(|| "(none)".into());
                *finish_reasons.entry(reason).or_insert(0) += 1;
            }
            Outcome::Cut => cut += 1,
            Outcome::Failed(msg) => {
                failed += 1;
                if failures.len() < 5 || failures.contains_key(&msg) {
                    *failures.entry(msg).or_insert(0) += 1;
                }
            }
        }
    }
    for (i, name) in ctx.models.iter().enumerate() {
        per_model.entry(name.clone()).or_default().ttft = summarize(&mut per_model_ttft[i]);
    }
    let secs = window.as_secs_f64();
    Report {
        label: args_label,
        url: url.to_owned(),
        api: ctx.api,
        clients: ctx.clients,
        models: ctx.models.clone(),
        max_tokens: ctx.max_tokens,
        duration_s: secs,
        requests,
        completed,
        cut,
        failed,
        failures,
        output_tokens: tokens,
        output_tokens_per_s: tokens as f64 / secs,
        requests_per_s: completed as f64 / secs,
        mean_tokens_per_completed: if completed == 0 {
            0.0
        } else {
            completed_tokens as f64 / completed as f64
        },
        ttft: summarize(&mut ttft),
        ttft_censored,
        inter_token: summarize(&mut gaps),
        usage_checked,
        usage_mismatches,
        finish_reasons,
        per_model,
        load_average: load,
    }
}

/// Runs the load: `clients` closed-loop streaming clients until `duration` has passed.
async fn drive(ctx: Arc<Ctx>, duration: Duration) -> (Duration, Instant, Vec<ClientLog>) {
    let start = Instant::now();
    let deadline = start + duration;
    let handles: Vec<_> = (0..ctx.clients)
        .map(|i| tokio::spawn(run_client(ctx.clone(), i, deadline)))
        .collect();
    let mut logs = Vec::with_capacity(handles.len());
    for h in handles {
        // A client task only ends by returning its log; a panic there is a bug here.
        logs.push(h.await.expect("a load client panicked"));
    }
    (deadline - start, deadline, logs)
}

fn read_prompts(file: Option<&PathBuf>) -> anyhow::Result<Vec<String>> {
    let prompts: Vec<String> = match file {
        None => DEFAULT_PROMPTS.iter().map(|s| (*s).to_owned()).collect(),
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the prompt file {}", path.display()))?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect(),
    };
    if prompts.is_empty() {
        bail!("the prompt file has no prompts (one per line)");
    }
    Ok(prompts)
}

/// Checks the arguments and builds what the clients share.
fn context(args: &LoadtestArgs) -> anyhow::Result<Ctx> {
    if args.clients == 0 {
        bail!("--clients must be at least 1");
    }
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    let models: Vec<String> = args
        .models
        .iter()
        .map(|m| m.trim().to_owned())
        .filter(|m| !m.is_empty())
        .collect();
    if models.is_empty() {
        bail!("--models names no model");
    }
    let base = args.url.trim_end_matches('/');
    if !base.starts_with("http://") {
        bail!("--url {base}: only http:// URLs are supported (no TLS stack is linked)");
    }
    let extra = match &args.extra_body {
        None => serde_json::Map::new(),
        Some(s) => match serde_json::from_str(s).context("--extra-body is not JSON")? {
            Value::Object(m) => m,
            other => bail!("--extra-body must be a JSON object, got {other}"),
        },
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.clients)
        .tcp_nodelay(true)
        .build()
        .context("cannot build the HTTP client")?;
    Ok(Ctx {
        http,
        endpoint: format!("{base}{}", args.api.path()),
        api: args.api,
        models,
        prompts: read_prompts(args.prompt_file.as_ref())?,
        clients: args.clients,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        extra,
        api_key: args.api_key.clone(),
        request_timeout: args.request_timeout,
    })
}

/// Runs a load test and returns its report (also used by the tests).
pub fn run_report(args: &LoadtestArgs) -> anyhow::Result<Report> {
    let ctx = Arc::new(context(args)?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    let before = load_average();
    tracing::info!(
        clients = ctx.clients,
        models = ctx.models.len(),
        seconds = args.duration.as_secs_f64(),
        endpoint = %ctx.endpoint,
        "load test started"
    );
    let (window, deadline, logs) = rt.block_on(drive(ctx.clone(), args.duration));
    let after = load_average();
    Ok(build_report(
        args.label.clone(),
        &ctx,
        &args.url,
        window,
        deadline,
        logs,
        (before, after),
    ))
}

fn print_table(r: &Report) {
    let la = |x: Option<f64>| x.map_or("?".into(), |v| format!("{v:.2}"));
    println!(
        "{} {} clients over {} model(s), max_tokens {}, {:.0} s{}",
        r.url,
        r.clients,
        r.models.len(),
        r.max_tokens,
        r.duration_s,
        r.label
            .as_deref()
            .map(|l| format!(" [{l}]"))
            .unwrap_or_default()
    );
    println!(
        "{:<22} {:>12}\n{:<22} {:>12}\n{:<22} {:>12.1}\n{:<22} {:>12.2}",
        "requests (completed)",
        format!("{} ({})", r.requests, r.completed),
        "cut / failed",
        format!("{} / {}", r.cut, r.failed),
        "output tok/s",
        r.output_tokens_per_s,
        "completed req/s",
        r.requests_per_s,
    );
    println!(
        "{:<22} {:>12}\n{:<22} {:>12}",
        "output tokens",
        r.output_tokens,
        "tokens/completed req",
        format!("{:.1}", r.mean_tokens_per_completed),
    );
    println!(
        "{:<22} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "latency (ms)", "p50", "p90", "p99", "max", "mean"
    );
    for (name, s) in [("TTFT", r.ttft), ("inter-token", r.inter_token)] {
        println!(
            "{:<22} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            name, s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms, s.mean_ms
        );
    }
    if r.ttft_censored > 0 {
        println!(
            "  ({} TTFT samples are lower bounds: no first token before the window closed)",
            r.ttft_censored
        );
    }
    for (m, s) in &r.per_model {
        println!(
            "  model {m}: {} completed, {} tokens, TTFT p50 {:.1} ms p99 {:.1} ms",
            s.completed, s.tokens, s.ttft.p50_ms, s.ttft.p99_ms
        );
    }
    if r.usage_checked > 0 {
        println!(
            "  usage check: {} of {} completed requests reported a token count other than their chunk count",
            r.usage_mismatches, r.usage_checked
        );
    }
    for (msg, n) in &r.failures {
        println!("  failed ×{n}: {msg}");
    }
    println!(
        "  load average (1 min) before {} after {}",
        la(r.load_average.0),
        la(r.load_average.1)
    );
}

/// `batos loadtest`.
pub fn run(args: &LoadtestArgs) -> anyhow::Result<()> {
    let report = run_report(args)?;
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn sse_events_split_across_reads() {
        let mut p = SseParser::default();
        assert!(p.push(b": ping\r\n\r\ndata: {\"a\"").is_empty());
        assert_eq!(p.push(b": 1}\n\ndata: [DONE]\n"), vec!["{\"a\": 1}"]);
        assert_eq!(p.push(b"\n"), vec!["[DONE]"]);
        // Multi-line data joins with a newline.
        assert_eq!(p.push(b"data: x\ndata: y\n\n"), vec!["x\ny"]);
    }

    #[test]
    fn chunks_are_interpreted_per_api() {
        let chat = r#"{"choices":[{"index":0,"delta":{"content":" hi"},"finish_reason":null}]}"#;
        assert_eq!(interpret(Api::Chat, chat).unwrap().text, " hi");
        let role = r#"{"choices":[{"index":0,"delta":{"role":"assistant"}}]}"#;
        assert_eq!(interpret(Api::Chat, role).unwrap(), ChunkInfo::default());
        let done = r#"{"choices":[{"index":0,"text":"","finish_reason":"length"}],"usage":{"completion_tokens":7}}"#;
        let info = interpret(Api::Completions, done).unwrap();
        assert_eq!(info.finish_reason.as_deref(), Some("length"));
        assert_eq!(info.completion_tokens, Some(7));
        assert!(interpret(Api::Chat, "[DONE]").unwrap().done);
        let err = interpret(Api::Chat, r#"{"error":{"message":"boom"}}"#).unwrap_err();
        assert!(err.contains("boom"), "{err}");
        assert!(interpret(Api::Chat, "{not json").is_err());
    }

    #[test]
    fn nearest_rank_percentiles() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = summarize(&mut v);
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_ms, 50.0);
        assert_eq!(s.p99_ms, 99.0);
        assert_eq!(s.max_ms, 100.0);
        assert_eq!(summarize(&mut []), LatencySummary::default());
    }

    /// A tiny HTTP/1.1 server on loopback: model "ok" streams `TOKENS` chat chunks
    /// (and usage), model "bad" answers 404 with vLLM's error envelope.
    const TOKENS: usize = 5;

    fn fake_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                std::thread::spawn(move || serve_conn(conn));
            }
        });
        format!("http://{addr}")
    }

    fn serve_conn(conn: std::net::TcpStream) {
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut out = conn;
        loop {
            let mut len = 0usize;
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let body: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(body["stream"], true);
            if body["model"] == "bad" {
                let msg = r#"{"object":"error","message":"The model `bad` does not exist.","type":"NotFoundError","code":404}"#;
                let head = format!(
                    "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                    msg.len()
                );
                out.write_all(head.as_bytes()).unwrap();
                out.write_all(msg.as_bytes()).unwrap();
                continue;
            }
            let mut events = String::from(": ping\n\n");
            events.push_str(
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\"}}]}\n\n",
            );
            for i in 0..TOKENS {
                events.push_str(&format!(
                    "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" t{i}\"}},\"finish_reason\":null}}]}}\n\n"
                ));
            }
            events.push_str(&format!(
                "data: {{\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"length\"}}],\"usage\":{{\"completion_tokens\":{TOKENS}}}}}\n\ndata: [DONE]\n\n"
            ));
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            out.write_all(head.as_bytes()).unwrap();
            // One HTTP chunk per event, so the client sees the stream in pieces.
            for ev in events.split_inclusive("\n\n") {
                out.write_all(format!("{:x}\r\n{ev}\r\n", ev.len()).as_bytes())
                    .unwrap();
                out.flush().unwrap();
            }
            out.write_all(b"0\r\n\r\n").unwrap();
        }
    }

    fn args(url: String, models: &str) -> LoadtestArgs {
        LoadtestArgs {
            url,
            api: Api::Chat,
            clients: 4,
            models: models.split(',').map(str::to_owned).collect(),
            duration: Duration::from_millis(400),
            max_tokens: TOKENS,
            prompt_file: None,
            temperature: 0.0,
            extra_body: Some(r#"{"ignore_eos": true}"#.into()),
            api_key: None,
            request_timeout: Duration::from_secs(30),
            label: None,
            json: None,
        }
    }

    #[test]
    fn counts_tokens_and_failures_against_a_fake_server() {
        let url = fake_server();
        let r = run_report(&args(url, "ok,bad")).unwrap();
        // Clients 0 and 2 use "ok", 1 and 3 "bad".
        assert!(r.completed >= 2, "{r:?}");
        assert!(r.failed >= 2, "{r:?}");
        assert_eq!(r.requests, r.completed + r.failed + r.cut);
        assert_eq!(r.mean_tokens_per_completed, TOKENS as f64);
        assert_eq!(r.usage_checked, r.completed);
        assert_eq!(r.usage_mismatches, 0);
        assert_eq!(r.finish_reasons.get("length"), Some(&r.completed));
        assert_eq!(r.per_model["bad"].tokens, 0);
        assert_eq!(r.per_model["ok"].completed, r.completed);
        assert!(r.failures.keys().all(|m| m.contains("404")), "{r:?}");
        // Every completed request gave one TTFT sample and TOKENS - 1 gaps.
        assert!(r.ttft.count >= r.completed);
        assert!(r.inter_token.count >= r.completed * (TOKENS - 1));
    }

    #[test]
    fn bad_arguments_are_refused() {
        let mut a = args("https://example.invalid".into(), "m");
        assert!(run_report(&a).is_err());
        a.url = "http://127.0.0.1:1".into();
        a.extra_body = Some("[1]".into());
        assert!(run_report(&a).is_err());
        a.extra_body = None;
        a.clients = 0;
        assert!(run_report(&a).is_err());
    }
}
