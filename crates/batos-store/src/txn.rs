//! Transactions: a snapshot to read from and a write set to commit.

use std::any::Any;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
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
use crate::nodecache::SharedValue;
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
    /// Decoded objects used by structures such as the B-tree, so a transaction that
    /// touches a node many times decodes it once and encodes it once, at commit.
    cache: RefCell<HashMap<Oid, Cached>>,
    done: bool,
}

type EncodeAny = fn(&dyn Any) -> Result<Encoded>;

struct Cached {
    value: CachedValue,
    /// Set once modified: how to encode it at commit.
    dirty: Option<EncodeAny>,
    resolver: Option<crate::db::Resolver>,
    is_new: bool,
}

/// A decoded object in a transaction's cache.
enum CachedValue {
    /// An unmodified committed revision (of that tid), shared with other transactions.
    Shared(SharedValue, Tid),
    /// This transaction's own state (modified or new).
    Owned(Box<dyn Any + Send + Sync>),
}

impl CachedValue {
    fn as_any(&self) -> &(dyn Any + Send + Sync) {
        match self {
            CachedValue::Shared(v, _) => &**v,
            CachedValue::Owned(v) => &**v,
        }
    }

    fn is<T: 'static>(&self) -> bool {
        self.as_any().is::<T>()
    }

    fn downcast_ref<T: 'static>(&self) -> Option<&T> {
        self.as_any().downcast_ref::<T>()
    }

    /// The value for modification: a shared revision is taken over when nobody else
    /// holds it, and copied otherwise.
    fn downcast_mut<T: Clone + Send + Sync + 'static>(&mut self) -> Option<&mut T> {
        if let CachedValue::Shared(v, tid) = self {
            let tid = *tid;
            // Move the Arc out (a placeholder stands in for a moment), so that ours is
            // the only reference when the shared cache has let go of it.
            let v = std::mem::replace(v, Arc::new(()));
            match v.downcast::<T>() {
                Ok(v) => {
                    let owned = Arc::try_unwrap(v).unwrap_or_else(|shared| (*shared).clone());
                    *self = CachedValue::Owned(Box::new(owned));
                }
                Err(v) => {
                    *self = CachedValue::Shared(v, tid);
                    return None;
                }
            }
        }
        match self {
            CachedValue::Owned(v) => v.downcast_mut::<T>(),
            CachedValue::Shared(..) => None,
        }
    }

    fn into_shared(self) -> SharedValue {
        match self {
            CachedValue::Shared(v, _) => v,
            CachedValue::Owned(v) => SharedValue::from(v),
        }
    }
}

/// Clean cache entries beyond this are dropped (dirty ones stay until commit).
const CACHE_CLEAN_LIMIT: usize = 4_096;

fn encode_any<T: Serialize + 'static>(v: &dyn Any) -> Result<Encoded> {
    let v = v
        .downcast_ref::<T>()
        .expect("cache entries are encoded with their own type's encoder");
    encode(v)
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
            cache: RefCell::new(HashMap::new()),
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
        let cache = self.cache.borrow();
        self.writes.len()
            + cache
                .iter()
                .filter(|(oid, c)| c.dirty.is_some() && !self.writes.contains_key(oid))
                .count()
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
        if let Some(c) = self.cache.borrow().get(&oid) {
            if let Some(enc) = c.dirty {
                let e = enc(c.value.as_any())?;
                return Ok(Some((e.type_fp, RawData::Owned(e.data))));
            }
        }
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
        let cached_new = self.cache.get_mut().remove(&oid).is_some_and(|c| c.is_new);
        let is_new = cached_new || self.writes.get(&oid).is_some_and(|w| w.is_new);
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

    /// Makes sure `oid` is decoded in the cache as a `T`.
    fn cache_load<T: DeserializeOwned + Send + Sync + 'static>(&self, oid: Oid) -> Result<()> {
        let mut cache = self.cache.borrow_mut();
        let in_txn = match cache.get(&oid) {
            Some(c) if c.value.is::<T>() => return Ok(()),
            Some(_) => true,
            None => self.writes.contains_key(&oid),
        };
        drop(cache);
        let value = if in_txn {
            // This transaction's own state: decode it (which reports a type mismatch).
            CachedValue::Owned(Box::new(self.get::<T>(oid)?))
        } else {
            // A committed revision: decoded once for the whole Db.
            match self.db.load_shared::<T>(oid, self.snapshot)? {
                Some((v, tid)) if v.is::<T>() => CachedValue::Shared(v, tid),
                // Stored as another type: decoding reports it.
                Some(_) => CachedValue::Owned(Box::new(self.get::<T>(oid)?)),
                None => {
                    return Err(StoreError::ObjectNotFound {
                        oid,
                        snapshot: self.snapshot,
                    })
                }
            }
        };
        cache = self.cache.borrow_mut();
        if cache.len() >= CACHE_CLEAN_LIMIT {
            cache.retain(|_, c| c.dirty.is_some());
        }
        let (is_new, resolver) = match (cache.get(&oid), self.writes.get(&oid)) {
            (Some(c), _) => (c.is_new, c.resolver),
            (None, Some(w)) => (w.is_new, w.resolver),
            (None, None) => (false, None),
        };
        let dirty = cache.get(&oid).and_then(|c| c.dirty);
        if dirty.is_some() {
            // A dirty entry of another type: `get` above would have failed.
            return Err(StoreError::IndexInconsistent {
                detail: format!("{oid} cached as two types in one transaction"),
            });
        }
        cache.insert(
            oid,
            Cached {
                value,
                dirty: None,
                resolver,
                is_new,
            },
        );
        Ok(())
    }

    /// Reads `oid` as a `T` through the transaction's decoded-object cache.
    pub(crate) fn cached_read<T, R>(&self, oid: Oid, f: impl FnOnce(&T) -> R) -> Result<R>
    where
        T: DeserializeOwned + Send + Sync + 'static,
    {
        self.cache_load::<T>(oid)?;
        let cache = self.cache.borrow();
        let v = cache[&oid]
            .value
            .downcast_ref::<T>()
            .expect("cache_load stored a T");
        Ok(f(v))
    }

    /// Modifies `oid` in place through the cache; it is encoded once, at commit.
    pub(crate) fn cached_write<T, R>(
        &mut self,
        oid: Oid,
        resolver: Option<crate::db::Resolver>,
        f: impl FnOnce(&mut T) -> R,
    ) -> Result<R>
    where
        T: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
    {
        self.check_writable()?;
        self.cache_load::<T>(oid)?;
        // The cache entry is now the authoritative pending state.
        let pending = self.writes.remove(&oid);
        let cache = self.cache.get_mut();
        let c = cache.get_mut(&oid).expect("cache_load inserted it");
        if let Some(w) = pending {
            c.is_new |= w.is_new;
        }
        c.dirty = Some(encode_any::<T>);
        c.resolver = resolver;
        if let CachedValue::Shared(v, tid) = &c.value {
            self.db.take_shared(oid, *tid, v);
        }
        let v = c.value.downcast_mut::<T>().expect("cache_load stored a T");
        Ok(f(v))
    }

    /// Adds a new object to the cache (dirty).
    pub(crate) fn cached_insert<T>(
        &mut self,
        oid: Oid,
        value: T,
        resolver: Option<crate::db::Resolver>,
    ) -> Result<()>
    where
        T: Serialize + Send + Sync + 'static,
    {
        self.check_writable()?;
        self.writes.remove(&oid);
        self.cache.get_mut().insert(
            oid,
            Cached {
                value: CachedValue::Owned(Box::new(value)),
                dirty: Some(encode_any::<T>),
                resolver,
                is_new: true,
            },
        );
        Ok(())
    }

    /// Moves dirty cache entries into the write set (before commit). Returns their
    /// decoded values, for the shared cache once the commit's tid is known.
    fn flush_cache(&mut self) -> Result<Vec<(Oid, SharedValue)>> {
        let mut decoded = Vec::new();
        for (oid, c) in self.cache.get_mut().drain() {
            if let Some(enc) = c.dirty {
                self.writes.insert(
                    oid,
                    PendingWrite {
                        enc: enc(c.value.as_any())?,
                        resolver: c.resolver,
                        is_new: c.is_new,
                    },
                );
                decoded.push((oid, c.value.into_shared()));
            }
        }
        Ok(decoded)
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
        let decoded = match self.flush_cache() {
            Ok(d) => d,
            Err(e) => {
                self.db.discard_blobs(&blobs);
                return Err(e.into());
            }
        };
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
        let mut resolved = Vec::new();
        let res = self
            .db
            .commit_writes_resolved(Some(self.snapshot), ws, &mut resolved);
        if let Ok(tid) = res {
            // What a resolver merged differs from what this transaction decoded.
            let committed = decoded
                .into_iter()
                .filter(|(oid, _)| !resolved.contains(oid))
                .collect();
            self.db.cache_committed(tid, committed);
        }
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
