//! Helpers shared by the server's tests: a tiny model imported into a living image, a
//! synthetic PEFT adapter for it, a server on a loopback port in its own runtime, and
//! a raw HTTP/1.1 client (no client library: the tests see exactly the bytes sent).
// Each test binary uses a different subset.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use batos_model::image::{import_model, ModelSource};
use batos_model::synthetic::{tiny_params, SyntheticLlama};
use batos_model::{LlamaConfig, LoadOptions, LoadedModel, Progress};
use batos_server::{ServedModel, Server, ServerConfig};
use batos_store::{LivingImage, StoreConfig};
use serde_json::{json, Value};

/// The tiny model's served name (its HF directory's name).
pub const MODEL: &str = "tiny-llama";
/// Its end-of-sequence token.
pub const EOS: u32 = 255;

/// Writes a tiny HF model directory: the synthetic 2-layer Llama (vocab 256, context
/// 4096), a
/// word-level tokenizer over `w0 .. w255` (`w255` ends a sequence) and a chat template.
fn tiny_hf_dir(dir: &Path) {
    let mut params = tiny_params();
    params.eos_token_ids = vec![EOS];
    // Room for requests long enough to still run while a test looks at them.
    params.max_position_embeddings = 4096;
    let config = LlamaConfig::new(params).unwrap();
    let config_json = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": config.num_hidden_layers, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads, "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings, "eos_token_id": EOS
    });
    std::fs::write(dir.join("config.json"), config_json.to_string()).unwrap();
    let weights = SyntheticLlama::new(config.clone(), 5).weights();
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = weights
        .iter()
        .map(|(role, t)| (role.hf_name(), t.shape().to_vec(), t.as_bytes().to_vec()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap();
            (name.clone(), view)
        })
        .collect();
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    let vocab: serde_json::Map<String, Value> =
        (0..256).map(|i| (format!("w{i}"), json!(i))).collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let tok_config = json!({
        "eos_token": "w255", "unk_token": "w0",
        "chat_template": "{% for m in messages %}w1 {{ m.content }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), tok_config.to_string()).unwrap();
}

/// A living image at `root/image` holding the tiny model, imported from an HF
/// directory named [`MODEL`] (so that is its default served name).
pub fn tiny_image(root: &Path) -> PathBuf {
    let hf = root.join(MODEL);
    std::fs::create_dir_all(&hf).unwrap();
    tiny_hf_dir(&hf);
    let loaded = LoadedModel::from_hf_dir(&hf, &LoadOptions::default()).unwrap();
    let path = root.join("image");
    let image = LivingImage::open(&path, StoreConfig::default()).unwrap();
    import_model(&image, &loaded, ModelSource::hf_dir(&hf), Progress::Hidden).unwrap();
    path
}

/// Deterministic values in [-scale, scale).
fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z =
                seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z ^= z >> 31;
            z = z.wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

/// Writes a rank-4 PEFT adapter for the tiny model (all seven projections of both
/// layers; large enough weights to change greedy outputs) into `dir`.
///
/// All seven: the forward pass refuses a token whose adapter leaves one of the
/// projections out (`slot N is empty`), see the report of this branch.
pub fn write_adapter(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let r = 4;
    let config = json!({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "bias": "none", "use_dora": false, "use_rslora": false, "fan_in_fan_out": false,
        "modules_to_save": null, "base_model_name_or_path": format!("org/{MODEL}"),
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    // (module path, in features, out features) for the tiny geometry.
    let modules = [
        ("self_attn.q_proj", 64, 64),
        ("self_attn.k_proj", 64, 32),
        ("self_attn.v_proj", 64, 32),
        ("self_attn.o_proj", 64, 64),
        ("mlp.gate_proj", 64, 96),
        ("mlp.up_proj", 64, 96),
        ("mlp.down_proj", 96, 64),
    ];
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut s = seed;
    for layer in 0..2 {
        for (m, i, o) in modules {
            for (half, shape) in [("lora_A", vec![r, i]), ("lora_B", vec![o, r])] {
                s += 1;
                let v = values(s, shape[0] * shape[1], 0.6);
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                tensors.push((
                    format!("base_model.model.model.layers.{layer}.{m}.{half}.weight"),
                    shape,
                    bytes,
                ));
            }
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, shape, bytes)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
}

/// A config for tests: any free loopback port, a small engine.
pub fn test_config() -> ServerConfig {
    let mut c = ServerConfig {
        port: 0,
        ..ServerConfig::default()
    };
    c.engine.kv_cache_bytes = 16 << 20;
    c.engine.max_loras = 2;
    c.engine.max_cpu_loras = 8;
    c.engine.max_num_seqs = 16;
    c.engine.max_batch_tokens = 256;
    c.engine.prefill_chunk = 64;
    c.max_tokens = 4000;
    c
}

/// A server in its own thread and runtime; stopped (drained) on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), String>>>,
}

impl TestServer {
    /// Serves the image at `image` with `config`.
    pub fn start(image: &Path, config: ServerConfig) -> TestServer {
        let settings = config.validate().unwrap();
        let model = ServedModel::from_image(
            image,
            settings.engine(),
            settings.served_model_name(),
            Progress::Hidden,
        )
        .unwrap();
        let (addr_tx, addr_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async move {
                let server = Server::bind(settings, model)
                    .await
                    .map_err(|e| e.to_string())?;
                addr_tx
                    .send(server.local_addr().map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
                server
                    .run(async move {
                        let _ = stop_rx.await;
                    })
                    .await
                    .map_err(|e| e.to_string())
            })
        });
        let addr = addr_rx.recv().expect("the server did not start");
        TestServer {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
        }
    }

    /// Asks the server to drain and stop; returns its result once it has.
    pub fn shutdown(mut self) -> Result<(), String> {
        self.stop_and_join()
    }

    /// Sends the stop signal without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    fn stop_and_join(&mut self) -> Result<(), String> {
        self.signal_stop();
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| "server thread panicked".to_string())?,
            None => Ok(()),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

/// One HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `data:` payloads of an SSE body, in order (`[DONE]` included as a string).
    pub fn events(&self) -> Vec<String> {
        sse_events(&self.text())
    }
}

pub fn sse_events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.trim().strip_prefix("data: ").map(str::to_owned))
        .collect()
}

/// The request bytes.
fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Reads the status line and headers.
fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    (status, headers)
}

/// Sends one request and reads the whole response (chunked bodies decoded).
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    s.write_all(&request_bytes(addr, method, path, headers, body))
        .unwrap();
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let chunked = headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    });
    let mut body = Vec::new();
    if chunked {
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim(), 16).unwrap();
            if n == 0 {
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    Resp {
        status,
        headers,
        body,
    }
}

/// POSTs `body` as JSON, with a Bearer `key` if given.
pub fn post(addr: SocketAddr, path: &str, body: &Value, key: Option<&str>) -> Resp {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    http(addr, "POST", path, &headers, body.to_string().as_bytes())
}

/// GETs `path`, with a Bearer `key` if given.
pub fn get(addr: SocketAddr, path: &str, key: Option<&str>) -> Resp {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = Vec::new();
    if let Some(a) = &auth {
        headers.push(("Authorization", a.as_str()));
    }
    http(addr, "GET", path, &headers, b"")
}

/// Opens a streamed request and returns the reader positioned after the headers.
pub fn open_stream(addr: SocketAddr, path: &str, body: &Value) -> (u16, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    s.write_all(&request_bytes(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    ))
    .unwrap();
    let mut r = BufReader::new(s);
    let (status, _) = read_head(&mut r);
    (status, r)
}

/// Reads chunked data until one whole SSE event (`data: …\n\n`) has arrived.
pub fn read_event(r: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    let mut got = String::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let n = usize::from_str_radix(line.trim(), 16).unwrap();
        assert!(n > 0, "the stream ended before an event");
        let mut chunk = vec![0; n + 2];
        r.read_exact(&mut chunk).unwrap();
        got.push_str(&String::from_utf8_lossy(&chunk[..n]));
        if got.contains("\n\n") {
            return got;
        }
    }
}

/// The error envelope's `type` and `code`, checked against the status.
pub fn error_of(resp: &Resp) -> (String, u16) {
    let v = resp.json();
    let e = &v["error"];
    let code = e["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("no code in {v}")) as u16;
    assert_eq!(code, resp.status, "envelope code vs status: {v}");
    assert!(e["message"].is_string(), "{v}");
    (e["type"].as_str().unwrap().to_string(), code)
}
