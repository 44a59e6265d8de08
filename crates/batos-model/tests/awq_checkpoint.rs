//! AutoAWQ checkpoint round trips: quantise → write the AutoAWQ layout → load → the
//! same tensors and bit-identical forward outputs; and typed errors for checkpoints
//! batos cannot run.

mod awq_common;

use awq_common::{synthetic, token_stream, word_tokenizer};
use batos_model::forward::{LlamaModel, WeightDType};
use batos_model::quant::{
    quantize_weights_rtn, sequence_logits, AwqCheckpointConfig, QuantError, QuantizedModel,
};

fn quantized(group: usize) -> QuantizedModel {
    let synth = synthetic(7);
    let config = synth.config.clone();
    let weights = quantize_weights_rtn(&config, &synth.weights(), group).unwrap();
    QuantizedModel {
        tokenizer: word_tokenizer(config.vocab_size),
        config,
        weights,
        chat_template: None,
    }
}

#[test]
fn save_load_is_identical_and_runs_the_same() {
    let q = quantized(32);
    let dir = tempfile::tempdir().unwrap();
    q.save_autoawq(dir.path()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    let qc = &cfg["quantization_config"];
    assert_eq!(qc["quant_method"], "awq");
    assert_eq!(qc["bits"], 4);
    assert_eq!(qc["group_size"], 32);
    assert_eq!(qc["version"], "gemm");
    assert_eq!(qc["zero_point"], true);

    let back = QuantizedModel::load_autoawq(dir.path()).unwrap();
    assert_eq!(back.config, q.config);
    assert_eq!(back.weights, q.weights);
    assert_eq!(
        back.tokenizer.encode("t5 t9 t200").unwrap(),
        vec![5, 9, 200]
    );

    let tokens = token_stream(40, q.config.vocab_size, 1);
    let a = LlamaModel::from_quantized(&q.config, &q.weights, WeightDType::F32).unwrap();
    let b = LlamaModel::from_quantized(&back.config, &back.weights, WeightDType::F32).unwrap();
    let (la, lb) = (
        sequence_logits(&a, &tokens).unwrap(),
        sequence_logits(&b, &tokens).unwrap(),
    );
    assert!(la.iter().all(|v| v.is_finite()));
    assert_eq!(la, lb, "logits differ after the checkpoint round trip");
}

#[test]
fn checkpoint_tensors_have_autoawq_names_types_and_shapes() {
    let q = quantized(32);
    let dir = tempfile::tempdir().unwrap();
    q.save_autoawq(dir.path()).unwrap();
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (h, ffn) = (q.config.hidden_size, q.config.intermediate_size);
    let t = st.tensor("model.layers.1.mlp.down_proj.qweight").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I32);
    assert_eq!(t.shape(), &[ffn, h / 8]);
    let t = st.tensor("model.layers.1.mlp.down_proj.qzeros").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::I32);
    assert_eq!(t.shape(), &[ffn / 32, h / 8]);
    let t = st.tensor("model.layers.0.self_attn.k_proj.scales").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F16);
    assert_eq!(t.shape(), &[h / 32, q.config.kv_dim()]);
    assert!(st.tensor("model.layers.0.self_attn.q_proj.weight").is_err());
}

#[test]
fn unsupported_checkpoints_are_typed_errors() {
    let q = quantized(32);
    let dir = tempfile::tempdir().unwrap();
    q.save_autoawq(dir.path()).unwrap();
    let cfg_path = dir.path().join("config.json");
    let orig = std::fs::read_to_string(&cfg_path).unwrap();
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&orig).unwrap();
        edit(&mut v);
        std::fs::write(&cfg_path, v.to_string()).unwrap();
        QuantizedModel::load_autoawq(dir.path())
    };
    let bits = with(&|v| v["quantization_config"]["bits"] = 8.into());
    assert!(
        matches!(bits, Err(QuantError::UnsupportedCheckpoint { ref reason, .. }) if reason.contains("bits")),
        "{bits:?}"
    );
    let gemv = with(&|v| v["quantization_config"]["version"] = "gemv".into());
    assert!(matches!(
        gemv,
        Err(QuantError::UnsupportedCheckpoint { .. })
    ));
    let none = with(&|v| {
        v.as_object_mut().unwrap().remove("quantization_config");
    });
    assert!(matches!(
        none,
        Err(QuantError::UnsupportedCheckpoint { .. })
    ));
    // A group size that does not divide the layers' inputs.
    let g = with(&|v| v["quantization_config"]["group_size"] = 48.into());
    assert!(g.is_err());
    // Legacy quant_config.json is read when config.json has no quantization_config.
    let _ = with(&|v| {
        v.as_object_mut().unwrap().remove("quantization_config");
    });
    std::fs::write(
        dir.path().join("quant_config.json"),
        r#"{"zero_point": true, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}"#,
    )
    .unwrap();
    assert_eq!(
        AwqCheckpointConfig::from_dir(dir.path()).unwrap(),
        AwqCheckpointConfig { group_size: 32 }
    );
    assert!(QuantizedModel::load_autoawq(dir.path()).is_ok());
}

#[test]
fn int4_forward_is_close_to_f32() {
    let synth = synthetic(7);
    let f32_model = synth.model(WeightDType::F32).unwrap();
    let q = quantized(32);
    let q_model = LlamaModel::from_quantized(&q.config, &q.weights, WeightDType::F32).unwrap();
    let tokens = token_stream(24, q.config.vocab_size, 2);
    let (a, b) = (
        sequence_logits(&f32_model, &tokens).unwrap(),
        sequence_logits(&q_model, &tokens).unwrap(),
    );
    let rms = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    let diff: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x - y).collect();
    // int4 with groups of 32 perturbs logits by a few percent of their spread, not more.
    assert!(
        rms(&diff) < 0.15 * rms(&a),
        "rms diff {} vs logits rms {}",
        rms(&diff),
        rms(&a)
    );
    assert!(rms(&diff) > 0.0);
}

#[test]
fn gptq_with_int4_embedding_round_trips_and_runs_the_same() {
    use batos_model::quant::{
        quantize_weights_awq, AwqConfig, Calibration, Compensation, EmbeddingQuant,
        QuantizedEmbedding,
    };
    use batos_model::synthetic::SyntheticLlama;
    let params = batos_model::LlamaParams {
        tie_word_embeddings: true,
        ..awq_common::awq_params()
    };
    let synth = SyntheticLlama::new(batos_model::LlamaConfig::new(params).unwrap(), 9);
    let config = synth.config.clone();
    let calib = Calibration::from_tokens(&token_stream(256, config.vocab_size, 2), 32, 8).unwrap();
    let cfg = AwqConfig::default()
        .with_group_size(32)
        .with_grid(5)
        .with_search_tokens(64)
        .with_compensation(Compensation::Gptq { damp: 0.01 })
        .with_embedding(EmbeddingQuant::Int4);
    let out = quantize_weights_awq(&config, &synth.weights(), &cfg, &calib).unwrap();
    let QuantizedEmbedding::Int4(table) = &out.weights.embed_tokens else {
        panic!("the tied embedding stayed dense");
    };
    let (v, h) = (config.vocab_size, config.hidden_size);
    assert_eq!([table.rows(), table.cols()], [v, h]);
    // 4 bits a weight plus an f16 scale and a 4-bit zero per 32 weights.
    assert_eq!(
        table.size_in_bytes(),
        v * h / 2 + (h / 32) * v * 2 + (h / 32) * v / 2
    );

    let q = QuantizedModel {
        tokenizer: word_tokenizer(v),
        config,
        weights: out.weights,
        chat_template: None,
    };
    let dir = tempfile::tempdir().unwrap();
    q.save_autoawq(dir.path()).unwrap();
    let back = QuantizedModel::load_autoawq(dir.path()).unwrap();
    assert_eq!(back.weights, q.weights);
    let tokens = token_stream(40, v, 1);
    let a = LlamaModel::from_quantized(&q.config, &q.weights, WeightDType::F32).unwrap();
    let b = LlamaModel::from_quantized(&back.config, &back.weights, WeightDType::F32).unwrap();
    let la = sequence_logits(&a, &tokens).unwrap();
    assert!(la.iter().all(|x| x.is_finite()));
    assert_eq!(la, sequence_logits(&b, &tokens).unwrap());
}
