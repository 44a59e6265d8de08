//! Config parsing and validation.

use batos_model::gguf::{GgufFile, GgufValue, WriterTensor};
use batos_model::{ArchFamily, LlamaConfig, LlamaParams, ModelError, RopeScaling};

use crate::synth::{tiny_config, tiny_gguf, tiny_params, tiny_weights};

fn hf(extra: serde_json::Value) -> String {
    let mut v = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 100,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    });
    for (k, x) in extra.as_object().unwrap() {
        if x.is_null() {
            v.as_object_mut().unwrap().remove(k);
        } else {
            v[k] = x.clone();
        }
    }
    v.to_string()
}

#[test]
fn hf_defaults_and_derived_sizes() {
    let c = LlamaConfig::from_hf_json(&hf(serde_json::json!({}))).unwrap();
    assert_eq!(c.family, ArchFamily::Llama);
    assert_eq!(
        (c.head_dim, c.q_dim(), c.kv_dim(), c.gqa_group()),
        (8, 64, 16, 4)
    );
    assert_eq!(c.rope_theta, 10_000.0);
    assert_eq!(c.rope_scaling, None);
    assert!(!c.tie_word_embeddings);
    assert_eq!(c.eos_token_ids, Vec::<u32>::new());
    // No KV head count means plain multi-head attention.
    let c =
        LlamaConfig::from_hf_json(&hf(serde_json::json!({"num_key_value_heads": null}))).unwrap();
    assert_eq!(c.num_key_value_heads, 8);
}

#[test]
fn hf_llama3_rope_and_eos_list() {
    let c = LlamaConfig::from_hf_json(&hf(serde_json::json!({
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "eos_token_id": [10, 11], "bos_token_id": 9, "head_dim": 16
    })))
    .unwrap();
    assert_eq!(c.rope_theta, 500000.0);
    assert_eq!(c.head_dim, 16);
    assert_eq!(
        c.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        })
    );
    assert_eq!(
        (c.bos_token_id, c.eos_token_ids.clone()),
        (Some(9), vec![10, 11])
    );
    let c = LlamaConfig::from_hf_json(&hf(
        serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}),
    ))
    .unwrap();
    assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
}

#[test]
fn hf_transformers5_rope_parameters_carry_theta() {
    // SmolLM2's config as transformers 5 writes it (../shared/reference/hf_model_summary.json).
    let c = LlamaConfig::from_hf_json(&hf(serde_json::json!({
        "rope_scaling": {"rope_theta": 100000.0, "rope_type": "default"}
    })))
    .unwrap();
    assert_eq!((c.rope_theta, c.rope_scaling), (100000.0, None));
    let c = LlamaConfig::from_hf_json(&hf(serde_json::json!({
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}
    })))
    .unwrap();
    assert_eq!(c.rope_theta, 100000.0);
}

#[test]
fn hf_mistral_sliding_window() {
    let c = LlamaConfig::from_hf_json(&hf(serde_json::json!({
        "architectures": ["MistralForCausalLM"], "sliding_window": 1024
    })))
    .unwrap();
    assert_eq!(
        (c.family, c.sliding_window),
        (ArchFamily::Mistral, Some(1024))
    );
    // A window as long as the context is no window.
    let c = LlamaConfig::from_hf_json(&hf(serde_json::json!({
        "architectures": null, "model_type": "mistral", "sliding_window": 4096
    })))
    .unwrap();
    assert_eq!((c.family, c.sliding_window), (ArchFamily::Mistral, None));
}

#[test]
fn unknown_architecture_is_a_typed_error() {
    for extra in [
        serde_json::json!({"architectures": ["GPT2LMHeadModel"]}),
        serde_json::json!({"architectures": null, "model_type": "gpt2"}),
    ] {
        let err = LlamaConfig::from_hf_json(&hf(extra)).unwrap_err();
        assert!(
            matches!(&err, ModelError::UnknownArchitecture { found, .. } if found.to_lowercase().contains("gpt2")),
            "{err}"
        );
    }
    let err =
        LlamaConfig::from_hf_json(&hf(serde_json::json!({"architectures": null}))).unwrap_err();
    assert!(
        matches!(err, ModelError::UnknownArchitecture { .. }),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let mut w = tiny_gguf(&cfg, &tiny_weights(&cfg));
    w.metadata("general.architecture", GgufValue::String("gpt2".into()));
    let path = dir.path().join("gpt2.gguf");
    w.write_to(&path).unwrap();
    let err = LlamaConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err();
    assert!(
        matches!(&err, ModelError::UnknownArchitecture { found, .. } if found == "gpt2"),
        "{err}"
    );
    assert!(err.to_string().contains("'gpt2'"), "{err}");
}

#[test]
fn invalid_values_are_rejected_with_the_field() {
    let cases = [
        (
            serde_json::json!({"num_key_value_heads": 3}),
            "num_key_value_heads",
        ),
        (
            serde_json::json!({"num_hidden_layers": 0}),
            "num_hidden_layers",
        ),
        (serde_json::json!({"rms_norm_eps": -1.0}), "rms_norm_eps"),
        (serde_json::json!({"head_dim": 7}), "head_dim"),
        (serde_json::json!({"eos_token_id": 100}), "bos/eos_token_id"),
        (
            serde_json::json!({"attention_bias": true}),
            "attention_bias/mlp_bias",
        ),
        (serde_json::json!({"hidden_act": "gelu"}), "hidden_act"),
    ];
    for (extra, field) in cases {
        let err = LlamaConfig::from_hf_json(&hf(extra.clone())).unwrap_err();
        assert!(
            matches!(&err, ModelError::InvalidConfig { field: f, .. } if *f == field),
            "{extra}: {err}"
        );
    }
    let err = LlamaConfig::from_hf_json(&hf(
        serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
    ))
    .unwrap_err();
    assert!(
        matches!(&err, ModelError::UnsupportedRopeScaling { kind } if kind == "yarn"),
        "{err}"
    );
    let err = LlamaConfig::from_hf_json(&hf(serde_json::json!({"hidden_size": null}))).unwrap_err();
    assert!(matches!(err, ModelError::Json { .. }), "{err}");
    assert!(err.to_string().contains("hidden_size"), "{err}");
}

#[test]
fn config_file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = LlamaConfig::from_hf_file(dir.path().join("config.json")).unwrap_err();
    assert!(
        matches!(err, ModelError::Io { .. }) && err.to_string().contains("config.json"),
        "{err}"
    );
    let p = dir.path().join("config.json");
    std::fs::write(&p, "{ not json").unwrap();
    let err = LlamaConfig::from_hf_file(&p).unwrap_err();
    assert!(
        matches!(&err, ModelError::Json { path, .. } if path == &p),
        "{err}"
    );
}

#[test]
fn serde_round_trip_revalidates() {
    let c = tiny_config();
    let json = serde_json::to_string(&c).unwrap();
    let back: LlamaConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c);
    let mut bad: serde_json::Value = serde_json::from_str(&json).unwrap();
    bad["num_key_value_heads"] = 3.into();
    let err = serde_json::from_value::<LlamaConfig>(bad).unwrap_err();
    assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    let p = LlamaParams {
        vocab_size: 0,
        ..tiny_params()
    };
    assert!(LlamaConfig::new(p).is_err());
}

#[test]
fn gguf_config_and_tied_head() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let weights = tiny_weights(&cfg);
    let path = dir.path().join("tiny.gguf");
    tiny_gguf(&cfg, &weights).write_to(&path).unwrap();
    let got = LlamaConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    assert_eq!(got, cfg);

    // An output.weight tensor means an untied head.
    let mut w = tiny_gguf(&cfg, &weights);
    w.tensor(WriterTensor::f32(
        "output.weight",
        &[40, 32],
        &vec![0.0; 40 * 32],
    ));
    let path = dir.path().join("untied.gguf");
    w.write_to(&path).unwrap();
    let got = LlamaConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    assert!(!got.tie_word_embeddings);

    // Partial rotary is refused, naming the key.
    let mut w = tiny_gguf(&cfg, &weights);
    w.metadata("llama.rope.dimension_count", GgufValue::U32(4));
    let path = dir.path().join("partial.gguf");
    w.write_to(&path).unwrap();
    let err = LlamaConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::InvalidConfig {
                field: "rope.dimension_count",
                ..
            }
        ),
        "{err}"
    );

    // A missing required key is named.
    let mut w = tiny_gguf(&cfg, &weights);
    w.metadata("llama.block_count", GgufValue::String("two".into()));
    let path = dir.path().join("badkey.gguf");
    w.write_to(&path).unwrap();
    let err = LlamaConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err();
    assert!(
        matches!(&err, ModelError::MetadataType { key, .. } if key == "llama.block_count"),
        "{err}"
    );

    // Linear rope scaling from GGUF keys; yarn is refused.
    let mut w = tiny_gguf(&cfg, &weights);
    w.metadata(
        "llama.rope.scaling.type",
        GgufValue::String("linear".into()),
    )
    .metadata("llama.rope.scaling.factor", GgufValue::F32(4.0));
    let path = dir.path().join("linear.gguf");
    w.write_to(&path).unwrap();
    let got = LlamaConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    assert_eq!(got.rope_scaling, Some(RopeScaling::Linear { factor: 4.0 }));
    let mut w = tiny_gguf(&cfg, &weights);
    w.metadata("llama.rope.scaling.type", GgufValue::String("yarn".into()));
    let path = dir.path().join("yarn.gguf");
    w.write_to(&path).unwrap();
    let err = LlamaConfig::from_gguf(&GgufFile::open(&path).unwrap()).unwrap_err();
    assert!(
        matches!(err, ModelError::UnsupportedRopeScaling { .. }),
        "{err}"
    );
}
