//! The engine over batos-lora on the real model: load a PEFT adapter through the
//! engine, serve base and adapter requests in one batch, check the adapter changes the
//! output and that mixing does not, and that every lease is released. Prints a SKIP
//! line and passes when the model or the reference adapter cannot be had.

use std::path::PathBuf;
use std::sync::Arc;

use batos_engine::{
    AdapterSource, Engine, EngineError, GenerateRequest, GenerationParams, LoraResidency, Prompt,
    ShutdownMode,
};
use batos_lora::{AdapterManager, ManagerConfig, PrefetchPolicy};
use batos_model::forward::{LlamaModel, WeightDType};
use batos_model::{LoadOptions, LoadedModel};
use batos_store::{Db, StoreConfig};
use batos_types::MemoryBudget;

fn adapter_dir() -> Option<PathBuf> {
    let root = std::env::var_os("BATOS_REFERENCE_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            // The repository sits beside `shared/` (CI, developer checkouts, worktrees).
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .ancestors()
                .map(|a| a.join("shared/reference"))
                .find(|p| p.is_dir())
        })?;
    let dir = root.join("adapters/lora_r16");
    dir.is_dir().then_some(dir)
}

#[test]
fn base_and_adapter_requests_share_steps() {
    let test = "base_and_adapter_requests_share_steps";
    let path = match batos_model::fetch::smollm2_gguf() {
        Ok(p) => p,
        Err(e) => {
            println!("SKIP {test}: real model unavailable: {e}");
            eprintln!("SKIP {test}: real model unavailable: {e}");
            return;
        }
    };
    let Some(dir) = adapter_dir() else {
        println!("SKIP {test}: reference adapter lora_r16 not found (set BATOS_REFERENCE_DIR)");
        eprintln!("SKIP {test}: reference adapter lora_r16 not found (set BATOS_REFERENCE_DIR)");
        return;
    };
    let loaded = LoadedModel::from_gguf(&path, &LoadOptions::default()).unwrap();
    let model =
        LlamaModel::from_weights(&loaded.config, &loaded.weights, WeightDType::F16).unwrap();
    let d = *model.dims();
    let base = d.lora_base_shapes("SmolLM2-135M-Instruct");
    let image = tempfile::tempdir().unwrap();
    let db = Db::open(image.path().join("image"), StoreConfig::default()).unwrap();
    let cfg = ManagerConfig {
        max_loras: 2,
        prefetch: PrefetchPolicy::Off,
        ..ManagerConfig::default()
    };
    let manager = AdapterManager::open(&db, base, MemoryBudget::new("host", 1 << 30), cfg).unwrap();
    let residency = Arc::new(LoraResidency::new(manager));
    let engine = Engine::builder()
        .runtime_model(model, Some(loaded.tokenizer.clone()))
        .adapters(residency.clone())
        .kv_pool_blocks(128)
        .prefill_chunk(32)
        .max_batch_tokens(128)
        .build()
        .unwrap();

    let info = engine
        .load_adapter("r16", &AdapterSource::PeftDir(dir.clone()))
        .unwrap();
    assert_eq!(info.name, "r16");
    let again = engine
        .load_adapter("r16", &AdapterSource::PeftDir(dir))
        .unwrap_err();
    assert!(
        matches!(again, EngineError::AdapterExists { .. }),
        "{again}"
    );
    let names: Vec<String> = engine
        .list_adapters()
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, vec!["r16".to_string()]);
    let unknown = engine
        .generate(
            GenerateRequest::new(Prompt::Text("hi".into()), GenerationParams::greedy(2))
                .with_adapter("nope"),
        )
        .unwrap_err();
    assert!(
        matches!(unknown, EngineError::UnknownAdapter { .. }),
        "{unknown}"
    );

    let prompts = [
        "The quick brown fox",
        "Paris is the capital of",
        "Once upon a time",
    ];
    let req = |p: &str, adapter: bool| {
        let r = GenerateRequest::new(Prompt::Text(p.into()), GenerationParams::greedy(12));
        if adapter {
            r.with_adapter("r16")
        } else {
            r
        }
    };
    // Base and adapter requests together...
    let mixed: Vec<_> = prompts
        .iter()
        .flat_map(|p| [req(p, false), req(p, true)])
        .map(|r| engine.generate(r).unwrap())
        .collect();
    let mixed: Vec<Vec<u32>> = mixed.into_iter().map(|s| s.wait().tokens).collect();
    // ...and each alone.
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .flat_map(|p| [req(p, false), req(p, true)])
        .map(|r| engine.generate(r).unwrap().wait().tokens)
        .collect();
    assert_eq!(
        mixed, alone,
        "mixing base and adapter requests changed an output"
    );
    let differs = (0..prompts.len())
        .filter(|i| alone[2 * i] != alone[2 * i + 1])
        .count();
    assert!(differs > 0, "the adapter changed no output");
    println!("adapter changed {differs} of {} outputs", prompts.len());

    engine.unload_adapter("r16").unwrap();
    assert!(matches!(
        engine.unload_adapter("nope"),
        Err(EngineError::UnknownAdapter { .. })
    ));
    let m = engine.metrics().unwrap();
    assert_eq!((m.kv.used_blocks, m.running(), m.waiting()), (0, 0, 0));
    assert_eq!(residency.live_leases(), 0);
    engine.shutdown(ShutdownMode::Drain).unwrap();
}
