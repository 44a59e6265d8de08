//! A persistent B+-tree: an ordered map whose nodes are ordinary objects, so it takes
//! part in snapshots, conflicts and pack like everything else, and loads only the nodes a
//! lookup or scan touches.
//!
//! Leaves hold up to [`MAX_LEAF`] entries and link to their right sibling; branches hold
//! up to [`MAX_BRANCH`] separators. An insert rewrites one leaf (plus its ancestors when
//! it splits). Concurrent changes to *different* keys of one leaf merge at commit (like
//! ZODB's bucket-level conflict resolution); the same key twice, or a split, conflicts.
//! Removal does not rebalance: leaves may become sparse or empty.

use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Result, StoreError};
use crate::ids::Oid;
use crate::resolve::ResolveConflict;
use crate::txn::Txn;

/// Most entries in a leaf before it splits.
pub const MAX_LEAF: usize = 32;
/// Most separators in a branch before it splits.
pub const MAX_BRANCH: usize = 128;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TreeHeader {
    root: Oid,
    depth: u32,
}

/// A node. Leaves encode as a list of length-prefixed entries so that the store can
/// apply delta revisions without knowing `K` and `V` (layout in `delta.rs`); branches
/// encode their keys and children with bincode.
#[derive(Debug, Clone)]
enum Node<K, V> {
    Leaf {
        keys: Vec<K>,
        vals: Vec<V>,
        next: Option<Oid>,
    },
    Branch {
        keys: Vec<K>,
        children: Vec<Oid>,
    },
}

/// Bytes written as a length-prefixed byte string.
struct RawBytes<'a>(&'a [u8]);

impl Serialize for RawBytes<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_bytes(self.0)
    }
}

impl<K: Serialize, V: Serialize> Serialize for Node<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        match self {
            Node::Leaf { keys, vals, next } => {
                if keys.len() != vals.len() {
                    return Err(serde::ser::Error::custom(
                        "leaf with unequal keys and values",
                    ));
                }
                let mut t = s.serialize_tuple(3 + 2 * keys.len())?;
                t.serialize_element(&0u8)?;
                t.serialize_element(next)?;
                t.serialize_element(&(keys.len() as u64))?;
                // Each key and value as its own bincode encoding (references they hold
                // still reach the collector of the enclosing encode).
                let mut buf = Vec::new();
                let cfg = bincode::config::standard();
                for (k, v) in keys.iter().zip(vals) {
                    buf.clear();
                    bincode::serde::encode_into_std_write(k, &mut buf, cfg)
                        .map_err(serde::ser::Error::custom)?;
                    t.serialize_element(&RawBytes(&buf))?;
                    buf.clear();
                    bincode::serde::encode_into_std_write(v, &mut buf, cfg)
                        .map_err(serde::ser::Error::custom)?;
                    t.serialize_element(&RawBytes(&buf))?;
                }
                t.end()
            }
            Node::Branch { keys, children } => {
                let Some((first, rest)) = children.split_first() else {
                    return Err(serde::ser::Error::custom("branch without children"));
                };
                if rest.len() != keys.len() {
                    return Err(serde::ser::Error::custom(
                        "branch with children not one more than keys",
                    ));
                }
                let mut t = s.serialize_tuple(3 + 2 * keys.len())?;
                t.serialize_element(&1u8)?;
                t.serialize_element(first)?;
                t.serialize_element(&(keys.len() as u64))?;
                let mut buf = Vec::new();
                let cfg = bincode::config::standard();
                for (k, c) in keys.iter().zip(rest) {
                    buf.clear();
                    bincode::serde::encode_into_std_write(k, &mut buf, cfg)
                        .map_err(serde::ser::Error::custom)?;
                    t.serialize_element(&RawBytes(&buf))?;
                    buf.clear();
                    bincode::serde::encode_into_std_write(c, &mut buf, cfg)
                        .map_err(serde::ser::Error::custom)?;
                    t.serialize_element(&RawBytes(&buf))?;
                }
                t.end()
            }
        }
    }
}

/// Reads one length-prefixed key, value or child. The prefix is the length of the
/// bincode encoding that follows, so the part decodes in place, without a copy; the
/// prefix is for the store's untyped edits (`delta.rs`), which skip over parts.
fn next_part<'de, T: DeserializeOwned, A: serde::de::SeqAccess<'de>>(
    seq: &mut A,
) -> std::result::Result<T, A::Error> {
    use serde::de::Error;
    let missing = || A::Error::custom("truncated B-tree node");
    let _len: u64 = seq.next_element()?.ok_or_else(missing)?;
    seq.next_element()?.ok_or_else(missing)
}

impl<'de, K: DeserializeOwned, V: DeserializeOwned> Deserialize<'de> for Node<K, V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Vis<K, V>(PhantomData<fn() -> (K, V)>);
        impl<'de, K: DeserializeOwned, V: DeserializeOwned> serde::de::Visitor<'de> for Vis<K, V> {
            type Value = Node<K, V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a B-tree node")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Node<K, V>, A::Error> {
                use serde::de::Error;
                let missing = || A::Error::custom("truncated B-tree node");
                let tag: u8 = seq.next_element()?.ok_or_else(missing)?;
                match tag {
                    0 => {
                        let next: Option<Oid> = seq.next_element()?.ok_or_else(missing)?;
                        let n: u64 = seq.next_element()?.ok_or_else(missing)?;
                        // Each entry takes at least two bytes: a larger count is garbage.
                        let cap = (n as usize).min(4 * MAX_LEAF);
                        let (mut keys, mut vals) =
                            (Vec::with_capacity(cap), Vec::with_capacity(cap));
                        for _ in 0..n {
                            keys.push(next_part(&mut seq)?);
                            vals.push(next_part(&mut seq)?);
                        }
                        Ok(Node::Leaf { keys, vals, next })
                    }
                    1 => {
                        let first: Oid = seq.next_element()?.ok_or_else(missing)?;
                        let n: u64 = seq.next_element()?.ok_or_else(missing)?;
                        let cap = (n as usize).min(4 * MAX_BRANCH);
                        let mut keys = Vec::with_capacity(cap);
                        let mut children = Vec::with_capacity(cap + 1);
                        children.push(first);
                        for _ in 0..n {
                            keys.push(next_part(&mut seq)?);
                            children.push(next_part(&mut seq)?);
                        }
                        Ok(Node::Branch { keys, children })
                    }
                    t => Err(A::Error::custom(format!("unknown B-tree node tag {t}"))),
                }
            }
        }
        d.deserialize_tuple(usize::MAX, Vis(PhantomData))
    }
}

impl<K, V> ResolveConflict for Node<K, V>
where
    K: Ord + Clone + Serialize + DeserializeOwned,
    V: Clone + PartialEq + Serialize + DeserializeOwned,
{
    fn resolve(ancestor: &Self, committed: &Self, mine: &Self) -> Option<Self> {
        let (
            Node::Leaf {
                keys: ak,
                vals: av,
                next: an,
            },
            Node::Leaf {
                keys: ck,
                vals: cv,
                next: cn,
            },
            Node::Leaf {
                keys: mk,
                vals: mv,
                next: mn,
            },
        ) = (ancestor, committed, mine)
        else {
            return None;
        };
        // A split on either side changes `next`: not mergeable.
        if an != cn || an != mn {
            return None;
        }
        let changes = |k: &[K], v: &[V]| -> Vec<(K, Option<V>)> {
            let mut out = Vec::new();
            let (mut i, mut j) = (0, 0);
            while i < ak.len() || j < k.len() {
                match (ak.get(i), k.get(j)) {
                    (Some(a), Some(b)) if a == b => {
                        if av[i] != v[j] {
                            out.push((b.clone(), Some(v[j].clone())));
                        }
                        i += 1;
                        j += 1;
                    }
                    (Some(a), Some(b)) if a < b => {
                        out.push((a.clone(), None));
                        i += 1;
                    }
                    (Some(a), None) => {
                        out.push((a.clone(), None));
                        i += 1;
                    }
                    (_, Some(b)) => {
                        out.push((b.clone(), Some(v[j].clone())));
                        j += 1;
                    }
                    (None, None) => break,
                }
            }
            out
        };
        let theirs = changes(ck, cv);
        let ours = changes(mk, mv);
        // The same key changed on both sides conflicts, even to equal values.
        let mut ti = theirs.iter().map(|(k, _)| k).peekable();
        for (k, _) in &ours {
            while ti.peek().is_some_and(|t| *t < k) {
                ti.next();
            }
            if ti.peek().is_some_and(|t| *t == k) {
                return None;
            }
        }
        let mut keys = ck.clone();
        let mut vals = cv.clone();
        for (k, v) in ours {
            match (keys.binary_search(&k), v) {
                (Ok(i), Some(v)) => vals[i] = v,
                (Ok(i), None) => {
                    keys.remove(i);
                    vals.remove(i);
                }
                (Err(i), Some(v)) => {
                    keys.insert(i, k);
                    vals.insert(i, v);
                }
                (Err(_), None) => return None,
            }
        }
        if keys.len() > MAX_LEAF {
            return None;
        }
        Some(Node::Leaf {
            keys,
            vals,
            next: *cn,
        })
    }
}

/// A handle to a persistent ordered map from `K` to `V`. It is just an object id: copy
/// it, store it inside other objects or under a named root.
///
/// ```
/// use batos_store::{BTree, Db, StoreConfig};
/// let dir = tempfile::tempdir().unwrap();
/// let db = Db::open(dir.path().join("img"), StoreConfig::default()).unwrap();
/// let mut txn = db.begin();
/// let tree: BTree<String, u32> = BTree::named(&mut txn, "ages").unwrap();
/// tree.insert(&mut txn, "ada".into(), 36).unwrap();
/// tree.insert(&mut txn, "alan".into(), 41).unwrap();
/// txn.commit().unwrap();
/// let txn = db.begin();
/// let all: Vec<_> = tree.range(&txn, ..).unwrap().collect::<Result<_, _>>().unwrap();
/// assert_eq!(all, vec![("ada".to_string(), 36), ("alan".to_string(), 41)]);
/// ```
pub struct BTree<K, V> {
    header: Oid,
    _marker: PhantomData<fn() -> (K, V)>,
}

impl<K, V> Clone for BTree<K, V> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K, V> Copy for BTree<K, V> {}
impl<K, V> PartialEq for BTree<K, V> {
    fn eq(&self, o: &Self) -> bool {
        self.header == o.header
    }
}
impl<K, V> Eq for BTree<K, V> {}
impl<K, V> std::fmt::Debug for BTree<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BTree({:#x})", self.header.get())
    }
}
impl<K, V> Serialize for BTree<K, V> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.header.serialize(s)
    }
}
impl<'de, K, V> Deserialize<'de> for BTree<K, V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Ok(BTree::from_oid(Oid::deserialize(d)?))
    }
}

impl<K, V> BTree<K, V> {
    /// The tree whose header object is `oid`.
    pub fn from_oid(oid: Oid) -> Self {
        BTree {
            header: oid,
            _marker: PhantomData,
        }
    }

    /// The header object's id (what to store to refer to the tree).
    pub fn oid(&self) -> Oid {
        self.header
    }
}

/// What happened to a leaf during an insert.
enum LeafInsert<K, V> {
    Replaced(V),
    Inserted,
    /// The leaf overflowed: these entries move to a new right sibling.
    Split {
        keys: Vec<K>,
        vals: Vec<V>,
        next: Option<Oid>,
    },
}

impl<K, V> BTree<K, V>
where
    K: Ord + Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
    V: Clone + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    fn resolver() -> Option<crate::db::Resolver> {
        Some(crate::resolve::resolver_for::<Node<K, V>>())
    }

    /// Creates an empty tree. It is garbage unless something reachable refers to it.
    pub fn create(txn: &mut Txn) -> Result<Self> {
        let leaf: Node<K, V> = Node::Leaf {
            keys: Vec::new(),
            vals: Vec::new(),
            next: None,
        };
        let root = txn.new_oid()?;
        txn.cached_insert(root, leaf, Self::resolver())?;
        let header = txn.new_oid()?;
        txn.cached_insert(header, TreeHeader { root, depth: 0 }, None)?;
        Ok(Self::from_oid(header))
    }

    /// The tree registered under `name` in the root, created there if absent.
    pub fn named(txn: &mut Txn, name: &str) -> Result<Self> {
        if let Some(r) = txn.named_root::<TreeHeader>(name)? {
            return Ok(Self::from_oid(r.oid()));
        }
        let t = Self::create(txn)?;
        txn.set_named_root(name, crate::ids::Ref::<TreeHeader>::from_oid(t.header))?;
        Ok(t)
    }

    fn malformed(&self, oid: Oid) -> StoreError {
        StoreError::Decode {
            oid,
            expected: std::any::type_name::<Self>(),
            detail: "branch node with fewer children than separators".into(),
        }
    }

    /// The leaf that would hold `key`, and the path of (branch oid, child index) to it.
    fn descend(&self, txn: &Txn, key: &K) -> Result<(Oid, Vec<(Oid, usize)>)> {
        let (mut oid, depth) = txn.cached_read(self.header, |h: &TreeHeader| (h.root, h.depth))?;
        let mut path = Vec::with_capacity(depth as usize);
        loop {
            let step = txn.cached_read(oid, |n: &Node<K, V>| match n {
                Node::Branch { keys, children } => {
                    let i = keys.partition_point(|k| k <= key);
                    Some(children.get(i).map(|c| (i, *c)))
                }
                Node::Leaf { .. } => None,
            })?;
            match step {
                None => return Ok((oid, path)),
                Some(None) => return Err(self.malformed(oid)),
                Some(Some((i, child))) => {
                    path.push((oid, i));
                    oid = child;
                }
            }
        }
    }

    /// The value under `key`.
    pub fn get(&self, txn: &Txn, key: &K) -> Result<Option<V>> {
        let (leaf, _) = self.descend(txn, key)?;
        txn.cached_read(leaf, |n: &Node<K, V>| match n {
            Node::Leaf { keys, vals, .. } => keys.binary_search(key).ok().map(|i| vals[i].clone()),
            Node::Branch { .. } => None,
        })
    }

    /// True if `key` is present.
    pub fn contains_key(&self, txn: &Txn, key: &K) -> Result<bool> {
        Ok(self.get(txn, key)?.is_some())
    }

    /// Inserts or replaces; returns the previous value.
    pub fn insert(&self, txn: &mut Txn, key: K, val: V) -> Result<Option<V>> {
        let (leaf, mut path) = self.descend(txn, &key)?;
        // Where the key goes (the leaf does not change before the edit below), unless
        // it is already there with this value: then nothing is written.
        let pos = txn.cached_read(leaf, |n: &Node<K, V>| match n {
            Node::Leaf { keys, vals, .. } => match keys.binary_search(&key) {
                Ok(i) if vals[i] == val => Err(vals[i].clone()),
                pos => Ok(Some(pos)),
            },
            Node::Branch { .. } => Ok(None),
        })?;
        let pos = match pos {
            Err(unchanged) => return Ok(Some(unchanged)),
            Ok(pos) => pos,
        };
        let outcome = txn.cached_edit(leaf, Self::resolver(), |n: &mut Node<K, V>, edits| {
            let Node::Leaf { keys, vals, next } = n else {
                unreachable!("descend ends at a leaf")
            };
            match pos.unwrap_or_else(|| keys.binary_search(&key)) {
                Ok(i) => {
                    edits.set(i, &val);
                    LeafInsert::Replaced(std::mem::replace(&mut vals[i], val))
                }
                Err(i) => {
                    edits.insert(i, &key, &val);
                    keys.insert(i, key);
                    vals.insert(i, val);
                    if keys.len() <= MAX_LEAF {
                        LeafInsert::Inserted
                    } else {
                        let mid = keys.len() / 2;
                        edits.truncate(mid);
                        LeafInsert::Split {
                            keys: keys.split_off(mid),
                            vals: vals.split_off(mid),
                            next: *next,
                        }
                    }
                }
            }
        })?;
        let (rkeys, rvals, rnext) = match outcome {
            LeafInsert::Replaced(old) => return Ok(Some(old)),
            LeafInsert::Inserted => return Ok(None),
            LeafInsert::Split { keys, vals, next } => (keys, vals, next),
        };
        // Split the leaf and carry a separator up.
        let right = txn.new_oid()?;
        let mut sep = rkeys[0].clone();
        txn.cached_insert(
            right,
            Node::Leaf {
                keys: rkeys,
                vals: rvals,
                next: rnext,
            },
            Self::resolver(),
        )?;
        txn.cached_edit(leaf, Self::resolver(), |n: &mut Node<K, V>, edits| {
            if let Node::Leaf { next, .. } = n {
                *next = Some(right);
                edits.set_next(*next);
            }
        })?;
        let mut new_child = right;
        let mut left_child = leaf;
        while let Some((parent, i)) = path.pop() {
            let split =
                txn.cached_edit(parent, Self::resolver(), |n: &mut Node<K, V>, edits| {
                    let Node::Branch { keys, children } = n else {
                        unreachable!("the path holds branches")
                    };
                    // Entry `i` of a branch is separator `i` with the child to its right.
                    edits.insert(i, &sep, &new_child);
                    keys.insert(i, sep.clone());
                    children.insert(i + 1, new_child);
                    if keys.len() <= MAX_BRANCH {
                        return None;
                    }
                    let mid = keys.len() / 2;
                    edits.truncate(mid);
                    let rkeys = keys.split_off(mid + 1);
                    let up = keys.pop().expect("mid < len");
                    let rchildren = children.split_off(mid + 1);
                    Some((up, rkeys, rchildren))
                })?;
            let Some((up, rkeys, rchildren)) = split else {
                return Ok(None);
            };
            let roid = txn.new_oid()?;
            txn.cached_insert(
                roid,
                Node::<K, V>::Branch {
                    keys: rkeys,
                    children: rchildren,
                },
                Self::resolver(),
            )?;
            sep = up;
            new_child = roid;
            left_child = parent;
        }
        // The root split: grow the tree by one level.
        let root = txn.new_oid()?;
        txn.cached_insert(
            root,
            Node::<K, V>::Branch {
                keys: vec![sep],
                children: vec![left_child, new_child],
            },
            Self::resolver(),
        )?;
        txn.cached_write(self.header, None, |h: &mut TreeHeader| {
            h.root = root;
            h.depth += 1;
        })?;
        Ok(None)
    }

    /// Removes `key`; returns its value.
    pub fn remove(&self, txn: &mut Txn, key: &K) -> Result<Option<V>> {
        let (leaf, _) = self.descend(txn, key)?;
        let present = txn.cached_read(leaf, |n: &Node<K, V>| match n {
            Node::Leaf { keys, .. } => keys.binary_search(key).is_ok(),
            Node::Branch { .. } => false,
        })?;
        if !present {
            return Ok(None);
        }
        txn.cached_edit(
            leaf,
            Self::resolver(),
            |n: &mut Node<K, V>, edits| match n {
                Node::Leaf { keys, vals, .. } => keys.binary_search(key).ok().map(|i| {
                    edits.remove(i);
                    keys.remove(i);
                    vals.remove(i)
                }),
                Node::Branch { .. } => None,
            },
        )
    }

    /// Iterates `range` in key order, loading one leaf at a time (leaves read by a scan
    /// are not kept in the transaction's cache, so scans of huge trees stay small).
    pub fn range<'t, R: RangeBounds<K>>(&self, txn: &'t Txn, range: R) -> Result<Range<'t, K, V>> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        let leaf = match &start {
            Bound::Unbounded => {
                let mut oid = txn.cached_read(self.header, |h: &TreeHeader| h.root)?;
                loop {
                    let child = txn.cached_read(oid, |n: &Node<K, V>| match n {
                        Node::Branch { children, .. } => Some(children.first().copied()),
                        Node::Leaf { .. } => None,
                    })?;
                    match child {
                        None => break oid,
                        Some(None) => return Err(self.malformed(oid)),
                        Some(Some(c)) => oid = c,
                    }
                }
            }
            Bound::Included(k) | Bound::Excluded(k) => self.descend(txn, k)?.0,
        };
        let (keys, vals, next) = match txn.get::<Node<K, V>>(leaf)? {
            Node::Leaf { keys, vals, next } => (keys, vals, next),
            Node::Branch { .. } => return Err(self.malformed(leaf)),
        };
        let pos = match &start {
            Bound::Unbounded => 0,
            Bound::Included(k) => keys.partition_point(|x| x < k),
            Bound::Excluded(k) => keys.partition_point(|x| x <= k),
        };
        Ok(Range {
            txn,
            keys: keys.into_iter(),
            vals: vals.into_iter(),
            skip: pos,
            next,
            end,
            done: false,
        })
    }

    /// Iterates every entry in key order.
    pub fn iter<'t>(&self, txn: &'t Txn) -> Result<Range<'t, K, V>> {
        self.range(txn, ..)
    }

    /// Counts the entries (walks every leaf).
    pub fn count(&self, txn: &Txn) -> Result<u64> {
        let mut n = 0;
        for e in self.iter(txn)? {
            e?;
            n += 1;
        }
        Ok(n)
    }
}

/// Iterator over a key range of a [`BTree`]; yields `Result<(K, V)>`.
pub struct Range<'t, K, V> {
    txn: &'t Txn,
    keys: std::vec::IntoIter<K>,
    vals: std::vec::IntoIter<V>,
    skip: usize,
    next: Option<Oid>,
    end: Bound<K>,
    done: bool,
}

impl<K, V> Iterator for Range<'_, K, V>
where
    K: Ord + DeserializeOwned,
    V: DeserializeOwned,
{
    type Item = Result<(K, V)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        while self.skip > 0 {
            self.keys.next();
            self.vals.next();
            self.skip -= 1;
        }
        loop {
            if let (Some(k), Some(v)) = (self.keys.next(), self.vals.next()) {
                let past = match &self.end {
                    Bound::Unbounded => false,
                    Bound::Included(e) => &k > e,
                    Bound::Excluded(e) => &k >= e,
                };
                if past {
                    self.done = true;
                    return None;
                }
                return Some(Ok((k, v)));
            }
            let Some(oid) = self.next.take() else {
                self.done = true;
                return None;
            };
            match self.txn.get::<Node<K, V>>(oid) {
                Ok(Node::Leaf { keys, vals, next }) => {
                    self.keys = keys.into_iter();
                    self.vals = vals.into_iter();
                    self.next = next;
                }
                Ok(Node::Branch { .. }) => {
                    self.done = true;
                    return Some(Err(StoreError::Decode {
                        oid,
                        expected: "B-tree leaf",
                        detail: "leaf chain points at a branch".into(),
                    }));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use crate::delta::{apply, DeltaLog, NodeEdits};
    use crate::ids::Tid;
    use proptest::prelude::*;

    fn leaf_of(entries: Vec<(u16, String)>) -> Node<u16, String> {
        let map: std::collections::BTreeMap<u16, String> = entries.into_iter().collect();
        Node::Leaf {
            keys: map.keys().copied().collect(),
            vals: map.into_values().collect(),
            next: Oid::new(77),
        }
    }

    proptest! {
        /// The store applies recorded edits on bytes; the result must be exactly the
        /// encoding of the leaf the B-tree edited.
        #[test]
        fn recorded_edits_applied_to_the_base_bytes_encode_the_edited_leaf(
            init in proptest::collection::vec((any::<u16>(), ".{0,12}"), 0..40),
            ops in proptest::collection::vec((0u8..5, any::<u16>(), ".{0,300}"), 0..20),
        ) {
            let mut leaf = leaf_of(init);
            let base = encode(&leaf).unwrap().data;
            let mut log = Some(Box::new(DeltaLog {
                base: Tid::FIRST,
                depth: 1,
                type_fp: 0,
                ops: Vec::new(),
                refs: Default::default(),
            }));
            let mut edits = NodeEdits { log: &mut log };
            let Node::Leaf { keys, vals, next } = &mut leaf else { unreachable!() };
            for (op, k, v) in ops {
                if op == 3 {
                    let n = usize::from(k) % (keys.len() + 1);
                    edits.truncate(n);
                    keys.truncate(n);
                    vals.truncate(n);
                    continue;
                }
                if op == 4 {
                    *next = Oid::new(u64::from(k) * 1000);
                    edits.set_next(*next);
                    continue;
                }
                match (op, keys.binary_search(&k)) {
                    (0 | 1, Ok(i)) => {
                        edits.set(i, &v);
                        vals[i] = v;
                    }
                    (0 | 1, Err(i)) => {
                        edits.insert(i, &k, &v);
                        keys.insert(i, k);
                        vals.insert(i, v);
                    }
                    (_, Ok(i)) => {
                        edits.remove(i);
                        keys.remove(i);
                        vals.remove(i);
                    }
                    (_, Err(_)) => {}
                }
            }
            let want = encode(&leaf).unwrap();
            let got = apply(&base, &log.unwrap().ops).unwrap();
            prop_assert_eq!(&got, &want.data);
            let back: Node<u16, String> = decode(Oid::ROOT, want.type_fp, &got).unwrap();
            let (Node::Leaf { keys: k1, vals: v1, next: n1 }, Node::Leaf { keys: k2, vals: v2, next: n2 }) = (&back, &leaf) else {
                unreachable!()
            };
            prop_assert_eq!((k1, v1, n1), (k2, v2, n2));
        }
    }

    proptest! {
        /// The same for branches: separators inserted with the child to their right,
        /// and the truncation of a split.
        #[test]
        fn recorded_branch_edits_encode_the_edited_branch(
            init in proptest::collection::btree_set(any::<u16>(), 0..60),
            ops in proptest::collection::vec((any::<bool>(), any::<u16>(), 1u64..1 << 40), 0..20),
        ) {
            let keys: Vec<u16> = init.into_iter().collect();
            let children = (0..=keys.len() as u64).map(|c| Oid::new(c + 1).unwrap()).collect();
            let mut node: Node<u16, String> = Node::Branch { keys, children };
            let base = encode(&node).unwrap().data;
            let mut log = Some(Box::new(DeltaLog {
                base: Tid::FIRST,
                depth: 1,
                type_fp: 0,
                ops: Vec::new(),
                refs: Default::default(),
            }));
            let mut edits = NodeEdits { log: &mut log };
            let Node::Branch { keys, children } = &mut node else { unreachable!() };
            for (insert, k, c) in ops {
                if insert {
                    let Err(i) = keys.binary_search(&k) else { continue };
                    let child = Oid::new(c).unwrap();
                    edits.insert(i, &k, &child);
                    keys.insert(i, k);
                    children.insert(i + 1, child);
                } else {
                    let n = usize::from(k) % (keys.len() + 1);
                    edits.truncate(n);
                    keys.truncate(n);
                    children.truncate(n + 1);
                }
            }
            let want = encode(&node).unwrap();
            let got = apply(&base, &log.unwrap().ops).unwrap();
            prop_assert_eq!(&got, &want.data);
            let back: Node<u16, String> = decode(Oid::ROOT, want.type_fp, &got).unwrap();
            let (Node::Branch { keys: k1, children: c1 }, Node::Branch { keys: k2, children: c2 }) = (&back, &node) else {
                unreachable!()
            };
            prop_assert_eq!((k1, c1), (k2, c2));
        }
    }

    #[test]
    fn references_inside_leaf_entries_are_collected() {
        let a = Oid::new(5).unwrap();
        let b = Oid::new(9).unwrap();
        let leaf: Node<u32, Oid> = Node::Leaf {
            keys: vec![1, 2],
            vals: vec![b, a],
            next: Oid::new(3),
        };
        let enc = encode(&leaf).unwrap();
        assert_eq!(enc.refs.oids, vec![Oid::new(3).unwrap(), a, b]);
        let mut log = None;
        let mut edits = NodeEdits { log: &mut log };
        edits.insert(0, &0u32, &a);
        assert!(
            log.is_none(),
            "nothing is recorded for a leaf written whole"
        );
        let mut log = Some(Box::new(DeltaLog {
            base: Tid::FIRST,
            depth: 1,
            type_fp: 0,
            ops: Vec::new(),
            refs: Default::default(),
        }));
        NodeEdits { log: &mut log }.insert(0, &0u32, &b);
        assert_eq!(log.unwrap().refs.oids, vec![b]);
    }
}
