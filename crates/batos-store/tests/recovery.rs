//! Torn writes and bad input: every case ends in a typed error or a clean recovery,
//! never a panic or wrong bytes, and nothing else is lost.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use batos_store::{BlobRef, Db, OpenMode, ProgressMode, Ref, StoreConfig, StoreError, Tid};
use serde::{Deserialize, Serialize};

fn cfg() -> StoreConfig {
    StoreConfig {
        progress: ProgressMode::Hidden,
        ..StoreConfig::default()
    }
}

/// An image with `n` commits, each rewriting the counter and adding a note.
struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    counter: Ref<u64>,
    tids: Vec<Tid>,
    /// Log end offset after each commit.
    ends: Vec<u64>,
    segment: PathBuf,
}

fn fixture(n: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let db = Db::open(&path, cfg()).unwrap();
    let mut t = db.begin();
    let counter = t.insert_new(&0u64).unwrap();
    t.set_named_root("counter", counter).unwrap();
    let mut tids = vec![t.commit().unwrap()];
    let mut ends = vec![db.log_info().end];
    for i in 1..=n {
        let mut t = db.begin();
        t.set(counter, &i).unwrap();
        let note = t.insert_new(&format!("note {i}").repeat(20)).unwrap();
        t.set_named_root(&format!("note{i}"), note).unwrap();
        tids.push(t.commit().unwrap());
        ends.push(db.log_info().end);
    }
    let segment = db.log_info().segment;
    drop(db);
    Fixture {
        _dir: dir,
        path,
        counter,
        tids,
        ends,
        segment,
    }
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

#[test]
fn truncated_tail_is_cut_and_never_served() {
    for cut in [1u64, 4, 17, 40] {
        let f = fixture(5);
        let end = *f.ends.last().unwrap();
        let prev_end = f.ends[f.ends.len() - 2];
        let len = (end - cut).max(prev_end);
        OpenOptions::new()
            .write(true)
            .open(&f.segment)
            .unwrap()
            .set_len(len)
            .unwrap();
        let db = Db::open(&f.path, cfg()).unwrap();
        assert_eq!(db.last_tid(), f.tids[f.tids.len() - 2], "cut {cut}");
        let t = db.begin();
        assert_eq!(t.load(f.counter).unwrap(), 4);
        assert!(t.named_root::<String>("note5").unwrap().is_none());
        assert_eq!(file_len(&f.segment), prev_end);
        db.verify().unwrap();
        // The image goes on: the next commit reuses the unacknowledged tid.
        let mut t = db.begin();
        t.set(f.counter, &99).unwrap();
        assert_eq!(t.commit().unwrap(), *f.tids.last().unwrap());
    }
}

#[test]
fn zeroed_tail_is_detected_and_cut() {
    for zero in [8usize, 64, 0] {
        let f = fixture(4);
        let end = *f.ends.last().unwrap();
        let prev_end = f.ends[f.ends.len() - 2];
        // 0 means: zero the whole newest record.
        let n = if zero == 0 {
            (end - prev_end) as usize
        } else {
            zero
        };
        let file = OpenOptions::new().write(true).open(&f.segment).unwrap();
        file.write_all_at(&vec![0u8; n], end - n as u64).unwrap();
        drop(file);
        let db = Db::open(&f.path, cfg()).unwrap();
        assert_eq!(db.last_tid(), f.tids[f.tids.len() - 2], "zeroed {n}");
        assert_eq!(db.begin().load(f.counter).unwrap(), 3);
        db.verify().unwrap();
    }
}

#[test]
fn zero_filled_space_after_the_log_is_ignored() {
    let f = fixture(2);
    let file = OpenOptions::new().write(true).open(&f.segment).unwrap();
    let end = *f.ends.last().unwrap();
    file.write_all_at(&vec![0u8; 1 << 16], end).unwrap();
    drop(file);
    let db = Db::open(&f.path, cfg()).unwrap();
    assert_eq!(db.last_tid(), *f.tids.last().unwrap());
    assert_eq!(db.begin().load(f.counter).unwrap(), 2);
}

#[test]
fn corruption_inside_acknowledged_data_is_a_typed_error() {
    let f = fixture(6);
    // Damage the fourth record (tid 3 of the fixture) inside its last entry, the new
    // note; later records prove it had been acknowledged.
    let off = f.ends[3] - 8 - 6;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&f.segment)
        .unwrap();
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, off).unwrap();
    file.write_all_at(&[b[0] ^ 0x5a], off).unwrap();
    drop(file);
    let before = file_len(&f.segment);
    // With its index checkpoint the image opens, but the damaged revision is never
    // served: reading it or verifying names it.
    let db = Db::open(&f.path, cfg()).unwrap();
    let t = db.snapshot_at(f.tids[3]).unwrap();
    let note = t.named_root::<String>("note3").unwrap().unwrap();
    match t.load(note) {
        Err(StoreError::CorruptObject { oid, tid, .. }) => {
            assert_eq!(oid, note.oid());
            assert_eq!(tid, f.tids[3]);
        }
        other => panic!("expected CorruptObject, got {other:?}"),
    }
    assert_eq!(t.load(f.counter).unwrap(), 3);
    match db.verify() {
        Err(StoreError::CorruptRecord { offset, .. }) => assert_eq!(offset, f.ends[2]),
        other => panic!("expected CorruptRecord, got {other:?}"),
    }
    // Other data is still served.
    assert_eq!(db.begin().load(f.counter).unwrap(), 6);
    drop(t);
    drop(db);
    // Without the index (rebuilt from the log), open refuses and names the record.
    std::fs::remove_dir_all(f.path.join("index")).unwrap();
    match Db::open(&f.path, cfg()) {
        Err(StoreError::CorruptRecord { offset, tid, .. }) => {
            assert_eq!(offset, f.ends[2]);
            assert_eq!(tid, Some(f.tids[3]));
        }
        other => panic!("expected CorruptRecord, got {other:?}"),
    }
    // Nothing was cut off.
    assert_eq!(file_len(&f.segment), before);
}

#[test]
fn lost_index_is_rebuilt_from_the_log() {
    let f = fixture(5);
    std::fs::remove_dir_all(f.path.join("index")).unwrap();
    let db = Db::open(&f.path, cfg()).unwrap();
    assert_eq!(db.last_tid(), *f.tids.last().unwrap());
    assert_eq!(db.begin().load(f.counter).unwrap(), 5);
    assert_eq!(db.history(f.counter.oid()).unwrap().len(), 6);
    db.verify().unwrap();
}

/// The index checkpoint of the fixture's image (one file in `index/`).
fn checkpoint_file(image: &Path) -> PathBuf {
    let files: Vec<PathBuf> = std::fs::read_dir(image.join("index"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files[0].clone()
}

#[test]
fn clean_close_leaves_a_checkpoint_covering_the_whole_log_and_no_zero_tail() {
    let f = fixture(3);
    assert!(checkpoint_file(&f.path).exists());
    assert_eq!(file_len(&f.segment), *f.ends.last().unwrap());
}

#[test]
fn stale_checkpoint_is_caught_up_from_the_log() {
    let f = fixture(3);
    let ckpt = checkpoint_file(&f.path);
    let stale = std::fs::read(&ckpt).unwrap();
    let db = Db::open(&f.path, cfg()).unwrap();
    let mut tids = f.tids.clone();
    for i in 4..=6u64 {
        let mut t = db.begin();
        t.set(f.counter, &i).unwrap();
        tids.push(t.commit().unwrap());
    }
    drop(db);
    std::fs::write(&ckpt, stale).unwrap();
    let db = Db::open(&f.path, cfg()).unwrap();
    assert_eq!(db.last_tid(), *tids.last().unwrap());
    assert_eq!(db.begin().load(f.counter).unwrap(), 6);
    assert_eq!(db.history(f.counter.oid()).unwrap(), tids);
    db.verify().unwrap();
}

#[test]
fn checkpoint_ahead_of_the_log_is_ignored_and_the_index_rebuilt() {
    let f = fixture(5);
    // The log loses its last two records (as if they had never been written), the
    // checkpoint still covers them: it must not be believed.
    let keep = f.ends[f.ends.len() - 3];
    OpenOptions::new()
        .write(true)
        .open(&f.segment)
        .unwrap()
        .set_len(keep)
        .unwrap();
    let db = Db::open(&f.path, cfg()).unwrap();
    assert_eq!(db.last_tid(), f.tids[f.tids.len() - 3]);
    assert_eq!(db.begin().load(f.counter).unwrap(), 3);
    assert!(db.begin().named_root::<String>("note4").unwrap().is_none());
    assert_eq!(db.history(f.counter.oid()).unwrap().len(), 4);
    db.verify().unwrap();
}

#[test]
fn damaged_checkpoint_block_is_a_typed_error_and_the_next_open_rebuilds() {
    let f = fixture(5);
    let ckpt = checkpoint_file(&f.path);
    let mut b = std::fs::read(&ckpt).unwrap();
    b[4096 + 40] ^= 0x10; // inside the first block's entries
    std::fs::write(&ckpt, b).unwrap();
    let db = Db::open(&f.path, cfg()).unwrap();
    match db.verify() {
        Err(StoreError::CorruptIndex { path, offset, .. }) => {
            assert_eq!(path, ckpt);
            assert_eq!(offset, 4096);
        }
        other => panic!("expected CorruptIndex, got {other:?}"),
    }
    drop(db);
    let db = Db::open(&f.path, cfg()).unwrap();
    assert_eq!(db.begin().load(f.counter).unwrap(), 5);
    assert_eq!(db.history(f.counter.oid()).unwrap().len(), 6);
    db.verify().unwrap();
}

#[derive(Debug, Serialize, Deserialize)]
struct Holder {
    blob: BlobRef,
}

fn blob_fixture() -> (tempfile::TempDir, Db, Ref<Holder>, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("img"), cfg()).unwrap();
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i * 31 % 251) as u8).collect();
    let mut t = db.begin();
    let blob = t.write_blob(&mut &data[..]).unwrap();
    let h = t.insert_new(&Holder { blob }).unwrap();
    t.set_named_root("h", h).unwrap();
    t.commit().unwrap();
    let path = dir
        .path()
        .join("img/blobs")
        .join(format!("{:032x}.blob", blob.id().get()));
    assert!(path.exists());
    (dir, db, h, path)
}

#[test]
fn corrupted_blob_chunk_is_a_typed_error_naming_the_blob() {
    let (_dir, db, h, path) = blob_fixture();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let off = (1 << 20) + 1000;
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, off).unwrap();
    file.write_all_at(&[b[0] ^ 1], off).unwrap();
    drop(file);
    let t = db.begin();
    let holder = t.load(h).unwrap();
    let mut r = t.open_blob(&holder.blob).unwrap();
    let mut sink = Vec::new();
    match r.copy_to(&mut sink) {
        Err(StoreError::BlobCorrupt { id, detail, .. }) => {
            assert_eq!(id, holder.blob.id());
            assert!(detail.contains("chunk 1"), "{detail}");
        }
        other => panic!("expected BlobCorrupt, got {other:?}"),
    }
    // Only bytes of verified chunks came out: chunk 0, not the damaged chunk 1.
    assert_eq!(sink.len(), 1 << 20);
    // Through std::io::Read the typed error is inside the io::Error.
    let mut r = t.open_blob(&holder.blob).unwrap();
    let err = r.read_to_end(&mut Vec::new()).unwrap_err();
    let inner = err.into_inner().unwrap().downcast::<StoreError>().unwrap();
    assert!(matches!(*inner, StoreError::BlobCorrupt { .. }));
    assert!(matches!(db.verify(), Err(StoreError::BlobCorrupt { .. })));
    // The objects are untouched.
    assert_eq!(t.load(h).unwrap().blob, holder.blob);
}

#[test]
fn truncated_blob_file_is_a_typed_error() {
    let (_dir, db, h, path) = blob_fixture();
    let len = file_len(&path);
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 100_000)
        .unwrap();
    let t = db.begin();
    let holder = t.load(h).unwrap();
    match t.open_blob(&holder.blob).unwrap().read_all() {
        Err(StoreError::BlobTruncated {
            id, expected, got, ..
        }) => {
            assert_eq!(id, holder.blob.id());
            assert_eq!(expected, 3 << 20);
            assert!(got < expected);
        }
        other => panic!("expected BlobTruncated, got {:?}", other.map(|v| v.len())),
    }
    // A missing trailer (cut exactly after the content) is caught too.
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    assert!(matches!(
        t.open_blob(&holder.blob),
        Err(StoreError::BlobTruncated { .. })
    ));
    assert!(matches!(db.verify(), Err(StoreError::BlobTruncated { .. })));
}

#[derive(Debug, Serialize, Deserialize)]
struct A {
    x: u64,
}
#[derive(Debug, Serialize, Deserialize)]
struct B {
    x: u64,
}

#[test]
fn decoding_as_the_wrong_type_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("img"), cfg()).unwrap();
    let mut t = db.begin();
    let a = t.insert_new(&A { x: 7 }).unwrap();
    t.commit().unwrap();
    let t = db.begin();
    match t.get::<B>(a.oid()) {
        Err(StoreError::WrongType { oid, expected, .. }) => {
            assert_eq!(oid, a.oid());
            assert!(expected.ends_with("::B"), "{expected}");
        }
        other => panic!("expected WrongType, got {other:?}"),
    }
    assert!(matches!(
        t.get::<String>(a.oid()),
        Err(StoreError::WrongType { .. })
    ));
    assert_eq!(t.get::<A>(a.oid()).unwrap().x, 7);
    assert!(matches!(
        t.get::<A>(batos_store::Oid::new(999_999).unwrap()),
        Err(StoreError::ObjectNotFound { .. })
    ));
}

#[test]
fn non_image_paths_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("photos");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("cat.jpg"), b"not a database").unwrap();
    assert!(matches!(
        Db::open(&other, cfg()),
        Err(StoreError::NotAnImage { .. })
    ));
    // Nothing was written into it.
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1);
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        Db::open(&file, cfg()),
        Err(StoreError::NotAnImage { .. })
    ));
    let bad_marker = dir.path().join("fake");
    std::fs::create_dir(&bad_marker).unwrap();
    std::fs::write(bad_marker.join("BATOS-IMAGE"), b"something else").unwrap();
    assert!(matches!(
        Db::open(&bad_marker, cfg()),
        Err(StoreError::NotAnImage { .. })
    ));
    let missing = dir.path().join("missing");
    let existing_only = StoreConfig {
        open_mode: OpenMode::OpenExisting,
        ..cfg()
    };
    assert!(matches!(
        Db::open(&missing, existing_only.clone()),
        Err(StoreError::ImageMissing { .. })
    ));
    assert!(!missing.exists());
    assert!(matches!(
        Db::open(
            dir.path().join("x"),
            StoreConfig {
                max_attempts: 0,
                ..cfg()
            }
        ),
        Err(StoreError::Config { .. })
    ));
}

const PROBE_ENV: &str = "BATOS_LOCK_PROBE";
const PROBE_LOCKED: i32 = 42;
const PROBE_OPENED: i32 = 43;

#[test]
fn second_opener_is_refused_in_process_and_across_processes() {
    if let Ok(p) = std::env::var(PROBE_ENV) {
        // Child mode: report what a second process sees.
        match Db::open(&p, cfg()) {
            Err(StoreError::Locked { .. }) => std::process::exit(PROBE_LOCKED),
            Ok(db) => {
                assert_eq!(
                    db.begin()
                        .load(Ref::<u64>::from_oid(
                            db.begin().named_root::<u64>("v").unwrap().unwrap().oid()
                        ))
                        .unwrap(),
                    5
                );
                drop(db);
                std::process::exit(PROBE_OPENED)
            }
            Err(e) => panic!("probe: unexpected {e}"),
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    let db = Db::open(&path, cfg()).unwrap();
    let mut t = db.begin();
    let v = t.insert_new(&5u64).unwrap();
    t.set_named_root("v", v).unwrap();
    t.commit().unwrap();
    assert!(matches!(
        Db::open(&path, cfg()),
        Err(StoreError::Locked { .. })
    ));
    let probe = || {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "second_opener_is_refused_in_process_and_across_processes",
                "--test-threads",
                "1",
            ])
            .env(PROBE_ENV, &path)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(probe(), Some(PROBE_LOCKED));
    // The refused openers changed nothing.
    assert_eq!(db.begin().load(v).unwrap(), 5);
    drop(db);
    assert_eq!(probe(), Some(PROBE_OPENED));
    let db = Db::open(&path, cfg()).unwrap();
    assert_eq!(db.begin().load(v).unwrap(), 5);
    db.verify().unwrap();
    let _ = std::io::stdout().flush();
}
