//! How the forward pass reaches the paged KV cache it is handed.

use batos_kernels::KvCacheLayout;
use batos_types::BlockId;

/// Mutable access to a paged KV cache's storage: per layer, one K and one V buffer of
/// f32 `[num_blocks, block_size, num_kv_heads, head_dim]` (see `CONTRACTS.md`).
///
/// The trait lives here, beside its only caller, so the cache crate does not depend on
/// the model: `batos-model` implements it for `batos-kv`'s storage.
pub trait KvCacheMut {
    /// Block size, KV heads and head size of every layer.
    fn layout(&self) -> KvCacheLayout;
    /// Number of layers the cache holds.
    fn num_layers(&self) -> usize;
    /// Number of blocks per layer.
    fn num_blocks(&self) -> usize;
    /// The K and V buffers of `layer`; `None` past the last layer.
    fn layer_mut(&mut self, layer: usize) -> Option<(&mut [f32], &mut [f32])>;
    /// Block copies (copy-on-write, `(src, dst)`) the cache manager made since the last
    /// call, for a runtime that keeps its own copy of the storage (the device-resident
    /// CUDA runtime) to replay. The default records none.
    fn take_block_copies(&mut self) -> Vec<(BlockId, BlockId)> {
        Vec::new()
    }
}

impl KvCacheMut for batos_kv::KvStorage {
    fn layout(&self) -> KvCacheLayout {
        let l = batos_kv::KvStorage::layout(self);
        // KvCacheConfig already rejected zero sizes, which is all this checks again.
        KvCacheLayout::new(l.block_size, l.num_kv_heads, l.head_dim)
            .expect("batos-kv validated a non-zero cache layout")
    }

    fn num_layers(&self) -> usize {
        batos_kv::KvStorage::num_layers(self)
    }

    fn num_blocks(&self) -> usize {
        batos_kv::KvStorage::layout(self).num_blocks
    }

    fn layer_mut(&mut self, layer: usize) -> Option<(&mut [f32], &mut [f32])> {
        batos_kv::KvStorage::layer_mut(self, layer)
            .ok()
            .map(|l| (l.k, l.v))
    }

    fn take_block_copies(&mut self) -> Vec<(BlockId, BlockId)> {
        batos_kv::KvStorage::take_block_copies(self)
    }
}
