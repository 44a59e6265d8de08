use batos_types::{BlockId, BudgetError, MemoryBudget, Reservation, ReservationKind};

use crate::{KvCacheConfig, KvError, KvLayout};

/// One layer's K and V buffers, read-only (each `[num_blocks, block_size, kv_heads, head_dim]`).
#[derive(Clone, Copy, Debug)]
pub struct LayerKv<'a> {
    /// Keys.
    pub k: &'a [f32],
    /// Values.
    pub v: &'a [f32],
}

/// One layer's K and V buffers, writable: what `write_kv` and attention take.
#[derive(Debug)]
pub struct LayerKvMut<'a> {
    /// Keys.
    pub k: &'a mut [f32],
    /// Values.
    pub v: &'a mut [f32],
}

#[derive(Debug)]
struct LayerBuffers {
    k: Vec<f32>,
    v: Vec<f32>,
}

/// The K/V data of a block pool on the host, f32, one K and one V buffer per layer in the
/// [`KvLayout`] of CONTRACTS.md. Its bytes are held against a [`MemoryBudget`] as
/// [`ReservationKind::KvCache`] and given back when it is dropped.
#[derive(Debug)]
pub struct KvStorage {
    layout: KvLayout,
    layers: Vec<LayerBuffers>,
    bytes_per_block: u64,
    reservation: Reservation,
    /// Block copies made by [`KvStorage::copy_block`], kept for a mirror of this storage
    /// (a device-resident cache) to replay; `None` unless [`KvStorage::log_block_copies`]
    /// turned the log on.
    copy_log: Option<Vec<(BlockId, BlockId)>>,
}

impl KvStorage {
    /// Reserves `config.num_blocks() * config.bytes_per_block()` bytes from `budget` and
    /// allocates zeroed buffers. A pool the budget cannot hold is [`KvError::Budget`].
    pub fn new(config: &KvCacheConfig, budget: &MemoryBudget) -> Result<Self, KvError> {
        let layout = config.layout();
        let bytes = config.num_blocks() as u64 * config.bytes_per_block();
        let reservation = budget
            .reserve(ReservationKind::KvCache, bytes)
            .map_err(|source| KvError::Budget {
                blocks: layout.num_blocks,
                bytes,
                source,
            })?;
        let layers = (0..config.shape().num_layers)
            .map(|_| LayerBuffers {
                k: vec![0.0; layout.layer_elems()],
                v: vec![0.0; layout.layer_elems()],
            })
            .collect();
        Ok(KvStorage {
            layout,
            layers,
            bytes_per_block: config.bytes_per_block(),
            reservation,
            copy_log: None,
        })
    }

    /// The layout of every buffer (its `num_blocks` follows grow/shrink).
    pub fn layout(&self) -> KvLayout {
        self.layout
    }
    /// Layers held.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }
    /// Starts recording every `(src, dst)` block copy (copy-on-write) so that a mirror of
    /// this storage, such as a device-resident KV cache, can replay them with
    /// [`KvStorage::take_block_copies`]. Off by default: nobody drains the log then.
    pub fn log_block_copies(&mut self) {
        self.copy_log.get_or_insert_with(Vec::new);
    }

    /// The block copies recorded since the last call, oldest first (empty when the log
    /// is off).
    pub fn take_block_copies(&mut self) -> Vec<(BlockId, BlockId)> {
        self.copy_log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Bytes held against the budget.
    pub fn reserved_bytes(&self) -> u64 {
        self.reservation.bytes()
    }

    fn check_layer(&self, layer: usize) -> Result<(), KvError> {
        if layer < self.layers.len() {
            Ok(())
        } else {
            Err(KvError::LayerOutOfRange {
                layer,
                num_layers: self.layers.len(),
            })
        }
    }

    /// Layer `layer`'s K and V buffers.
    pub fn layer(&self, layer: usize) -> Result<LayerKv<'_>, KvError> {
        self.check_layer(layer)?;
        let l = &self.layers[layer];
        Ok(LayerKv { k: &l.k, v: &l.v })
    }

    /// Layer `layer`'s K and V buffers, writable.
    pub fn layer_mut(&mut self, layer: usize) -> Result<LayerKvMut<'_>, KvError> {
        self.check_layer(layer)?;
        let l = &mut self.layers[layer];
        Ok(LayerKvMut {
            k: &mut l.k,
            v: &mut l.v,
        })
    }

    /// Copies block `src`'s K and V into block `dst` in every layer (copy-on-write).
    pub fn copy_block(&mut self, src: BlockId, dst: BlockId) -> Result<(), KvError> {
        for b in [src, dst] {
            if b.index() >= self.layout.num_blocks {
                return Err(KvError::BlockOutOfRange {
                    block: b,
                    num_blocks: self.layout.num_blocks,
                });
            }
        }
        if src == dst {
            return Ok(());
        }
        if let Some(log) = &mut self.copy_log {
            log.push((src, dst));
        }
        let n = self.layout.block_elems();
        let (s, d) = (src.index() * n, dst.index() * n);
        for l in &mut self.layers {
            l.k.copy_within(s..s + n, d);
            l.v.copy_within(s..s + n, d);
        }
        Ok(())
    }

    /// Adds `n` zeroed blocks at the end, reserving their bytes first; if the budget
    /// cannot grant them, nothing changes.
    // Crate-only: the pool must grow in step (see `KvCacheManager::grow_blocks`).
    pub(crate) fn grow(&mut self, n: usize) -> Result<(), BudgetError> {
        self.reservation.grow(n as u64 * self.bytes_per_block)?;
        self.layout.num_blocks += n;
        let len = self.layout.layer_elems();
        for l in &mut self.layers {
            l.k.resize(len, 0.0);
            l.v.resize(len, 0.0);
        }
        Ok(())
    }

    /// Drops the last `n` blocks (at most all of them) and returns their bytes.
    pub(crate) fn shrink(&mut self, n: usize) {
        let n = n.min(self.layout.num_blocks);
        self.layout.num_blocks -= n;
        let len = self.layout.layer_elems();
        for l in &mut self.layers {
            l.k.truncate(len);
            l.k.shrink_to_fit();
            l.v.truncate(len);
            l.v.shrink_to_fit();
        }
        self.reservation.shrink(n as u64 * self.bytes_per_block);
    }
}
