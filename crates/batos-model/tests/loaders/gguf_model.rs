//! Importing weights from GGUF: values, layout, dtype, and bad tensors.

use batos_model::gguf::{GgmlType, GgufFile, GgufWriter, WriterTensor};
use batos_model::weights::{permute_rope_rows, unpermute_rope_rows};
use batos_model::{
    LayerTensor, LlamaConfig, LoadOptions, LoadedModel, ModelError, ModelWeights, Progress,
    TensorRole,
};
use batos_types::DType;

use crate::synth::{tiny_config, tiny_gguf, tiny_weights, tokenizer_metadata};

#[test]
fn unpermute_maps_llama_cpp_rows_back_to_hf() {
    // One head of dim 4, rows of length 1: HF rows [a0, a1, b0, b1] (first half, second half)
    // are stored by llama.cpp as [a0, b0, a1, b1].
    let mut v = vec![0.0, 1.0, 2.0, 3.0];
    permute_rope_rows(&mut v, 1, 4, 1);
    assert_eq!(v, vec![0.0, 2.0, 1.0, 3.0]);
    let mut g = vec![10.0, 20.0, 11.0, 21.0];
    unpermute_rope_rows(&mut g, 1, 4, 1);
    assert_eq!(g, vec![10.0, 11.0, 20.0, 21.0]);
    // Two heads of dim 4, rows of length 2.
    let orig: Vec<f32> = (0..16).map(|x| x as f32).collect();
    let mut v = orig.clone();
    permute_rope_rows(&mut v, 2, 4, 2);
    assert_eq!(
        v,
        vec![0., 1., 4., 5., 2., 3., 6., 7., 8., 9., 12., 13., 10., 11., 14., 15.]
    );
    unpermute_rope_rows(&mut v, 2, 4, 2);
    assert_eq!(v, orig);
}

#[test]
fn gguf_import_gives_hf_layout_values() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let weights = tiny_weights(&cfg);
    let path = dir.path().join("tiny.gguf");
    tiny_gguf(&cfg, &weights).write_to(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(
        g.tensor("blk.0.ffn_down.weight").unwrap().ggml_type,
        GgmlType::Q8_0
    );
    let mw = ModelWeights::from_gguf(
        &g,
        &cfg,
        &LoadOptions::default().with_progress(Progress::Bar),
    )
    .unwrap();
    for (role, values) in &weights {
        let t = mw.get(*role).unwrap_or_else(|| panic!("{role} present"));
        assert_eq!(t.shape(), role.expected_shape(&cfg).as_slice(), "{role}");
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(t.as_f32().unwrap(), values.as_slice(), "{role}");
    }
    assert!(mw.is_tied());
    assert_eq!(mw.lm_head(), mw.embed_tokens());
    assert_eq!(mw.iter().count(), weights.len());
    assert_eq!(mw.layers().len(), 2);
    assert_eq!(
        mw.get_by_name("model.layers.1.self_attn.k_proj.weight"),
        Some(&mw.layers()[1].k_proj)
    );
    assert_eq!(
        mw.total_bytes(),
        weights.iter().map(|(_, v)| v.len() * 4).sum::<usize>()
    );

    // The same weights as bf16 (all values are exact in bf16).
    let bf =
        ModelWeights::from_gguf(&g, &cfg, &LoadOptions::default().with_dtype(DType::BF16)).unwrap();
    assert_eq!(bf.layers()[0].q_proj.dtype(), DType::BF16);
    assert_eq!(
        bf.layers()[0].q_proj.to_f32_vec(),
        mw.layers()[0].q_proj.to_f32_vec()
    );
    assert_eq!(bf.clone().into_dtype(DType::F32).unwrap(), mw);
    let err = ModelWeights::from_gguf(&g, &cfg, &LoadOptions::default().with_dtype(DType::Int4))
        .unwrap_err();
    assert!(matches!(err, ModelError::UnsupportedDType { .. }), "{err}");
}

#[test]
fn loaded_model_from_gguf_has_tokenizer_and_template() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let mut w = tiny_gguf(&cfg, &tiny_weights(&cfg));
    tokenizer_metadata(&mut w, "smollm");
    let path = dir.path().join("tiny.gguf");
    w.write_to(&path).unwrap();
    let m = LoadedModel::from_gguf(&path, &LoadOptions::default()).unwrap();
    assert_eq!(m.config, cfg);
    assert_eq!(m.tokenizer.token_to_id("the"), Some(260));
    assert!(m.chat_template.is_some());
}

#[test]
fn untied_head_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let mut w = tiny_gguf(&cfg, &tiny_weights(&cfg));
    w.tensor(WriterTensor::f32(
        "output.weight",
        &[40, 32],
        &vec![0.25; 40 * 32],
    ));
    let path = dir.path().join("untied.gguf");
    w.write_to(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let cfg = LlamaConfig::from_gguf(&g).unwrap();
    let mw = ModelWeights::from_gguf(&g, &cfg, &LoadOptions::default()).unwrap();
    assert!(!mw.is_tied());
    assert_eq!(mw.lm_head().as_f32().unwrap()[0], 0.25);
    assert_eq!(
        mw.get(TensorRole::LmHead).map(|t| t.shape().to_vec()),
        Some(vec![40, 32])
    );
}

/// Writes a tiny model with the tensor list edited by `edit`, and imports it.
fn import_edited(edit: impl FnOnce(&mut Vec<(TensorRole, Vec<f32>)>)) -> (ModelError, String) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let mut weights = tiny_weights(&cfg);
    edit(&mut weights);
    let path = dir.path().join("edited.gguf");
    tiny_gguf(&cfg, &weights).write_to(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let err = ModelWeights::from_gguf(&g, &cfg, &LoadOptions::default()).unwrap_err();
    let msg = err.to_string();
    (err, msg)
}

#[test]
fn missing_tensor_is_named() {
    let up = TensorRole::Layer {
        layer: 1,
        tensor: LayerTensor::Up,
    };
    let (err, msg) = import_edited(|w| w.retain(|(r, _)| *r != up));
    assert!(
        matches!(&err, ModelError::MissingTensor { name, .. } if name == "model.layers.1.mlp.up_proj.weight"),
        "{msg}"
    );
    assert!(msg.contains("edited.gguf"), "{msg}");
}

/// The tiny model as GGUF, with tensor `name` replaced by `replacement`; returns the import
/// error.
fn import_with_replaced(name: &str, replacement: WriterTensor) -> ModelError {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let src = dir.path().join("src.gguf");
    tiny_gguf(&cfg, &tiny_weights(&cfg)).write_to(&src).unwrap();
    let g = GgufFile::open(&src).unwrap();
    let mut w = GgufWriter::new();
    for (k, v) in g.metadata().iter() {
        w.metadata(k, v.clone());
    }
    let mut replacement = Some(replacement);
    for t in g.tensors() {
        if t.name == name {
            w.tensor(replacement.take().unwrap());
        } else {
            w.tensor(WriterTensor::raw(
                &t.name,
                &t.shape(),
                t.ggml_type,
                g.tensor_bytes(t).to_vec(),
            ));
        }
    }
    assert!(replacement.is_none(), "{name} is in the tiny model");
    let path = dir.path().join("edited.gguf");
    w.write_to(&path).unwrap();
    ModelWeights::from_gguf(
        &GgufFile::open(&path).unwrap(),
        &cfg,
        &LoadOptions::default(),
    )
    .unwrap_err()
}

#[test]
fn shape_mismatch_is_named() {
    let err = import_with_replaced(
        "blk.0.attn_v.weight",
        WriterTensor::f32("blk.0.attn_v.weight", &[32, 32], &[0.0; 32 * 32]),
    );
    match &err {
        ModelError::ShapeMismatch {
            name,
            expected,
            got,
        } => {
            assert_eq!(name, "model.layers.0.self_attn.v_proj.weight");
            assert_eq!(
                (expected.clone(), got.clone()),
                (vec![16, 32], vec![32, 32])
            );
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
}

#[test]
fn unexpected_and_out_of_range_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    for (name, shape) in [
        ("blk.0.attn_q.bias", vec![32usize]),
        ("blk.2.attn_norm.weight", vec![32]),
    ] {
        let mut w = tiny_gguf(&cfg, &tiny_weights(&cfg));
        w.tensor(WriterTensor::f32(
            name,
            &shape,
            &vec![0.0; shape.iter().product()],
        ));
        let path = dir.path().join("extra.gguf");
        w.write_to(&path).unwrap();
        let err = ModelWeights::from_gguf(
            &GgufFile::open(&path).unwrap(),
            &cfg,
            &LoadOptions::default(),
        )
        .unwrap_err();
        assert!(
            matches!(err, ModelError::UnexpectedTensor { .. }),
            "{name}: {err}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains(if name.contains("bias") {
                name
            } else {
                "model.layers.2"
            }),
            "{msg}"
        );
    }
    let mut w = tiny_gguf(&cfg, &tiny_weights(&cfg));
    w.tensor(WriterTensor::f32("rope_freqs.weight", &[4], &[1.0; 4]));
    let path = dir.path().join("ropefreqs.gguf");
    w.write_to(&path).unwrap();
    let err = ModelWeights::from_gguf(
        &GgufFile::open(&path).unwrap(),
        &cfg,
        &LoadOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(err, ModelError::UnsupportedRopeScaling { .. }),
        "{err}"
    );
}

#[test]
fn undecodable_tensor_type_is_named() {
    // Q5_0: 22 bytes per 32 weights; a valid layout, but no decoder here.
    let name = "blk.1.attn_output.weight";
    let err = import_with_replaced(
        name,
        WriterTensor::raw(name, &[32, 32], GgmlType::Q5_0, vec![0; 32 * 22]),
    );
    assert!(
        matches!(&err, ModelError::UnsupportedGgmlType { tensor, ggml_type } if tensor == name && ggml_type == "Q5_0"),
        "{err}"
    );
}
