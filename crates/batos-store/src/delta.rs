//! Delta revisions of B-tree nodes.
//!
//! A transaction that changes a few entries of a committed node writes only those
//! changes (a *delta* against the revision it read) instead of the whole node. The log
//! then holds, per node, a full revision followed by a bounded chain of deltas; reading a
//! revision applies its chain to the full one. Materialising needs no types: a node's
//! encoding is a head plus a list of length-prefixed entries (see `btree.rs`), and a
//! delta is a list of positional edits of that list, so the store applies them on bytes.
//! Resolvers, raw reads and `verify` see full states.
//!
//! Node encoding (bincode-compatible, written by `Node`'s `Serialize`):
//! - leaf: `0u8`, `next: Option<Oid>`, `count: varint`, then `count` times
//!   `key: varint len + bincode(K)`, `value: varint len + bincode(V)`;
//! - branch: `1u8`, `first child: Oid`, `count: varint`, then `count` times
//!   `key`, `child` (length-prefixed as above): entry `i` is separator `i` and the child
//!   to its right.
//!
//! Delta data: a sequence of edits, each `tag u8` then
//! - `1` insert at `i`: `i: varint`, key, value (length-prefixed, as in the node);
//! - `2` replace the value at `i`: `i: varint`, value;
//! - `3` remove at `i`: `i: varint`;
//! - `4` keep the first `i` entries: `i: varint`;
//! - `5` set a leaf's `next`: `Option<Oid>`.

use serde::Serialize;

use crate::ids::{collecting, Refs};

/// Longest chain of deltas after a full revision: the next change writes the leaf whole.
/// Bounds the reads of a cold revision (1 + MAX_CHAIN entries).
pub(crate) const MAX_CHAIN: u8 = 16;

const LEAF_TAG: u8 = 0;
const BRANCH_TAG: u8 = 1;
const OP_INSERT: u8 = 1;
const OP_SET: u8 = 2;
const OP_REMOVE: u8 = 3;
const OP_TRUNCATE: u8 = 4;
const OP_NEXT: u8 = 5;

/// `v` in bincode's varint encoding (what `serialize_u64` writes): the bytes and their
/// count.
fn varint(v: u64) -> ([u8; 9], usize) {
    let mut b = [0u8; 9];
    let n = if v < 251 {
        b[0] = v as u8;
        1
    } else if v <= u64::from(u16::MAX) {
        b[0] = 251;
        b[1..3].copy_from_slice(&(v as u16).to_le_bytes());
        3
    } else if v <= u64::from(u32::MAX) {
        b[0] = 252;
        b[1..5].copy_from_slice(&(v as u32).to_le_bytes());
        5
    } else {
        b[0] = 253;
        b[1..9].copy_from_slice(&v.to_le_bytes());
        9
    };
    (b, n)
}

/// Appends `v` in bincode's varint encoding.
fn put_varint(out: &mut Vec<u8>, v: u64) {
    let (b, n) = varint(v);
    out.extend_from_slice(&b[..n]);
}

/// Reads a bincode varint (u64 range) at `*pos`.
fn get_varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let first = *b.get(*pos)?;
    *pos += 1;
    let mut take = |n: usize| -> Option<u64> {
        let s = b.get(*pos..*pos + n)?;
        *pos += n;
        let mut buf = [0u8; 8];
        buf[..n].copy_from_slice(s);
        Some(u64::from_le_bytes(buf))
    };
    match first {
        0..=250 => Some(u64::from(first)),
        251 => take(2),
        252 => take(4),
        253 => take(8),
        _ => None,
    }
}

/// A length-prefixed byte string at `*pos` (prefix included in the returned slice).
fn get_bytes<'a>(b: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let start = *pos;
    let len = usize::try_from(get_varint(b, pos)?).ok()?;
    let end = pos.checked_add(len)?;
    b.get(*pos..end)?;
    *pos = end;
    Some(&b[start..end])
}

/// A node's encoding split into its head (tag, and `next` or the first child) and its
/// entries.
struct NodeParts<'a> {
    head: &'a [u8],
    entries: Vec<(&'a [u8], &'a [u8])>,
}

/// An `Option<Oid>` as bincode writes it, at `*pos`.
fn get_option_oid(b: &[u8], pos: &mut usize) -> Option<()> {
    match b.get(*pos)? {
        0 => *pos += 1,
        1 => {
            *pos += 1;
            get_varint(b, pos)?;
        }
        _ => return None,
    }
    Some(())
}

fn parse_node(b: &[u8]) -> Result<NodeParts<'_>, String> {
    let bad = |what: &str| format!("delta base is not a B-tree node: {what}");
    let mut pos = 1;
    match b.first() {
        Some(&LEAF_TAG) => get_option_oid(b, &mut pos).ok_or_else(|| bad("bad next"))?,
        Some(&BRANCH_TAG) => {
            get_varint(b, &mut pos).ok_or_else(|| bad("truncated first child"))?;
        }
        _ => return Err(bad("wrong tag")),
    }
    let head = &b[..pos];
    let n = get_varint(b, &mut pos).ok_or_else(|| bad("truncated count"))?;
    if n > b.len() as u64 {
        return Err(bad("implausible count"));
    }
    let mut entries = Vec::with_capacity(n as usize + 4);
    for _ in 0..n {
        let k = get_bytes(b, &mut pos).ok_or_else(|| bad("truncated key"))?;
        let v = get_bytes(b, &mut pos).ok_or_else(|| bad("truncated value"))?;
        entries.push((k, v));
    }
    if pos != b.len() {
        return Err(bad("trailing bytes"));
    }
    Ok(NodeParts { head, entries })
}

/// Applies the edits `ops` to the node encoded in `base`; returns the new node's
/// encoding.
pub(crate) fn apply(base: &[u8], ops: &[u8]) -> Result<Vec<u8>, String> {
    let NodeParts { head, mut entries } = parse_node(base)?;
    let mut head = std::borrow::Cow::Borrowed(head);
    let bad = |what: &str| format!("malformed delta: {what}");
    let mut pos = 0;
    while pos < ops.len() {
        let tag = ops[pos];
        pos += 1;
        if tag == OP_NEXT {
            let start = pos;
            get_option_oid(ops, &mut pos).ok_or_else(|| bad("bad next"))?;
            if head[0] != LEAF_TAG {
                return Err(bad("next of a branch"));
            }
            let mut h = vec![LEAF_TAG];
            h.extend_from_slice(&ops[start..pos]);
            head = std::borrow::Cow::Owned(h);
            continue;
        }
        let i = get_varint(ops, &mut pos).ok_or_else(|| bad("truncated index"))?;
        let i = usize::try_from(i).map_err(|_| bad("index out of range"))?;
        match tag {
            OP_INSERT if i <= entries.len() => {
                let k = get_bytes(ops, &mut pos).ok_or_else(|| bad("truncated key"))?;
                let v = get_bytes(ops, &mut pos).ok_or_else(|| bad("truncated value"))?;
                entries.insert(i, (k, v));
            }
            OP_SET if i < entries.len() => {
                entries[i].1 = get_bytes(ops, &mut pos).ok_or_else(|| bad("truncated value"))?;
            }
            OP_REMOVE if i < entries.len() => {
                entries.remove(i);
            }
            OP_TRUNCATE if i <= entries.len() => entries.truncate(i),
            OP_INSERT | OP_SET | OP_REMOVE | OP_TRUNCATE => return Err(bad("index out of range")),
            _ => return Err(bad("unknown edit")),
        }
    }
    let body: usize = entries.iter().map(|(k, v)| k.len() + v.len()).sum();
    let mut out = Vec::with_capacity(head.len() + 9 + body);
    out.extend_from_slice(&head);
    put_varint(&mut out, entries.len() as u64);
    for (k, v) in &entries {
        out.extend_from_slice(k);
        out.extend_from_slice(v);
    }
    Ok(out)
}

/// Appends `value` as a length-prefixed bincode encoding (a leaf's key or value).
fn put_encoded<T: Serialize>(
    out: &mut Vec<u8>,
    value: &T,
) -> Result<(), bincode::error::EncodeError> {
    let start = out.len();
    bincode::serde::encode_into_std_write(value, out, bincode::config::standard())?;
    // Slide the encoding over to make room for its length (keys and values are small).
    let (len, n) = varint((out.len() - start) as u64);
    out.splice(start..start, len[..n].iter().copied());
    Ok(())
}

/// The edits a transaction made to one committed node, recorded as it makes them.
#[derive(Debug, Clone)]
pub(crate) struct DeltaLog {
    /// The committed revision the edits apply to.
    pub base: crate::ids::Tid,
    /// Deltas between the last full revision and the one this log will write.
    pub depth: u8,
    pub type_fp: u64,
    pub ops: Vec<u8>,
    /// What the recorded keys and values refer to.
    pub refs: Refs,
}

/// Records a transaction's edits to one node, or nothing when the node will be written
/// whole (it is new, its chain is at its limit, or it changed in a way edits do not
/// describe).
pub(crate) struct NodeEdits<'a> {
    pub(crate) log: &'a mut Option<Box<DeltaLog>>,
}

impl NodeEdits<'_> {
    fn record(&mut self, f: impl FnOnce(&mut Vec<u8>) -> Result<(), bincode::error::EncodeError>) {
        let Some(log) = self.log.as_mut() else {
            return;
        };
        let (res, refs) = collecting(|| f(&mut log.ops));
        match res {
            Ok(()) => {
                log.refs.oids.extend(refs.oids);
                log.refs.blobs.extend(refs.blobs);
            }
            // Fall back to a full write, which reports the encoding error itself.
            Err(_) => *self.log = None,
        }
    }

    /// The entry `(key, value)` was inserted at position `i`.
    pub(crate) fn insert<K: Serialize, V: Serialize>(&mut self, i: usize, key: &K, value: &V) {
        self.record(|ops| {
            ops.push(OP_INSERT);
            put_varint(ops, i as u64);
            put_encoded(ops, key)?;
            put_encoded(ops, value)
        });
    }

    /// The value at position `i` was replaced by `value`.
    pub(crate) fn set<V: Serialize>(&mut self, i: usize, value: &V) {
        self.record(|ops| {
            ops.push(OP_SET);
            put_varint(ops, i as u64);
            put_encoded(ops, value)
        });
    }

    /// The entry at position `i` was removed.
    pub(crate) fn remove(&mut self, i: usize) {
        self.record(|ops| {
            ops.push(OP_REMOVE);
            put_varint(ops, i as u64);
            Ok(())
        });
    }

    /// Entries from position `len` on were removed.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.record(|ops| {
            ops.push(OP_TRUNCATE);
            put_varint(ops, len as u64);
            Ok(())
        });
    }

    /// A leaf's `next` was set.
    pub(crate) fn set_next(&mut self, next: Option<crate::ids::Oid>) {
        self.record(|ops| {
            ops.push(OP_NEXT);
            bincode::serde::encode_into_std_write(next, ops, bincode::config::standard())
                .map(|_| ())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_match_bincode() {
        for v in [0u64, 1, 250, 251, 65_535, 65_536, u32::MAX as u64, u64::MAX] {
            let mut mine = Vec::new();
            put_varint(&mut mine, v);
            let theirs =
                bincode::serde::encode_to_vec(v, bincode::config::standard()).expect("encodes");
            assert_eq!(mine, theirs, "{v}");
            let mut pos = 0;
            assert_eq!(get_varint(&mine, &mut pos), Some(v));
            assert_eq!(pos, mine.len());
        }
    }

    #[test]
    fn malformed_input_is_an_error_not_a_panic() {
        let leaf = [LEAF_TAG, 0, 1, 1, b'a', 1, b'b'];
        assert!(apply(&leaf, &[]).is_ok());
        for ops in [
            &[OP_INSERT, 5, 1, b'a', 1, b'b'][..],
            &[OP_SET, 1, 1, b'x'],
            &[OP_REMOVE, 1],
            &[OP_INSERT, 0, 9],
            &[9, 0],
            &[OP_REMOVE],
            &[OP_TRUNCATE, 2],
            &[OP_NEXT, 7],
        ] {
            assert!(apply(&leaf, ops).is_err(), "{ops:?}");
        }
        let branch = [BRANCH_TAG, 5, 0];
        assert!(apply(&branch, &[OP_TRUNCATE, 0]).is_ok());
        assert!(apply(&branch, &[OP_NEXT, 0]).is_err());
        for base in [
            &[2u8, 0, 0][..],
            &[BRANCH_TAG],
            &[LEAF_TAG, 2],
            &[LEAF_TAG, 0, 2, 1, b'a'],
            &[],
        ] {
            assert!(apply(base, &[]).is_err(), "{base:?}");
        }
    }
}
