//! The image handle: open and recovery, the commit pipeline with group commit, reads at
//! a snapshot, pack and verify.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

use crate::blob::{fsync_dir, verify_blob};
use crate::codec::{encode, Encoded};
use crate::config::{OpenMode, ProgressMode, StoreConfig};
use crate::error::{CommitError, ConflictError, Result, StoreError};
use crate::ids::{BlobId, BlobRef, Oid, Tid};
use crate::index::{Checkpoint, CkptOpen, Covers, Index};
use crate::log::{
    encode_entry, later_acknowledged_record, read_entry, record_matches_at, Entry, EntryLoc,
    NewBlob, ReadOutcome, RecordBuilder, SegmentHeader, SegmentReader, MAX_RECORD, SEG_HEADER_LEN,
};
use crate::nodecache::{NodeCache, SharedValue, NODE_CACHE_ENTRIES};
use crate::txn::{RootMap, Txn, TxnMode};

const MARKER: &str = "BATOS-IMAGE";
const MARKER_TEXT: &str = "batos living image, format 1\n";

/// A type-erased conflict resolver: (oid, ancestor, committed, mine) -> merged state.
pub(crate) type Resolver = fn(Oid, &Entry, &Entry, &Encoded) -> Result<Option<Encoded>>;

/// One object write queued in a transaction.
pub(crate) struct PendingWrite {
    pub enc: Encoded,
    pub resolver: Option<Resolver>,
    /// Allocated by this transaction: cannot conflict.
    pub is_new: bool,
}

/// Everything a transaction asks to commit.
pub(crate) struct WriteSet {
    pub writes: BTreeMap<Oid, PendingWrite>,
    pub read_current: BTreeSet<Oid>,
    pub new_blobs: Vec<BlobRef>,
}

/// A log segment with the index that maps into it.
pub(crate) struct Segment {
    pub gen: u64,
    pub path: PathBuf,
    pub file: File,
    pub index: Index,
}

/// How far ahead of the log end the segment file is zero-filled, at most. Writing into
/// space that is already allocated and written leaves the file's size and extents
/// unchanged, so `fdatasync` writes no metadata (no inode write, or with a journal no
/// journal commit): measured on this VM, up to one device flush less per commit.
pub(crate) const PREALLOC_CHUNK: u64 = 8 << 20;

struct CommitState {
    seg: Arc<Segment>,
    end: u64,
    last_tid: Tid,
    /// The last record written (what a checkpoint would cover).
    last: Option<Covers>,
    /// Length of the segment file: bytes in [end, alloc_end) are zeros.
    alloc_end: u64,
}

struct SyncState {
    seg: Arc<Segment>,
    written_end: u64,
    written_tid: Tid,
    synced_end: u64,
    syncing: bool,
    failed: Option<String>,
}

/// Shared state behind every `Db` clone, `Txn` and `BlobWriter`.
pub(crate) struct DbInner {
    path: PathBuf,
    config: StoreConfig,
    _lock: File,
    current: RwLock<Arc<Segment>>,
    commit: Mutex<CommitState>,
    sync: Mutex<SyncState>,
    sync_cv: Condvar,
    visible: AtomicU64,
    next_oid: AtomicU64,
    pub(crate) pending_blobs: Mutex<HashSet<BlobId>>,
    /// Snapshots older than this were packed away (0: never packed).
    pack_horizon: AtomicU64,
    maintenance: Mutex<()>,
    poisoned: Mutex<Option<String>>,
    /// Decoded revisions shared by all transactions (B-tree nodes).
    nodes: Mutex<NodeCache>,
    /// Held while an index checkpoint is written.
    checkpointing: Mutex<()>,
}

impl Drop for DbInner {
    fn drop(&mut self) {
        if self.poisoned.lock().is_some() {
            return;
        }
        // A clean close leaves nothing to replay or scan on the next open: the index is
        // checkpointed up to the last record and the zero-filled space after the log is
        // cut off. Neither is needed for safety (open recovers without them).
        if let Err(e) = self.checkpoint_index() {
            tracing::warn!(error = %e, "index checkpoint on close failed; next open replays the log tail");
        }
        let cs = self.commit.lock();
        if cs.alloc_end > cs.end {
            if let Err(e) = cs
                .seg
                .file
                .set_len(cs.end)
                .and_then(|()| cs.seg.file.sync_all())
            {
                tracing::warn!(error = %e, "could not cut preallocated log space on close");
            }
        }
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn segment_name(gen: u64) -> String {
    format!("{gen:016x}.seg")
}

fn checkpoint_name(gen: u64) -> String {
    format!("{gen:016x}.ckpt")
}

pub(crate) fn progress_bar(mode: ProgressMode, len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = match mode {
        ProgressMode::Hidden => indicatif::ProgressBar::hidden(),
        ProgressMode::Auto => indicatif::ProgressBar::with_draw_target(
            Some(len),
            indicatif::ProgressDrawTarget::stderr(),
        ),
    };
    pb.set_length(len);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{msg:>8} [{bar:40}] {bytes}/{total_bytes} ({eta})")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(what.to_string());
    pb
}

/// Writes `bytes` to `path` durably: temp file, fsync, rename, fsync of the directory.
fn write_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dest = dir.join(name);
    let mut f = File::create(&tmp).map_err(|e| StoreError::io("create", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| StoreError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, &dest).map_err(|e| StoreError::io("rename", &dest, e))?;
    fsync_dir(dir)
}

/// Summary of a completed pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackReport {
    /// Snapshots older than this are no longer readable.
    pub horizon: Tid,
    /// Objects reachable from the root.
    pub live_objects: u64,
    /// Object revisions kept.
    pub revisions_kept: u64,
    /// Object revisions removed (old or unreachable).
    pub revisions_removed: u64,
    /// Blob files removed (unreachable or orphaned).
    pub blobs_removed: u64,
    /// Log bytes before and after.
    pub log_bytes_before: u64,
    /// Log bytes after.
    pub log_bytes_after: u64,
}

/// Summary of a successful verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Commit records checked.
    pub records: u64,
    /// Object revisions checked.
    pub revisions: u64,
    /// Blob files checked end to end.
    pub blobs: u64,
    /// Blob bytes read.
    pub blob_bytes: u64,
    /// Files in `blobs/` no commit refers to (removed by the next pack).
    pub orphan_blobs: u64,
    /// The last tid.
    pub last_tid: Tid,
}

/// Where the log stands (for tools and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogInfo {
    /// The active segment file.
    pub segment: PathBuf,
    /// Offset just past the last committed record.
    pub end: u64,
    /// The last committed tid.
    pub last_tid: Tid,
    /// Oldest readable snapshot after a pack.
    pub pack_horizon: Option<Tid>,
}

/// A handle to an open living image. Cheap to clone; `Send + Sync`; share it between
/// threads and run one [`Txn`] per thread.
///
/// ```
/// use batos_store::{Db, StoreConfig};
/// let dir = tempfile::tempdir().unwrap();
/// let db = Db::open(dir.path().join("image"), StoreConfig::default()).unwrap();
/// let mut txn = db.begin();
/// let greeting = txn.insert_new(&String::from("hello")).unwrap();
/// txn.set_named_root("greeting", greeting).unwrap();
/// txn.commit().unwrap();
/// let txn = db.begin();
/// let r = txn.named_root::<String>("greeting").unwrap().unwrap();
/// assert_eq!(txn.load(r).unwrap(), "hello");
/// ```
#[derive(Clone)]
pub struct Db {
    pub(crate) inner: Arc<DbInner>,
}

/// The design's name for the image: the same type as [`Db`].
pub type LivingImage = Db;

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("path", &self.inner.path)
            .field("last_tid", &self.inner.visible.load(Ordering::Acquire))
            .finish()
    }
}

impl Db {
    /// Opens (or creates) the image at `path`, recovering after a crash: a torn tail
    /// that was never acknowledged is cut off (and saved beside the log); damage to
    /// acknowledged data is an error naming the record.
    pub fn open(path: impl AsRef<Path>, config: StoreConfig) -> Result<Db> {
        config.validate()?;
        let config_again = config.clone();
        let path = path.as_ref().to_path_buf();
        let _span = tracing::info_span!("open", path = %path.display()).entered();
        prepare_dir(&path, config.open_mode)?;
        let lock_path = path.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::io("open lock file", &lock_path, e))?;
        lock_image(&lock, &lock_path, &path)?;
        let log_dir = path.join("log");
        let blob_dir = path.join("blobs");
        let tmp_dir = blob_dir.join("tmp");
        let index_dir = path.join("index");
        let mut created = false;
        for d in [&log_dir, &blob_dir, &tmp_dir, &index_dir] {
            created |= !d.exists();
            std::fs::create_dir_all(d).map_err(|e| StoreError::io("create directory", d, e))?;
        }
        // Unfinished blob writes of a previous run: never referenced by any commit.
        for e in std::fs::read_dir(&tmp_dir).map_err(|e| StoreError::io("list", &tmp_dir, e))? {
            let e = e.map_err(|e| StoreError::io("list", &tmp_dir, e))?;
            let _ = std::fs::remove_file(e.path());
        }
        let (gen, seg_path) = pick_segment(&log_dir)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&seg_path)
            .map_err(|e| StoreError::io("open segment", &seg_path, e))?;
        let header = SegmentHeader::read(&file, &seg_path)?;
        if header.gen != gen {
            return Err(StoreError::CorruptRecord {
                path: seg_path,
                offset: 0,
                tid: None,
                detail: format!("header says generation {}, file name {gen}", header.gen),
            });
        }
        let index = open_index(&index_dir, gen)?;
        let seg = Arc::new(Segment {
            gen,
            path: seg_path.clone(),
            file,
            index,
        });
        let rec = recover(&seg, config.progress)?;
        let (end, last_tid, next_oid) = (rec.end, rec.last.map(|c| c.tid), rec.next_oid);
        // Records written by a process that died before its fsync are still in the page
        // cache: make them durable before anyone can read them.
        if rec.replayed > 0 || rec.cut {
            seg.file
                .sync_data()
                .map_err(|e| StoreError::io("fsync segment", &seg.path, e))?;
        }
        // The subdirectories' entries must survive power loss before anything in them is
        // acknowledged. After a clean close (the checkpoint covers the whole log, no
        // zero-filled tail) they already do: the run that created them fsynced them
        // before acknowledging anything. Otherwise a run may have crashed between
        // creating and fsyncing them, so fsync again (each costs a device flush).
        let clean = rec.replayed == 0
            && !rec.cut
            && rec.last.is_some()
            && seg.index.base_covers() == rec.last
            && rec.file_len == rec.end;
        if created || !clean {
            fsync_dir(&path)?;
            fsync_dir(&blob_dir)?;
        }
        let inner = Arc::new(DbInner {
            path: path.clone(),
            config,
            _lock: lock,
            current: RwLock::new(seg.clone()),
            commit: Mutex::new(CommitState {
                seg: seg.clone(),
                end,
                last_tid: last_tid.unwrap_or(Tid::FIRST),
                last: rec.last,
                alloc_end: rec.file_len,
            }),
            sync: Mutex::new(SyncState {
                seg,
                written_end: end,
                written_tid: last_tid.unwrap_or(Tid::FIRST),
                synced_end: end,
                syncing: false,
                failed: None,
            }),
            sync_cv: Condvar::new(),
            visible: AtomicU64::new(last_tid.map_or(0, Tid::get)),
            next_oid: AtomicU64::new(next_oid.max(2)),
            pending_blobs: Mutex::new(HashSet::new()),
            pack_horizon: AtomicU64::new(header.pack_horizon.map_or(0, Tid::get)),
            maintenance: Mutex::new(()),
            poisoned: Mutex::new(None),
            nodes: Mutex::new(NodeCache::new(NODE_CACHE_ENTRIES)),
            checkpointing: Mutex::new(()),
        });
        let db = Db { inner };
        if last_tid.is_none() {
            // A new image: the first commit creates the root object.
            let mut writes = BTreeMap::new();
            writes.insert(
                Oid::ROOT,
                PendingWrite {
                    enc: encode(&RootMap::default())?,
                    resolver: None,
                    is_new: true,
                },
            );
            let ws = WriteSet {
                writes,
                read_current: BTreeSet::new(),
                new_blobs: Vec::new(),
            };
            db.inner.commit_writes(None, ws).map_err(|e| match e {
                CommitError::Store(s) => s,
                CommitError::Conflict(c) => StoreError::IndexInconsistent {
                    detail: format!("conflict while creating the root: {c}"),
                },
            })?;
            tracing::info!("created a new image");
        }
        if db.inner.current.read().index.overlay_len() as u64
            >= db.inner.config.index_checkpoint_revisions
        {
            // A long replay (a lost or stale checkpoint): do not repeat it next time.
            match db.inner.checkpoint_index() {
                Ok(()) => {}
                Err(e @ StoreError::CorruptIndex { .. })
                    if !db.inner.current.read().index.path.exists() =>
                {
                    // Merging read a damaged block of the old checkpoint, which is now
                    // set aside: open again, rebuilding the index from the log.
                    tracing::warn!(error = %e, "rebuilding the index");
                    drop(db);
                    return Db::open(path, config_again);
                }
                Err(e) => return Err(e),
            }
        }
        tracing::info!(
            last_tid = db.inner.visible.load(Ordering::Acquire),
            "image open"
        );
        Ok(db)
    }

    /// Starts a read-write transaction on a snapshot of the last durable commit.
    pub fn begin(&self) -> Txn {
        let snap = self.last_tid();
        Txn::new(self.inner.clone(), snap, TxnMode::ReadWrite)
    }

    /// A read-only view of the image as of `tid` (time travel). Fails for tids in the
    /// future or older than the last pack.
    pub fn snapshot_at(&self, tid: Tid) -> Result<Txn> {
        let last = self.last_tid();
        if tid > last {
            return Err(StoreError::FutureTid { tid, last });
        }
        self.inner.check_horizon(tid)?;
        Ok(Txn::new(self.inner.clone(), tid, TxnMode::ReadOnly))
    }

    /// The last durable (visible) commit.
    pub fn last_tid(&self) -> Tid {
        Tid::new(self.inner.visible.load(Ordering::Acquire)).unwrap_or(Tid::FIRST)
    }

    /// The image directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` in a transaction and commits, retrying on conflicts up to
    /// `StoreConfig::max_attempts` times. `f` must be safe to re-run (it sees a fresh
    /// snapshot each time). Fail-stop errors are returned at once.
    pub fn transact<R, E>(&self, mut f: impl FnMut(&mut Txn) -> Result<R, E>) -> Result<R, E>
    where
        E: From<StoreError>,
    {
        let attempts = self.inner.config.max_attempts;
        let mut last = None;
        for attempt in 1..=attempts {
            let mut txn = self.begin();
            let r = f(&mut txn)?;
            match txn.commit() {
                Ok(_) => return Ok(r),
                Err(CommitError::Conflict(c)) => {
                    tracing::debug!(attempt, conflict = %c, "transaction conflicted; retrying");
                    // Retrying on a snapshot that cannot see the winner would conflict
                    // again: wait until the winning commit is durable and visible.
                    if let ConflictError::Write { committed, .. }
                    | ConflictError::Read { committed, .. } = &c
                    {
                        self.inner.wait_visible(*committed);
                    }
                    last = Some(c);
                }
                Err(CommitError::Store(e)) => return Err(e.into()),
            }
        }
        Err(StoreError::RetriesExhausted {
            attempts,
            last: last.expect("at least one attempt was made"),
        }
        .into())
    }

    /// The tids of every stored revision of `oid`, oldest first.
    pub fn history(&self, oid: Oid) -> Result<Vec<Tid>> {
        let seg = self.inner.current.read().clone();
        Ok(seg
            .index
            .revisions(oid)?
            .into_iter()
            .map(|(t, _)| t)
            .collect())
    }

    /// Where the log stands.
    pub fn log_info(&self) -> LogInfo {
        let cs = self.inner.commit.lock();
        LogInfo {
            segment: cs.seg.path.clone(),
            end: cs.end,
            last_tid: cs.last_tid,
            pack_horizon: Tid::new(self.inner.pack_horizon.load(Ordering::Acquire)),
        }
    }

    /// Writes an index checkpoint covering every durable commit, so that the next open
    /// has no log tail to replay. Commits continue meanwhile. (Checkpoints are also
    /// written every `StoreConfig::index_checkpoint_revisions` revisions and on close.)
    pub fn checkpoint(&self) -> Result<()> {
        self.inner.checkpoint_index()
    }

    /// Removes history older than `before`, objects unreachable from the root and blob
    /// files nothing refers to, and reclaims their space. Snapshots older than `before`
    /// become unreadable, and transactions that began before it get
    /// `ConflictError::Packed` when they commit. Commits wait while pack runs; readers
    /// do not.
    pub fn pack(&self, before: Tid) -> Result<PackReport> {
        self.inner.pack(before)
    }

    /// Checks every record, every object revision, the index, and every committed blob
    /// end to end. Returns the first problem as a typed error.
    pub fn verify(&self) -> Result<VerifyReport> {
        self.inner.verify()
    }
}

/// Takes the image's exclusive lock. A forked child shares our lock until it execs (or
/// exits), so a lock that was just released may still look held for a moment: retry
/// briefly before reporting another opener.
fn lock_image(lock: &File, lock_path: &Path, image: &Path) -> Result<()> {
    const PATIENCE: std::time::Duration = std::time::Duration::from_millis(250);
    let started = std::time::Instant::now();
    loop {
        let held = match fs4::fs_std::FileExt::try_lock_exclusive(lock) {
            Ok(true) => return Ok(()),
            Ok(false) => true,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            Err(e) => return Err(StoreError::io("lock image", lock_path, e)),
        };
        if held && started.elapsed() >= PATIENCE {
            return Err(StoreError::Locked {
                path: image.to_path_buf(),
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn prepare_dir(path: &Path, mode: OpenMode) -> Result<()> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match mode {
            OpenMode::CreateIfMissing => {
                std::fs::create_dir_all(path)
                    .map_err(|e| StoreError::io("create image directory", path, e))?;
            }
            OpenMode::OpenExisting => {
                return Err(StoreError::ImageMissing {
                    path: path.to_path_buf(),
                })
            }
        },
        Err(e) => return Err(StoreError::io("stat image directory", path, e)),
        Ok(m) if !m.is_dir() => {
            return Err(StoreError::NotAnImage {
                path: path.to_path_buf(),
            })
        }
        Ok(_) => {}
    }
    let marker = path.join(MARKER);
    match std::fs::read(&marker) {
        Ok(text) if text == MARKER_TEXT.as_bytes() => Ok(()),
        Ok(text) if text.starts_with(b"batos living image") => {
            Err(StoreError::UnsupportedVersion {
                path: marker,
                found: 0,
                supported: crate::log::FORMAT_VERSION,
            })
        }
        Ok(_) => Err(StoreError::NotAnImage {
            path: path.to_path_buf(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let empty = std::fs::read_dir(path)
                .map_err(|e| StoreError::io("list image directory", path, e))?
                .next()
                .is_none();
            if !empty {
                return Err(StoreError::NotAnImage {
                    path: path.to_path_buf(),
                });
            }
            if mode == OpenMode::OpenExisting {
                return Err(StoreError::ImageMissing {
                    path: path.to_path_buf(),
                });
            }
            write_durably(path, MARKER, MARKER_TEXT.as_bytes())
        }
        Err(e) => Err(StoreError::io("read image marker", &marker, e)),
    }
}

/// Picks the newest complete segment, deletes superseded ones and leftovers of an
/// interrupted pack, and creates the first segment of a new image.
fn pick_segment(log_dir: &Path) -> Result<(u64, PathBuf)> {
    let mut gens = Vec::new();
    for e in std::fs::read_dir(log_dir).map_err(|e| StoreError::io("list", log_dir, e))? {
        let e = e.map_err(|e| StoreError::io("list", log_dir, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tmp") {
            let _ = std::fs::remove_file(e.path());
            continue;
        }
        if let Some(hex) = name.strip_suffix(".seg") {
            if let Ok(g) = u64::from_str_radix(hex, 16) {
                gens.push(g);
            }
        }
    }
    gens.sort_unstable();
    match gens.pop() {
        Some(g) => {
            // A newer generation is only ever renamed into place complete, so older
            // ones are superseded (pack was interrupted before deleting them).
            for old in gens {
                let p = log_dir.join(segment_name(old));
                tracing::info!(path = %p.display(), "removing superseded segment");
                std::fs::remove_file(&p).map_err(|e| StoreError::io("remove segment", &p, e))?;
            }
            Ok((g, log_dir.join(segment_name(g))))
        }
        None => {
            let header = SegmentHeader {
                gen: 1,
                pack_horizon: None,
            };
            write_durably(log_dir, &segment_name(1), &header.encode())?;
            Ok((1, log_dir.join(segment_name(1))))
        }
    }
}

/// Opens the index checkpoint of segment `gen` (an unusable one is set aside and the
/// index rebuilt from the log) and removes anything else in `index/`: checkpoints of
/// other generations, temp files, the sled index of format-1 images before this one.
fn open_index(dir: &Path, gen: u64) -> Result<Index> {
    let name = checkpoint_name(gen);
    for e in std::fs::read_dir(dir).map_err(|e| StoreError::io("list", dir, e))? {
        let e = e.map_err(|e| StoreError::io("list", dir, e))?;
        if e.file_name().to_str() == Some(name.as_str()) {
            continue;
        }
        let p = e.path();
        let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
        let r = if is_dir {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        r.map_err(|err| StoreError::io("remove stale index file", &p, err))?;
    }
    let path = dir.join(&name);
    let base = match Checkpoint::open(&path)? {
        CkptOpen::Ok(c) if c.header.gen == gen => Some(c),
        CkptOpen::Ok(c) => {
            tracing::warn!(path = %path.display(), gen = c.header.gen, "index checkpoint of another generation; rebuilding the index");
            None
        }
        CkptOpen::Missing => None,
        CkptOpen::Unusable(detail) => {
            tracing::warn!(path = %path.display(), %detail, "index checkpoint unusable; rebuilding the index from the log");
            None
        }
    };
    Ok(Index::new(path, base))
}

/// What recovery found.
struct Recovered {
    /// Offset just past the last valid record.
    end: u64,
    /// The last valid record.
    last: Option<Covers>,
    next_oid: u64,
    /// Segment file length after recovery (zero-filled space after `end` may remain).
    file_len: u64,
    /// Records replayed into the index.
    replayed: u64,
    /// Whether a torn tail was cut.
    cut: bool,
}

/// Brings the index up to date with the log: the checkpoint is trusted only if the record
/// it covers is in the log, intact; the records after it are replayed into the overlay.
fn recover(seg: &Segment, progress: ProgressMode) -> Result<Recovered> {
    let mut start = SEG_HEADER_LEN;
    let mut last: Option<Covers> = None;
    let mut next_oid = 2u64;
    if let Some(c) = seg.index.base_covers() {
        let len = c.end.saturating_sub(c.start);
        match record_matches_at(&seg.file, &seg.path, c.start, len, c.tid, c.crc)? {
            true => {
                start = c.end;
                last = Some(c);
                // Written at checkpoint time: at least the covered record's high-water mark.
                next_oid = seg.index.base_next_oid().unwrap_or(2);
            }
            false => {
                tracing::warn!(
                    path = %seg.index.path.display(),
                    "index checkpoint is ahead of or disagrees with the log; rebuilding it"
                );
                seg.index.drop_base();
            }
        }
    }
    let mut reader = SegmentReader::new(&seg.file, &seg.path, start)?;
    let mut file_len = reader.file_len();
    let pb = if file_len - start > (64 << 20) {
        progress_bar(progress, file_len - start, "replay")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut replayed = 0u64;
    let mut cut = false;
    loop {
        let pos = reader.pos();
        match reader.next(&seg.path)? {
            ReadOutcome::Record(rec) => {
                if last.is_some_and(|t| rec.tid <= t.tid) {
                    return Err(StoreError::CorruptRecord {
                        path: seg.path.clone(),
                        offset: pos,
                        tid: Some(rec.tid),
                        detail: format!(
                            "tid {} does not follow {}",
                            rec.tid,
                            last.map_or(0, |c| c.tid.get())
                        ),
                    });
                }
                seg.index
                    .insert(rec.tid, rec.entries.iter().map(|(loc, e)| (e.oid, *loc)));
                last = Some(Covers {
                    start: pos,
                    end: pos + rec.len,
                    tid: rec.tid,
                    crc: rec.crc,
                });
                next_oid = next_oid.max(rec.next_oid);
                replayed += 1;
                pb.set_position(reader.pos() - start);
            }
            ReadOutcome::End => break,
            ReadOutcome::Bad { tid, detail } => {
                if let Some((off, later)) =
                    later_acknowledged_record(&seg.file, &seg.path, pos, file_len)?
                {
                    return Err(StoreError::CorruptRecord {
                        path: seg.path.clone(),
                        offset: pos,
                        tid,
                        detail: format!(
                            "{detail}; record tid {later} at offset {off} shows this data was acknowledged"
                        ),
                    });
                }
                cut_torn_tail(seg, pos, file_len, &detail)?;
                cut = true;
                file_len = pos;
                break;
            }
        }
    }
    pb.finish_and_clear();
    let end = reader.pos();
    if replayed > 0 {
        tracing::info!(records = replayed, "replayed log tail into the index");
    }
    Ok(Recovered {
        end,
        last,
        next_oid,
        file_len,
        replayed,
        cut,
    })
}

/// Cuts a torn tail (never acknowledged: its fsync did not complete) off the log, keeping
/// a copy beside it for forensics.
fn cut_torn_tail(seg: &Segment, pos: u64, file_len: u64, detail: &str) -> Result<()> {
    let n = file_len - pos;
    let mut buf = vec![0u8; n.min(64 << 20) as usize];
    seg.file
        .read_exact_at(&mut buf, pos)
        .map_err(|e| StoreError::io("read torn tail", &seg.path, e))?;
    if buf.iter().any(|&b| b != 0) {
        let keep = seg.path.with_extension(format!("torn-{pos}"));
        std::fs::write(&keep, &buf).map_err(|e| StoreError::io("save torn tail", &keep, e))?;
        tracing::warn!(
            path = %seg.path.display(),
            offset = pos,
            bytes = n,
            reason = detail,
            "cutting off a torn, unacknowledged log tail"
        );
    } else {
        // Zero-filled space preallocated after the log by a run that did not close.
        tracing::info!(path = %seg.path.display(), offset = pos, bytes = n, "cutting zero-filled space after the log");
    }
    seg.file
        .set_len(pos)
        .and_then(|()| seg.file.sync_all())
        .map_err(|e| StoreError::io("truncate torn tail", &seg.path, e))
}

impl DbInner {
    pub(crate) fn blob_dir(&self) -> PathBuf {
        self.path.join("blobs")
    }

    pub(crate) fn blob_tmp_dir(&self) -> PathBuf {
        self.path.join("blobs").join("tmp")
    }

    pub(crate) fn blob_path(&self, id: BlobId) -> PathBuf {
        self.blob_dir().join(id.file_name())
    }

    pub(crate) fn new_oid(&self) -> Oid {
        let n = self.next_oid.fetch_add(1, Ordering::Relaxed);
        Oid::new(n).expect("oids start at 2")
    }

    pub(crate) fn check_horizon(&self, snapshot: Tid) -> Result<()> {
        let h = self.pack_horizon.load(Ordering::Acquire);
        if snapshot.get() < h {
            return Err(StoreError::SnapshotPacked {
                snapshot,
                horizon: Tid::new(h).expect("non-zero"),
            });
        }
        Ok(())
    }

    /// The newest revision of `oid` with tid <= `upto`, from `seg`.
    fn lookup(seg: &Segment, oid: Oid, upto: u64) -> Result<Option<(Tid, EntryLoc)>> {
        seg.index.lookup(oid, upto)
    }

    /// The newest revision of `oid` in the whole segment (the caller holds the commit
    /// lock, so the answer is current).
    fn lookup_latest_locked(seg: &Segment, oid: Oid) -> Result<Option<(Tid, EntryLoc)>> {
        Self::lookup(seg, oid, u64::MAX)
    }

    /// Loads the revision of `oid` visible at `snapshot`.
    pub(crate) fn load(&self, oid: Oid, snapshot: Tid) -> Result<Option<Entry>> {
        self.check_horizon(snapshot)?;
        let seg = self.current.read().clone();
        match Self::lookup(&seg, oid, snapshot.get())? {
            None => Ok(None),
            Some((tid, loc)) => read_entry(&seg.file, &seg.path, loc, oid, tid).map(Some),
        }
    }

    /// Loads the revision of `oid` visible at `snapshot`, decoded as a `T`, through the
    /// shared cache of decoded revisions.
    pub(crate) fn load_shared<T>(
        &self,
        oid: Oid,
        snapshot: Tid,
    ) -> Result<Option<(SharedValue, Tid)>>
    where
        T: serde::de::DeserializeOwned + Send + Sync + 'static,
    {
        self.check_horizon(snapshot)?;
        let seg = self.current.read().clone();
        let Some((tid, loc)) = Self::lookup(&seg, oid, snapshot.get())? else {
            return Ok(None);
        };
        if let Some(v) = self.nodes.lock().get(oid, tid) {
            if v.is::<T>() {
                return Ok(Some((v, tid)));
            }
        }
        let e = read_entry(&seg.file, &seg.path, loc, oid, tid)?;
        let value: T = crate::codec::decode(oid, e.type_fp, &e.data)?;
        let value: SharedValue = Arc::new(value);
        self.nodes.lock().insert(oid, tid, value.clone());
        Ok(Some((value, tid)))
    }

    /// Takes `value`, the cached decoded revision `(oid, tid)`, out of the shared cache
    /// (a transaction is about to modify it and will offer its new revision at commit),
    /// so the transaction may own it without a copy when nobody else holds it.
    pub(crate) fn take_shared(&self, oid: Oid, tid: Tid, value: &SharedValue) {
        self.nodes.lock().take(oid, tid, value);
    }

    /// Offers decoded revisions that a commit just wrote (as `tid`) to the shared cache.
    pub(crate) fn cache_committed(&self, tid: Tid, values: Vec<(Oid, SharedValue)>) {
        let mut nodes = self.nodes.lock();
        for (oid, v) in values {
            nodes.insert(oid, tid, v);
        }
    }

    fn poison(&self, cause: String) {
        let mut p = self.poisoned.lock();
        if p.is_none() {
            tracing::error!(cause = %cause, "image poisoned: refusing further commits");
            *p = Some(cause);
        }
    }

    fn check_poison(&self) -> Result<()> {
        match &*self.poisoned.lock() {
            Some(cause) => Err(StoreError::Poisoned {
                cause: cause.clone(),
            }),
            None => Ok(()),
        }
    }

    /// The commit pipeline. `snapshot` is None only for the image's first commit.
    pub(crate) fn commit_writes(
        &self,
        snapshot: Option<Tid>,
        ws: WriteSet,
    ) -> std::result::Result<Tid, CommitError> {
        self.commit_writes_resolved(snapshot, ws, &mut Vec::new())
    }

    /// The commit pipeline; `resolved` receives the oids whose state a conflict resolver
    /// replaced (what was committed for them is not what the transaction wrote).
    pub(crate) fn commit_writes_resolved(
        &self,
        snapshot: Option<Tid>,
        mut ws: WriteSet,
        resolved: &mut Vec<Oid>,
    ) -> std::result::Result<Tid, CommitError> {
        let mut cs = self.commit.lock();
        self.check_poison()?;
        let seg = cs.seg.clone();
        if let Some(snap) = snapshot {
            let h = self.pack_horizon.load(Ordering::Acquire);
            if snap.get() < h {
                return Err(ConflictError::Packed {
                    snapshot: snap,
                    horizon: Tid::new(h).expect("non-zero"),
                }
                .into());
            }
            for &oid in &ws.read_current {
                if let Some((latest, _)) = Self::lookup_latest_locked(&seg, oid)? {
                    if latest > snap {
                        return Err(ConflictError::Read {
                            oid,
                            snapshot: snap,
                            committed: latest,
                        }
                        .into());
                    }
                }
            }
            for (&oid, w) in ws.writes.iter_mut() {
                if w.is_new {
                    continue;
                }
                let Some((latest, loc)) = Self::lookup_latest_locked(&seg, oid)? else {
                    continue;
                };
                if latest <= snap {
                    continue;
                }
                let conflict = ConflictError::Write {
                    oid,
                    snapshot: snap,
                    committed: latest,
                };
                let Some(resolver) = w.resolver else {
                    return Err(conflict.into());
                };
                let committed = read_entry(&seg.file, &seg.path, loc, oid, latest)?;
                let Some((atid, aloc)) = Self::lookup(&seg, oid, snap.get())? else {
                    return Err(conflict.into());
                };
                let ancestor = read_entry(&seg.file, &seg.path, aloc, oid, atid)?;
                match resolver(oid, &ancestor, &committed, &w.enc)? {
                    Some(merged) => {
                        tracing::debug!(%oid, "conflict resolved by the object's resolver");
                        w.enc = merged;
                        resolved.push(oid);
                    }
                    None => return Err(conflict.into()),
                }
            }
        }
        let tid = if snapshot.is_none() && cs.end == SEG_HEADER_LEN {
            Tid::FIRST
        } else {
            cs.last_tid.next()
        };
        let durable_upto = self.sync.lock().synced_end;
        let mut b = RecordBuilder::new(
            tid,
            durable_upto,
            now_us(),
            self.next_oid.load(Ordering::Relaxed),
        );
        b.reserve(
            ws.writes
                .values()
                .map(|w| {
                    64 + w.enc.data.len() + 8 * w.enc.refs.oids.len() + 16 * w.enc.refs.blobs.len()
                })
                .sum::<usize>()
                + 56 * ws.new_blobs.len()
                + 64,
        );
        for (&oid, w) in &ws.writes {
            b.push_encoded(oid, tid, &w.enc);
            if b.encoded_len() > MAX_RECORD - 1024 {
                return Err(StoreError::TooLarge {
                    bytes: b.encoded_len(),
                    limit: MAX_RECORD,
                }
                .into());
            }
        }
        let new_blobs: Vec<NewBlob> = ws
            .new_blobs
            .iter()
            .map(|r| NewBlob {
                id: r.id,
                len: r.len,
                hash: r.hash,
            })
            .collect();
        let (bytes, offsets) = b.finish(&new_blobs);
        let start = cs.end;
        let rec_end = start + bytes.len() as u64;
        if rec_end > cs.alloc_end {
            self.preallocate(&mut cs, rec_end)?;
        }
        if let Err(e) = seg.file.write_all_at(&bytes, start) {
            // Take back a partial write so the next record starts at a clean offset.
            match seg.file.set_len(start) {
                Ok(()) => cs.alloc_end = start,
                Err(e2) => self.poison(format!("write failed ({e}) and truncate failed ({e2})")),
            }
            return Err(StoreError::io("append commit record", &seg.path, e).into());
        }
        let crc = u32::from_le_bytes(bytes[bytes.len() - 4..].try_into().expect("4"));
        seg.index.insert(
            tid,
            offsets.iter().map(|&(oid, off, len)| {
                (
                    oid,
                    EntryLoc {
                        offset: start + off,
                        len,
                    },
                )
            }),
        );
        cs.end = rec_end;
        cs.last_tid = tid;
        cs.last = Some(Covers {
            start,
            end: rec_end,
            tid,
            crc,
        });
        {
            let mut s = self.sync.lock();
            s.written_end = rec_end;
            s.written_tid = tid;
        }
        {
            let mut pending = self.pending_blobs.lock();
            for b in &ws.new_blobs {
                pending.remove(&b.id);
            }
        }
        drop(cs);
        self.wait_durable(seg.gen, rec_end)?;
        if seg.index.overlay_len() as u64 >= self.config.index_checkpoint_revisions {
            // Skipped when a checkpoint, pack or verify is running (it will come later).
            if let (Some(_running), Some(_maint)) =
                (self.checkpointing.try_lock(), self.maintenance.try_lock())
            {
                // The commit is durable whatever happens here; a failed checkpoint only
                // means a longer replay on the next open.
                if let Err(e) = self.checkpoint_index_locked() {
                    tracing::warn!(error = %e, "index checkpoint failed");
                }
            }
        }
        Ok(tid)
    }

    /// Zero-fills the segment from its current length to past `need` and makes that
    /// durable, so the appends that follow overwrite allocated space.
    fn preallocate(&self, cs: &mut CommitState, need: u64) -> Result<()> {
        let seg = &cs.seg;
        // Grow with the log (1 MiB at first, up to PREALLOC_CHUNK), so that small images
        // stay small.
        let ahead = cs.alloc_end.clamp(1 << 20, PREALLOC_CHUNK);
        let target = (need + ahead).next_multiple_of(1 << 20);
        let zeros = vec![0u8; 1 << 20];
        let mut at = cs.alloc_end;
        while at < target {
            let n = ((target - at) as usize).min(zeros.len());
            seg.file
                .write_all_at(&zeros[..n], at)
                .map_err(|e| StoreError::io("preallocate log space", &seg.path, e))?;
            at += n as u64;
        }
        // A failed fdatasync leaves the kernel's view of the file unknown: poison, as
        // for a commit (see wait_durable).
        if let Err(e) = seg.file.sync_data() {
            let cause = format!("fdatasync of {} failed: {e}", seg.path.display());
            self.poison(cause);
            return Err(StoreError::io("preallocate log space", &seg.path, e));
        }
        cs.alloc_end = target;
        Ok(())
    }

    /// Writes an index checkpoint up to the last durable record (waits for a running one).
    pub(crate) fn checkpoint_index(&self) -> Result<()> {
        let _running = self.checkpointing.lock();
        // Pack replaces the segment and its index: not at the same time.
        let _maint = self.maintenance.lock();
        self.checkpoint_index_locked()
    }

    /// The body of [`Self::checkpoint_index`]; the caller holds `checkpointing` and
    /// `maintenance`.
    fn checkpoint_index_locked(&self) -> Result<()> {
        let (seg, covers) = {
            let cs = self.commit.lock();
            (cs.seg.clone(), cs.last)
        };
        let Some(covers) = covers else {
            return Ok(());
        };
        if seg.index.base_covers() == Some(covers) {
            return Ok(());
        }
        // Only durable records may be covered: a checkpoint must never be ahead of the
        // log after a power loss.
        self.wait_durable(seg.gen, covers.end)?;
        let started = std::time::Instant::now();
        seg.index
            .checkpoint(seg.gen, covers, self.next_oid.load(Ordering::Acquire))?;
        tracing::debug!(
            tid = covers.tid.get(),
            revisions = seg.index.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "index checkpoint written"
        );
        Ok(())
    }

    /// Validates a transaction that wrote nothing (its `read_current` set).
    pub(crate) fn validate_only(
        &self,
        snapshot: Tid,
        ws: WriteSet,
    ) -> std::result::Result<Tid, CommitError> {
        let cs = self.commit.lock();
        self.check_poison()?;
        for &oid in &ws.read_current {
            if let Some((latest, _)) = Self::lookup_latest_locked(&cs.seg, oid)? {
                if latest > snapshot {
                    return Err(ConflictError::Read {
                        oid,
                        snapshot,
                        committed: latest,
                    }
                    .into());
                }
            }
        }
        Ok(snapshot)
    }

    /// Blocks until `tid` is visible to new snapshots (or the image is poisoned).
    pub(crate) fn wait_visible(&self, tid: Tid) {
        let mut s = self.sync.lock();
        while self.visible.load(Ordering::Acquire) < tid.get() && s.failed.is_none() {
            if !s.syncing && s.written_end > s.synced_end {
                // Nobody is syncing the winner's record: do it ourselves.
                let (gen, end) = (s.seg.gen, s.written_end);
                drop(s);
                let _ = self.wait_durable(gen, end);
                s = self.sync.lock();
                continue;
            }
            self.sync_cv.wait(&mut s);
        }
    }

    /// Group commit: returns once the log is fsynced past `end`. One waiter at a time
    /// runs `fdatasync`; everyone whose record it covers returns together.
    ///
    /// `gen` is the segment the caller's record is in: pack switches segments only after
    /// fsyncing everything in the old one, so a newer generation means "durable".
    fn wait_durable(&self, gen: u64, end: u64) -> Result<()> {
        let mut s = self.sync.lock();
        loop {
            if let Some(cause) = &s.failed {
                return Err(StoreError::Poisoned {
                    cause: cause.clone(),
                });
            }
            if s.seg.gen != gen || s.synced_end >= end {
                return Ok(());
            }
            if s.syncing {
                self.sync_cv.wait(&mut s);
                continue;
            }
            s.syncing = true;
            let (seg, target_end, target_tid) = (s.seg.clone(), s.written_end, s.written_tid);
            let res = MutexGuard::unlocked(&mut s, || seg.file.sync_data());
            s.syncing = false;
            match res {
                Ok(()) => {
                    if s.seg.gen == seg.gen {
                        s.synced_end = s.synced_end.max(target_end);
                    }
                    self.visible.fetch_max(target_tid.get(), Ordering::AcqRel);
                }
                Err(e) => {
                    let cause = format!("fdatasync of {} failed: {e}", seg.path.display());
                    s.failed = Some(cause.clone());
                    self.poison(cause);
                }
            }
            self.sync_cv.notify_all();
        }
    }

    fn pack(&self, before: Tid) -> Result<PackReport> {
        let _maint = self.maintenance.lock();
        let _span = tracing::info_span!("pack", before = before.get()).entered();
        let mut cs = self.commit.lock();
        let end = cs.end;
        self.wait_durable(cs.seg.gen, end)?;
        let last = cs.last_tid;
        let horizon = before.min(last);
        let old = cs.seg.clone();
        tracing::info!(horizon = horizon.get(), "pack: marking reachable revisions");

        // Mark: walk references from the root over every revision a snapshot at or after
        // the horizon can see (all revisions >= horizon, plus the newest one before it).
        let mut keep: HashSet<(Oid, Tid)> = HashSet::new();
        let mut keep_blobs: HashSet<BlobId> = HashSet::new();
        let mut seen: HashSet<Oid> = HashSet::new();
        let mut stack = vec![Oid::ROOT];
        seen.insert(Oid::ROOT);
        while let Some(oid) = stack.pop() {
            let revs = old.index.revisions(oid)?; // oldest first
            let first_kept = revs.iter().rposition(|(t, _)| *t <= horizon).unwrap_or(0);
            for &(tid, loc) in revs.iter().skip(first_kept) {
                let e = read_entry(&old.file, &old.path, loc, oid, tid)?;
                keep.insert((oid, tid));
                keep_blobs.extend(e.blobs.iter().copied());
                for r in e.refs {
                    if seen.insert(r) {
                        stack.push(r);
                    }
                }
            }
        }
        let total_revisions = old.index.len();

        // Copy: one sequential pass, writing the kept entries of each record. The last
        // record is always kept so tids keep increasing after a reopen.
        let gen = old.gen + 1;
        let log_dir = self.path.join("log");
        let tmp_path = log_dir.join(format!("{}.tmp", segment_name(gen)));
        let new_path = log_dir.join(segment_name(gen));
        let mut out = std::io::BufWriter::with_capacity(
            1 << 20,
            File::create(&tmp_path)
                .map_err(|e| StoreError::io("create pack segment", &tmp_path, e))?,
        );
        let header = SegmentHeader {
            gen,
            pack_horizon: Some(horizon),
        };
        out.write_all(&header.encode())
            .map_err(|e| StoreError::io("write pack segment", &tmp_path, e))?;
        let mut pos = SEG_HEADER_LEN;
        let mut reader = SegmentReader::new(&old.file, &old.path, SEG_HEADER_LEN)?;
        let pb = progress_bar(self.config.progress, end - SEG_HEADER_LEN, "pack");
        let mut carried_blobs: Vec<NewBlob> = Vec::new();
        let mut kept = 0u64;
        while reader.pos() < end {
            let rpos = reader.pos();
            let rec = match reader.next(&old.path)? {
                ReadOutcome::Record(r) => r,
                ReadOutcome::End => break,
                ReadOutcome::Bad { tid, detail } => {
                    return Err(StoreError::CorruptRecord {
                        path: old.path.clone(),
                        offset: rpos,
                        tid,
                        detail,
                    })
                }
            };
            pb.set_position(reader.pos() - SEG_HEADER_LEN);
            carried_blobs.extend(rec.new_blobs.iter().filter(|b| keep_blobs.contains(&b.id)));
            let entries: Vec<&(EntryLoc, Entry)> = rec
                .entries
                .iter()
                .filter(|(_, e)| keep.contains(&(e.oid, e.tid)))
                .collect();
            let is_last = rec.tid == last;
            if entries.is_empty() && !is_last {
                continue;
            }
            let mut b = RecordBuilder::new(rec.tid, pos, rec.timestamp_us, rec.next_oid);
            for (_, e) in &entries {
                let enc = Encoded {
                    type_fp: e.type_fp,
                    refs: crate::ids::Refs {
                        oids: e.refs.clone(),
                        blobs: e.blobs.clone(),
                    },
                    data: e.data.clone(),
                };
                b.push_entry(e.oid, &encode_entry(e.oid, e.tid, &enc));
            }
            kept += entries.len() as u64;
            let (bytes, _) = b.finish(&carried_blobs);
            carried_blobs.clear();
            out.write_all(&bytes)
                .map_err(|e| StoreError::io("write pack segment", &tmp_path, e))?;
            pos += bytes.len() as u64;
        }
        pb.finish_and_clear();
        let file = out
            .into_inner()
            .map_err(|e| StoreError::io("write pack segment", &tmp_path, e.into_error()))?;
        file.sync_all()
            .map_err(|e| StoreError::io("fsync pack segment", &tmp_path, e))?;
        drop(file);
        std::fs::rename(&tmp_path, &new_path)
            .map_err(|e| StoreError::io("rename pack segment", &new_path, e))?;
        fsync_dir(&log_dir)?;
        // The packed segment is now the image; everything below is cleanup that a
        // crash would redo on open.

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&new_path)
            .map_err(|e| StoreError::io("open segment", &new_path, e))?;
        let index_dir = self.path.join("index");
        let seg = Arc::new(Segment {
            gen,
            path: new_path.clone(),
            file,
            index: Index::new(index_dir.join(checkpoint_name(gen)), None),
        });
        let rec = recover(&seg, self.config.progress)?;
        let new_end = rec.end;
        let new_last = rec.last.map(|c| c.tid);
        if new_last != Some(last) || new_end != pos {
            return Err(StoreError::IndexInconsistent {
                detail: format!(
                    "packed segment reindexed to tid {new_last:?} end {new_end}, expected tid {last} end {pos}"
                ),
            });
        }
        if let Some(covers) = rec.last {
            // The packed segment is durable: checkpoint its index so no open replays it.
            seg.index
                .checkpoint(gen, covers, self.next_oid.load(Ordering::Acquire))?;
        }
        self.pack_horizon.store(horizon.get(), Ordering::Release);
        {
            let mut s = self.sync.lock();
            s.seg = seg.clone();
            s.written_end = new_end;
            s.synced_end = new_end;
        }
        *self.current.write() = seg.clone();
        cs.seg = seg;
        cs.end = new_end;
        cs.last = rec.last;
        cs.alloc_end = rec.file_len;
        let old_ckpt = old.index.path.clone();
        drop(old);
        std::fs::remove_file(log_dir.join(segment_name(gen - 1))).map_err(|e| {
            StoreError::io("remove old segment", log_dir.join(segment_name(gen - 1)), e)
        })?;
        fsync_dir(&log_dir)?;
        match std::fs::remove_file(&old_ckpt) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io("remove old index checkpoint", &old_ckpt, e)),
        }
        drop(cs);

        // Blob files nothing kept refers to (and that no open transaction is about to
        // commit) go.
        let blob_dir = self.blob_dir();
        let mut blobs_removed = 0u64;
        let pending = self.pending_blobs.lock();
        for e in std::fs::read_dir(&blob_dir).map_err(|e| StoreError::io("list", &blob_dir, e))? {
            let e = e.map_err(|e| StoreError::io("list", &blob_dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".blob") else {
                continue;
            };
            let Ok(id) = u128::from_str_radix(hex, 16) else {
                continue;
            };
            let id = BlobId(id);
            if !keep_blobs.contains(&id) && !pending.contains(&id) {
                std::fs::remove_file(e.path())
                    .map_err(|err| StoreError::io("remove blob", e.path(), err))?;
                blobs_removed += 1;
            }
        }
        drop(pending);
        fsync_dir(&blob_dir)?;
        let report = PackReport {
            horizon,
            live_objects: seen.len() as u64,
            revisions_kept: kept,
            revisions_removed: total_revisions - kept,
            blobs_removed,
            log_bytes_before: end,
            log_bytes_after: new_end,
        };
        tracing::info!(?report, "pack done");
        Ok(report)
    }

    fn verify(&self) -> Result<VerifyReport> {
        let _maint = self.maintenance.lock();
        let _span = tracing::info_span!("verify").entered();
        let (seg, end) = {
            let cs = self.commit.lock();
            (cs.seg.clone(), cs.end)
        };
        let mut reader = SegmentReader::new(&seg.file, &seg.path, SEG_HEADER_LEN)?;
        let pb = progress_bar(self.config.progress, end - SEG_HEADER_LEN, "verify");
        let mut records = 0u64;
        let mut revisions = 0u64;
        let mut last: Option<Tid> = None;
        let mut listed: HashMap<BlobId, NewBlob> = HashMap::new();
        let mut referenced: BTreeMap<BlobId, (Oid, Tid)> = BTreeMap::new();
        while reader.pos() < end {
            let pos = reader.pos();
            let rec = match reader.next(&seg.path)? {
                ReadOutcome::Record(r) => r,
                ReadOutcome::End => break,
                ReadOutcome::Bad { tid, detail } => {
                    return Err(StoreError::CorruptRecord {
                        path: seg.path.clone(),
                        offset: pos,
                        tid,
                        detail,
                    })
                }
            };
            if last.is_some_and(|t| rec.tid <= t) {
                return Err(StoreError::CorruptRecord {
                    path: seg.path.clone(),
                    offset: pos,
                    tid: Some(rec.tid),
                    detail: "tids do not increase".into(),
                });
            }
            last = Some(rec.tid);
            for (loc, e) in &rec.entries {
                match Self::lookup(&seg, e.oid, e.tid.get())? {
                    Some((t, l)) if t == e.tid && l == *loc => {}
                    other => {
                        return Err(StoreError::IndexInconsistent {
                            detail: format!(
                                "{} revision {} is at offset {} in the log, index has {other:?}",
                                e.oid, e.tid, loc.offset
                            ),
                        })
                    }
                }
                for b in &e.blobs {
                    referenced.entry(*b).or_insert((e.oid, e.tid));
                }
                revisions += 1;
            }
            for b in &rec.new_blobs {
                listed.insert(b.id, *b);
            }
            records += 1;
            pb.set_position(reader.pos() - SEG_HEADER_LEN);
        }
        pb.finish_and_clear();
        // Counting checks every block of the index checkpoint too.
        let indexed = match last {
            Some(l) => seg.index.count_checked(l)?,
            None => 0,
        };
        if indexed != revisions {
            return Err(StoreError::IndexInconsistent {
                detail: format!("index holds {indexed} revisions, log {revisions}"),
            });
        }
        for (id, (oid, tid)) in &referenced {
            if !listed.contains_key(id) {
                return Err(StoreError::BlobMissing {
                    id: *id,
                    path: self.blob_path(*id).with_extension(format!(
                        "blob (referenced by {oid} revision {tid}, created by no commit)"
                    )),
                });
            }
        }
        let total: u64 = listed.values().map(|b| b.len).sum();
        let pb = progress_bar(self.config.progress, total, "blobs");
        let mut blob_bytes = 0u64;
        let mut blobs = 0u64;
        for b in listed.values() {
            let r = BlobRef {
                id: b.id,
                len: b.len,
                hash: b.hash,
            };
            let path = self.blob_path(b.id);
            match verify_blob(path, r) {
                Ok(()) => {}
                // A listed blob that nothing references may have been packed away.
                Err(StoreError::BlobMissing { .. }) if !referenced.contains_key(&b.id) => continue,
                Err(e) => return Err(e),
            }
            blobs += 1;
            blob_bytes += b.len;
            pb.inc(b.len);
        }
        pb.finish_and_clear();
        let mut orphan_blobs = 0u64;
        let blob_dir = self.blob_dir();
        for e in std::fs::read_dir(&blob_dir).map_err(|e| StoreError::io("list", &blob_dir, e))? {
            let e = e.map_err(|e| StoreError::io("list", &blob_dir, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(id) = name
                .strip_suffix(".blob")
                .and_then(|h| u128::from_str_radix(h, 16).ok())
            {
                if !listed.contains_key(&BlobId(id)) {
                    orphan_blobs += 1;
                }
            }
        }
        let report = VerifyReport {
            records,
            revisions,
            blobs,
            blob_bytes,
            orphan_blobs,
            last_tid: last.unwrap_or(Tid::FIRST),
        };
        tracing::info!(?report, "verify ok");
        Ok(report)
    }

    /// Deletes blob files of an aborted transaction (never referenced by a commit).
    pub(crate) fn discard_blobs(&self, blobs: &[BlobRef]) {
        let mut pending = self.pending_blobs.lock();
        for b in blobs {
            pending.remove(&b.id);
            let _ = std::fs::remove_file(self.blob_path(b.id));
        }
    }
}
