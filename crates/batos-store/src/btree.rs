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
pub const MAX_LEAF: usize = 64;
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

impl<K, V> BTree<K, V>
where
    K: Ord + Clone + Serialize + DeserializeOwned,
    V: Clone + PartialEq + Serialize + DeserializeOwned,
{
    /// Creates an empty tree. It is garbage unless something reachable refers to it.
    pub fn create(txn: &mut Txn) -> Result<Self> {
        let leaf: Node<K, V> = Node::Leaf {
            keys: Vec::new(),
            vals: Vec::new(),
            next: None,
        };
        let root = txn.insert_new_resolvable(&leaf)?;
        let header = txn.insert_new(&TreeHeader {
            root: root.oid(),
            depth: 0,
        })?;
        Ok(Self::from_oid(header.oid()))
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

    fn node(&self, txn: &Txn, oid: Oid) -> Result<Node<K, V>> {
        txn.get(oid)
    }

    fn put_node(&self, txn: &mut Txn, oid: Oid, node: &Node<K, V>) -> Result<()> {
        txn.put_resolvable(oid, node)
    }

    /// The leaf that would hold `key`, with the path of (branch oid, branch, child index).
    #[allow(clippy::type_complexity)]
    fn descend(
        &self,
        txn: &Txn,
        key: &K,
    ) -> Result<(Oid, Node<K, V>, Vec<(Oid, Node<K, V>, usize)>)> {
        let h: TreeHeader = txn.get(self.header)?;
        let mut oid = h.root;
        let mut path = Vec::with_capacity(h.depth as usize);
        loop {
            let node = self.node(txn, oid)?;
            match &node {
                Node::Branch { keys, children } => {
                    let i = keys.partition_point(|k| k <= key);
                    let child = *children.get(i).ok_or_else(|| self.malformed(oid))?;
                    path.push((oid, node, i));
                    oid = child;
                }
                Node::Leaf { .. } => return Ok((oid, node, path)),
            }
        }
    }

    fn malformed(&self, oid: Oid) -> StoreError {
        StoreError::Decode {
            oid,
            expected: std::any::type_name::<Self>(),
            detail: "branch node with fewer children than separators".into(),
        }
    }

    /// The value under `key`.
    pub fn get(&self, txn: &Txn, key: &K) -> Result<Option<V>> {
        let (_, leaf, _) = self.descend(txn, key)?;
        let Node::Leaf { keys, vals, .. } = leaf else {
            unreachable!("descend ends at a leaf")
        };
        Ok(keys.binary_search(key).ok().map(|i| vals[i].clone()))
    }

    /// True if `key` is present.
    pub fn contains_key(&self, txn: &Txn, key: &K) -> Result<bool> {
        Ok(self.get(txn, key)?.is_some())
    }

    /// Inserts or replaces; returns the previous value.
    pub fn insert(&self, txn: &mut Txn, key: K, val: V) -> Result<Option<V>> {
        let (leaf_oid, leaf, mut path) = self.descend(txn, &key)?;
        let Node::Leaf {
            mut keys,
            mut vals,
            next,
        } = leaf
        else {
            unreachable!("descend ends at a leaf")
        };
        match keys.binary_search(&key) {
            Ok(i) => {
                if vals[i] == val {
                    return Ok(Some(val));
                }
                let old = std::mem::replace(&mut vals[i], val);
                self.put_node(txn, leaf_oid, &Node::Leaf { keys, vals, next })?;
                return Ok(Some(old));
            }
            Err(i) => {
                keys.insert(i, key);
                vals.insert(i, val);
            }
        }
        if keys.len() <= MAX_LEAF {
            self.put_node(txn, leaf_oid, &Node::Leaf { keys, vals, next })?;
            return Ok(None);
        }
        // Split the leaf and carry a separator up.
        let mid = keys.len() / 2;
        let rkeys = keys.split_off(mid);
        let rvals = vals.split_off(mid);
        let right_oid = txn.new_oid()?;
        let mut sep = rkeys[0].clone();
        self.put_node(
            txn,
            right_oid,
            &Node::Leaf {
                keys: rkeys,
                vals: rvals,
                next,
            },
        )?;
        self.put_node(
            txn,
            leaf_oid,
            &Node::Leaf {
                keys,
                vals,
                next: Some(right_oid),
            },
        )?;
        let mut new_child = right_oid;
        let mut left_child = leaf_oid;
        while let Some((poid, pnode, i)) = path.pop() {
            let Node::Branch {
                mut keys,
                mut children,
            } = pnode
            else {
                unreachable!("path holds branches")
            };
            keys.insert(i, sep);
            children.insert(i + 1, new_child);
            if keys.len() <= MAX_BRANCH {
                self.put_node(txn, poid, &Node::Branch { keys, children })?;
                return Ok(None);
            }
            let mid = keys.len() / 2;
            let rkeys = keys.split_off(mid + 1);
            let up = keys.pop().expect("mid < len");
            let rchildren = children.split_off(mid + 1);
            let roid = txn.new_oid()?;
            self.put_node(
                txn,
                roid,
                &Node::Branch {
                    keys: rkeys,
                    children: rchildren,
                },
            )?;
            self.put_node(txn, poid, &Node::Branch { keys, children })?;
            sep = up;
            new_child = roid;
            left_child = poid;
        }
        // The root split: grow the tree by one level.
        let mut h: TreeHeader = txn.get(self.header)?;
        let root = txn.new_oid()?;
        self.put_node(
            txn,
            root,
            &Node::Branch {
                keys: vec![sep],
                children: vec![left_child, new_child],
            },
        )?;
        h.root = root;
        h.depth += 1;
        txn.put(self.header, &h)?;
        Ok(None)
    }

    /// Removes `key`; returns its value.
    pub fn remove(&self, txn: &mut Txn, key: &K) -> Result<Option<V>> {
        let (leaf_oid, leaf, _) = self.descend(txn, key)?;
        let Node::Leaf {
            mut keys,
            mut vals,
            next,
        } = leaf
        else {
            unreachable!("descend ends at a leaf")
        };
        match keys.binary_search(key) {
            Ok(i) => {
                keys.remove(i);
                let old = vals.remove(i);
                self.put_node(txn, leaf_oid, &Node::Leaf { keys, vals, next })?;
                Ok(Some(old))
            }
            Err(_) => Ok(None),
        }
    }

    /// Iterates `range` in key order, loading one leaf at a time.
    pub fn range<'t, R: RangeBounds<K>>(&self, txn: &'t Txn, range: R) -> Result<Range<'t, K, V>> {
        let start = range.start_bound().cloned();
        let end = range.end_bound().cloned();
        let (keys, vals, next) = match &start {
            Bound::Unbounded => {
                let h: TreeHeader = txn.get(self.header)?;
                let mut oid = h.root;
                loop {
                    match self.node(txn, oid)? {
                        Node::Branch { children, .. } => {
                            oid = *children.first().ok_or_else(|| self.malformed(oid))?
                        }
                        Node::Leaf { keys, vals, next } => break (keys, vals, next),
                    }
                }
            }
            Bound::Included(k) | Bound::Excluded(k) => {
                let (_, leaf, _) = self.descend(txn, k)?;
                let Node::Leaf { keys, vals, next } = leaf else {
                    unreachable!("descend ends at a leaf")
                };
                (keys, vals, next)
            }
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
