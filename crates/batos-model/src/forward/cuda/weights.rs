//! The model's weights on the device: dense matrices as f16, int4 layers in AutoAWQ's
//! layout through `ops::awq`, norms as f32.

use batos_kernels::cuda::ops::awq::{self, AwqShape, AwqWeights};
use batos_kernels::cuda::ops::dense::{self, DenseWeights};
use batos_kernels::cuda::{CudaDevice, CudaResult, DeviceBuffer};
use batos_kernels::WeightData;
use half::f16;

use super::{cuda_err, Act};
use crate::forward::error::ForwardError;
use crate::forward::llama::{LlamaLayer, ModelParts};
use crate::forward::weights::{Linear, Matrix};

/// One linear layer on the device.
#[derive(Debug)]
pub(super) enum DeviceLinear {
    Dense(DenseWeights),
    Awq(AwqWeights),
}

/// Bytes a matrix takes on the device (always f16).
fn matrix_bytes(m: &Matrix) -> u64 {
    let v = m.view();
    (v.rows() * v.cols() * 2) as u64
}

/// Bytes a linear layer takes on the device.
fn linear_bytes(l: &Linear) -> u64 {
    match l {
        Linear::Dense(m) => matrix_bytes(m),
        Linear::Int4(w) => w.weight.size_in_bytes() as u64,
        Linear::Int4Dot(w) => w.size_in_bytes() as u64,
    }
}

/// Device bytes of every tensor [`DeviceWeights::upload`] uploads (what is reserved
/// from the budget before the first byte moves).
pub(super) fn device_bytes(parts: &ModelParts<'_>) -> u64 {
    let hid = parts.final_norm.len() as u64;
    let layers: u64 = parts
        .layers
        .iter()
        .map(|l| {
            linear_bytes(&l.qkv)
                + linear_bytes(&l.o_proj)
                + linear_bytes(&l.gate_up)
                + linear_bytes(&l.down)
                + 2 * hid * 4
        })
        .sum();
    matrix_bytes(parts.embed) + parts.lm_head.map_or(0, matrix_bytes) + layers + hid * 4
}

fn upload_matrix(dev: &CudaDevice, name: &str, m: &Matrix) -> Result<DenseWeights, ForwardError> {
    let v = m.view();
    let (rows, cols) = (v.rows(), v.cols());
    let host: Vec<f16> = match v.data() {
        WeightData::F16(x) => x.to_vec(),
        WeightData::F32(x) => x.iter().map(|&a| f16::from_f32(a)).collect(),
        WeightData::BF16(x) => x.iter().map(|&a| f16::from_f32(a.to_f32())).collect(),
        // A `Matrix` is never int4 (nor any later kind); say so rather than guess.
        _ => {
            return Err(ForwardError::WeightShape {
                name: name.to_owned(),
                expected: vec![rows, cols],
                got: 0,
            })
        }
    };
    DenseWeights::upload(dev, rows, cols, &host).map_err(cuda_err("upload dense weights"))
}

impl DeviceLinear {
    fn upload(dev: &CudaDevice, name: &str, l: &Linear) -> Result<Self, ForwardError> {
        match l {
            Linear::Dense(m) => Ok(DeviceLinear::Dense(upload_matrix(dev, name, m)?)),
            Linear::Int4Dot(_) => Err(ForwardError::BadConfig {
                reason: format!(
                    "{name} is repacked for int8 activations (a CPU-only layout); build the \
                     model with `Int4Activations::F32` for the CUDA runtime"
                ),
            }),
            Linear::Int4(l) if l.offsets.is_some() => Err(ForwardError::BadConfig {
                reason: format!(
                    "{name} has int4 group offsets (GGUF Q4_1 minima kept as int4); the CUDA \
                     runtime has no offset term: run it on the CPU, or import the GGUF dense"
                ),
            }),
            Linear::Int4(l) => {
                let w = &l.weight;
                let layout = w.layout();
                let shape = AwqShape {
                    in_features: layout.in_features(),
                    out_features: layout.out_features(),
                    group_size: layout.group_size(),
                };
                AwqWeights::upload(dev, shape, w.qweight(), w.qzeros(), w.scales())
                    .map(DeviceLinear::Awq)
                    .map_err(cuda_err("upload int4 weights"))
            }
        }
    }

    /// Bytes one pass over the layer reads.
    pub(super) fn weight_bytes(&self) -> usize {
        match self {
            DeviceLinear::Dense(w) => w.weight_bytes(),
            DeviceLinear::Awq(w) => w.weight_bytes(),
        }
    }

    /// `y[tokens, out] = x[tokens, in] · Wᵀ`.
    pub(super) fn run(
        &self,
        dev: &CudaDevice,
        x: &DeviceBuffer<Act>,
        tokens: usize,
        y: &mut DeviceBuffer<Act>,
    ) -> CudaResult<()> {
        match self {
            DeviceLinear::Dense(w) => dense::dense_matmul(dev, w, x, tokens, y),
            DeviceLinear::Awq(w) => awq::awq_linear(dev, w, x, tokens, y),
        }
    }
}

/// One decoder layer on the device (q/k/v and gate/up stay fused as on the host).
#[derive(Debug)]
pub(super) struct DeviceLayer {
    pub attn_norm: DeviceBuffer<Act>,
    pub qkv: DeviceLinear,
    pub o_proj: DeviceLinear,
    pub mlp_norm: DeviceBuffer<Act>,
    pub gate_up: DeviceLinear,
    pub down: DeviceLinear,
}

/// Every weight of the model on the device.
#[derive(Debug)]
pub(super) struct DeviceWeights {
    pub embed: DenseWeights,
    pub layers: Vec<DeviceLayer>,
    pub final_norm: DeviceBuffer<Act>,
    /// `None` when the output projection is tied to the embedding.
    pub lm_head: Option<DenseWeights>,
}

impl DeviceWeights {
    /// Uploads every tensor of `parts` once.
    pub(super) fn upload(dev: &CudaDevice, parts: &ModelParts<'_>) -> Result<Self, ForwardError> {
        let norm = |v: &[f32]| dev.upload(v).map_err(cuda_err("upload norm"));
        let layer = |i: usize, l: &LlamaLayer| -> Result<DeviceLayer, ForwardError> {
            let name = |what: &str| format!("model.layers.{i}.{what}");
            Ok(DeviceLayer {
                attn_norm: norm(&l.attn_norm)?,
                qkv: DeviceLinear::upload(dev, &name("self_attn.qkv_proj"), &l.qkv)?,
                o_proj: DeviceLinear::upload(dev, &name("self_attn.o_proj"), &l.o_proj)?,
                mlp_norm: norm(&l.mlp_norm)?,
                gate_up: DeviceLinear::upload(dev, &name("mlp.gate_up_proj"), &l.gate_up)?,
                down: DeviceLinear::upload(dev, &name("mlp.down_proj"), &l.down)?,
            })
        };
        let layers = parts
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| layer(i, l))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(DeviceWeights {
            embed: upload_matrix(dev, "model.embed_tokens", parts.embed)?,
            layers,
            final_norm: norm(parts.final_norm)?,
            lm_head: parts
                .lm_head
                .map(|m| upload_matrix(dev, "lm_head", m))
                .transpose()?,
        })
    }

    /// The output projection (the embedding when tied).
    pub(super) fn head(&self) -> &DenseWeights {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Bytes one decode step reads from the weights (every layer and the head; the
    /// embedding gather reads only a few rows).
    pub(super) fn bytes_per_step(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.qkv.weight_bytes()
                    + l.o_proj.weight_bytes()
                    + l.gate_up.weight_bytes()
                    + l.down.weight_bytes()
            })
            .sum();
        layers + self.head().weight_bytes()
    }
}
