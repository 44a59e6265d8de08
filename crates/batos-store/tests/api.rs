//! Behaviour of the public API: objects, references, roots, conflicts, resolution,
//! B-trees, blobs, time travel, pack and reopen.

use std::io::{Read, Write};

use batos_store::{
    AppendLog, BTree, CommitError, ConflictError, Counter, Db, Oid, ProgressMode, Ref, StoreConfig,
    StoreError, Tid,
};
use serde::{Deserialize, Serialize};

fn cfg() -> StoreConfig {
    StoreConfig {
        progress: ProgressMode::Hidden,
        ..StoreConfig::default()
    }
}

fn open(dir: &tempfile::TempDir) -> Db {
    Db::open(dir.path().join("img"), cfg()).expect("open image")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Persona {
    name: String,
    memory: Vec<Ref<Note>>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Note {
    text: String,
}

#[test]
fn objects_references_and_named_roots_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let tid = {
        let db = open(&dir);
        let mut txn = db.begin();
        let note = txn
            .insert_new(&Note {
                text: "likes tea".into(),
            })
            .unwrap();
        let p = txn
            .insert_new(&Persona {
                name: "ada".into(),
                memory: vec![note],
            })
            .unwrap();
        txn.set_named_root("ada", p).unwrap();
        txn.commit().unwrap()
    };
    let db = open(&dir);
    assert_eq!(db.last_tid(), tid);
    let txn = db.begin();
    assert_eq!(txn.root_names().unwrap(), vec!["ada".to_string()]);
    let p = txn.named_root::<Persona>("ada").unwrap().unwrap();
    let persona = txn.load(p).unwrap();
    assert_eq!(persona.name, "ada");
    assert_eq!(txn.load(persona.memory[0]).unwrap().text, "likes tea");
    db.verify().unwrap();
}

#[test]
fn tids_strictly_increase_and_snapshots_are_stable() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir);
    let mut t = db.begin();
    let r = t.insert_new(&1u64).unwrap();
    t.set_named_root("n", r).unwrap();
    let mut last = t.commit().unwrap();
    let reader = db.begin();
    for i in 2..10u64 {
        let mut t = db.begin();
        t.set(r, &i).unwrap();
        let tid = t.commit().unwrap();
        assert!(tid > last);
        last = tid;
    }
    // The reader still sees its snapshot.
    assert_eq!(reader.load(r).unwrap(), 1);
    assert_eq!(db.begin().load(r).unwrap(), 9);
    assert_eq!(db.history(r.oid()).unwrap().len(), 9);
}

#[test]
fn first_committer_wins_and_transact_retries() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(
        dir.path().join("img"),
        StoreConfig {
            max_attempts: 1000,
            ..cfg()
        },
    )
    .unwrap();
    let r = db
        .transact(|t| -> Result<_, StoreError> {
            let r = t.insert_new(&0u64)?;
            t.set_named_root("x", r)?;
            Ok(r)
        })
        .unwrap();
    let mut a = db.begin();
    let mut b = db.begin();
    a.set(r, &1).unwrap();
    b.set(r, &2).unwrap();
    a.commit().unwrap();
    match b.commit() {
        Err(CommitError::Conflict(ConflictError::Write { oid, .. })) => assert_eq!(oid, r.oid()),
        other => panic!("expected a write conflict, got {other:?}"),
    }
    assert_eq!(db.begin().load(r).unwrap(), 1);

    // Concurrent increments through transact all land.
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..10 {
                    db.transact(|t| -> Result<(), StoreError> {
                        let v = t.load(r)?;
                        t.set(r, &(v + 1))?;
                        Ok(())
                    })
                    .unwrap();
                }
            });
        }
    });
    assert_eq!(db.begin().load(r).unwrap(), 41);
}

#[test]
fn transact_gives_up_after_max_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(
        dir.path().join("img"),
        StoreConfig {
            max_attempts: 2,
            ..cfg()
        },
    )
    .unwrap();
    let r = db
        .transact(|t| -> Result<_, StoreError> { t.insert_new(&0u64) })
        .unwrap();
    // Every attempt loses against a commit made inside the closure by another txn.
    let err = db
        .transact(|t| -> Result<(), StoreError> {
            t.set(r, &1u64)?;
            let mut other = db.begin();
            other.set(r, &2u64)?;
            other.commit().map_err(|e| match e {
                CommitError::Store(s) => s,
                other => panic!("unexpected {other}"),
            })?;
            Ok(())
        })
        .unwrap_err();
    assert!(
        matches!(err, StoreError::RetriesExhausted { attempts: 2, .. }),
        "{err}"
    );
}

#[test]
fn read_current_detects_write_skew() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir);
    let (a, b) = db
        .transact(|t| -> Result<_, StoreError> { Ok((t.insert_new(&1i64)?, t.insert_new(&1i64)?)) })
        .unwrap();
    // Without read_current, write skew commits (snapshot isolation).
    let mut t1 = db.begin();
    let mut t2 = db.begin();
    let _ = t1.load(b).unwrap();
    t1.set(a, &0).unwrap();
    let _ = t2.load(a).unwrap();
    t2.set(b, &0).unwrap();
    t1.commit().unwrap();
    t2.commit().unwrap();
    // With it, the second one fails.
    let mut t1 = db.begin();
    let mut t2 = db.begin();
    t1.read_current(b.oid());
    t1.set(a, &5).unwrap();
    t2.set(b, &5).unwrap();
    t2.commit().unwrap();
    assert!(matches!(
        t1.commit(),
        Err(CommitError::Conflict(ConflictError::Read { .. }))
    ));
    // A read-only transaction validates its read set too.
    let mut t3 = db.begin();
    t3.read_current(a.oid());
    let mut t4 = db.begin();
    t4.set(a, &7).unwrap();
    t4.commit().unwrap();
    assert!(matches!(
        t3.commit(),
        Err(CommitError::Conflict(ConflictError::Read { .. }))
    ));
}

#[test]
fn counters_and_append_logs_resolve_conflicts() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir);
    let (c, log) = db
        .transact(|t| -> Result<_, StoreError> {
            let c = Ref::<Counter>::new_counter(t, 0)?;
            let log = t.insert_new_resolvable(&AppendLog::<String>::default())?;
            Ok((c, log))
        })
        .unwrap();
    let mut a = db.begin();
    let mut b = db.begin();
    c.add(&mut a, 5).unwrap();
    c.add(&mut b, 7).unwrap();
    let mut la = a.load(log).unwrap();
    la.entries.push("from a".into());
    a.put_resolvable(log.oid(), &la).unwrap();
    let mut lb = b.load(log).unwrap();
    lb.entries.push("from b".into());
    b.put_resolvable(log.oid(), &lb).unwrap();
    a.commit().unwrap();
    b.commit().unwrap();
    let t = db.begin();
    assert_eq!(c.value(&t).unwrap(), 12);
    assert_eq!(t.load(log).unwrap().entries, vec!["from a", "from b"]);
}

#[test]
fn btree_insert_get_remove_range_at_scale() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir);
    let tree = db
        .transact(|t| -> Result<_, StoreError> { BTree::<u64, String>::named(t, "idx") })
        .unwrap();
    let mut model = std::collections::BTreeMap::new();
    let mut x: u64 = 12345;
    for _ in 0..20 {
        let mut t = db.begin();
        for _ in 0..500 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let k = (x >> 33) % 50_000;
            tree.insert(&mut t, k, format!("v{k}")).unwrap();
            model.insert(k, format!("v{k}"));
        }
        t.commit().unwrap();
    }
    let mut t = db.begin();
    for k in (0..50_000).step_by(7) {
        assert_eq!(tree.remove(&mut t, &k).unwrap(), model.remove(&k));
    }
    t.commit().unwrap();
    let db = {
        drop(db);
        open(&dir)
    };
    let t = db.begin();
    let tree = BTree::<u64, String>::named(&mut db.begin(), "idx").unwrap();
    let all: Vec<_> = tree.iter(&t).unwrap().map(|r| r.unwrap()).collect();
    let want: Vec<_> = model.iter().map(|(k, v)| (*k, v.clone())).collect();
    assert_eq!(all, want);
    let part: Vec<_> = tree
        .range(&t, 1000..2000)
        .unwrap()
        .map(|r| r.unwrap().0)
        .collect();
    let want_part: Vec<_> = model.range(1000..2000).map(|(k, _)| *k).collect();
    assert_eq!(part, want_part);
    for k in [0u64, 1, 999, 25_000, 49_999] {
        assert_eq!(tree.get(&t, &k).unwrap(), model.get(&k).cloned());
    }
    db.verify().unwrap();
}

#[test]
fn btree_concurrent_inserts_into_one_leaf_merge() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir);
    let tree = db
        .transact(|t| -> Result<_, StoreError> {
            let tr = BTree::<u32, u32>::named(t, "t")?;
            tr.insert(t, 10, 10)?;
            Ok(tr)
        })
        .unwrap();
    let mut a = db.begin();
    let mut b = db.begin();
    tree.insert(&mut a, 1, 1).unwrap();
    tree.insert(&mut b, 2, 2).unwrap();
    a.commit().unwrap();
    b.commit().unwrap();
    // Point reads go through the shared cache of decoded nodes: it must hold the merged
    // leaf, not the one `b` wrote before the resolver merged `a`'s key in.
    let t = db.begin();
    assert_eq!(tree.get(&t, &1).unwrap(), Some(1));
    assert_eq!(tree.get(&t, &2).unwrap(), Some(2));
    drop(t);
    // The same key on both sides conflicts.
    let mut a = db.begin();
    let mut b = db.begin();
    tree.insert(&mut a, 3, 1).unwrap();
    tree.insert(&mut b, 3, 2).unwrap();
    a.commit().unwrap();
    assert!(b.commit().unwrap_err().as_conflict().is_some());
    let t = db.begin();
    let all: Vec<_> = tree.iter(&t).unwrap().map(|r| r.unwrap()).collect();
    assert_eq!(all, vec![(1, 1), (2, 2), (3, 1), (10, 10)]);
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Weights {
    name: String,
    blob: batos_store::BlobRef,
}

#[test]
fn blobs_stream_in_and_out_and_commit_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir);
    let data = pattern(7, 3 * 1024 * 1024 + 123);
    let w = db
        .transact(|t| -> Result<_, StoreError> {
            let mut bw = t.blob_writer()?;
            for chunk in data.chunks(100_000) {
                bw.write_all(chunk).unwrap();
            }
            let blob = bw.finish()?;
            let w = t.insert_new(&Weights {
                name: "lora-a".into(),
                blob,
            })?;
            t.set_named_root("w", w)?;
            Ok(w)
        })
        .unwrap();
    let t = db.begin();
    let weights = t.load(w).unwrap();
    assert_eq!(weights.blob.len(), data.len() as u64);
    assert_eq!(weights.blob.hash(), *blake3::hash(&data).as_bytes());
    let mut out = Vec::new();
    t.open_blob(&weights.blob)
        .unwrap()
        .read_to_end(&mut out)
        .unwrap();
    assert_eq!(out, data);

    // An aborted transaction's blob is deleted.
    let mut t2 = db.begin();
    let orphan = t2.write_blob(&mut &pattern(8, 5000)[..]).unwrap();
    drop(t2);
    assert!(matches!(
        db.begin().open_blob(&orphan),
        Err(StoreError::BlobMissing { .. })
    ));
    let report = db.verify().unwrap();
    assert_eq!(report.blobs, 1);
    assert_eq!(report.orphan_blobs, 0);
}

#[test]
fn time_travel_and_pack() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir);
    let r = db
        .transact(|t| -> Result<_, StoreError> {
            let r = t.insert_new(&String::from("v0"))?;
            t.set_named_root("s", r)?;
            Ok(r)
        })
        .unwrap();
    let mut tids = vec![db.last_tid()];
    for i in 1..5 {
        let mut t = db.begin();
        t.set(r, &format!("v{i}")).unwrap();
        tids.push(t.commit().unwrap());
    }
    let early = db.begin();
    // Garbage: an object that becomes unreachable, and a blob that goes with it.
    let mut t = db.begin();
    let blob = t.write_blob(&mut &pattern(3, 2 << 20)[..]).unwrap();
    let g = t
        .insert_new(&Weights {
            name: "tmp".into(),
            blob,
        })
        .unwrap();
    t.set_named_root("garbage", g).unwrap();
    t.commit().unwrap();
    let mut t = db.begin();
    t.remove_named_root("garbage").unwrap();
    t.commit().unwrap();

    for (i, tid) in tids.iter().enumerate() {
        let snap = db.snapshot_at(*tid).unwrap();
        assert_eq!(snap.load(r).unwrap(), format!("v{i}"));
        assert!(matches!(
            db.snapshot_at(*tid).unwrap().put(r.oid(), &1u8),
            Err(StoreError::ReadOnly { .. })
        ));
    }
    assert!(matches!(
        db.snapshot_at(Tid::new(10_000).unwrap()),
        Err(StoreError::FutureTid { .. })
    ));
    let before = db.log_info().end;
    let report = db.pack(db.last_tid()).unwrap();
    assert!(report.log_bytes_after < before, "{report:?}");
    assert_eq!(report.blobs_removed, 1);
    assert!(matches!(
        db.snapshot_at(tids[1]),
        Err(StoreError::SnapshotPacked { .. })
    ));
    assert_eq!(db.begin().load(r).unwrap(), "v4");
    // A transaction that began before the horizon cannot commit.
    let mut early = early;
    early.set(r, &String::from("late")).unwrap();
    assert!(matches!(
        early.commit(),
        Err(CommitError::Conflict(ConflictError::Packed { .. }))
    ));
    assert!(!db.begin().exists(g.oid()).unwrap());
    db.verify().unwrap();
    // Commits continue after pack, and the packed image reopens.
    let mut t = db.begin();
    t.set(r, &String::from("v5")).unwrap();
    let t5 = t.commit().unwrap();
    drop(db);
    let db = open(&dir);
    assert_eq!(db.last_tid(), t5);
    assert_eq!(db.begin().load(r).unwrap(), "v5");
    db.verify().unwrap();
}

#[test]
fn db_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Db>();
    fn check_send<T: Send>() {}
    check_send::<batos_store::Txn>();
    check_send::<batos_store::BlobWriter>();
    check_send::<batos_store::BlobReader>();
    let _ = Oid::ROOT;
}

#[test]
fn pack_while_committers_and_readers_run() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir);
    let refs: Vec<Ref<u64>> = db
        .transact(|t| -> Result<_, StoreError> {
            let v: Vec<Ref<u64>> = (0..4)
                .map(|_| t.insert_new(&0u64))
                .collect::<Result<_, _>>()?;
            let list = t.insert_new(&v)?;
            t.set_named_root("list", list)?;
            Ok(v)
        })
        .unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let refs = &refs;
    std::thread::scope(|s| {
        for r in refs {
            let (db, stop) = (&db, &stop);
            s.spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut t = db.begin();
                    n += 1;
                    t.set(*r, &n).unwrap();
                    match t.commit() {
                        Ok(_) | Err(CommitError::Conflict(ConflictError::Packed { .. })) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
        let (db, stop) = (&db, &stop);
        s.spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = db.begin();
                for r in refs {
                    match t.load(*r) {
                        Ok(_) | Err(StoreError::SnapshotPacked { .. }) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
            }
        });
        for _ in 0..5 {
            std::thread::sleep(std::time::Duration::from_millis(30));
            db.pack(db.last_tid()).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    db.verify().unwrap();
    let last = db.last_tid();
    drop(db);
    let db = open(&dir);
    assert_eq!(db.last_tid(), last);
    db.verify().unwrap();
}
