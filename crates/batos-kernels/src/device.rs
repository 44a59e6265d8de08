//! The device abstraction model code calls through.
//!
//! [`Device`] is plain data and has every variant on every build. Its methods take
//! host slices; on [`Device::Cpu`] they run [`crate::cpu`]. [`Device::Cuda`] dispatches
//! to the CUDA backend's [`Kernels`] implementation when the `cuda` feature is on, and
//! otherwise fails every call with [`KernelError::CudaNotCompiled`].

use crate::cpu::lora::LoraTarget;
use crate::error::Result;
use crate::shapes::{AttentionHeads, KvCacheLayout, Rope, SeqAttention};
use crate::weights::WeightView;
use crate::KvCache;
use batos_types::{DeviceKind, SlotIdx};

/// The operations a backend provides to the model forward pass. The CPU backend is
/// [`CpuKernels`]; the CUDA backend implements the same trait, so model code is the
/// same on both.
pub trait Kernels: Sync {
    /// See [`crate::cpu::matmul`].
    fn matmul(&self, x: &[f32], w: &WeightView<'_>, out: &mut [f32]) -> Result<()>;
    /// See [`crate::cpu::rms_norm`].
    fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()>;
    /// See [`crate::cpu::rope`].
    fn rope(
        &self,
        rope: &Rope,
        heads: &AttentionHeads,
        positions: &[usize],
        q: &mut [f32],
        k: &mut [f32],
    ) -> Result<()>;
    /// See [`crate::cpu::silu_mul`].
    fn silu_mul(&self, gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()>;
    /// See [`crate::cpu::silu_mul_fused`]. The default splits the rows and calls
    /// [`Kernels::silu_mul`]; backends override it to skip the copy.
    fn silu_mul_fused(&self, gate_up: &[f32], ffn: usize, out: &mut [f32]) -> Result<()> {
        let t = crate::cpu::check::silu_mul_fused(gate_up, ffn, out)?;
        let mut gate = Vec::with_capacity(t * ffn);
        let mut up = Vec::with_capacity(t * ffn);
        for row in gate_up.chunks_exact(2 * ffn) {
            gate.extend_from_slice(&row[..ffn]);
            up.extend_from_slice(&row[ffn..]);
        }
        self.silu_mul(&gate, &up, out)
    }
    /// See [`crate::cpu::embedding`].
    fn embedding(&self, table: &WeightView<'_>, ids: &[u32], out: &mut [f32]) -> Result<()>;
    /// See [`crate::cpu::write_kv`].
    fn write_kv(
        &self,
        k_new: &[f32],
        v_new: &[f32],
        slots: &[usize],
        k_cache: &mut [f32],
        v_cache: &mut [f32],
        layout: &KvCacheLayout,
    ) -> Result<()>;
    /// See [`crate::cpu::paged_attention`].
    fn paged_attention(
        &self,
        q: &[f32],
        heads: &AttentionHeads,
        cache: &KvCache<'_>,
        seqs: &[SeqAttention<'_>],
        out: &mut [f32],
    ) -> Result<()>;
    /// Per-token LoRA for a group of projections sharing the input `x`, accumulated
    /// into the fused projection output `y` (`[T, y_width]`); see
    /// [`crate::cpu::lora::apply_fused`] for the semantics and the reference.
    fn lora(
        &self,
        x: &[f32],
        tokens: &[Option<SlotIdx>],
        targets: &[LoraTarget<'_>],
        y: &mut [f32],
        y_width: usize,
    ) -> Result<()>;
}

/// The CPU backend: [`crate::cpu`] behind the [`Kernels`] trait.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuKernels;

impl Kernels for CpuKernels {
    fn matmul(&self, x: &[f32], w: &WeightView<'_>, out: &mut [f32]) -> Result<()> {
        crate::cpu::matmul(x, w, out)
    }
    fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
        crate::cpu::rms_norm(x, weight, eps, out)
    }
    fn rope(
        &self,
        rope: &Rope,
        heads: &AttentionHeads,
        positions: &[usize],
        q: &mut [f32],
        k: &mut [f32],
    ) -> Result<()> {
        crate::cpu::rope(rope, heads, positions, q, k)
    }
    fn silu_mul(&self, gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
        crate::cpu::silu_mul(gate, up, out)
    }
    fn silu_mul_fused(&self, gate_up: &[f32], ffn: usize, out: &mut [f32]) -> Result<()> {
        crate::cpu::silu_mul_fused(gate_up, ffn, out)
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
        crate::cpu::paged_attention(q, heads, cache, seqs, out)
    }
    fn lora(
        &self,
        x: &[f32],
        tokens: &[Option<SlotIdx>],
        targets: &[LoraTarget<'_>],
        y: &mut [f32],
        y_width: usize,
    ) -> Result<()> {
        crate::cpu::lora::apply_fused(x, tokens, targets, y, y_width)
    }
}

/// Where kernels run. Every variant exists on every build.
///
/// ```
/// use batos_kernels::{Device, KernelError};
/// let gpu = Device::Cuda(0);
/// # #[cfg(not(feature = "cuda"))]
/// assert!(matches!(gpu.kernels("demo"), Err(KernelError::CudaNotCompiled { .. })));
/// assert!(Device::Cpu.kernels("demo").is_ok());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Device {
    /// Host CPU (AVX2/FMA when available, scalar otherwise).
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal.
    Cuda(usize),
}

impl Device {
    /// The device for a [`DeviceKind`] from `batos-types`.
    pub fn from_kind(kind: DeviceKind) -> Device {
        match kind {
            DeviceKind::Cuda(i) => Device::Cuda(i),
            _ => Device::Cpu,
        }
    }

    /// The [`DeviceKind`] of this device.
    pub fn kind(&self) -> DeviceKind {
        match self {
            Device::Cpu => DeviceKind::Cpu,
            Device::Cuda(i) => DeviceKind::Cuda(*i),
        }
    }

    /// The backend that runs kernels here; `op` names the caller in errors.
    pub fn kernels(&self, op: &'static str) -> Result<&'static dyn Kernels> {
        static CPU: CpuKernels = CpuKernels;
        match self {
            Device::Cpu => Ok(&CPU),
            Device::Cuda(ordinal) => cuda_kernels(op, *ordinal),
        }
    }

    /// See [`crate::cpu::matmul`].
    pub fn matmul(&self, x: &[f32], w: &WeightView<'_>, out: &mut [f32]) -> Result<()> {
        self.kernels("matmul")?.matmul(x, w, out)
    }

    /// See [`crate::cpu::rms_norm`].
    pub fn rms_norm(&self, x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
        self.kernels("rms_norm")?.rms_norm(x, weight, eps, out)
    }

    /// See [`crate::cpu::rope`].
    pub fn rope(
        &self,
        rope: &Rope,
        heads: &AttentionHeads,
        positions: &[usize],
        q: &mut [f32],
        k: &mut [f32],
    ) -> Result<()> {
        self.kernels("rope")?.rope(rope, heads, positions, q, k)
    }

    /// See [`crate::cpu::silu_mul`].
    pub fn silu_mul(&self, gate: &[f32], up: &[f32], out: &mut [f32]) -> Result<()> {
        self.kernels("silu_mul")?.silu_mul(gate, up, out)
    }

    /// See [`crate::cpu::silu_mul_fused`].
    pub fn silu_mul_fused(&self, gate_up: &[f32], ffn: usize, out: &mut [f32]) -> Result<()> {
        self.kernels("silu_mul_fused")?
            .silu_mul_fused(gate_up, ffn, out)
    }

    /// See [`crate::cpu::embedding`].
    pub fn embedding(&self, table: &WeightView<'_>, ids: &[u32], out: &mut [f32]) -> Result<()> {
        self.kernels("embedding")?.embedding(table, ids, out)
    }

    /// See [`crate::cpu::write_kv`].
    pub fn write_kv(
        &self,
        k_new: &[f32],
        v_new: &[f32],
        slots: &[usize],
        k_cache: &mut [f32],
        v_cache: &mut [f32],
        layout: &KvCacheLayout,
    ) -> Result<()> {
        self.kernels("write_kv")?
            .write_kv(k_new, v_new, slots, k_cache, v_cache, layout)
    }

    /// See [`crate::cpu::paged_attention`].
    pub fn paged_attention(
        &self,
        q: &[f32],
        heads: &AttentionHeads,
        cache: &KvCache<'_>,
        seqs: &[SeqAttention<'_>],
        out: &mut [f32],
    ) -> Result<()> {
        self.kernels("paged_attention")?
            .paged_attention(q, heads, cache, seqs, out)
    }

    /// See [`Kernels::lora`].
    pub fn lora(
        &self,
        x: &[f32],
        tokens: &[Option<SlotIdx>],
        targets: &[LoraTarget<'_>],
        y: &mut [f32],
        y_width: usize,
    ) -> Result<()> {
        self.kernels("lora")?.lora(x, tokens, targets, y, y_width)
    }
}

/// Without the `cuda` feature there is no CUDA backend: a typed error, never a panic.
#[cfg(not(feature = "cuda"))]
fn cuda_kernels(op: &'static str, ordinal: usize) -> Result<&'static dyn Kernels> {
    Err(crate::error::KernelError::CudaNotCompiled { op, ordinal })
}

/// With the feature, the CUDA module provides
/// `pub fn kernels(ordinal: usize) -> Result<&'static dyn Kernels, KernelError>`.
#[cfg(feature = "cuda")]
fn cuda_kernels(_op: &'static str, ordinal: usize) -> Result<&'static dyn Kernels> {
    crate::cuda::kernels(ordinal)
}
