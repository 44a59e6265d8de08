//! Helpers shared by the forward-pass tests.
// Each test binary uses a different subset.
#![allow(dead_code)]

use batos_kernels::KvCacheLayout;
use batos_model::forward::{KvCacheMut, LlamaDims};

/// A zero-filled paged cache for one model, outside any pool.
pub struct TestCache {
    layout: KvCacheLayout,
    num_blocks: usize,
    layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl TestCache {
    pub fn new(dims: &LlamaDims, num_blocks: usize, block_size: usize) -> TestCache {
        let layout = KvCacheLayout::new(block_size, dims.num_kv_heads, dims.head_dim).unwrap();
        let len = num_blocks * layout.block_stride();
        TestCache {
            layout,
            num_blocks,
            layers: (0..dims.num_layers)
                .map(|_| (vec![0.0; len], vec![0.0; len]))
                .collect(),
        }
    }
}

impl KvCacheMut for TestCache {
    fn layout(&self) -> KvCacheLayout {
        self.layout
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    fn layer_mut(&mut self, layer: usize) -> Option<(&mut [f32], &mut [f32])> {
        let (k, v) = self.layers.get_mut(layer)?;
        Some((k, v))
    }
}

/// A KV cache manager of `num_blocks` blocks of `block_size` tokens for `dims`.
pub fn kv_manager(
    dims: &LlamaDims,
    num_blocks: usize,
    block_size: usize,
) -> batos_kv::KvCacheManager {
    let shape = batos_kv::KvShape {
        num_layers: dims.num_layers,
        num_kv_heads: dims.num_kv_heads,
        head_dim: dims.head_dim,
    };
    let config = batos_kv::KvCacheConfig::new(shape, 1 << 20)
        .and_then(|c| c.with_block_size(block_size))
        .and_then(|c| c.with_num_blocks(num_blocks))
        .unwrap();
    let budget = batos_types::MemoryBudget::new("test", 1 << 34);
    batos_kv::KvCacheManager::new(config, &budget).unwrap()
}

/// Deterministic pseudo-random token ids.
pub fn tokens(n: usize, seed: u32, vocab: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % vocab as u32)
        .collect()
}

/// Runs `prompts` in one prefill step, each in its own blocks of a fresh cache, once per
/// order in `orders`, and asserts that every prompt's logits are bit-identical to its
/// logits alone (`batos_model::quant::sequence_logits`).
pub fn assert_one_step_matches_alone(
    model: &batos_model::forward::LlamaModel,
    prompts: &[Vec<u32>],
    orders: &[&[usize]],
) {
    use batos_model::forward::{ForwardBatch, LogitsRows, SeqStep};
    let d = *model.dims();
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| batos_model::quant::sequence_logits(model, p).unwrap())
        .collect();
    for order in orders {
        let mut cache = TestCache::new(&d, 64, 16);
        let mut next = 0u32;
        let steps: Vec<SeqStep> = order
            .iter()
            .map(|&i| {
                let blocks = prompts[i].len().div_ceil(16) as u32;
                let table = (next..next + blocks).map(batos_types::BlockId).collect();
                next += blocks;
                SeqStep::new(prompts[i].clone(), 0, table).with_logits(LogitsRows::All)
            })
            .collect();
        let out = model
            .forward(&ForwardBatch::new(steps), &mut cache)
            .unwrap();
        for (s, &i) in order.iter().enumerate() {
            let rows: Vec<f32> = out.seq_logits(s).unwrap().flatten().copied().collect();
            assert_eq!(rows, alone[i], "prompt {i} at batch position {s}");
        }
    }
}
