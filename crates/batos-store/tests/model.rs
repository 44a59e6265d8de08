//! Model-based property test: random interleavings of begin / read / write /
//! read_current / commit / abort / reopen / time travel / pack across several concurrent
//! transactions, checked step by step against a simple in-memory model of snapshot
//! isolation with first-committer-wins.

use std::collections::{BTreeMap, BTreeSet};

use batos_store::{
    CommitError, ConflictError, Db, Oid, ProgressMode, StoreConfig, StoreError, Tid,
};
use proptest::prelude::*;

const KEYS: usize = 4;
const SLOTS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Begin(usize),
    Read(usize, usize),
    Write(usize, usize, u64),
    ReadCurrent(usize, usize),
    Commit(usize),
    Abort(usize),
    Reopen,
    TimeTravel(usize),
    Pack,
}

fn op() -> impl Strategy<Value = Op> {
    let slot = 0..SLOTS;
    let key = 0..KEYS;
    prop_oneof![
        4 => slot.clone().prop_map(Op::Begin),
        4 => (slot.clone(), key.clone()).prop_map(|(s, k)| Op::Read(s, k)),
        6 => (slot.clone(), key.clone(), 0..1000u64).prop_map(|(s, k, v)| Op::Write(s, k, v)),
        1 => (slot.clone(), key).prop_map(|(s, k)| Op::ReadCurrent(s, k)),
        4 => slot.clone().prop_map(Op::Commit),
        1 => slot.prop_map(Op::Abort),
        1 => Just(Op::Reopen),
        1 => (0..64usize).prop_map(Op::TimeTravel),
        1 => Just(Op::Pack),
    ]
}

/// What the model expects of one transaction.
#[derive(Debug, Clone)]
struct ModelTxn {
    snap_tid: u64,
    snap_vals: [u64; KEYS],
    snap_ver: [u64; KEYS],
    writes: BTreeMap<usize, u64>,
    read_current: BTreeSet<usize>,
}

#[derive(Debug)]
struct Model {
    vals: [u64; KEYS],
    ver: [u64; KEYS],
    last_tid: u64,
    horizon: u64,
    history: Vec<(u64, [u64; KEYS])>,
    slots: [Option<ModelTxn>; SLOTS],
}

#[derive(Debug, PartialEq)]
enum Outcome {
    Committed(u64),
    ReadConflict(usize),
    WriteConflict(usize),
    Packed,
}

impl Model {
    fn begin(&mut self, s: usize) {
        self.slots[s] = Some(ModelTxn {
            snap_tid: self.last_tid,
            snap_vals: self.vals,
            snap_ver: self.ver,
            writes: BTreeMap::new(),
            read_current: BTreeSet::new(),
        });
    }

    fn commit(&mut self, s: usize) -> Option<Outcome> {
        let t = self.slots[s].take()?;
        if t.writes.is_empty() {
            for &k in &t.read_current {
                if self.ver[k] != t.snap_ver[k] {
                    return Some(Outcome::ReadConflict(k));
                }
            }
            return Some(Outcome::Committed(t.snap_tid));
        }
        if t.snap_tid < self.horizon {
            return Some(Outcome::Packed);
        }
        for &k in &t.read_current {
            if self.ver[k] != t.snap_ver[k] {
                return Some(Outcome::ReadConflict(k));
            }
        }
        for &k in t.writes.keys() {
            if self.ver[k] != t.snap_ver[k] {
                return Some(Outcome::WriteConflict(k));
            }
        }
        self.last_tid += 1;
        for (&k, &v) in &t.writes {
            self.vals[k] = v;
            self.ver[k] = self.last_tid;
        }
        self.history.push((self.last_tid, self.vals));
        Some(Outcome::Committed(self.last_tid))
    }
}

struct Harness {
    dir: tempfile::TempDir,
    db: Option<Db>,
    oids: [Oid; KEYS],
    txns: Vec<Option<batos_store::Txn>>,
}

fn cfg() -> StoreConfig {
    StoreConfig {
        progress: ProgressMode::Hidden,
        ..StoreConfig::default()
    }
}

impl Harness {
    fn new() -> (Harness, Model) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(dir.path().join("img"), cfg()).unwrap();
        let mut txn = db.begin();
        let mut oids = Vec::new();
        for _ in 0..KEYS {
            oids.push(txn.insert_new(&0u64).unwrap().oid());
        }
        let all = txn.insert_new(&oids).unwrap();
        txn.set_named_root("keys", all).unwrap();
        let tid = txn.commit().unwrap().get();
        let model = Model {
            vals: [0; KEYS],
            ver: [tid; KEYS],
            last_tid: tid,
            horizon: 0,
            history: vec![(tid, [0; KEYS])],
            slots: Default::default(),
        };
        let h = Harness {
            dir,
            db: Some(db),
            oids: oids.try_into().unwrap(),
            txns: (0..SLOTS).map(|_| None).collect(),
        };
        (h, model)
    }

    fn db(&self) -> &Db {
        self.db.as_ref().unwrap()
    }

    fn check_committed(&self, m: &Model) {
        let t = self.db().begin();
        assert_eq!(t.snapshot().get(), m.last_tid);
        for (k, (oid, want)) in self.oids.iter().zip(m.vals).enumerate() {
            assert_eq!(t.get::<u64>(*oid).unwrap(), want, "key {k}");
        }
    }
}

fn run(ops: Vec<Op>) {
    let (mut h, mut m) = Harness::new();
    for op in ops {
        match op {
            Op::Begin(s) => {
                h.txns[s] = Some(h.db().begin());
                m.begin(s);
            }
            Op::Read(s, k) => {
                let (Some(t), Some(mt)) = (&h.txns[s], &m.slots[s]) else {
                    continue;
                };
                let got = t.get::<u64>(h.oids[k]);
                match mt.writes.get(&k) {
                    Some(v) => assert_eq!(got.unwrap(), *v),
                    None if mt.snap_tid < m.horizon => {
                        assert!(
                            matches!(got, Err(StoreError::SnapshotPacked { .. })),
                            "{got:?}"
                        )
                    }
                    None => assert_eq!(got.unwrap(), mt.snap_vals[k]),
                }
            }
            Op::Write(s, k, v) => {
                let (Some(t), Some(mt)) = (&mut h.txns[s], &mut m.slots[s]) else {
                    continue;
                };
                t.put(h.oids[k], &v).unwrap();
                mt.writes.insert(k, v);
            }
            Op::ReadCurrent(s, k) => {
                let (Some(t), Some(mt)) = (&mut h.txns[s], &mut m.slots[s]) else {
                    continue;
                };
                t.read_current(h.oids[k]);
                mt.read_current.insert(k);
            }
            Op::Commit(s) => {
                let Some(t) = h.txns[s].take() else {
                    continue;
                };
                let want = m.commit(s).expect("slots in step");
                let got = match t.commit() {
                    Ok(tid) => Outcome::Committed(tid.get()),
                    Err(CommitError::Conflict(ConflictError::Read { oid, .. })) => {
                        Outcome::ReadConflict(h.oids.iter().position(|o| *o == oid).unwrap())
                    }
                    Err(CommitError::Conflict(ConflictError::Write { oid, .. })) => {
                        Outcome::WriteConflict(h.oids.iter().position(|o| *o == oid).unwrap())
                    }
                    Err(CommitError::Conflict(ConflictError::Packed { .. })) => Outcome::Packed,
                    Err(e) => panic!("fail-stop error: {e}"),
                };
                assert_eq!(got, want);
                h.check_committed(&m);
            }
            Op::Abort(s) => {
                if let Some(t) = h.txns[s].take() {
                    t.abort();
                }
                m.slots[s] = None;
            }
            Op::Reopen => {
                h.txns.iter_mut().for_each(|t| *t = None);
                m.slots = Default::default();
                h.db = None;
                h.db = Some(Db::open(h.dir.path().join("img"), cfg()).unwrap());
                h.check_committed(&m);
            }
            Op::TimeTravel(i) => {
                let (tid, vals) = m.history[i % m.history.len()];
                let r = h.db().snapshot_at(Tid::new(tid).unwrap());
                if tid < m.horizon {
                    assert!(matches!(r, Err(StoreError::SnapshotPacked { .. })), "{r:?}");
                } else {
                    let snap = r.unwrap();
                    for (oid, want) in h.oids.iter().zip(vals) {
                        assert_eq!(snap.get::<u64>(*oid).unwrap(), want);
                    }
                }
            }
            Op::Pack => {
                let report = h.db().pack(Tid::new(m.last_tid).unwrap()).unwrap();
                assert_eq!(report.horizon.get(), m.last_tid);
                m.horizon = m.last_tid;
                h.check_committed(&m);
            }
        }
    }
    h.txns.iter_mut().for_each(|t| *t = None);
    h.check_committed(&m);
    h.db().verify().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_snapshot_isolation_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops);
    }
}

/// Named regression: a read-only transaction with read_current after a pack.
#[test]
fn regression_read_current_only_commit_after_pack() {
    run(vec![
        Op::Begin(0),
        Op::ReadCurrent(0, 1),
        Op::Begin(1),
        Op::Write(1, 1, 5),
        Op::Commit(1),
        Op::Pack,
        Op::Commit(0),
    ]);
}
