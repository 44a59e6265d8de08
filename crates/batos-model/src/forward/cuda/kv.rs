//! The paged KV cache's storage on the device: per layer one K and one V buffer of
//! `[num_blocks, block_size, kv_heads, head_dim]`, the layout of `batos-kv`'s host
//! storage, so a `BlockId` and a slot (`block * block_size + offset`) mean the same
//! thing on both sides. The host `KvCacheManager` keeps every decision (allocation,
//! prefix cache, copy-on-write); only the bytes live here.

use batos_kernels::cuda::ops::attention::{self, PagedKvLayout};
use batos_kernels::cuda::ops::dense;
use batos_kernels::cuda::{CudaDevice, CudaError, CudaResult, DeviceBuffer};
use batos_types::BlockId;

use super::Act;

/// One layer's K and V on the device.
#[derive(Debug)]
pub(super) struct LayerKv {
    pub k: DeviceBuffer<Act>,
    pub v: DeviceBuffer<Act>,
}

/// The device copy of a paged KV pool.
#[derive(Debug)]
pub(super) struct DeviceKv {
    pub layout: PagedKvLayout,
    pub layers: Vec<LayerKv>,
}

impl DeviceKv {
    /// Zeroed storage for `layers` layers of `layout`.
    pub(super) fn new(dev: &CudaDevice, layout: PagedKvLayout, layers: usize) -> CudaResult<Self> {
        let len = layout.cache_len();
        let layers = (0..layers)
            .map(|_| {
                Ok(LayerKv {
                    k: dev.zeros(len)?,
                    v: dev.zeros(len)?,
                })
            })
            .collect::<CudaResult<Vec<_>>>()?;
        Ok(DeviceKv { layout, layers })
    }

    /// Bytes of K and V over all layers.
    pub(super) fn bytes(&self) -> usize {
        self.layers.len() * 2 * self.layout.cache_len() * std::mem::size_of::<Act>()
    }

    /// Replays the host manager's copy-on-write block copies, in order: every slot of
    /// `src` is gathered into a scratch buffer and scattered into `dst` with `write_kv`.
    pub(super) fn copy_blocks(
        &mut self,
        dev: &CudaDevice,
        copies: &[(BlockId, BlockId)],
    ) -> CudaResult<()> {
        let l = self.layout;
        let bs = l.block_size;
        for &(src, dst) in copies {
            for b in [src, dst] {
                if b.index() >= l.num_blocks {
                    return Err(CudaError::InvalidArgument {
                        op: "copy_blocks",
                        reason: format!("block {} outside the pool of {}", b.index(), l.num_blocks),
                    });
                }
            }
            let rows: Vec<i32> = (0..bs).map(|o| (src.index() * bs + o) as i32).collect();
            let slots: Vec<usize> = (0..bs).map(|o| dst.index() * bs + o).collect();
            let width = l.row_len();
            for layer in &mut self.layers {
                let mut k = dev.alloc::<Act>(bs * width)?;
                let mut v = dev.alloc::<Act>(bs * width)?;
                dense::gather_rows(dev, &layer.k, width, &rows, &mut k)?;
                dense::gather_rows(dev, &layer.v, width, &rows, &mut v)?;
                attention::write_kv(dev, l, &k, &v, &slots, &mut layer.k, &mut layer.v)?;
            }
        }
        Ok(())
    }
}
