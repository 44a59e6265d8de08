//! Crash harness (`harness = false`): a child process commits in a loop from three
//! threads (objects, B-tree entries, a counter, blobs, and now and then a pack) and
//! prints every acknowledged `i tid`; the parent SIGKILLs it at a random moment, then
//! reopens the image and checks that every acknowledged commit is there, intact, that
//! nothing partial is visible, and that `verify` passes.
//!
//! Before each reopen the parent also leaves, deletes, truncates, damages or replaces
//! with a stale copy the index checkpoint (the child writes one every few commits).
//!
//! `cargo test -p batos-store --release --test crash -- --trials 500` runs more trials
//! (or set BATOS_CRASH_TRIALS); `--seed N` replays a run.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use batos_store::{
    BTree, BlobRef, CommitError, Counter, Db, ProgressMode, Ref, StoreConfig, StoreError, Tid,
};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

const CHILD_ENV: &str = "BATOS_CRASH_CHILD";
const THREADS: u64 = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Payload {
    i: u64,
    bytes: Vec<u8>,
    blob: Option<BlobRef>,
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn payload_len(i: u64) -> usize {
    ((i * 7919) % 4000) as usize
}

fn blob_len(i: u64) -> Option<usize> {
    (i % 10 == 3).then(|| ((i * 104_729) % (256 << 10)) as usize + 1)
}

fn cfg() -> StoreConfig {
    StoreConfig {
        progress: ProgressMode::Hidden,
        max_attempts: 1000,
        // Index checkpoints every few commits, so kills land before, during and after
        // them.
        index_checkpoint_revisions: 40,
        ..StoreConfig::default()
    }
}

/// What the parent does to the index checkpoint before reopening (the index is a cache
/// of the log: recovery must be right whatever state it is in).
#[derive(Debug, Clone, Copy)]
enum CkptDamage {
    Leave,
    Delete,
    Truncate,
    FlipByte,
    /// Put back the copy saved after an earlier trial (stale, maybe a pack ago).
    Stale,
}

fn damage_checkpoint(
    dir: &Path,
    rng: &mut impl Rng,
    saved: &Option<(std::path::PathBuf, Vec<u8>)>,
) -> CkptDamage {
    let ckpts: Vec<std::path::PathBuf> = std::fs::read_dir(dir.join("index"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    let what = match rng.random_range(0..8) {
        0 => CkptDamage::Delete,
        1 => CkptDamage::Truncate,
        2 => CkptDamage::FlipByte,
        3 => CkptDamage::Stale,
        _ => CkptDamage::Leave,
    };
    match what {
        CkptDamage::Leave => {}
        CkptDamage::Delete => ckpts.iter().for_each(|p| std::fs::remove_file(p).unwrap()),
        CkptDamage::Truncate | CkptDamage::FlipByte => {
            for p in &ckpts {
                let mut b = std::fs::read(p).unwrap();
                let at = rng.random_range(0..b.len().max(1));
                if b.is_empty() {
                    continue;
                }
                match what {
                    CkptDamage::Truncate => b.truncate(at),
                    _ => b[at] ^= 0x41,
                }
                std::fs::write(p, b).unwrap();
            }
        }
        CkptDamage::Stale => {
            if let Some((p, b)) = saved {
                std::fs::write(p, b).unwrap();
            }
        }
    }
    what
}

type Entries = BTree<u64, Ref<Payload>>;

fn child(dir: &Path) -> Result<(), StoreError> {
    let db = Db::open(dir, cfg())?;
    let (tree, count, start) = db.transact(|t| -> Result<_, StoreError> {
        let tree = Entries::named(t, "entries")?;
        let count = match t.named_root::<Counter>("count")? {
            Some(c) => c,
            None => {
                let c = Ref::<Counter>::new_counter(t, 0)?;
                t.set_named_root("count", c)?;
                c
            }
        };
        // Continue numbering after everything committed so far.
        let start = match tree.range(t, ..)?.last() {
            Some(kv) => kv?.0 + 1,
            None => 0,
        };
        Ok((tree, count, start))
    })?;
    let out = Arc::new(Mutex::new(std::io::stdout()));
    std::thread::scope(|s| {
        for th in 0..THREADS {
            let db = db.clone();
            let out = out.clone();
            s.spawn(move || -> Result<(), StoreError> {
                let mut n = 0u64;
                loop {
                    let i = start + n * THREADS + th;
                    n += 1;
                    let tid = loop {
                        let mut t = db.begin();
                        let blob = match blob_len(i) {
                            Some(len) => Some(t.write_blob(&mut &pattern(i ^ 0xB10B, len)[..])?),
                            None => None,
                        };
                        let p = t.insert_new(&Payload {
                            i,
                            bytes: pattern(i, payload_len(i)),
                            blob,
                        })?;
                        tree.insert(&mut t, i, p)?;
                        count.add(&mut t, 1)?;
                        match t.commit() {
                            Ok(tid) => break tid,
                            Err(CommitError::Conflict(c)) => {
                                let _ = c;
                                continue;
                            }
                            Err(CommitError::Store(e)) => return Err(e),
                            Err(e) => panic!("unexpected commit error {e}"),
                        }
                    };
                    {
                        let mut o = out.lock().unwrap();
                        writeln!(o, "{i} {}", tid.get()).unwrap();
                        o.flush().unwrap();
                    }
                    if th == 0 && n.is_multiple_of(40) {
                        let last = db.last_tid().get();
                        db.pack(Tid::new(last.saturating_sub(20).max(1)).unwrap())?;
                    }
                }
            });
        }
    });
    Ok(())
}

struct Args {
    trials: u32,
    seed: u64,
}

fn args() -> Args {
    let mut trials: u32 = std::env::var("BATOS_CRASH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--trials" => trials = it.next().and_then(|v| v.parse().ok()).expect("--trials N"),
            "--seed" => seed = it.next().and_then(|v| v.parse().ok()).expect("--seed N"),
            _ => {} // libtest flags such as --nocapture are accepted and ignored
        }
    }
    Args { trials, seed }
}

/// Checks the image after a kill. Returns the number of entries.
fn check(
    dir: &Path,
    reported: &BTreeMap<u64, u64>,
    blobs_checked: &mut u64,
    damage: CkptDamage,
) -> u64 {
    let mut db = Db::open(dir, cfg()).expect("image opens after SIGKILL");
    let report = match db.verify() {
        Ok(r) => r,
        // Block damage is found when a block is first read (open reads only the header
        // and the fence): a typed error, and the checkpoint is set aside so that the
        // next open rebuilds the index from the log.
        Err(StoreError::CorruptIndex { .. }) if matches!(damage, CkptDamage::FlipByte) => {
            drop(db);
            db = Db::open(dir, cfg()).expect("image opens after a damaged checkpoint");
            db.verify().expect("verify passes after the index rebuild")
        }
        Err(e) => panic!("verify after SIGKILL: {e}"),
    };
    let t = db.begin();
    let Some(tree) = t.named_root::<()>("entries").unwrap() else {
        // Killed before the child's first commit (the one that creates the tree).
        assert!(reported.is_empty(), "entries tree lost");
        return 0;
    };
    let tree = Entries::from_oid(tree.oid());
    let count = t
        .named_root::<Counter>("count")
        .unwrap()
        .expect("counter exists");
    // Every acknowledged commit is present, with the tid that acknowledged it.
    for (&i, &tid) in reported {
        let r = tree
            .get(&t, &i)
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged entry {i} (tid {tid}) lost"));
        let hist = db.history(r.oid()).unwrap();
        assert!(
            hist.iter().any(|h| h.get() == tid),
            "entry {i}: object revisions {hist:?} do not include acknowledged tid {tid}"
        );
    }
    // Nothing partial: every entry present is complete, and the counter agrees.
    let mut n = 0u64;
    for kv in tree.iter(&t).unwrap() {
        let (i, r) = kv.unwrap();
        let p = t.load(r).unwrap();
        assert_eq!(p.i, i);
        assert_eq!(p.bytes, pattern(i, payload_len(i)), "entry {i} payload");
        match (blob_len(i), p.blob) {
            (None, None) => {}
            (Some(len), Some(b)) => {
                assert_eq!(b.len(), len as u64);
                // verify() already checked every blob's chunks and hash; compare content
                // for recently acknowledged ones.
                if reported.range(i..).count() < 30 {
                    let mut v = Vec::new();
                    t.open_blob(&b).unwrap().read_to_end(&mut v).unwrap();
                    assert_eq!(v, pattern(i ^ 0xB10B, len), "entry {i} blob");
                    *blobs_checked += 1;
                }
            }
            other => panic!("entry {i}: blob mismatch {other:?}"),
        }
        n += 1;
    }
    assert_eq!(count.value(&t).unwrap() as u64, n, "counter vs entries");
    assert!(report.last_tid >= db.last_tid());
    n
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        if let Err(e) = child(Path::new(&dir)) {
            eprintln!("child failed: {e}");
            std::process::exit(3);
        }
        return;
    }
    let Args { trials, seed } = args();
    println!("crash harness: {trials} trials, seed {seed}");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("img");
    let exe = std::env::current_exe().unwrap();
    let mut reported: BTreeMap<u64, u64> = BTreeMap::new();
    let started = Instant::now();
    let mut blobs_checked = 0;
    let mut entries = 0;
    let mut saved_ckpt: Option<(std::path::PathBuf, Vec<u8>)> = None;
    for trial in 0..trials {
        let mut child = Command::new(&exe)
            .env(CHILD_ENV, &dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::<(u64, u64)>::new()));
        let reader = {
            let lines = lines.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(stdout);
                let mut line = String::new();
                while r.read_line(&mut line).unwrap_or(0) > 0 {
                    // Only whole lines count: a kill can cut the last one.
                    if let Some(l) = line.strip_suffix('\n') {
                        let mut it = l.split(' ').map(|x| x.parse::<u64>().unwrap());
                        lines
                            .lock()
                            .unwrap()
                            .push((it.next().unwrap(), it.next().unwrap()));
                    }
                    line.clear();
                }
            })
        };
        let wait = rng.random_range(20..400);
        std::thread::sleep(Duration::from_millis(wait));
        let exited = child.try_wait().unwrap();
        child.kill().ok(); // SIGKILL on unix
        let status = child.wait().unwrap();
        reader.join().unwrap();
        if let Some(st) = exited {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            panic!("trial {trial}: child exited by itself ({st}): {err}");
        }
        let new = lines.lock().unwrap().clone();
        for (i, tid) in &new {
            assert!(
                reported.insert(*i, *tid).is_none(),
                "entry {i} reported twice"
            );
        }
        let damage = damage_checkpoint(&dir, &mut rng, &saved_ckpt);
        entries = check(&dir, &reported, &mut blobs_checked, damage);
        // Keep this trial's checkpoint to put back, stale, in a later one.
        if rng.random_range(0..3) == 0 {
            saved_ckpt = std::fs::read_dir(dir.join("index"))
                .unwrap()
                .filter_map(|e| e.ok().map(|e| e.path()))
                .find(|p| p.extension().is_some_and(|x| x == "ckpt"))
                .map(|p| {
                    let b = std::fs::read(&p).unwrap();
                    (p, b)
                });
        }
        println!(
            "trial {trial:3}: killed after {wait:3} ms ({status}), {:4} new acknowledged commits, {entries} entries in the image, index checkpoint {damage:?}",
            new.len()
        );
    }
    println!(
        "crash harness ok: {trials} trials, {} acknowledged commits all present, {entries} entries, {blobs_checked} blob contents compared, {:.1} s",
        reported.len(),
        started.elapsed().as_secs_f64()
    );
}
