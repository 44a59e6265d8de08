//! `batos bench`: end-to-end throughput of the image's model on this machine.
//!
//! The method follows `shared/bench/llamacpp/bench_llamacpp.py`, so the figures sit
//! side by side with llama.cpp's:
//!
//! - **prefill N**: one forward step computing an N-token prompt (logits for its last
//!   token), then one greedy sample; tokens/s = N / time. A fresh KV cache each time, so
//!   nothing comes from the prefix cache.
//! - **decode, B sequences**: B short prompts are prefilled in one (untimed) step; then
//!   `--decode-tokens` steps each compute one token for every sequence and sample it
//!   greedily; aggregate tokens/s = B × steps / time. B = 1 is single-stream decode.
//!
//! Each measurement runs once to warm up and then `--reps` times; the table shows
//! min / median / max. Every timed step includes the KV cache bookkeeping (blocks,
//! block tables, prefix hashes) and sampling, as serving would. Peak RSS is `VmHWM`
//! of this process: once for everything (including loading the image), once for the
//! benchmark phases alone (the counter is reset after loading). The `others` column is
//! the competition: other processes' CPU time during the measurement divided by its wall
//! time, in cores (as the llama.cpp driver accounts it).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use batos::kernels::sampling::{Sampler, SamplingParams, TokenHistory};
use batos::kv::SeqId;
use batos::model::forward::{ForwardBatch, LlamaModel, SeqStep};
use batos::model::LlamaConfig;
use serde_json::json;

use crate::device::{DeviceArgs, Stepper};
use crate::{runtime, DTypeArg, Int4ActivationsArg};

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// The living image directory.
    #[arg(long, value_name = "DIR")]
    image: PathBuf,
    /// Prompt lengths to measure prefill at.
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    prompt_lens: Vec<usize>,
    /// Decode steps per decode measurement.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Numbers of sequences decoded together (1 = single stream).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Timed repetitions of each measurement (after one warm-up).
    #[arg(long, default_value_t = 3)]
    reps: usize,
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
    /// Also write the results as JSON here.
    #[arg(long, value_name = "OUT")]
    json: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Text to cut prompts of exact lengths from.
const FILLER: &str = "A lighthouse keeper on a northern island kept a log of every ship, \
storm and bird that passed. Over forty winters the pages filled with tides, wind \
directions, the colour of the sea at dawn and the names of boats that never came back. \
When the light was automated, the log went to a museum, where visitors read it like a novel. ";

/// Short prompts for the decode phases: the first is the reference prompt.
fn decode_prompt(i: usize) -> String {
    if i == 0 {
        "The quick brown fox".to_owned()
    } else {
        format!("Story {i}: once upon a time")
    }
}

#[derive(Clone, Debug)]
struct Stats {
    all: Vec<f64>,
}

impl Stats {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.all.clone();
        v.sort_by(f64::total_cmp);
        v
    }
    fn min(&self) -> f64 {
        self.sorted().first().copied().unwrap_or(f64::NAN)
    }
    fn max(&self) -> f64 {
        self.sorted().last().copied().unwrap_or(f64::NAN)
    }
    fn median(&self) -> f64 {
        let v = self.sorted();
        match v.len() {
            0 => f64::NAN,
            n if n % 2 == 1 => v[n / 2],
            n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        }
    }
    fn json(&self) -> serde_json::Value {
        json!({"min": self.min(), "median": self.median(), "max": self.max(), "all": self.all})
    }
}

/// Multiply-adds (×2 = FLOPs) of the linear layers for one token, without the LM head.
fn linear_flops_per_token(c: &LlamaConfig) -> f64 {
    let h = c.hidden_size as f64;
    let per_layer = h * (c.q_dim() + 2 * c.kv_dim()) as f64
        + c.q_dim() as f64 * h
        + 3.0 * h * c.intermediate_size as f64;
    2.0 * per_layer * c.num_hidden_layers as f64
}

/// FLOPs of attention scores and weighted sums for tokens at positions `from..to`.
fn attention_flops(c: &LlamaConfig, from: usize, to: usize) -> f64 {
    // Position p attends to p + 1 keys: QK^T and PV, 2 FLOPs per multiply-add each.
    let keys: f64 = (from..to).map(|p| (p + 1) as f64).sum();
    4.0 * c.q_dim() as f64 * keys * c.num_hidden_layers as f64
}

fn lm_head_flops(c: &LlamaConfig) -> f64 {
    2.0 * (c.vocab_size * c.hidden_size) as f64
}

struct Bench<'a> {
    model: &'a LlamaModel,
    run: Stepper<'a>,
}

impl Bench<'_> {
    fn greedy() -> anyhow::Result<Sampler> {
        Sampler::new(SamplingParams::greedy()).context("greedy sampler")
    }

    /// Seconds for one prefill of `prompt` into a fresh cache, plus one sample.
    fn prefill_once(&self, prompt: &[u32]) -> anyhow::Result<f64> {
        let mut kv = runtime::kv_cache(self.model, 1, prompt.len() + 1)?;
        self.run.new_cache(&mut kv);
        let mut sampler = Self::greedy()?;
        let t0 = Instant::now();
        let alloc = kv.allocate_prompt(prompt, None)??;
        anyhow::ensure!(
            alloc.cached_tokens == 0,
            "prefill bench hit the prefix cache"
        );
        let table = kv.block_table(alloc.seq)?.blocks().to_vec();
        let batch = ForwardBatch::new(vec![SeqStep::new(prompt.to_vec(), 0, table)]);
        let out = self.run.forward(&batch, &mut kv)?;
        kv.mark_computed(alloc.seq, prompt.len())?;
        let logits = out.last_logits(0).context("no logits for the prompt")?;
        sampler.sample(
            logits,
            &TokenHistory {
                prompt,
                output: &[],
            },
        )?;
        Ok(t0.elapsed().as_secs_f64())
    }

    /// Seconds for `steps` decode steps of all `prompts` together (after an untimed
    /// prefill), and the first sequence's tokens.
    fn decode_once(&self, prompts: &[Vec<u32>], steps: usize) -> anyhow::Result<(f64, Vec<u32>)> {
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut kv = runtime::kv_cache(self.model, prompts.len(), longest + steps + 1)?;
        self.run.new_cache(&mut kv);
        struct Seq {
            id: SeqId,
            prompt: Vec<u32>,
            output: Vec<u32>,
            sampler: Sampler,
        }
        let mut seqs = Vec::with_capacity(prompts.len());
        let mut batch = Vec::with_capacity(prompts.len());
        for p in prompts {
            let alloc = kv.allocate_prompt(p, None)??;
            let table = kv.block_table(alloc.seq)?.blocks().to_vec();
            batch.push(SeqStep::new(
                p[alloc.cached_tokens..].to_vec(),
                alloc.cached_tokens,
                table,
            ));
            seqs.push(Seq {
                id: alloc.seq,
                prompt: p.clone(),
                output: Vec::new(),
                sampler: Self::greedy()?,
            });
        }
        let out = self.run.forward(&ForwardBatch::new(batch), &mut kv)?;
        for (i, s) in seqs.iter_mut().enumerate() {
            kv.mark_computed(s.id, s.prompt.len())?;
            sample_into(
                s.id,
                &mut s.sampler,
                out.last_logits(i),
                &s.prompt,
                &mut s.output,
            )?;
        }
        let t0 = Instant::now();
        for _ in 0..steps {
            let mut batch = Vec::with_capacity(seqs.len());
            for s in &seqs {
                let token = *s.output.last().expect("one token sampled");
                kv.append_tokens(s.id, &[token])??;
                let pos = s.prompt.len() + s.output.len() - 1;
                let table = kv.block_table(s.id)?.blocks().to_vec();
                batch.push(SeqStep::new(vec![token], pos, table));
            }
            let out = self.run.forward(&ForwardBatch::new(batch), &mut kv)?;
            for (i, s) in seqs.iter_mut().enumerate() {
                let pos = s.prompt.len() + s.output.len();
                kv.mark_computed(s.id, pos)?;
                sample_into(
                    s.id,
                    &mut s.sampler,
                    out.last_logits(i),
                    &s.prompt,
                    &mut s.output,
                )?;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        let first = seqs.swap_remove(0).output;
        Ok((secs, first))
    }
}

fn sample_into(
    seq: SeqId,
    sampler: &mut Sampler,
    logits: Option<&[f32]>,
    prompt: &[u32],
    output: &mut Vec<u32>,
) -> anyhow::Result<()> {
    let logits = logits.with_context(|| format!("no logits for sequence {seq:?}"))?;
    let s = sampler.sample(logits, &TokenHistory { prompt, output })?;
    output.push(s.token);
    Ok(())
}

/// Other processes' busy cores during a measurement, for the table.
fn fmt_cores(c: Option<f64>) -> String {
    c.map(|c| format!("{c:.2}")).unwrap_or_else(|| "?".into())
}

fn exact_prompt(rt: &runtime::Runtime, n: usize) -> anyhow::Result<Vec<u32>> {
    let mut text = String::new();
    loop {
        text.push_str(FILLER);
        let ids = rt.tokenizer.encode_prompt(&text)?;
        if ids.len() >= n {
            return Ok(ids[..n].to_vec());
        }
    }
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.reps >= 1, "--reps must be at least 1");
    anyhow::ensure!(
        args.decode_tokens >= 1,
        "--decode-tokens must be at least 1"
    );
    anyhow::ensure!(
        args.prompt_lens
            .iter()
            .chain(&args.concurrency)
            .all(|&n| n >= 1),
        "--prompt-lens and --concurrency take positive numbers"
    );
    runtime::set_threads(args.threads)?;
    let cuda = !args.device.is_cpu();
    let rt = runtime::load(&args.image, args.weights, args.int4_activations, cuda)?;
    let peak_load_kib = runtime::proc_status_kib("VmHWM");
    let rss_loaded_kib = runtime::proc_status_kib("VmRSS");
    let reset = runtime::reset_peak_rss();
    let c = &rt.config;
    for &n in &args.prompt_lens {
        anyhow::ensure!(
            n <= c.max_position_embeddings,
            "--prompt-lens {n} exceeds the model's context of {}",
            c.max_position_embeddings
        );
    }
    let bench = Bench {
        model: &rt.model,
        run: Stepper::new(&rt.model, &args.device)?,
    };
    let weight_bytes = rt.model.weight_bytes() as f64;
    let threads = batos::kernels::cpu::num_threads();
    println!(
        "batos bench: {} ({:?} weights{}, {:.0} MiB), {}, {} reps after 1 warm-up; load from image {:.2} s",
        args.image.display(),
        rt.model.weight_dtype(),
        rt.model
            .int4_activations()
            .map_or(String::new(), |a| format!(", int4 x {a:?} activations")),
        weight_bytes / (1 << 20) as f64,
        runtime::threads_description(),
        args.reps,
        rt.load_seconds
    );
    println!(
        "{:<28} {:>30}   {:>9} {:>9}",
        "", "tok/s min / median / max", "GFLOP/s", "GB/s"
    );
    let mut prefill_json = serde_json::Map::new();
    for &n in &args.prompt_lens {
        let prompt = exact_prompt(&rt, n)?;
        let mut secs = Vec::new();
        let contention = runtime::Contention::start();
        for rep in 0..=args.reps {
            let s = bench.prefill_once(&prompt)?;
            if rep > 0 {
                secs.push(s);
            }
        }
        let tok_s = Stats {
            all: secs.iter().map(|s| n as f64 / s).collect(),
        };
        let flops =
            n as f64 * linear_flops_per_token(c) + attention_flops(c, 0, n) + lm_head_flops(c);
        let median_s = n as f64 / tok_s.median();
        let gflops = flops / median_s / 1e9;
        let others = contention.other_cores();
        println!(
            "{:<28} {:>9.1} / {:>8.1} / {:>8.1}   {:>9.1} {:>9} {:>8}",
            format!("prefill {n}"),
            tok_s.min(),
            tok_s.median(),
            tok_s.max(),
            gflops,
            "-",
            fmt_cores(others)
        );
        prefill_json.insert(
            n.to_string(),
            json!({"tok_s": tok_s.json(), "gflop_s": gflops, "flops_per_run": flops,
                   "other_processes_cores": others}),
        );
    }
    let mut decode_json = serde_json::Map::new();
    let steps = args.decode_tokens;
    for &b in &args.concurrency {
        let prompts: Vec<Vec<u32>> = (0..b)
            .map(|i| rt.tokenizer.encode_prompt(&decode_prompt(i)))
            .collect::<Result<_, _>>()?;
        let mut secs = Vec::new();
        let mut seq0 = Vec::new();
        let contention = runtime::Contention::start();
        for rep in 0..=args.reps {
            let (s, first) = bench.decode_once(&prompts, steps)?;
            if rep > 0 {
                secs.push(s);
                seq0 = first;
            }
        }
        let tok_s = Stats {
            all: secs.iter().map(|s| (b * steps) as f64 / s).collect(),
        };
        let median_s = (b * steps) as f64 / tok_s.median();
        // Per step: every weight once, plus each sequence's K and V so far (f32).
        let kv_bytes: f64 = prompts
            .iter()
            .map(|p| {
                let keys: f64 = (p.len()..p.len() + steps).map(|q| (q + 1) as f64).sum();
                keys * 2.0 * (c.kv_dim() * 4 * c.num_hidden_layers) as f64
            })
            .sum();
        let bytes = weight_bytes * steps as f64 + kv_bytes;
        let flops: f64 = prompts
            .iter()
            .map(|p| {
                steps as f64 * (linear_flops_per_token(c) + lm_head_flops(c))
                    + attention_flops(c, p.len(), p.len() + steps)
            })
            .sum();
        let (gflops, gbs) = (flops / median_s / 1e9, bytes / median_s / 1e9);
        let label = if b == 1 {
            format!("decode {steps} (1 sequence)")
        } else {
            format!("decode {steps} x {b} sequences")
        };
        let others = contention.other_cores();
        println!(
            "{:<28} {:>9.1} / {:>8.1} / {:>8.1}   {:>9.1} {:>9.2} {:>8}",
            label,
            tok_s.min(),
            tok_s.median(),
            tok_s.max(),
            gflops,
            gbs,
            fmt_cores(others)
        );
        decode_json.insert(
            b.to_string(),
            json!({"aggregate_tok_s": tok_s.json(), "gflop_s": gflops, "gb_s": gbs,
                   "bytes_per_run": bytes, "seq0_tokens": seq0,
                   "other_processes_cores": others}),
        );
    }
    let peak_kib = runtime::proc_status_kib("VmHWM");
    let mib = |k: Option<u64>| k.map(|k| k as f64 / 1024.0);
    let phases_peak = if reset { mib(peak_kib) } else { None };
    println!(
        "peak RSS {:.1} MiB (loading included: {:.1} MiB; resident after loading: {:.1} MiB)",
        phases_peak.unwrap_or(f64::NAN),
        mib(peak_kib.max(peak_load_kib)).unwrap_or(f64::NAN),
        mib(rss_loaded_kib).unwrap_or(f64::NAN)
    );
    if let Some(path) = &args.json {
        let doc = json!({
            "image": args.image.display().to_string(),
            "weights": format!("{:?}", rt.model.weight_dtype()),
            "int4_activations": rt.model.int4_activations().map(|a| format!("{a:?}")),
            "weight_bytes": weight_bytes,
            "threads": threads,
            "thread_pool": format!("{:?}", batos::kernels::cpu::thread_backend()),
            "reps": args.reps,
            "warmup": 1,
            "load_seconds": rt.load_seconds,
            "prefill": prefill_json,
            "decode_tokens": steps,
            "decode": decode_json,
            "peak_rss_mib": mib(peak_kib.max(peak_load_kib)),
            "peak_rss_phases_mib": phases_peak,
            "rss_after_load_mib": mib(rss_loaded_kib),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}
