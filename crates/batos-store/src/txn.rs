//! Transactions: a snapshot to read from and a write set to commit.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::blob::{BlobReader, BlobWriter};
use crate::codec::{decode, encode, Encoded};
use crate::db::{DbInner, PendingWrite, WriteSet};
use crate::error::{CommitError, Result, StoreError};
use crate::ids::{BlobRef, Oid, Ref, Tid};
use crate::log::Entry;
use crate::resolve::{resolver_for, ResolveConflict};

/// The root object (`Oid::ROOT`): named roots, each an oid.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RootMap {
    pub names: BTreeMap<String, Oid>,
}

/// Whether a transaction may write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnMode {
    /// Reads a snapshot, commits writes (from `Db::begin`).
    ReadWrite,
    /// Reads a past snapshot only (from `Db::snapshot_at`).
    ReadOnly,
}

/// A transaction: reads see the snapshot taken at `begin` plus this transaction's own
/// writes; nothing is visible to others until `commit` returns. Dropping a transaction
/// aborts it.
pub struct Txn {
    db: Arc<DbInner>,
    snapshot: Tid,
    mode: TxnMode,
    writes: BTreeMap<Oid, PendingWrite>,
    read_current: BTreeSet<Oid>,
    blobs: Arc<Mutex<Vec<BlobRef>>>,
    done: bool,
}

impl std::fmt::Debug for Txn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Txn")
            .field("snapshot", &self.snapshot)
            .field("mode", &self.mode)
            .field("writes", &self.writes.len())
            .finish()
    }
}

impl Txn {
    pub(crate) fn new(db: Arc<DbInner>, snapshot: Tid, mode: TxnMode) -> Txn {
        Txn {
            db,
            snapshot,
            mode,
            writes: BTreeMap::new(),
            read_current: BTreeSet::new(),
            blobs: Arc::new(Mutex::new(Vec::new())),
            done: false,
        }
    }

    /// The tid this transaction reads as of.
    pub fn snapshot(&self) -> Tid {
        self.snapshot
    }

    /// Read-write or read-only.
    pub fn mode(&self) -> TxnMode {
        self.mode
    }

    /// Number of objects written so far.
    pub fn write_count(&self) -> usize {
        self.writes.len()
    }

    fn check_writable(&self) -> Result<()> {
        match self.mode {
            TxnMode::ReadWrite => Ok(()),
            TxnMode::ReadOnly => Err(StoreError::ReadOnly {
                snapshot: self.snapshot,
            }),
        }
    }

    /// Raw state of `oid` as this transaction sees it.
    fn raw(&self, oid: Oid) -> Result<Option<(u64, RawData<'_>)>> {
        if let Some(w) = self.writes.get(&oid) {
            return Ok(Some((w.enc.type_fp, RawData::Borrowed(&w.enc.data))));
        }
        Ok(self
            .db
            .load(oid, self.snapshot)?
            .map(|e: Entry| (e.type_fp, RawData::Owned(e.data))))
    }

    /// Loads object `oid` as a `T`, or None if it does not exist in this snapshot.
    pub fn try_get<T: DeserializeOwned>(&self, oid: Oid) -> Result<Option<T>> {
        match self.raw(oid)? {
            None => Ok(None),
            Some((fp, data)) => decode(oid, fp, data.as_slice()).map(Some),
        }
    }

    /// Loads object `oid` as a `T`.
    pub fn get<T: DeserializeOwned>(&self, oid: Oid) -> Result<T> {
        self.try_get(oid)?.ok_or(StoreError::ObjectNotFound {
            oid,
            snapshot: self.snapshot,
        })
    }

    /// Loads the object a typed reference points to.
    pub fn load<T: DeserializeOwned>(&self, r: Ref<T>) -> Result<T> {
        self.get(r.oid())
    }

    /// True if `oid` exists in this transaction's view.
    pub fn exists(&self, oid: Oid) -> Result<bool> {
        Ok(self.raw(oid)?.is_some())
    }

    fn put_encoded(&mut self, oid: Oid, enc: Encoded, resolver: Option<crate::db::Resolver>) {
        let is_new = self.writes.get(&oid).is_some_and(|w| w.is_new);
        self.writes.insert(
            oid,
            PendingWrite {
                enc,
                resolver,
                is_new,
            },
        );
    }

    /// Writes a new state for `oid` (an existing object, or one from `new_oid`).
    pub fn put<T: Serialize>(&mut self, oid: Oid, value: &T) -> Result<()> {
        self.check_writable()?;
        let enc = encode(value)?;
        self.put_encoded(oid, enc, None);
        Ok(())
    }

    /// Writes through a typed reference.
    pub fn set<T: Serialize>(&mut self, r: Ref<T>, value: &T) -> Result<()> {
        self.put(r.oid(), value)
    }

    /// Writes an object whose type merges concurrent changes (see [`ResolveConflict`]):
    /// when another transaction committed it first, the store calls `T::resolve` instead
    /// of failing with a conflict.
    pub fn put_resolvable<T: ResolveConflict>(&mut self, oid: Oid, value: &T) -> Result<()> {
        self.check_writable()?;
        let enc = encode(value)?;
        self.put_encoded(oid, enc, Some(resolver_for::<T>()));
        Ok(())
    }

    /// Allocates a fresh oid (never reused, even if this transaction aborts).
    pub fn new_oid(&mut self) -> Result<Oid> {
        self.check_writable()?;
        Ok(self.db.new_oid())
    }

    /// Stores a new object and returns a typed reference to it. It becomes reachable
    /// (and survives pack) once a reachable object refers to it.
    pub fn insert_new<T: Serialize>(&mut self, value: &T) -> Result<Ref<T>> {
        self.check_writable()?;
        let oid = self.db.new_oid();
        let enc = encode(value)?;
        self.writes.insert(
            oid,
            PendingWrite {
                enc,
                resolver: None,
                is_new: true,
            },
        );
        Ok(Ref::from_oid(oid))
    }

    /// Like `insert_new` for a type with a conflict resolver.
    pub fn insert_new_resolvable<T: ResolveConflict>(&mut self, value: &T) -> Result<Ref<T>> {
        let r = self.insert_new(value)?;
        if let Some(w) = self.writes.get_mut(&r.oid()) {
            w.resolver = Some(resolver_for::<T>());
        }
        Ok(r)
    }

    /// Opt-in read validation (ZODB's `readCurrent`): the commit fails with
    /// `ConflictError::Read` if `oid` changed after this transaction's snapshot.
    pub fn read_current(&mut self, oid: Oid) {
        self.read_current.insert(oid);
    }

    fn root_map(&self) -> Result<RootMap> {
        self.get(Oid::ROOT)
    }

    /// The object registered under `name` in the root, if any.
    pub fn named_root<T>(&self, name: &str) -> Result<Option<Ref<T>>> {
        Ok(self.root_map()?.names.get(name).copied().map(Ref::from_oid))
    }

    /// Registers `r` under `name` in the root (replacing any previous one).
    pub fn set_named_root<T>(&mut self, name: &str, r: Ref<T>) -> Result<()> {
        self.check_writable()?;
        let mut root = self.root_map()?;
        root.names.insert(name.to_string(), r.oid());
        self.put(Oid::ROOT, &root)
    }

    /// Removes `name` from the root; the object becomes garbage unless referenced
    /// elsewhere. Returns whether the name existed.
    pub fn remove_named_root(&mut self, name: &str) -> Result<bool> {
        self.check_writable()?;
        let mut root = self.root_map()?;
        let existed = root.names.remove(name).is_some();
        if existed {
            self.put(Oid::ROOT, &root)?;
        }
        Ok(existed)
    }

    /// The names registered in the root, sorted.
    pub fn root_names(&self) -> Result<Vec<String>> {
        Ok(self.root_map()?.names.into_keys().collect())
    }

    /// The object under `name`, creating it with `init` if the name is free.
    pub fn named_root_or_insert<T: Serialize>(
        &mut self,
        name: &str,
        init: impl FnOnce() -> T,
    ) -> Result<Ref<T>> {
        if let Some(r) = self.named_root(name)? {
            return Ok(r);
        }
        let r = self.insert_new(&init())?;
        self.set_named_root(name, r)?;
        Ok(r)
    }

    /// Starts streaming a new blob. Finish it with [`BlobWriter::finish`] and store the
    /// returned [`BlobRef`] in an object of this transaction.
    pub fn blob_writer(&mut self) -> Result<BlobWriter> {
        self.check_writable()?;
        BlobWriter::create(self.db.clone(), self.blobs.clone())
    }

    /// Streams everything from `src` into a new blob.
    pub fn write_blob(&mut self, src: &mut impl std::io::Read) -> Result<BlobRef> {
        let mut w = self.blob_writer()?;
        let tmp = w.id();
        std::io::copy(src, &mut w).map_err(|e| {
            StoreError::io(
                "stream into blob",
                self.db.blob_tmp_dir().join(tmp.file_name()),
                e,
            )
        })?;
        w.finish()
    }

    /// Opens a blob for streaming reads (checked chunk by chunk).
    pub fn open_blob(&self, blob: &BlobRef) -> Result<BlobReader> {
        self.db.check_horizon(self.snapshot)?;
        BlobReader::open(self.db.blob_path(blob.id), *blob)
    }

    /// Commits atomically and durably: when this returns `Ok(tid)` the writes are in the
    /// fsynced log. A transaction with no writes commits nothing (it still validates its
    /// `read_current` set) and returns its snapshot.
    pub fn commit(mut self) -> std::result::Result<Tid, CommitError> {
        self.done = true;
        let blobs = std::mem::take(&mut *self.blobs.lock());
        if self.mode == TxnMode::ReadOnly {
            return Ok(self.snapshot);
        }
        let ws = WriteSet {
            writes: std::mem::take(&mut self.writes),
            read_current: std::mem::take(&mut self.read_current),
            new_blobs: blobs.clone(),
        };
        if ws.writes.is_empty() && ws.new_blobs.is_empty() {
            // Nothing to write: validate reads against the latest commits, then return.
            let ws_check = WriteSet {
                writes: BTreeMap::new(),
                read_current: ws.read_current,
                new_blobs: Vec::new(),
            };
            return self.db.validate_only(self.snapshot, ws_check);
        }
        let res = self.db.commit_writes(Some(self.snapshot), ws);
        if matches!(res, Err(CommitError::Conflict(_))) {
            // Certainly not committed: the blobs can go now. After a fail-stop error the
            // outcome is unknown, so they stay for pack to judge.
            self.db.discard_blobs(&blobs);
        }
        res
    }

    /// Throws the changes away (same as dropping the transaction).
    pub fn abort(mut self) {
        self.abort_inner();
    }

    fn abort_inner(&mut self) {
        if !self.done {
            self.done = true;
            let blobs = std::mem::take(&mut *self.blobs.lock());
            self.db.discard_blobs(&blobs);
        }
    }
}

impl Drop for Txn {
    fn drop(&mut self) {
        self.abort_inner();
    }
}

enum RawData<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

impl RawData<'_> {
    fn as_slice(&self) -> &[u8] {
        match self {
            RawData::Borrowed(b) => b,
            RawData::Owned(v) => v,
        }
    }
}
