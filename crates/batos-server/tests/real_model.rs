//! Smoke test on the real model: SmolLM2-135M-Instruct imported into a living image,
//! served in f32, answers as the reference (transformers, f32) does — base and with the
//! reference LoRA adapter loaded over HTTP — and refuses the reference bad adapter.
//! Prints a SKIP line and passes when the model or the reference data cannot be had.

mod common;

use std::path::PathBuf;

use batos_model::image::{import_model, ModelSource};
use batos_model::{LoadOptions, LoadedModel, Progress};
use batos_server::WeightsSetting;
use batos_store::{LivingImage, StoreConfig};
use common::*;
use serde_json::{json, Value};

fn reference_dir() -> Option<PathBuf> {
    std::env::var_os("BATOS_REFERENCE_DIR")
        .map(PathBuf::from)
        .or_else(|| {
            // The repository sits beside `shared/` (CI, developer checkouts, worktrees).
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .ancestors()
                .map(|a| a.join("shared/reference"))
                .find(|p| p.is_dir())
        })
        .filter(|d| d.join("adapters/lora_r16").is_dir())
}

fn skip(test: &str, why: &str) {
    println!("SKIP {test}: {why}");
    eprintln!("SKIP {test}: {why}");
}

/// `prompts[name][field]` of a reference file.
fn reference(dir: &std::path::Path, file: &str, name: &str, field: &str) -> Value {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(dir.join(file)).unwrap()).unwrap();
    v["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{file} has no prompt {name}"))[field]
        .clone()
}

#[test]
fn real_model_answers_as_the_reference() {
    let test = "real_model_answers_as_the_reference";
    let gguf = match batos_model::fetch::smollm2_gguf() {
        Ok(p) => p,
        Err(e) => return skip(test, &format!("real model unavailable: {e}")),
    };
    let Some(refs) = reference_dir() else {
        return skip(
            test,
            "shared/reference with adapters/lora_r16 not found (set BATOS_REFERENCE_DIR)",
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let image_dir = dir.path().join("image");
    {
        let loaded = LoadedModel::from_gguf(&gguf, &LoadOptions::default()).unwrap();
        let image = LivingImage::open(&image_dir, StoreConfig::default()).unwrap();
        import_model(&image, &loaded, ModelSource::gguf(&gguf), Progress::Hidden).unwrap();
    }
    let mut c = test_config();
    c.served_model_name = Some("SmolLM2-135M-Instruct".into());
    c.engine.weights = Some(WeightsSetting::F32);
    c.engine.kv_cache_bytes = 64 << 20;
    c.enable_lora_loading = true;
    c.admin_api_key = Some("sk-admin".into());
    c.lora_dir = Some(refs.join("adapters"));
    let server = TestServer::start(&image_dir, c);
    let addr = server.addr;
    let model = "SmolLM2-135M-Instruct";

    let fox = reference(&refs, "base.json", "fox", "prompt_text");
    let complete = |model: &str| {
        let r = post(
            addr,
            "/v1/completions",
            &json!({"model": model, "prompt": fox, "max_tokens": 32, "temperature": 0,
                    "ignore_eos": true}),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let chat = |model: &str| {
        let r = post(
            addr,
            "/v1/chat/completions",
            &json!({"model": model, "temperature": 0, "max_tokens": 64,
                    "messages": [{"role": "user", "content": "What is the capital of France?"}]}),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        assert_eq!(v["choices"][0]["stop_reason"], Value::Null, "{v}");
        assert_eq!(
            v["usage"]["prompt_tokens"],
            reference(&refs, "base.json", "chat_capital", "n_input_tokens")
        );
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };

    assert_eq!(
        complete(model),
        reference(&refs, "base.json", "fox", "greedy_text_32")
    );
    assert_eq!(
        chat(model),
        reference(
            &refs,
            "base.json",
            "chat_capital",
            "greedy_text_stop_at_eos"
        )
    );

    let r = post(
        addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "r16", "lora_path": "lora_r16"}),
        Some("sk-admin"),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        complete("r16"),
        reference(&refs, "lora_r16.json", "fox", "greedy_text_32")
    );
    assert_eq!(
        chat("r16"),
        reference(
            &refs,
            "lora_r16.json",
            "chat_capital",
            "greedy_text_stop_at_eos"
        )
    );

    // The adapter that also targets lm_head / embed_tokens is refused, and says why.
    let r = post(
        addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "bad", "lora_path": "bad_lm_head"}),
        Some("sk-admin"),
    );
    assert_eq!(error_of(&r), ("BadRequestError".into(), 400));
    let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("lm_head") || msg.contains("embed_tokens"),
        "{msg}"
    );
    server.shutdown().unwrap();
}
