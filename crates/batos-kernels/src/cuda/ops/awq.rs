//! int4 AWQ linear layers (`kernels/awq.cu`), AutoAWQ "GEMM" checkpoint layout.

use half::f16;

use super::super::device::CudaDevice;
use super::super::error::{CudaError, CudaResult};
use super::super::pool::DeviceBuffer;
use super::super::registry::ModuleId;
use cudarc::driver::PushKernelArg;

use super::{as_i32, as_u32, cfg, kname, launch, Activation};
use batos_types::DType;

/// Dimensions of an AWQ linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AwqShape {
    /// Input features (K); a multiple of `group_size` and of 32.
    pub in_features: usize,
    /// Output features (N); a multiple of 8.
    pub out_features: usize,
    /// Rows of K sharing one scale and zero point.
    pub group_size: usize,
}

impl AwqShape {
    /// Checks the constraints the kernels rely on.
    pub fn validate(self) -> CudaResult<Self> {
        let AwqShape {
            in_features: k,
            out_features: n,
            group_size: g,
        } = self;
        let bad = |r: String| Err(CudaError::invalid("awq shape", r));
        if k == 0 || n == 0 || g == 0 {
            return bad(format!("empty shape {self:?}"));
        }
        if n % 8 != 0 {
            return bad(format!("out_features {n} is not a multiple of 8"));
        }
        if k % g != 0 {
            return bad(format!(
                "in_features {k} is not a multiple of group_size {g}"
            ));
        }
        if k % 32 != 0 {
            return bad(format!("in_features {k} is not a multiple of 32"));
        }
        as_i32("awq shape", "in*out/8", k * (n / 8))?;
        Ok(self)
    }

    /// Elements of `qweight` (u32): in × out/8.
    pub fn qweight_len(self) -> usize {
        self.in_features * self.out_features / 8
    }
    /// Elements of `qzeros` (u32): in/group × out/8.
    pub fn qzeros_len(self) -> usize {
        self.in_features / self.group_size * self.out_features / 8
    }
    /// Elements of `scales` (f16): in/group × out.
    pub fn scales_len(self) -> usize {
        self.in_features / self.group_size * self.out_features
    }
}

/// An AWQ layer resident on the device.
///
/// `qweight` int32 [in, out/8] (as u32), `qzeros` int32 [in/group, out/8], `scales`
/// f16 [in/group, out]; each packed word holds 8 columns in AutoAWQ's nibble order
/// `[0,2,4,6,1,3,5,7]`; `W[k,n] = (q - z) * s` and `y = x · W`.
#[derive(Debug)]
pub struct AwqWeights {
    qweight: DeviceBuffer<u32>,
    qzeros: DeviceBuffer<u32>,
    scales: DeviceBuffer<f16>,
    shape: AwqShape,
}

impl AwqWeights {
    /// Validates the shapes and uploads the three tensors.
    pub fn upload(
        dev: &CudaDevice,
        shape: AwqShape,
        qweight: &[u32],
        qzeros: &[u32],
        scales: &[f16],
    ) -> CudaResult<Self> {
        const OP: &str = "AwqWeights::upload";
        let shape = shape.validate()?;
        CudaError::check_len(OP, "qweight", shape.qweight_len(), qweight.len())?;
        CudaError::check_len(OP, "qzeros", shape.qzeros_len(), qzeros.len())?;
        CudaError::check_len(OP, "scales", shape.scales_len(), scales.len())?;
        Ok(AwqWeights {
            qweight: dev.upload(qweight)?,
            qzeros: dev.upload(qzeros)?,
            scales: dev.upload(scales)?,
            shape,
        })
    }

    /// The layer's dimensions.
    pub fn shape(&self) -> AwqShape {
        self.shape
    }

    /// Bytes of the packed weights, zeros and scales (what a matvec must read).
    pub fn weight_bytes(&self) -> usize {
        (self.shape.qweight_len() + self.shape.qzeros_len()) * 4 + self.shape.scales_len() * 2
    }
}

/// Which AWQ kernel a batch takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AwqKernel {
    /// Memory-bound split-K matvec, for a few tokens (decode).
    Gemv,
    /// Tensor-core tiled matmul (prefill).
    Gemm,
}

/// Largest token count the matvec path takes.
pub const GEMV_MAX_TOKENS: usize = 4;

/// The kernel [`awq_linear`] uses for `tokens` rows.
pub fn awq_plan(tokens: usize) -> AwqKernel {
    if tokens <= GEMV_MAX_TOKENS {
        AwqKernel::Gemv
    } else {
        AwqKernel::Gemm
    }
}

fn check_io<T: Activation>(
    op: &'static str,
    w: &AwqWeights,
    x: &DeviceBuffer<T>,
    tokens: usize,
    y: &DeviceBuffer<T>,
) -> CudaResult<()> {
    CudaError::check_len(op, "x", tokens * w.shape.in_features, x.len())?;
    CudaError::check_len(op, "y", tokens * w.shape.out_features, y.len())?;
    as_i32(op, "tokens*out", tokens * w.shape.out_features)?;
    Ok(())
}

/// `y[tokens, out] = x[tokens, in] · W`, choosing the kernel with [`awq_plan`].
pub fn awq_linear<T: Activation>(
    dev: &CudaDevice,
    w: &AwqWeights,
    x: &DeviceBuffer<T>,
    tokens: usize,
    y: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    match awq_plan(tokens) {
        AwqKernel::Gemv => awq_gemv(dev, w, x, tokens, y),
        AwqKernel::Gemm => awq_gemm(dev, w, x, tokens, y),
    }
}

/// Threads per matvec block (`GEMV_THREADS` in kernels/awq.cu): 8 warps.
const GEMV_THREADS: usize = 256;

/// The split-K matvec for any token count (efficient up to [`GEMV_MAX_TOKENS`]).
///
/// Builds an [`AwqGemvPlan`] per call; a serving loop keeps the plan instead.
pub fn awq_gemv<T: Activation>(
    dev: &CudaDevice,
    w: &AwqWeights,
    x: &DeviceBuffer<T>,
    tokens: usize,
    y: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    check_io("awq_gemv", w, x, tokens, y)?;
    if tokens == 0 {
        return Ok(());
    }
    AwqGemvPlan::<T>::new(dev, w.shape, tokens)?.run(dev, w, x, y)
}

/// A prepared matvec for one layer shape and token count: the kernels, the launch
/// geometry and the split-K workspace, built once and reused for every layer of
/// that shape and every decode step (no allocation, lookup or planning per call).
///
/// The workspace is ordered on the device's compute stream, so one plan serves
/// any number of launches queued there back to back.
#[derive(Debug)]
pub struct AwqGemvPlan<T: Activation> {
    shape: AwqShape,
    tokens: usize,
    plan: GemvPlan,
    gemv: cudarc::driver::CudaFunction,
    reduce: cudarc::driver::CudaFunction,
    partial: DeviceBuffer<f32>,
    /// Split tickets of the fused-reduction (packed-half2) path, one per column
    /// block; the kernel leaves them at zero after every launch.
    counters: DeviceBuffer<u32>,
    _t: std::marker::PhantomData<T>,
}

impl<T: Activation> AwqGemvPlan<T> {
    /// Plans `tokens` (>= 1) rows through layers of `shape` on `dev`.
    pub fn new(dev: &CudaDevice, shape: AwqShape, tokens: usize) -> CudaResult<Self> {
        const OP: &str = "AwqGemvPlan::new";
        let shape = shape.validate()?;
        if tokens == 0 {
            return Err(CudaError::invalid(
                OP,
                "a matvec plan needs at least one token",
            ));
        }
        as_i32(OP, "tokens*out", tokens * shape.out_features)?;
        let plan = if T::DTYPE == DType::F16 && tokens <= 4 && shape.group_size % 8 == 0 {
            gemv_h2_plan(shape, tokens, dev.multiprocessors())
        } else {
            gemv_plan(shape, tokens, dev.multiprocessors())
        };
        // Every launch parameter must fit the kernel's int arguments.
        as_u32(OP, "blocks_x", plan.blocks_x)?;
        as_u32(OP, "splits", plan.splits)?;
        as_u32(OP, "blocks_z", plan.blocks_z)?;
        as_i32(OP, "in", shape.in_features)?;
        as_i32(
            OP,
            "splits*tokens*out",
            plan.splits * tokens * shape.out_features,
        )?;
        Ok(AwqGemvPlan {
            shape,
            tokens,
            plan,
            gemv: dev.function(ModuleId::Awq, &kname::<T>(plan.variant))?,
            reduce: dev.function(ModuleId::Awq, &kname::<T>("awq_reduce"))?,
            partial: dev.alloc::<f32>(plan.splits * tokens * shape.out_features)?,
            counters: dev.zeros::<u32>(if plan.fused { plan.blocks_x } else { 1 })?,
            _t: std::marker::PhantomData,
        })
    }

    /// The layer shape this plan serves.
    pub fn shape(&self) -> AwqShape {
        self.shape
    }

    /// Token rows per call.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// `y[tokens, out] = x[tokens, in] · W` for a layer of the planned shape.
    pub fn run(
        &mut self,
        dev: &CudaDevice,
        w: &AwqWeights,
        x: &DeviceBuffer<T>,
        y: &mut DeviceBuffer<T>,
    ) -> CudaResult<()> {
        const OP: &str = "awq_gemv";
        if w.shape != self.shape {
            return Err(CudaError::invalid(
                OP,
                format!(
                    "layer {:?} does not match the plan's {:?}",
                    w.shape, self.shape
                ),
            ));
        }
        check_io(OP, w, x, self.tokens, y)?;
        let (s, p, tokens) = (self.shape, self.plan, self.tokens);
        // Bounds were checked in `new`, so these conversions are lossless.
        let grid = (p.blocks_x as u32, p.splits as u32, p.blocks_z as u32);
        if p.fused {
            return self.run_fused(dev, w, x, y, grid);
        }
        let (nt, k, n, g, rps, ch) = (
            tokens as i32,
            s.in_features as i32,
            s.out_features as i32,
            s.group_size as i32,
            p.rows_per_split as i32,
            p.chunk as i32,
        );
        {
            let (qv, zv, sv, xv, mut pv) = (
                w.qweight.view(),
                w.qzeros.view(),
                w.scales.view(),
                x.view(),
                self.partial.view_mut(),
            );
            let mut args = dev.stream().launch_builder(&self.gemv);
            args.arg(&qv)
                .arg(&zv)
                .arg(&sv)
                .arg(&xv)
                .arg(&mut pv)
                .arg(&nt)
                .arg(&k)
                .arg(&n)
                .arg(&g)
                .arg(&rps)
                .arg(&ch);
            // SAFETY: awq_gemv_*(const u32* qw, const u32* qz, const f16* sc, const T* x,
            // float* partial, int ntok, int in, int out, int group, int rows_per_split, int
            // chunk), GEMV_THREADS threads. Shapes were validated (out%8, in%group) and w
            // matches the plan; chunk <= 128 (the staging buffer) divides group and
            // rows_per_split; lanes with j0 >= out/8 only stage x and add zeros to the
            // block's sum, and stores are masked to out; the vec4 variant is chosen only
            // when out/8 % 4 == 0 so its 16-byte loads stay aligned and in bounds (scales
            // are read 8 at a time at 16-byte-aligned offsets, out % 8 == 0); partial
            // holds splits*tokens*out floats for blockIdx.y < splits.
            unsafe { launch(OP, &mut args, cfg(grid, GEMV_THREADS as u32, 0))? };
        }
        let total = tokens * s.out_features;
        let blocks = total.div_ceil(256).min(4096) as u32;
        let (splits_i, n_i) = (p.splits as i32, total as i64);
        let (pv, mut yv) = (self.partial.view(), y.view_mut());
        let mut args = dev.stream().launch_builder(&self.reduce);
        args.arg(&pv).arg(&mut yv).arg(&splits_i).arg(&n_i);
        // SAFETY: awq_reduce_<T>(const float* partial, T* y, int splits, long long n):
        // reads partial[s*n + i] for s < splits, i < n (= tokens*out = y.len()).
        unsafe { launch(OP, &mut args, cfg((blocks, 1, 1), 256, 0)) }
    }
}

impl<T: Activation> AwqGemvPlan<T> {
    /// The packed-half2 f16 matvec with the split-K sum fused into the same launch.
    fn run_fused(
        &mut self,
        dev: &CudaDevice,
        w: &AwqWeights,
        x: &DeviceBuffer<T>,
        y: &mut DeviceBuffer<T>,
        grid: (u32, u32, u32),
    ) -> CudaResult<()> {
        const OP: &str = "awq_gemv";
        let (s, p) = (self.shape, self.plan);
        let (nt, k, n, g, rps, seg) = (
            self.tokens as i32,
            s.in_features as i32,
            s.out_features as i32,
            s.group_size as i32,
            p.rows_per_split as i32,
            p.chunk as i32,
        );
        let (qv, zv, sv, xv, mut pv, mut cv, mut yv) = (
            w.qweight.view(),
            w.qzeros.view(),
            w.scales.view(),
            x.view(),
            self.partial.view_mut(),
            self.counters.view_mut(),
            y.view_mut(),
        );
        let mut args = dev.stream().launch_builder(&self.gemv);
        args.arg(&qv)
            .arg(&zv)
            .arg(&sv)
            .arg(&xv)
            .arg(&mut pv)
            .arg(&mut cv)
            .arg(&mut yv);
        if p.variant == "awq_gemv_h2t4" {
            args.arg(&nt);
        }
        args.arg(&k).arg(&n).arg(&g).arg(&rps).arg(&seg);
        // SAFETY: awq_gemv_h2v{4,1}_f16(const u32* qw, const u32* qz, const f16* sc, const
        // f16* x, float* partial, u32* counters, f16* y, int in, int out, int group, int
        // rows_per_split, int seg), and awq_gemv_h2t4_f16 with `int ntok` (1..=4) after y,
        // H2_THREADS threads. T is f16 here (the plan picks these kernels only for
        // DType::F16), x holds tokens*in and y tokens*out elements (checked above).
        // rows_per_split is a multiple of 64 so every warp's slice is a multiple of
        // the 8-row ring, seg (8, 16 or 32) divides the group, so a segment never straddles
        // two groups; lanes with j0 >= out/8 load nothing and stores are masked to out; v4
        // is chosen only when out/8 % 4 == 0 (aligned 16-byte loads). partial holds
        // splits*tokens*out floats for blockIdx.y < splits, counters one u32 per column block
        // (zeroed at plan creation and reset to zero by the last block of every launch).
        unsafe { launch(OP, &mut args, cfg(grid, GEMV_THREADS as u32, 0)) }
    }
}

/// The tensor-core matmul (f16 mma, f32 accumulate; activations are rounded to f16).
pub fn awq_gemm<T: Activation>(
    dev: &CudaDevice,
    w: &AwqWeights,
    x: &DeviceBuffer<T>,
    tokens: usize,
    y: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    const OP: &str = "awq_gemm";
    check_io(OP, w, x, tokens, y)?;
    if tokens == 0 {
        return Ok(());
    }
    let s = w.shape;
    let GemmPlan {
        n_tiles,
        m_tiles,
        k_per_split,
        splits,
    } = gemm_plan(s, tokens, dev.multiprocessors());
    let grid = (
        as_u32(OP, "n tiles", n_tiles)?,
        as_u32(OP, "m tiles", m_tiles)?,
        as_u32(OP, "k splits", splits)?,
    );
    // A one-element placeholder when the kernel writes y directly.
    let mut partial = dev.alloc::<f32>(if splits > 1 {
        splits * tokens * s.out_features
    } else {
        1
    })?;
    let kps = as_i32(OP, "k_per_split", k_per_split)?;
    let (m, k, n, g) = (
        as_i32(OP, "tokens", tokens)?,
        as_i32(OP, "in", s.in_features)?,
        as_i32(OP, "out", s.out_features)?,
        as_i32(OP, "group", s.group_size)?,
    );
    {
        let f = dev.function(ModuleId::Awq, &kname::<T>("awq_gemm"))?;
        let (qv, zv, sv, xv, mut yv, mut pv) = (
            w.qweight.view(),
            w.qzeros.view(),
            w.scales.view(),
            x.view(),
            y.view_mut(),
            partial.view_mut(),
        );
        let mut args = dev.stream().launch_builder(&f);
        args.arg(&qv)
            .arg(&zv)
            .arg(&sv)
            .arg(&xv)
            .arg(&mut yv)
            .arg(&mut pv)
            .arg(&m)
            .arg(&k)
            .arg(&n)
            .arg(&g)
            .arg(&kps);
        // SAFETY: awq_gemm_<T>(qw, qz, sc, const T* x, T* y, float* partial, int M, int in,
        // int out, int group, int k_per_split), 128 threads per 64x64 tile. in % 32 == 0 and
        // k_per_split % 32 == 0 keep every K tile inside the rows; rows >= M and packed
        // columns >= out/8 are masked in the kernel; scales are read 8 at a time at
        // 16-byte-aligned offsets (out % 8 == 0); partial holds splits*M*out floats
        // whenever gridDim.z == splits > 1 (else the kernel writes y only).
        unsafe { launch(OP, &mut args, cfg(grid, 128, 0))? };
    }
    if splits == 1 {
        return Ok(());
    }
    let total = tokens * s.out_features;
    let blocks = total.div_ceil(256).min(4096) as u32;
    let (splits_i, n_i) = (as_i32(OP, "splits", splits)?, total as i64);
    let f = dev.function(ModuleId::Awq, &kname::<T>("awq_reduce"))?;
    let (pv, mut yv) = (partial.view(), y.view_mut());
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&pv).arg(&mut yv).arg(&splits_i).arg(&n_i);
    // SAFETY: awq_reduce_<T>(const float* partial, T* y, int splits, long long n):
    // reads partial[s*n + i] for s < splits, i < n = tokens*out = y.len().
    unsafe { launch(OP, &mut args, cfg((blocks, 1, 1), 256, 0)) }
}

/// Launch geometry of the matvec (pure, so it is tested without a GPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GemvPlan {
    pub variant: &'static str,
    pub blocks_x: usize,
    pub blocks_z: usize,
    /// Rows of x staged per step: the largest power of two <= 128 dividing both the
    /// group and `rows_per_split`, so a chunk never straddles two groups or splits.
    pub chunk: usize,
    pub rows_per_split: usize,
    pub splits: usize,
    /// The packed-half2 kernel with the split sum fused in (no `awq_reduce` launch);
    /// `chunk` is then its f16 accumulation segment (8, 16 or 32 rows).
    pub fused: bool,
}

/// Geometry of the packed-half2 f16 matvec (1-4 tokens, group % 8 == 0).
///
/// Blocks of 8 warps share 32·VEC packed columns (one token: VEC = 4 where out/8
/// allows 16-byte loads; 2-4 tokens: VEC = 1, the `h2t4` kernel) and split their K
/// range into 8 equal warp slices. K is split so that the grid fills about two
/// blocks per SM (the resident count) in one wave, with at least 64 rows per block
/// (8 per warp, one ring of loads) and at most 32 splits, which bounds the f32
/// partials the last block of a column range sums.
pub(crate) fn gemv_h2_plan(s: AwqShape, tokens: usize, sms: usize) -> GemvPlan {
    let out8 = s.out_features / 8;
    let (variant, vec) = if tokens > 1 {
        ("awq_gemv_h2t4", 1)
    } else if out8.is_multiple_of(4) {
        ("awq_gemv_h2v4", 4)
    } else {
        ("awq_gemv_h2v1", 1)
    };
    let blocks_x = out8.div_ceil(vec * 32);
    let seg = [32usize, 16, 8]
        .into_iter()
        .find(|c| s.group_size.is_multiple_of(*c))
        .unwrap_or(8);
    let want = ((2 * sms) / blocks_x).clamp(1, 32);
    let rows_per_split = (s.in_features.div_ceil(want).div_ceil(64) * 64).max(64);
    GemvPlan {
        variant,
        blocks_x,
        blocks_z: 1,
        chunk: seg,
        rows_per_split,
        splits: s.in_features.div_ceil(rows_per_split),
        fused: true,
    }
}

pub(crate) fn gemv_plan(s: AwqShape, tokens: usize, sms: usize) -> GemvPlan {
    let out8 = s.out_features / 8;
    let (variant, vec, tok) = if tokens == 1 && out8.is_multiple_of(4) {
        ("awq_gemv_t1v4", 4, 1)
    } else if tokens == 1 {
        ("awq_gemv_t1v1", 1, 1)
    } else {
        ("awq_gemv_t4v1", 1, 4)
    };
    // A block is GEMV_WARPS warps side by side along K; each lane owns `vec` words.
    let blocks_x = out8.div_ceil(vec * 32);
    let blocks_z = tokens.div_ceil(tok).max(1);
    // Largest power of two <= 128 dividing the group: no chunk straddles two groups.
    let group_chunk = (0..=7)
        .rev()
        .map(|p| 1usize << p)
        .find(|c| s.group_size.is_multiple_of(*c))
        .unwrap_or(1);
    // Split K so that about four 256-thread blocks per SM are in flight (two waves at
    // two resident blocks per SM), with splits of at least `unit` rows (8 per warp):
    // fewer rows would make the f32 partials a sizeable share of the traffic.
    let unit = group_chunk.min(64);
    let want = (4 * sms).div_ceil(blocks_x * blocks_z).max(1);
    let rows_per_split = s.in_features.div_ceil(want).div_ceil(unit).max(1) * unit;
    let chunk = (0..=7)
        .rev()
        .map(|p| 1usize << p)
        .find(|c| *c <= group_chunk && rows_per_split % c == 0)
        .unwrap_or(1);
    let splits = s.in_features.div_ceil(rows_per_split);
    GemvPlan {
        variant,
        blocks_x,
        blocks_z,
        chunk,
        rows_per_split,
        splits,
        fused: false,
    }
}

/// Launch geometry of the tensor-core GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GemmPlan {
    pub n_tiles: usize,
    pub m_tiles: usize,
    pub k_per_split: usize,
    pub splits: usize,
}

pub(crate) fn gemm_plan(s: AwqShape, tokens: usize, sms: usize) -> GemmPlan {
    let (n_tiles, m_tiles) = (s.out_features.div_ceil(64), tokens.div_ceil(64).max(1));
    // Few output tiles (decode-sized batches): split K so every SM gets work; the
    // f32 partials are summed by awq_reduce. Each split keeps >= 8 K tiles.
    let k_tiles = s.in_features / 32;
    let want = (2 * sms).div_ceil(n_tiles * m_tiles);
    let splits = want.clamp(1, (k_tiles / 8).max(1));
    let k_per_split = k_tiles.div_ceil(splits) * 32;
    GemmPlan {
        n_tiles,
        m_tiles,
        k_per_split,
        splits: s.in_features.div_ceil(k_per_split),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes() -> Vec<AwqShape> {
        let mut v = vec![];
        for (k, n) in [
            (576, 1536),
            (1536, 576),
            (4096, 4096),
            (4096, 14336),
            (384, 200),
            (64, 8),
        ] {
            for g in [32, 64, 128] {
                if k % g == 0 {
                    v.push(AwqShape {
                        in_features: k,
                        out_features: n,
                        group_size: g,
                    });
                }
            }
        }
        v
    }

    #[test]
    fn gemv_plan_keeps_chunks_inside_groups_and_covers_k() {
        for s in shapes() {
            for tokens in 1..=5 {
                for sms in [1, 108, 132] {
                    let p = gemv_plan(s, tokens, sms);
                    assert!(p.chunk <= 128 && s.group_size % p.chunk == 0, "{s:?} {p:?}");
                    assert_eq!(p.rows_per_split % p.chunk, 0, "{s:?} {p:?}");
                    assert!(p.splits * p.rows_per_split >= s.in_features, "{s:?} {p:?}");
                    assert!(
                        (p.splits - 1) * p.rows_per_split < s.in_features,
                        "{s:?} {p:?}"
                    );
                    let vec = if p.variant.ends_with("v4") { 4 } else { 1 };
                    assert_eq!(
                        (s.out_features / 8) % vec,
                        0,
                        "16-byte loads need out/8 % 4 == 0"
                    );
                    assert!(p.blocks_x * vec * 32 >= s.out_features / 8);
                }
            }
        }
    }

    #[test]
    fn gemv_h2_plan_slices_are_whole_rings_and_fill_one_wave() {
        for s in shapes() {
            for (sms, tokens) in [(1, 1), (108, 1), (132, 1), (132, 2), (132, 4), (1, 3)] {
                let p = gemv_h2_plan(s, tokens, sms);
                assert!(p.fused && p.blocks_z == 1);
                assert_eq!(
                    p.rows_per_split % 64,
                    0,
                    "8 warps x 8-row ring: {s:?} {p:?}"
                );
                assert_eq!(s.group_size % p.chunk, 0, "{s:?} {p:?}");
                assert!(p.splits * p.rows_per_split >= s.in_features, "{s:?} {p:?}");
                assert!((p.splits - 1) * p.rows_per_split < s.in_features);
                assert!(p.splits <= 32, "{s:?} {p:?}");
                assert!(
                    p.blocks_x * p.splits <= (2 * sms).max(p.blocks_x),
                    "{s:?} {p:?}"
                );
                let vec = if p.variant.ends_with("v4") { 4 } else { 1 };
                assert_eq!((s.out_features / 8) % vec, 0);
                assert!(p.blocks_x * vec * 32 >= s.out_features / 8);
                assert_eq!(p.variant == "awq_gemv_h2t4", tokens > 1);
            }
        }
        // The real model's fused qkv (576x960) and a large layer on an H100/H200.
        let qkv = AwqShape {
            in_features: 576,
            out_features: 960,
            group_size: 128,
        };
        let p = gemv_h2_plan(qkv, 1, 132);
        assert_eq!((p.variant, p.blocks_x, p.splits), ("awq_gemv_h2v4", 1, 9));
        let big = AwqShape {
            in_features: 8192,
            out_features: 28672,
            group_size: 128,
        };
        let p = gemv_h2_plan(big, 1, 132);
        assert_eq!((p.blocks_x, p.splits, p.rows_per_split), (28, 9, 960));
    }

    #[test]
    fn gemm_plan_splits_k_only_for_small_outputs() {
        for s in shapes() {
            for tokens in [1, 5, 64, 97, 2048] {
                let p = gemm_plan(s, tokens, 132);
                assert_eq!(p.k_per_split % 32, 0, "{s:?} {p:?}");
                assert!(p.splits * p.k_per_split >= s.in_features);
                assert!((p.splits - 1) * p.k_per_split < s.in_features);
                assert!(p.n_tiles * 64 >= s.out_features && p.m_tiles * 64 >= tokens);
            }
        }
        let big = AwqShape {
            in_features: 4096,
            out_features: 4096,
            group_size: 128,
        };
        assert_eq!(gemm_plan(big, 2048, 132).splits, 1);
        assert!(gemm_plan(big, 64, 132).splits > 1);
    }
}
