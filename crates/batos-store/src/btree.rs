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

#[derive(Debug, Clone, Serialize, Deserialize)]
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
        let unchanged = txn.cached_read(leaf, |n: &Node<K, V>| match n {
            Node::Leaf { keys, vals, .. } => keys
                .binary_search(&key)
                .ok()
                .filter(|&i| vals[i] == val)
                .map(|i| vals[i].clone()),
            Node::Branch { .. } => None,
        })?;
        if let Some(v) = unchanged {
            return Ok(Some(v));
        }
        let outcome = txn.cached_write(leaf, Self::resolver(), |n: &mut Node<K, V>| {
            let Node::Leaf { keys, vals, next } = n else {
                unreachable!("descend ends at a leaf")
            };
            match keys.binary_search(&key) {
                Ok(i) => LeafInsert::Replaced(std::mem::replace(&mut vals[i], val)),
                Err(i) => {
                    keys.insert(i, key);
                    vals.insert(i, val);
                    if keys.len() <= MAX_LEAF {
                        LeafInsert::Inserted
                    } else {
                        let mid = keys.len() / 2;
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
        txn.cached_write(leaf, Self::resolver(), |n: &mut Node<K, V>| {
            if let Node::Leaf { next, .. } = n {
                *next = Some(right);
            }
        })?;
        let mut new_child = right;
        let mut left_child = leaf;
        while let Some((parent, i)) = path.pop() {
            let split = txn.cached_write(parent, Self::resolver(), |n: &mut Node<K, V>| {
                let Node::Branch { keys, children } = n else {
                    unreachable!("the path holds branches")
                };
                keys.insert(i, sep.clone());
                children.insert(i + 1, new_child);
                if keys.len() <= MAX_BRANCH {
                    return None;
                }
                let mid = keys.len() / 2;
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
        txn.cached_write(leaf, Self::resolver(), |n: &mut Node<K, V>| match n {
            Node::Leaf { keys, vals, .. } => keys.binary_search(key).ok().map(|i| {
                keys.remove(i);
                vals.remove(i)
            }),
            Node::Branch { .. } => None,
        })
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
