//! Borrowed views of weight matrices in their storage dtype.

use crate::cpu::int4::Int4Data;
use crate::error::{KernelError, Result};
use batos_types::DType;
use half::{bf16, f16};

/// The elements of a weight matrix, borrowed in their storage dtype.
#[derive(Clone, Copy, Debug)]
#[non_exhaustive]
pub enum WeightData<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
    /// int4 in AutoAWQ's GEMM layout (see [`crate::cpu::int4`]); its length is the
    /// number of weights it stands for, `in_features · out_features`.
    Int4(Int4Data<'a>),
}

impl WeightData<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            WeightData::F32(s) => s.len(),
            WeightData::F16(s) => s.len(),
            WeightData::BF16(s) => s.len(),
            WeightData::Int4(d) => d.layout().in_features() * d.layout().out_features(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        match self {
            WeightData::F32(_) => DType::F32,
            WeightData::F16(_) => DType::F16,
            WeightData::BF16(_) => DType::BF16,
            WeightData::Int4(_) => DType::Int4,
        }
    }
}

/// A row-major `[rows, cols]` matrix borrowed in its storage dtype, with its shape
/// checked at construction.
///
/// For a linear layer, rows = `out_features` and cols = `in_features` (PyTorch layout;
/// `y = x · Wᵀ`). For an embedding table, rows = vocabulary size and cols = hidden size.
///
/// ```
/// use batos_kernels::WeightView;
/// let w = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
/// let view = WeightView::f32(&w, 2, 3).unwrap();
/// assert_eq!((view.rows(), view.cols()), (2, 3));
/// assert!(WeightView::f32(&w, 4, 2).is_err());
/// ```
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    data: WeightData<'a>,
    rows: usize,
    cols: usize,
}

impl<'a> WeightView<'a> {
    /// Wraps `data` as a `[rows, cols]` matrix; its length must be `rows * cols`.
    pub fn new(data: WeightData<'a>, rows: usize, cols: usize) -> Result<Self> {
        let expected = rows
            .checked_mul(cols)
            .ok_or_else(|| KernelError::InvalidShape {
                op: "WeightView::new",
                what: "shape",
                reason: format!("{rows} x {cols} overflows usize"),
            })?;
        if data.len() != expected {
            return Err(KernelError::LengthMismatch {
                op: "WeightView::new",
                what: "weight data",
                expected,
                got: data.len(),
            });
        }
        Ok(WeightView { data, rows, cols })
    }

    /// An f32 matrix.
    pub fn f32(data: &'a [f32], rows: usize, cols: usize) -> Result<Self> {
        Self::new(WeightData::F32(data), rows, cols)
    }

    /// An f16 matrix.
    pub fn f16(data: &'a [f16], rows: usize, cols: usize) -> Result<Self> {
        Self::new(WeightData::F16(data), rows, cols)
    }

    /// A bf16 matrix.
    pub fn bf16(data: &'a [bf16], rows: usize, cols: usize) -> Result<Self> {
        Self::new(WeightData::BF16(data), rows, cols)
    }

    /// An int4 linear layer: `[out_features, in_features]` like every linear weight,
    /// whatever the packed storage order.
    pub fn int4(data: Int4Data<'a>) -> Self {
        let layout = data.layout();
        WeightView {
            data: WeightData::Int4(data),
            rows: layout.out_features(),
            cols: layout.in_features(),
        }
    }

    /// Number of rows (`out_features` of a linear layer).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of columns (`in_features` of a linear layer).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The borrowed elements.
    pub fn data(&self) -> WeightData<'a> {
        self.data
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }

    /// Rows `start..end` as a view of their own (used to split work across threads).
    ///
    /// Returns `None` when the range is empty-reversed or out of bounds, and for int4
    /// weights unless it is the whole matrix (their rows are interleaved in storage).
    pub fn row_range(&self, start: usize, end: usize) -> Option<WeightView<'a>> {
        if start > end || end > self.rows {
            return None;
        }
        let (a, b) = (start * self.cols, end * self.cols);
        let data = match self.data {
            WeightData::F32(s) => WeightData::F32(&s[a..b]),
            WeightData::F16(s) => WeightData::F16(&s[a..b]),
            WeightData::BF16(s) => WeightData::BF16(&s[a..b]),
            WeightData::Int4(d) if start == 0 && end == self.rows => WeightData::Int4(d),
            WeightData::Int4(_) => return None,
        };
        Some(WeightView {
            data,
            rows: end - start,
            cols: self.cols,
        })
    }

    /// Element `(r, c)` widened to f32 (slow; for tests and scalar code).
    pub fn get(&self, r: usize, c: usize) -> Option<f32> {
        if r >= self.rows || c >= self.cols {
            return None;
        }
        let i = r * self.cols + c;
        Some(match self.data {
            WeightData::F32(s) => s[i],
            WeightData::F16(s) => s[i].to_f32(),
            WeightData::BF16(s) => s[i].to_f32(),
            WeightData::Int4(d) => d.get(r, c),
        })
    }
}
