//! The audit: the shipped reference adapters, then every fault in its own test.

mod common;

use batos_lora::{
    audit, audit_dir, AdapterFiles, AuditPolicy, AuditProblem, BaseModelCheck, BaseShapes,
    LoraError, PairHalf, Projection,
};
use common::{key, reference_dir, tiny_base, Synth};
use safetensors::Dtype;
use serde_json::json;

fn rejected(s: &Synth, policy: &AuditPolicy) -> batos_lora::AuditReport {
    let dir = s.temp();
    match audit_dir("t", dir.path(), &tiny_base(), policy) {
        Err(LoraError::Rejected { report, .. }) => report,
        Err(e) => panic!("expected a rejection, got {e}"),
        Ok(_) => panic!("expected a rejection, got acceptance"),
    }
}

fn accepted(s: &Synth, policy: &AuditPolicy) -> batos_lora::LoraAdapter {
    let dir = s.temp();
    audit_dir("t", dir.path(), &tiny_base(), policy)
        .unwrap_or_else(|e| panic!("expected acceptance: {e}"))
        .0
}

#[test]
fn reference_r16_adapter_is_accepted_with_scale_two() {
    let dir = reference_dir("lora_r16");
    let (a, report) = audit_dir(
        "r16",
        &dir,
        &BaseShapes::smollm2_135m(),
        &AuditPolicy::default(),
    )
    .unwrap();
    assert!(report.is_clean());
    assert_eq!(a.weights.len(), 30 * 7);
    assert_eq!(a.weights.max_rank(), 16);
    let q0 = a.weights.pair(0, Projection::Q).unwrap();
    assert_eq!((q0.rank, q0.scale), (16, 2.0));
    assert_eq!(q0.a.len(), 16 * 576);
    let d29 = a.weights.pair(29, Projection::Down).unwrap();
    assert_eq!((d29.a.len(), d29.b.len()), (16 * 1536, 576 * 16));
    // The generation is a function of the content: auditing again gives the same.
    let (again, _) = audit_dir(
        "r16",
        &dir,
        &BaseShapes::smollm2_135m(),
        &AuditPolicy::default(),
    )
    .unwrap();
    assert_eq!(a.generation, again.generation);
}

#[test]
fn bad_lm_head_is_rejected_naming_lm_head_and_embed_tokens() {
    let dir = reference_dir("bad_lm_head");
    let err = audit_dir(
        "bad",
        &dir,
        &BaseShapes::smollm2_135m(),
        &AuditPolicy::default(),
    )
    .unwrap_err();
    let LoraError::Rejected { report, .. } = &err else {
        panic!("expected a rejection, got {err}");
    };
    let text = err.to_string();
    assert!(
        text.contains("lm_head") && text.contains("embed_tokens"),
        "{text}"
    );
    for m in ["lm_head", "embed_tokens"] {
        assert!(
            report.problems.iter().any(
                |p| matches!(p, AuditProblem::TargetsEmbeddingOrHead { module, .. } if module == m)
            ),
            "{m} missing from {report}"
        );
    }
}

#[test]
fn synthetic_good_adapter_round_trips() {
    let a = accepted(&Synth::good(&tiny_base(), 4, 1), &AuditPolicy::default());
    assert_eq!(a.weights.len(), 14);
    assert_eq!(a.weights.pair(1, Projection::K).unwrap().scale, 2.0);
}

#[test]
fn modules_to_save_is_rejected() {
    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.config["modules_to_save"] = json!(["lm_head"]);
    let r = rejected(&s, &AuditPolicy::default());
    assert!(
        r.problems.iter().any(
            |p| matches!(p, AuditProblem::ModulesToSave { modules } if modules == &["lm_head"])
        ),
        "{r}"
    );
}

#[test]
fn dora_is_rejected_from_config_and_from_tensors() {
    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.config["use_dora"] = json!(true);
    let r = rejected(&s, &AuditPolicy::default());
    assert_eq!(r.problems, vec![AuditProblem::Dora]);

    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.tensors.push(common::T {
        key: "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector".into(),
        dtype: Dtype::F32,
        shape: vec![8],
        values: vec![1.0; 8],
    });
    let r = rejected(&s, &AuditPolicy::default());
    assert_eq!(r.problems, vec![AuditProblem::Dora]);
}

#[test]
fn bias_is_rejected() {
    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.config["bias"] = json!("lora_only");
    let r = rejected(&s, &AuditPolicy::default());
    assert!(
        r.problems
            .iter()
            .any(|p| matches!(p, AuditProblem::Bias { field: "bias", .. })),
        "{r}"
    );

    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.config["lora_bias"] = json!(true);
    s.tensors.push(common::T {
        key: "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias".into(),
        dtype: Dtype::F32,
        shape: vec![8],
        values: vec![0.0; 8],
    });
    let r = rejected(&s, &AuditPolicy::default());
    assert!(
        r.problems.iter().any(|p| matches!(
            p,
            AuditProblem::Bias {
                field: "lora_bias",
                ..
            }
        )),
        "{r}"
    );
    assert!(
        r.problems.iter().any(|p| matches!(
            p,
            AuditProblem::Bias {
                field: "tensor",
                ..
            }
        )),
        "{r}"
    );
}

#[test]
fn rank_above_maximum_is_rejected() {
    let s = Synth::good(&tiny_base(), 8, 1);
    let policy = AuditPolicy {
        max_rank: 4,
        ..AuditPolicy::default()
    };
    let r = rejected(&s, &policy);
    assert!(
        r.problems.iter().any(|p| matches!(
            p,
            AuditProblem::RankTooLarge {
                rank: 8,
                max: 4,
                ..
            }
        )),
        "{r}"
    );
    // A rank_pattern entry alone above the maximum is caught too.
    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.config["rank_pattern"] = json!({ "down_proj": 16 });
    let r = rejected(
        &s,
        &AuditPolicy {
            max_rank: 8,
            ..AuditPolicy::default()
        },
    );
    assert!(r.mentions("rank_pattern 'down_proj' has rank 16"), "{r}");
}

#[test]
fn shapes_not_matching_the_base_are_rejected() {
    let mut s = Synth::good(&tiny_base(), 4, 1);
    let k = key(1, Projection::V, "lora_B");
    let t = s.tensor_mut(&k);
    t.shape = vec![8, 4]; // v_proj's out is kv_dim 4, not 8
    t.values = common::values(9, 32);
    let r = rejected(&s, &AuditPolicy::default());
    assert_eq!(
        r.problems,
        vec![AuditProblem::ShapeMismatch {
            key: k,
            expected: vec![4, 4],
            got: vec![8, 4]
        }]
    );
}

#[test]
fn tensor_rank_disagreeing_with_config_is_a_shape_problem() {
    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.config["r"] = json!(2);
    let r = rejected(&s, &AuditPolicy::default());
    assert!(
        r.problems
            .iter()
            .all(|p| matches!(p, AuditProblem::ShapeMismatch { .. })),
        "{r}"
    );
    assert_eq!(r.problems.len(), 2 * 7 * 2);
}

#[test]
fn missing_half_of_a_pair_is_rejected() {
    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.remove(&key(0, Projection::Up, "lora_B"));
    let r = rejected(&s, &AuditPolicy::default());
    assert_eq!(
        r.problems,
        vec![AuditProblem::MissingPair {
            module: "model.layers.0.mlp.up_proj".into(),
            missing: PairHalf::B
        }]
    );
}

#[test]
fn unknown_keys_are_rejected() {
    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.tensors.push(common::T {
        key: "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight".into(),
        dtype: Dtype::F32,
        shape: vec![1],
        values: vec![0.0],
    });
    s.tensors.push(common::T {
        key: "something_else".into(),
        dtype: Dtype::F32,
        shape: vec![1],
        values: vec![0.0],
    });
    let r = rejected(&s, &AuditPolicy::default());
    assert_eq!(r.problems.len(), 2, "{r}");
    assert!(
        r.problems
            .iter()
            .all(|p| matches!(p, AuditProblem::UnknownKey { .. })),
        "{r}"
    );
}

#[test]
fn non_finite_values_are_rejected() {
    let mut s = Synth::good(&tiny_base(), 4, 1);
    let k = key(1, Projection::Gate, "lora_A");
    let t = s.tensor_mut(&k);
    t.values[3] = f32::NAN;
    t.values[5] = f32::INFINITY;
    let r = rejected(&s, &AuditPolicy::default());
    assert_eq!(
        r.problems,
        vec![AuditProblem::NonFinite { key: k, count: 2 }]
    );
}

#[test]
fn base_model_mismatch_follows_the_configured_strictness() {
    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.config["base_model_name_or_path"] = json!("meta-llama/Llama-3.2-1B");
    let r = rejected(&s, &AuditPolicy::default());
    assert!(
        r.problems
            .iter()
            .any(|p| matches!(p, AuditProblem::BaseModelMismatch { .. })),
        "{r}"
    );
    let warn = AuditPolicy {
        base_model: BaseModelCheck::Warn,
        ..AuditPolicy::default()
    };
    let dir = s.temp();
    let (_, report) = audit_dir("t", dir.path(), &tiny_base(), &warn).unwrap();
    assert!(
        report.warnings.iter().any(|w| w.contains("Llama-3.2-1B")),
        "{report:?}"
    );
    let ignore = AuditPolicy {
        base_model: BaseModelCheck::Ignore,
        ..AuditPolicy::default()
    };
    let (_, report) = audit_dir("t", dir.path(), &tiny_base(), &ignore).unwrap();
    assert!(report.warnings.is_empty());
}

#[test]
fn files_beyond_size_limits_are_rejected_unread() {
    let s = Synth::good(&tiny_base(), 4, 1);
    let policy = AuditPolicy {
        max_weights_bytes: 1000,
        ..AuditPolicy::default()
    };
    let r = rejected(&s, &policy);
    assert!(
        matches!(&r.problems[..], [AuditProblem::FileTooLarge { file, limit: 1000, .. }] if file == "adapter_model.safetensors"),
        "{r}"
    );

    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.config["padding"] = json!("x".repeat(2 << 20));
    let r = rejected(&s, &AuditPolicy::default());
    assert!(r.problems.iter().any(|p| matches!(p, AuditProblem::FileTooLarge { file, limit, .. } if file == "adapter_config.json" && *limit == 1 << 20)), "{r}");
}

#[test]
fn truncated_or_malformed_safetensors_are_rejected() {
    let s = Synth::good(&tiny_base(), 4, 1);
    let dir = s.temp();
    let path = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
    let err = audit_dir("t", dir.path(), &tiny_base(), &AuditPolicy::default()).unwrap_err();
    let LoraError::Rejected { report, .. } = err else {
        panic!("{err}")
    };
    assert!(
        matches!(
            &report.problems[..],
            [AuditProblem::WeightsMalformed { .. }]
        ),
        "{report}"
    );

    std::fs::write(&path, b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let err = audit_dir("t", dir.path(), &tiny_base(), &AuditPolicy::default()).unwrap_err();
    assert!(err.to_string().contains("malformed"), "{err}");
}

#[test]
fn malformed_config_is_rejected() {
    let s = Synth::good(&tiny_base(), 4, 1);
    let files = AdapterFiles::from_bytes(b"{ not json".to_vec(), s.safetensors_bytes());
    let r = audit(&files, &tiny_base(), &AuditPolicy::default()).unwrap_err();
    assert!(r.mentions("not valid JSON"), "{r}");

    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.config["r"] = json!("sixteen");
    s.config["target_modules"] = json!(42);
    let r = rejected(&s, &AuditPolicy::default());
    assert!(
        r.mentions("field r") && r.mentions("field target_modules"),
        "{r}"
    );
}

#[test]
fn missing_files_are_reported() {
    let s = Synth::good(&tiny_base(), 4, 1);
    let dir = s.temp();
    std::fs::remove_file(dir.path().join("adapter_model.safetensors")).unwrap();
    let err = audit_dir("t", dir.path(), &tiny_base(), &AuditPolicy::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("missing file adapter_model.safetensors"),
        "{err}"
    );
    assert!(matches!(
        audit_dir(
            "t",
            &dir.path().join("nope"),
            &tiny_base(),
            &AuditPolicy::default()
        ),
        Err(LoraError::Io { .. })
    ));
}

#[test]
fn config_targeting_lm_head_alone_is_rejected() {
    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.config["target_modules"] = json!([
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "lm_head"
    ]);
    let r = rejected(&s, &AuditPolicy::default());
    assert!(
        matches!(&r.problems[..], [AuditProblem::TargetsEmbeddingOrHead { module, .. }] if module == "lm_head"),
        "{r}"
    );
    // The regex form too.
    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.config["target_modules"] = json!(".*(proj|lm_head)");
    let r = rejected(&s, &AuditPolicy::default());
    assert!(r.mentions("targets lm_head"), "{r}");
}

#[test]
fn layer_beyond_the_base_and_untargeted_weights_are_rejected() {
    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.tensors.push(common::T {
        key: key(5, Projection::Q, "lora_A"),
        dtype: Dtype::F32,
        shape: vec![4, 8],
        values: vec![0.0; 32],
    });
    s.config["target_modules"] = json!([
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj"
    ]);
    let r = rejected(&s, &AuditPolicy::default());
    assert!(
        r.problems.iter().any(|p| matches!(
            p,
            AuditProblem::LayerOutOfRange {
                layer: 5,
                num_layers: 2,
                ..
            }
        )),
        "{r}"
    );
    assert_eq!(
        r.problems
            .iter()
            .filter(|p| matches!(p, AuditProblem::UntargetedWeights { .. }))
            .count(),
        2,
        "{r}"
    );
}

#[test]
fn unsupported_dtype_is_rejected() {
    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.tensor_mut(&key(0, Projection::O, "lora_A")).dtype = Dtype::F64;
    let r = rejected(&s, &AuditPolicy::default());
    assert!(
        matches!(&r.problems[..], [AuditProblem::UnsupportedDType { .. }]),
        "{r}"
    );
}

#[test]
fn every_problem_is_reported_not_only_the_first() {
    let mut s = Synth::good(&tiny_base(), 8, 1);
    s.config["use_dora"] = json!(true);
    s.config["modules_to_save"] = json!(["embed_tokens"]);
    s.config["bias"] = json!("all");
    s.config["base_model_name_or_path"] = json!("other-model");
    s.tensor_mut(&key(0, Projection::Q, "lora_A")).values[0] = f32::NAN;
    s.remove(&key(1, Projection::Down, "lora_A"));
    s.tensors.push(common::T {
        key: "base_model.model.lm_head.lora_A.weight".into(),
        dtype: Dtype::F32,
        shape: vec![8, 8],
        values: vec![0.0; 64],
    });
    let r = rejected(
        &s,
        &AuditPolicy {
            max_rank: 4,
            ..AuditPolicy::default()
        },
    );
    for needle in [
        "DoRA",
        "modules_to_save",
        "bias = ",
        "other-model",
        "non-finite",
        "no lora_A",
        "targets lm_head",
        "rank 8",
    ] {
        assert!(r.mentions(needle), "'{needle}' missing from {r}");
    }
}

#[test]
fn f16_and_bf16_weights_decode_and_hash_by_value() {
    let base = tiny_base();
    let mut s = Synth::good(&base, 4, 3);
    // Values exactly representable in bf16 (and so in f16): generation must agree.
    for t in &mut s.tensors {
        for v in &mut t.values {
            *v = half::bf16::from_f32(*v).to_f32();
        }
    }
    let g32 = accepted(&s, &AuditPolicy::default()).generation;
    for d in [Dtype::F16, Dtype::BF16] {
        for t in &mut s.tensors {
            t.dtype = d;
        }
        let a = accepted(&s, &AuditPolicy::default());
        if d == Dtype::BF16 {
            assert_eq!(a.generation, g32, "bf16 encoding of the same values");
        }
        assert!(a
            .weights
            .iter()
            .all(|(_, _, p)| p.a.iter().all(|v| v.is_finite())));
    }
}

#[test]
fn rslora_rank_and_alpha_patterns_set_per_module_scale() {
    let base = tiny_base();
    let mut s = Synth::good(&base, 4, 1);
    s.config["use_rslora"] = json!(true);
    s.config["lora_alpha"] = json!(8);
    // PEFT's rule: the first key (in file order) matching `(.*\.)?key$` wins.
    s.config["alpha_pattern"] = json!("ALPHA");
    s.raw_replace.push((
        "\"ALPHA\"".into(),
        r#"{ "layers.1.mlp.down_proj": 2, "down_proj": 4 }"#.into(),
    ));
    s.config["rank_pattern"] = json!({ "q_proj": 2 });
    for layer in 0..2 {
        let (i, o) = base.dims(Projection::Q);
        let a = s.tensor_mut(&key(layer, Projection::Q, "lora_A"));
        a.shape = vec![2, i];
        a.values.truncate(2 * i);
        let b = s.tensor_mut(&key(layer, Projection::Q, "lora_B"));
        b.shape = vec![o, 2];
        b.values.truncate(o * 2);
    }
    let a = accepted(&s, &AuditPolicy::default());
    let scale = |l, p| a.weights.pair(l, p).unwrap().scale;
    assert_eq!(scale(0, Projection::K), 8.0 / 2.0); // alpha / sqrt(4)
    assert_eq!(scale(0, Projection::Q), (8.0 / 2f64.sqrt()) as f32);
    assert_eq!(a.weights.pair(0, Projection::Q).unwrap().rank, 2);
    assert_eq!(scale(0, Projection::Down), 4.0 / 2.0);
    assert_eq!(scale(1, Projection::Down), 2.0 / 2.0);
}

#[test]
fn generation_changes_with_any_weight_or_scale() {
    let base = tiny_base();
    let s = Synth::good(&base, 4, 1);
    let g = accepted(&s, &AuditPolicy::default()).generation;
    let mut s2 = Synth::good(&base, 4, 1);
    s2.tensor_mut(&key(1, Projection::Down, "lora_B")).values[0] += 1e-6;
    assert_ne!(accepted(&s2, &AuditPolicy::default()).generation, g);
    let mut s3 = Synth::good(&base, 4, 1);
    s3.config["lora_alpha"] = json!(9);
    assert_ne!(accepted(&s3, &AuditPolicy::default()).generation, g);
    // Cosmetic fields do not change it.
    let mut s4 = Synth::good(&base, 4, 1);
    s4.config["peft_version"] = json!("0.99");
    s4.config["lora_dropout"] = json!(0.1);
    assert_eq!(accepted(&s4, &AuditPolicy::default()).generation, g);
}
