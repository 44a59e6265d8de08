//! The device-resident Llama runtime (feature `cuda`).
//!
//! [`CudaLlama`] uploads a [`LlamaModel`]'s weights once (dense matrices as f16, int4
//! layers in AutoAWQ's layout, norms f32), keeps the paged KV cache's K/V blocks and the
//! hot adapter slots in device memory, and runs [`CudaLlama::forward`] over the same
//! [`ForwardBatch`] the CPU model takes, returning the same [`ForwardOutput`] (the
//! logits rows asked for, downloaded). The scheduler and the `KvCacheManager` stay on
//! the host: block tables, slots and copy-on-write decisions are theirs, the runtime
//! owns only the bytes.
//!
//! Activations are f32 on the device, like the CPU path's: greedy decoding then agrees
//! with the CPU engine token for token (the only differences are summation order and
//! `sincosf`), and at decode batch sizes the activations are a rounding error of the
//! bytes a step moves (weights dominate). The AWQ tensor-core path rounds activations to
//! f16 inside the kernel, as documented in `ops::awq`.
//!
//! One byte budget: the runtime reserves its weights (as `Other`) and its hot adapter
//! stacks (as `AdapterHot`) from the [`MemoryBudget`] it is given; the KV pool's bytes
//! are reserved from the same budget by the `KvCacheManager` whose geometry the device
//! storage mirrors (build the manager on that budget, as the engine does). KV pages and
//! adapter pages thus compete for one capacity, S-LoRA's unified pool, with
//! [`ForwardError::DeviceBudget`] when it is full.
//!
//! All kernel calls go through `batos_kernels::cuda::ops`'s typed launchers; this
//! module has no `unsafe`.

mod kv;
mod lora;
mod weights;

use std::ops::Range;
use std::sync::Arc;

use batos_kernels::cuda::ops::attention::{self, AttentionBatch, PagedKvLayout, SeqQuery};
use batos_kernels::cuda::ops::dense;
use batos_kernels::cuda::ops::elementwise::{self, RopeShape};
use batos_kernels::cuda::ops::lora::{self as lora_ops, LoraMode, LoraPlan};
use batos_kernels::cuda::ops::sampling;
use batos_kernels::cuda::{CudaDevice, CudaError, DeviceBuffer};
use batos_kernels::KernelError;
use batos_lora::{HotSnapshot, Projection};
use batos_types::{MemoryBudget, Reservation, ReservationKind, SlotIdx};

use super::batch::{BatchLimits, ForwardBatch, ForwardOutput, StepPlan};
use super::cache::KvCacheMut;
use super::error::ForwardError;
use super::llama::{LlamaDims, LlamaModel};
use kv::DeviceKv;
use lora::{DeviceLora, ProjShapes};
pub use lora::{LoraCapacity, LoraCounters};
use weights::{DeviceLinear, DeviceWeights};

/// The activation (and KV cache) element type on the device.
type Act = f32;

pub(crate) fn cuda_err(op: &'static str) -> impl FnOnce(CudaError) -> ForwardError {
    move |e| ForwardError::Kernel {
        op,
        source: KernelError::Cuda {
            op,
            source: e.into(),
        },
    }
}

/// Byte counts of a [`CudaLlama`] (what it holds on the device and against the budget).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaMemory {
    /// Weights (dense f16, int4 packed, norms).
    pub weights: u64,
    /// K/V storage (reserved by the cache manager, not by the runtime).
    pub kv: u64,
    /// Hot adapter stacks.
    pub adapters: u64,
    /// Weight bytes one decode step reads (every layer and the output head).
    pub weight_bytes_per_step: u64,
    /// Slot writes and stack builds of the hot adapter stacks since the runtime was built.
    pub adapter_uploads: LoraCounters,
}

/// A Llama model resident on one GPU. See the module docs.
pub struct CudaLlama {
    dev: Arc<CudaDevice>,
    dims: LlamaDims,
    inv_freq: DeviceBuffer<f32>,
    weights: DeviceWeights,
    kv: Option<DeviceKv>,
    lora: DeviceLora,
    weights_reservation: Reservation,
}

impl std::fmt::Debug for CudaLlama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaLlama")
            .field("device", &self.dev)
            .field("dims", &self.dims)
            .field("memory", &self.memory())
            .finish_non_exhaustive()
    }
}

/// Everything one step shares across layers.
struct DeviceStep {
    tokens: usize,
    positions: DeviceBuffer<i32>,
    slots: Vec<usize>,
    attn: AttentionBatch,
    /// Attention of the rows that get logits (the last layer's queries).
    attn_kept: AttentionBatch,
    /// Rows of the flat token axis that get logits, ascending.
    kept: Vec<i32>,
    lora: Option<(LoraPlan, LoraPlan)>,
}

/// Step activations `[rows, width]`.
struct Buffers {
    x: DeviceBuffer<Act>,
    h: DeviceBuffer<Act>,
}

impl CudaLlama {
    /// Uploads `model`'s weights to `dev`, reserving their bytes from `budget` first
    /// ([`ForwardError::DeviceBudget`] when they do not fit). The budget is kept for
    /// the hot adapter slots.
    pub fn upload(
        model: &LlamaModel,
        dev: Arc<CudaDevice>,
        budget: &MemoryBudget,
    ) -> Result<CudaLlama, ForwardError> {
        let parts = model.parts()?;
        let dims = *model.dims();
        let bytes = weights::device_bytes(&parts);
        let reservation = budget
            .reserve(ReservationKind::Other, bytes)
            .map_err(|source| ForwardError::DeviceBudget {
                what: "model weights",
                source,
            })?;
        let started = std::time::Instant::now();
        let weights = DeviceWeights::upload(&dev, &parts)?;
        let inv_freq = dev
            .upload(parts.rope.inv_freq())
            .map_err(cuda_err("upload inv_freq"))?;
        dev.synchronize().map_err(cuda_err("upload weights"))?;
        tracing::info!(
            device = dev.name(),
            bytes,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "model weights on the device"
        );
        Ok(CudaLlama {
            lora: DeviceLora::new(&dev, budget, dims.num_layers)?,
            dev,
            dims,
            inv_freq,
            weights,
            kv: None,
            weights_reservation: reservation,
        })
    }

    /// The device.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// The sizes this model runs with.
    pub fn dims(&self) -> &LlamaDims {
        &self.dims
    }

    /// Bytes held on the device.
    pub fn memory(&self) -> CudaMemory {
        CudaMemory {
            weights: self.weights_reservation.bytes(),
            kv: self.kv.as_ref().map_or(0, |k| k.bytes() as u64),
            adapters: self.lora.bytes(),
            weight_bytes_per_step: self.weights.bytes_per_step() as u64,
            adapter_uploads: self.lora.counters,
        }
    }

    /// Drops the device copy of the KV pool: the next [`CudaLlama::forward`] allocates
    /// storage for the cache it is given. Call it when switching to another
    /// `KvCacheManager` (a cache of a different size is otherwise
    /// [`ForwardError::CacheMismatch`], since the runtime cannot tell a new cache from
    /// a resized one).
    pub fn reset_kv(&mut self) {
        self.kv = None;
    }

    /// Builds the hot adapter stacks for `capacity` now (every (layer, projection)
    /// stack sized `capacity.slots × capacity.max_rank`), reserving their bytes from the
    /// budget ([`ForwardError::DeviceBudget`] when they do not fit). Afterwards a cold →
    /// hot load writes one adapter's rows and allocates nothing. Without this call the
    /// stacks are sized by the first snapshot that fills a slot (rank rounded up to a
    /// power of two) and rebuilt if a later adapter outgrows them.
    pub fn reserve_adapters(&mut self, capacity: LoraCapacity) -> Result<(), ForwardError> {
        let shapes = self.proj_shapes();
        self.lora.reserve(&self.dev, capacity, &shapes)?;
        self.dev
            .synchronize()
            .map_err(cuda_err("allocate LoRA stacks"))
    }

    /// Queues the slot writes that make the device's stacks match `adapters` on the
    /// upload stream and returns without waiting: steps that read other slots run
    /// while the copies are in flight, and the first step whose tokens use a written
    /// slot waits for them on the device. Call it as soon as a new adapter is hot
    /// (before the step that first uses it) to overlap its upload with compute; the
    /// step itself would otherwise issue the writes and wait for them at once.
    pub fn prefetch_adapters(&mut self, adapters: &HotSnapshot) -> Result<(), ForwardError> {
        let shapes = self.proj_shapes();
        self.lora.sync(&self.dev, adapters, &shapes)
    }

    /// Makes the device's adapter stacks match `adapters` now (the step does this
    /// itself, on the upload stream; calling it ahead of time takes the upload out of
    /// the first step and lets a bench time the cold → hot upload alone). Waits for
    /// the uploads.
    pub fn sync_adapters(&mut self, adapters: &HotSnapshot) -> Result<(), ForwardError> {
        let shapes = self.proj_shapes();
        self.lora.sync(&self.dev, adapters, &shapes)?;
        self.lora.synchronize()?;
        self.dev
            .synchronize()
            .map_err(cuda_err("rebuild LoRA stacks"))
    }

    fn proj_shapes(&self) -> ProjShapes {
        let d = &self.dims;
        let (hid, qw, kvw, ffn) = (
            d.hidden_size,
            d.num_heads * d.head_dim,
            d.num_kv_heads * d.head_dim,
            d.intermediate_size,
        );
        // Projection::ALL order: q, k, v, o, gate, up, down.
        [
            (hid, qw),
            (hid, kvw),
            (hid, kvw),
            (qw, hid),
            (hid, ffn),
            (hid, ffn),
            (ffn, hid),
        ]
    }

    fn check_cache(&self, cache: &dyn KvCacheMut) -> Result<PagedKvLayout, ForwardError> {
        let l = cache.layout();
        let checks = [
            ("layers", self.dims.num_layers, cache.num_layers()),
            ("kv heads", self.dims.num_kv_heads, l.num_kv_heads()),
            ("head dim", self.dims.head_dim, l.head_dim()),
        ];
        for (what, expected, got) in checks {
            if expected != got {
                return Err(ForwardError::CacheMismatch {
                    what,
                    expected,
                    got,
                });
            }
        }
        Ok(PagedKvLayout {
            num_blocks: cache.num_blocks(),
            block_size: l.block_size(),
            num_kv_heads: l.num_kv_heads(),
            head_dim: l.head_dim(),
        })
    }

    /// The device KV storage mirroring `cache`'s geometry, allocated on first use, with
    /// the manager's copy-on-write block copies replayed.
    fn kv_for(&mut self, cache: &mut dyn KvCacheMut) -> Result<(), ForwardError> {
        let layout = self.check_cache(cache)?;
        match &self.kv {
            Some(kv) if kv.layout != layout => {
                return Err(ForwardError::CacheMismatch {
                    what: "blocks in the device KV mirror",
                    expected: kv.layout.num_blocks,
                    got: layout.num_blocks,
                })
            }
            Some(_) => {}
            None => {
                let kv = DeviceKv::new(&self.dev, layout, self.dims.num_layers)
                    .map_err(cuda_err("allocate device KV"))?;
                tracing::info!(
                    blocks = layout.num_blocks,
                    bytes = kv.bytes(),
                    "KV pool on the device"
                );
                self.kv = Some(kv);
            }
        }
        let copies = cache.take_block_copies();
        if !copies.is_empty() {
            let dev = self.dev.clone();
            if let Some(kv) = &mut self.kv {
                kv.copy_blocks(&dev, &copies)
                    .map_err(cuda_err("copy KV blocks"))?;
            }
        }
        Ok(())
    }

    /// Runs one step on the device: every new token of `batch`, K/V written into the
    /// device copy of `cache`'s blocks (the `cache` argument supplies geometry and the
    /// manager's block copies; its host buffers are not touched), logits rows
    /// downloaded. `adapters` is the hot tier ([`LlamaModel::forward_with_adapters`]'s
    /// snapshot); `None` runs the base model and refuses a step naming a slot.
    pub fn forward(
        &mut self,
        batch: &ForwardBatch,
        cache: &mut dyn KvCacheMut,
        adapters: Option<&HotSnapshot>,
    ) -> Result<ForwardOutput, ForwardError> {
        let (plan, logits) = self.step(batch, cache, adapters)?;
        let logits = match logits {
            Some(l) => l.to_host().map_err(cuda_err("download logits"))?,
            None => Vec::new(),
        };
        Ok(ForwardOutput {
            logits,
            vocab_size: self.dims.vocab_size,
            seq_rows: plan.output_rows,
        })
    }

    /// [`CudaLlama::forward`] for greedy decoding: the argmax of every logits row is
    /// taken on the device and only the token ids come back (4 bytes a row instead of
    /// `4 × vocab`). Ties go to the lowest id and NaN never wins, as
    /// `batos_kernels::cpu::argmax`.
    pub fn forward_greedy(
        &mut self,
        batch: &ForwardBatch,
        cache: &mut dyn KvCacheMut,
        adapters: Option<&HotSnapshot>,
    ) -> Result<GreedyOutput, ForwardError> {
        let (plan, logits) = self.step(batch, cache, adapters)?;
        let tokens = match logits {
            Some(l) => {
                let mut ids = self
                    .dev
                    .alloc::<u32>(plan.logits_rows.len())
                    .map_err(cuda_err("alloc"))?;
                sampling::argmax(&self.dev, &l, self.dims.vocab_size, &mut ids)
                    .map_err(cuda_err("argmax"))?;
                ids.to_host().map_err(cuda_err("download token ids"))?
            }
            None => Vec::new(),
        };
        Ok(GreedyOutput {
            tokens,
            seq_rows: plan.output_rows,
        })
    }

    /// The step's layers and head; the logits stay on the device (`None` when no row
    /// asked for them).
    fn step(
        &mut self,
        batch: &ForwardBatch,
        cache: &mut dyn KvCacheMut,
        adapters: Option<&HotSnapshot>,
    ) -> Result<(StepPlan, Option<DeviceBuffer<Act>>), ForwardError> {
        self.kv_for(cache)?;
        let plan = StepPlan::new(batch, BatchLimits::for_step(&self.dims, cache, adapters))?;
        let token_slots = batch.token_adapters();
        if let Some(snap) = adapters {
            check_slots(batch, snap)?;
            if token_slots.iter().any(Option::is_some) {
                let shapes = self.proj_shapes();
                self.lora.sync(&self.dev, snap, &shapes)?;
                // Only the slots this step reads must have landed; other slots' writes
                // keep overlapping the step.
                self.lora
                    .wait_for(&self.dev, batch.seqs.iter().filter_map(|s| s.adapter))?;
            }
        }
        let step = self.step_data(batch, &plan, &token_slots, adapters)?;
        let mut buf = self.embed(&plan.token_ids)?;
        let num_layers = self.weights.layers.len();
        for i in 0..num_layers {
            self.layer(i, i + 1 == num_layers, &step, &mut buf)?;
        }
        let logits = self.logits(&plan, &buf.x)?;
        Ok((plan, logits))
    }

    fn step_data(
        &self,
        batch: &ForwardBatch,
        plan: &StepPlan,
        token_slots: &[Option<SlotIdx>],
        adapters: Option<&HotSnapshot>,
    ) -> Result<DeviceStep, ForwardError> {
        let dev = &*self.dev;
        let kv = self
            .kv
            .as_ref()
            .map(|k| k.layout)
            .ok_or(ForwardError::CacheMismatch {
                what: "device KV pool",
                expected: 1,
                got: 0,
            })?;
        let queries: Vec<SeqQuery<'_>> = batch
            .seqs
            .iter()
            .map(|s| SeqQuery {
                block_table: &s.block_table,
                first_pos: s.num_cached,
                tokens: s.token_ids.len(),
            })
            .collect();
        let kept_queries: Vec<SeqQuery<'_>> = batch
            .seqs
            .iter()
            .zip(&plan.output_rows)
            .filter(|(_, rows)| !rows.is_empty())
            .map(|(s, rows)| SeqQuery {
                block_table: &s.block_table,
                first_pos: s.context_len() - rows.len(),
                tokens: rows.len(),
            })
            .collect();
        let positions: Vec<i32> = plan.positions.iter().map(|&p| p as i32).collect();
        let kept: Vec<i32> = plan.logits_rows.iter().map(|&r| r as i32).collect();
        let lora = match adapters {
            Some(snap) if token_slots.iter().any(Option::is_some) => {
                let kept_slots: Vec<Option<SlotIdx>> =
                    plan.logits_rows.iter().map(|&r| token_slots[r]).collect();
                let decode = batch.seqs.iter().all(|s| s.token_ids.len() == 1);
                let mode = if decode {
                    LoraMode::Bgmv
                } else {
                    LoraMode::Sgmv
                };
                Some((
                    LoraPlan::new(dev, mode, snap.len(), token_slots)
                        .map_err(cuda_err("LoRA plan"))?,
                    LoraPlan::new(dev, LoraMode::Bgmv, snap.len(), &kept_slots)
                        .map_err(cuda_err("LoRA plan"))?,
                ))
            }
            _ => None,
        };
        Ok(DeviceStep {
            tokens: plan.token_ids.len(),
            positions: dev
                .upload(&positions)
                .map_err(cuda_err("upload positions"))?,
            slots: plan.slots.clone(),
            attn: AttentionBatch::new(dev, kv, &queries).map_err(cuda_err("attention batch"))?,
            attn_kept: AttentionBatch::new(dev, kv, &kept_queries)
                .map_err(cuda_err("attention batch"))?,
            kept,
            lora,
        })
    }

    fn embed(&self, ids: &[u32]) -> Result<Buffers, ForwardError> {
        let dev = &*self.dev;
        let hid = self.dims.hidden_size;
        let t = ids.len();
        let mut x = dev.alloc::<Act>(t * hid).map_err(cuda_err("alloc"))?;
        dense::embed_f16(dev, &self.weights.embed, ids, &mut x).map_err(cuda_err("embedding"))?;
        Ok(Buffers {
            x,
            h: dev.alloc::<Act>(t * hid).map_err(cuda_err("alloc"))?,
        })
    }

    /// `y += LoRA(x)` for projection `proj` of `layer`, when any token has an adapter
    /// that adapts it. `kept` picks the plan of the rows that get logits.
    fn lora(
        &self,
        step: &DeviceStep,
        kept: bool,
        (layer, proj): (usize, Projection),
        x: &DeviceBuffer<Act>,
        y: &mut DeviceBuffer<Act>,
    ) -> Result<(), ForwardError> {
        let (Some((all, kept_plan)), Some(stack)) = (&step.lora, self.lora.stack(layer, proj))
        else {
            return Ok(());
        };
        let plan = if kept { kept_plan } else { all };
        lora_ops::lora_apply(&self.dev, stack, plan, x, y).map_err(cuda_err("lora"))
    }

    fn linear(
        &self,
        op: &'static str,
        w: &DeviceLinear,
        x: &DeviceBuffer<Act>,
        rows: usize,
        out: usize,
    ) -> Result<DeviceBuffer<Act>, ForwardError> {
        let mut y = self
            .dev
            .alloc::<Act>(rows * out)
            .map_err(cuda_err("alloc"))?;
        w.run(&self.dev, x, rows, &mut y).map_err(cuda_err(op))?;
        Ok(y)
    }

    fn cols(
        &self,
        fused: &DeviceBuffer<Act>,
        stride: usize,
        offset: usize,
        width: usize,
    ) -> Result<DeviceBuffer<Act>, ForwardError> {
        let rows = fused.len() / stride;
        let mut out = self
            .dev
            .alloc::<Act>(rows * width)
            .map_err(cuda_err("alloc"))?;
        dense::copy_cols(&self.dev, fused, stride, offset, width, &mut out)
            .map_err(cuda_err("split fused projection"))?;
        Ok(out)
    }

    /// One decoder layer. In the `last` layer only the rows that get logits go on past
    /// the K/V write, as on the CPU.
    fn layer(
        &mut self,
        i: usize,
        last: bool,
        step: &DeviceStep,
        buf: &mut Buffers,
    ) -> Result<(), ForwardError> {
        let d = self.dims;
        let dev = self.dev.clone();
        let (hid, qw, kvw, ffn) = (
            d.hidden_size,
            d.num_heads * d.head_dim,
            d.num_kv_heads * d.head_dim,
            d.intermediate_size,
        );
        let mut rows = step.tokens;
        let lw = &self.weights.layers[i];
        elementwise::rms_norm(&dev, &buf.x, &lw.attn_norm, d.rms_norm_eps, &mut buf.h)
            .map_err(cuda_err("attn rms_norm"))?;
        let qkv = self.linear("qkv_proj", &lw.qkv, &buf.h, rows, qw + 2 * kvw)?;
        let mut q = self.cols(&qkv, qw + 2 * kvw, 0, qw)?;
        let mut k = self.cols(&qkv, qw + 2 * kvw, qw, kvw)?;
        let mut v = self.cols(&qkv, qw + 2 * kvw, qw + kvw, kvw)?;
        drop(qkv);
        self.lora(step, false, (i, Projection::Q), &buf.h, &mut q)?;
        self.lora(step, false, (i, Projection::K), &buf.h, &mut k)?;
        self.lora(step, false, (i, Projection::V), &buf.h, &mut v)?;
        let shape = RopeShape {
            tokens: rows,
            heads: d.num_heads,
            kv_heads: d.num_kv_heads,
            head_dim: d.head_dim,
        };
        elementwise::rope(&dev, &mut q, &mut k, &step.positions, &self.inv_freq, shape)
            .map_err(cuda_err("rope"))?;
        let kv = self.kv.as_mut().ok_or(ForwardError::CacheMismatch {
            what: "device KV pool",
            expected: 1,
            got: 0,
        })?;
        let layout = kv.layout;
        let cache = &mut kv.layers[i];
        attention::write_kv(
            &dev,
            layout,
            &k,
            &v,
            &step.slots,
            &mut cache.k,
            &mut cache.v,
        )
        .map_err(cuda_err("write_kv"))?;
        let mut attn_batch = &step.attn;
        let kept = last && step.kept.len() < rows;
        if kept {
            rows = step.kept.len();
            attn_batch = &step.attn_kept;
            let mut x = dev.alloc::<Act>(rows * hid).map_err(cuda_err("alloc"))?;
            dense::gather_rows(&dev, &buf.x, hid, &step.kept, &mut x)
                .map_err(cuda_err("keep rows"))?;
            let mut qk = dev.alloc::<Act>(rows * qw).map_err(cuda_err("alloc"))?;
            dense::gather_rows(&dev, &q, qw, &step.kept, &mut qk).map_err(cuda_err("keep rows"))?;
            buf.x = x;
            buf.h = dev.alloc::<Act>(rows * hid).map_err(cuda_err("alloc"))?;
            q = qk;
            if rows == 0 {
                return Ok(());
            }
        }
        let cache = &self
            .kv
            .as_ref()
            .expect("device KV pool checked above")
            .layers[i];
        let mut attn = dev.alloc::<Act>(rows * qw).map_err(cuda_err("alloc"))?;
        attention::paged_attention(
            &dev,
            attn_batch,
            d.num_heads,
            &q,
            &cache.k,
            &cache.v,
            &mut attn,
        )
        .map_err(cuda_err("paged_attention"))?;
        drop(q);
        let lw = &self.weights.layers[i];
        let mut proj = self.linear("o_proj", &lw.o_proj, &attn, rows, hid)?;
        self.lora(step, kept, (i, Projection::O), &attn, &mut proj)?;
        dense::add_assign(&dev, &mut buf.x, &proj).map_err(cuda_err("residual"))?;

        elementwise::rms_norm(&dev, &buf.x, &lw.mlp_norm, d.rms_norm_eps, &mut buf.h)
            .map_err(cuda_err("mlp rms_norm"))?;
        let gu = self.linear("gate_up_proj", &lw.gate_up, &buf.h, rows, 2 * ffn)?;
        let mut gate = self.cols(&gu, 2 * ffn, 0, ffn)?;
        let mut up = self.cols(&gu, 2 * ffn, ffn, ffn)?;
        drop(gu);
        self.lora(step, kept, (i, Projection::Gate), &buf.h, &mut gate)?;
        self.lora(step, kept, (i, Projection::Up), &buf.h, &mut up)?;
        let mut act = dev.alloc::<Act>(rows * ffn).map_err(cuda_err("alloc"))?;
        elementwise::silu_mul(&dev, &gate, &up, &mut act).map_err(cuda_err("silu_mul"))?;
        let mut proj = self.linear("down_proj", &lw.down, &act, rows, hid)?;
        self.lora(step, kept, (i, Projection::Down), &act, &mut proj)?;
        dense::add_assign(&dev, &mut buf.x, &proj).map_err(cuda_err("residual"))?;
        Ok(())
    }

    /// Final norm and the output projection over the rows that asked for logits (the
    /// last layer kept only those), on the device; `None` when no row asked.
    fn logits(
        &self,
        plan: &StepPlan,
        x: &DeviceBuffer<Act>,
    ) -> Result<Option<DeviceBuffer<Act>>, ForwardError> {
        let d = &self.dims;
        let dev = &*self.dev;
        let rows = plan.logits_rows.len();
        if rows == 0 {
            return Ok(None);
        }
        let mut normed = dev
            .alloc::<Act>(rows * d.hidden_size)
            .map_err(cuda_err("alloc"))?;
        elementwise::rms_norm(
            dev,
            x,
            &self.weights.final_norm,
            d.rms_norm_eps,
            &mut normed,
        )
        .map_err(cuda_err("final rms_norm"))?;
        let mut logits = dev
            .alloc::<Act>(rows * d.vocab_size)
            .map_err(cuda_err("alloc"))?;
        dense::dense_matmul(dev, self.weights.head(), &normed, rows, &mut logits)
            .map_err(cuda_err("lm_head"))?;
        Ok(Some(logits))
    }
}

/// What [`CudaLlama::forward_greedy`] returns: one token id per logits row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GreedyOutput {
    /// The argmax of every logits row, rows in batch order.
    pub tokens: Vec<u32>,
    /// Per sequence of the batch: its rows in `tokens`.
    pub seq_rows: Vec<Range<usize>>,
}

impl GreedyOutput {
    /// The greedy token after sequence `seq`'s last new token, when it asked for logits.
    pub fn last_token(&self, seq: usize) -> Option<u32> {
        let rows = self.seq_rows.get(seq)?;
        rows.clone()
            .last()
            .and_then(|r| self.tokens.get(r).copied())
    }
}

/// Every slot the batch names must be filled in the snapshot (the CPU path fails the
/// same batch in its LoRA kernel).
fn check_slots(batch: &ForwardBatch, snap: &HotSnapshot) -> Result<(), ForwardError> {
    for (seq, s) in batch.seqs.iter().enumerate() {
        if let Some(slot) = s.adapter {
            if !snap.is_filled(slot) {
                return Err(ForwardError::EmptyAdapterSlot {
                    seq,
                    slot,
                    slots: snap.len(),
                });
            }
        }
    }
    Ok(())
}
