//! A bounded cache of decoded object revisions shared by every transaction of a `Db`.
//!
//! It is keyed by `(oid, revision tid)`. A revision never changes once written (pack
//! copies it byte for byte under the same tid), so an entry can never be stale and the
//! cache needs no invalidation: a snapshot finds the revision it may see through the
//! index, then asks the cache for that exact revision. Entries are evicted oldest first.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::ids::{Oid, Tid};

/// A decoded, immutable object revision.
pub(crate) type SharedValue = Arc<dyn Any + Send + Sync>;

/// Decoded revisions kept at most (B-tree nodes: a leaf is up to 32 entries).
pub(crate) const NODE_CACHE_ENTRIES: usize = 16_384;

pub(crate) struct NodeCache {
    map: HashMap<(Oid, Tid), SharedValue>,
    order: VecDeque<(Oid, Tid)>,
    cap: usize,
}

impl NodeCache {
    pub(crate) fn new(cap: usize) -> NodeCache {
        NodeCache {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    pub(crate) fn get(&self, oid: Oid, tid: Tid) -> Option<SharedValue> {
        self.map.get(&(oid, tid)).cloned()
    }

    /// Removes the entry for `(oid, tid)` if it holds `value` (the same allocation), so
    /// that a transaction about to modify its copy can take it without cloning.
    pub(crate) fn take(&mut self, oid: Oid, tid: Tid, value: &SharedValue) -> bool {
        match self.map.get(&(oid, tid)) {
            Some(v) if Arc::ptr_eq(v, value) => {
                self.map.remove(&(oid, tid));
                // `order` keeps the key until it is popped; keep it from growing without
                // bound when entries are taken and re-inserted over and over.
                if self.order.len() > 2 * self.cap.max(16) {
                    let map = &self.map;
                    self.order.retain(|k| map.contains_key(k));
                }
                true
            }
            _ => false,
        }
    }

    pub(crate) fn insert(&mut self, oid: Oid, tid: Tid, value: SharedValue) {
        if self.cap == 0 || self.map.contains_key(&(oid, tid)) {
            return;
        }
        while self.map.len() >= self.cap {
            match self.order.pop_front() {
                Some(k) => {
                    self.map.remove(&k);
                }
                None => break,
            }
        }
        self.map.insert((oid, tid), value);
        self.order.push_back((oid, tid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_oldest_first_and_keeps_the_bound() {
        let mut c = NodeCache::new(2);
        let t = Tid::FIRST;
        let oid = |n| Oid::new(n).expect("non-zero");
        c.insert(oid(1), t, Arc::new(1u32));
        c.insert(oid(2), t, Arc::new(2u32));
        c.insert(oid(3), t, Arc::new(3u32));
        assert!(c.get(oid(1), t).is_none());
        let v = c.get(oid(3), t).expect("newest kept");
        assert_eq!(v.downcast_ref::<u32>(), Some(&3));
        assert_eq!(c.map.len(), 2);
    }

    #[test]
    fn take_removes_only_the_same_value_and_order_stays_bounded() {
        let mut c = NodeCache::new(4);
        let t = Tid::FIRST;
        let oid = |n| Oid::new(n).expect("non-zero");
        let v: SharedValue = Arc::new(1u32);
        c.insert(oid(1), t, v.clone());
        assert!(!c.take(oid(1), t, &(Arc::new(1u32) as SharedValue)));
        assert!(c.take(oid(1), t, &v));
        assert!(c.get(oid(1), t).is_none());
        for i in 0..1000u64 {
            let v: SharedValue = Arc::new(i);
            c.insert(oid(2), Tid::new(i + 1).expect("non-zero"), v.clone());
            assert!(c.take(oid(2), Tid::new(i + 1).expect("non-zero"), &v));
        }
        assert!(
            c.order.len() <= 2 * 16 + 1,
            "order grew to {}",
            c.order.len()
        );
    }
}
