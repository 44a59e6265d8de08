//! RMSNorm, RoPE, SiLU·mul and embedding gather (`kernels/elementwise.cu`).

use super::super::device::CudaDevice;
use super::super::error::{CudaError, CudaResult};
use super::super::pool::DeviceBuffer;
use super::super::registry::ModuleId;
use cudarc::driver::PushKernelArg;

use super::{as_i32, as_u32, cfg, kname, launch, Activation};

/// `out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight` for every row of `x`
/// (row length = `weight.len()`).
pub fn rms_norm<T: Activation>(
    dev: &CudaDevice,
    x: &DeviceBuffer<T>,
    weight: &DeviceBuffer<T>,
    eps: f32,
    out: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    const OP: &str = "rms_norm";
    let d = weight.len();
    if d == 0 || !x.len().is_multiple_of(d) {
        return Err(CudaError::invalid(
            OP,
            format!(
                "x has {} elements, not a multiple of the row length {d}",
                x.len()
            ),
        ));
    }
    CudaError::check_len(OP, "out", x.len(), out.len())?;
    let rows = as_u32(OP, "rows", x.len() / d)?;
    if rows == 0 {
        return Ok(());
    }
    let d_i = as_i32(OP, "d", d)?;
    let f = dev.function(ModuleId::Elementwise, &kname::<T>("rms_norm"))?;
    let (xv, wv, mut ov) = (x.view(), weight.view(), out.view_mut());
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&xv).arg(&wv).arg(&mut ov).arg(&d_i).arg(&eps);
    // SAFETY: rms_norm_<T>(const T* x, const T* w, T* out, int d, float eps); one
    // block per row reads x/out[row*d .. row*d+d] and w[0..d]; x and out hold rows*d.
    unsafe { launch(OP, &mut args, cfg((rows, 1, 1), 256, 0)) }
}

/// Shape of the q/k tensors given to [`rope`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RopeShape {
    /// Tokens (rows of q and k).
    pub tokens: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head dimension (even).
    pub head_dim: usize,
}

/// Rotary embedding in place, HF `rotate_half` convention: for i < hd/2,
/// `angle = positions[t] * inv_freq[i]`, `(x_i, x_{i+hd/2})` rotated by that angle.
/// `inv_freq` has `head_dim / 2` entries (Llama-3 scaling is applied by the caller).
pub fn rope<T: Activation>(
    dev: &CudaDevice,
    q: &mut DeviceBuffer<T>,
    k: &mut DeviceBuffer<T>,
    positions: &DeviceBuffer<i32>,
    inv_freq: &DeviceBuffer<f32>,
    shape: RopeShape,
) -> CudaResult<()> {
    const OP: &str = "rope";
    let RopeShape {
        tokens,
        heads,
        kv_heads,
        head_dim,
    } = shape;
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(CudaError::invalid(
            OP,
            format!("head_dim {head_dim} must be even and > 0"),
        ));
    }
    CudaError::check_len(OP, "q", tokens * heads * head_dim, q.len())?;
    CudaError::check_len(OP, "k", tokens * kv_heads * head_dim, k.len())?;
    CudaError::check_len(OP, "positions", tokens, positions.len())?;
    CudaError::check_len(OP, "inv_freq", head_dim / 2, inv_freq.len())?;
    if tokens == 0 {
        return Ok(());
    }
    let grid = as_u32(OP, "tokens", tokens)?;
    let (nh, nkv, hd) = (
        as_i32(OP, "heads", heads)?,
        as_i32(OP, "kv_heads", kv_heads)?,
        as_i32(OP, "head_dim", head_dim)?,
    );
    let f = dev.function(ModuleId::Elementwise, &kname::<T>("rope"))?;
    let (mut qv, mut kv, pv, fv) = (
        q.view_mut(),
        k.view_mut(),
        positions.view(),
        inv_freq.view(),
    );
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&mut qv)
        .arg(&mut kv)
        .arg(&pv)
        .arg(&fv)
        .arg(&nh)
        .arg(&nkv)
        .arg(&hd);
    // SAFETY: rope_<T>(T* q, T* k, const int* pos, const float* inv_freq, int nh, int nkv,
    // int hd); block t touches q[t*nh*hd ..], k[t*nkv*hd ..], pos[t], inv_freq[0..hd/2],
    // all within the lengths checked above.
    unsafe { launch(OP, &mut args, cfg((grid, 1, 1), 128, 0)) }
}

/// `out = silu(gate) * up`, element-wise.
pub fn silu_mul<T: Activation>(
    dev: &CudaDevice,
    gate: &DeviceBuffer<T>,
    up: &DeviceBuffer<T>,
    out: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    const OP: &str = "silu_mul";
    CudaError::check_len(OP, "up", gate.len(), up.len())?;
    CudaError::check_len(OP, "out", gate.len(), out.len())?;
    let n = gate.len();
    if n == 0 {
        return Ok(());
    }
    let n_i = n as i64;
    let blocks = n.div_ceil(256).min(65_535) as u32;
    let f = dev.function(ModuleId::Elementwise, &kname::<T>("silu_mul"))?;
    let (gv, uv, mut ov) = (gate.view(), up.view(), out.view_mut());
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&gv).arg(&uv).arg(&mut ov).arg(&n_i);
    // SAFETY: silu_mul_<T>(const T*, const T*, T*, long long n): grid-stride loop over
    // i < n; all three buffers hold n elements.
    unsafe { launch(OP, &mut args, cfg((blocks, 1, 1), 256, 0)) }
}

/// `out[t] = table[ids[t]]`; `table` is [vocab, dim]. Ids are checked on the host.
pub fn embedding<T: Activation>(
    dev: &CudaDevice,
    table: &DeviceBuffer<T>,
    dim: usize,
    ids: &[u32],
    out: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    const OP: &str = "embedding";
    if dim == 0 || !table.len().is_multiple_of(dim) {
        return Err(CudaError::invalid(
            OP,
            format!(
                "table has {} elements, not a multiple of dim {dim}",
                table.len()
            ),
        ));
    }
    let vocab = table.len() / dim;
    if let Some((pos, id)) = ids
        .iter()
        .enumerate()
        .find(|(_, id)| **id as usize >= vocab)
    {
        return Err(CudaError::invalid(
            OP,
            format!("token id {id} at position {pos} is outside the vocabulary of {vocab}"),
        ));
    }
    CudaError::check_len(OP, "out", ids.len() * dim, out.len())?;
    if ids.is_empty() {
        return Ok(());
    }
    let ids_dev = dev.upload(ids)?;
    let (vocab_u, dim_i) = (as_u32(OP, "vocab", vocab)?, as_i32(OP, "dim", dim)?);
    let grid = as_u32(OP, "tokens", ids.len())?;
    let f = dev.function(ModuleId::Elementwise, &kname::<T>("embedding"))?;
    let (tv, iv, mut ov) = (table.view(), ids_dev.view(), out.view_mut());
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&tv)
        .arg(&iv)
        .arg(&mut ov)
        .arg(&vocab_u)
        .arg(&dim_i);
    // SAFETY: embedding_<T>(const T* table, const u32* ids, T* out, u32 vocab, int d);
    // block t reads ids[t] (< vocab, checked) and table[id*d ..+d], writes out[t*d ..+d].
    unsafe { launch(OP, &mut args, cfg((grid, 1, 1), 128, 0)) }
}
