//! Helpers shared by the test modules.

use batos_kv::{KvCacheConfig, KvCacheManager, KvShape, SeqId};
use batos_types::{AdapterGeneration, MemoryBudget};

pub const SHAPE: KvShape = KvShape {
    num_layers: 2,
    num_kv_heads: 1,
    head_dim: 2,
};

/// A config of exactly `blocks` blocks of `block_size` tokens.
pub fn config(block_size: usize, blocks: usize) -> KvCacheConfig {
    KvCacheConfig::new(SHAPE, 1 << 20)
        .and_then(|c| c.with_block_size(block_size))
        .and_then(|c| c.with_num_blocks(blocks))
        .expect("valid test config")
}

/// A manager of `blocks` blocks and a budget with room for `spare` more.
pub fn manager(block_size: usize, blocks: usize, spare: usize) -> (KvCacheManager, MemoryBudget) {
    let cfg = config(block_size, blocks);
    let budget = MemoryBudget::new("test", cfg.bytes_per_block() * (blocks + spare) as u64);
    (KvCacheManager::new(cfg, &budget).expect("fits"), budget)
}

pub fn generation(i: u8) -> AdapterGeneration {
    AdapterGeneration([i; 32])
}

/// The value the fake model writes for the token at the end of `prefix`: a function of
/// the adapter and every token up to it, so reading the wrong block shows.
pub fn marker(adapter: Option<AdapterGeneration>, prefix: &[u32]) -> f32 {
    let h = batos_kv::BlockHash::chain(None, prefix, adapter.as_ref());
    let x = u32::from_le_bytes([h.0[0], h.0[1], h.0[2], 0]);
    // Exactly representable and never zero (fresh storage is zero).
    (x % (1 << 20) + 1) as f32
}

/// The fake model: writes K = marker and V = -marker into every element of each slot in
/// every layer for positions `from..` of `seq`, then marks them computed.
pub fn compute(
    kv: &mut KvCacheManager,
    seq: SeqId,
    adapter: Option<AdapterGeneration>,
    from: usize,
) {
    let tokens = kv.tokens(seq).unwrap().to_vec();
    let table = kv.block_table(seq).unwrap().clone();
    let layout = kv.layout();
    for layer in 0..kv.storage().num_layers() {
        let buf = kv.storage_mut().layer_mut(layer).unwrap();
        for p in from..tokens.len() {
            let m = marker(adapter, &tokens[..=p]);
            let r = layout.slot_range(table.slot(p).unwrap());
            buf.k[r.clone()].fill(m);
            buf.v[r].fill(-m);
        }
    }
    kv.mark_computed(seq, tokens.len()).unwrap();
}

/// Checks that every computed position of `seq` reads back its own marker in every layer.
pub fn check_contents(kv: &KvCacheManager, seq: SeqId, adapter: Option<AdapterGeneration>) {
    let tokens = kv.tokens(seq).unwrap();
    let table = kv.block_table(seq).unwrap();
    let layout = kv.layout();
    let computed = kv.num_computed(seq).unwrap();
    for layer in 0..kv.storage().num_layers() {
        let buf = kv.storage().layer(layer).unwrap();
        for p in 0..computed {
            let m = marker(adapter, &tokens[..=p]);
            let r = layout.slot_range(table.slot(p).unwrap());
            assert!(
                buf.k[r.clone()].iter().all(|&x| x == m) && buf.v[r].iter().all(|&x| x == -m),
                "{seq:?} layer {layer} position {p}: K/V is not this sequence's"
            );
        }
    }
}
