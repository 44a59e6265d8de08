//! Next-token selection from one row of logits: pure functions plus a per-sequence
//! [`Sampler`] that owns its seeded RNG.
//!
//! Semantics follow vLLM / the OpenAI API:
//! 1. penalties on the raw logits: repetition (prompt and output tokens; positive
//!    logits divided, negative multiplied), then frequency (`-= f·count`) and presence
//!    (`-= p` if seen) over output tokens only;
//! 2. `temperature == 0` picks the arg-max of the penalised logits (greedy);
//! 3. otherwise: divide by temperature, softmax, drop tokens under `min_p · max_prob`,
//!    keep the `top_k` most likely, keep the smallest most-likely set with mass
//!    `≥ top_p`, renormalise and draw with the RNG;
//! 4. log-probabilities are reported from the raw model logits (vLLM's default
//!    `raw_logprobs`), for the chosen token and the `n` most likely.

use crate::error::{KernelError, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// Sampling configuration of one request. Check it with [`SamplingParams::validate`]
/// (a [`Sampler`] does so on construction).
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// `0` = greedy; otherwise logits are divided by it. Finite, `≥ 0`.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; `None` disables. `k ≥ 1`.
    pub top_k: Option<usize>,
    /// Nucleus mass, `0 < top_p ≤ 1` (`1` disables).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely one; `0 ≤ min_p ≤ 1`.
    pub min_p: f32,
    /// Multiplicative penalty on tokens of the prompt and output; `> 0` (`1` disables).
    pub repetition_penalty: f32,
    /// Subtracted once from every token that appeared in the output; `-2 ..= 2`.
    pub presence_penalty: f32,
    /// Subtracted per occurrence in the output; `-2 ..= 2`.
    pub frequency_penalty: f32,
    /// RNG seed; the same seed and logits give the same tokens. `None` seeds from the OS.
    pub seed: Option<u64>,
    /// Report this many most likely alternatives with their log-probabilities.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    /// Plain sampling at temperature 1 with every filter and penalty off.
    fn default() -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding (temperature 0), everything else off.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks every field against its documented range.
    pub fn validate(&self) -> Result<()> {
        fn bad(
            name: &'static str,
            value: impl std::fmt::Display,
            expected: &'static str,
        ) -> KernelError {
            KernelError::InvalidSamplingParam {
                name,
                value: value.to_string(),
                expected,
            }
        }
        let t = self.temperature;
        if !(t.is_finite() && t >= 0.0) {
            return Err(bad("temperature", t, "a finite value >= 0"));
        }
        if self.top_k == Some(0) {
            return Err(bad("top_k", 0, "at least 1 (or unset)"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(bad("top_p", self.top_p, "0 < top_p <= 1"));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(bad("min_p", self.min_p, "0 <= min_p <= 1"));
        }
        let rp = self.repetition_penalty;
        if !(rp.is_finite() && rp > 0.0) {
            return Err(bad("repetition_penalty", rp, "a finite value > 0"));
        }
        if !(-2.0..=2.0).contains(&self.presence_penalty) {
            return Err(bad(
                "presence_penalty",
                self.presence_penalty,
                "-2 <= value <= 2",
            ));
        }
        if !(-2.0..=2.0).contains(&self.frequency_penalty) {
            return Err(bad(
                "frequency_penalty",
                self.frequency_penalty,
                "-2 <= value <= 2",
            ));
        }
        Ok(())
    }
}

/// The tokens penalties look at: the request's prompt and what it generated so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct TokenHistory<'a> {
    pub prompt: &'a [u32],
    pub output: &'a [u32],
}

/// A token with its log-probability under the raw model distribution.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
}

/// The outcome of one sampling step.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampled {
    /// The chosen token.
    pub token: u32,
    /// Its log-probability under the raw logits.
    pub logprob: f32,
    /// The `logprobs` most likely tokens under the raw logits, most likely first
    /// (empty when `logprobs` is unset).
    pub top_logprobs: Vec<TokenLogprob>,
}

fn check_logits(logits: &[f32], history: &TokenHistory<'_>) -> Result<()> {
    if logits.is_empty() {
        return Err(KernelError::InvalidShape {
            op: "sample",
            what: "logits",
            reason: "empty logits row".into(),
        });
    }
    if !logits.iter().any(|v| v.is_finite()) {
        return Err(KernelError::InvalidShape {
            op: "sample",
            what: "logits",
            reason: format!("none of the {} logits is finite", logits.len()),
        });
    }
    if let Some(&id) = history
        .prompt
        .iter()
        .chain(history.output)
        .find(|&&id| id as usize >= logits.len())
    {
        return Err(KernelError::TokenOutOfRange {
            op: "sample",
            id,
            rows: logits.len(),
        });
    }
    Ok(())
}

/// Applies repetition, frequency and presence penalties in place (step 1 above).
/// Token ids in `history` must be `< logits.len()`.
pub fn apply_penalties(
    logits: &mut [f32],
    params: &SamplingParams,
    history: &TokenHistory<'_>,
) -> Result<()> {
    check_logits(logits, history)?;
    let rp = params.repetition_penalty;
    if rp != 1.0 {
        let mut seen = vec![false; logits.len()];
        for &id in history.prompt.iter().chain(history.output) {
            seen[id as usize] = true;
        }
        for (l, s) in logits.iter_mut().zip(seen) {
            if s {
                *l = if *l > 0.0 { *l / rp } else { *l * rp };
            }
        }
    }
    if params.frequency_penalty != 0.0 || params.presence_penalty != 0.0 {
        let mut counts = vec![0u32; logits.len()];
        for &id in history.output {
            counts[id as usize] += 1;
        }
        for (l, c) in logits.iter_mut().zip(counts) {
            if c > 0 {
                *l -= params.frequency_penalty * c as f32 + params.presence_penalty;
            }
        }
    }
    Ok(())
}

/// `log_softmax(logits)`, computed in f64 and returned as f32.
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln();
    logits.iter().map(|&v| (v as f64 - lse) as f32).collect()
}

/// The `n` largest entries of `logprobs` as tokens, largest first, lower id first on
/// ties.
pub fn top_n(logprobs: &[f32], n: usize) -> Vec<TokenLogprob> {
    let mut idx: Vec<u32> = (0..logprobs.len() as u32).collect();
    let n = n.min(idx.len());
    let cmp = |a: &u32, b: &u32| {
        logprobs[*b as usize]
            .total_cmp(&logprobs[*a as usize])
            .then(a.cmp(b))
    };
    if n < idx.len() && n > 0 {
        idx.select_nth_unstable_by(n - 1, cmp);
    }
    idx.truncate(n);
    idx.sort_by(cmp);
    idx.into_iter()
        .map(|token| TokenLogprob {
            token,
            logprob: logprobs[token as usize],
        })
        .collect()
}

/// Probabilities after temperature, min-p, top-k and top-p (step 3 above, before the
/// draw). Filtered-out tokens get probability 0; the rest sum to 1. `logits` must be
/// penalised already and `temperature > 0`.
pub fn filtered_probs(logits: &[f32], params: &SamplingParams) -> Vec<f32> {
    let inv_t = 1.0 / params.temperature as f64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<f64> = logits
        .iter()
        .map(|&v| {
            if v.is_nan() {
                0.0
            } else {
                ((v as f64 - max) * inv_t).exp()
            }
        })
        .collect();
    let sum: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    if params.min_p > 0.0 {
        let top = probs.iter().copied().fold(0.0, f64::max);
        let threshold = params.min_p as f64 * top;
        probs
            .iter_mut()
            .filter(|p| **p < threshold)
            .for_each(|p| *p = 0.0);
    }
    if params.top_k.is_some_and(|k| k < probs.len()) || params.top_p < 1.0 {
        let mut order: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        let mut keep = order.len();
        if let Some(k) = params.top_k {
            keep = keep.min(k);
        }
        if params.top_p < 1.0 {
            let total: f64 = order[..keep].iter().map(|&i| probs[i]).sum();
            let target = params.top_p as f64 * total;
            let mut acc = 0.0;
            for (n, &i) in order[..keep].iter().enumerate() {
                acc += probs[i];
                if acc >= target {
                    keep = n + 1;
                    break;
                }
            }
        }
        for &i in &order[keep..] {
            probs[i] = 0.0;
        }
    }
    let sum: f64 = probs.iter().sum();
    probs.into_iter().map(|p| (p / sum) as f32).collect()
}

/// Per-sequence sampler: validated parameters plus a ChaCha20 RNG seeded from
/// `params.seed`, so a seeded request is reproducible token for token.
///
/// ```
/// use batos_kernels::sampling::{Sampler, SamplingParams, TokenHistory};
/// let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
/// let out = s.sample(&[0.1, 2.0, -1.0], &TokenHistory::default()).unwrap();
/// assert_eq!(out.token, 1);
/// ```
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha20Rng,
}

impl Sampler {
    /// Validates `params` and seeds the RNG.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = match params.seed {
            Some(seed) => ChaCha20Rng::seed_from_u64(seed),
            None => ChaCha20Rng::from_rng(&mut rand::rng()),
        };
        Ok(Sampler { params, rng })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from one row of raw logits.
    pub fn sample(&mut self, logits: &[f32], history: &TokenHistory<'_>) -> Result<Sampled> {
        let mut penalised = logits.to_vec();
        apply_penalties(&mut penalised, &self.params, history)?;
        let token = if self.params.temperature == 0.0 {
            // check_logits guaranteed a finite value, so argmax finds one.
            crate::cpu::argmax(&penalised).unwrap_or(0)
        } else {
            let probs = filtered_probs(&penalised, &self.params);
            let u: f64 = self.rng.random();
            let mut acc = 0.0f64;
            let mut chosen = None;
            for (i, &p) in probs.iter().enumerate() {
                if p > 0.0 {
                    acc += p as f64;
                    chosen = Some(i);
                    if u < acc {
                        break;
                    }
                }
            }
            chosen.unwrap_or(0)
        };
        let raw = log_softmax(logits);
        let top_logprobs = self
            .params
            .logprobs
            .map(|n| top_n(&raw, n))
            .unwrap_or_default();
        Ok(Sampled {
            token: token as u32,
            logprob: raw[token],
            top_logprobs,
        })
    }
}
