//! Application conflict resolution (ZODB's `_p_resolveConflict`).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::codec::{decode, encode, Encoded};
use crate::db::Resolver;
use crate::error::Result;
use crate::ids::{Oid, Ref};
use crate::log::Entry;
use crate::txn::Txn;

/// A type whose concurrent changes can be merged. When a transaction commits a value of
/// this type (written with `Txn::put_resolvable`) and another transaction committed the
/// same object after its snapshot, the store calls `resolve` under the commit lock
/// instead of reporting a conflict. Return `None` to give up (the commit conflicts).
pub trait ResolveConflict: Serialize + DeserializeOwned {
    /// `ancestor`: the state this transaction read; `committed`: the state now committed;
    /// `mine`: this transaction's state.
    fn resolve(ancestor: &Self, committed: &Self, mine: &Self) -> Option<Self>;
}

fn resolve_erased<T: ResolveConflict>(
    oid: Oid,
    ancestor: &Entry,
    committed: &Entry,
    mine: &Encoded,
) -> Result<Option<Encoded>> {
    let a: T = decode(oid, ancestor.type_fp, &ancestor.data)?;
    let c: T = decode(oid, committed.type_fp, &committed.data)?;
    let m: T = decode(oid, mine.type_fp, &mine.data)?;
    match T::resolve(&a, &c, &m) {
        Some(v) => encode(&v).map(Some),
        None => Ok(None),
    }
}

pub(crate) fn resolver_for<T: ResolveConflict>() -> Resolver {
    resolve_erased::<T>
}

/// A conflict-free counter (like `BTrees.Length`): concurrent increments add up instead
/// of conflicting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counter(pub i64);

impl ResolveConflict for Counter {
    fn resolve(ancestor: &Self, committed: &Self, mine: &Self) -> Option<Self> {
        Some(Counter(
            committed.0.checked_add(mine.0.checked_sub(ancestor.0)?)?,
        ))
    }
}

impl Ref<Counter> {
    /// Creates a counter starting at `value`.
    pub fn new_counter(txn: &mut Txn, value: i64) -> Result<Ref<Counter>> {
        txn.insert_new_resolvable(&Counter(value))
    }

    /// The counter's value in `txn`'s view.
    pub fn value(&self, txn: &Txn) -> Result<i64> {
        Ok(txn.load(*self)?.0)
    }

    /// Adds `delta`; concurrent adds merge at commit.
    pub fn add(&self, txn: &mut Txn, delta: i64) -> Result<i64> {
        let v = txn.load(*self)?.0 + delta;
        txn.put_resolvable(self.oid(), &Counter(v))?;
        Ok(v)
    }
}

/// An append-only log object: concurrent appends merge (the committed entries first,
/// then this transaction's new ones), as long as neither side removed entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendLog<T> {
    /// The entries, oldest first.
    pub entries: Vec<T>,
}

impl<T: Serialize + DeserializeOwned + Clone + PartialEq> ResolveConflict for AppendLog<T> {
    fn resolve(ancestor: &Self, committed: &Self, mine: &Self) -> Option<Self> {
        let n = ancestor.entries.len();
        if committed.entries.len() < n
            || mine.entries.len() < n
            || committed.entries[..n] != ancestor.entries[..]
            || mine.entries[..n] != ancestor.entries[..]
        {
            return None;
        }
        let mut merged = committed.clone();
        merged.entries.extend_from_slice(&mine.entries[n..]);
        Some(merged)
    }
}
