//! Greedy and nucleus sampling (`kernels/sampling.cu`).

use super::super::device::CudaDevice;
use super::super::error::{CudaError, CudaResult};
use super::super::pool::DeviceBuffer;
use super::super::registry::ModuleId;
use cudarc::driver::PushKernelArg;

use super::{as_i32, as_u32, cfg, kname, launch, Activation};

fn rows_of(op: &'static str, len: usize, vocab: usize) -> CudaResult<usize> {
    if vocab == 0 || !len.is_multiple_of(vocab) {
        return Err(CudaError::invalid(
            op,
            format!("logits have {len} elements, not a multiple of vocab {vocab}"),
        ));
    }
    Ok(len / vocab)
}

/// Index of the largest logit of each row (lowest index on ties; NaN never wins).
pub fn argmax<T: Activation>(
    dev: &CudaDevice,
    logits: &DeviceBuffer<T>,
    vocab: usize,
    out: &mut DeviceBuffer<u32>,
) -> CudaResult<()> {
    const OP: &str = "argmax";
    let rows = rows_of(OP, logits.len(), vocab)?;
    CudaError::check_len(OP, "out", rows, out.len())?;
    if rows == 0 {
        return Ok(());
    }
    let (grid, v) = (as_u32(OP, "rows", rows)?, as_i32(OP, "vocab", vocab)?);
    let f = dev.function(ModuleId::Sampling, &kname::<T>("argmax"))?;
    let (lv, mut ov) = (logits.view(), out.view_mut());
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&lv).arg(&mut ov).arg(&v);
    // SAFETY: argmax_<T>(const T* logits, u32* out, int vocab); block r reads
    // logits[r*vocab ..+vocab] and writes out[r]; rows*vocab == logits.len().
    unsafe { launch(OP, &mut args, cfg((grid, 1, 1), 256, 0)) }
}

/// Nucleus sampling parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TopP {
    /// Softmax temperature (> 0; use [`argmax`] for greedy).
    pub temperature: f32,
    /// Probability mass kept, in (0, 1].
    pub top_p: f32,
}

/// Samples one token per row from `softmax(logits / temperature)` restricted to
/// the top-p nucleus, using `uniforms[r]` in [0, 1) as that row's random draw.
///
/// The nucleus is {i : p_i >= tau} for the largest tau whose mass is >= top_p
/// (the sorted-prefix nucleus, ties at its edge kept together); the draw is an
/// inverse CDF over the nucleus in token-index order. This is the CPU sampler's
/// rule (`sampling::filtered_probs` + its draw) except at an exact tie of
/// probabilities on the nucleus edge, where the CPU keeps the lower indices only.
pub fn top_p_sample<T: Activation>(
    dev: &CudaDevice,
    logits: &DeviceBuffer<T>,
    vocab: usize,
    params: TopP,
    uniforms: &DeviceBuffer<f32>,
    out: &mut DeviceBuffer<u32>,
) -> CudaResult<()> {
    const OP: &str = "top_p_sample";
    if !(params.temperature.is_finite() && params.temperature > 0.0) {
        return Err(CudaError::invalid(
            OP,
            format!("temperature {} must be finite and > 0", params.temperature),
        ));
    }
    if !(params.top_p > 0.0 && params.top_p <= 1.0) {
        return Err(CudaError::invalid(
            OP,
            format!("top_p {} must be in (0, 1]", params.top_p),
        ));
    }
    let rows = rows_of(OP, logits.len(), vocab)?;
    CudaError::check_len(OP, "uniforms", rows, uniforms.len())?;
    CudaError::check_len(OP, "out", rows, out.len())?;
    if rows == 0 {
        return Ok(());
    }
    let (grid, v) = (as_u32(OP, "rows", rows)?, as_i32(OP, "vocab", vocab)?);
    let inv_temp = 1.0f32 / params.temperature;
    // top_p = 1 keeps every token: make the kernel's mass test unreachable so float
    // rounding of the total mass cannot drop the least likely tokens.
    let top_p = if params.top_p >= 1.0 {
        f32::INFINITY
    } else {
        params.top_p
    };
    let f = dev.function(ModuleId::Sampling, &kname::<T>("top_p"))?;
    let (lv, uv, mut ov) = (logits.view(), uniforms.view(), out.view_mut());
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&lv)
        .arg(&uv)
        .arg(&mut ov)
        .arg(&v)
        .arg(&inv_temp)
        .arg(&top_p);
    // SAFETY: top_p_<T>(const T* logits, const float* u, u32* out, int vocab, float
    // inv_temp, float top_p); block r reads logits[r*vocab ..+vocab] and u[r], writes
    // out[r]; blockDim 512 <= the kernel's 1024-entry scan buffer.
    unsafe { launch(OP, &mut args, cfg((grid, 1, 1), 512, 0)) }
}
