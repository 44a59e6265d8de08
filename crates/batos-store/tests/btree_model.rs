//! Model-based property test of the persistent B-tree against `std::collections::BTreeMap`:
//! inserts, removes, gets and range scans in two concurrent transactions, commits (with
//! leaf-level conflict resolution) and reopens.

use std::collections::BTreeMap;

use batos_store::{BTree, Db, ProgressMode, StoreConfig, StoreError};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Begin(usize),
    Insert(usize, u32, u32),
    Remove(usize, u32),
    Get(usize, u32),
    Bulk(usize, u64, u16),
    Range(usize, u32, u32),
    Commit(usize),
    Reopen,
}

const KEYS: u32 = 6000;

fn op() -> impl Strategy<Value = Op> {
    let s = 0..2usize;
    prop_oneof![
        3 => s.clone().prop_map(Op::Begin),
        8 => (s.clone(), 0..KEYS, any::<u32>()).prop_map(|(s, k, v)| Op::Insert(s, k, v)),
        3 => (s.clone(), 0..KEYS).prop_map(|(s, k)| Op::Remove(s, k)),
        3 => (s.clone(), 0..KEYS).prop_map(|(s, k)| Op::Get(s, k)),
        2 => (s.clone(), any::<u64>(), 1..1500u16).prop_map(|(s, seed, n)| Op::Bulk(s, seed, n)),
        2 => (s.clone(), 0..KEYS, 0..KEYS).prop_map(|(s, a, b)| Op::Range(s, a.min(b), a.max(b))),
        4 => s.prop_map(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

struct MTxn {
    txn: batos_store::Txn,
    snap_version: u64,
    view: BTreeMap<u32, u32>,
    changes: BTreeMap<u32, Option<u32>>,
}

fn cfg() -> StoreConfig {
    StoreConfig {
        progress: ProgressMode::Hidden,
        ..StoreConfig::default()
    }
}

fn bulk(seed: u64, n: u16) -> impl Iterator<Item = (u32, u32)> {
    let mut x = seed | 1;
    (0..n).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        ((x % u64::from(KEYS)) as u32, (x >> 40) as u32)
    })
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let mut db = Some(Db::open(&path, cfg()).unwrap());
    let tree = db
        .as_ref()
        .unwrap()
        .transact(|t| -> Result<_, StoreError> { BTree::<u32, u32>::named(t, "t") })
        .unwrap();
    let mut committed: BTreeMap<u32, u32> = BTreeMap::new();
    // Per key: the commit number that last changed it.
    let mut changed_at: BTreeMap<u32, u64> = BTreeMap::new();
    let mut version = 0u64;
    let mut slots: [Option<MTxn>; 2] = [None, None];
    let check_committed = |db: &Db, committed: &BTreeMap<u32, u32>| {
        let t = db.begin();
        let all: Vec<(u32, u32)> = tree.iter(&t).unwrap().map(|r| r.unwrap()).collect();
        let want: Vec<(u32, u32)> = committed.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(all, want);
    };
    for op in ops {
        match op {
            Op::Begin(s) => {
                slots[s] = Some(MTxn {
                    txn: db.as_ref().unwrap().begin(),
                    snap_version: version,
                    view: committed.clone(),
                    changes: BTreeMap::new(),
                })
            }
            Op::Insert(s, k, v) => {
                if let Some(m) = &mut slots[s] {
                    let prev = tree.insert(&mut m.txn, k, v).unwrap();
                    assert_eq!(prev, m.view.insert(k, v));
                    m.changes.insert(k, Some(v));
                }
            }
            Op::Remove(s, k) => {
                if let Some(m) = &mut slots[s] {
                    let prev = tree.remove(&mut m.txn, &k).unwrap();
                    assert_eq!(prev, m.view.remove(&k));
                    if prev.is_some() {
                        m.changes.insert(k, None);
                    }
                }
            }
            Op::Get(s, k) => {
                if let Some(m) = &slots[s] {
                    assert_eq!(tree.get(&m.txn, &k).unwrap(), m.view.get(&k).copied());
                }
            }
            Op::Bulk(s, seed, n) => {
                if let Some(m) = &mut slots[s] {
                    for (k, v) in bulk(seed, n) {
                        let prev = tree.insert(&mut m.txn, k, v).unwrap();
                        assert_eq!(prev, m.view.insert(k, v));
                        m.changes.insert(k, Some(v));
                    }
                }
            }
            Op::Range(s, a, b) => {
                if let Some(m) = &slots[s] {
                    let got: Vec<(u32, u32)> = tree
                        .range(&m.txn, a..b)
                        .unwrap()
                        .map(|r| r.unwrap())
                        .collect();
                    let want: Vec<(u32, u32)> = m.view.range(a..b).map(|(k, v)| (*k, *v)).collect();
                    assert_eq!(got, want);
                }
            }
            Op::Commit(s) => {
                let Some(m) = slots[s].take() else { continue };
                let overlap = m
                    .changes
                    .keys()
                    .any(|k| changed_at.get(k).is_some_and(|&v| v > m.snap_version));
                match m.txn.commit() {
                    Ok(_) => {
                        assert!(
                            !overlap,
                            "a commit changing a key changed since its snapshot succeeded"
                        );
                        if !m.changes.is_empty() {
                            version += 1;
                        }
                        for (k, v) in m.changes {
                            match v {
                                Some(v) => committed.insert(k, v),
                                None => committed.remove(&k),
                            };
                            changed_at.insert(k, version);
                        }
                    }
                    Err(e) => {
                        assert!(e.as_conflict().is_some(), "fail-stop error {e}");
                        // Without overlapping keys a conflict needs concurrent commits.
                        assert!(
                            overlap || changed_at.values().any(|&v| v > m.snap_version),
                            "conflict with no concurrent commit"
                        );
                    }
                }
                check_committed(db.as_ref().unwrap(), &committed);
            }
            Op::Reopen => {
                slots = [None, None];
                drop(db.take());
                db = Some(Db::open(&path, cfg()).unwrap());
                check_committed(db.as_ref().unwrap(), &committed);
            }
        }
    }
    drop(slots);
    let db = db.unwrap();
    check_committed(&db, &committed);
    db.verify().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn btree_matches_btreemap(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}
