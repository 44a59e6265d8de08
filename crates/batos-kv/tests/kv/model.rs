//! Model-based property test of the block pool through the manager: random runs of
//! prompt allocation (with prefix hits), appends, forks (COW), computed marks, frees,
//! pool growth and shrinking, checked after every step against a plain model of the
//! live sequences.
//!
//! Checked each step: no block leaks (free + cached + used = total, used = distinct
//! blocks in live tables), reference counts equal table occurrences, a write target is
//! owned by the writer alone (no aliasing), every position of every live sequence reads
//! back the K/V its own tokens and adapter produced (so hits, COW copies and evictions
//! are correct), "does not fit" happens exactly when it should and changes nothing, and
//! at the end everything returns: all blocks available, the budget back to zero.

use std::collections::HashMap;

use batos_kv::{KvCacheManager, OutOfBlocks, SeqId};
use batos_types::{AdapterGeneration, BlockId, MemoryBudget, ReservationKind};
use proptest::prelude::*;

use crate::common::{check_contents, compute, config};

#[derive(Clone, Debug)]
enum Op {
    /// A prompt: `len` tokens of one of three shared "system prompts", then a tail.
    Alloc {
        base: u32,
        len: usize,
        tail: Vec<u32>,
        adapter: usize,
    },
    Append {
        pick: usize,
        tokens: Vec<u32>,
    },
    Fork {
        pick: usize,
    },
    Free {
        pick: usize,
    },
    Grow {
        n: usize,
    },
    Shrink {
        n: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..3u32, 1..16usize, prop::collection::vec(0..3u32, 0..4), 0..3usize)
            .prop_map(|(base, len, tail, adapter)| Op::Alloc { base, len, tail, adapter }),
        4 => (any::<usize>(), prop::collection::vec(0..3u32, 1..7))
            .prop_map(|(pick, tokens)| Op::Append { pick, tokens }),
        2 => any::<usize>().prop_map(|pick| Op::Fork { pick }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        1 => (0..3usize).prop_map(|n| Op::Grow { n }),
        1 => (0..3usize).prop_map(|n| Op::Shrink { n }),
    ]
}

const ADAPTERS: [Option<AdapterGeneration>; 3] = [
    None,
    Some(AdapterGeneration([1; 32])),
    Some(AdapterGeneration([2; 32])),
];

struct Model {
    /// Live sequences and the adapter each runs under, in creation order.
    live: Vec<(SeqId, Option<AdapterGeneration>)>,
}

impl Model {
    fn pick(&self, pick: usize) -> Option<(SeqId, Option<AdapterGeneration>)> {
        (!self.live.is_empty()).then(|| self.live[pick % self.live.len()])
    }
}

fn check(kv: &KvCacheManager, model: &Model) {
    let stats = kv.stats();
    let mut refs: HashMap<BlockId, u32> = HashMap::new();
    for &(seq, adapter) in &model.live {
        let t = kv.block_table(seq).unwrap();
        assert_eq!(t.num_tokens(), kv.tokens(seq).unwrap().len());
        assert_eq!(t.blocks().len(), t.num_tokens().div_ceil(t.block_size()));
        let mut seen = t.blocks().to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), t.blocks().len(), "{seq:?} holds a block twice");
        for &b in t.blocks() {
            assert!(b.index() < stats.total_blocks, "{b:?} beyond the pool");
            *refs.entry(b).or_default() += 1;
        }
        check_contents(kv, seq, adapter);
    }
    for b in 0..stats.total_blocks {
        let b = BlockId(b as u32);
        let expected = refs.get(&b).copied().unwrap_or(0);
        assert_eq!(
            kv.pool().ref_count(b).unwrap(),
            expected,
            "ref count of {b:?}"
        );
    }
    assert_eq!(
        stats.used_blocks,
        refs.len(),
        "used blocks vs blocks in tables"
    );
    assert_eq!(
        stats.free_blocks + stats.cached_blocks + stats.used_blocks,
        stats.total_blocks
    );
    assert_eq!(stats.sequences, model.live.len());
    assert_eq!(kv.layout().num_blocks, stats.total_blocks);
}

/// Writes go only to blocks the writer holds alone.
fn check_private(kv: &KvCacheManager, seq: SeqId, slots: &[usize]) {
    let bs = kv.layout().block_size;
    let table = kv.block_table(seq).unwrap();
    for &s in slots {
        let b = BlockId((s / bs) as u32);
        assert!(
            table.blocks().contains(&b),
            "slot {s} outside {seq:?}'s table"
        );
        assert_eq!(
            kv.pool().ref_count(b).unwrap(),
            1,
            "slot {s} written while {b:?} is shared"
        );
    }
}

/// How often a run reached the interesting paths.
#[derive(Clone, Copy, Debug, Default)]
struct Coverage {
    hits: usize,
    copies: usize,
    evictions: usize,
    out_of_blocks: usize,
    budget_refusals: usize,
    shrunk_blocks: usize,
}

fn run(block_size: usize, blocks: usize, ops: Vec<Op>) -> Coverage {
    let mut cov = Coverage::default();
    let cfg = config(block_size, blocks);
    let spare = 3;
    let budget = MemoryBudget::new("prop", cfg.bytes_per_block() * (blocks + spare) as u64);
    let mut kv = KvCacheManager::new(cfg, &budget).unwrap();
    let mut model = Model { live: Vec::new() };
    for op in ops {
        let before = kv.stats();
        let registered = kv.pool().num_registered();
        let op_kind = if matches!(op, Op::Shrink { .. }) {
            OpKind::Shrink
        } else {
            OpKind::Other
        };
        match op {
            Op::Alloc {
                base,
                len,
                tail,
                adapter,
            } => {
                let mut tokens: Vec<u32> =
                    (0..len as u32).map(|i| (base * 7 + i * 3) % 5).collect();
                tokens.extend(tail);
                let adapter = ADAPTERS[adapter];
                let fits = kv.can_allocate(tokens.len());
                match kv.allocate_prompt(&tokens, adapter).unwrap() {
                    Ok(a) => {
                        assert!(
                            a.cached_tokens % block_size == 0 && a.cached_tokens < tokens.len()
                        );
                        assert_eq!(a.slots.len(), tokens.len() - a.cached_tokens);
                        cov.hits += usize::from(a.cached_tokens > 0);
                        check_private(&kv, a.seq, &a.slots);
                        // Hit blocks already hold this prompt's K/V (checked in `check`).
                        model.live.push((a.seq, adapter));
                        compute(&mut kv, a.seq, adapter, a.cached_tokens);
                    }
                    Err(OutOfBlocks { needed, free, .. }) => {
                        assert!(!fits, "refused a prompt that can_allocate accepted");
                        assert!(needed > free);
                        assert_eq!(kv.stats(), before);
                        cov.out_of_blocks += 1;
                    }
                }
            }
            Op::Append { pick, tokens } => {
                let Some((seq, adapter)) = model.pick(pick) else {
                    continue;
                };
                let needed = kv.blocks_needed_to_append(seq, tokens.len()).unwrap();
                let old = kv.tokens(seq).unwrap().len();
                let old_table = kv.block_table(seq).unwrap().clone();
                match kv.append_tokens(seq, &tokens).unwrap() {
                    Ok(slots) => {
                        let last = old_table.blocks().len() - 1;
                        if kv.block_table(seq).unwrap().blocks()[last] != old_table.blocks()[last] {
                            assert!(
                                !old.is_multiple_of(block_size),
                                "only a partial block is copied"
                            );
                            cov.copies += 1;
                        }
                        assert_eq!(
                            kv.block_table(seq).unwrap().blocks()[..last],
                            old_table.blocks()[..last]
                        );
                        assert!(needed <= before.free_blocks + before.cached_blocks);
                        assert_eq!(slots.len(), tokens.len());
                        check_private(&kv, seq, &slots);
                        // The copy carried the prefix's K/V before the new ones are written.
                        check_contents(&kv, seq, adapter);
                        compute(&mut kv, seq, adapter, old);
                    }
                    Err(OutOfBlocks {
                        needed: n, free, ..
                    }) => {
                        assert_eq!(n, needed);
                        assert!(needed > free && free == before.free_blocks + before.cached_blocks);
                        assert_eq!(kv.stats(), before);
                        assert_eq!(kv.tokens(seq).unwrap().len(), old);
                        cov.out_of_blocks += 1;
                    }
                }
            }
            Op::Fork { pick } => {
                let Some((seq, adapter)) = model.pick(pick) else {
                    continue;
                };
                let child = kv.fork(seq).unwrap();
                assert_eq!(kv.block_table(child).unwrap(), kv.block_table(seq).unwrap());
                assert_eq!(kv.stats().used_blocks, before.used_blocks);
                model.live.push((child, adapter));
            }
            Op::Free { pick } => {
                let Some((seq, _)) = model.pick(pick) else {
                    continue;
                };
                kv.free(seq).unwrap();
                model.live.retain(|&(s, _)| s != seq);
                assert!(kv.block_table(seq).is_err());
            }
            Op::Grow { n } => {
                let room = (budget.available() / cfg.bytes_per_block()) as usize;
                match kv.grow_blocks(n).unwrap() {
                    Ok(()) => assert!(n <= room),
                    Err(refused) => {
                        assert!(n > room, "{refused}");
                        assert_eq!(kv.stats(), before);
                        cov.budget_refusals += 1;
                    }
                }
            }
            Op::Shrink { n } => {
                // Never below one block, so prompts can still be placed.
                let n = n.min(before.total_blocks - 1);
                let removed = kv.shrink_blocks(n);
                assert!(removed <= n);
                cov.shrunk_blocks += removed;
                assert_eq!(kv.stats().total_blocks, before.total_blocks - removed);
            }
        }
        if !matches!(op_kind, OpKind::Shrink) {
            cov.evictions += registered.saturating_sub(kv.pool().num_registered());
        }
        check(&kv, &model);
        let total = kv.stats().total_blocks as u64;
        assert_eq!(
            budget.used_by(ReservationKind::KvCache),
            total * cfg.bytes_per_block()
        );
    }
    for (seq, _) in model.live.drain(..) {
        kv.free(seq).unwrap();
    }
    check(&kv, &model);
    let s = kv.stats();
    assert_eq!(s.used_blocks, 0, "blocks leaked");
    assert_eq!(s.free_blocks + s.cached_blocks, s.total_blocks);
    assert!(kv.can_allocate(s.total_blocks * block_size));
    drop(kv);
    assert_eq!(budget.used(), 0, "budget not returned");
    cov
}

enum OpKind {
    Shrink,
    Other,
}

fn runs() -> impl Strategy<Value = (usize, usize, Vec<Op>)> {
    (1..5usize, 2..40usize, prop::collection::vec(op(), 1..80))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn block_pool_never_leaks_or_aliases((block_size, blocks, ops) in runs()) {
        run(block_size, blocks, ops);
    }
}

/// The generated workload reaches every interesting path (otherwise the property above
/// would prove little): prefix hits, COW copies, evictions, refusals, shrinking.
#[test]
fn generated_runs_reach_hits_copies_evictions_and_refusals() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    let mut total = Coverage::default();
    for _ in 0..64 {
        let (bs, blocks, ops) = runs().new_tree(&mut runner).unwrap().current();
        let c = run(bs, blocks, ops);
        total.hits += c.hits;
        total.copies += c.copies;
        total.evictions += c.evictions;
        total.out_of_blocks += c.out_of_blocks;
        total.budget_refusals += c.budget_refusals;
        total.shrunk_blocks += c.shrunk_blocks;
    }
    println!("{total:?}");
    assert!(total.hits > 0, "{total:?}");
    assert!(total.copies > 0, "{total:?}");
    assert!(total.evictions > 0, "{total:?}");
    assert!(total.out_of_blocks > 0, "{total:?}");
    assert!(total.budget_refusals > 0, "{total:?}");
    assert!(total.shrunk_blocks > 0, "{total:?}");
}
