//! Dense f16-weight matmul and the row kernels of the device-resident model runtime
//! (`kernels/dense.cu`): residual add, row gather, column split, f16 embedding gather.

use half::f16;

use super::super::device::CudaDevice;
use super::super::error::{CudaError, CudaResult};
use super::super::pool::DeviceBuffer;
use super::super::registry::ModuleId;
use cudarc::driver::PushKernelArg;

use super::{as_i32, as_u32, cfg, kname, launch, Activation};

/// Tokens per warp tile (`DENSE_TT` in the kernel).
const DENSE_TT: usize = 8;
/// Output rows per block (`DENSE_WARPS` in the kernel).
const DENSE_WARPS: usize = 8;

/// A dense linear layer resident on the device: f16 `[out_features, in_features]`
/// row-major (PyTorch's layout), `y = x · Wᵀ`.
#[derive(Debug)]
pub struct DenseWeights {
    w: DeviceBuffer<f16>,
    out_features: usize,
    in_features: usize,
}

impl DenseWeights {
    /// Uploads `w` (`[out_features, in_features]`, row-major).
    pub fn upload(
        dev: &CudaDevice,
        out_features: usize,
        in_features: usize,
        w: &[f16],
    ) -> CudaResult<Self> {
        const OP: &str = "DenseWeights::upload";
        if out_features == 0 || in_features == 0 {
            return Err(CudaError::invalid(
                OP,
                format!("empty shape [{out_features}, {in_features}]"),
            ));
        }
        CudaError::check_len(OP, "w", out_features * in_features, w.len())?;
        as_i32(OP, "in_features", in_features)?;
        as_i32(OP, "out_features", out_features)?;
        Ok(DenseWeights {
            w: dev.upload(w)?,
            out_features,
            in_features,
        })
    }

    /// Output features (rows of W).
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// Input features (columns of W).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// Bytes of the weights (what one pass over them reads).
    pub fn weight_bytes(&self) -> usize {
        self.out_features * self.in_features * 2
    }

    /// The f16 table, row-major (for [`embed_f16`]).
    pub fn table(&self) -> &DeviceBuffer<f16> {
        &self.w
    }
}

/// `y[tokens, out] = x[tokens, in] · Wᵀ` (f32 accumulation).
pub fn dense_matmul<T: Activation>(
    dev: &CudaDevice,
    w: &DenseWeights,
    x: &DeviceBuffer<T>,
    tokens: usize,
    y: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    const OP: &str = "dense_matmul";
    CudaError::check_len(OP, "x", tokens * w.in_features, x.len())?;
    CudaError::check_len(OP, "y", tokens * w.out_features, y.len())?;
    if tokens == 0 {
        return Ok(());
    }
    let grid = (
        as_u32(OP, "row blocks", w.out_features.div_ceil(DENSE_WARPS))?,
        as_u32(OP, "token tiles", tokens.div_ceil(DENSE_TT))?,
        1,
    );
    let (nt, k, n) = (
        as_i32(OP, "tokens", tokens)?,
        as_i32(OP, "in", w.in_features)?,
        as_i32(OP, "out", w.out_features)?,
    );
    let f = dev.function(ModuleId::Dense, &kname::<T>("dense_matmul"))?;
    let (xv, wv, mut yv) = (x.view(), w.w.view(), y.view_mut());
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&xv).arg(&wv).arg(&mut yv).arg(&nt).arg(&k).arg(&n);
    // SAFETY: dense_matmul_<T>(const T* x, const f16* w, T* y, int ntok, int K, int N),
    // DENSE_WARPS warps per block. Warp (bx, w) handles row n = bx*8 + w < N (others
    // return) and tokens by*8 .. min(+8, ntok); it reads w[n*K .. +K] (w holds N*K),
    // x[t*K .. +K] for t < ntok (x holds ntok*K) and writes y[t*N + n] (y holds ntok*N).
    // The 8-byte weight loads are taken only when K % 4 == 0, so each row starts on an
    // 8-byte boundary of the 256-byte-aligned buffer.
    unsafe { launch(OP, &mut args, cfg(grid, (DENSE_WARPS * 32) as u32, 0)) }
}

/// `x += y`, element-wise (the residual connection).
pub fn add_assign<T: Activation>(
    dev: &CudaDevice,
    x: &mut DeviceBuffer<T>,
    y: &DeviceBuffer<T>,
) -> CudaResult<()> {
    const OP: &str = "add_rows";
    CudaError::check_len(OP, "y", x.len(), y.len())?;
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let n_i = n as i64;
    let blocks = n.div_ceil(256).min(65_535) as u32;
    let f = dev.function(ModuleId::Dense, &kname::<T>("add_rows"))?;
    let (mut xv, yv) = (x.view_mut(), y.view());
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&mut xv).arg(&yv).arg(&n_i);
    // SAFETY: add_rows_<T>(T* x, const T* y, long long n): grid-stride loop over i < n;
    // both buffers hold n elements.
    unsafe { launch(OP, &mut args, cfg((blocks, 1, 1), 256, 0)) }
}

/// `out[r] = input[rows[r]]` for rows of `width` elements (rows are checked on the
/// host, then uploaded).
pub fn gather_rows<T: Activation>(
    dev: &CudaDevice,
    input: &DeviceBuffer<T>,
    width: usize,
    host_rows: &[i32],
    out: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    const OP: &str = "gather_rows";
    if width == 0 || !input.len().is_multiple_of(width) {
        return Err(CudaError::invalid(
            OP,
            format!(
                "input has {} elements, not a multiple of the row width {width}",
                input.len()
            ),
        ));
    }
    CudaError::check_len(OP, "out", host_rows.len() * width, out.len())?;
    let in_rows = input.len() / width;
    if let Some((i, r)) = host_rows
        .iter()
        .enumerate()
        .find(|(_, r)| **r < 0 || **r as usize >= in_rows)
    {
        return Err(CudaError::invalid(
            OP,
            format!("row {i} selects input row {r} of {in_rows}"),
        ));
    }
    if host_rows.is_empty() {
        return Ok(());
    }
    let grid = as_u32(OP, "rows", host_rows.len())?;
    let w = as_i32(OP, "width", width)?;
    let rows = dev.upload(host_rows)?;
    let f = dev.function(ModuleId::Dense, &kname::<T>("gather_rows"))?;
    let (iv, rv, mut ov) = (input.view(), rows.view(), out.view_mut());
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&iv).arg(&rv).arg(&mut ov).arg(&w);
    // SAFETY: gather_rows_<T>(const T* in, const i32* rows, T* out, int width); block r
    // reads rows[r] (an upload of host_rows, each checked in 0..in_rows above) and
    // in[rows[r]*width ..+width], writes out[r*width ..+width] (out holds rows*width).
    unsafe { launch(OP, &mut args, cfg((grid, 1, 1), 128, 0)) }
}

/// `out[t] = input[t, offset .. offset + width]` for `input` rows of `stride` elements
/// (splits a fused `q|k|v` or `gate|up` output).
pub fn copy_cols<T: Activation>(
    dev: &CudaDevice,
    input: &DeviceBuffer<T>,
    stride: usize,
    offset: usize,
    width: usize,
    out: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    const OP: &str = "copy_cols";
    if stride == 0 || !input.len().is_multiple_of(stride) || offset + width > stride {
        return Err(CudaError::invalid(
            OP,
            format!(
                "columns {offset}..{} of rows of {stride} ({} elements)",
                offset + width,
                input.len()
            ),
        ));
    }
    let rows = input.len() / stride;
    CudaError::check_len(OP, "out", rows * width, out.len())?;
    if rows == 0 || width == 0 {
        return Ok(());
    }
    let grid = as_u32(OP, "rows", rows)?;
    let (s, o, w) = (
        as_i32(OP, "stride", stride)?,
        as_i32(OP, "offset", offset)?,
        as_i32(OP, "width", width)?,
    );
    let f = dev.function(ModuleId::Dense, &kname::<T>("copy_cols"))?;
    let (iv, mut ov) = (input.view(), out.view_mut());
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&iv).arg(&mut ov).arg(&s).arg(&o).arg(&w);
    // SAFETY: copy_cols_<T>(const T* in, T* out, int in_stride, int off, int width);
    // block t reads in[t*stride + off ..+width] (off + width <= stride, t < rows) and
    // writes out[t*width ..+width] (out holds rows*width).
    unsafe { launch(OP, &mut args, cfg((grid, 1, 1), 128, 0)) }
}

/// `out[t] = table[ids[t]]` from an f16 `[vocab, dim]` table into activations of type
/// `T` (ids are checked on the host, then uploaded).
pub fn embed_f16<T: Activation>(
    dev: &CudaDevice,
    table: &DenseWeights,
    host_ids: &[u32],
    out: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    const OP: &str = "embed_f16";
    let (vocab, dim) = (table.out_features, table.in_features);
    if let Some((pos, id)) = host_ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= vocab)
    {
        return Err(CudaError::invalid(
            OP,
            format!("token id {id} at position {pos} is outside the vocabulary of {vocab}"),
        ));
    }
    CudaError::check_len(OP, "out", host_ids.len() * dim, out.len())?;
    if host_ids.is_empty() {
        return Ok(());
    }
    let grid = as_u32(OP, "tokens", host_ids.len())?;
    let (vocab_u, dim_i) = (as_u32(OP, "vocab", vocab)?, as_i32(OP, "dim", dim)?);
    let ids = dev.upload(host_ids)?;
    let f = dev.function(ModuleId::Dense, &kname::<T>("embed_h"))?;
    let (tv, iv, mut ov) = (table.w.view(), ids.view(), out.view_mut());
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&tv)
        .arg(&iv)
        .arg(&mut ov)
        .arg(&vocab_u)
        .arg(&dim_i);
    // SAFETY: embed_h_<T>(const f16* table, const u32* ids, T* out, u32 vocab, int d);
    // block t reads ids[t] (an upload of host_ids, each < vocab) and table[id*d ..+d]
    // (table holds vocab*d), writes out[t*d ..+d] (out holds tokens*d).
    unsafe { launch(OP, &mut args, cfg((grid, 1, 1), 128, 0)) }
}

#[cfg(test)]
mod tests {
    use super::{DENSE_TT, DENSE_WARPS};

    #[test]
    fn tile_constants_match_the_kernel() {
        let src = include_str!("../../../../../kernels/dense.cu");
        assert!(src.contains(&format!("#define DENSE_TT {DENSE_TT}\n")));
        assert!(src.contains(&format!("#define DENSE_WARPS {DENSE_WARPS}\n")));
    }
}
