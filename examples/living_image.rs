//! A tour of the living image (batos-store): objects and references, a persistent
//! B-tree, a streamed blob, a conflict and its retry, time travel, and pack.
//!
//! Run: `cargo run --release --example living_image [-- IMAGE_DIR]`
//! Without an argument the image lives in a temporary directory.

use std::io::Write;

use anyhow::Context;
use batos::store::{
    BTree, BlobRef, CommitError, Counter, Db, ProgressMode, Ref, StoreConfig, StoreError, Tid,
};
use serde::{Deserialize, Serialize};

/// A persona: a name, a system prompt, and references to its adapter and memories.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Persona {
    name: String,
    system_prompt: String,
    adapter: Option<Ref<Adapter>>,
}

/// Adapter weights live in a blob; the object holds the reference and metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Adapter {
    rank: u32,
    weights: BlobRef,
}

fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let path = match std::env::args().nth(1) {
        Some(p) => p.into(),
        None => tmp.path().join("image"),
    };
    let config = StoreConfig {
        progress: ProgressMode::Hidden,
        ..StoreConfig::default()
    };
    let db = Db::open(&path, config).with_context(|| format!("opening {}", path.display()))?;
    println!(
        "opened the living image at {} (last tid {})",
        path.display(),
        db.last_tid()
    );

    // 1. Objects, references and named roots.
    let ada = db.transact(|t| -> Result<_, StoreError> {
        let ada = t.named_root_or_insert("persona/ada", || Persona {
            name: "Ada".into(),
            system_prompt: "You are Ada, a careful mathematician.".into(),
            adapter: None,
        })?;
        Ok(ada)
    })?;
    println!("1. persona stored as {:?}", ada.oid());

    // 2. A blob: stream 8 MiB of "weights" in, never holding more than a chunk.
    let mut txn = db.begin();
    let mut writer = txn.blob_writer()?;
    for i in 0..8u8 {
        writer.write_all(&vec![i; 1 << 20])?;
    }
    let weights = writer.finish()?; // fsynced and renamed into place before commit
    let adapter = txn.insert_new(&Adapter { rank: 16, weights })?;
    let mut persona = txn.load(ada)?;
    persona.adapter = Some(adapter);
    txn.set(ada, &persona)?;
    let with_adapter = txn.commit()?;
    println!(
        "2. adapter blob of {} bytes (blake3 {:02x}{:02x}...) committed at tid {with_adapter}",
        weights.len(),
        weights.hash()[0],
        weights.hash()[1]
    );
    let txn = db.begin();
    let a = txn.load(txn.load(ada)?.adapter.context("adapter set")?)?;
    let mut reader = txn.open_blob(&a.weights)?;
    let mut read = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = std::io::Read::read(&mut reader, &mut buf)?;
        if n == 0 {
            break;
        }
        read += n as u64;
    }
    println!("   streamed it back: {read} bytes, every chunk checksummed");
    drop(txn);

    // 3. A persistent B-tree: a memory index keyed by (persona, turn).
    let memory = db.transact(|t| -> Result<_, StoreError> {
        let tree = BTree::<(String, u64), String>::named(t, "memory")?;
        for turn in 0..1000u64 {
            tree.insert(
                t,
                ("ada".into(), turn),
                format!("ada remembered fact #{turn}"),
            )?;
        }
        Ok(tree)
    })?;
    let txn = db.begin();
    let recent: Vec<_> = memory
        .range(&txn, ("ada".to_string(), 997)..)?
        .collect::<Result<_, _>>()?;
    println!("3. B-tree range scan of the last turns: {recent:?}");
    drop(txn);

    // 4. A conflict: two transactions change the same persona; the first committer wins.
    let mut first = db.begin();
    let mut second = db.begin();
    let mut p1 = first.load(ada)?;
    p1.system_prompt.push_str(" Be brief.");
    first.set(ada, &p1)?;
    let mut p2 = second.load(ada)?;
    p2.system_prompt.push_str(" Be kind.");
    second.set(ada, &p2)?;
    first.commit()?;
    match second.commit() {
        Err(CommitError::Conflict(c)) => println!("4. the second committer lost: {c}"),
        other => anyhow::bail!("expected a conflict, got {other:?}"),
    }
    // ... and `transact` retries on a fresh snapshot until it wins.
    db.transact(|t| -> Result<(), StoreError> {
        let mut p = t.load(ada)?;
        p.system_prompt.push_str(" Be kind.");
        t.set(ada, &p)
    })?;
    println!("   retried: {:?}", db.begin().load(ada)?.system_prompt);
    // Conflict resolution: concurrent increments of a Counter merge instead of failing.
    let visits = db.transact(|t| -> Result<_, StoreError> {
        let c = Ref::<Counter>::new_counter(t, 0)?;
        t.set_named_root("visits", c)?;
        Ok(c)
    })?;
    let (mut a1, mut a2) = (db.begin(), db.begin());
    visits.add(&mut a1, 1)?;
    visits.add(&mut a2, 1)?;
    a1.commit()?;
    a2.commit()?;
    println!(
        "   two concurrent visits merged: counter = {}",
        visits.value(&db.begin())?
    );

    // 5. Time travel: the persona as it was before any of the edits.
    let then = db.snapshot_at(with_adapter)?;
    println!(
        "5. at tid {with_adapter} the prompt was {:?}; now it is {:?}",
        then.load(ada)?.system_prompt,
        db.begin().load(ada)?.system_prompt
    );
    drop(then);
    let history: Vec<Tid> = db.history(ada.oid())?;
    println!(
        "   the persona has {} revisions: {history:?}",
        history.len()
    );

    // 6. Pack: replace the adapter, then drop history and the unreachable old blob.
    db.transact(|t| -> Result<(), StoreError> {
        let blob = t.write_blob(&mut &vec![42u8; 1 << 20][..])?;
        let new_adapter = t.insert_new(&Adapter {
            rank: 8,
            weights: blob,
        })?;
        let mut p = t.load(ada)?;
        p.adapter = Some(new_adapter);
        t.set(ada, &p)
    })?;
    let report = db.pack(db.last_tid())?;
    println!(
        "6. pack: kept {} revisions, removed {} and {} blob(s); log {} -> {} bytes",
        report.revisions_kept,
        report.revisions_removed,
        report.blobs_removed,
        report.log_bytes_before,
        report.log_bytes_after
    );
    let verify = db.verify()?;
    println!(
        "   verify: {} records, {} revisions, {} blobs ({} bytes) all check out",
        verify.records, verify.revisions, verify.blobs, verify.blob_bytes
    );
    Ok(())
}
