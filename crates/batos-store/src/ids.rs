//! Identifiers: object ids, transaction ids, blob ids and typed references.
//!
//! `Oid` and `BlobRef` report themselves to a scoped collector while an object is being
//! encoded, so every stored revision carries the list of objects and blobs it refers to.
//! Pack walks those lists; it never needs to decode user types.

use std::cell::RefCell;
use std::fmt;
use std::marker::PhantomData;
use std::num::NonZeroU64;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A stable object id. Never reused. `Oid::ROOT` is the image's root object.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Oid(NonZeroU64);

impl Oid {
    /// The root object (a map of named roots), created with the image.
    pub const ROOT: Oid = Oid(NonZeroU64::MIN);

    /// The oid with this number, if it is non-zero.
    pub fn new(n: u64) -> Option<Oid> {
        NonZeroU64::new(n).map(Oid)
    }

    /// The raw number.
    pub fn get(self) -> u64 {
        self.0.get()
    }
}

impl fmt::Debug for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Oid({:#x})", self.0)
    }
}

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "oid {:#x}", self.0)
    }
}

impl Serialize for Oid {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        collect(|c| c.oids.push(*self));
        s.serialize_u64(self.0.get())
    }
}

impl<'de> Deserialize<'de> for Oid {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u64::deserialize(d)?;
        Oid::new(n).ok_or_else(|| D::Error::custom("oid 0 is not a valid object id"))
    }
}

/// A commit id. Strictly increasing: every commit gets the previous one plus one.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Tid(NonZeroU64);

impl Tid {
    /// The first commit of every image (it creates the root object).
    pub const FIRST: Tid = Tid(NonZeroU64::MIN);
    /// The largest tid; useful as an upper bound.
    pub const MAX: Tid = Tid(NonZeroU64::MAX);

    /// The tid with this number, if non-zero.
    pub fn new(n: u64) -> Option<Tid> {
        NonZeroU64::new(n).map(Tid)
    }

    /// The raw number.
    pub fn get(self) -> u64 {
        self.0.get()
    }

    /// The next tid.
    pub(crate) fn next(self) -> Tid {
        Tid(self
            .0
            .checked_add(1)
            .expect("tid space exhausted (2^64 commits)"))
    }
}

impl fmt::Debug for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tid({})", self.0)
    }
}

impl fmt::Display for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Identifies a blob file. Random 128 bits, so ids need no coordination with commits.
#[derive(Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub(crate) u128);

impl BlobId {
    pub(crate) fn random() -> BlobId {
        loop {
            let v: u128 = rand::random();
            if v != 0 {
                return BlobId(v);
            }
        }
    }

    /// The raw value.
    pub fn get(self) -> u128 {
        self.0
    }

    pub(crate) fn file_name(self) -> String {
        format!("{:032x}.blob", self.0)
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({:032x})", self.0)
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "blob {:032x}", self.0)
    }
}

/// A reference to a committed (or about to be committed) blob: its id, length and BLAKE3
/// content hash. Store it inside an object; the blob lives as long as a revision refers
/// to it.
#[derive(Copy, Clone, PartialEq, Eq, Hash, Debug)]
pub struct BlobRef {
    pub(crate) id: BlobId,
    pub(crate) len: u64,
    pub(crate) hash: [u8; 32],
}

impl BlobRef {
    /// The blob's id.
    pub fn id(&self) -> BlobId {
        self.id
    }
    /// Content length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// True for a zero-length blob.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// BLAKE3 hash of the content (usable as a content generation).
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }
}

#[derive(Serialize, Deserialize)]
struct BlobRefWire {
    id: u128,
    len: u64,
    hash: [u8; 32],
}

impl Serialize for BlobRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        collect(|c| c.blobs.push(self.id));
        BlobRefWire {
            id: self.id.0,
            len: self.len,
            hash: self.hash,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for BlobRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = BlobRefWire::deserialize(d)?;
        if w.id == 0 {
            return Err(D::Error::custom("blob id 0 is invalid"));
        }
        Ok(BlobRef {
            id: BlobId(w.id),
            len: w.len,
            hash: w.hash,
        })
    }
}

/// A typed reference to a persistent object: an `Oid` that remembers what it points to.
/// Store it in objects; load it with `Txn::load`.
pub struct Ref<T> {
    oid: Oid,
    _marker: PhantomData<fn() -> T>,
}

impl<T> Ref<T> {
    /// A typed view of an oid. The type is checked when the object is loaded.
    pub fn from_oid(oid: Oid) -> Self {
        Ref {
            oid,
            _marker: PhantomData,
        }
    }
    /// The untyped id.
    pub fn oid(&self) -> Oid {
        self.oid
    }
}

impl<T> Clone for Ref<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Ref<T> {}
impl<T> PartialEq for Ref<T> {
    fn eq(&self, o: &Self) -> bool {
        self.oid == o.oid
    }
}
impl<T> Eq for Ref<T> {}
impl<T> std::hash::Hash for Ref<T> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.oid.hash(h)
    }
}
impl<T> PartialOrd for Ref<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Ref<T> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.oid.cmp(&o.oid)
    }
}
impl<T> fmt::Debug for Ref<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Ref<{}>({:#x})",
            std::any::type_name::<T>(),
            self.oid.get()
        )
    }
}
impl<T> Serialize for Ref<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.oid.serialize(s)
    }
}
impl<'de, T> Deserialize<'de> for Ref<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(Ref::from_oid(Oid::deserialize(d)?))
    }
}

/// What an encoded object refers to.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refs {
    pub oids: Vec<Oid>,
    pub blobs: Vec<BlobId>,
}

thread_local! {
    static COLLECTOR: RefCell<Option<Refs>> = const { RefCell::new(None) };
}

fn collect(f: impl FnOnce(&mut Refs)) {
    COLLECTOR.with(|c| {
        if let Some(refs) = c.borrow_mut().as_mut() {
            f(refs)
        }
    });
}

/// Runs `f` with a fresh reference collector and returns what it collected. Restores any
/// outer collector, so nested encodes cannot leak references into each other.
pub(crate) fn collecting<R>(f: impl FnOnce() -> R) -> (R, Refs) {
    struct Restore(Option<Refs>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let prev = self.0.take();
            COLLECTOR.with(|c| *c.borrow_mut() = prev);
        }
    }
    let prev = COLLECTOR.with(|c| c.borrow_mut().replace(Refs::default()));
    let guard = Restore(prev);
    let r = f();
    let mut refs = COLLECTOR
        .with(|c| c.borrow_mut().take())
        .unwrap_or_default();
    // Put the outer collector back (also on unwind, through Drop).
    drop(guard);
    refs.oids.sort_unstable();
    refs.oids.dedup();
    refs.blobs.sort_unstable();
    refs.blobs.dedup();
    (r, refs)
}
