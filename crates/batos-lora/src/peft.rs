//! Writing adapters back out in PEFT's format: the canonical safetensors encoding the
//! cold tier stores, and PEFT directories for external engines.

use crate::adapter::{f32_bytes, LoraAdapter, LoraWeights};
use crate::audit::{CONFIG_FILE, WEIGHTS_FILE};
use crate::error::{LoraError, Result};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::path::Path;

/// The PEFT key of one half of a pair: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`.
pub fn peft_key(layer: usize, proj: crate::Projection, half: crate::PairHalf) -> String {
    format!("base_model.model.{}.{half}.weight", proj.module_path(layer))
}

/// Encodes every pair as f32 safetensors under PEFT's keys (sorted, so the bytes are
/// a function of the weights alone).
pub fn to_safetensors(weights: &LoraWeights) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(weights.len() * 2);
    for (layer, proj, pair) in weights.iter() {
        let (n_out, n_in) = (pair.b.len() / pair.rank, pair.a.len() / pair.rank);
        for (half, data, shape) in [
            (crate::PairHalf::A, &pair.a, vec![pair.rank, n_in]),
            (crate::PairHalf::B, &pair.b, vec![n_out, pair.rank]),
        ] {
            let view = TensorView::new(Dtype::F32, shape, f32_bytes(data)).map_err(|e| {
                LoraError::InvalidConfig {
                    what: "adapter weights",
                    reason: e.to_string(),
                }
            })?;
            views.push((peft_key(layer, proj, half), view));
        }
    }
    safetensors::serialize(views, None).map_err(|e| LoraError::InvalidConfig {
        what: "adapter weights",
        reason: e.to_string(),
    })
}

/// Writes `adapter` as a PEFT directory (`adapter_config.json` +
/// `adapter_model.safetensors`, f32) into the existing directory `dir`.
pub fn write_peft_dir(adapter: &LoraAdapter, dir: &Path) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| LoraError::Io {
            op: "writing",
            path,
            source,
        }
    };
    let cfg_path = dir.join(CONFIG_FILE);
    let cfg = serde_json::to_vec_pretty(&adapter.config.to_peft_json()).map_err(|e| {
        LoraError::InvalidConfig {
            what: "adapter config",
            reason: e.to_string(),
        }
    })?;
    std::fs::write(&cfg_path, cfg).map_err(io(&cfg_path))?;
    let w_path = dir.join(WEIGHTS_FILE);
    std::fs::write(&w_path, to_safetensors(&adapter.weights)?).map_err(io(&w_path))?;
    Ok(())
}
