//! Hand-written scenarios: prefix hits and misses, LRU order, out-of-blocks, COW, budget.

use batos_kv::{BlockHash, KvCacheConfig, KvCacheManager, KvError, OutOfBlocks, SeqId};
use batos_types::{BlockId, MemoryBudget, ReservationKind};

use crate::common::{check_contents, compute, config, generation, manager, SHAPE};

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32).map(|i| i * 31 + salt).collect()
}

#[test]
fn same_tokens_and_adapter_hit() {
    let (mut kv, _b) = manager(4, 16, 0);
    let g = Some(generation(1));
    let p = prompt(10, 0);
    let a = kv.allocate_prompt(&p, g).unwrap().unwrap();
    assert_eq!(a.cached_tokens, 0);
    compute(&mut kv, a.seq, g, 0);
    let b = kv.allocate_prompt(&p, g).unwrap().unwrap();
    assert_eq!(b.cached_tokens, 8);
    assert_eq!(b.slots.len(), 2);
    let (ta, tb) = (
        kv.block_table(a.seq).unwrap(),
        kv.block_table(b.seq).unwrap(),
    );
    assert_eq!(ta.blocks()[..2], tb.blocks()[..2], "full blocks are shared");
    assert_ne!(ta.blocks()[2], tb.blocks()[2], "partial blocks are private");
    assert_eq!(kv.pool().ref_count(ta.blocks()[0]).unwrap(), 2);
    compute(&mut kv, b.seq, g, b.cached_tokens);
    check_contents(&kv, b.seq, g);
    let s = kv.stats();
    assert_eq!((s.prompt_tokens, s.hit_tokens), (20, 8));
    assert!((s.hit_rate() - 0.4).abs() < 1e-12);
}

#[test]
fn hits_survive_the_first_sequence_being_freed() {
    let (mut kv, _b) = manager(4, 16, 0);
    let p = prompt(9, 3);
    let a = kv.allocate_prompt(&p, None).unwrap().unwrap();
    compute(&mut kv, a.seq, None, 0);
    kv.free(a.seq).unwrap();
    let s = kv.stats();
    assert_eq!((s.cached_blocks, s.used_blocks), (2, 0));
    let b = kv.allocate_prompt(&p, None).unwrap().unwrap();
    assert_eq!(b.cached_tokens, 8);
    check_contents(&kv, b.seq, None);
    assert_eq!(
        kv.stats().cached_blocks,
        0,
        "hit blocks left the eviction queue"
    );
}

#[test]
fn different_adapter_misses() {
    let (mut kv, _b) = manager(4, 16, 0);
    let p = prompt(12, 0);
    let a = kv
        .allocate_prompt(&p, Some(generation(1)))
        .unwrap()
        .unwrap();
    compute(&mut kv, a.seq, Some(generation(1)), 0);
    for other in [Some(generation(2)), None] {
        let b = kv.allocate_prompt(&p, other).unwrap().unwrap();
        assert_eq!(b.cached_tokens, 0, "adapter {other:?} must not hit");
    }
    // And the base model's blocks are not hit by an adapter either.
    let (mut kv, _b) = manager(4, 16, 0);
    let a = kv.allocate_prompt(&p, None).unwrap().unwrap();
    compute(&mut kv, a.seq, None, 0);
    assert_eq!(
        kv.allocate_prompt(&p, Some(generation(1)))
            .unwrap()
            .unwrap()
            .cached_tokens,
        0
    );
}

#[test]
fn a_different_token_ends_the_hit() {
    let (mut kv, _b) = manager(4, 32, 0);
    let p = prompt(13, 0);
    let a = kv.allocate_prompt(&p, None).unwrap().unwrap();
    compute(&mut kv, a.seq, None, 0);
    for (changed, expect_hit) in [(0, 0), (3, 0), (4, 4), (7, 4), (8, 8), (11, 8), (12, 12)] {
        let mut q = p.clone();
        q[changed] += 1;
        let b = kv.allocate_prompt(&q, None).unwrap().unwrap();
        assert_eq!(b.cached_tokens, expect_hit, "token {changed} changed");
        kv.free(b.seq).unwrap();
    }
    // Same leading block at a different position is not a hit: the chain includes the parent.
    let mut shifted = vec![999; 4];
    shifted.extend_from_slice(&p);
    let c = kv.allocate_prompt(&shifted, None).unwrap().unwrap();
    assert_eq!(c.cached_tokens, 0);
}

#[test]
fn a_hit_leaves_the_last_token_to_compute() {
    let (mut kv, _b) = manager(4, 16, 0);
    let p = prompt(8, 0);
    let a = kv.allocate_prompt(&p, None).unwrap().unwrap();
    compute(&mut kv, a.seq, None, 0);
    let b = kv.allocate_prompt(&p, None).unwrap().unwrap();
    assert_eq!(
        b.cached_tokens, 4,
        "the whole prompt is cached, but the model needs logits"
    );
    assert_eq!(b.slots.len(), 4);
}

#[test]
fn uncomputed_blocks_are_not_hit() {
    let (mut kv, _b) = manager(4, 16, 0);
    let p = prompt(12, 0);
    let a = kv.allocate_prompt(&p, None).unwrap().unwrap();
    assert_eq!(
        kv.allocate_prompt(&p, None).unwrap().unwrap().cached_tokens,
        0
    );
    // Chunked prefill: the first 5 tokens are written, so only block 0 is usable.
    kv.mark_computed(a.seq, 5).unwrap();
    assert_eq!(
        kv.allocate_prompt(&p, None).unwrap().unwrap().cached_tokens,
        4
    );
    assert!(matches!(
        kv.mark_computed(a.seq, 4),
        Err(KvError::ComputedOutOfRange {
            asked: 4,
            held: 12,
            computed: 5,
            ..
        })
    ));
    assert!(kv.mark_computed(a.seq, 13).is_err());
}

#[test]
fn decode_blocks_join_the_prefix_cache() {
    let (mut kv, _b) = manager(4, 16, 0);
    let p = prompt(3, 0);
    let a = kv.allocate_prompt(&p, None).unwrap().unwrap();
    compute(&mut kv, a.seq, None, 0);
    let mut full = p.clone();
    for t in [50, 51, 52, 53, 54, 55] {
        let slots = kv.append_tokens(a.seq, &[t]).unwrap().unwrap();
        assert_eq!(slots.len(), 1);
        full.push(t);
        compute(&mut kv, a.seq, None, full.len() - 1);
    }
    let b = kv.allocate_prompt(&full, None).unwrap().unwrap();
    assert_eq!(b.cached_tokens, 8);
    check_contents(&kv, b.seq, None);
}

fn hash_of(tokens: &[u32], bs: usize) -> Vec<BlockHash> {
    let mut out: Vec<BlockHash> = Vec::new();
    for c in tokens.chunks_exact(bs) {
        out.push(BlockHash::chain(out.last(), c, None));
    }
    out
}

#[test]
fn lru_evicts_the_least_recently_released_tail_first() {
    let (mut kv, _b) = manager(2, 6, 0);
    let (pa, pb) = (prompt(5, 0), prompt(5, 7));
    let a = kv.allocate_prompt(&pa, None).unwrap().unwrap();
    let b = kv.allocate_prompt(&pb, None).unwrap().unwrap();
    compute(&mut kv, a.seq, None, 0);
    compute(&mut kv, b.seq, None, 0);
    kv.free(a.seq).unwrap(); // releases a2 (free: partial), a1, a0
    kv.free(b.seq).unwrap(); // then b2, b1, b0
    assert_eq!(kv.stats().cached_blocks, 4);
    assert_eq!(kv.stats().free_blocks, 2);
    let (ha, hb) = (hash_of(&pa, 2), hash_of(&pb, 2));
    let present =
        |kv: &KvCacheManager| [ha[0], ha[1], hb[0], hb[1]].map(|h| kv.pool().lookup(&h).is_some());
    // Free blocks go first; nothing cached is evicted.
    let c = kv.allocate_prompt(&prompt(3, 100), None).unwrap().unwrap();
    assert_eq!(present(&kv), [true, true, true, true]);
    // Then a's tail, a's head, b's tail, b's head.
    let expect = [
        [true, false, true, true],
        [false, false, true, true],
        [false, false, true, false],
        [false, false, false, false],
    ];
    let mut held = vec![c.seq];
    for e in expect {
        held.push(kv.allocate_prompt(&[9999], None).unwrap().unwrap().seq);
        assert_eq!(present(&kv), e);
    }
    let err = kv.allocate_prompt(&[9999], None).unwrap().unwrap_err();
    assert_eq!((err.needed, err.free), (1, 0));
    // Passed up with `?`, the answer becomes a KvError.
    let as_error: KvError = err.into();
    assert!(as_error.is_out_of_blocks());
    for s in held {
        kv.free(s).unwrap();
    }
    assert_eq!(kv.stats().free_blocks, 6);
}

#[test]
fn a_hit_makes_a_block_recent_again() {
    let (mut kv, _b) = manager(2, 4, 0);
    let (pa, pb) = (prompt(3, 0), prompt(3, 7));
    for p in [&pa, &pb] {
        let s = kv.allocate_prompt(p, None).unwrap().unwrap();
        compute(&mut kv, s.seq, None, 0);
        kv.free(s.seq).unwrap();
    }
    // a's block is older; hitting it and releasing again makes b's the older one.
    let s = kv.allocate_prompt(&pa, None).unwrap().unwrap();
    assert_eq!(s.cached_tokens, 2);
    kv.free(s.seq).unwrap();
    let held: Vec<SeqId> = (0..3)
        .map(|i| kv.allocate_prompt(&[5000 + i], None).unwrap().unwrap().seq)
        .collect();
    assert!(kv.pool().lookup(&hash_of(&pa, 2)[0]).is_some());
    assert!(kv.pool().lookup(&hash_of(&pb, 2)[0]).is_none());
    drop(held);
}

#[test]
fn out_of_blocks_is_typed_and_changes_nothing() {
    let (mut kv, budget) = manager(4, 4, 0);
    assert!(kv.can_allocate(16));
    assert!(!kv.can_allocate(17));
    let a = kv.allocate_prompt(&prompt(14, 0), None).unwrap().unwrap();
    compute(&mut kv, a.seq, None, 0);
    let before = kv.stats();
    let err = kv
        .allocate_prompt(&prompt(5, 1), None)
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err,
        OutOfBlocks {
            op: "allocate_prompt",
            needed: 2,
            free: 0
        }
    );
    assert!(
        err.to_string().contains("needs 2 free blocks, 0 available"),
        "{err}"
    );
    let err = kv.append_tokens(a.seq, &[1, 2, 3]).unwrap().unwrap_err();
    assert!(
        matches!(
            err,
            OutOfBlocks {
                needed: 1,
                free: 0,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(kv.stats(), before);
    assert_eq!(kv.tokens(a.seq).unwrap().len(), 14);
    // Two more tokens still fit in the last block.
    assert_eq!(kv.append_tokens(a.seq, &[1, 2]).unwrap().unwrap().len(), 2);

    // A fork shares everything; its first write into the full pool needs a copy.
    let (mut kv, _b2) = manager(4, 3, 0);
    let a = kv.allocate_prompt(&prompt(6, 0), None).unwrap().unwrap();
    let f = kv.fork(a.seq).unwrap();
    assert_eq!(kv.blocks_needed_to_append(f, 1).unwrap(), 1);
    let b = kv.allocate_prompt(&[1], None).unwrap().unwrap();
    let err = kv.append_tokens(f, &[7]).unwrap().unwrap_err();
    assert!(matches!(
        err,
        OutOfBlocks {
            needed: 1,
            free: 0,
            ..
        }
    ));
    assert_eq!(kv.block_table(f).unwrap(), kv.block_table(a.seq).unwrap());
    kv.free(b.seq).unwrap();
    assert_eq!(kv.append_tokens(f, &[7]).unwrap().unwrap().len(), 1);
    drop(kv);
    drop(budget);
}

#[test]
fn fork_copies_a_shared_partial_block_on_write() {
    let (mut kv, _b) = manager(4, 8, 0);
    let g = Some(generation(3));
    let p = prompt(6, 0);
    let a = kv.allocate_prompt(&p, g).unwrap().unwrap();
    compute(&mut kv, a.seq, g, 0);
    let f = kv.fork(a.seq).unwrap();
    let shared = kv.block_table(a.seq).unwrap().blocks().to_vec();
    assert_eq!(kv.block_table(f).unwrap().blocks(), &shared[..]);
    assert!(shared.iter().all(|&b| kv.pool().ref_count(b).unwrap() == 2));
    assert_eq!(kv.stats().used_blocks, 2, "a fork takes no blocks");

    let slots = kv.append_tokens(f, &[77]).unwrap().unwrap();
    let tf = kv.block_table(f).unwrap().clone();
    assert_eq!(tf.blocks()[0], shared[0], "the full block stays shared");
    assert_ne!(tf.blocks()[1], shared[1], "the partial block was copied");
    assert_eq!(slots, vec![tf.blocks()[1].index() * 4 + 2]);
    assert_eq!(kv.pool().ref_count(shared[1]).unwrap(), 1);
    // The copy carries the parent's K/V in every layer.
    kv.mark_computed(f, 6).unwrap();
    check_contents(&kv, f, g);
    compute(&mut kv, f, g, 6);
    // The parent writes its own next token in place (it owns the old block alone now).
    let pslots = kv.append_tokens(a.seq, &[88]).unwrap().unwrap();
    assert_eq!(pslots, vec![shared[1].index() * 4 + 2]);
    compute(&mut kv, a.seq, g, 6);
    check_contents(&kv, a.seq, g);
    check_contents(&kv, f, g);
    kv.free(a.seq).unwrap();
    kv.free(f).unwrap();
    assert_eq!(kv.stats().used_blocks, 0);
}

#[test]
fn block_copies_are_logged_for_a_mirror_only_when_asked() {
    let (mut kv, _b) = manager(4, 8, 0);
    let p = prompt(6, 0);
    let a = kv.allocate_prompt(&p, None).unwrap().unwrap();
    compute(&mut kv, a.seq, None, 0);
    let f = kv.fork(a.seq).unwrap();
    kv.append_tokens(f, &[77]).unwrap().unwrap();
    assert!(
        kv.storage_mut().take_block_copies().is_empty(),
        "log is off by default"
    );

    kv.storage_mut().log_block_copies();
    let g = kv.fork(a.seq).unwrap();
    kv.append_tokens(g, &[78]).unwrap().unwrap();
    let shared = kv.block_table(a.seq).unwrap().blocks()[1];
    let copied = kv.block_table(g).unwrap().blocks()[1];
    assert_eq!(kv.storage_mut().take_block_copies(), vec![(shared, copied)]);
    assert!(
        kv.storage_mut().take_block_copies().is_empty(),
        "taking drains the log"
    );
}

#[test]
fn pool_bytes_come_from_the_budget() {
    let cfg = config(4, 10);
    let per = cfg.bytes_per_block();
    assert_eq!(per, 2 * 2 * 4 * 2 * 4);
    let budget = MemoryBudget::new("host", per * 12);
    let other = budget
        .reserve(ReservationKind::AdapterWarm, per * 3)
        .unwrap();
    let err = KvCacheManager::new(cfg, &budget).unwrap_err();
    assert!(matches!(err, KvError::Budget { blocks: 10, .. }), "{err}");
    drop(other);
    let mut kv = KvCacheManager::new(cfg, &budget).unwrap();
    assert_eq!(budget.used_by(ReservationKind::KvCache), per * 10);
    kv.grow_blocks(2).unwrap().unwrap();
    assert_eq!(kv.stats().total_blocks, 12);
    assert_eq!(kv.layout().num_blocks, 12);
    assert_eq!(
        kv.storage().layer(1).unwrap().k.len(),
        kv.layout().layer_elems()
    );
    let err = kv.grow_blocks(1).unwrap().unwrap_err();
    assert!(err.to_string().contains("kv-cache"), "{err}");
    assert_eq!(kv.stats().total_blocks, 12);
    // Shrinking stops at a used block.
    let held: Vec<SeqId> = (0..11)
        .map(|i| kv.allocate_prompt(&[i], None).unwrap().unwrap().seq)
        .collect();
    assert_eq!(kv.shrink_blocks(5), 1);
    assert_eq!(budget.used(), per * 11);
    for s in held {
        kv.free(s).unwrap();
    }
    assert_eq!(kv.shrink_blocks(5), 5);
    assert_eq!(budget.used(), per * 6);
    drop(kv);
    assert_eq!(budget.used(), 0);
}

#[test]
fn bad_input_is_a_typed_error() {
    let (mut kv, _b) = manager(4, 4, 0);
    assert_eq!(
        kv.allocate_prompt(&[], None).unwrap_err(),
        KvError::EmptyPrompt
    );
    let ghost = SeqId(42);
    assert!(matches!(
        kv.free(ghost),
        Err(KvError::UnknownSequence { op: "free", .. })
    ));
    assert!(kv.append_tokens(ghost, &[1]).is_err());
    assert!(kv.fork(ghost).is_err());
    assert!(kv.block_table(ghost).is_err());
    let a = kv.allocate_prompt(&[1], None).unwrap().unwrap();
    kv.free(a.seq).unwrap();
    assert!(kv.free(a.seq).is_err(), "double free");
    assert!(matches!(
        kv.storage().layer(SHAPE.num_layers),
        Err(KvError::LayerOutOfRange {
            layer: 2,
            num_layers: 2
        })
    ));
    let err = kv
        .storage_mut()
        .copy_block(BlockId(0), BlockId(4))
        .unwrap_err();
    assert!(matches!(err, KvError::BlockOutOfRange { .. }));
    assert!(KvCacheConfig::new(SHAPE, 0).is_err());
}

#[test]
fn the_manager_can_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<KvCacheManager>();
    send_sync::<batos_kv::BlockTable>();
    send_sync::<KvError>();
}
