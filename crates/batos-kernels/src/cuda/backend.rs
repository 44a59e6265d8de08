//! The CUDA implementation of the crate's host-slice [`Kernels`] seam, so that
//! `Device::Cuda(n)` works wherever `Device::Cpu` does.
//!
//! This seam takes and returns host slices, so every GPU call here uploads its
//! inputs and downloads its outputs: it is a parity path, not a fast path (the
//! fast path keeps tensors resident and calls [`super::ops`] directly). Following
//! "plan, then launch", an operation runs on the GPU when that is meaningful and
//! otherwise falls back to the CPU kernels:
//! - GPU: `rms_norm`, `rope`, `silu_mul`, `paged_attention` (the caches are uploaded).
//! - CPU: dense `matmul` (the GPU kernels are int4 AWQ, [`super::ops::awq`]),
//!   `embedding` (a gather of T rows; uploading the table would cost more) and
//!   `write_kv` (the caches are host memory here), and `paged_attention` batches
//!   whose query rows are not laid out sequence after sequence.
//! - GPU: `lora` (BGMV, or SGMV when tokens of one adapter run consecutively), one
//!   f32 slot stack per projection of the group (half-precision slots are widened: the
//!   activations here are f32) and `x` uploaded once per group; ranks above
//!   [`lora_ops::MAX_RANK`] fall back to the CPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use super::device::CudaDevice;
use super::error::CudaError;
use super::ops::attention::{self, AttentionBatch, PagedKvLayout, SeqQuery};
use super::ops::elementwise::{self, RopeShape};
use super::ops::lora::{self as lora_ops, LoraMode, LoraPlan, LoraShape, LoraStack};
use crate::cpu::check;
use crate::cpu::lora::LoraTarget;
use crate::device::Kernels;
use crate::error::{KernelError, Result};
use crate::shapes::{AttentionHeads, KvCacheLayout, Rope, SeqAttention};
use crate::weights::WeightView;
use crate::KvCache;
use batos_types::SlotIdx;

fn cuda_err(op: &'static str) -> impl FnOnce(CudaError) -> KernelError {
    move |e| KernelError::Cuda {
        op,
        source: e.into(),
    }
}

/// The [`Kernels`] backend of one GPU.
#[derive(Debug)]
pub struct CudaKernels {
    dev: Arc<CudaDevice>,
}

impl CudaKernels {
    /// A backend on an opened device.
    pub fn new(dev: Arc<CudaDevice>) -> Self {
        CudaKernels { dev }
    }

    /// The device this backend launches on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// [`Kernels::lora`] on the GPU, arguments already validated (`t` rows).
    fn lora_gpu(
        &self,
        x: &[f32],
        tokens: &[Option<SlotIdx>],
        targets: &[LoraTarget<'_>],
        y: &mut [f32],
        (t, y_width): (usize, usize),
    ) -> super::CudaResult<()> {
        let d = &*self.dev;
        // SGMV when some adapter's tokens run consecutively (prefill), else BGMV.
        let mode = if tokens.windows(2).any(|w| w[0].is_some() && w[0] == w[1]) {
            LoraMode::Sgmv
        } else {
            LoraMode::Bgmv
        };
        let xd = d.upload(x)?;
        for g in targets {
            let s = g.slots();
            let (n_in, n_out, r, n) = (s.in_features(), s.out_features(), s.max_rank(), s.len());
            // The tokens this projection adapts: an adapter may skip it.
            let toks: Vec<Option<SlotIdx>> = tokens
                .iter()
                .map(|o| o.filter(|i| s.slots()[i.index()].is_some()))
                .collect();
            if r == 0 || toks.iter().all(Option::is_none) {
                continue;
            }
            let mut a = vec![0f32; n * r * n_in];
            let mut bt = vec![0f32; n * r * n_out];
            let mut ranks = vec![0usize; n];
            let mut scales = vec![0f32; n];
            for (i, sl) in s.slots().iter().enumerate() {
                let Some(sl) = sl else { continue };
                let k = sl.rank();
                ranks[i] = k;
                scales[i] = sl.scale();
                a[i * r * n_in..(i * r + k) * n_in].copy_from_slice(&sl.a_rows_f32());
                bt[i * r * n_out..(i * r + k) * n_out].copy_from_slice(&sl.bt_rows_f32());
            }
            let shape = LoraShape {
                slots: n,
                max_rank: r,
                in_features: n_in,
                out_features: n_out,
            };
            let stack = LoraStack::upload(d, shape, &a, &bt, &ranks, &scales)?;
            let plan = LoraPlan::new(d, mode, n, &toks)?;
            let col = g.column();
            let cols: Vec<f32> = (0..t)
                .flat_map(|row| y[row * y_width + col..][..n_out].iter().copied())
                .collect();
            let mut yd = d.upload(&cols)?;
            lora_ops::lora_apply(d, &stack, &plan, &xd, &mut yd)?;
            let out = yd.to_host()?;
            for (row, o) in out.chunks_exact(n_out).enumerate() {
                y[row * y_width + col..][..n_out].copy_from_slice(o);
            }
        }
        Ok(())
    }
}

/// The process-wide backend of GPU `ordinal`, opened on first use (what
/// `Device::Cuda(ordinal)` dispatches to). Without a driver or device this is a
/// `KernelError::Cuda` whose source is [`CudaError::NoDriver`] / [`CudaError::NoDevice`].
pub fn kernels(ordinal: usize) -> Result<&'static dyn Kernels> {
    static OPENED: OnceLock<Mutex<HashMap<usize, &'static CudaKernels>>> = OnceLock::new();
    let mut map = OPENED
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(k) = map.get(&ordinal) {
        return Ok(*k);
    }
    let dev = CudaDevice::new(ordinal).map_err(cuda_err("Device::Cuda"))?;
    // One backend per device for the life of the process, like the device itself.
    let k: &'static CudaKernels = Box::leak(Box::new(CudaKernels::new(dev)));
    map.insert(ordinal, k);
    Ok(k)
}

impl Kernels for CudaKernels {
    fn matmul(&self, x: &[f32], w: &WeightView<'_>, out: &mut [f32]) -> Result<()> {
        crate::cpu::matmul(x, w, out)
    }

    fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
        const OP: &str = "rms_norm";
        check::rms_norm(x, weight, out)?;
        if x.is_empty() {
            return Ok(());
        }
        let d = &*self.dev;
        let run = || -> super::CudaResult<Vec<f32>> {
            let (xd, wd) = (d.upload(x)?, d.upload(weight)?);
            let mut od = d.alloc::<f32>(x.len())?;
            elementwise::rms_norm(d, &xd, &wd, eps, &mut od)?;
            od.to_host()
        };
        out.copy_from_slice(&run().map_err(cuda_err(OP))?);
        Ok(())
    }

    fn rope(
        &self,
        rope: &Rope,
        heads: &AttentionHeads,
        positions: &[usize],
        q: &mut [f32],
        k: &mut [f32],
    ) -> Result<()> {
        const OP: &str = "rope";
        check::rope(rope, heads, positions, q, k)?;
        let pos: Vec<i32> = positions
            .iter()
            .map(|p| i32::try_from(*p))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| KernelError::InvalidShape {
                op: OP,
                what: "positions",
                reason: "a position exceeds i32::MAX".into(),
            })?;
        if pos.is_empty() {
            return Ok(());
        }
        let d = &*self.dev;
        let shape = RopeShape {
            tokens: pos.len(),
            heads: heads.num_heads(),
            kv_heads: heads.num_kv_heads(),
            head_dim: heads.head_dim(),
        };
        let run = || -> super::CudaResult<(Vec<f32>, Vec<f32>)> {
            let (mut qd, mut kd) = (d.upload(q)?, d.upload(k)?);
            let (pd, fd) = (d.upload(&pos)?, d.upload(rope.inv_freq())?);
            elementwise::rope(d, &mut qd, &mut kd, &pd, &fd, shape)?;
            Ok((qd.to_host()?, kd.to_host()?))
        };
        let (qh, kh) = run().map_err(cuda_err(OP))?;
        q.copy_from_slice(&qh);
        k.copy_from_slice(&kh);
        Ok(())
    }

    fn silu_mul(&self, gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
        const OP: &str = "silu_mul";
        check::silu_mul(gate, up, out)?;
        if gate.is_empty() {
            return Ok(());
        }
        let d = &*self.dev;
        let run = || -> super::CudaResult<Vec<f32>> {
            let (gd, ud) = (d.upload(gate)?, d.upload(up)?);
            let mut od = d.alloc::<f32>(gate.len())?;
            elementwise::silu_mul(d, &gd, &ud, &mut od)?;
            od.to_host()
        };
        out.copy_from_slice(&run().map_err(cuda_err(OP))?);
        Ok(())
    }

    fn embedding(&self, table: &WeightView<'_>, ids: &[u32], out: &mut [f32]) -> Result<()> {
        crate::cpu::embedding(table, ids, out)
    }

    fn write_kv(
        &self,
        k_new: &[f32],
        v_new: &[f32],
        slots: &[usize],
        k_cache: &mut [f32],
        v_cache: &mut [f32],
        layout: &KvCacheLayout,
    ) -> Result<()> {
        crate::cpu::write_kv(k_new, v_new, slots, k_cache, v_cache, layout)
    }

    fn paged_attention(
        &self,
        q: &[f32],
        heads: &AttentionHeads,
        cache: &KvCache<'_>,
        seqs: &[SeqAttention<'_>],
        out: &mut [f32],
    ) -> Result<()> {
        const OP: &str = "paged_attention";
        check::paged_attention(q, heads, cache, seqs, out)?;
        let l = &cache.layout;
        // Plan: the kernels take query rows sequence after sequence from row 0, a GQA
        // group of at most MAX_GROUP and head_dim % 4 == 0; otherwise use the CPU.
        let mut next = 0;
        let sequential = seqs.iter().all(|s| {
            let ok = s.query_start == next;
            next += s.query_len;
            ok
        });
        if !sequential
            || heads.group_size() > attention::MAX_GROUP
            || !heads.head_dim().is_multiple_of(4)
            || seqs.iter().all(|s| s.query_len == 0)
        {
            return crate::cpu::paged_attention(q, heads, cache, seqs, out);
        }
        let rows = next;
        let slot_stride = l.slot_stride();
        let layout = PagedKvLayout {
            num_blocks: cache.k.len() / (l.block_size() * slot_stride),
            block_size: l.block_size(),
            num_kv_heads: l.num_kv_heads(),
            head_dim: l.head_dim(),
        };
        let queries: Vec<SeqQuery<'_>> = seqs
            .iter()
            .map(|s| SeqQuery {
                block_table: s.block_table,
                first_pos: s.context_len - s.query_len,
                tokens: s.query_len,
            })
            .collect();
        let d = &*self.dev;
        let qw = heads.q_width();
        let run = || -> super::CudaResult<Vec<f32>> {
            let batch = AttentionBatch::new(d, layout, &queries)?;
            let cache_len = layout.cache_len();
            let (kd, vd) = (
                d.upload(&cache.k[..cache_len])?,
                d.upload(&cache.v[..cache_len])?,
            );
            let qd = d.upload(&q[..rows * qw])?;
            let mut od = d.alloc::<f32>(rows * qw)?;
            attention::paged_attention(d, &batch, heads.num_heads(), &qd, &kd, &vd, &mut od)?;
            od.to_host()
        };
        let o = run().map_err(cuda_err(OP))?;
        out[..rows * qw].copy_from_slice(&o);
        Ok(())
    }

    fn lora(
        &self,
        x: &[f32],
        tokens: &[Option<SlotIdx>],
        targets: &[LoraTarget<'_>],
        y: &mut [f32],
        y_width: usize,
    ) -> Result<()> {
        const OP: &str = "lora";
        let t = crate::cpu::lora::check_fused(OP, x, tokens, targets, y.len(), y_width)?;
        if tokens.iter().all(Option::is_none) {
            return Ok(());
        }
        // Plan: the CUDA kernels take ranks up to MAX_RANK; otherwise use the CPU.
        if targets
            .iter()
            .any(|g| g.slots().max_rank() > lora_ops::MAX_RANK)
        {
            return crate::cpu::lora::apply_fused(x, tokens, targets, y, y_width);
        }
        self.lora_gpu(x, tokens, targets, y, (t, y_width))
            .map_err(cuda_err(OP))
    }
}
