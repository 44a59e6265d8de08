//! Prints what batos reads from a GGUF file: config, tensor types, tokenizer, template, and
//! how long the full import (dequantization to f32) takes.
//!
//! ```sh
//! cargo run --release -p batos-model --example gguf_info [-- PATH.gguf]
//! ```
//! Without a path it uses (and if needed fetches) SmolLM2-135M-Instruct.

use std::collections::BTreeMap;
use std::time::Instant;

use batos_model::gguf::GgufFile;
use batos_model::{ChatTemplate, LlamaConfig, LoadOptions, ModelTokenizer, ModelWeights, Progress};

fn main() -> anyhow::Result<()> {
    let path = match std::env::args_os().nth(1) {
        Some(p) => p.into(),
        None => batos_model::fetch::smollm2_gguf()?,
    };
    let t0 = Instant::now();
    let gguf = GgufFile::open(&path)?;
    let opened = t0.elapsed();
    println!(
        "{} (GGUF v{}, {} metadata keys, {} tensors)",
        path.display(),
        gguf.version(),
        gguf.metadata().len(),
        gguf.tensors().len()
    );
    let cfg = LlamaConfig::from_gguf(&gguf)?;
    println!("config: {:#?}", cfg.params());
    let mut types: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in gguf.tensors() {
        let e = types.entry(t.ggml_type.to_string()).or_default();
        e.0 += 1;
        e.1 += t.n_elements();
    }
    for (ty, (n, elems)) in &types {
        println!("  {ty:>5}: {n:>4} tensors, {elems:>10} weights");
    }
    let t1 = Instant::now();
    let tok = ModelTokenizer::from_gguf(gguf.metadata())?;
    let tok_time = t1.elapsed();
    println!(
        "tokenizer: {} tokens, special {:?}",
        tok.vocab_size(),
        tok.special_tokens()
    );
    if let Some(t) = ChatTemplate::from_gguf(gguf.metadata())? {
        println!(
            "chat template ({} chars):\n{}",
            t.source().len(),
            t.source()
        );
    }
    let t2 = Instant::now();
    let w = ModelWeights::from_gguf(
        &gguf,
        &cfg,
        &LoadOptions::default().with_progress(Progress::Bar),
    )?;
    let import = t2.elapsed();
    println!(
        "open {:.1} ms, tokenizer {:.1} ms, import to f32 {:.2} s ({} MB)",
        opened.as_secs_f64() * 1e3,
        tok_time.as_secs_f64() * 1e3,
        import.as_secs_f64(),
        w.total_bytes() / 1_000_000
    );
    Ok(())
}
