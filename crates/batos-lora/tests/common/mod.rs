//! Builders for synthetic PEFT adapters written into temp dirs.

#![allow(dead_code)]

use batos_lora::{BaseShapes, Projection};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// A tiny Llama geometry: 2 layers, hidden 8, MLP 12, q 8, kv 4.
pub fn tiny_base() -> BaseShapes {
    BaseShapes {
        model_name: "tiny-llama".into(),
        num_layers: 2,
        hidden: 8,
        intermediate: 12,
        q_dim: 8,
        kv_dim: 4,
    }
}

/// The shipped reference adapter directory.
pub fn reference_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../../shared/reference/adapters")
        .join(name)
}

/// One tensor: key, dtype, shape, values (encoded to the dtype when written).
pub struct T {
    pub key: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

/// A PEFT adapter under construction.
pub struct Synth {
    pub config: Value,
    pub tensors: Vec<T>,
    /// Textual replacements applied to the serialised config (for key order, which
    /// `serde_json::Value` does not keep).
    pub raw_replace: Vec<(String, String)>,
}

pub fn key(layer: usize, p: Projection, half: &str) -> String {
    format!("base_model.model.{}.{half}.weight", p.module_path(layer))
}

/// Deterministic values: a small hash of (seed, i) mapped to [-0.05, 0.05).
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    (0..n as u64)
        .map(|i| {
            let mut z =
                seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z ^= z >> 31;
            z = z.wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

impl Synth {
    /// A well-formed adapter for `base`: rank `r` on every projection of every layer.
    pub fn good(base: &BaseShapes, r: usize, seed: u64) -> Self {
        let config = json!({
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": 2 * r,
            "use_rslora": false,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "rank_pattern": {},
            "alpha_pattern": {},
            "modules_to_save": null,
            "use_dora": false,
            "bias": "none",
            "fan_in_fan_out": false,
            "base_model_name_or_path": format!("org/{}", base.model_name),
        });
        let mut tensors = Vec::new();
        let mut s = seed;
        for layer in 0..base.num_layers {
            for p in Projection::ALL {
                let (i, o) = base.dims(p);
                s += 1;
                tensors.push(T {
                    key: key(layer, p, "lora_A"),
                    dtype: Dtype::F32,
                    shape: vec![r, i],
                    values: values(s, r * i),
                });
                s += 1;
                tensors.push(T {
                    key: key(layer, p, "lora_B"),
                    dtype: Dtype::F32,
                    shape: vec![o, r],
                    values: values(s, o * r),
                });
            }
        }
        Synth {
            config,
            tensors,
            raw_replace: Vec::new(),
        }
    }

    pub fn tensor_mut(&mut self, key: &str) -> &mut T {
        self.tensors
            .iter_mut()
            .find(|t| t.key == key)
            .expect("test tensor exists")
    }

    pub fn remove(&mut self, key: &str) {
        self.tensors.retain(|t| t.key != key);
    }

    pub fn safetensors_bytes(&self) -> Vec<u8> {
        let encoded: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = self
            .tensors
            .iter()
            .map(|t| {
                let bytes: Vec<u8> = match t.dtype {
                    Dtype::F32 => t.values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    Dtype::F16 => t
                        .values
                        .iter()
                        .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                        .collect(),
                    Dtype::BF16 => t
                        .values
                        .iter()
                        .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                        .collect(),
                    Dtype::F64 => t
                        .values
                        .iter()
                        .flat_map(|v| (*v as f64).to_le_bytes())
                        .collect(),
                    other => panic!("test encoder has no {other:?}"),
                };
                (t.key.clone(), t.dtype, t.shape.clone(), bytes)
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = encoded
            .iter()
            .map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    pub fn config_bytes(&self) -> Vec<u8> {
        let mut text = serde_json::to_string_pretty(&self.config).unwrap();
        for (from, to) in &self.raw_replace {
            text = text.replace(from, to);
        }
        text.into_bytes()
    }

    pub fn write(&self, dir: &Path) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("adapter_config.json"), self.config_bytes()).unwrap();
        std::fs::write(
            dir.join("adapter_model.safetensors"),
            self.safetensors_bytes(),
        )
        .unwrap();
    }

    /// Writes into a fresh temp dir and returns it (kept alive by the caller).
    pub fn temp(&self) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        self.write(d.path());
        d
    }
}
