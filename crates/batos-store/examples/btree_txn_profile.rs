//! Where a single-threaded transaction of 100 random B-tree inserts spends its time:
//! the inserts (CPU, in the transaction's node cache) and `commit` (encode, append,
//! index, fdatasync), plus the bytes each commit appends. Same keys and values as the
//! criterion bench `btree/100_inserts_per_txn`.
//!
//! `BATOS_BENCH_DIR=/tmp cargo run --release -p batos-store --example btree_txn_profile -- 600`
//! (add `strace -f -T -e trace=fdatasync` in front to see the fsyncs' share).

use std::time::{Duration, Instant};

use batos_store::{BTree, Db, ProgressMode, StoreConfig, StoreError};
use rand::{Rng, SeedableRng};

fn main() -> Result<(), StoreError> {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(600);
    let dir = match std::env::var_os("BATOS_BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d),
        None => tempfile::tempdir(),
    }
    .map_err(|e| StoreError::Io {
        op: "create temp dir",
        path: "BATOS_BENCH_DIR".into(),
        source: e,
    })?;
    let cfg = StoreConfig {
        progress: ProgressMode::Hidden,
        ..StoreConfig::default()
    };
    let db = Db::open(dir.path().join("img"), cfg)?;
    let tree = db.transact(|t| BTree::<String, String>::named(t, "tree"))?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1000);
    let (mut inserts, mut commits) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let mut bytes = Vec::with_capacity(n);
    let started = Instant::now();
    for txn_no in 0..n {
        let end_before = db.log_info().end;
        let t0 = Instant::now();
        let mut t = db.begin();
        for j in 0..100 {
            let k = format!("key-{:016x}", rng.random::<u64>());
            tree.insert(&mut t, k, format!("value-{txn_no}-{j}"))?;
        }
        let t1 = Instant::now();
        t.commit().map_err(|e| match e {
            batos_store::CommitError::Store(s) => s,
            other => panic!("single-threaded commit conflicted: {other}"),
        })?;
        let t2 = Instant::now();
        inserts.push(t1 - t0);
        commits.push(t2 - t1);
        bytes.push(db.log_info().end - end_before);
    }
    let total = started.elapsed();
    let med = |v: &mut Vec<Duration>| {
        v.sort();
        (v[v.len() / 2], v[v.len() / 10], v[v.len() * 9 / 10])
    };
    let (im, i10, i90) = med(&mut inserts);
    let (cm, c10, c90) = med(&mut commits);
    bytes.sort_unstable();
    println!(
        "{n} txns of 100 random inserts in {:.2} s: {:.1} txns/s",
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64()
    );
    println!("inserts: median {im:?} (p10 {i10:?}, p90 {i90:?})");
    println!("commit:  median {cm:?} (p10 {c10:?}, p90 {c90:?})");
    println!(
        "bytes appended per commit: median {} (p10 {}, p90 {})",
        bytes[n / 2],
        bytes[n / 10],
        bytes[n * 9 / 10]
    );
    Ok(())
}
