//! HF safetensors checkpoints: single, sharded, mixed dtypes, and broken files.

use std::path::Path;

use batos_model::gguf::GgufWriter;
use batos_model::{
    ChatMessage, GenerationPrompt, LayerTensor, LoadOptions, LoadedModel, ModelError,
    ModelTokenizer, ModelWeights, TensorRole,
};
use batos_types::DType;
use safetensors::Dtype;

use crate::synth::{
    hf_config_json, st_tensor, tiny_config, tiny_weights, tokenizer_metadata, write_safetensors,
    StTensor,
};

/// The tiny model's tensors, with dtypes cycling f32 / f16 / bf16 (values are exact in all).
fn tiny_st() -> Vec<StTensor> {
    let cfg = tiny_config();
    tiny_weights(&cfg)
        .iter()
        .enumerate()
        .map(|(i, (role, v))| {
            st_tensor(role, &cfg, v, [Dtype::F32, Dtype::F16, Dtype::BF16][i % 3])
        })
        .collect()
}

fn write_dir(dir: &Path, tensors: &[StTensor]) {
    std::fs::write(dir.join("config.json"), hf_config_json(&tiny_config())).unwrap();
    write_safetensors(&dir.join("model.safetensors"), tensors);
}

fn load(dir: &Path) -> batos_model::Result<ModelWeights> {
    ModelWeights::from_safetensors_dir(dir, &tiny_config(), &LoadOptions::default())
}

fn check_values(w: &ModelWeights) {
    let cfg = tiny_config();
    for (role, v) in tiny_weights(&cfg) {
        assert_eq!(w.get(role).unwrap().to_f32_vec(), v, "{role}");
    }
}

#[test]
fn single_file_mixed_dtypes() {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = tiny_st();
    // A RoPE buffer some exports keep is ignored.
    tensors.push(StTensor {
        name: "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        dtype: Dtype::F32,
        shape: vec![4],
        values: vec![1.0; 4],
    });
    write_dir(dir.path(), &tensors);
    let w = load(dir.path()).unwrap();
    check_values(&w);
    assert!(w.iter().all(|(_, t)| t.dtype() == DType::F32));
    let w16 = ModelWeights::from_safetensors_dir(
        dir.path(),
        &tiny_config(),
        &LoadOptions::default().with_dtype(DType::F16),
    )
    .unwrap();
    assert!(w16.iter().all(|(_, t)| t.dtype() == DType::F16));
    check_values(&w16);
}

#[test]
fn sharded_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = tiny_st();
    let (a, b) = tensors.split_at(tensors.len() / 2);
    write_safetensors(&dir.path().join("model-00001-of-00002.safetensors"), a);
    write_safetensors(&dir.path().join("model-00002-of-00002.safetensors"), b);
    let map: serde_json::Map<String, serde_json::Value> = a
        .iter()
        .map(|t| (t.name.clone(), "model-00001-of-00002.safetensors".into()))
        .chain(
            b.iter()
                .map(|t| (t.name.clone(), "model-00002-of-00002.safetensors".into())),
        )
        .collect();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    check_values(&load(dir.path()).unwrap());

    // A shard named in the index but absent.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, ModelError::NotFound { path, .. } if path.ends_with("model-00002-of-00002.safetensors")),
        "{err}"
    );
    // A shard name that escapes the directory.
    let index = serde_json::json!({"weight_map": {"model.norm.weight": "../x.safetensors"}});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::Safetensors { .. }), "{err}");
    // An index that is not JSON.
    std::fs::write(dir.path().join("model.safetensors.index.json"), "nope").unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::Json { .. }), "{err}");
}

#[test]
fn duplicate_tensor_across_shards() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = tiny_st();
    write_safetensors(&dir.path().join("a.safetensors"), &tensors);
    write_safetensors(&dir.path().join("b.safetensors"), &tensors[..1]);
    let files = vec![
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    ];
    let err = ModelWeights::from_safetensors_files(&files, &tiny_config(), &LoadOptions::default())
        .unwrap_err();
    assert!(
        err.to_string().contains("model.embed_tokens.weight"),
        "{err}"
    );
}

#[test]
fn loaded_model_from_hf_dir() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &tiny_st());
    // tokenizer.json written from a GGUF-built tokenizer, plus tokenizer_config.json and a template.
    let mut w = GgufWriter::new();
    tokenizer_metadata(&mut w, "smollm");
    let gpath = dir.path().join("tok.gguf");
    w.write_to(&gpath).unwrap();
    let from_gguf = ModelTokenizer::from_gguf(
        batos_model::gguf::GgufFile::open(&gpath)
            .unwrap()
            .metadata(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        from_gguf.inner().to_string(false).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        serde_json::json!({
            "bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"}, "add_bos_token": false,
            "chat_template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
        })
        .to_string(),
    )
    .unwrap();
    let m = LoadedModel::from_hf_dir(dir.path(), &LoadOptions::default()).unwrap();
    check_values(&m.weights);
    let sp = m.tokenizer.special_tokens();
    assert_eq!((sp.bos, sp.eos, sp.add_bos), (Some(1), Some(2), false));
    let text = "the the 42<|im_end|>";
    assert_eq!(
        m.tokenizer.encode(text).unwrap(),
        from_gguf.encode(text).unwrap()
    );
    let t = m.chat_template.as_ref().unwrap();
    assert_eq!(t.eos_token(), Some("<|im_end|>"));
    assert_eq!(
        t.render(&[ChatMessage::user("hi")], GenerationPrompt::Omit)
            .unwrap(),
        "[user]hi"
    );
    // chat_template.jinja takes precedence over tokenizer_config.json.
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "J{{ messages|length }}",
    )
    .unwrap();
    let m = LoadedModel::from_hf_dir(dir.path(), &LoadOptions::default()).unwrap();
    let t = m.chat_template.unwrap();
    assert_eq!(
        t.render(&[ChatMessage::user("hi")], GenerationPrompt::Add)
            .unwrap(),
        "J1"
    );
}

#[test]
fn missing_checkpoint_and_tokenizer() {
    let dir = tempfile::tempdir().unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::NotFound { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
    write_dir(dir.path(), &tiny_st());
    let err = LoadedModel::from_hf_dir(dir.path(), &LoadOptions::default()).unwrap_err();
    assert!(
        matches!(&err, ModelError::NotFound { path, .. } if path.ends_with("tokenizer.json")),
        "{err}"
    );
}

#[test]
fn truncated_and_malformed_files_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &tiny_st());
    let path = dir.path().join("model.safetensors");
    let full = std::fs::read(&path).unwrap();
    let header_len = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
    // Cuts inside the length prefix, the header, and the data.
    for cut in [
        0,
        5,
        8,
        8 + header_len / 2,
        8 + header_len + 3,
        full.len() - 1,
    ] {
        std::fs::write(&path, &full[..cut]).unwrap();
        let err = load(dir.path()).unwrap_err();
        assert!(
            matches!(&err, ModelError::Safetensors { path: p, .. } if p == &path),
            "cut at {cut}: {err}"
        );
    }
    // A header length far beyond the file.
    let mut b = full.clone();
    b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    assert!(matches!(
        load(dir.path()).unwrap_err(),
        ModelError::Safetensors { .. }
    ));
    // A header that is not JSON.
    let mut b = full.clone();
    b[8] = b'#';
    std::fs::write(&path, &b).unwrap();
    let err = load(dir.path()).unwrap_err();
    assert!(matches!(err, ModelError::Safetensors { .. }), "{err}");
    // Not a safetensors file at all.
    std::fs::write(&path, b"hello").unwrap();
    assert!(matches!(
        load(dir.path()).unwrap_err(),
        ModelError::Safetensors { .. }
    ));
}

#[test]
fn bad_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let gate1 = TensorRole::Layer {
        layer: 1,
        tensor: LayerTensor::Gate,
    };

    // Missing.
    let tensors: Vec<StTensor> = tiny_st()
        .into_iter()
        .filter(|t| t.name != gate1.hf_name())
        .collect();
    write_dir(dir.path(), &tensors);
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, ModelError::MissingTensor { name, .. } if name == "model.layers.1.mlp.gate_proj.weight"),
        "{err}"
    );

    // Wrong shape.
    let mut tensors = tiny_st();
    let t = tensors
        .iter_mut()
        .find(|t| t.name == gate1.hf_name())
        .unwrap();
    t.shape = vec![32, 64];
    write_dir(dir.path(), &tensors);
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, ModelError::ShapeMismatch { name, expected, got } if name == &gate1.hf_name() && expected == &vec![64, 32] && got == &vec![32, 64]),
        "{err}"
    );

    // Unsupported element type.
    let mut tensors = tiny_st();
    let t = tensors
        .iter_mut()
        .find(|t| t.name == "model.norm.weight")
        .unwrap();
    t.dtype = Dtype::I32;
    write_dir(dir.path(), &tensors);
    let err = load(dir.path()).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedDType { name, dtype } if name == "model.norm.weight" && dtype == "I32"),
        "{err}"
    );

    // A tensor no Llama weight maps to, and a layer beyond the config.
    for name in [
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.7.input_layernorm.weight",
    ] {
        let mut tensors = tiny_st();
        tensors.push(StTensor {
            name: name.into(),
            dtype: Dtype::F32,
            shape: vec![cfg.hidden_size],
            values: vec![0.0; cfg.hidden_size],
        });
        write_dir(dir.path(), &tensors);
        let err = load(dir.path()).unwrap_err();
        assert!(
            matches!(&err, ModelError::UnexpectedTensor { name: n, .. } if n == name),
            "{name}: {err}"
        );
    }
}
