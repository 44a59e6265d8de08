//! Several personas — a system prompt each, and optionally a LoRA adapter — answered
//! concurrently by one embedded engine: their requests share every forward step.
//!
//! ```sh
//! cargo run --release --example personas [-- --max-tokens 48]
//! ```
//!
//! Fetches SmolLM2-135M-Instruct into the cache on first use (`batos_model::fetch`).
//! Adapters live in a throwaway living image served by `batos-lora`; the reference
//! PEFT adapter (`../shared/reference/adapters/lora_r16`, or `--adapter-dir DIR`) is
//! loaded as the pirate's adapter. A persona whose adapter the engine does not serve
//! runs on the base model, and the example says so.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use batos::engine::{
    AdapterSource, GenerateRequest, GenerationParams, LoraResidency, Prompt, ShutdownMode,
    StopReason,
};
use batos::lora::{AdapterManager, ManagerConfig};
use batos::model::chat_template::{ChatMessage, GenerationPrompt};
use batos::model::forward::{LlamaDims, WeightDType};
use batos::model::{LoadOptions, LoadedModel};
use batos::store::{Db, StoreConfig};
use batos::types::MemoryBudget;
use batos::Engine;

struct Persona {
    name: &'static str,
    system: &'static str,
    adapter: Option<&'static str>,
    question: &'static str,
}

const PERSONAS: &[Persona] = &[
    Persona {
        name: "pirate",
        system: "You are a terse pirate captain. Answer in one or two sentences.",
        adapter: Some("pirate"),
        question: "Where should we sail tomorrow?",
    },
    Persona {
        name: "chemist",
        system: "You are a patient chemistry tutor for children.",
        adapter: Some("tutor"),
        question: "Why does ice float on water?",
    },
    Persona {
        name: "poet",
        system: "You are a poet who answers in short rhyming lines.",
        adapter: None,
        question: "Describe the first morning of spring.",
    },
    Persona {
        name: "reviewer",
        system: "You are a strict code reviewer.",
        adapter: Some("reviewer"),
        question: "Is it fine to unwrap every Result in a library?",
    },
    Persona {
        name: "historian",
        system: "You are a historian who loves precise dates.",
        adapter: None,
        question: "When was the printing press invented?",
    },
    Persona {
        name: "coach",
        system: "You are an upbeat running coach.",
        adapter: None,
        question: "How do I start running at 50?",
    },
];

fn arg(name: &str) -> Option<String> {
    std::env::args().skip_while(|a| a != name).nth(1)
}

fn main() -> Result<()> {
    let max_tokens = arg("--max-tokens")
        .map(|v| v.parse::<usize>())
        .transpose()
        .context("--max-tokens takes a number")?
        .unwrap_or(48);
    let adapter_dir = arg("--adapter-dir").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/reference/adapters/lora_r16")
    });

    let t = Instant::now();
    let path = batos::model::fetch::smollm2_gguf().context("fetching SmolLM2-135M-Instruct")?;
    let model = LoadedModel::from_gguf(&path, &LoadOptions::default())?;
    let template = model
        .chat_template
        .clone()
        .context("the model has no chat template")?;
    let shapes = LlamaDims::from_config(&model.config).lora_base_shapes("SmolLM2-135M-Instruct");
    let image = tempfile::tempdir()?;
    let db = Db::open(image.path().join("image"), StoreConfig::default())?;
    let manager = AdapterManager::open(
        &db,
        shapes,
        MemoryBudget::new("adapters", 1 << 30),
        ManagerConfig {
            max_loras: 2,
            ..ManagerConfig::default()
        },
    )?;
    let engine = Engine::builder()
        .model(model)
        .adapters(Arc::new(LoraResidency::new(manager)))
        .weight_dtype(WeightDType::F16)
        .kv_pool_bytes(64 << 20)
        .max_num_seqs(16)
        .max_batch_tokens(256)
        .prefill_chunk(128)
        .build()?;
    if adapter_dir.is_dir() {
        let t = Instant::now();
        engine.load_adapter("pirate", &AdapterSource::PeftDir(adapter_dir.clone()))?;
        println!(
            "adapter 'pirate' <- {} in {:.2?}",
            adapter_dir.display(),
            t.elapsed()
        );
    } else {
        println!(
            "no adapter at {} (pass --adapter-dir DIR)",
            adapter_dir.display()
        );
    }
    println!("model loaded and engine started in {:.2?}", t.elapsed());

    let served: Vec<String> = engine
        .list_adapters()?
        .into_iter()
        .map(|a| a.name)
        .collect();
    let tokenizer = engine.tokenizer().context("the model has no tokenizer")?;

    let start = Instant::now();
    let mut streams = Vec::new();
    for p in PERSONAS {
        let text = template.render(
            &[ChatMessage::system(p.system), ChatMessage::user(p.question)],
            GenerationPrompt::Add,
        )?;
        let mut params = GenerationParams::greedy(max_tokens);
        params.stop_strings = vec!["<|im_end|>".into()];
        let mut request = GenerateRequest::new(Prompt::Text(text), params);
        let adapter = match p.adapter {
            Some(a) if served.iter().any(|s| s == a) => {
                request = request.with_adapter(a);
                a.to_string()
            }
            Some(a) => format!("base (adapter '{a}' not served by this engine)"),
            None => "base".to_string(),
        };
        let ids = tokenizer.encode_prompt(match &request.prompt {
            Prompt::Text(t) => t,
            Prompt::Tokens(_) => unreachable!("built from text above"),
        })?;
        streams.push((p, adapter, ids.len(), engine.generate(request)?));
    }

    let mut generated = 0;
    for (p, adapter, prompt_len, stream) in streams {
        let done = stream.wait();
        generated += done.usage.completion_tokens;
        let ttft = done.time_to_first_token.unwrap_or_default();
        let decode = done.total_time.saturating_sub(ttft);
        let itl = decode.as_secs_f64() * 1e3 / (done.tokens.len().max(2) - 1) as f64;
        let why = match &done.reason {
            StopReason::Finished(f) => format!("{f:?}"),
            other => format!("{other:?}"),
        };
        println!(
            "\n[{}] on {adapter}: prompt {prompt_len} tokens, {} generated ({why})\n  \
             TTFT {:.0} ms, {:.1} ms/token after, total {:.0} ms\n  > {}",
            p.name,
            done.tokens.len(),
            ttft.as_secs_f64() * 1e3,
            itl,
            done.total_time.as_secs_f64() * 1e3,
            done.text.unwrap_or_default().trim().replace('\n', "\n    "),
        );
    }
    let wall = start.elapsed();
    let m = engine.metrics()?;
    println!(
        "\n{} personas in {:.2?}: {generated} tokens, {:.1} tok/s output, {} forward steps \
         (one persona after another: at least {generated} steps); TTFT mean {:.0} ms, \
         inter-token mean {:.1} ms; KV pool {} blocks, {} in use now",
        PERSONAS.len(),
        wall,
        generated as f64 / wall.as_secs_f64(),
        m.counters.steps,
        m.ttft.sum_seconds * 1e3 / m.ttft.count.max(1) as f64,
        m.inter_token.sum_seconds * 1e3 / m.inter_token.count.max(1) as f64,
        m.kv.total_blocks,
        m.kv.used_blocks,
    );
    engine.shutdown(ShutdownMode::Drain)?;
    Ok(())
}
