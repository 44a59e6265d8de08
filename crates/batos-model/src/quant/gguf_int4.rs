//! GGUF 4-bit tensors (Q4_0, Q4_1) kept as int4 in AutoAWQ's layout, without
//! requantising.
//!
//! A GGUF row is one output feature and its blocks of 32 run along the inputs, exactly
//! AutoAWQ's groups. Q4_0 is `w = d · (q − 8)`: code `q`, zero point 8, scale `d`.
//! Q4_1 is `w = d · q + m` with a float minimum `m`, which no integer zero point can
//! express: the codes go in with zero point 0 and scale `d`, and `m` becomes the layer's
//! group offset (see [`Int4Weight::with_offsets`]). Either way the dequantised weights are
//! the GGUF dequantisation bit for bit.

use std::path::Path;

use batos_kernels::cpu::int4::pack_word;
use batos_kernels::Int4Layout;
use half::f16;

use super::error::QuantError;
use super::int4::Int4Weight;
use super::model::{QuantizedEmbedding, QuantizedLayer, QuantizedModel, QuantizedWeights};
use crate::gguf::{GgmlType, GgufFile};
use crate::weights::{unpermute_rope_rows, LayerTensor, LoadOptions, Progress, TensorRole};
use crate::LoadedModel;

/// The GGUF block length, which becomes the int4 group size.
pub const GGUF_Q4_GROUP: usize = 32;

/// Converts one GGUF Q4_0 / Q4_1 tensor of `rows` outputs by `cols` inputs (its raw
/// block bytes, row after row) into an [`Int4Weight`] with group size 32. `row_order`,
/// when given, says which GGUF row each output row is (`row_order[n]` = source row of
/// output `n`), for the Q/K row permutation GGUF applies.
///
/// Errors: [`QuantError::GgufInt4`] for another block type, `cols` not a multiple of 32,
/// `rows` not a multiple of 8 (AutoAWQ packs eight outputs to a word), a byte length or a
/// `row_order` that does not fit.
pub fn int4_from_gguf(
    name: &str,
    ty: GgmlType,
    data: &[u8],
    rows: usize,
    cols: usize,
    row_order: Option<&[usize]>,
) -> Result<Int4Weight, QuantError> {
    let bad = |reason: String| QuantError::GgufInt4 {
        name: name.to_owned(),
        ggml_type: ty.to_string(),
        reason,
    };
    let (block_bytes, has_min) =
        match ty {
            GgmlType::Q4_0 => (18, false),
            GgmlType::Q4_1 => (20, true),
            _ => return Err(bad(
                "only Q4_0 and Q4_1 keep their 4-bit codes as int4 (other types need requantising)"
                    .into(),
            )),
        };
    if !cols.is_multiple_of(GGUF_Q4_GROUP) || cols == 0 {
        return Err(bad(format!(
            "{cols} input features is not a positive multiple of the block size {GGUF_Q4_GROUP}"
        )));
    }
    if !rows.is_multiple_of(8) || rows == 0 {
        return Err(bad(format!(
            "{rows} output features is not a positive multiple of 8 (AutoAWQ packs 8 outputs to a word)"
        )));
    }
    let groups = cols / GGUF_Q4_GROUP;
    let row_bytes = groups * block_bytes;
    if data.len() != rows * row_bytes {
        return Err(bad(format!(
            "{} bytes, expected {} for [{rows}, {cols}]",
            data.len(),
            rows * row_bytes
        )));
    }
    if let Some(order) = row_order {
        let mut seen = vec![false; rows];
        let ok = order.len() == rows
            && order
                .iter()
                .all(|&r| r < rows && !std::mem::replace(&mut seen[r], true));
        if !ok {
            return Err(bad(format!(
                "the row order is not a permutation of 0..{rows}"
            )));
        }
    }
    let layout =
        Int4Layout::new(cols, rows, GGUF_Q4_GROUP).map_err(|source| QuantError::BadInt4 {
            name: name.to_owned(),
            source,
        })?;
    let wpr = layout.words_per_row();
    let mut qweight = vec![0u32; layout.qweight_len()];
    let mut scales = vec![f16::ZERO; layout.scales_len()];
    let mut offsets = vec![f16::ZERO; layout.scales_len()];
    // Q4_0's zero point is 8 everywhere, Q4_1's 0.
    let zero = if has_min { 0u8 } else { 8u8 };
    let qzeros = vec![pack_word([zero; 8]); layout.qzeros_len()];
    let mut codes = [[0u8; GGUF_Q4_GROUP]; 8];
    for j in 0..wpr {
        for g in 0..groups {
            for (l, c) in codes.iter_mut().enumerate() {
                let n = 8 * j + l;
                let src = row_order.map_or(n, |o| o[n]);
                let b = &data[src * row_bytes + g * block_bytes..][..block_bytes];
                scales[g * rows + n] = f16::from_le_bytes([b[0], b[1]]);
                let qs = if has_min {
                    offsets[g * rows + n] = f16::from_le_bytes([b[2], b[3]]);
                    &b[4..20]
                } else {
                    &b[2..18]
                };
                // Element i in the low nibble of qs[i], element i + 16 in the high one.
                for (i, &q) in qs.iter().enumerate() {
                    c[i] = q & 0x0F;
                    c[i + 16] = q >> 4;
                }
            }
            for r in 0..GGUF_Q4_GROUP {
                let word: [u8; 8] = std::array::from_fn(|l| codes[l][r]);
                qweight[(g * GGUF_Q4_GROUP + r) * wpr + j] = pack_word(word);
            }
        }
    }
    let w = Int4Weight::from_parts(name, layout, qweight, qzeros, scales)?;
    if has_min {
        w.with_offsets(name, offsets)
    } else {
        Ok(w)
    }
}

/// An int4 model read from a GGUF whose projections are Q4_0 / Q4_1, and which block
/// types it kept.
#[derive(Clone, Debug)]
pub struct GgufInt4Model {
    /// The model: int4 projections (group 32, Q4_1 minima as group offsets), the
    /// embedding, norms and any untied head dense f32 (their GGUF dequantisation, so the
    /// int4 model differs from the dequantised f32 one in the projections' arithmetic
    /// only).
    pub model: QuantizedModel,
    /// The projections' block types, each once, in first-seen order.
    pub kept_types: Vec<GgmlType>,
}

/// Output row `n` of the HF layout is GGUF row `order[n]` (see [`unpermute_rope_rows`]).
fn rope_row_order(rows: usize, n_heads: usize, head_dim: usize) -> Vec<usize> {
    // Row indices stay exact in f32 (far below 2^24), so permute them as 1-wide rows.
    let mut idx: Vec<f32> = (0..rows).map(|r| r as f32).collect();
    unpermute_rope_rows(&mut idx, n_heads, head_dim, 1);
    idx.into_iter().map(|v| v as usize).collect()
}

impl QuantizedModel {
    /// Reads a llama.cpp GGUF whose seven projections per block are Q4_0 or Q4_1 and
    /// keeps their 4-bit codes as int4 (see `src/quant/gguf_int4.rs`): no requantising,
    /// so the weights are exactly the GGUF's. Config, tokenizer, chat template, norms and
    /// the embedding come from [`LoadedModel::from_gguf`] in f32.
    ///
    /// Errors: a projection in another block type, or a shape int4 cannot hold, is
    /// [`QuantError::GgufInt4`]; reading the file is [`QuantError::Model`].
    pub fn from_gguf_int4(
        path: impl AsRef<Path>,
        progress: Progress,
    ) -> Result<GgufInt4Model, QuantError> {
        let path = path.as_ref();
        let started = std::time::Instant::now();
        let loaded = LoadedModel::from_gguf(path, &LoadOptions::default().with_progress(progress))?;
        let gguf = GgufFile::open(path)?;
        let cfg = &loaded.config;
        let mut kept_types = Vec::new();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for (layer, dense) in loaded.weights.layers().iter().enumerate() {
            let mut lin = |t: LayerTensor| -> Result<Int4Weight, QuantError> {
                let role = TensorRole::Layer { layer, tensor: t };
                let name = role.gguf_name();
                let info = gguf
                    .tensor(&name)
                    .ok_or_else(|| QuantError::MissingTensor {
                        path: path.to_path_buf(),
                        name: name.clone(),
                    })?;
                let shape = role.expected_shape(cfg);
                let (rows, cols) = (shape[0], shape[1]);
                let order = match t {
                    LayerTensor::Q => {
                        Some(rope_row_order(rows, cfg.num_attention_heads, cfg.head_dim))
                    }
                    LayerTensor::K => {
                        Some(rope_row_order(rows, cfg.num_key_value_heads, cfg.head_dim))
                    }
                    _ => None,
                };
                let w = int4_from_gguf(
                    &role.hf_name(),
                    info.ggml_type,
                    gguf.tensor_bytes(info),
                    rows,
                    cols,
                    order.as_deref(),
                )?;
                if !kept_types.contains(&info.ggml_type) {
                    kept_types.push(info.ggml_type);
                }
                Ok(w)
            };
            layers.push(QuantizedLayer {
                attn_norm: dense.get(LayerTensor::AttnNorm).to_f32_vec(),
                q_proj: lin(LayerTensor::Q)?,
                k_proj: lin(LayerTensor::K)?,
                v_proj: lin(LayerTensor::V)?,
                o_proj: lin(LayerTensor::O)?,
                mlp_norm: dense.get(LayerTensor::MlpNorm).to_f32_vec(),
                gate_proj: lin(LayerTensor::Gate)?,
                up_proj: lin(LayerTensor::Up)?,
                down_proj: lin(LayerTensor::Down)?,
            });
        }
        let weights = QuantizedWeights {
            embed_tokens: QuantizedEmbedding::Dense(loaded.weights.embed_tokens().clone()),
            layers,
            norm: loaded.weights.norm().clone(),
            lm_head: (!loaded.weights.is_tied()).then(|| loaded.weights.lm_head().clone()),
            group_size: GGUF_Q4_GROUP,
        };
        weights.validate(cfg)?;
        tracing::info!(path = %path.display(), ?kept_types, secs = started.elapsed().as_secs_f32(), "GGUF 4-bit projections kept as int4");
        Ok(GgufInt4Model {
            model: QuantizedModel {
                config: loaded.config,
                weights,
                tokenizer: loaded.tokenizer,
                chat_template: loaded.chat_template,
            },
            kept_types,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::dequantize;

    /// Deterministic pseudo-random bytes for `rows × cols` elements of `ty`, with f16
    /// scales and minima in a realistic range (including negative minima).
    fn blocks(ty: GgmlType, rows: usize, cols: usize, seed: u32) -> Vec<u8> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state
        };
        let n_blocks = rows * cols / GGUF_Q4_GROUP;
        let mut out = Vec::new();
        for _ in 0..n_blocks {
            let d = f16::from_f32((next() % 1000) as f32 * 1e-5 + 1e-4);
            out.extend_from_slice(&d.to_le_bytes());
            if ty == GgmlType::Q4_1 {
                let m = f16::from_f32(-((next() % 1000) as f32) * 1e-4 + 0.01);
                out.extend_from_slice(&m.to_le_bytes());
            }
            out.extend((0..16).map(|_| next() as u8));
        }
        out
    }

    #[test]
    fn converted_weights_equal_the_gguf_dequantisation_bitwise() {
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1] {
            let (rows, cols) = (24, 96);
            let data = blocks(ty, rows, cols, 7);
            let mut want = vec![0f32; rows * cols];
            dequantize(ty, &data, &mut want).unwrap();
            let w = int4_from_gguf("t", ty, &data, rows, cols, None).unwrap();
            assert_eq!(w.offsets().is_some(), ty == GgmlType::Q4_1);
            assert_eq!(w.has_nonzero_offsets(), ty == GgmlType::Q4_1);
            let got = w.dequantize();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "{ty}");

            // A row order picks source rows for each output.
            let order: Vec<usize> = (0..rows).rev().collect();
            let p = int4_from_gguf("t", ty, &data, rows, cols, Some(&order)).unwrap();
            let got = p.dequantize();
            for n in 0..rows {
                let src = order[n];
                assert_eq!(
                    bits(&got[n * cols..(n + 1) * cols]),
                    bits(&want[src * cols..(src + 1) * cols])
                );
            }
        }
    }

    #[test]
    fn bad_shapes_and_types_are_typed_errors() {
        let ty = GgmlType::Q4_1;
        // 12 outputs: not a multiple of 8.
        let data = blocks(ty, 12, 64, 1);
        let e = int4_from_gguf("t", ty, &data, 12, 64, None).unwrap_err();
        assert!(
            matches!(&e, QuantError::GgufInt4 { reason, .. } if reason.contains("multiple of 8")),
            "{e}"
        );
        // 48 inputs: not a multiple of 32 (the bytes would be 1.5 blocks a row).
        let e = int4_from_gguf("t", ty, &[0u8; 8 * 30], 8, 48, None).unwrap_err();
        assert!(
            matches!(&e, QuantError::GgufInt4 { reason, .. } if reason.contains("block size")),
            "{e}"
        );
        let data = blocks(ty, 8, 64, 2);
        let e = int4_from_gguf("t", ty, &data[1..], 8, 64, None).unwrap_err();
        assert!(matches!(e, QuantError::GgufInt4 { .. }), "{e}");
        let e = int4_from_gguf("t", GgmlType::Q8_0, &data, 8, 64, None).unwrap_err();
        assert!(matches!(e, QuantError::GgufInt4 { .. }), "{e}");
        let e = int4_from_gguf("t", ty, &data, 8, 64, Some(&[0, 0, 1, 2, 3, 4, 5, 6])).unwrap_err();
        assert!(matches!(e, QuantError::GgufInt4 { .. }), "{e}");
    }
}
