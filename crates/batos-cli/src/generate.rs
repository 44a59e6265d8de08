//! `batos generate`: one prompt, text streamed to stdout as it is generated.

use std::cell::{Cell, RefCell};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use batos::kernels::sampling::SamplingParams;
use batos::model::forward::ForwardError;
use batos::model::generate::{
    FinishReason, GenerationParams, GeneratorConfig, SimpleGenerator, TokenDecoder,
};
use batos::model::{ChatMessage, GenerationPrompt, ModelTokenizer, SpecialTokenText};

use crate::device::DeviceArgs;
use crate::{runtime, DTypeArg, Int4ActivationsArg};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// The living image directory.
    #[arg(long, value_name = "DIR")]
    image: PathBuf,
    /// The prompt (a user message with --chat, raw text otherwise).
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template (as the user's message).
    #[arg(long)]
    chat: bool,
    /// A system message for --chat (default: the template's own).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Nucleus sampling mass (1 disables).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Drop tokens less likely than this times the most likely one.
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    /// Multiplicative penalty on tokens already seen (1 disables).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Subtracted once from tokens already generated.
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    /// Subtracted per occurrence in the output.
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    /// RNG seed (default: from the OS).
    #[arg(long)]
    seed: Option<u64>,
    /// Print each generated token's log-probability and the N most likely alternatives.
    #[arg(long, value_name = "N")]
    logprobs: Option<usize>,
    /// Stop when the output contains this string (repeatable); it is not printed.
    #[arg(long = "stop", value_name = "STR")]
    stop: Vec<String>,
    /// Keep generating past the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Element type of the runtime weights (default: as stored in the image).
    #[arg(long, value_enum)]
    weights: Option<DTypeArg>,
    /// How an int4 base's projections take their activations on the CPU (default:
    /// the engine's default, see docs/perf/awq.md; f32 on a CUDA device).
    #[arg(long, value_enum)]
    int4_activations: Option<Int4ActivationsArg>,
    /// Kernel threads (default: one per core, on the kernels' spin pool; another count
    /// runs them on a rayon pool of that size).
    #[arg(long)]
    threads: Option<usize>,
    /// Print timings to stderr when done.
    #[arg(long)]
    timings: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.max_tokens >= 1, "--max-tokens must be at least 1");
    runtime::set_threads(args.threads)?;
    let cuda = !args.device.is_cpu();
    let rt = runtime::load(&args.image, args.weights, args.int4_activations, cuda)?;
    let text = if args.chat {
        let template = rt.chat_template.as_ref().with_context(|| {
            format!(
                "--chat: the model in {} has no chat template",
                args.image.display()
            )
        })?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::system(system.clone()));
        }
        messages.push(ChatMessage::user(args.prompt.clone()));
        template.render(&messages, GenerationPrompt::Add)?
    } else {
        args.prompt.clone()
    };
    let prompt = rt.tokenizer.encode_prompt(&text)?;
    anyhow::ensure!(!prompt.is_empty(), "the prompt encodes to no tokens");
    let mut stop_token_ids = Vec::new();
    if !args.ignore_eos {
        stop_token_ids.extend(rt.config.eos_token_ids.iter().copied());
        stop_token_ids.extend(rt.tokenizer.special_tokens().eos);
        stop_token_ids.sort_unstable();
        stop_token_ids.dedup();
    }
    let params = GenerationParams {
        sampling: SamplingParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repetition_penalty: args.repetition_penalty,
            presence_penalty: args.presence_penalty,
            frequency_penalty: args.frequency_penalty,
            seed: args.seed,
            logprobs: args.logprobs,
        },
        max_tokens: args.max_tokens,
        stop_token_ids: stop_token_ids.clone(),
        stop_strings: args.stop.clone(),
    };
    params
        .sampling
        .validate()
        .context("invalid sampling flags")?;
    if !args.device.is_cpu() {
        return run_on_engine(args, rt, prompt, params);
    }
    let kv = runtime::kv_cache(&rt.model, 1, prompt.len() + args.max_tokens)?;
    let mut generator = SimpleGenerator::new(&rt.model, kv, GeneratorConfig::default());
    let stream = StreamingDecoder::new(&rt.tokenizer, &args.stop, &stop_token_ids);
    let started = Instant::now();
    let out = generator
        .generate(&prompt, &params, Some(&stream))
        .context("generation failed")?;
    let elapsed = started.elapsed().as_secs_f64();
    stream.finish(out.text.as_deref())?;
    if let Some(lps) = &out.logprobs {
        let mut stdout = std::io::stdout().lock();
        writeln!(
            stdout,
            "\n--- logprobs (token id, text, logprob; top alternatives)"
        )?;
        for s in lps {
            let piece = |id: u32| {
                rt.tokenizer
                    .decode(&[id], SpecialTokenText::Keep)
                    .unwrap_or_default()
            };
            let alts: Vec<String> = s
                .top_logprobs
                .iter()
                .map(|a| format!("{} {:?} {:.4}", a.token, piece(a.token), a.logprob))
                .collect();
            writeln!(
                stdout,
                "{}\t{:?}\t{:.4}\t{}",
                s.token,
                piece(s.token),
                s.logprob,
                alts.join(" | ")
            )?;
        }
    }
    if args.timings {
        let first = stream
            .first_token_at
            .get()
            .map(|t| t.duration_since(started).as_secs_f64());
        let n = out.tokens.len();
        eprintln!(
            "[{} prompt tokens, {n} generated, finish: {}; load {:.2} s, first token {:.3} s, {:.1} tok/s after it; total {:.2} s]",
            prompt.len(),
            match &out.finish {
                FinishReason::Length => "length".to_string(),
                FinishReason::StopToken(t) => format!("stop token {t}"),
                FinishReason::StopString(s) => format!("stop string {s:?}"),
            },
            rt.load_seconds,
            first.unwrap_or(f64::NAN),
            first
                .filter(|_| n > 1)
                .map(|f| (n - 1) as f64 / (elapsed - f))
                .unwrap_or(f64::NAN),
            elapsed
        );
    }
    Ok(())
}

/// Generation through the engine on a non-CPU device (the device-resident runtime):
/// text is printed as the engine streams it.
fn run_on_engine(
    args: &GenerateArgs,
    rt: runtime::Runtime,
    prompt: Vec<u32>,
    params: GenerationParams,
) -> anyhow::Result<()> {
    use batos::engine::{Engine, GenerateRequest, Prompt, StopReason, StreamEvent};
    anyhow::ensure!(
        args.logprobs.is_none(),
        "--logprobs is only printed on --device cpu"
    );
    let blocks = (prompt.len() + args.max_tokens).div_ceil(16) + 1;
    let engine = args
        .device
        .configure(Engine::builder())
        .runtime_model(rt.model, Some(rt.tokenizer))
        .kv_pool_blocks(blocks)
        .build()
        .context("cannot start the engine")?;
    let started = Instant::now();
    let stream = engine.generate(GenerateRequest::new(Prompt::Tokens(prompt), params))?;
    let mut stdout = std::io::stdout().lock();
    let mut n = 0usize;
    let mut first = None;
    for event in stream {
        match event {
            StreamEvent::Token(t) => {
                n += 1;
                first.get_or_insert_with(Instant::now);
                if let Some(text) = t.text {
                    write!(stdout, "{text}")?;
                    stdout.flush()?;
                }
            }
            StreamEvent::Finished(f) => {
                writeln!(stdout)?;
                if let StopReason::Failed { message } = &f.reason {
                    anyhow::bail!("generation failed: {message}");
                }
            }
        }
    }
    if args.timings {
        let total = started.elapsed().as_secs_f64();
        let ttft = first.map(|t| t.duration_since(started).as_secs_f64());
        eprintln!(
            "[{n} generated on {:?}; load {:.2} s, first token {:.3} s, total {:.2} s]",
            args.device.device,
            rt.load_seconds,
            ttft.unwrap_or(f64::NAN),
            total
        );
    }
    engine.shutdown(batos::engine::ShutdownMode::Drain)?;
    Ok(())
}

/// Writes generated text to stdout as tokens arrive. The generator asks it to decode the
/// whole output after every token; it prints what is new, holding back an unfinished
/// UTF-8 character, a tail that could still become a stop string, and a final stop token.
struct StreamingDecoder<'t> {
    tokenizer: &'t ModelTokenizer,
    stop_strings: &'t [String],
    stop_token_ids: &'t [u32],
    /// Bytes of the display text already written.
    printed: Cell<usize>,
    /// The display text as of the last call.
    shown: RefCell<String>,
    first_token_at: Cell<Option<Instant>>,
}

impl<'t> StreamingDecoder<'t> {
    fn new(
        tokenizer: &'t ModelTokenizer,
        stop_strings: &'t [String],
        stop_token_ids: &'t [u32],
    ) -> Self {
        StreamingDecoder {
            tokenizer,
            stop_strings,
            stop_token_ids,
            printed: Cell::new(0),
            shown: RefCell::new(String::new()),
            first_token_at: Cell::new(None),
        }
    }

    /// Length of the longest tail of `text` that is a proper prefix of a stop string.
    fn held_tail(&self, text: &str) -> usize {
        self.stop_strings
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .rev()
                    .filter(move |&k| s.is_char_boundary(k))
                    .map(move |k| &s[..k])
            })
            .filter(|p| text.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0)
    }

    fn emit(&self, text: &str, upto: usize) -> std::io::Result<()> {
        let from = self.printed.get();
        if upto > from && text.is_char_boundary(from) && text.is_char_boundary(upto) {
            let mut out = std::io::stdout().lock();
            out.write_all(&text.as_bytes()[from..upto])?;
            out.flush()?;
            self.printed.set(upto);
        }
        Ok(())
    }

    /// Prints the rest: the generator's final text (cut before a stop string) when it
    /// has one, else the display text.
    fn finish(&self, final_text: Option<&str>) -> anyhow::Result<()> {
        let shown = self.shown.borrow().clone();
        let text = final_text.unwrap_or(&shown);
        // The final text never differs from what was shown before the cut, except for a
        // trailing stop token that display text leaves out.
        let text = self
            .stop_token_ids
            .iter()
            .filter_map(|&t| self.tokenizer.id_to_token(t))
            .find_map(|tok| text.strip_suffix(tok.as_str()))
            .unwrap_or(text);
        self.emit(text, text.len())?;
        let mut out = std::io::stdout().lock();
        writeln!(out)?;
        Ok(())
    }
}

impl TokenDecoder for StreamingDecoder<'_> {
    fn decode(&self, ids: &[u32]) -> Result<String, ForwardError> {
        if self.first_token_at.get().is_none() {
            self.first_token_at.set(Some(Instant::now()));
        }
        let dec = |ids: &[u32]| {
            self.tokenizer
                .decode(ids, SpecialTokenText::Keep)
                .map_err(|e| ForwardError::Decode {
                    reason: e.to_string(),
                })
        };
        let full = dec(ids)?;
        let display = match ids.split_last() {
            Some((last, rest)) if self.stop_token_ids.contains(last) => dec(rest)?,
            _ => full.clone(),
        };
        let mut upto = display.len() - self.held_tail(&display);
        // A complete stop string: the generator cuts the text there.
        if let Some(at) = self
            .stop_strings
            .iter()
            .filter_map(|s| display.find(s.as_str()))
            .min()
        {
            upto = upto.min(at);
        }
        // An unfinished multi-byte character decodes as U+FFFD until its last byte comes.
        while display[..upto].ends_with('\u{FFFD}') {
            upto -= '\u{FFFD}'.len_utf8();
        }
        self.emit(&display, upto)
            .map_err(|e| ForwardError::Decode {
                reason: format!("writing to stdout: {e}"),
            })?;
        *self.shown.borrow_mut() = display;
        Ok(full)
    }
}
