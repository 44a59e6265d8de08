//! Owned int4 linear weights in AutoAWQ's GEMM layout, and group-wise asymmetric
//! quantisation (round to nearest, optionally with clipped ranges).

use batos_kernels::cpu::int4::{pack_word, unpack_word};
use batos_kernels::{Int4Data, Int4Layout, WeightView};
use half::f16;
use rayon::prelude::*;

use super::error::QuantError;

/// Largest 4-bit code.
const MAX_CODE: f32 = 15.0;

/// Quantisation parameters of one (output row, input group): `w ≈ (q − zero) · scale`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct GroupParams {
    pub(crate) scale: f16,
    pub(crate) zero: u8,
}

impl GroupParams {
    /// AutoAWQ's asymmetric parameters for values in `[min, max]`: 16 levels spanning the
    /// range, the zero point the code of 0. The scale is rounded to f16 first (it is
    /// stored so) and the zero point computed with the stored scale, so quantising and
    /// the kernels' dequantisation agree exactly.
    pub(crate) fn for_range(min: f32, max: f32) -> GroupParams {
        let (min, max) = (min.min(0.0), max.max(0.0));
        let raw = ((max - min).max(1e-5) / MAX_CODE).min(f16::MAX.to_f32());
        // A scale that rounds to zero in f16 would divide by zero below.
        let scale = f16::from_f32(raw).max(f16::from_bits(1));
        let s = scale.to_f32();
        let zero = (-min / s).round_ties_even().clamp(0.0, MAX_CODE) as u8;
        GroupParams { scale, zero }
    }

    pub(crate) fn code(&self, w: f32) -> u8 {
        let s = self.scale.to_f32();
        ((w / s).round_ties_even() + f32::from(self.zero)).clamp(0.0, MAX_CODE) as u8
    }

    pub(crate) fn dequant(&self, q: u8) -> f32 {
        (i32::from(q) - i32::from(self.zero)) as f32 * self.scale.to_f32()
    }
}

/// Parameters for one group of values, with the range optionally clipped to
/// `[-clip, clip]` (AWQ's clipping search).
pub(crate) fn group_params(values: &[f32], clip: Option<f32>) -> GroupParams {
    let (mut min, mut max) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if let Some(c) = clip {
        min = min.max(-c);
        max = max.min(c);
    }
    GroupParams::for_range(min, max)
}

/// Quantise-then-dequantise of `values` (`[rows, cols]`, groups of `group_size` along
/// each row) into `out`: the weights an int4 layer would compute with. Same arithmetic
/// as [`Int4Weight::quantize`] followed by dequantisation, without the packing.
/// `clip`, when given, holds one clipping bound per (row, group).
pub fn fake_quantize(
    values: &[f32],
    cols: usize,
    group_size: usize,
    clip: Option<&[f32]>,
    out: &mut [f32],
) {
    let groups = cols / group_size;
    out.par_chunks_mut(cols)
        .zip(values.par_chunks(cols))
        .enumerate()
        .for_each(|(r, (o, w))| {
            for (g, (og, wg)) in o
                .chunks_mut(group_size)
                .zip(w.chunks(group_size))
                .enumerate()
            {
                let p = group_params(wg, clip.map(|c| c[r * groups + g]));
                for (ov, &wv) in og.iter_mut().zip(wg) {
                    *ov = p.dequant(p.code(wv));
                }
            }
        });
}

/// An int4 linear layer `[out_features, in_features]` in AutoAWQ's GEMM layout:
/// `qweight` u32 `[in, out/8]`, `qzeros` u32 `[in/group, out/8]`, `scales` f16
/// `[in/group, out]` (see [`batos_kernels::cpu::int4`]), plus optional group offsets
/// f16 `[in/group, out]`: a float minimum per (group, output) as GGUF's Q4_1 has, so
/// `W[n, k] = (q − zero) · scale + offset[k / group, n]`. AutoAWQ has no such tensor.
///
/// ```
/// use batos_model::quant::Int4Weight;
/// let w: Vec<f32> = (0..16 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0).collect();
/// let q = Int4Weight::quantize("demo", &w, 16, 64, 32, None)?;
/// let back = q.dequantize();
/// // Each weight is within half a quantisation step of the original.
/// assert!(w.iter().zip(&back).all(|(a, b)| (a - b).abs() <= 0.5 * 1.0 / 15.0 + 1e-3));
/// assert_eq!(q.size_in_bytes(), 64 * 2 * 4 + 2 * 2 * 4 + 2 * 16 * 2);
/// # Ok::<(), batos_model::quant::QuantError>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Int4Weight {
    layout: Int4Layout,
    qweight: Vec<u32>,
    qzeros: Vec<u32>,
    scales: Vec<f16>,
    /// `[in/group, out]`; `None` for AutoAWQ weights (integer zero points only).
    offsets: Option<Vec<f16>>,
}

impl Int4Weight {
    /// Wraps AutoAWQ tensors, checking their lengths against the layout. `name` is for
    /// error messages.
    pub fn from_parts(
        name: &str,
        layout: Int4Layout,
        qweight: Vec<u32>,
        qzeros: Vec<u32>,
        scales: Vec<f16>,
    ) -> Result<Self, QuantError> {
        Int4Data::new(layout, &qweight, &qzeros, &scales).map_err(|source| {
            QuantError::BadInt4 {
                name: name.to_owned(),
                source,
            }
        })?;
        Ok(Int4Weight {
            layout,
            qweight,
            qzeros,
            scales,
            offsets: None,
        })
    }

    /// Adds group offsets (f16 `[in/group, out]`, a float minimum per group and output
    /// as in GGUF's Q4_1): the layer then computes `(q − zero) · scale + offset`.
    pub fn with_offsets(mut self, name: &str, offsets: Vec<f16>) -> Result<Self, QuantError> {
        if offsets.len() != self.layout.scales_len() {
            return Err(QuantError::Shape {
                name: format!("{name} (group offsets)"),
                expected: vec![self.layout.groups(), self.layout.out_features()],
                got: offsets.len(),
            });
        }
        self.offsets = Some(offsets);
        Ok(self)
    }

    /// Group offsets `[in/group, out]`, if the layer has them.
    pub fn offsets(&self) -> Option<&[f16]> {
        self.offsets.as_deref()
    }

    /// Removes and returns the group offsets (the runtime keeps them as f32).
    pub(crate) fn take_offsets(&mut self) -> Option<Vec<f16>> {
        self.offsets.take()
    }

    /// Whether any group offset is nonzero (what an AutoAWQ checkpoint cannot hold).
    pub fn has_nonzero_offsets(&self) -> bool {
        self.offsets
            .as_ref()
            .is_some_and(|o| o.iter().any(|v| v.to_f32() != 0.0))
    }

    /// Quantises a row-major `[rows = out, cols = in]` f32 matrix with groups of
    /// `group_size` inputs, round to nearest; `clip` optionally bounds each (row,
    /// group)'s range to `[-clip, clip]`.
    pub fn quantize(
        name: &str,
        values: &[f32],
        rows: usize,
        cols: usize,
        group_size: usize,
        clip: Option<&[f32]>,
    ) -> Result<Self, QuantError> {
        let layout =
            Int4Layout::new(cols, rows, group_size).map_err(|source| QuantError::BadInt4 {
                name: name.to_owned(),
                source,
            })?;
        let groups = layout.groups();
        if values.len() != rows * cols {
            return Err(QuantError::Shape {
                name: name.to_owned(),
                expected: vec![rows, cols],
                got: values.len(),
            });
        }
        if let Some(c) = clip {
            if c.len() != rows * groups {
                return Err(QuantError::Shape {
                    name: format!("{name} (clip bounds)"),
                    expected: vec![rows, groups],
                    got: c.len(),
                });
            }
        }
        let params: Vec<GroupParams> = values
            .par_chunks(cols)
            .enumerate()
            .flat_map_iter(|(r, w)| {
                w.chunks(group_size)
                    .enumerate()
                    .map(move |(g, wg)| group_params(wg, clip.map(|c| c[r * groups + g])))
            })
            .collect();
        Self::quantize_with_params(name, values, layout, &params)
    }

    /// Quantises `[out, in]` f32 values with given per (row, group) parameters.
    pub(crate) fn quantize_with_params(
        name: &str,
        values: &[f32],
        layout: Int4Layout,
        params: &[GroupParams],
    ) -> Result<Self, QuantError> {
        let (rows, cols) = (layout.out_features(), layout.in_features());
        let (groups, group_size) = (layout.groups(), layout.group_size());
        if values.len() != rows * cols || params.len() != rows * groups {
            return Err(QuantError::Shape {
                name: name.to_owned(),
                expected: vec![rows, cols],
                got: values.len(),
            });
        }
        // Codes per output row, then packed eight rows to a word.
        let per_row: Vec<Vec<u8>> = values
            .par_chunks(cols)
            .enumerate()
            .map(|(r, w)| {
                let mut codes = Vec::with_capacity(cols);
                for (g, wg) in w.chunks(group_size).enumerate() {
                    let p = params[r * groups + g];
                    codes.extend(wg.iter().map(|&v| p.code(v)));
                }
                codes
            })
            .collect();
        let wpr = layout.words_per_row();
        let mut qweight = vec![0u32; layout.qweight_len()];
        let mut qzeros = vec![0u32; layout.qzeros_len()];
        let mut scales = vec![f16::ZERO; layout.scales_len()];
        for j in 0..wpr {
            let rows8 = &per_row[8 * j..8 * j + 8];
            for k in 0..cols {
                let mut c = [0u8; 8];
                for (l, v) in c.iter_mut().enumerate() {
                    *v = rows8[l][k];
                }
                qweight[k * wpr + j] = pack_word(c);
            }
            for g in 0..groups {
                let mut z = [0u8; 8];
                for (l, v) in z.iter_mut().enumerate() {
                    let p = params[(8 * j + l) * groups + g];
                    *v = p.zero;
                    scales[g * rows + 8 * j + l] = p.scale;
                }
                qzeros[g * wpr + j] = pack_word(z);
            }
        }
        Ok(Int4Weight {
            layout,
            qweight,
            qzeros,
            scales,
            offsets: None,
        })
    }

    /// The dimensions.
    pub fn layout(&self) -> Int4Layout {
        self.layout
    }

    /// `out_features`.
    pub fn rows(&self) -> usize {
        self.layout.out_features()
    }

    /// `in_features`.
    pub fn cols(&self) -> usize {
        self.layout.in_features()
    }

    /// Packed codes `[in, out/8]`.
    pub fn qweight(&self) -> &[u32] {
        &self.qweight
    }

    /// Packed zero points `[in/group, out/8]`.
    pub fn qzeros(&self) -> &[u32] {
        &self.qzeros
    }

    /// Scales `[in/group, out]`.
    pub fn scales(&self) -> &[f16] {
        &self.scales
    }

    /// Borrowed form for the kernels.
    pub fn data(&self) -> Int4Data<'_> {
        // Lengths were checked at construction.
        Int4Data::new(self.layout, &self.qweight, &self.qzeros, &self.scales)
            .expect("int4 lengths match their layout")
    }

    /// A `[out, in]` weight view for `batos_kernels` matmuls.
    pub fn view(&self) -> WeightView<'_> {
        WeightView::int4(self.data())
    }

    /// The weights as a row-major `[out, in]` f32 matrix (group offsets added).
    pub fn dequantize(&self) -> Vec<f32> {
        let (rows, cols) = (self.rows(), self.cols());
        let g = self.layout.group_size();
        let data = self.data();
        let mut out = vec![0f32; rows * cols];
        out.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
            data.dequantize_row(r, row);
            if let Some(off) = &self.offsets {
                for (grp, chunk) in row.chunks_mut(g).enumerate() {
                    let m = off[grp * rows + r].to_f32();
                    chunk.iter_mut().for_each(|v| *v += m);
                }
            }
        });
        out
    }

    /// Bytes held (packed codes, zero points, scales and any group offsets).
    pub fn size_in_bytes(&self) -> usize {
        self.layout.size_in_bytes() + self.offsets.as_ref().map_or(0, |o| 2 * o.len())
    }

    /// Stacks layers with the same `in_features` and group size along the output
    /// dimension (fusing q/k/v or gate/up into one matmul). In AutoAWQ's layout that
    /// concatenates each input row's words, zero words and scales.
    pub fn concat_out(name: &str, parts: &[&Int4Weight]) -> Result<Int4Weight, QuantError> {
        let first = parts.first().ok_or_else(|| QuantError::Shape {
            name: name.to_owned(),
            expected: vec![1],
            got: 0,
        })?;
        let (k, g) = (first.cols(), first.layout.group_size());
        if let Some(bad) = parts
            .iter()
            .find(|p| p.cols() != k || p.layout.group_size() != g)
        {
            return Err(QuantError::Shape {
                name: name.to_owned(),
                expected: vec![k, g],
                got: bad.cols(),
            });
        }
        let n: usize = parts.iter().map(|p| p.rows()).sum();
        let layout = Int4Layout::new(k, n, g).map_err(|source| QuantError::BadInt4 {
            name: name.to_owned(),
            source,
        })?;
        let mut qweight = Vec::with_capacity(layout.qweight_len());
        for r in 0..k {
            for p in parts {
                let w = p.layout.words_per_row();
                qweight.extend_from_slice(&p.qweight[r * w..(r + 1) * w]);
            }
        }
        let mut qzeros = Vec::with_capacity(layout.qzeros_len());
        let mut scales = Vec::with_capacity(layout.scales_len());
        let any_offsets = parts.iter().any(|p| p.offsets.is_some());
        let mut offsets = Vec::with_capacity(if any_offsets { layout.scales_len() } else { 0 });
        for grp in 0..k / g {
            for p in parts {
                let w = p.layout.words_per_row();
                qzeros.extend_from_slice(&p.qzeros[grp * w..(grp + 1) * w]);
                let o = p.rows();
                let range = grp * o..(grp + 1) * o;
                scales.extend_from_slice(&p.scales[range.clone()]);
                if any_offsets {
                    match &p.offsets {
                        Some(off) => offsets.extend_from_slice(&off[range]),
                        // A part without offsets has a zero minimum.
                        None => offsets.extend(std::iter::repeat_n(f16::ZERO, o)),
                    }
                }
            }
        }
        let fused = Int4Weight::from_parts(name, layout, qweight, qzeros, scales)?;
        if any_offsets {
            fused.with_offsets(name, offsets)
        } else {
            Ok(fused)
        }
    }

    /// The 4-bit code of `W[n, k]` (for tests and inspection).
    pub fn code(&self, n: usize, k: usize) -> u8 {
        unpack_word(self.qweight[k * self.layout.words_per_row() + n / 8])[n % 8]
    }
}
