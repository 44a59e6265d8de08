//! The server on loopback, driven with raw HTTP: completions and chat (streamed and
//! not), adapter selection by `model`, the adapter lifecycle with no restart, the error
//! cases with vLLM's codes and envelope, metrics, cancellation and draining.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const ADMIN: &str = "sk-admin-test";
const KEY: &str = "sk-inference-test";

/// A server with adapter loading on, adapters confined to `root/loras`.
fn lora_server(root: &Path) -> (TestServer, std::path::PathBuf) {
    let image = tiny_image(root);
    let loras = root.join("loras");
    std::fs::create_dir_all(&loras).unwrap();
    let mut c = test_config();
    c.enable_lora_loading = true;
    c.admin_api_key = Some(ADMIN.into());
    c.lora_dir = Some(loras.clone());
    (TestServer::start(&image, c), loras)
}

fn completion(server: &TestServer, model: &str, prompt: &str, max_tokens: u32) -> Value {
    let r = post(
        server.addr,
        "/v1/completions",
        &json!({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": true}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn text_of(v: &Value) -> String {
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// Concatenates the text deltas of a stream; checks its framing.
fn stream_text(events: &[String], chat: bool) -> (String, Value, Option<Value>) {
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    let mut last_choice = Value::Null;
    let mut usage = None;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let object = if chat {
            "chat.completion.chunk"
        } else {
            "text_completion"
        };
        assert_eq!(v["object"], object, "{v}");
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            usage = Some(u.clone());
            assert_eq!(v["choices"], json!([]), "{v}");
            continue;
        }
        let c = &v["choices"][0];
        let piece = if chat {
            c["delta"]["content"].as_str().unwrap_or("")
        } else {
            c["text"].as_str().unwrap()
        };
        text.push_str(piece);
        last_choice = c.clone();
    }
    (text, last_choice, usage)
}

#[test]
fn completions_and_chat_answer_streamed_and_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tiny_image(dir.path()), test_config());

    // Text completion: shape, usage, determinism at temperature 0.
    let a = completion(&server, MODEL, "w5 w6 w7", 8);
    assert_eq!(a["object"], "text_completion");
    assert_eq!(a["model"], MODEL);
    assert!(a["id"].as_str().unwrap().starts_with("cmpl-"), "{a}");
    assert_eq!(a["choices"][0]["finish_reason"], "length");
    assert_eq!(
        a["usage"],
        json!({"prompt_tokens": 3, "completion_tokens": 8, "total_tokens": 11})
    );
    let text = text_of(&a);
    assert_eq!(text.split_whitespace().count(), 8, "{text:?}");
    assert_eq!(text_of(&completion(&server, MODEL, "w5 w6 w7", 8)), text);

    // The same request streamed gives the same text, chunk by chunk.
    let r = post(
        server.addr,
        "/v1/completions",
        &json!({"model": MODEL, "prompt": "w5 w6 w7", "max_tokens": 8, "temperature": 0,
                "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}}),
        None,
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let (streamed, last, usage) = stream_text(&r.events(), false);
    assert_eq!(streamed, text);
    assert_eq!(last["finish_reason"], "length");
    assert_eq!(usage.unwrap()["completion_tokens"], 8);

    // Token-id prompts are served as given.
    let r = post(
        server.addr,
        "/v1/completions",
        &json!({"prompt": [5, 6, 7], "max_tokens": 8, "temperature": 0, "ignore_eos": true}),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(text_of(&r.json()), text);

    // Chat: the template wraps the conversation; streamed and not agree.
    let chat = json!({"model": MODEL, "max_tokens": 6, "temperature": 0, "ignore_eos": true,
        "messages": [{"role": "system", "content": "w9"}, {"role": "user", "content": "w10 w11"}]});
    let r = post(server.addr, "/v1/chat/completions", &chat, None);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    // w1 w9 w2 w1 w10 w11 w2 w3
    assert_eq!(v["usage"]["prompt_tokens"], 8);
    let content = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let mut streamed_req = chat.clone();
    streamed_req["stream"] = json!(true);
    let r = post(server.addr, "/v1/chat/completions", &streamed_req, None);
    let events = r.events();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let (streamed, last, usage) = stream_text(&events, true);
    assert_eq!(streamed, content);
    assert_eq!(last["finish_reason"], "length");
    assert!(usage.is_none(), "usage only when asked for");

    // A stop string cuts the answer before it, in both forms.
    let words: Vec<&str> = text.split_whitespace().collect();
    let stop = words[3];
    let r = post(
        server.addr,
        "/v1/completions",
        &json!({"prompt": "w5 w6 w7", "max_tokens": 8, "temperature": 0, "ignore_eos": true,
                "stop": [stop]}),
        None,
    );
    let v = r.json();
    let cut = text_of(&v);
    assert!(
        !cut.contains(stop) && text.starts_with(&cut),
        "{cut:?} vs {text:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], stop);
    let r = post(
        server.addr,
        "/v1/completions",
        &json!({"prompt": "w5 w6 w7", "max_tokens": 8, "temperature": 0, "ignore_eos": true,
                "stop": stop, "stream": true}),
        None,
    );
    let (streamed, last, _) = stream_text(&r.events(), false);
    assert_eq!(streamed, cut);
    assert_eq!(last["stop_reason"], stop);

    // A requested stop token ends the answer, its text cut, and is named.
    let k = (1..words.len())
        .find(|&k| !words[..k].contains(&words[k]))
        .expect("a new word in the output");
    let id: u32 = words[k][1..].parse().unwrap();
    let r = post(
        server.addr,
        "/v1/completions",
        &json!({"prompt": "w5 w6 w7", "max_tokens": 8, "temperature": 0, "ignore_eos": true,
                "stop_token_ids": [id]}),
        None,
    );
    let v = r.json();
    assert_eq!(text_of(&v), format!("{} ", words[..k].join(" ")), "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["choices"][0]["stop_reason"], id);
    assert_eq!(v["usage"]["completion_tokens"], k + 1);

    // Logprobs: per token its logprob and the alternatives asked for; greedy picks the
    // most likely one. Streamed chunks carry the same, token by token.
    let r = post(
        server.addr,
        "/v1/completions",
        &json!({"prompt": "w5 w6 w7", "max_tokens": 8, "temperature": 0, "ignore_eos": true,
                "logprobs": 2}),
        None,
    );
    let v = r.json();
    assert_eq!(text_of(&v), text);
    let lp = &v["choices"][0]["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens, words, "{lp}");
    for (i, top) in lp["top_logprobs"].as_array().unwrap().iter().enumerate() {
        let top = top.as_object().unwrap();
        assert!(!top.is_empty() && top.len() <= 2, "{top:?}");
        let best = top
            .values()
            .map(|x| x.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        let chosen = lp["token_logprobs"][i].as_f64().unwrap();
        assert!(
            chosen <= 0.0 && (best - chosen).abs() < 1e-4,
            "{chosen} vs {best}"
        );
    }
    let r = post(
        server.addr,
        "/v1/completions",
        &json!({"prompt": "w5 w6 w7", "max_tokens": 8, "temperature": 0, "ignore_eos": true,
                "logprobs": 2, "stream": true}),
        None,
    );
    let mut streamed_tokens = Vec::new();
    for e in r.events().iter().filter(|e| e.as_str() != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        if let Some(t) = v["choices"][0]["logprobs"]["tokens"].as_array() {
            streamed_tokens.extend(t.iter().map(|t| t.as_str().unwrap().to_string()));
        }
    }
    assert_eq!(streamed_tokens, words);
    let r = post(
        server.addr,
        "/v1/chat/completions",
        &json!({"max_tokens": 5, "temperature": 0, "ignore_eos": true, "logprobs": true,
                "top_logprobs": 3, "messages": [{"role": "user", "content": "w10"}]}),
        None,
    );
    let v = r.json();
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 5, "{v}");
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 3);
    assert_eq!(
        content[0]["bytes"],
        json!(content[0]["token"].as_str().unwrap().as_bytes())
    );
    let r = post(
        server.addr,
        "/v1/chat/completions",
        &json!({"top_logprobs": 3, "messages": [{"role": "user", "content": "w10"}]}),
        None,
    );
    assert_eq!(error_of(&r), ("BadRequestError".into(), 400));

    // Seeded sampling is reproducible.
    let sampled = json!({"prompt": "w5 w6 w7", "max_tokens": 8, "temperature": 1.0,
        "top_p": 0.9, "top_k": 50, "seed": 42, "ignore_eos": true});
    let a = post(server.addr, "/v1/completions", &sampled, None).json();
    let b = post(server.addr, "/v1/completions", &sampled, None).json();
    assert_eq!(text_of(&a), text_of(&b));

    server.shutdown().unwrap();
}

#[test]
fn adapters_load_serve_and_unload_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (server, loras) = lora_server(dir.path());
    write_adapter(&loras.join("alpha"), 100);
    write_adapter(&loras.join("beta"), 200);
    let addr = server.addr;
    let models = |key| -> Vec<Value> {
        let r = get(addr, "/v1/models", key);
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["data"].as_array().unwrap().clone()
    };
    assert_eq!(models(None).len(), 1, "only the base model at first");
    assert_eq!(models(None)[0]["id"], MODEL);
    assert_eq!(models(None)[0]["max_model_len"], 4096);

    // Load → 200 with vLLM's plain-text body.
    let r = post(
        addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "alpha", "lora_path": "alpha"}),
        Some(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        "Success: LoRA adapter 'alpha' added successfully."
    );
    let abs = loras.join("beta");
    let r = post(
        addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "beta", "lora_path": abs.to_str().unwrap()}),
        Some(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // Listed with parent and root as vLLM lists them.
    let listed = models(None);
    let ids: Vec<&str> = listed.iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [MODEL, "alpha", "beta"]);
    assert_eq!(listed[1]["parent"], MODEL);
    assert_eq!(listed[1]["root"], "alpha");
    assert_eq!(listed[2]["root"], abs.to_str().unwrap());
    assert_eq!(listed[1]["max_model_len"], Value::Null);
    assert_eq!(listed[0]["parent"], Value::Null);

    // Duplicate load → 400 InvalidUserInput; in place → 200.
    let r = post(
        addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "alpha", "lora_path": "alpha"}),
        Some(ADMIN),
    );
    assert_eq!(error_of(&r), ("InvalidUserInput".into(), 400));
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("has already been loaded"));
    let r = post(
        addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "alpha", "lora_path": "alpha", "load_inplace": true}),
        Some(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // The adapter is chosen by `model`, echoed back, and changes the output.
    let prompts = ["w5 w6 w7", "w40 w41", "w100 w3 w9 w27", "w200"];
    let mut differs = 0;
    for p in prompts {
        let base = completion(&server, MODEL, p, 12);
        let a = completion(&server, "alpha", p, 12);
        let b = completion(&server, "beta", p, 12);
        assert_eq!(a["model"], "alpha");
        assert_eq!(b["model"], "beta");
        if text_of(&base) != text_of(&a) && text_of(&a) != text_of(&b) {
            differs += 1;
        }
    }
    assert!(differs > 0, "the adapters changed no output");
    // Chat through an adapter, streamed, echoes the adapter too.
    let r = post(
        addr,
        "/v1/chat/completions",
        &json!({"model": "alpha", "stream": true, "max_tokens": 4, "ignore_eos": true,
                "messages": [{"role": "user", "content": "w7"}]}),
        None,
    );
    let first: Value = serde_json::from_str(&r.events()[0]).unwrap();
    assert_eq!(first["model"], "alpha");

    // Unload → 200; gone from /v1/models; requests naming it → 404.
    let before = text_of(&completion(&server, "alpha", "w5 w6 w7", 12));
    let r = post(
        addr,
        "/v1/unload_lora_adapter",
        &json!({"lora_name": "alpha"}),
        Some(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text(),
        "Success: LoRA adapter 'alpha' removed successfully."
    );
    let ids: Vec<String> = models(None)
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, [MODEL, "beta"]);
    let r = post(
        addr,
        "/v1/completions",
        &json!({"model": "alpha", "prompt": "w5", "max_tokens": 2}),
        None,
    );
    assert_eq!(error_of(&r), ("NotFoundError".into(), 404));
    assert_eq!(r.json()["error"]["param"], "model");
    assert_eq!(
        r.json()["error"]["message"],
        "The model `alpha` does not exist."
    );

    // The image kept it: loading by name alone brings it back, same weights.
    let r = post(
        addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "alpha"}),
        Some(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        text_of(&completion(&server, "alpha", "w5 w6 w7", 12)),
        before
    );
    let listed = models(None);
    assert_eq!(listed[1]["id"], "alpha");
    assert!(
        listed[1]["root"].as_str().unwrap().ends_with("alpha"),
        "{}",
        listed[1]
    );

    // Unload of an unknown name → 404 with vLLM's message; empty names → 400.
    let r = post(
        addr,
        "/v1/unload_lora_adapter",
        &json!({"lora_name": "nope"}),
        Some(ADMIN),
    );
    assert_eq!(error_of(&r), ("NotFoundError".into(), 404));
    assert_eq!(
        r.json()["error"]["message"],
        "The lora adapter 'nope' cannot be found."
    );
    let r = post(
        addr,
        "/v1/unload_lora_adapter",
        &json!({"lora_name": ""}),
        Some(ADMIN),
    );
    assert_eq!(error_of(&r), ("InvalidUserInput".into(), 400));
    let r = post(
        addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "x", "lora_path": ""}),
        Some(ADMIN),
    );
    assert_eq!(error_of(&r), ("InvalidUserInput".into(), 400));
    assert_eq!(
        r.json()["error"]["message"],
        "Both 'lora_name' and 'lora_path' must be provided."
    );
    // A name the image does not hold → 404.
    let r = post(
        addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "ghost"}),
        Some(ADMIN),
    );
    assert_eq!(error_of(&r), ("NotFoundError".into(), 404));

    server.shutdown().unwrap();
}

#[test]
fn adapter_paths_stay_inside_the_allowed_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (server, loras) = lora_server(dir.path());
    let addr = server.addr;
    // A valid adapter outside the allowed directory.
    let outside = dir.path().join("outside");
    write_adapter(&outside, 7);
    let load = |path: &str| {
        post(
            addr,
            "/v1/load_lora_adapter",
            &json!({"lora_name": "evil", "lora_path": path}),
            Some(ADMIN),
        )
    };
    for path in [outside.to_str().unwrap(), "../outside", "/etc"] {
        let r = load(path);
        assert_eq!(error_of(&r), ("InvalidUserInput".into(), 400), "{path}");
        assert!(r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outside"));
    }
    // A symlink inside pointing out, and an adapter whose files are symlinks out.
    std::os::unix::fs::symlink(&outside, loras.join("link")).unwrap();
    assert_eq!(error_of(&load("link")), ("InvalidUserInput".into(), 400));
    let sneaky = loras.join("sneaky");
    std::fs::create_dir(&sneaky).unwrap();
    std::os::unix::fs::symlink(
        outside.join("adapter_config.json"),
        sneaky.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::copy(
        outside.join("adapter_model.safetensors"),
        sneaky.join("adapter_model.safetensors"),
    )
    .unwrap();
    assert_eq!(error_of(&load("sneaky")), ("InvalidUserInput".into(), 400));
    // Inside but missing → 404, vLLM's message.
    let r = load("missing");
    assert_eq!(error_of(&r), ("NotFoundError".into(), 404));
    assert_eq!(
        r.json()["error"]["message"],
        "Loading lora evil failed: No adapter found for missing"
    );
    // An adapter that fails its audit (rank above the limit) → 400, named.
    let bad = loras.join("bad");
    write_adapter(&bad, 3);
    let cfg = std::fs::read_to_string(bad.join("adapter_config.json")).unwrap();
    std::fs::write(
        bad.join("adapter_config.json"),
        cfg.replace(
            "\"target_modules\"",
            "\"rank_pattern\":{\"q_proj\":999},\"target_modules\"",
        ),
    )
    .unwrap();
    let r = load("bad");
    assert_eq!(r.status, 400, "{}", r.text());
    // Nothing was registered by any of these.
    let r = get(addr, "/v1/models", None);
    assert_eq!(r.json()["data"].as_array().unwrap().len(), 1);
    // An adapter that leaves projections out (q_proj and v_proj only) loads and serves.
    write_adapter_targeting(&loras.join("qv"), 5, &["q_proj", "v_proj"]);
    let r = post(
        addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "qv", "lora_path": "qv"}),
        Some(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let req = json!({"model": "qv", "prompt": "w4 w5 w6", "max_tokens": 4, "temperature": 0});
    let r = post(addr, "/v1/completions", &req, None);
    assert_eq!(r.status, 200, "{}", r.text());
    server.shutdown().unwrap();
}

#[test]
fn errors_use_vllm_codes_and_envelope() {
    let dir = tempfile::tempdir().unwrap();
    let image = tiny_image(dir.path());
    let loras = dir.path().join("loras");
    std::fs::create_dir_all(&loras).unwrap();
    let mut c = test_config();
    c.api_key = Some(KEY.into());
    c.enable_lora_loading = true;
    c.admin_api_key = Some(ADMIN.into());
    c.lora_dir = Some(loras.clone());
    c.max_body_bytes = 4096;
    c.max_prompt_tokens = Some(64);
    c.max_tokens = 5000;
    let server = TestServer::start(&image, c);
    let addr = server.addr;
    let ok = json!({"model": MODEL, "prompt": "w5", "max_tokens": 2});

    // Missing or wrong inference key → 401; the right one (or the admin's) → 200.
    for key in [None, Some("wrong")] {
        let r = post(addr, "/v1/completions", &ok, key);
        assert_eq!(error_of(&r), ("AuthenticationError".into(), 401));
        assert_eq!(get(addr, "/v1/models", key).status, 401);
    }
    assert_eq!(post(addr, "/v1/completions", &ok, Some(KEY)).status, 200);
    assert_eq!(post(addr, "/v1/completions", &ok, Some(ADMIN)).status, 200);
    // The admin routes take the admin key only.
    write_adapter(&loras.join("a"), 1);
    let load = json!({"lora_name": "a", "lora_path": "a"});
    for key in [None, Some(KEY), Some("wrong")] {
        let r = post(addr, "/v1/load_lora_adapter", &load, key);
        assert_eq!(error_of(&r), ("AuthenticationError".into(), 401));
    }
    // /health and /metrics are open (as vLLM's).
    assert_eq!(get(addr, "/health", None).status, 200);
    assert_eq!(get(addr, "/metrics", None).status, 200);

    // Unknown model → 404 NotFoundError, param "model".
    let r = post(
        addr,
        "/v1/chat/completions",
        &json!({"model": "nope", "messages": [{"role": "user", "content": "w1"}]}),
        Some(KEY),
    );
    assert_eq!(error_of(&r), ("NotFoundError".into(), 404));
    assert_eq!(r.json()["error"]["param"], "model");

    // Bad JSON, a wrong shape, a wrong content type → 400 BadRequestError.
    let auth = format!("Bearer {KEY}");
    let h = [
        ("Content-Type", "application/json"),
        ("Authorization", auth.as_str()),
    ];
    let r = http(addr, "POST", "/v1/completions", &h, b"{\"prompt\": ");
    assert_eq!(error_of(&r), ("BadRequestError".into(), 400));
    let r = http(addr, "POST", "/v1/completions", &h, b"{\"max_tokens\": 3}");
    assert_eq!(error_of(&r), ("BadRequestError".into(), 400));
    let r = http(
        addr,
        "POST",
        "/v1/completions",
        &[("Content-Type", "text/plain"), ("Authorization", &auth)],
        ok.to_string().as_bytes(),
    );
    assert_eq!(error_of(&r), ("BadRequestError".into(), 400));

    // Parameters batos does not serve, and limits → 400 naming the field.
    for (body, param) in [
        (json!({"prompt": "w5", "n": 2}), "n"),
        (json!({"prompt": "w5", "max_tokens": 100000}), "max_tokens"),
        (json!({"prompt": "w5", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "w5", "top_k": -5}), "top_k"),
        (json!({"prompt": "w5", "logprobs": 50}), "logprobs"),
        (json!({"prompt": "w5", "echo": true}), "echo"),
        (json!({"prompt": ["w5", "w6"]}), "prompt"),
        (json!({"prompt": [9999]}), "prompt"),
        (json!({"prompt": "w5 ".repeat(65)}), "prompt"),
        (
            json!({"prompt": "w5 ".repeat(60), "max_tokens": 4090}),
            "max_tokens",
        ),
    ] {
        let r = post(addr, "/v1/completions", &body, Some(KEY));
        assert_eq!(error_of(&r), ("BadRequestError".into(), 400), "{body}");
        assert_eq!(r.json()["error"]["param"], param, "{body}: {}", r.text());
    }
    let r = post(
        addr,
        "/v1/completions",
        &json!({"prompt": "w5", "temperature": -1}),
        Some(KEY),
    );
    assert_eq!(error_of(&r), ("BadRequestError".into(), 400));
    let r = post(
        addr,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "wizard", "content": "w1"}]}),
        Some(KEY),
    );
    assert_eq!(error_of(&r), ("BadRequestError".into(), 400));

    // A body over the limit → 413 in the envelope.
    let big = json!({"prompt": "w5 ".repeat(2000)});
    let r = post(addr, "/v1/completions", &big, Some(KEY));
    assert_eq!(error_of(&r), ("BadRequestError".into(), 413));

    // Unknown routes answer like FastAPI.
    let r = get(addr, "/v1/nothing", Some(KEY));
    assert_eq!(r.status, 404);
    assert_eq!(r.json(), json!({"detail": "Not Found"}));
    server.shutdown().unwrap();
}

#[test]
fn adapter_routes_are_absent_unless_enabled() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(&tiny_image(dir.path()), test_config());
    for path in ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"] {
        let r = post(
            server.addr,
            path,
            &json!({"lora_name": "a", "lora_path": "/tmp"}),
            Some("anything"),
        );
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.json(), json!({"detail": "Not Found"}));
    }
    server.shutdown().unwrap();
}

fn metric(text: &str, line_start: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {line_start} in\n{text}"))
}

/// Polls `/metrics` until `done` holds (the engine does its bookkeeping on its own
/// thread); gives up after a minute.
fn wait_metrics(addr: std::net::SocketAddr, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = get(addr, "/metrics", None).text();
        if done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "metrics never settled:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn metrics_use_vllm_names_and_a_dropped_stream_is_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let (server, loras) = lora_server(dir.path());
    let addr = server.addr;
    write_adapter(&loras.join("alpha"), 100);
    let r = post(
        addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "alpha", "lora_path": "alpha"}),
        Some(ADMIN),
    );
    assert_eq!(r.status, 200);
    completion(&server, MODEL, "w5 w6", 4);
    completion(&server, "alpha", "w5 w6", 4);

    let text = get(addr, "/metrics", None).text();
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:gpu_cache_usage_perc",
        "vllm:prompt_tokens_total",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket",
        "vllm:time_per_output_token_seconds_count",
    ] {
        assert!(
            text.contains(&format!("\n{name}{{")),
            "{name} missing:\n{text}"
        );
    }
    assert!(
        text.contains("vllm:lora_requests_info{max_lora=\"2\",running_lora_adapters=\"\",waiting_lora_adapters=\"\"}"),
        "{text}"
    );
    let model = format!("{{model_name=\"{MODEL}\"}}");
    assert_eq!(
        metric(&text, &format!("vllm:generation_tokens_total{model}")),
        8.0
    );
    assert_eq!(
        metric(&text, &format!("vllm:prompt_tokens_total{model}")),
        4.0
    );
    assert_eq!(
        metric(
            &text,
            &format!("vllm:time_to_first_token_seconds_count{model}")
        ),
        2.0
    );
    assert_eq!(
        metric(
            &text,
            &format!(
                "vllm:request_success_total{{model_name=\"{MODEL}\",finished_reason=\"length\"}}"
            )
        ),
        2.0
    );

    // A long streamed request on the adapter shows in lora_requests_info while it runs;
    // dropping the connection cancels it and frees its KV blocks.
    let (status, mut reader) = open_stream(
        addr,
        "/v1/completions",
        &json!({"model": "alpha", "prompt": "w5 w6", "max_tokens": 4000, "ignore_eos": true,
                "stream": true}),
    );
    assert_eq!(status, 200);
    let first = read_event(&mut reader);
    assert!(first.starts_with("data: {"), "{first}");
    let running = get(addr, "/metrics", None).text();
    assert!(
        running.contains("running_lora_adapters=\"alpha\""),
        "{running}"
    );
    drop(reader);
    let settled = wait_metrics(addr, |t| {
        metric(t, &format!("vllm:num_requests_running{model}")) == 0.0
            && metric(t, &format!("vllm:kv_cache_usage_perc{model}")) == 0.0
    });
    let aborted = metric(
        &settled,
        &format!("vllm:request_success_total{{model_name=\"{MODEL}\",finished_reason=\"abort\"}}"),
    );
    assert_eq!(aborted, 1.0, "{settled}");
    assert!(settled.contains("running_lora_adapters=\"\""), "{settled}");
    server.shutdown().unwrap();
}

#[test]
fn concurrent_streams_over_adapters_all_complete() {
    let dir = tempfile::tempdir().unwrap();
    let (server, loras) = lora_server(dir.path());
    let addr = server.addr;
    for (name, seed) in [("alpha", 100), ("beta", 200), ("gamma", 300)] {
        write_adapter(&loras.join(name), seed);
        let r = post(
            addr,
            "/v1/load_lora_adapter",
            &json!({"lora_name": name, "lora_path": name}),
            Some(ADMIN),
        );
        assert_eq!(r.status, 200);
    }
    // Three adapters over two hot slots, plus the base: every stream completes.
    let models = [MODEL, "alpha", "beta", "gamma"];
    let threads: Vec<_> = (0..12)
        .map(|i| {
            let model = models[i % models.len()];
            std::thread::spawn(move || {
                let r = post(
                    addr,
                    "/v1/completions",
                    &json!({"model": model, "prompt": format!("w{} w{}", i + 3, i + 20),
                            "max_tokens": 16, "temperature": 0, "ignore_eos": true,
                            "stream": true}),
                    None,
                );
                assert_eq!(r.status, 200, "{}", r.text());
                let events = r.events();
                let (text, last, _) = stream_text(&events, false);
                assert_eq!(last["finish_reason"], "length");
                let v: Value = serde_json::from_str(&events[0]).unwrap();
                assert_eq!(v["model"], model);
                (model, text)
            })
        })
        .collect();
    for t in threads {
        let (model, text) = t.join().unwrap();
        assert_eq!(text.split_whitespace().count(), 16, "{model}: {text:?}");
    }
    server.shutdown().unwrap();
}

#[test]
fn shutdown_drains_a_running_stream() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = TestServer::start(&tiny_image(dir.path()), test_config());
    let (status, mut reader) = open_stream(
        server.addr,
        "/v1/completions",
        &json!({"prompt": "w5 w6", "max_tokens": 1000, "ignore_eos": true, "stream": true}),
    );
    assert_eq!(status, 200);
    let mut got = read_event(&mut reader);
    // Stop while the stream runs: it still finishes, then the server ends.
    server.signal_stop();
    loop {
        got.push_str(&read_event(&mut reader));
        if got.contains("data: [DONE]") {
            break;
        }
    }
    let events = sse_events(&got);
    let (text, last, _) = stream_text(&events, false);
    assert_eq!(last["finish_reason"], "length");
    assert_eq!(text.split_whitespace().count(), 1000);
    server.shutdown().unwrap();
}

#[test]
fn adapters_stored_in_the_image_outlive_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let image = tiny_image(dir.path());
    let loras = dir.path().join("loras");
    write_adapter(&loras.join("alpha"), 100);
    let mut c = test_config();
    c.enable_lora_loading = true;
    c.admin_api_key = Some(ADMIN.into());
    c.lora_dir = Some(loras.clone());

    let first = TestServer::start(&image, c.clone());
    let r = post(
        first.addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "alpha", "lora_path": "alpha"}),
        Some(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = text_of(&completion(&first, "alpha", "w5 w6 w7", 12));
    first.shutdown().unwrap();
    std::fs::remove_dir_all(loras.join("alpha")).unwrap();

    // A new server over the same image serves it from startup (image_adapters = all),
    // with no file left to read; its root is where it first came from.
    let second = TestServer::start(&image, c.clone());
    let listed = get(second.addr, "/v1/models", None).json()["data"].clone();
    assert_eq!(listed[1]["id"], "alpha", "{listed}");
    assert_eq!(listed[1]["parent"], MODEL);
    assert!(
        listed[1]["root"].as_str().unwrap().ends_with("alpha"),
        "{listed}"
    );
    assert_eq!(
        text_of(&completion(&second, "alpha", "w5 w6 w7", 12)),
        answer
    );
    second.shutdown().unwrap();

    // With image_adapters = none it waits to be loaded by name.
    c.image_adapters = batos_server::ImageAdapters::None;
    let third = TestServer::start(&image, c);
    let listed = get(third.addr, "/v1/models", None).json()["data"].clone();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let r = post(
        third.addr,
        "/v1/completions",
        &json!({"model": "alpha", "prompt": "w5"}),
        None,
    );
    assert_eq!(error_of(&r), ("NotFoundError".into(), 404));
    let r = post(
        third.addr,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "alpha"}),
        Some(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        text_of(&completion(&third, "alpha", "w5 w6 w7", 12)),
        answer
    );
    third.shutdown().unwrap();
}
