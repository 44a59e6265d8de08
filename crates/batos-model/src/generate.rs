//! A small generation harness over [`LlamaModel::forward`]: chunked prefill, decode,
//! sampling, stop tokens and strings, max tokens, logprobs — for one sequence or many
//! stepped together.
//!
//! This is a test and benchmark harness, not the engine's scheduler: it admits every
//! request at once, never preempts (running out of KV blocks is an error) and owns its
//! [`KvCacheManager`]. The engine owns real scheduling.

use std::num::NonZeroUsize;

use batos_kernels::sampling::{Sampled, Sampler, SamplingParams, TokenHistory};
use batos_kv::{KvCacheManager, SeqId};

use crate::forward::{ForwardBatch, ForwardError, LlamaModel, LogitsRows, SeqStep};

/// Turns token ids into text, for stop strings.
pub trait TokenDecoder {
    /// The text of `ids` (special tokens included, as the model produced them).
    fn decode(&self, ids: &[u32]) -> Result<String, ForwardError>;
}

impl<F: Fn(&[u32]) -> String> TokenDecoder for F {
    fn decode(&self, ids: &[u32]) -> Result<String, ForwardError> {
        Ok(self(ids))
    }
}

/// What to generate for one prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationParams {
    /// Temperature, filters, penalties, seed, and how many top logprobs to report.
    pub sampling: SamplingParams,
    /// Generated tokens at most (stop tokens included); at least 1.
    pub max_tokens: usize,
    /// Tokens that end the generation; the stop token is kept in the output ids.
    pub stop_token_ids: Vec<u32>,
    /// Strings that end the generation once the decoded output contains one; the
    /// returned text is cut before it (the ids keep the token that completed it).
    pub stop_strings: Vec<String>,
}

impl GenerationParams {
    /// Greedy decoding of at most `max_tokens` tokens, no stops.
    pub fn greedy(max_tokens: usize) -> GenerationParams {
        GenerationParams {
            sampling: SamplingParams::greedy(),
            max_tokens,
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
        }
    }
}

/// One prompt and how to continue it.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub params: GenerationParams,
}

/// Why a generation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` reached, or the model's context is full.
    Length,
    /// This stop token was generated.
    StopToken(u32),
    /// The output text came to contain this stop string.
    StopString(String),
}

/// The result of one request.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated ids, in order.
    pub tokens: Vec<u32>,
    /// Decoded output, cut before a stop string; present when a decoder was given.
    pub text: Option<String>,
    /// Per generated token: its logprob and the top alternatives, when
    /// `sampling.logprobs` was set.
    pub logprobs: Option<Vec<Sampled>>,
    pub finish: FinishReason,
    /// Leading prompt tokens served from the prefix cache rather than computed.
    pub cached_prompt_tokens: usize,
}

/// How the harness batches work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeneratorConfig {
    /// Prompt tokens of one sequence computed in one step at most.
    pub prefill_chunk: NonZeroUsize,
    /// New tokens of all sequences in one step at most (decodes are taken first).
    pub max_batch_tokens: NonZeroUsize,
}

impl Default for GeneratorConfig {
    /// 512-token prefill chunks, 2048 tokens a step.
    fn default() -> Self {
        GeneratorConfig {
            prefill_chunk: NonZeroUsize::new(512).expect("non-zero"),
            max_batch_tokens: NonZeroUsize::new(2048).expect("non-zero"),
        }
    }
}

/// Per-step counts, for benches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GenerationStats {
    /// Forward steps run.
    pub steps: usize,
    /// Prompt tokens computed (prefix-cache hits excluded).
    pub prefill_tokens: usize,
    /// Tokens generated.
    pub decode_tokens: usize,
    /// Steps that computed a prefill chunk and a decode token together.
    pub mixed_steps: usize,
}

/// Runs requests against a model and a KV cache it owns (see the module docs).
pub struct SimpleGenerator<'m> {
    model: &'m LlamaModel,
    kv: KvCacheManager,
    config: GeneratorConfig,
    stats: GenerationStats,
}

/// A request in flight.
struct Running {
    seq: SeqId,
    prompt: Vec<u32>,
    params: GenerationParams,
    sampler: Sampler,
    output: Vec<u32>,
    logprobs: Vec<Sampled>,
    /// Tokens of prompt + output whose K/V are in the cache.
    computed: usize,
    cached_prompt_tokens: usize,
    text: Option<String>,
    finish: Option<FinishReason>,
}

impl Running {
    fn len(&self) -> usize {
        self.prompt.len() + self.output.len()
    }

    fn token(&self, i: usize) -> u32 {
        if i < self.prompt.len() {
            self.prompt[i]
        } else {
            self.output[i - self.prompt.len()]
        }
    }
}

impl<'m> SimpleGenerator<'m> {
    /// A generator over `model`, allocating KV blocks from `kv`.
    pub fn new(model: &'m LlamaModel, kv: KvCacheManager, config: GeneratorConfig) -> Self {
        SimpleGenerator {
            model,
            kv,
            config,
            stats: GenerationStats::default(),
        }
    }

    /// The KV cache (block and prefix-cache statistics).
    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }

    /// Counts since the generator was made.
    pub fn stats(&self) -> GenerationStats {
        self.stats
    }

    /// Generates for one prompt.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerationParams,
        decoder: Option<&dyn TokenDecoder>,
    ) -> Result<Generation, ForwardError> {
        let request = GenerationRequest {
            prompt: prompt.to_vec(),
            params: params.clone(),
        };
        let mut out = self.generate_batch(std::slice::from_ref(&request), decoder)?;
        Ok(out.remove(0))
    }

    /// Generates for every request, stepping all of them together: each step runs the
    /// pending decode tokens of every sequence and as many prefill chunks as the step's
    /// token budget holds, so sequences sit at different positions and prefill mixes
    /// with decode. Results come back in request order.
    pub fn generate_batch(
        &mut self,
        requests: &[GenerationRequest],
        decoder: Option<&dyn TokenDecoder>,
    ) -> Result<Vec<Generation>, ForwardError> {
        let mut running = Vec::with_capacity(requests.len());
        let result = self.admit_and_run(requests, decoder, &mut running);
        // Release every sequence, also on error, so the cache stays usable.
        for r in &running {
            self.kv.free(r.seq)?;
        }
        result?;
        Ok(running
            .into_iter()
            .map(|r| Generation {
                tokens: r.output,
                text: r.text,
                logprobs: r.params.sampling.logprobs.map(|_| r.logprobs),
                finish: r.finish.unwrap_or(FinishReason::Length),
                cached_prompt_tokens: r.cached_prompt_tokens,
            })
            .collect())
    }

    fn admit_and_run(
        &mut self,
        requests: &[GenerationRequest],
        decoder: Option<&dyn TokenDecoder>,
        running: &mut Vec<Running>,
    ) -> Result<(), ForwardError> {
        let max_position = self.model.dims().max_position;
        for (i, req) in requests.iter().enumerate() {
            self.check_request(i, req, decoder, max_position)?;
        }
        for req in requests {
            let sampler = Sampler::new(req.params.sampling.clone()).map_err(|source| {
                ForwardError::Kernel {
                    op: "Sampler::new",
                    source,
                }
            })?;
            // The harness does not preempt: running out of blocks ends the run.
            let alloc = self.kv.allocate_prompt(&req.prompt, None)??;
            running.push(Running {
                seq: alloc.seq,
                prompt: req.prompt.clone(),
                params: req.params.clone(),
                sampler,
                output: Vec::new(),
                logprobs: Vec::new(),
                computed: alloc.cached_tokens,
                cached_prompt_tokens: alloc.cached_tokens,
                text: decoder.map(|_| String::new()),
                finish: None,
            });
        }
        while running.iter().any(|r| r.finish.is_none()) {
            self.step(running, decoder)?;
        }
        Ok(())
    }

    fn check_request(
        &self,
        request: usize,
        req: &GenerationRequest,
        decoder: Option<&dyn TokenDecoder>,
        max_position: usize,
    ) -> Result<(), ForwardError> {
        if req.prompt.is_empty() {
            return Err(ForwardError::EmptyPrompt { request });
        }
        if req.prompt.len() > max_position {
            return Err(ForwardError::PromptTooLong {
                request,
                prompt_len: req.prompt.len(),
                max_position,
            });
        }
        if req.params.max_tokens == 0 {
            return Err(ForwardError::InvalidParam {
                request,
                name: "max_tokens",
                reason: "must be at least 1".into(),
            });
        }
        if req.params.stop_strings.iter().any(String::is_empty) {
            return Err(ForwardError::InvalidParam {
                request,
                name: "stop_strings",
                reason: "a stop string is empty".into(),
            });
        }
        if !req.params.stop_strings.is_empty() && decoder.is_none() {
            return Err(ForwardError::StopStringsNeedDecoder { request });
        }
        let vocab = self.model.dims().vocab_size;
        if let Some(&token) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(ForwardError::TokenOutOfVocab {
                seq: request,
                token,
                vocab_size: vocab,
            });
        }
        Ok(())
    }

    /// One forward step over the unfinished sequences, then sampling for those whose
    /// pending tokens are all computed.
    fn step(
        &mut self,
        running: &mut [Running],
        decoder: Option<&dyn TokenDecoder>,
    ) -> Result<(), ForwardError> {
        let mut budget = self.config.max_batch_tokens.get();
        // (index into `running`, tokens taken this step); decodes first, then prefills.
        let mut picks: Vec<(usize, usize)> = Vec::new();
        for decode_pass in [true, false] {
            for (i, r) in running.iter().enumerate() {
                let pending = r.len() - r.computed;
                if r.finish.is_some() || pending == 0 || (pending == 1) != decode_pass {
                    continue;
                }
                let take = pending.min(self.config.prefill_chunk.get()).min(budget);
                if take > 0 {
                    picks.push((i, take));
                    budget -= take;
                }
            }
        }
        picks.sort_unstable();
        let mut seqs = Vec::with_capacity(picks.len());
        for &(i, take) in &picks {
            let r = &running[i];
            let tokens = (r.computed..r.computed + take)
                .map(|p| r.token(p))
                .collect();
            let logits = if r.computed + take == r.len() {
                LogitsRows::Last
            } else {
                LogitsRows::None
            };
            let table = self.kv.block_table(r.seq)?.blocks().to_vec();
            seqs.push(SeqStep::new(tokens, r.computed, table).with_logits(logits));
        }
        let decodes = picks
            .iter()
            .filter(|&&(i, _)| running[i].computed >= running[i].prompt.len())
            .count();
        if decodes > 0 && decodes < picks.len() {
            self.stats.mixed_steps += 1;
        }
        let batch = ForwardBatch::new(seqs);
        let out = self.model.forward(&batch, self.kv.storage_mut())?;
        self.stats.steps += 1;
        for (b, &(i, take)) in picks.iter().enumerate() {
            let r = &mut running[i];
            if r.computed < r.prompt.len() {
                self.stats.prefill_tokens += take;
            }
            r.computed += take;
            self.kv.mark_computed(r.seq, r.computed)?;
            let Some(logits) = out.last_logits(b) else {
                continue;
            };
            let history = TokenHistory {
                prompt: &r.prompt,
                output: &r.output,
            };
            let sampled =
                r.sampler
                    .sample(logits, &history)
                    .map_err(|source| ForwardError::Kernel {
                        op: "sample",
                        source,
                    })?;
            let token = sampled.token;
            r.output.push(token);
            self.stats.decode_tokens += 1;
            if r.params.sampling.logprobs.is_some() {
                r.logprobs.push(sampled);
            }
            r.finish = finish_check(r, decoder, self.model.dims().max_position)?;
            if r.finish.is_none() {
                self.kv.append_tokens(r.seq, &[token])??;
            }
        }
        Ok(())
    }
}

/// Decides whether `r` is done after its newest token, updating its text.
fn finish_check(
    r: &mut Running,
    decoder: Option<&dyn TokenDecoder>,
    max_position: usize,
) -> Result<Option<FinishReason>, ForwardError> {
    let token = *r.output.last().expect("called after a token was pushed");
    if let Some(decoder) = decoder {
        let text = decoder.decode(&r.output)?;
        let hit = r
            .params
            .stop_strings
            .iter()
            .filter_map(|s| text.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|&(at, _)| at);
        if let Some((at, stop)) = hit {
            r.text = Some(text[..at].to_owned());
            return Ok(Some(FinishReason::StopString(stop.clone())));
        }
        r.text = Some(text);
    }
    if r.params.stop_token_ids.contains(&token) {
        return Ok(Some(FinishReason::StopToken(token)));
    }
    // The next step would compute this token at position len - 1.
    if r.output.len() >= r.params.max_tokens || r.len() > max_position {
        return Ok(Some(FinishReason::Length));
    }
    Ok(None)
}

impl TokenDecoder for crate::ModelTokenizer {
    /// Special tokens are rendered, so a stop string may name one (`<|im_end|>`).
    fn decode(&self, ids: &[u32]) -> Result<String, ForwardError> {
        crate::ModelTokenizer::decode(self, ids, crate::SpecialTokenText::Keep).map_err(|e| {
            ForwardError::Decode {
                reason: e.to_string(),
            }
        })
    }
}
