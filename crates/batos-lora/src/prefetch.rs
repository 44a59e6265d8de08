//! Prefetch: a first-order Markov model of adapter use. After each use of `a`, the
//! adapters most often used right after `a` are promoted cold → warm ahead of demand.

use std::collections::HashMap;

/// Transition counts between consecutive adapter uses.
///
/// ```
/// use batos_lora::TransitionModel;
/// let mut m = TransitionModel::default();
/// m.learn(["alfred", "brick", "alfred", "brick", "alfred", "robin"]);
/// let next = m.predict("alfred", 1);
/// assert_eq!(next[0].0, "brick");
/// assert!((next[0].1 - 2.0 / 3.0).abs() < 1e-9);
/// ```
#[derive(Clone, Debug, Default)]
pub struct TransitionModel {
    counts: HashMap<String, HashMap<String, u64>>,
    last: Option<String>,
}

impl TransitionModel {
    /// Records a use of `name`, counting the transition from the previous use.
    pub fn observe(&mut self, name: &str) {
        if let Some(prev) = self.last.take() {
            *self
                .counts
                .entry(prev)
                .or_default()
                .entry(name.to_string())
                .or_default() += 1;
        }
        self.last = Some(name.to_string());
    }

    /// Learns from a recorded history of uses, in order.
    pub fn learn<S: AsRef<str>>(&mut self, history: impl IntoIterator<Item = S>) {
        for n in history {
            self.observe(n.as_ref());
        }
    }

    /// The `k` most likely next adapters after `from`, with their estimated
    /// probabilities, most likely first (ties by name, for determinism).
    pub fn predict(&self, from: &str, k: usize) -> Vec<(String, f64)> {
        let Some(next) = self.counts.get(from) else {
            return Vec::new();
        };
        let total: u64 = next.values().sum();
        let mut v: Vec<(String, f64)> = next
            .iter()
            .map(|(n, c)| (n.clone(), *c as f64 / total as f64))
            .collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v.truncate(k);
        v
    }

    /// Forgets `name` as a source and as a target (after it is deleted).
    pub fn forget(&mut self, name: &str) {
        self.counts.remove(name);
        for next in self.counts.values_mut() {
            next.remove(name);
        }
        if self.last.as_deref() == Some(name) {
            self.last = None;
        }
    }
}

/// When and how much to prefetch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PrefetchPolicy {
    /// Never prefetch.
    Off,
    /// After each acquire, on the acquiring thread once its lease is ready, promote up
    /// to `top_k` predicted successors whose probability is at least `min_probability`.
    AfterUse { top_k: usize, min_probability: f64 },
}

/// Counters of the prefetcher's effect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefetchStats {
    /// Adapters promoted cold → warm by prediction.
    pub issued: u64,
    /// Prefetched adapters later asked for while still warm.
    pub hits: u64,
    /// Prefetched adapters evicted before anyone asked for them.
    pub wasted: u64,
}

impl PrefetchStats {
    /// `hits / issued` (0 when nothing was issued).
    pub fn hit_rate(&self) -> f64 {
        if self.issued == 0 {
            0.0
        } else {
            self.hits as f64 / self.issued as f64
        }
    }
}
