//! Owned weight matrices in the dtype the forward pass keeps them in.

use batos_kernels::cpu::int4_dot::{self, Int4DotWeight};
use batos_kernels::{KernelError, Kernels, WeightView};
use half::{bf16, f16};
use rayon::prelude::*;

use super::error::ForwardError;
use crate::quant::Int4Weight;

/// The dtype the runtime keeps linear and embedding weights in. All arithmetic is f32;
/// f16/bf16 halve the memory and the bytes each decode step streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum WeightDType {
    /// Exact: what the conformance tests against the f32 reference use.
    #[default]
    F32,
    F16,
    BF16,
}

/// How the CPU runtime multiplies activations by int4 weights.
///
/// - `F32`: f32 activations against codes unpacked to f32 (AutoAWQ's layout kept).
/// - `Int8`: each token's inputs quantised to int8 per weight group (`d = max|x|/127`)
///   and integer dot products against weights repacked at load
///   ([`batos_kernels::cpu::int4_dot`]; the AutoAWQ tensors are dropped), as llama.cpp
///   does for Q4_1. Faster; adds the activations' rounding (measured in
///   `docs/perf/awq.md`). CPU only: the CUDA runtime rejects it with a typed error.
///
/// Either way a token's outputs are bit-identical whatever the batch around it.
///
/// The default is `Int8`, chosen by measurement (docs/perf/awq.md, "int8
/// activations"): on the held-out text it moves perplexity by +0.36 % (AWQ, group 32)
/// and −0.13 % (GGUF Q4_1 kept as int4), while decode and prefill run about twice as
/// fast. Build CUDA-bound models with `F32`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Int4Activations {
    /// f32 activations.
    F32,
    /// int8 activations, integer dot products.
    #[default]
    Int8,
}

#[derive(Clone, Debug)]
enum MatrixData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// A row-major `[rows, cols]` matrix (PyTorch `[out_features, in_features]` for a linear
/// layer) stored in a [`WeightDType`].
#[derive(Clone, Debug)]
pub(crate) struct Matrix {
    data: MatrixData,
    rows: usize,
    cols: usize,
}

impl Matrix {
    /// Converts f32 values to `dtype` (round to nearest even for f16/bf16).
    pub fn from_f32(
        name: &str,
        values: &[f32],
        rows: usize,
        cols: usize,
        dtype: WeightDType,
    ) -> Result<Matrix, ForwardError> {
        if values.len() != rows * cols {
            return Err(ForwardError::WeightShape {
                name: name.to_owned(),
                expected: vec![rows, cols],
                got: values.len(),
            });
        }
        let data = match dtype {
            WeightDType::F32 => MatrixData::F32(values.to_vec()),
            WeightDType::F16 => MatrixData::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            WeightDType::BF16 => {
                MatrixData::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect())
            }
        };
        Ok(Matrix { data, rows, cols })
    }

    /// Stacks f32 matrices with equal column counts on top of each other and converts
    /// the result (fusing the q/k/v or gate/up projections into one matmul).
    pub fn stack_f32(
        name: &str,
        parts: &[(&[f32], usize)],
        cols: usize,
        dtype: WeightDType,
    ) -> Result<Matrix, ForwardError> {
        let rows: usize = parts.iter().map(|p| p.1).sum();
        let mut values = Vec::with_capacity(rows * cols);
        for &(part, part_rows) in parts {
            if part.len() != part_rows * cols {
                return Err(ForwardError::WeightShape {
                    name: name.to_owned(),
                    expected: vec![part_rows, cols],
                    got: part.len(),
                });
            }
            values.extend_from_slice(part);
        }
        Matrix::from_f32(name, &values, rows, cols, dtype)
    }

    /// Bytes the elements occupy.
    pub fn size_in_bytes(&self) -> usize {
        let elem = match self.data {
            MatrixData::F32(_) => 4,
            MatrixData::F16(_) | MatrixData::BF16(_) => 2,
        };
        self.rows * self.cols * elem
    }

    /// A borrowed view for the kernels.
    pub fn view(&self) -> WeightView<'_> {
        let view = match &self.data {
            MatrixData::F32(v) => WeightView::f32(v, self.rows, self.cols),
            MatrixData::F16(v) => WeightView::f16(v, self.rows, self.cols),
            MatrixData::BF16(v) => WeightView::bf16(v, self.rows, self.cols),
        };
        // The length was checked when the matrix was built.
        view.expect("matrix length matches its shape")
    }
}

/// An int4 projection as the forward pass holds it: AutoAWQ's tensors for the kernels,
/// and the group offsets (GGUF Q4_1 minima) widened to f32, `[in/group, out]`.
#[derive(Clone, Debug)]
pub(crate) struct Int4Linear {
    pub(crate) weight: Int4Weight,
    pub(crate) offsets: Option<Vec<f32>>,
}

impl Int4Linear {
    /// Moves `weight`'s group offsets (if any) to the f32 runtime copy.
    pub fn new(mut weight: Int4Weight) -> Int4Linear {
        let offsets = weight
            .take_offsets()
            .map(|o| o.iter().map(|v| v.to_f32()).collect());
        Int4Linear { weight, offsets }
    }

    /// `y[t, n] += Σ_g offset[g, n] · σ_g(x_t)`, `σ_g` the sum of token `t`'s inputs in
    /// group `g`: the float-minimum part of `(q − zero) · scale + offset`. Every sum runs
    /// in a fixed order (σ over the group, then over `g`) per token, so a token's output
    /// does not depend on the batch around it.
    fn add_group_offsets(&self, x: &[f32], y: &mut [f32]) {
        let Some(off) = &self.offsets else { return };
        let lay = self.weight.layout();
        let (k, n, g) = (lay.in_features(), lay.out_features(), lay.group_size());
        y.par_chunks_mut(n).zip(x.par_chunks(k)).for_each_init(
            || vec![0f32; n],
            |acc, (yt, xt)| {
                acc.fill(0.0);
                for (grp, xg) in xt.chunks(g).enumerate() {
                    let sigma = xg.iter().fold(0f32, |a, &v| a + v);
                    for (a, &m) in acc.iter_mut().zip(&off[grp * n..(grp + 1) * n]) {
                        *a += m * sigma;
                    }
                }
                for (yv, a) in yt.iter_mut().zip(acc.iter()) {
                    *yv += a;
                }
            },
        );
    }
}

/// A linear layer's weights as the forward pass holds them: dense, int4 in AutoAWQ's
/// layout (f32 activations; the kernels dequantise on the fly), or int4 repacked for
/// integer dot products against int8 activations ([`Int4Activations::Int8`]).
#[derive(Clone, Debug)]
pub(crate) enum Linear {
    Dense(Matrix),
    Int4(Int4Linear),
    Int4Dot(Int4DotWeight),
}

impl Linear {
    /// Bytes the weights occupy.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Linear::Dense(m) => m.size_in_bytes(),
            Linear::Int4(w) => {
                w.weight.size_in_bytes() + w.offsets.as_ref().map_or(0, |o| 4 * o.len())
            }
            Linear::Int4Dot(w) => w.size_in_bytes(),
        }
    }

    /// An int4 layer for `activations`: AutoAWQ's tensors (group offsets, if any, kept
    /// as f32) for f32 activations, or repacked for int8 ones (the AutoAWQ tensors are
    /// dropped; the offsets fold into the per-group minima).
    pub fn int4(w: Int4Weight, activations: Int4Activations) -> Result<Linear, ForwardError> {
        match activations {
            Int4Activations::F32 => Ok(Linear::Int4(Int4Linear::new(w))),
            Int4Activations::Int8 => Int4DotWeight::from_int4(&w.data(), w.offsets())
                .map(Linear::Int4Dot)
                .map_err(|source| ForwardError::Kernel {
                    op: "repack int4 weights for int8 activations",
                    source,
                }),
        }
    }

    /// `y[T, out] = x[T, in] · Wᵀ` (plus the group offsets of an int4 layer in AutoAWQ's
    /// layout). Dense and AutoAWQ layers go through `kern`; repacked layers run the
    /// CPU integer-dot kernels.
    pub fn matmul(&self, kern: &dyn Kernels, x: &[f32], y: &mut [f32]) -> Result<(), KernelError> {
        match self {
            Linear::Dense(m) => kern.matmul(x, &m.view(), y),
            Linear::Int4(w) => {
                kern.matmul(x, &w.weight.view(), y)?;
                w.add_group_offsets(x, y);
                Ok(())
            }
            Linear::Int4Dot(w) => int4_dot::matmul(x, w, y),
        }
    }

    /// Rows `ids` of the layer as an embedding table, into `out [ids.len(), in]`.
    pub fn embedding(
        &self,
        kern: &dyn Kernels,
        ids: &[u32],
        out: &mut [f32],
    ) -> Result<(), KernelError> {
        match self {
            Linear::Dense(m) => kern.embedding(&m.view(), ids, out),
            Linear::Int4(w) => kern.embedding(&w.weight.view(), ids, out),
            Linear::Int4Dot(w) => int4_dot::embedding(w, ids, out),
        }
    }
}
