//! Owned weight tensors in the storage types batos computes with.

use batos_types::DType;
use half::{bf16, f16, slice::HalfFloatSliceExt, vec::HalfFloatVecExt};

use crate::error::{ModelError, Result};

/// The elements of a [`Tensor`], row-major.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum TensorData {
    /// 32-bit floats.
    F32(Vec<f32>),
    /// IEEE halves.
    F16(Vec<f16>),
    /// bfloat16s.
    BF16(Vec<bf16>),
}

impl TensorData {
    fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F16(v) => v.len(),
            TensorData::BF16(v) => v.len(),
        }
    }
}

/// A dense row-major tensor with an owned buffer. Linear weights use the HF/PyTorch
/// convention `[out_features, in_features]`; embeddings are `[vocab, hidden]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
}

impl Tensor {
    /// Wraps `data` as a tensor of `shape`; the element count must match.
    pub fn new(shape: Vec<usize>, data: TensorData) -> Result<Self> {
        let expected = shape.iter().product::<usize>();
        if data.len() != expected {
            return Err(ModelError::TensorDataLength {
                name: format!("<tensor of shape {shape:?}>"),
                expected,
                got: data.len(),
            });
        }
        Ok(Tensor { shape, data })
    }

    /// An f32 tensor.
    pub fn from_f32(shape: Vec<usize>, values: Vec<f32>) -> Result<Self> {
        Self::new(shape, TensorData::F32(values))
    }

    /// Rebuilds a tensor from little-endian bytes as produced by [`Tensor::as_bytes`]
    /// (e.g. a blob read back from the living image). `bytes` need not be aligned.
    pub fn from_le_bytes(shape: Vec<usize>, dtype: DType, bytes: &[u8]) -> Result<Self> {
        let n = shape.iter().product::<usize>();
        let elem = dtype
            .size_in_bytes()
            .ok_or_else(|| ModelError::UnsupportedDType {
                name: format!("<tensor of shape {shape:?}>"),
                dtype: dtype.to_string(),
            })?;
        if bytes.len() != n * elem {
            return Err(ModelError::TensorDataLength {
                name: format!("<{dtype} tensor of shape {shape:?}>"),
                expected: n * elem,
                got: bytes.len(),
            });
        }
        let data = match dtype {
            DType::F32 => TensorData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            DType::F16 => TensorData::F16(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
            DType::BF16 => TensorData::BF16(
                bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
            other => {
                return Err(ModelError::UnsupportedDType {
                    name: format!("<tensor of shape {shape:?}>"),
                    dtype: other.to_string(),
                })
            }
        };
        Self::new(shape, data)
    }

    /// The shape, row-major.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.len() == 0
    }

    /// The storage type.
    pub fn dtype(&self) -> DType {
        match self.data {
            TensorData::F32(_) => DType::F32,
            TensorData::F16(_) => DType::F16,
            TensorData::BF16(_) => DType::BF16,
        }
    }

    /// The elements.
    pub fn data(&self) -> &TensorData {
        &self.data
    }

    /// The elements if stored as f32.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            TensorData::F32(v) => Some(v),
            _ => None,
        }
    }

    /// The elements if stored as f16.
    pub fn as_f16(&self) -> Option<&[f16]> {
        match &self.data {
            TensorData::F16(v) => Some(v),
            _ => None,
        }
    }

    /// The elements if stored as bf16.
    pub fn as_bf16(&self) -> Option<&[bf16]> {
        match &self.data {
            TensorData::BF16(v) => Some(v),
            _ => None,
        }
    }

    /// The raw bytes of the elements in native order, which is little-endian on every target
    /// batos builds for (x86-64, aarch64): the format [`Tensor::from_le_bytes`] reads back.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.data {
            TensorData::F32(v) => bytemuck::cast_slice(v),
            TensorData::F16(v) => bytemuck::cast_slice(v),
            TensorData::BF16(v) => bytemuck::cast_slice(v),
        }
    }

    /// The elements converted to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        match &self.data {
            TensorData::F32(v) => v.clone(),
            TensorData::F16(v) => v.to_f32_vec(),
            TensorData::BF16(v) => v.to_f32_vec(),
        }
    }

    /// Converts to `dtype` (round-to-nearest-even when narrowing).
    pub fn to_dtype(self, dtype: DType) -> Result<Tensor> {
        if self.dtype() == dtype {
            return Ok(self);
        }
        let f = match &self.data {
            TensorData::F32(v) => std::borrow::Cow::Borrowed(v.as_slice()),
            _ => std::borrow::Cow::Owned(self.to_f32_vec()),
        };
        let data = match dtype {
            DType::F32 => TensorData::F32(f.into_owned()),
            DType::F16 => TensorData::F16(Vec::<f16>::from_f32_slice(&f)),
            DType::BF16 => TensorData::BF16(Vec::<bf16>::from_f32_slice(&f)),
            other => {
                return Err(ModelError::UnsupportedDType {
                    name: format!("<tensor of shape {:?}>", self.shape),
                    dtype: other.to_string(),
                })
            }
        };
        Ok(Tensor {
            shape: self.shape,
            data,
        })
    }
}
