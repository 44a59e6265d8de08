//! `GET /metrics`: Prometheus text with vLLM's metric names, so dashboards and
//! LoRA-aware routers built for vLLM read a batos server unchanged.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use batos_engine::{LatencyHistogram, MetricsSnapshot, Usage};

use crate::error::{Result, ServerError};
use crate::server::AppState;

/// How a request ended, as `vllm:request_success_total{finished_reason}` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finished {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the context.
    Length,
    /// Cancelled: the client went away, or a cancelling shutdown.
    Abort,
}

/// Counters the HTTP layer keeps (the engine keeps queues, KV and latencies).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    stop: AtomicU64,
    length: AtomicU64,
    abort: AtomicU64,
}

impl Stats {
    /// Records one finished request.
    pub(crate) fn record(&self, usage: &Usage, how: Finished) {
        self.prompt_tokens
            .fetch_add(usage.prompt_tokens as u64, Ordering::Relaxed);
        self.generation_tokens
            .fetch_add(usage.completion_tokens as u64, Ordering::Relaxed);
        let c = match how {
            Finished::Stop => &self.stop,
            Finished::Length => &self.length,
            Finished::Abort => &self.abort,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a request that ended without a finish event (the client left).
    pub(crate) fn record_abort(&self, prompt_tokens: usize, completion_tokens: usize) {
        self.record(
            &Usage {
                prompt_tokens,
                completion_tokens,
                ..Usage::default()
            },
            Finished::Abort,
        );
    }
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response> {
    let st = state.clone();
    // The snapshot is a round trip to the step loop: off the async workers.
    let snapshot = tokio::task::spawn_blocking(move || st.engine.metrics())
        .await
        .map_err(|e| ServerError::Task(e.to_string()))??;
    let text = render(&state, &snapshot, crate::server::unix_now());
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Escapes a Prometheus label value.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn sample(out: &mut String, name: &str, labels: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "{name}{{{labels}}} {value}");
}

fn histogram(out: &mut String, name: &str, help: &str, model: &str, h: &LatencyHistogram) {
    family(out, name, "histogram", help);
    for (b, c) in h.bounds.iter().zip(&h.cumulative) {
        let _ = writeln!(out, "{name}_bucket{{{model},le=\"{b}\"}} {c}");
    }
    let _ = writeln!(out, "{name}_bucket{{{model},le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum{{{model}}} {}", h.sum_seconds);
    let _ = writeln!(out, "{name}_count{{{model}}} {}", h.count);
}

/// The exposition text for one snapshot.
pub(crate) fn render(state: &AppState, m: &MetricsSnapshot, now: u64) -> String {
    let mut out = String::with_capacity(8 << 10);
    let model = format!("model_name=\"{}\"", label(&state.model_name));
    let s = &state.stats;

    family(
        &mut out,
        "vllm:num_requests_running",
        "gauge",
        "Requests in the running batch.",
    );
    sample(&mut out, "vllm:num_requests_running", &model, m.running());
    family(
        &mut out,
        "vllm:num_requests_waiting",
        "gauge",
        "Requests waiting to be scheduled.",
    );
    sample(&mut out, "vllm:num_requests_waiting", &model, m.waiting());

    let usage = m.kv_usage();
    family(
        &mut out,
        "vllm:kv_cache_usage_perc",
        "gauge",
        "KV-cache usage: 1 means 100 percent.",
    );
    sample(&mut out, "vllm:kv_cache_usage_perc", &model, usage);
    family(
        &mut out,
        "vllm:gpu_cache_usage_perc",
        "gauge",
        "KV-cache usage (the older vLLM name): 1 means 100 percent.",
    );
    sample(&mut out, "vllm:gpu_cache_usage_perc", &model, usage);

    let running = m.running_adapters().join(",");
    let waiting = m.waiting_adapters().join(",");
    family(
        &mut out,
        "vllm:lora_requests_info",
        "gauge",
        "Running stats on LoRA requests; the value is the time of the reading.",
    );
    sample(
        &mut out,
        "vllm:lora_requests_info",
        &format!(
            "max_lora=\"{}\",running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\"",
            m.max_loras,
            label(&running),
            label(&waiting)
        ),
        now,
    );

    let counters: [(&str, &str, u64); 4] = [
        (
            "vllm:prompt_tokens_total",
            "Prompt tokens of finished requests.",
            s.prompt_tokens.load(Ordering::Relaxed),
        ),
        (
            "vllm:generation_tokens_total",
            "Generated tokens of finished requests.",
            s.generation_tokens.load(Ordering::Relaxed),
        ),
        (
            "vllm:num_preemptions_total",
            "Preemptions (recompute) by the scheduler.",
            m.counters.preemptions,
        ),
        (
            "vllm:prefix_cache_hits_total",
            "Prompt tokens served from the prefix cache.",
            m.kv.hit_tokens,
        ),
    ];
    for (name, help, v) in counters {
        family(&mut out, name, "counter", help);
        sample(&mut out, name, &model, v);
    }
    family(
        &mut out,
        "vllm:prefix_cache_queries_total",
        "counter",
        "Prompt tokens looked up in the prefix cache.",
    );
    sample(
        &mut out,
        "vllm:prefix_cache_queries_total",
        &model,
        m.kv.prompt_tokens,
    );
    family(
        &mut out,
        "vllm:request_success_total",
        "counter",
        "Finished requests by finish reason.",
    );
    for (reason, c) in [
        ("stop", &s.stop),
        ("length", &s.length),
        ("abort", &s.abort),
    ] {
        sample(
            &mut out,
            "vllm:request_success_total",
            &format!("{model},finished_reason=\"{reason}\""),
            c.load(Ordering::Relaxed),
        );
    }

    histogram(
        &mut out,
        "vllm:time_to_first_token_seconds",
        "Time to first token, from submission to the engine.",
        &model,
        &m.ttft,
    );
    histogram(
        &mut out,
        "vllm:inter_token_latency_seconds",
        "Time between consecutive tokens of a request.",
        &model,
        &m.inter_token,
    );
    histogram(
        &mut out,
        "vllm:time_per_output_token_seconds",
        "Time between consecutive tokens (the older vLLM name).",
        &model,
        &m.inter_token,
    );
    out
}
