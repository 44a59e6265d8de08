//! Owned weight matrices in the dtype the forward pass keeps them in.

use batos_kernels::WeightView;
use half::{bf16, f16};

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

/// A linear layer's weights as the forward pass holds them: dense, or int4 in AutoAWQ's
/// layout (the kernels dequantise on the fly). Activations are f32 either way.
#[derive(Clone, Debug)]
pub(crate) enum Linear {
    Dense(Matrix),
    Int4(Int4Weight),
}

impl Linear {
    /// Bytes the weights occupy.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Linear::Dense(m) => m.size_in_bytes(),
            Linear::Int4(w) => w.size_in_bytes(),
        }
    }

    /// A borrowed view for the kernels.
    pub fn view(&self) -> WeightView<'_> {
        match self {
            Linear::Dense(m) => m.view(),
            Linear::Int4(w) => w.view(),
        }
    }
}
