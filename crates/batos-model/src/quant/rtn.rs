//! Round-to-nearest int4: every projection quantised on its own, no calibration. The
//! baseline AWQ is measured against.

use crate::config::LlamaConfig;
use crate::model::LoadedModel;
use crate::weights::{LayerTensor, ModelWeights, TensorRole};

use super::error::QuantError;
use super::int4::Int4Weight;
use super::model::{QuantizedEmbedding, QuantizedLayer, QuantizedModel, QuantizedWeights};

/// Quantises one projection of `weights` (block `layer`, tensor `t`) round to nearest.
pub(crate) fn quantize_linear(
    config: &LlamaConfig,
    layer: usize,
    t: LayerTensor,
    values: &[f32],
    group_size: usize,
    clip: Option<&[f32]>,
) -> Result<Int4Weight, QuantError> {
    let role = TensorRole::Layer { layer, tensor: t };
    let shape = role.expected_shape(config);
    Int4Weight::quantize(
        &role.hf_name(),
        values,
        shape[0],
        shape[1],
        group_size,
        clip,
    )
}

/// Round-to-nearest int4 of every projection, groups of `group_size` inputs; norms,
/// embedding and head are kept as they are.
pub fn quantize_weights_rtn(
    config: &LlamaConfig,
    weights: &ModelWeights,
    group_size: usize,
) -> Result<QuantizedWeights, QuantError> {
    let mut layers = Vec::with_capacity(weights.layers().len());
    for (i, l) in weights.layers().iter().enumerate() {
        let q = |t: LayerTensor| {
            quantize_linear(config, i, t, &l.get(t).to_f32_vec(), group_size, None)
        };
        layers.push(QuantizedLayer {
            attn_norm: l.attn_norm.to_f32_vec(),
            q_proj: q(LayerTensor::Q)?,
            k_proj: q(LayerTensor::K)?,
            v_proj: q(LayerTensor::V)?,
            o_proj: q(LayerTensor::O)?,
            mlp_norm: l.mlp_norm.to_f32_vec(),
            gate_proj: q(LayerTensor::Gate)?,
            up_proj: q(LayerTensor::Up)?,
            down_proj: q(LayerTensor::Down)?,
        });
    }
    let w = QuantizedWeights {
        embed_tokens: QuantizedEmbedding::Dense(weights.embed_tokens().clone()),
        layers,
        norm: weights.norm().clone(),
        lm_head: (!weights.is_tied()).then(|| weights.lm_head().clone()),
        group_size,
    };
    w.validate(config)?;
    Ok(w)
}

/// [`quantize_weights_rtn`] of a loaded model, keeping its tokenizer and template.
pub fn quantize_rtn(model: &LoadedModel, group_size: usize) -> Result<QuantizedModel, QuantError> {
    Ok(QuantizedModel {
        config: model.config.clone(),
        weights: quantize_weights_rtn(&model.config, &model.weights, group_size)?,
        tokenizer: model.tokenizer.clone(),
        chat_template: model.chat_template.clone(),
    })
}
