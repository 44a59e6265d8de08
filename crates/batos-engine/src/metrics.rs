//! A point-in-time view of the engine for `/metrics` and dashboards.

use std::collections::VecDeque;
use std::time::Duration;

use batos_kv::KvStats;

use crate::scheduler::{QueueCounts, SchedulerCounters};

/// vLLM's TTFT histogram bucket bounds, in seconds.
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// vLLM's inter-token latency histogram bucket bounds, in seconds.
pub const ITL_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];

/// Recent samples kept per latency, besides the histogram.
const RECENT: usize = 1024;

/// A cumulative latency histogram (Prometheus shape) plus the most recent samples.
#[derive(Clone, Debug, PartialEq)]
pub struct LatencyHistogram {
    /// Upper bounds of the buckets, in seconds (a `+Inf` bucket is implied).
    pub bounds: &'static [f64],
    /// Per bound, samples `≤` it (cumulative, as Prometheus reports them).
    pub cumulative: Vec<u64>,
    /// Samples in all.
    pub count: u64,
    /// Sum of the samples, in seconds.
    pub sum_seconds: f64,
    /// Up to the last 1024 samples, oldest first.
    pub recent: VecDeque<Duration>,
}

impl LatencyHistogram {
    /// An empty histogram over `bounds`.
    pub fn new(bounds: &'static [f64]) -> Self {
        LatencyHistogram {
            bounds,
            cumulative: vec![0; bounds.len()],
            count: 0,
            sum_seconds: 0.0,
            recent: VecDeque::new(),
        }
    }

    /// Records one sample.
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (b, c) in self.bounds.iter().zip(&mut self.cumulative) {
            if s <= *b {
                *c += 1;
            }
        }
        self.count += 1;
        self.sum_seconds += s;
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(d);
    }
}

/// The engine's state at one instant.
#[derive(Clone, Debug, PartialEq)]
pub struct MetricsSnapshot {
    /// Per queue (adapter, or `None` for the base model): running and waiting
    /// requests. Only queues with requests are listed.
    pub queues: Vec<QueueCounts>,
    /// Distinct adapters one step may use.
    pub max_loras: usize,
    /// KV blocks and prefix-cache figures.
    pub kv: KvStats,
    /// Steps, preemptions, tokens, finished and cancelled requests.
    pub counters: SchedulerCounters,
    /// Time to first token.
    pub ttft: LatencyHistogram,
    /// Time between consecutive tokens of a request.
    pub inter_token: LatencyHistogram,
}

impl MetricsSnapshot {
    /// Requests running, all queues.
    pub fn running(&self) -> usize {
        self.queues.iter().map(|q| q.running).sum()
    }

    /// Requests waiting, all queues.
    pub fn waiting(&self) -> usize {
        self.queues.iter().map(|q| q.waiting).sum()
    }

    /// Fraction of KV blocks held by live requests (vLLM's `kv_cache_usage_perc`).
    pub fn kv_usage(&self) -> f64 {
        if self.kv.total_blocks == 0 {
            0.0
        } else {
            self.kv.used_blocks as f64 / self.kv.total_blocks as f64
        }
    }

    /// Names of adapters with running requests (vLLM's `running_lora_adapters`).
    pub fn running_adapters(&self) -> Vec<String> {
        self.queues
            .iter()
            .filter(|q| q.running > 0)
            .filter_map(|q| q.adapter.as_deref().map(str::to_owned))
            .collect()
    }

    /// Names of adapters with waiting requests (vLLM's `waiting_lora_adapters`).
    pub fn waiting_adapters(&self) -> Vec<String> {
        self.queues
            .iter()
            .filter(|q| q.waiting > 0)
            .filter_map(|q| q.adapter.as_deref().map(str::to_owned))
            .collect()
    }
}
