//! Criterion benchmarks of batos-store, shaped like ZODB's bench (shared/bench/zodb):
//! small commits (1 thread and 8 concurrent committers, fsync on), 100 B-tree inserts
//! per transaction (in one ever-growing tree, and as ZODB's part b: 500 transactions into
//! a fresh tree), a 64 MiB blob written (with fsync) and read back, point reads, and
//! open time with 10k and 100k objects.
//!
//! Run: `cargo bench -p batos-store --bench store`. Images go to $BATOS_BENCH_DIR (or
//! the system temp dir); put it on the disk you want measured.

use std::hint::black_box;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use batos_store::{BTree, Db, Oid, ProgressMode, Ref, StoreConfig, StoreError};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

fn cfg() -> StoreConfig {
    StoreConfig {
        progress: ProgressMode::Hidden,
        ..StoreConfig::default()
    }
}

fn bench_dir() -> tempfile::TempDir {
    match std::env::var_os("BATOS_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    }
}

/// Like ZODB bench's `Rec`: a record with 10 fields.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rec {
    id: u64,
    name: String,
    count: u64,
    score: f64,
    flag: bool,
    tags: (String, String),
    owner: String,
    created: f64,
    updated: f64,
    note: String,
}

impl Rec {
    fn new(i: u64) -> Rec {
        Rec {
            id: i,
            name: format!("record-{i:06}"),
            count: 0,
            score: 0.5,
            flag: false,
            tags: ("a".into(), "b".into()),
            owner: format!("user{}", i % 17),
            created: 1.7e9 + i as f64,
            updated: 0.0,
            note: "x".repeat(32),
        }
    }
}

fn records(db: &Db, n: u64) -> Vec<Ref<Rec>> {
    db.transact(|t| -> Result<_, StoreError> {
        let v: Vec<Ref<Rec>> = (0..n)
            .map(|i| t.insert_new(&Rec::new(i)))
            .collect::<Result<_, _>>()?;
        let list = t.insert_new(&v)?;
        t.set_named_root("recs", list)?;
        Ok(v)
    })
    .unwrap()
}

fn touch(db: &Db, r: Ref<Rec>, k: u64) {
    let mut t = db.begin();
    let mut rec = t.load(r).unwrap();
    rec.count += 1;
    rec.updated = k as f64;
    t.set(r, &rec).unwrap();
    t.commit().unwrap();
}

fn small_commits(c: &mut Criterion) {
    let mut g = c.benchmark_group("small_commit");
    g.throughput(Throughput::Elements(1));
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(8));
    let dir = bench_dir();
    let db = Db::open(dir.path().join("img"), cfg()).unwrap();
    let recs = records(&db, 100);
    let mut k = 0u64;
    g.bench_function("1_thread_fsync", |b| {
        b.iter(|| {
            touch(&db, recs[(k % 100) as usize], k);
            k += 1;
        })
    });
    // 8 committers, each on its own objects: group commit shares the fdatasyncs.
    g.bench_function("8_threads_fsync", |b| {
        b.iter_custom(|iters| {
            let per = iters.div_ceil(8);
            let start = Instant::now();
            std::thread::scope(|s| {
                for th in 0..8u64 {
                    let db = &db;
                    let recs = &recs;
                    s.spawn(move || {
                        for j in 0..per {
                            let idx = (th * 12 + j % 12) as usize;
                            touch(db, recs[idx], j);
                        }
                    });
                }
            });
            // Report time per commit as if `iters` commits ran.
            start.elapsed().mul_f64(iters as f64 / (per * 8) as f64)
        })
    });
    g.finish();
}

fn btree_inserts(c: &mut Criterion) {
    let mut g = c.benchmark_group("btree");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(8));
    let dir = bench_dir();
    // Eight committers inserting random keys conflict on leaf splits: let them retry.
    let db = Db::open(
        dir.path().join("img"),
        StoreConfig {
            max_attempts: 10_000,
            ..cfg()
        },
    )
    .unwrap();
    let tree = db
        .transact(|t| -> Result<_, StoreError> { BTree::<String, String>::named(t, "tree") })
        .unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1000);
    let mut keys = Vec::new();
    let mut txn_no = 0u64;
    g.throughput(Throughput::Elements(1));
    g.bench_function("100_inserts_per_txn", |b| {
        b.iter(|| {
            let mut t = db.begin();
            for j in 0..100 {
                let k = format!("key-{:016x}", rng.random::<u64>());
                tree.insert(&mut t, k.clone(), format!("value-{txn_no}-{j}"))
                    .unwrap();
                keys.push(k);
            }
            t.commit().unwrap();
            txn_no += 1;
        })
    });
    // Same, 8 concurrent committers (inserts merge per leaf or retry).
    g.bench_function("100_inserts_per_txn_8_threads", |b| {
        b.iter_custom(|iters| {
            let per = iters.div_ceil(8);
            let start = Instant::now();
            std::thread::scope(|s| {
                for th in 0..8u64 {
                    let db = &db;
                    s.spawn(move || {
                        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(th + 77);
                        for n in 0..per {
                            db.transact(|t| -> Result<(), StoreError> {
                                for j in 0..100 {
                                    let k = format!("key-{:016x}", rng.random::<u64>());
                                    tree.insert(t, k, format!("value-{th}-{n}-{j}"))?;
                                }
                                Ok(())
                            })
                            .unwrap();
                        }
                    });
                }
            });
            start.elapsed().mul_f64(iters as f64 / (per * 8) as f64)
        })
    });
    // Point reads of existing keys.
    let t = db.begin();
    let mut i = 0usize;
    g.bench_function("point_read_same_txn", |b| {
        b.iter(|| {
            let k = &keys[(i * 7919) % keys.len()];
            i += 1;
            black_box(tree.get(&t, k).unwrap().unwrap());
        })
    });
    g.bench_function("point_read_fresh_txn", |b| {
        b.iter(|| {
            let t = db.begin();
            let k = &keys[(i * 7919) % keys.len()];
            i += 1;
            black_box(tree.get(&t, k).unwrap().unwrap());
        })
    });
    drop(t);
    g.finish();
}

/// ZODB bench part b's workload exactly: a fresh image and an empty tree, 500
/// transactions of 100 random `key-%016x` inserts (50 000 keys at the end), timed from the
/// first insert to the last commit. One criterion iteration is one whole run, so the
/// throughput criterion prints (elements = transactions) is directly comparable with
/// `bench_zodb.py`'s `commits_per_s` for part b. `btree/100_inserts_per_txn` above instead
/// keeps growing one tree across all its iterations (hundreds of thousands of keys).
fn btree_zodb_workload(c: &mut Criterion) {
    const TXNS: u64 = 500;
    let mut g = c.benchmark_group("btree_zodb_workload");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(10));
    g.throughput(Throughput::Elements(TXNS));
    let mut seed = 1000u64;
    g.bench_function("500_txns_x_100_inserts", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = bench_dir();
                let db = Db::open(dir.path().join("img"), cfg()).unwrap();
                let tree = db
                    .transact(|t| -> Result<_, StoreError> {
                        BTree::<String, String>::named(t, "tree")
                    })
                    .unwrap();
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                seed += 1;
                let start = Instant::now();
                for txn_no in 0..TXNS {
                    let mut t = db.begin();
                    for j in 0..100 {
                        let k = format!("key-{:016x}", rng.random::<u64>());
                        tree.insert(&mut t, k, format!("value-{txn_no}-{j}"))
                            .unwrap();
                    }
                    t.commit().unwrap();
                }
                total += start.elapsed();
                drop(db);
            }
            total
        })
    });
    g.finish();
}

#[derive(Serialize, Deserialize)]
struct Holder {
    blob: batos_store::BlobRef,
}

fn blobs(c: &mut Criterion) {
    const SIZE: usize = 64 << 20;
    let mut g = c.benchmark_group("blob_64MiB");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(15));
    g.throughput(Throughput::Bytes(SIZE as u64));
    let dir = bench_dir();
    let db = Db::open(dir.path().join("img"), cfg()).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mut data = vec![0u8; SIZE];
    rng.fill(&mut data[..]);
    let data = Arc::new(data);
    let holder = db
        .transact(|t| -> Result<_, StoreError> {
            let blob = t.write_blob(&mut &data[..])?;
            let h = t.insert_new(&Holder { blob })?;
            t.set_named_root("h", h)?;
            Ok(h)
        })
        .unwrap();
    // Each timed write is followed by an untimed pack that deletes the previous blob, so
    // the disk holds one or two blobs (as ZODB's bench, which writes one per fresh
    // storage) instead of gigabytes of old revisions that throttle the page cache.
    g.sampling_mode(criterion::SamplingMode::Flat);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("write_fsync_commit", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let mut t = db.begin();
                let mut w = t.blob_writer().unwrap();
                for chunk in data.chunks(1 << 20) {
                    w.write_all(chunk).unwrap();
                }
                let blob = w.finish().unwrap();
                t.set(holder, &Holder { blob }).unwrap();
                t.commit().unwrap();
                total += start.elapsed();
                db.pack(db.last_tid()).unwrap();
            }
            total
        })
    });
    g.bench_function("read_warm", |b| {
        b.iter(|| {
            let t = db.begin();
            let h = t.load(holder).unwrap();
            let mut r = t.open_blob(&h.blob).unwrap();
            let n = r.copy_to(&mut std::io::sink()).unwrap();
            assert_eq!(n, SIZE as u64);
        })
    });
    g.finish();
    // Old revisions' blobs go with pack, keeping the bench's disk use bounded.
    db.pack(db.last_tid()).unwrap();
}

#[derive(Serialize, Deserialize, Clone, PartialEq)]
struct Item {
    i: u64,
    s: String,
}

/// An image holding `n` Items in a B-tree, as ZODB bench part d builds.
fn build_image(n: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = bench_dir();
    let path = dir.path().join("img");
    let db = Db::open(&path, cfg()).unwrap();
    let tree = db
        .transact(|t| -> Result<_, StoreError> { BTree::<u64, Ref<Item>>::named(t, "items") })
        .unwrap();
    for start in (0..n).step_by(10_000) {
        let mut t = db.begin();
        for i in start..(start + 10_000).min(n) {
            let item = t
                .insert_new(&Item {
                    i,
                    s: format!("item-{i}"),
                })
                .unwrap();
            tree.insert(&mut t, i, item).unwrap();
        }
        t.commit().unwrap();
    }
    drop(db);
    (dir, path)
}

fn open_time(c: &mut Criterion) {
    let mut g = c.benchmark_group("open");
    g.sample_size(20);
    g.measurement_time(Duration::from_secs(6));
    for n in [10_000u64, 100_000] {
        let (_dir, path) = build_image(n);
        let open_and_read = |path: &PathBuf| {
            let db = Db::open(path, cfg()).unwrap();
            let t = db.begin();
            let tree = BTree::<u64, Ref<Item>>::from_oid(
                t.named_root::<()>("items").unwrap().unwrap().oid(),
            );
            let r = tree.get(&t, &(n - 1)).unwrap().unwrap();
            assert_eq!(t.load(r).unwrap().i, n - 1);
            drop(t);
            db
        };
        // Timed: open + first lookup (as ZODB's part d); closing is not timed.
        g.bench_function(format!("{}k_objects", n / 1000), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let db = open_and_read(&path);
                    total += start.elapsed();
                    drop(db);
                }
                total
            })
        });
        if n == 100_000 {
            // Index deleted: open rebuilds it from the log (the rare path).
            g.sample_size(10);
            g.bench_function("100k_objects_rebuild_index", |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        std::fs::remove_dir_all(path.join("index")).unwrap();
                        let start = Instant::now();
                        let db = open_and_read(&path);
                        total += start.elapsed();
                        drop(db);
                    }
                    total
                })
            });
        }
    }
    g.finish();
    let _ = Oid::ROOT;
}

criterion_group!(
    benches,
    small_commits,
    btree_inserts,
    btree_zodb_workload,
    blobs,
    open_time
);
criterion_main!(benches);
