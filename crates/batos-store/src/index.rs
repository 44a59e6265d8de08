//! The index: where each object revision sits in the log.
//!
//! It has two levels:
//!
//! - a **checkpoint file** (`index/<gen>.ckpt`): every revision up to some record of the
//!   log, sorted by (oid ascending, tid descending), in 4 KiB blocks that each carry a
//!   CRC-32, plus a fence of each block's first key. It is memory-mapped, never loaded:
//!   opening it reads a header and checks the fence, so open time does not grow with the
//!   object count. A block is checked the first time a lookup touches it;
//! - an in-memory **overlay** of the revisions committed since that record (the log tail
//!   is replayed into it on open).
//!
//! A checkpoint names the record it covers (offset, end, tid, CRC). It is trusted only if
//! that record is in the log, intact; otherwise it is ignored and the index is rebuilt
//! from the log (it is a cache of the log, never the source of truth). Checkpoints are
//! written to a temp file, fsynced, renamed and the directory fsynced, so a crash leaves
//! the old one or the new one.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::error::{Result, StoreError};
use crate::ids::{Oid, Tid};
use crate::log::{crc, EntryLoc};

const MAGIC: &[u8; 8] = b"BATOSIDX";
const VERSION: u32 = 1;
/// Size of the header page and of every block.
pub(crate) const BLOCK: usize = 4096;
const ENTRY: usize = 28;
/// Revisions per block: a 4-byte count, entries, and a 4-byte CRC at the end.
pub(crate) const PER_BLOCK: usize = (BLOCK - 8) / ENTRY;
const FENCE: usize = 16;

/// The log record a checkpoint (or the index) covers up to, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Covers {
    pub start: u64,
    pub end: u64,
    pub tid: Tid,
    pub crc: u32,
}

/// Sort key: oid ascending, then tid descending, so "newest revision <= t" is the first
/// key at or after `key(oid, t)`.
fn key(oid: Oid, tid: u64) -> u128 {
    (u128::from(oid.get()) << 64) | u128::from(!tid)
}

/// One indexed revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rev {
    pub oid: Oid,
    pub tid: Tid,
    pub loc: EntryLoc,
}

impl Rev {
    fn key(&self) -> u128 {
        key(self.oid, self.tid.get())
    }
}

/// What a checkpoint header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CkptHeader {
    pub gen: u64,
    pub covers: Covers,
    pub next_oid: u64,
    pub n_entries: u64,
    pub n_blocks: u64,
    fence_crc: u32,
}

impl CkptHeader {
    fn encode(&self) -> [u8; BLOCK] {
        let mut b = [0u8; BLOCK];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.gen.to_le_bytes());
        b[24..32].copy_from_slice(&self.covers.start.to_le_bytes());
        b[32..40].copy_from_slice(&self.covers.end.to_le_bytes());
        b[40..48].copy_from_slice(&self.covers.tid.get().to_le_bytes());
        b[48..52].copy_from_slice(&self.covers.crc.to_le_bytes());
        b[56..64].copy_from_slice(&self.next_oid.to_le_bytes());
        b[64..72].copy_from_slice(&self.n_entries.to_le_bytes());
        b[72..80].copy_from_slice(&self.n_blocks.to_le_bytes());
        b[80..84].copy_from_slice(&self.fence_crc.to_le_bytes());
        let c = crc(&b[0..124]);
        b[124..128].copy_from_slice(&c.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> std::result::Result<CkptHeader, String> {
        if b.len() < 128 {
            return Err("shorter than its header".into());
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if &b[0..8] != MAGIC {
            return Err("bad magic".into());
        }
        if u32_at(124) != crc(&b[0..124]) {
            return Err("header checksum mismatch".into());
        }
        if u32_at(8) != VERSION {
            return Err(format!("unsupported version {}", u32_at(8)));
        }
        if u32_at(12) as usize != BLOCK {
            return Err(format!("block size {} (expected {BLOCK})", u32_at(12)));
        }
        Ok(CkptHeader {
            gen: u64_at(16),
            covers: Covers {
                start: u64_at(24),
                end: u64_at(32),
                tid: Tid::new(u64_at(40)).ok_or("covers tid 0")?,
                crc: u32_at(48),
            },
            next_oid: u64_at(56),
            n_entries: u64_at(64),
            n_blocks: u64_at(72),
            fence_crc: u32_at(80),
        })
    }
}

fn expected_len(n_blocks: u64) -> Option<u64> {
    n_blocks
        .checked_mul((BLOCK + FENCE) as u64)?
        .checked_add(BLOCK as u64)
}

/// Writes a checkpoint of `revs` (sorted by key, no duplicates) to `path` durably: temp
/// file, fsync, rename, fsync of the directory.
pub(crate) fn write_checkpoint(
    path: &Path,
    gen: u64,
    covers: Covers,
    next_oid: u64,
    revs: impl Iterator<Item = Result<Rev>>,
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension("ckpt.tmp");
    let file =
        File::create(&tmp).map_err(|e| StoreError::io("create index checkpoint", &tmp, e))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let werr = |e| StoreError::io("write index checkpoint", &tmp, e);
    out.write_all(&[0u8; BLOCK]).map_err(werr)?; // header, written last
    let mut fence: Vec<u8> = Vec::new();
    let mut block = [0u8; BLOCK];
    let mut in_block = 0usize;
    let mut n_entries = 0u64;
    let mut n_blocks = 0u64;
    let mut prev: Option<u128> = None;
    let flush_block = |block: &mut [u8; BLOCK], n: usize, out: &mut BufWriter<File>| {
        block[0..4].copy_from_slice(&(n as u32).to_le_bytes());
        let c = crc(&block[0..BLOCK - 4]);
        block[BLOCK - 4..].copy_from_slice(&c.to_le_bytes());
        let r = out.write_all(&block[..]);
        *block = [0u8; BLOCK];
        r
    };
    for rev in revs {
        let rev = rev?;
        let k = rev.key();
        if prev.is_some_and(|p| p >= k) {
            return Err(StoreError::IndexInconsistent {
                detail: format!(
                    "index checkpoint input out of order at {} revision {}",
                    rev.oid, rev.tid
                ),
            });
        }
        prev = Some(k);
        if in_block == 0 {
            fence.extend_from_slice(&rev.oid.get().to_le_bytes());
            fence.extend_from_slice(&rev.tid.get().to_le_bytes());
        }
        let o = 4 + in_block * ENTRY;
        block[o..o + 8].copy_from_slice(&rev.oid.get().to_le_bytes());
        block[o + 8..o + 16].copy_from_slice(&rev.tid.get().to_le_bytes());
        block[o + 16..o + 24].copy_from_slice(&rev.loc.offset.to_le_bytes());
        block[o + 24..o + 28].copy_from_slice(&rev.loc.len.to_le_bytes());
        in_block += 1;
        n_entries += 1;
        if in_block == PER_BLOCK {
            flush_block(&mut block, in_block, &mut out).map_err(werr)?;
            n_blocks += 1;
            in_block = 0;
        }
    }
    if in_block > 0 {
        flush_block(&mut block, in_block, &mut out).map_err(werr)?;
        n_blocks += 1;
    }
    out.write_all(&fence).map_err(werr)?;
    let header = CkptHeader {
        gen,
        covers,
        next_oid,
        n_entries,
        n_blocks,
        fence_crc: crc(&fence),
    };
    let file = out.into_inner().map_err(|e| werr(e.into_error()))?;
    std::os::unix::fs::FileExt::write_all_at(&file, &header.encode(), 0).map_err(werr)?;
    file.sync_all()
        .map_err(|e| StoreError::io("fsync index checkpoint", &tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| StoreError::io("rename index checkpoint", path, e))?;
    crate::blob::fsync_dir(dir)
}

/// An open, memory-mapped checkpoint.
pub(crate) struct Checkpoint {
    path: PathBuf,
    map: memmap2::Mmap,
    pub header: CkptHeader,
    /// One bit per block: its CRC has been checked.
    checked: Vec<AtomicU64>,
    /// The file's inode, to set aside this file (not a newer one) when it is damaged.
    ino: u64,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish()
    }
}

/// Why a checkpoint file was not usable (it is then ignored and the index rebuilt).
#[derive(Debug)]
pub(crate) enum CkptOpen {
    Ok(Checkpoint),
    Missing,
    Unusable(String),
}

impl Checkpoint {
    /// Opens `path` and checks its header, length and fence (16 bytes per block of 146
    /// revisions); blocks are checked lazily.
    pub fn open(path: &Path) -> Result<CkptOpen> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(CkptOpen::Missing),
            Err(e) => return Err(StoreError::io("open index checkpoint", path, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| StoreError::io("stat index checkpoint", path, e))?;
        let len = meta.len();
        if len < BLOCK as u64 {
            return Ok(CkptOpen::Unusable(format!("only {len} bytes")));
        }
        let map = crate::sys::map_readonly(&file)
            .map_err(|e| StoreError::io("map index checkpoint", path, e))?;
        let header = match CkptHeader::decode(&map[..BLOCK]) {
            Ok(h) => h,
            Err(d) => return Ok(CkptOpen::Unusable(d)),
        };
        if expected_len(header.n_blocks) != Some(len) {
            return Ok(CkptOpen::Unusable(format!(
                "{len} bytes, header says {} blocks",
                header.n_blocks
            )));
        }
        let max_entries = header.n_blocks * PER_BLOCK as u64;
        if header.n_entries > max_entries || header.n_entries + (PER_BLOCK as u64) <= max_entries {
            return Ok(CkptOpen::Unusable(format!(
                "{} entries in {} blocks",
                header.n_entries, header.n_blocks
            )));
        }
        let fence_at = BLOCK + header.n_blocks as usize * BLOCK;
        if crc(&map[fence_at..]) != header.fence_crc {
            return Ok(CkptOpen::Unusable("fence checksum mismatch".into()));
        }
        let words = (header.n_blocks as usize).div_ceil(64);
        Ok(CkptOpen::Ok(Checkpoint {
            path: path.to_path_buf(),
            map,
            header,
            checked: (0..words).map(|_| AtomicU64::new(0)).collect(),
            ino: std::os::unix::fs::MetadataExt::ino(&meta),
        }))
    }

    fn n_blocks(&self) -> usize {
        self.header.n_blocks as usize
    }

    fn fence_key(&self, b: usize) -> u128 {
        let at = BLOCK + self.n_blocks() * BLOCK + b * FENCE;
        let f = &self.map[at..at + FENCE];
        let oid = u64::from_le_bytes(f[0..8].try_into().expect("8 bytes"));
        let tid = u64::from_le_bytes(f[8..16].try_into().expect("8 bytes"));
        (u128::from(oid) << 64) | u128::from(!tid)
    }

    /// The error for a damaged block. The file is also renamed aside (if it is still the
    /// current checkpoint), so that the next open rebuilds the index from the log.
    fn corrupt(&self, b: usize, detail: String) -> StoreError {
        let same = std::fs::metadata(&self.path)
            .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == self.ino);
        if same {
            let aside = self.path.with_extension("ckpt.corrupt");
            match std::fs::rename(&self.path, &aside) {
                Ok(()) => {
                    tracing::error!(path = %self.path.display(), block = b, %detail, "damaged index checkpoint set aside; the next open rebuilds the index from the log")
                }
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "could not set aside a damaged index checkpoint")
                }
            }
        }
        StoreError::CorruptIndex {
            path: self.path.clone(),
            offset: (BLOCK + b * BLOCK) as u64,
            detail,
        }
    }

    /// The entries of block `b`, checked.
    fn block(&self, b: usize) -> Result<&[u8]> {
        let at = BLOCK + b * BLOCK;
        let blk = &self.map[at..at + BLOCK];
        let (word, bit) = (b / 64, 1u64 << (b % 64));
        if self.checked[word].load(Ordering::Relaxed) & bit == 0 {
            let want = u32::from_le_bytes(blk[BLOCK - 4..].try_into().expect("4 bytes"));
            if crc(&blk[..BLOCK - 4]) != want {
                return Err(self.corrupt(b, "block checksum mismatch".into()));
            }
            let n = u32::from_le_bytes(blk[0..4].try_into().expect("4 bytes")) as usize;
            let full = b + 1 < self.n_blocks();
            if n == 0 || n > PER_BLOCK || (full && n != PER_BLOCK) {
                return Err(self.corrupt(b, format!("block claims {n} entries")));
            }
            let first = decode_entry(&blk[4..4 + ENTRY]).map(|r| r.key());
            if first != Some(self.fence_key(b)) {
                return Err(self.corrupt(b, "first key disagrees with the fence".into()));
            }
            self.checked[word].fetch_or(bit, Ordering::Relaxed);
        }
        let n = u32::from_le_bytes(blk[0..4].try_into().expect("4 bytes")) as usize;
        Ok(&blk[4..4 + n * ENTRY])
    }

    fn entry_in(&self, b: usize, entries: &[u8], i: usize) -> Result<Rev> {
        decode_entry(&entries[i * ENTRY..(i + 1) * ENTRY])
            .ok_or_else(|| self.corrupt(b, format!("entry {i} has oid or tid 0")))
    }

    /// The first revision whose key is >= `k`.
    fn seek(&self, k: u128) -> Result<Option<(usize, usize)>> {
        let nb = self.n_blocks();
        if nb == 0 {
            return Ok(None);
        }
        // Blocks whose first key is <= k.
        let (mut lo, mut hi) = (0usize, nb);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.fence_key(mid) <= k {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        let b = lo.saturating_sub(1);
        let entries = self.block(b)?;
        let n = entries.len() / ENTRY;
        let (mut lo, mut hi) = (0usize, n);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.entry_in(b, entries, mid)?.key() < k {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if lo < n {
            Ok(Some((b, lo)))
        } else if b + 1 < nb {
            Ok(Some((b + 1, 0)))
        } else {
            Ok(None)
        }
    }

    /// The newest revision of `oid` with tid <= `upto`.
    pub fn lookup(&self, oid: Oid, upto: u64) -> Result<Option<Rev>> {
        let Some((b, i)) = self.seek(key(oid, upto))? else {
            return Ok(None);
        };
        let r = self.entry_in(b, self.block(b)?, i)?;
        Ok((r.oid == oid).then_some(r))
    }

    /// Every revision of `oid`, newest first.
    pub fn revisions(&self, oid: Oid, out: &mut Vec<Rev>) -> Result<()> {
        let Some((mut b, mut i)) = self.seek(key(oid, u64::MAX))? else {
            return Ok(());
        };
        loop {
            let entries = self.block(b)?;
            while i < entries.len() / ENTRY {
                let r = self.entry_in(b, entries, i)?;
                if r.oid != oid {
                    return Ok(());
                }
                out.push(r);
                i += 1;
            }
            b += 1;
            i = 0;
            if b >= self.n_blocks() {
                return Ok(());
            }
        }
    }

    /// Every revision in key order (each block checked).
    pub fn iter(&self) -> impl Iterator<Item = Result<Rev>> + '_ {
        (0..self.n_blocks()).flat_map(move |b| {
            let items: Vec<Result<Rev>> = match self.block(b) {
                Ok(entries) => (0..entries.len() / ENTRY)
                    .map(|i| self.entry_in(b, entries, i))
                    .collect(),
                Err(e) => vec![Err(e)],
            };
            items
        })
    }
}

fn decode_entry(e: &[u8]) -> Option<Rev> {
    Some(Rev {
        oid: Oid::new(u64::from_le_bytes(e[0..8].try_into().ok()?))?,
        tid: Tid::new(u64::from_le_bytes(e[8..16].try_into().ok()?))?,
        loc: EntryLoc {
            offset: u64::from_le_bytes(e[16..24].try_into().ok()?),
            len: u32::from_le_bytes(e[24..28].try_into().ok()?),
        },
    })
}

/// Revisions committed since the checkpoint, per oid, oldest first.
#[derive(Default)]
struct Overlay {
    map: HashMap<Oid, Vec<(Tid, EntryLoc)>>,
    len: usize,
}

struct State {
    base: Option<Arc<Checkpoint>>,
    overlay: Overlay,
}

/// The index of one log segment: a checkpoint plus the overlay. Lookups take a read
/// lock; a commit takes the write lock for the time of its hash-map inserts.
pub(crate) struct Index {
    state: RwLock<State>,
    /// The checkpoint file of this segment.
    pub path: PathBuf,
}

impl Index {
    /// An index with `base` (if any) and an empty overlay.
    pub fn new(path: PathBuf, base: Option<Checkpoint>) -> Index {
        Index {
            state: RwLock::new(State {
                base: base.map(Arc::new),
                overlay: Overlay::default(),
            }),
            path,
        }
    }

    /// Adds the revisions of one record (all with the same, newest, tid).
    pub fn insert(&self, tid: Tid, revs: impl IntoIterator<Item = (Oid, EntryLoc)>) {
        let mut s = self.state.write();
        for (oid, loc) in revs {
            s.overlay.map.entry(oid).or_default().push((tid, loc));
            s.overlay.len += 1;
        }
    }

    /// Revisions in the overlay (not yet in a checkpoint).
    pub fn overlay_len(&self) -> usize {
        self.state.read().overlay.len
    }

    /// Revisions in the checkpoint plus the overlay.
    pub fn len(&self) -> u64 {
        let s = self.state.read();
        s.base.as_ref().map_or(0, |b| b.header.n_entries) + s.overlay.len as u64
    }

    /// The oid high-water mark the checkpoint recorded.
    pub fn base_next_oid(&self) -> Option<u64> {
        self.state.read().base.as_ref().map(|b| b.header.next_oid)
    }

    /// Forgets the checkpoint (it disagrees with the log); the overlay must be empty.
    pub fn drop_base(&self) {
        self.state.write().base = None;
    }

    /// The record the checkpoint covers, if there is one.
    pub fn base_covers(&self) -> Option<Covers> {
        self.state.read().base.as_ref().map(|b| b.header.covers)
    }

    /// The newest revision of `oid` with tid <= `upto`.
    pub fn lookup(&self, oid: Oid, upto: u64) -> Result<Option<(Tid, EntryLoc)>> {
        let base = {
            let s = self.state.read();
            if let Some(v) = s.overlay.map.get(&oid) {
                if let Some(&(t, l)) = v.iter().rev().find(|(t, _)| t.get() <= upto) {
                    return Ok(Some((t, l)));
                }
            }
            match &s.base {
                Some(b) => b.clone(),
                None => return Ok(None),
            }
        };
        Ok(base.lookup(oid, upto)?.map(|r| (r.tid, r.loc)))
    }

    /// Every revision of `oid`, oldest first.
    pub fn revisions(&self, oid: Oid) -> Result<Vec<(Tid, EntryLoc)>> {
        let (base, recent) = {
            let s = self.state.read();
            (
                s.base.clone(),
                s.overlay.map.get(&oid).cloned().unwrap_or_default(),
            )
        };
        let mut out = Vec::new();
        if let Some(b) = base {
            b.revisions(oid, &mut out)?;
        }
        let mut v: Vec<(Tid, EntryLoc)> = out.into_iter().rev().map(|r| (r.tid, r.loc)).collect();
        v.extend(recent);
        Ok(v)
    }

    /// Writes a checkpoint of every revision with tid <= `covers.tid` and makes it the
    /// base; the overlay keeps only newer revisions. The caller guarantees that the log
    /// is durable through `covers` and that no other checkpoint of this index runs.
    pub fn checkpoint(&self, gen: u64, covers: Covers, next_oid: u64) -> Result<()> {
        let (base, mut recent) = {
            let s = self.state.read();
            let mut recent: Vec<Rev> = Vec::with_capacity(s.overlay.len);
            for (&oid, v) in &s.overlay.map {
                for &(tid, loc) in v {
                    if tid <= covers.tid {
                        recent.push(Rev { oid, tid, loc });
                    }
                }
            }
            (s.base.clone(), recent)
        };
        recent.sort_unstable_by_key(Rev::key);
        let merged = merge(
            base.as_deref()
                .map(|b| Box::new(b.iter()) as Box<dyn Iterator<Item = _>>),
            recent.into_iter(),
        );
        write_checkpoint(&self.path, gen, covers, next_oid, merged)?;
        let fresh = match Checkpoint::open(&self.path)? {
            CkptOpen::Ok(c) => c,
            CkptOpen::Missing => {
                return Err(StoreError::CorruptIndex {
                    path: self.path.clone(),
                    offset: 0,
                    detail: "checkpoint vanished right after it was written".into(),
                })
            }
            CkptOpen::Unusable(d) => {
                return Err(StoreError::CorruptIndex {
                    path: self.path.clone(),
                    offset: 0,
                    detail: format!("checkpoint unreadable right after it was written: {d}"),
                })
            }
        };
        let mut s = self.state.write();
        s.base = Some(Arc::new(fresh));
        let mut removed = 0usize;
        s.overlay.map.retain(|_, v| {
            let before = v.len();
            v.retain(|(t, _)| *t > covers.tid);
            removed += before - v.len();
            !v.is_empty()
        });
        s.overlay.len -= removed;
        Ok(())
    }

    /// Checks every block of the checkpoint and returns the number of revisions in it
    /// with tid <= `upto`, plus those of the overlay.
    pub fn count_checked(&self, upto: Tid) -> Result<u64> {
        let (base, overlay) = {
            let s = self.state.read();
            let o = s
                .overlay
                .map
                .values()
                .map(|v| v.iter().filter(|(t, _)| *t <= upto).count() as u64)
                .sum::<u64>();
            (s.base.clone(), o)
        };
        let mut n = overlay;
        if let Some(b) = base {
            for r in b.iter() {
                if r?.tid <= upto {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

/// Merges two key-ordered streams (the checkpoint's and the overlay's; they share no
/// key, since the overlay only holds revisions after the checkpoint).
fn merge<'a>(
    base: Option<Box<dyn Iterator<Item = Result<Rev>> + 'a>>,
    recent: impl Iterator<Item = Rev> + 'a,
) -> impl Iterator<Item = Result<Rev>> + 'a {
    let mut a = base
        .unwrap_or_else(|| Box::new(std::iter::empty()))
        .peekable();
    let mut b = recent.peekable();
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(Err(_)), _) => a.next(),
        (Some(Ok(x)), Some(y)) => {
            if x.key() <= y.key() {
                a.next()
            } else {
                b.next().map(Ok)
            }
        }
        (Some(Ok(_)), None) => a.next(),
        (None, Some(_)) => b.next().map(Ok),
        (None, None) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn oid(n: u64) -> Oid {
        Oid::new(n).expect("non-zero")
    }

    fn covers(tid: u64) -> Covers {
        Covers {
            start: 64,
            end: 128,
            tid: Tid::new(tid).expect("non-zero"),
            crc: 7,
        }
    }

    /// Model: (oid, tid) -> loc.
    type Model = BTreeMap<(u64, u64), EntryLoc>;

    fn model_lookup(m: &Model, o: u64, upto: u64) -> Option<(Tid, EntryLoc)> {
        m.range((o, 1)..=(o, upto))
            .next_back()
            .map(|(&(_, t), &l)| (Tid::new(t).expect("non-zero"), l))
    }

    fn check_against(idx: &Index, m: &Model, max_oid: u64, max_tid: u64) {
        for o in 1..=max_oid + 1 {
            let revs: Vec<(Tid, EntryLoc)> = m
                .range((o, 1)..=(o, u64::MAX))
                .map(|(&(_, t), &l)| (Tid::new(t).expect("non-zero"), l))
                .collect();
            assert_eq!(idx.revisions(oid(o)).expect("revisions"), revs, "oid {o}");
            for upto in [1, (max_tid / 2).max(1), max_tid, u64::MAX - 1] {
                assert_eq!(
                    idx.lookup(oid(o), upto).expect("lookup"),
                    model_lookup(m, o, upto),
                    "oid {o} upto {upto}"
                );
            }
        }
        assert_eq!(idx.len(), m.len() as u64);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Random commits (each a set of oids at the next tid) with checkpoints at random
        /// points: the index answers like a sorted map at every step, and a reopened
        /// checkpoint plus a replay of the rest answers the same.
        #[test]
        fn index_matches_a_sorted_map(
            commits in prop::collection::vec(
                (prop::collection::btree_set(1u64..400, 1..40), any::<bool>()),
                1..60,
            )
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("1.ckpt");
            let idx = Index::new(path.clone(), None);
            let mut m = Model::new();
            let mut off = 64u64;
            let mut last_ckpt: Option<u64> = None;
            for (i, (oids, ckpt)) in commits.iter().enumerate() {
                let tid = Tid::new(i as u64 + 1).expect("non-zero");
                let mut revs = Vec::new();
                for &o in oids {
                    let loc = EntryLoc { offset: off, len: (o as u32) + 10 };
                    off += 100;
                    m.insert((o, tid.get()), loc);
                    revs.push((oid(o), loc));
                }
                idx.insert(tid, revs);
                if *ckpt {
                    idx.checkpoint(1, covers(tid.get()), 5, ).expect("checkpoint");
                    last_ckpt = Some(tid.get());
                    prop_assert_eq!(idx.overlay_len(), 0);
                }
            }
            let max_tid = commits.len() as u64;
            check_against(&idx, &m, 400, max_tid);
            prop_assert_eq!(idx.count_checked(Tid::new(max_tid).expect("t")).expect("count"), m.len() as u64);
            // Reopen: the checkpoint plus the revisions after it.
            match Checkpoint::open(&path).expect("open") {
                CkptOpen::Ok(c) => {
                    prop_assert_eq!(Some(c.header.covers.tid.get()), last_ckpt);
                    let re = Index::new(path.clone(), Some(c));
                    for (&(o, t), &l) in &m {
                        if Some(t) > last_ckpt {
                            re.insert(Tid::new(t).expect("t"), [(oid(o), l)]);
                        }
                    }
                    check_against(&re, &m, 400, max_tid);
                }
                CkptOpen::Missing => prop_assert!(last_ckpt.is_none()),
                CkptOpen::Unusable(d) => prop_assert!(false, "unusable: {}", d),
            }
        }

        /// Any single damaged byte of a checkpoint is caught: at open (header, length,
        /// fence) or as a typed error when its block is read; never a wrong answer.
        #[test]
        fn damaged_checkpoint_is_never_believed(
            n in 1usize..700,
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("1.ckpt");
            let revs: Vec<Rev> = (0..n as u64)
                .map(|i| Rev { oid: oid(i / 3 + 1), tid: Tid::new(100 - i % 3).expect("t"), loc: EntryLoc { offset: i * 50, len: 9 } })
                .collect();
            write_checkpoint(&path, 1, covers(100), 9, revs.clone().into_iter().map(Ok)).expect("write");
            let mut bytes = std::fs::read(&path).expect("read");
            let i = at.index(bytes.len());
            bytes[i] ^= flip;
            std::fs::write(&path, &bytes).expect("write back");
            let c = match Checkpoint::open(&path).expect("open") {
                CkptOpen::Ok(c) => c,
                CkptOpen::Unusable(_) => return Ok(()),
                CkptOpen::Missing => { prop_assert!(false, "missing"); unreachable!() }
            };
            // Opened despite the damage: the damage is in a block's unused tail (never
            // read, harmless) or is reported when the block is read.
            let got: Result<Vec<Rev>> = c.iter().collect();
            match got {
                Ok(v) => prop_assert_eq!(v, revs),
                Err(StoreError::CorruptIndex { .. }) => {}
                Err(e) => prop_assert!(false, "unexpected error {}", e),
            }
        }
    }

    #[test]
    fn truncated_or_empty_checkpoint_is_unusable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("1.ckpt");
        let revs = (1..=500u64).map(|i| {
            Ok(Rev {
                oid: oid(i),
                tid: Tid::FIRST,
                loc: EntryLoc { offset: i, len: 1 },
            })
        });
        write_checkpoint(&path, 1, covers(1), 2, revs).expect("write");
        let full = std::fs::read(&path).expect("read");
        for cut in [0, 100, BLOCK, BLOCK + 10, full.len() - 1] {
            std::fs::write(&path, &full[..cut]).expect("write");
            assert!(
                matches!(
                    Checkpoint::open(&path).expect("open"),
                    CkptOpen::Unusable(_)
                ),
                "cut at {cut}"
            );
        }
        std::fs::remove_file(&path).expect("rm");
        assert!(matches!(
            Checkpoint::open(&path).expect("open"),
            CkptOpen::Missing
        ));
    }
}
