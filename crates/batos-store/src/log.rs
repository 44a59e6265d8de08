//! The commit log: the source of truth of the image.
//!
//! A segment file starts with a 64-byte header and holds commit records back to back.
//! Every record and every object entry inside it carries a CRC-32. A record also says up
//! to which offset the log was durable (fsynced) when it was written, so recovery can tell
//! a torn, never-acknowledged tail from damage to acknowledged data.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::codec::Encoded;
use crate::error::{Result, StoreError};
use crate::ids::{BlobId, Oid, Tid};

pub(crate) const SEG_MAGIC: &[u8; 8] = b"BATOSLOG";
/// On-disk format this build writes and reads; an image of another version is refused
/// with [`StoreError::UnsupportedVersion`](crate::StoreError::UnsupportedVersion).
pub const FORMAT_VERSION: u32 = 1;
pub(crate) const SEG_HEADER_LEN: u64 = 64;
const REC_MAGIC: u32 = 0xB47C_0317;
const REC_HEADER_LEN: usize = 28;
/// Largest commit record (object state only; blobs live in their own files).
pub(crate) const MAX_RECORD: u64 = 1 << 30;

pub(crate) fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Header of a log segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SegmentHeader {
    pub gen: u64,
    /// Snapshots older than this were packed away.
    pub pack_horizon: Option<Tid>,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEG_HEADER_LEN as usize] {
        let mut b = [0u8; SEG_HEADER_LEN as usize];
        b[0..8].copy_from_slice(SEG_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[12..20].copy_from_slice(&self.gen.to_le_bytes());
        b[20..28].copy_from_slice(&self.pack_horizon.map_or(0, Tid::get).to_le_bytes());
        let c = crc(&b[0..60]);
        b[60..64].copy_from_slice(&c.to_le_bytes());
        b
    }

    pub fn read(file: &File, path: &Path) -> Result<SegmentHeader> {
        let mut b = [0u8; SEG_HEADER_LEN as usize];
        file.read_exact_at(&mut b, 0)
            .map_err(|e| StoreError::io("read segment header", path, e))?;
        let bad = |detail: &str| StoreError::CorruptRecord {
            path: path.to_path_buf(),
            offset: 0,
            tid: None,
            detail: format!("segment header: {detail}"),
        };
        if &b[0..8] != SEG_MAGIC {
            return Err(bad("bad magic"));
        }
        if u32::from_le_bytes(b[60..64].try_into().expect("4 bytes")) != crc(&b[0..60]) {
            return Err(bad("checksum mismatch"));
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(StoreError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        Ok(SegmentHeader {
            gen: u64::from_le_bytes(b[12..20].try_into().expect("8 bytes")),
            pack_horizon: Tid::new(u64::from_le_bytes(b[20..28].try_into().expect("8 bytes"))),
        })
    }
}

/// A blob created by a commit (its file was fsynced before the record was written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NewBlob {
    pub id: BlobId,
    pub len: u64,
    pub hash: [u8; 32],
}

/// One object revision inside a record, as parsed.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub oid: Oid,
    pub tid: Tid,
    pub type_fp: u64,
    pub refs: Vec<Oid>,
    pub blobs: Vec<BlobId>,
    pub data: Vec<u8>,
}

/// Where an entry sits in a segment (what the index stores).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct EntryLoc {
    pub offset: u64,
    pub len: u32,
}

/// A parsed, checksum-verified commit record.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    pub tid: Tid,
    pub durable_upto: u64,
    pub timestamp_us: u64,
    pub next_oid: u64,
    /// Entries with their location (absolute offsets in the segment).
    pub entries: Vec<(EntryLoc, Entry)>,
    pub new_blobs: Vec<NewBlob>,
    pub len: u64,
    pub crc: u32,
}

/// Builds a record. Entries are given as raw entry bytes (see [`encode_entry`]).
pub(crate) struct RecordBuilder {
    buf: Vec<u8>,
    n_entries: u32,
    entry_offsets: Vec<(Oid, u64, u32)>,
}

pub(crate) fn encode_entry(oid: Oid, tid: Tid, enc: &Encoded) -> Vec<u8> {
    let mut e = Vec::with_capacity(32 + enc.data.len() + 8 * enc.refs.oids.len());
    e.extend_from_slice(&oid.get().to_le_bytes());
    e.extend_from_slice(&tid.get().to_le_bytes());
    e.extend_from_slice(&enc.type_fp.to_le_bytes());
    e.extend_from_slice(&(enc.refs.oids.len() as u32).to_le_bytes());
    for r in &enc.refs.oids {
        e.extend_from_slice(&r.get().to_le_bytes());
    }
    e.extend_from_slice(&(enc.refs.blobs.len() as u32).to_le_bytes());
    for b in &enc.refs.blobs {
        e.extend_from_slice(&b.0.to_le_bytes());
    }
    e.extend_from_slice(&(enc.data.len() as u32).to_le_bytes());
    e.extend_from_slice(&enc.data);
    let c = crc(&e);
    e.extend_from_slice(&c.to_le_bytes());
    e
}

impl RecordBuilder {
    pub fn new(tid: Tid, durable_upto: u64, timestamp_us: u64, next_oid: u64) -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(&REC_MAGIC.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes()); // length, patched in finish
        buf.extend_from_slice(&tid.get().to_le_bytes());
        buf.extend_from_slice(&durable_upto.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes()); // header crc, patched in finish
        buf.extend_from_slice(&timestamp_us.to_le_bytes());
        buf.extend_from_slice(&next_oid.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes()); // entry count, patched in finish
        RecordBuilder {
            buf,
            n_entries: 0,
            entry_offsets: Vec::new(),
        }
    }

    /// Reserves room for `bytes` more bytes (avoids regrowing a large record).
    pub fn reserve(&mut self, bytes: usize) {
        self.buf.reserve(bytes);
    }

    /// Appends the entry for `oid` at `tid`, encoded in place (the same bytes as
    /// [`encode_entry`], without an intermediate buffer).
    pub fn push_encoded(&mut self, oid: Oid, tid: Tid, enc: &Encoded) {
        let len_at = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_le_bytes()); // entry length, patched below
        let off = self.buf.len();
        let b = &mut self.buf;
        b.extend_from_slice(&oid.get().to_le_bytes());
        b.extend_from_slice(&tid.get().to_le_bytes());
        b.extend_from_slice(&enc.type_fp.to_le_bytes());
        b.extend_from_slice(&(enc.refs.oids.len() as u32).to_le_bytes());
        for r in &enc.refs.oids {
            b.extend_from_slice(&r.get().to_le_bytes());
        }
        b.extend_from_slice(&(enc.refs.blobs.len() as u32).to_le_bytes());
        for x in &enc.refs.blobs {
            b.extend_from_slice(&x.0.to_le_bytes());
        }
        b.extend_from_slice(&(enc.data.len() as u32).to_le_bytes());
        b.extend_from_slice(&enc.data);
        let c = crc(&b[off..]);
        b.extend_from_slice(&c.to_le_bytes());
        let len = (b.len() - off) as u32;
        b[len_at..off].copy_from_slice(&len.to_le_bytes());
        self.entry_offsets.push((oid, off as u64, len));
        self.n_entries += 1;
    }

    /// Appends raw entry bytes for `oid`.
    pub fn push_entry(&mut self, oid: Oid, entry: &[u8]) {
        self.buf
            .extend_from_slice(&(entry.len() as u32).to_le_bytes());
        let off = self.buf.len() as u64;
        self.buf.extend_from_slice(entry);
        self.entry_offsets.push((oid, off, entry.len() as u32));
        self.n_entries += 1;
    }

    pub fn encoded_len(&self) -> u64 {
        self.buf.len() as u64
    }

    /// Finishes the record: returns its bytes and each entry's (oid, offset in record, len).
    pub fn finish(mut self, new_blobs: &[NewBlob]) -> (Vec<u8>, Vec<(Oid, u64, u32)>) {
        let n = self.n_entries;
        self.buf[44..48].copy_from_slice(&n.to_le_bytes());
        self.buf
            .extend_from_slice(&(new_blobs.len() as u32).to_le_bytes());
        for b in new_blobs {
            self.buf.extend_from_slice(&b.id.0.to_le_bytes());
            self.buf.extend_from_slice(&b.len.to_le_bytes());
            self.buf.extend_from_slice(&b.hash);
        }
        let total = self.buf.len() + 4;
        self.buf[4..8].copy_from_slice(&(total as u32).to_le_bytes());
        let hc = crc(&self.buf[0..24]);
        self.buf[24..28].copy_from_slice(&hc.to_le_bytes());
        let c = crc(&self.buf);
        self.buf.extend_from_slice(&c.to_le_bytes());
        (self.buf, self.entry_offsets)
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.b.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u128(&mut self) -> Option<u128> {
        Some(u128::from_le_bytes(self.take(16)?.try_into().ok()?))
    }
}

/// Parses and checks one entry (the bytes after its length prefix).
pub(crate) fn parse_entry(bytes: &[u8]) -> std::result::Result<Entry, String> {
    if bytes.len() < 4 {
        return Err("entry shorter than its checksum".into());
    }
    let (body, tail) = bytes.split_at(bytes.len() - 4);
    let want = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
    if crc(body) != want {
        return Err("entry checksum mismatch".into());
    }
    let mut c = Cursor { b: body, pos: 0 };
    let malformed = || "malformed entry".to_string();
    let oid = Oid::new(c.u64().ok_or_else(malformed)?).ok_or("entry with oid 0")?;
    let tid = Tid::new(c.u64().ok_or_else(malformed)?).ok_or("entry with tid 0")?;
    let type_fp = c.u64().ok_or_else(malformed)?;
    let n_refs = c.u32().ok_or_else(malformed)? as usize;
    if n_refs > body.len() / 8 {
        return Err(malformed());
    }
    let mut refs = Vec::with_capacity(n_refs);
    for _ in 0..n_refs {
        refs.push(Oid::new(c.u64().ok_or_else(malformed)?).ok_or("reference to oid 0")?);
    }
    let n_blobs = c.u32().ok_or_else(malformed)? as usize;
    if n_blobs > body.len() / 16 {
        return Err(malformed());
    }
    let mut blobs = Vec::with_capacity(n_blobs);
    for _ in 0..n_blobs {
        blobs.push(BlobId(c.u128().ok_or_else(malformed)?));
    }
    let dlen = c.u32().ok_or_else(malformed)? as usize;
    let data = c.take(dlen).ok_or_else(malformed)?.to_vec();
    if c.pos != body.len() {
        return Err(malformed());
    }
    Ok(Entry {
        oid,
        tid,
        type_fp,
        refs,
        blobs,
        data,
    })
}

/// Why a record could not be read at some offset.
#[derive(Debug)]
pub(crate) enum ReadOutcome {
    Record(Record),
    /// Clean end of data (end of file, or the start of a zero-filled region).
    End,
    /// Something that is not a valid record starts here.
    Bad {
        tid: Option<Tid>,
        detail: String,
    },
}

/// Parses a record from the 28-byte header's length, given the whole record bytes.
fn parse_record(buf: &[u8], seg_offset: u64) -> std::result::Result<Record, String> {
    let total = buf.len();
    let (body, tail) = buf.split_at(total - 4);
    let want = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
    let got = crc(body);
    if got != want {
        return Err("record checksum mismatch".into());
    }
    let mut c = Cursor { b: body, pos: 0 };
    let malformed = || "malformed record".to_string();
    c.take(8).ok_or_else(malformed)?; // magic + length, already checked
    let tid = Tid::new(c.u64().ok_or_else(malformed)?).ok_or("record with tid 0")?;
    let durable_upto = c.u64().ok_or_else(malformed)?;
    c.u32().ok_or_else(malformed)?; // header crc, already checked
    let timestamp_us = c.u64().ok_or_else(malformed)?;
    let next_oid = c.u64().ok_or_else(malformed)?;
    let n = c.u32().ok_or_else(malformed)? as usize;
    if n > body.len() / 4 {
        return Err(malformed());
    }
    let mut entries = Vec::with_capacity(n);
    for _ in 0..n {
        let elen = c.u32().ok_or_else(malformed)?;
        let off = c.pos;
        let eb = c.take(elen as usize).ok_or_else(malformed)?;
        let e = parse_entry(eb)?;
        if e.tid != tid {
            return Err(format!(
                "entry for {} carries tid {} in record {tid}",
                e.oid, e.tid
            ));
        }
        entries.push((
            EntryLoc {
                offset: seg_offset + off as u64,
                len: elen,
            },
            e,
        ));
    }
    let nb = c.u32().ok_or_else(malformed)? as usize;
    if nb > body.len() / 56 {
        return Err(malformed());
    }
    let mut new_blobs = Vec::with_capacity(nb);
    for _ in 0..nb {
        let id = BlobId(c.u128().ok_or_else(malformed)?);
        let len = c.u64().ok_or_else(malformed)?;
        let hash: [u8; 32] = c.take(32).ok_or_else(malformed)?.try_into().expect("32");
        new_blobs.push(NewBlob { id, len, hash });
    }
    if c.pos != body.len() {
        return Err(malformed());
    }
    Ok(Record {
        tid,
        durable_upto,
        timestamp_us,
        next_oid,
        entries,
        new_blobs,
        len: total as u64,
        crc: want,
    })
}

/// Checks a record header; returns (total length, tid) if it is plausible.
fn check_header(h: &[u8; REC_HEADER_LEN]) -> std::result::Result<(u64, Option<Tid>), String> {
    let magic = u32::from_le_bytes(h[0..4].try_into().expect("4"));
    if magic != REC_MAGIC {
        return Err(format!("bad record magic {magic:#010x}"));
    }
    let hc = u32::from_le_bytes(h[24..28].try_into().expect("4"));
    if hc != crc(&h[0..24]) {
        return Err("record header checksum mismatch".into());
    }
    let len = u64::from(u32::from_le_bytes(h[4..8].try_into().expect("4")));
    let tid = Tid::new(u64::from_le_bytes(h[8..16].try_into().expect("8")));
    if len < REC_HEADER_LEN as u64 + 4 + 4 + 4 || len > MAX_RECORD {
        return Err(format!("implausible record length {len}"));
    }
    Ok((len, tid))
}

/// Sequential reader over a segment (used by replay, verify and pack).
pub(crate) struct SegmentReader<'f> {
    r: BufReader<&'f File>,
    pos: u64,
    file_len: u64,
}

impl<'f> SegmentReader<'f> {
    pub fn new(file: &'f File, path: &Path, start: u64) -> Result<Self> {
        let file_len = file
            .metadata()
            .map_err(|e| StoreError::io("stat segment", path, e))?
            .len();
        let mut r = BufReader::with_capacity(1 << 20, file);
        r.seek(SeekFrom::Start(start))
            .map_err(|e| StoreError::io("seek segment", path, e))?;
        Ok(SegmentReader {
            r,
            pos: start,
            file_len,
        })
    }

    pub fn pos(&self) -> u64 {
        self.pos
    }

    pub fn file_len(&self) -> u64 {
        self.file_len
    }

    /// Reads the record at the current position; advances past it when valid.
    pub fn next(&mut self, path: &Path) -> Result<ReadOutcome> {
        if self.pos >= self.file_len {
            return Ok(ReadOutcome::End);
        }
        if self.file_len - self.pos < REC_HEADER_LEN as u64 {
            return Ok(ReadOutcome::Bad {
                tid: None,
                detail: "partial record header at end of file".into(),
            });
        }
        let mut h = [0u8; REC_HEADER_LEN];
        self.r
            .read_exact(&mut h)
            .map_err(|e| StoreError::io("read record", path, e))?;
        if h.iter().all(|&b| b == 0) {
            // Rewind so the caller's position still names this offset.
            self.r
                .seek_relative(-(REC_HEADER_LEN as i64))
                .map_err(|e| StoreError::io("seek segment", path, e))?;
            return Ok(ReadOutcome::Bad {
                tid: None,
                detail: "zeroed record header".into(),
            });
        }
        let (len, tid) = match check_header(&h) {
            Ok(v) => v,
            Err(detail) => {
                self.r
                    .seek_relative(-(REC_HEADER_LEN as i64))
                    .map_err(|e| StoreError::io("seek segment", path, e))?;
                return Ok(ReadOutcome::Bad { tid: None, detail });
            }
        };
        if self.pos + len > self.file_len {
            self.r
                .seek_relative(-(REC_HEADER_LEN as i64))
                .map_err(|e| StoreError::io("seek segment", path, e))?;
            return Ok(ReadOutcome::Bad {
                tid,
                detail: format!(
                    "record of {len} bytes runs past the end of the file ({} bytes left)",
                    self.file_len - self.pos
                ),
            });
        }
        let mut buf = vec![0u8; len as usize];
        buf[..REC_HEADER_LEN].copy_from_slice(&h);
        self.r
            .read_exact(&mut buf[REC_HEADER_LEN..])
            .map_err(|e| StoreError::io("read record", path, e))?;
        match parse_record(&buf, self.pos) {
            Ok(rec) => {
                self.pos += len;
                Ok(ReadOutcome::Record(rec))
            }
            Err(detail) => {
                self.r
                    .seek_relative(-(len as i64))
                    .map_err(|e| StoreError::io("seek segment", path, e))?;
                Ok(ReadOutcome::Bad { tid, detail })
            }
        }
    }
}

/// Reads one record at `offset` by positioned reads (used to validate the index's
/// checkpoint against the log).
pub(crate) fn read_record_at(file: &File, path: &Path, offset: u64) -> Result<Option<Record>> {
    let mut h = [0u8; REC_HEADER_LEN];
    if file.read_exact_at(&mut h, offset).is_err() {
        return Ok(None);
    }
    let Ok((len, _)) = check_header(&h) else {
        return Ok(None);
    };
    let mut buf = vec![0u8; len as usize];
    match file.read_exact_at(&mut buf, offset) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(StoreError::io("read record", path, e)),
    }
    Ok(parse_record(&buf, offset).ok())
}

/// Whether the record at `offset` has this `len`, `tid` and record CRC, checking only its
/// header (magic, header CRC) and its last four bytes: O(1) whatever the record's size.
/// Used to trust an index checkpoint; the record's body is checked by point reads (each
/// entry's CRC) and by `verify`.
pub(crate) fn record_matches_at(
    file: &File,
    path: &Path,
    offset: u64,
    len: u64,
    tid: Tid,
    record_crc: u32,
) -> Result<bool> {
    let mut h = [0u8; REC_HEADER_LEN];
    let mut tail = [0u8; 4];
    for (buf, at) in [
        (&mut h[..], offset),
        (&mut tail[..], (offset + len).saturating_sub(4)),
    ] {
        match file.read_exact_at(buf, at) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => return Err(StoreError::io("read record", path, e)),
        }
    }
    Ok(match check_header(&h) {
        Ok((l, t)) => l == len && t == Some(tid) && u32::from_le_bytes(tail) == record_crc,
        Err(_) => false,
    })
}

/// After an invalid record at `bad`, looks for a later valid record whose writer knew the
/// log to be durable past `bad`. Finding one means acknowledged data is damaged.
pub(crate) fn later_acknowledged_record(
    file: &File,
    path: &Path,
    bad: u64,
    file_len: u64,
) -> Result<Option<(u64, Tid)>> {
    const WIN: usize = 8 << 20;
    let magic = REC_MAGIC.to_le_bytes();
    let mut start = bad + 1;
    let mut buf = vec![0u8; WIN];
    while start < file_len {
        let n = ((file_len - start) as usize).min(WIN);
        file.read_exact_at(&mut buf[..n], start)
            .map_err(|e| StoreError::io("scan segment tail", path, e))?;
        let mut i = 0;
        while i + 4 <= n {
            if buf[i..i + 4] == magic {
                let off = start + i as u64;
                if let Some(rec) = read_record_at(file, path, off)? {
                    if rec.durable_upto > bad {
                        return Ok(Some((off, rec.tid)));
                    }
                }
            }
            i += 1;
        }
        // Overlap windows by 3 bytes so a magic split across windows is still seen.
        start += (n.saturating_sub(3)).max(1) as u64;
    }
    Ok(None)
}

/// Reads and checks one entry at a known location.
pub(crate) fn read_entry(
    file: &File,
    path: &Path,
    loc: EntryLoc,
    oid: Oid,
    tid: Tid,
) -> Result<Entry> {
    let mut buf = vec![0u8; loc.len as usize];
    let corrupt = |detail: String| StoreError::CorruptObject {
        oid,
        tid,
        path: path.to_path_buf(),
        offset: loc.offset,
        detail,
    };
    file.read_exact_at(&mut buf, loc.offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt("entry runs past the end of the segment".into())
        } else {
            StoreError::io("read object", path, e)
        }
    })?;
    let e = parse_entry(&buf).map_err(corrupt)?;
    if e.oid != oid || e.tid != tid {
        return Err(corrupt(format!(
            "index points at {} revision {} instead",
            e.oid, e.tid
        )));
    }
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Refs;

    #[test]
    fn entries_encoded_in_place_equal_encode_entry() {
        let oid = Oid::new(7).expect("non-zero");
        let tid = Tid::new(9).expect("non-zero");
        let enc = Encoded {
            type_fp: 0xABCD,
            refs: Refs {
                oids: vec![Oid::new(3).expect("non-zero")],
                blobs: vec![BlobId(5)],
            },
            data: b"state bytes".to_vec(),
        };
        let mut a = RecordBuilder::new(tid, 64, 1, 10);
        a.push_entry(oid, &encode_entry(oid, tid, &enc));
        let mut b = RecordBuilder::new(tid, 64, 1, 10);
        b.push_encoded(oid, tid, &enc);
        let (ra, oa) = a.finish(&[]);
        let (rb, ob) = b.finish(&[]);
        assert_eq!(ra, rb);
        assert_eq!(oa, ob);
        let rec = parse_record(&rb, 0).expect("parses");
        assert_eq!(rec.entries[0].1.data, enc.data);
    }
}
