//! Paged attention and the KV write (`kernels/attention.cu`), over the cache
//! layout of CONTRACTS.md: per layer one K and one V buffer of
//! [num_blocks, block_size, num_kv_heads, head_dim].

use batos_types::BlockId;

use super::super::device::CudaDevice;
use super::super::error::{CudaError, CudaResult};
use super::super::pool::DeviceBuffer;
use super::super::registry::ModuleId;
use cudarc::driver::PushKernelArg;

use super::{as_i32, as_u32, cfg, kname, launch, Activation};

/// Positions per decode partition (must match `DEC_PARTITION` in the kernel).
pub const DECODE_PARTITION: usize = 256;
/// Largest GQA group (query heads per KV head) the kernels take.
pub const MAX_GROUP: usize = 8;
/// Largest head dimension of the prefill kernel.
pub const PREFILL_MAX_HEAD_DIM: usize = 128;
const PF_BQ: usize = 16;
const PF_BKV: usize = 32;
const THREADS: usize = 128;
const MAX_SHARED: usize = 48 * 1024;

/// Geometry of one layer's paged cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedKvLayout {
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// KV heads.
    pub num_kv_heads: usize,
    /// Head dimension.
    pub head_dim: usize,
}

impl PagedKvLayout {
    /// Elements of one K (or V) cache buffer.
    pub fn cache_len(self) -> usize {
        self.num_blocks * self.block_size * self.num_kv_heads * self.head_dim
    }
    /// Elements of one token's K (or V) row: kv_heads × head_dim.
    pub fn row_len(self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// The new query tokens of one sequence: `tokens` consecutive positions starting
/// at `first_pos`, whose rows in q/out are consecutive (sequences in batch order).
#[derive(Clone, Copy, Debug)]
pub struct SeqQuery<'a> {
    /// The sequence's block table.
    pub block_table: &'a [BlockId],
    /// Position of the first new token.
    pub first_pos: usize,
    /// Number of new tokens (1 for decode).
    pub tokens: usize,
}

/// Device metadata of one attention batch, built once per step and reused by every layer.
#[derive(Debug)]
pub struct AttentionBatch {
    tok_seq: DeviceBuffer<i32>,
    tok_pos: DeviceBuffer<i32>,
    block_tables: DeviceBuffer<i32>,
    tile_start: DeviceBuffer<i32>,
    tile_len: DeviceBuffer<i32>,
    tokens: usize,
    tiles: usize,
    max_blocks: usize,
    max_ctx: usize,
    max_seq_tokens: usize,
    layout: PagedKvLayout,
}

impl AttentionBatch {
    /// Validates the block tables against `layout` and uploads the metadata.
    pub fn new(dev: &CudaDevice, layout: PagedKvLayout, seqs: &[SeqQuery<'_>]) -> CudaResult<Self> {
        const OP: &str = "AttentionBatch::new";
        if layout.block_size == 0 {
            return Err(CudaError::invalid(OP, "block_size is 0"));
        }
        let max_blocks = seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let (mut tok_seq, mut tok_pos) = (vec![], vec![]);
        let (mut tile_start, mut tile_len) = (vec![], vec![]);
        let mut tables = vec![0i32; seqs.len() * max_blocks];
        let (mut max_ctx, mut max_seq_tokens) = (0, 0);
        for (i, s) in seqs.iter().enumerate() {
            let ctx = s.first_pos + s.tokens;
            if s.block_table.len() * layout.block_size < ctx {
                return Err(CudaError::invalid(
                    OP,
                    format!(
                        "sequence {i}: {} blocks of {} cannot hold {ctx} positions",
                        s.block_table.len(),
                        layout.block_size
                    ),
                ));
            }
            for (j, b) in s.block_table.iter().enumerate() {
                if b.index() >= layout.num_blocks {
                    return Err(CudaError::invalid(
                        OP,
                        format!(
                            "sequence {i}: block {} outside the pool of {}",
                            b.index(),
                            layout.num_blocks
                        ),
                    ));
                }
                tables[i * max_blocks + j] = b.0 as i32;
            }
            let first_row = tok_seq.len();
            for p in s.first_pos..ctx {
                tok_seq.push(i as i32);
                tok_pos.push(as_i32(OP, "position", p)?);
            }
            let mut t = 0;
            while t < s.tokens {
                let n = (s.tokens - t).min(PF_BQ);
                tile_start.push(as_i32(OP, "row", first_row + t)?);
                tile_len.push(n as i32);
                t += n;
            }
            max_ctx = max_ctx.max(ctx);
            max_seq_tokens = max_seq_tokens.max(s.tokens);
        }
        as_i32(OP, "block ids", layout.num_blocks)?;
        Ok(AttentionBatch {
            tokens: tok_seq.len(),
            tiles: tile_start.len(),
            tok_seq: dev.upload(&tok_seq)?,
            tok_pos: dev.upload(&tok_pos)?,
            block_tables: dev.upload(&tables)?,
            tile_start: dev.upload(&tile_start)?,
            tile_len: dev.upload(&tile_len)?,
            max_blocks,
            max_ctx,
            max_seq_tokens,
            layout,
        })
    }

    /// Query tokens in the batch.
    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// The longest context (last position + 1) of any token.
    pub fn max_context(&self) -> usize {
        self.max_ctx
    }
}

/// Which attention kernel a batch takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionKernel {
    /// One query per sequence: split-K decode.
    Decode,
    /// Chunks of queries: flash-style prefill.
    Prefill,
}

/// The kernel [`paged_attention`] uses for `batch`.
pub fn attention_plan(batch: &AttentionBatch, head_dim: usize) -> AttentionKernel {
    if batch.max_seq_tokens <= 1 || head_dim > PREFILL_MAX_HEAD_DIM {
        AttentionKernel::Decode
    } else {
        AttentionKernel::Prefill
    }
}

/// Scatters `k_new`, `v_new` [tokens, kv_heads*head_dim] into the caches at `slots`
/// (slot = block * block_size + offset).
pub fn write_kv<T: Activation>(
    dev: &CudaDevice,
    layout: PagedKvLayout,
    k_new: &DeviceBuffer<T>,
    v_new: &DeviceBuffer<T>,
    slots: &[usize],
    k_cache: &mut DeviceBuffer<T>,
    v_cache: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    const OP: &str = "write_kv";
    let row = layout.row_len();
    CudaError::check_len(OP, "k_new", slots.len() * row, k_new.len())?;
    CudaError::check_len(OP, "v_new", slots.len() * row, v_new.len())?;
    CudaError::check_len(OP, "k_cache", layout.cache_len(), k_cache.len())?;
    CudaError::check_len(OP, "v_cache", layout.cache_len(), v_cache.len())?;
    let cap = layout.num_blocks * layout.block_size;
    if let Some((t, s)) = slots.iter().enumerate().find(|(_, s)| **s >= cap) {
        return Err(CudaError::invalid(
            OP,
            format!("token {t}: slot {s} outside the cache of {cap} slots"),
        ));
    }
    if slots.is_empty() {
        return Ok(());
    }
    let slots_i: Vec<i64> = slots.iter().map(|s| *s as i64).collect();
    let slots_dev = dev.upload(&slots_i)?;
    let (grid, row_i) = (as_u32(OP, "tokens", slots.len())?, as_i32(OP, "row", row)?);
    let f = dev.function(ModuleId::Attention, &kname::<T>("write_kv"))?;
    let (kv, vv, sv, mut kc, mut vc) = (
        k_new.view(),
        v_new.view(),
        slots_dev.view(),
        k_cache.view_mut(),
        v_cache.view_mut(),
    );
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&kv)
        .arg(&vv)
        .arg(&sv)
        .arg(&mut kc)
        .arg(&mut vc)
        .arg(&row_i);
    // SAFETY: write_kv_<T>(k_new, v_new, const i64* slots, k_cache, v_cache, int row);
    // block t copies row elements from k_new[t*row] to cache[slots[t]*row], and every
    // slot was checked to be < num_blocks*block_size.
    unsafe { launch(OP, &mut args, cfg((grid, 1, 1), 128, 0)) }
}

fn check_attention<T: Activation>(
    op: &'static str,
    batch: &AttentionBatch,
    heads: usize,
    q: &DeviceBuffer<T>,
    k_cache: &DeviceBuffer<T>,
    v_cache: &DeviceBuffer<T>,
    out: &DeviceBuffer<T>,
) -> CudaResult<usize> {
    let l = batch.layout;
    if l.num_kv_heads == 0 || !heads.is_multiple_of(l.num_kv_heads) {
        return Err(CudaError::invalid(
            op,
            format!(
                "{heads} heads is not a multiple of {} kv heads",
                l.num_kv_heads
            ),
        ));
    }
    let group = heads / l.num_kv_heads;
    if group > MAX_GROUP {
        return Err(CudaError::invalid(
            op,
            format!("GQA group {group} > {MAX_GROUP}"),
        ));
    }
    if l.head_dim == 0 || !l.head_dim.is_multiple_of(4) {
        return Err(CudaError::invalid(
            op,
            format!("head_dim {} must be a positive multiple of 4", l.head_dim),
        ));
    }
    CudaError::check_len(op, "q", batch.tokens * heads * l.head_dim, q.len())?;
    CudaError::check_len(op, "out", batch.tokens * heads * l.head_dim, out.len())?;
    CudaError::check_len(op, "k_cache", l.cache_len(), k_cache.len())?;
    CudaError::check_len(op, "v_cache", l.cache_len(), v_cache.len())?;
    Ok(group)
}

/// Causal GQA attention of the batch's queries over the cache, scale 1/sqrt(hd),
/// choosing the kernel with [`attention_plan`].
pub fn paged_attention<T: Activation>(
    dev: &CudaDevice,
    batch: &AttentionBatch,
    heads: usize,
    q: &DeviceBuffer<T>,
    k_cache: &DeviceBuffer<T>,
    v_cache: &DeviceBuffer<T>,
    out: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    match attention_plan(batch, batch.layout.head_dim) {
        AttentionKernel::Decode => {
            paged_attention_decode(dev, batch, heads, q, k_cache, v_cache, out)
        }
        AttentionKernel::Prefill => {
            paged_attention_prefill(dev, batch, heads, q, k_cache, v_cache, out)
        }
    }
}

/// Split-K decode kernel (valid for any batch; best for one query per sequence).
pub fn paged_attention_decode<T: Activation>(
    dev: &CudaDevice,
    batch: &AttentionBatch,
    heads: usize,
    q: &DeviceBuffer<T>,
    k_cache: &DeviceBuffer<T>,
    v_cache: &DeviceBuffer<T>,
    out: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    const OP: &str = "paged_attention_decode";
    let group = check_attention(OP, batch, heads, q, k_cache, v_cache, out)?;
    if batch.tokens == 0 {
        return Ok(());
    }
    let l = batch.layout;
    let hd = l.head_dim;
    // The kernel reads K/V in 16-byte chunks: 4 (f32) or 8 (f16, bf16) elements,
    // at most 32 chunks (one warp) per row.
    let vw = 16 / std::mem::size_of::<T>();
    if !hd.is_multiple_of(vw) || hd / vw > 32 {
        return Err(CudaError::invalid(
            OP,
            format!(
                "head_dim {hd} must be a multiple of {vw} and at most {} for {}",
                32 * vw,
                T::SUFFIX
            ),
        ));
    }
    as_i32(OP, "cache slots", l.num_blocks * l.block_size)?;
    let kg = (THREADS / (hd / vw)).max(1);
    let shared = (group * hd + group * DECODE_PARTITION + group * hd * kg) * 4;
    // The kernel's static shared memory: the partition's slots and the row statistics.
    let fixed = (DECODE_PARTITION + 2 * MAX_GROUP) * 4;
    if shared + fixed > MAX_SHARED {
        return Err(CudaError::invalid(
            OP,
            format!(
                "head_dim {hd} with group {group} needs {} bytes of shared memory",
                shared + fixed
            ),
        ));
    }
    let part = decode_partition(
        batch.tokens * l.num_kv_heads,
        batch.max_ctx,
        dev.multiprocessors(),
    );
    let splits = batch.max_ctx.div_ceil(part).max(1);
    let parts = batch.tokens * heads * splits;
    let mut part_o = dev.alloc::<f32>(parts * hd)?;
    let mut part_m = dev.alloc::<f32>(parts)?;
    let mut part_l = dev.alloc::<f32>(parts)?;
    let (nh, nkv, hd_i, bs, mb) = (
        as_i32(OP, "heads", heads)?,
        as_i32(OP, "kv_heads", l.num_kv_heads)?,
        as_i32(OP, "head_dim", hd)?,
        as_i32(OP, "block_size", l.block_size)?,
        as_i32(OP, "max_blocks", batch.max_blocks)?,
    );
    let scale = 1.0f32 / (hd as f32).sqrt();
    let part_i = part as i32; // <= DECODE_PARTITION
    let grid = (
        as_u32(OP, "tokens", batch.tokens)?,
        as_u32(OP, "kv_heads", l.num_kv_heads)?,
        as_u32(OP, "splits", splits)?,
    );
    {
        let f = dev.function(ModuleId::Attention, &kname::<T>("paged_decode"))?;
        let (qv, kc, vc, ts, tp, bt) = (
            q.view(),
            k_cache.view(),
            v_cache.view(),
            batch.tok_seq.view(),
            batch.tok_pos.view(),
            batch.block_tables.view(),
        );
        let (mut po, mut pm, mut pl) = (part_o.view_mut(), part_m.view_mut(), part_l.view_mut());
        let mut args = dev.stream().launch_builder(&f);
        args.arg(&qv)
            .arg(&kc)
            .arg(&vc)
            .arg(&ts)
            .arg(&tp)
            .arg(&bt)
            .arg(&mut po)
            .arg(&mut pm)
            .arg(&mut pl)
            .arg(&nh)
            .arg(&nkv)
            .arg(&hd_i)
            .arg(&bs)
            .arg(&mb)
            .arg(&scale)
            .arg(&part_i);
        // SAFETY: paged_decode_<T>(q, k_cache, v_cache, tok_seq, tok_pos, block_tables,
        // part_o, part_m, part_l, nh, nkv, hd, block_size, max_blocks, scale, int part)
        // with part <= DECODE_PARTITION (the kernel's shared score rows) and the
        // dynamic shared size the kernel documents; hd % (16 / sizeof T) == 0 keeps the
        // 16-byte K/V loads aligned and inside the head's row, slots fit i32 (checked
        // above). Every position read is
        // <= tok_pos[t] < blocks(seq)*block_size and every block id < num_blocks
        // (checked in AttentionBatch::new); partials hold tokens*nh*splits entries and
        // gridDim.z == splits.
        unsafe { launch(OP, &mut args, cfg(grid, THREADS as u32, shared as u32))? };
    }
    let f = dev.function(ModuleId::Attention, &kname::<T>("paged_decode_reduce"))?;
    let splits_i = as_i32(OP, "splits", splits)?;
    let (po, pm, pl, mut ov) = (part_o.view(), part_m.view(), part_l.view(), out.view_mut());
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&po)
        .arg(&pm)
        .arg(&pl)
        .arg(&mut ov)
        .arg(&nh)
        .arg(&hd_i)
        .arg(&splits_i);
    let grid = (
        as_u32(OP, "tokens", batch.tokens)?,
        as_u32(OP, "heads", heads)?,
        1,
    );
    // SAFETY: paged_decode_reduce_<T>(part_o, part_m, part_l, out, nh, hd, splits);
    // block (t, h) reads its splits partials and writes out[(t*nh + h)*hd ..+hd].
    unsafe { launch(OP, &mut args, cfg(grid, THREADS as u32, 0)) }
}

/// Positions per decode partition: [`DECODE_PARTITION`], halved (down to 64) while
/// the grid of `rows` (tokens × KV heads) × partitions would not give every SM two
/// blocks, so one sequence or a few short ones still spread over the GPU.
pub(crate) fn decode_partition(rows: usize, max_ctx: usize, sms: usize) -> usize {
    let mut part = DECODE_PARTITION;
    while part > 64 && rows * max_ctx.div_ceil(part) < 2 * sms {
        part /= 2;
    }
    part
}

/// Flash-style prefill kernel (head_dim <= 128).
pub fn paged_attention_prefill<T: Activation>(
    dev: &CudaDevice,
    batch: &AttentionBatch,
    heads: usize,
    q: &DeviceBuffer<T>,
    k_cache: &DeviceBuffer<T>,
    v_cache: &DeviceBuffer<T>,
    out: &mut DeviceBuffer<T>,
) -> CudaResult<()> {
    const OP: &str = "paged_attention_prefill";
    check_attention(OP, batch, heads, q, k_cache, v_cache, out)?;
    let l = batch.layout;
    let hd = l.head_dim;
    if hd > PREFILL_MAX_HEAD_DIM {
        return Err(CudaError::invalid(
            OP,
            format!("head_dim {hd} > {PREFILL_MAX_HEAD_DIM}; use paged_attention_decode"),
        ));
    }
    if batch.tiles == 0 {
        return Ok(());
    }
    let shared = (PF_BQ * hd + PF_BKV * (hd + 1) + PF_BKV * hd + PF_BQ * PF_BKV + 3 * PF_BQ) * 4;
    let (nh, nkv, hd_i, bs, mb) = (
        as_i32(OP, "heads", heads)?,
        as_i32(OP, "kv_heads", l.num_kv_heads)?,
        as_i32(OP, "head_dim", hd)?,
        as_i32(OP, "block_size", l.block_size)?,
        as_i32(OP, "max_blocks", batch.max_blocks)?,
    );
    let scale = 1.0f32 / (hd as f32).sqrt();
    let f = dev.function(ModuleId::Attention, &kname::<T>("paged_prefill"))?;
    let (qv, kc, vc, ts, tp, bt, tst, tln, mut ov) = (
        q.view(),
        k_cache.view(),
        v_cache.view(),
        batch.tok_seq.view(),
        batch.tok_pos.view(),
        batch.block_tables.view(),
        batch.tile_start.view(),
        batch.tile_len.view(),
        out.view_mut(),
    );
    let mut args = dev.stream().launch_builder(&f);
    args.arg(&qv)
        .arg(&kc)
        .arg(&vc)
        .arg(&ts)
        .arg(&tp)
        .arg(&bt)
        .arg(&tst)
        .arg(&tln)
        .arg(&mut ov)
        .arg(&nh)
        .arg(&nkv)
        .arg(&hd_i)
        .arg(&bs)
        .arg(&mb)
        .arg(&scale);
    let grid = (
        as_u32(OP, "tiles", batch.tiles)?,
        as_u32(OP, "heads", heads)?,
        1,
    );
    // SAFETY: paged_prefill_<T>(q, k_cache, v_cache, tok_seq, tok_pos, block_tables,
    // tile_start, tile_len, out, nh, nkv, hd, block_size, max_blocks, scale) with the
    // documented dynamic shared size (< 48 KiB for hd <= 128). Tiles hold <= 16 rows of
    // one sequence; key positions read are <= the tile's last position, covered by its
    // validated block table.
    unsafe { launch(OP, &mut args, cfg(grid, THREADS as u32, shared as u32)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_partition_shrinks_only_for_small_grids() {
        // 64 sequences x 3 KV heads x 1024 positions already fill 132 SMs.
        assert_eq!(decode_partition(64 * 3, 1024, 132), 256);
        // One sequence: more, smaller partitions, never below 64 positions.
        assert_eq!(decode_partition(3, 4096, 132), 64);
        assert_eq!(decode_partition(3, 128, 132), 64);
        assert_eq!(decode_partition(8 * 8, 2048, 132), 256);
        assert_eq!(decode_partition(24, 2048, 132), 128);
        for rows in [1, 3, 24, 192, 2048] {
            for ctx in [1, 128, 1000, 4096, 16384] {
                let p = decode_partition(rows, ctx, 132);
                assert!((64..=DECODE_PARTITION).contains(&p) && p.is_power_of_two());
            }
        }
    }
}
