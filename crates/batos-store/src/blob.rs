//! Blob files: chunked, checksummed, streamed in and out, fsynced before commit.
//!
//! Layout of `blobs/<id>.blob`: a 32-byte header (magic, version, chunk size, id), then
//! chunks `[len u32][crc32 u32][bytes]`, then a 64-byte trailer (magic, content length,
//! chunk count, BLAKE3 of the content, crc32 of the trailer). A reader checks every chunk
//! before handing out its bytes and the length and hash at the end.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::db::DbInner;
use crate::error::{Result, StoreError};
use crate::ids::{BlobId, BlobRef};

const BLOB_MAGIC: &[u8; 8] = b"BATOSBLB";
const TRAILER_MAGIC: &[u8; 8] = b"BLOBEND\0";
const BLOB_VERSION: u32 = 1;
const HEADER_LEN: usize = 32;
const TRAILER_LEN: usize = 64;
/// Chunk size: big enough for throughput, small enough to bound memory.
pub(crate) const CHUNK: usize = 1 << 20;

pub(crate) fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io("fsync directory", dir, e))
}

/// Streams a new blob into the image. Write with [`std::io::Write`], then call
/// [`BlobWriter::finish`] to make it durable and get a [`BlobRef`] to store in an object.
/// Dropping an unfinished writer deletes its temporary file.
pub struct BlobWriter {
    db: Arc<DbInner>,
    id: BlobId,
    tmp_path: PathBuf,
    out: Option<BufWriter<File>>,
    chunk: Vec<u8>,
    hasher: blake3::Hasher,
    len: u64,
    chunks: u64,
    finished_into: Arc<parking_lot::Mutex<Vec<BlobRef>>>,
}

impl BlobWriter {
    pub(crate) fn create(
        db: Arc<DbInner>,
        finished_into: Arc<parking_lot::Mutex<Vec<BlobRef>>>,
    ) -> Result<BlobWriter> {
        let id = BlobId::random();
        let tmp_path = db.blob_tmp_dir().join(format!("{:032x}.tmp", id.0));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(|e| StoreError::io("create blob", &tmp_path, e))?;
        let mut out = BufWriter::with_capacity(CHUNK + 64, file);
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(BLOB_MAGIC);
        h[8..12].copy_from_slice(&BLOB_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(CHUNK as u32).to_le_bytes());
        h[16..32].copy_from_slice(&id.0.to_le_bytes());
        out.write_all(&h)
            .map_err(|e| StoreError::io("write blob", &tmp_path, e))?;
        Ok(BlobWriter {
            db,
            id,
            tmp_path,
            out: Some(out),
            chunk: Vec::with_capacity(CHUNK),
            hasher: blake3::Hasher::new(),
            len: 0,
            chunks: 0,
            finished_into,
        })
    }

    /// The id the blob will have.
    pub fn id(&self) -> BlobId {
        self.id
    }

    fn emit_chunk(&mut self) -> io::Result<()> {
        if self.chunk.is_empty() {
            return Ok(());
        }
        let out = self
            .out
            .as_mut()
            .ok_or_else(|| io::Error::other("blob writer already finished"))?;
        let mut h = [0u8; 8];
        h[0..4].copy_from_slice(&(self.chunk.len() as u32).to_le_bytes());
        h[4..8].copy_from_slice(&crate::log::crc(&self.chunk).to_le_bytes());
        out.write_all(&h)?;
        out.write_all(&self.chunk)?;
        self.hasher.update(&self.chunk);
        self.chunks += 1;
        self.chunk.clear();
        Ok(())
    }

    /// Makes the blob durable: trailer, fsync of the file, rename into `blobs/`, fsync of
    /// the directory. Only then may a commit refer to it. The blob is registered with the
    /// transaction that created the writer and protected from pack until it commits or
    /// aborts.
    pub fn finish(mut self) -> Result<BlobRef> {
        let tmp = self.tmp_path.clone();
        self.emit_chunk()
            .map_err(|e| StoreError::io("write blob", &tmp, e))?;
        let hash: [u8; 32] = *self.hasher.finalize().as_bytes();
        let mut t = [0u8; TRAILER_LEN];
        t[0..8].copy_from_slice(TRAILER_MAGIC);
        t[8..16].copy_from_slice(&self.len.to_le_bytes());
        t[16..24].copy_from_slice(&self.chunks.to_le_bytes());
        t[24..56].copy_from_slice(&hash);
        let c = crate::log::crc(&t[0..60]);
        t[60..64].copy_from_slice(&c.to_le_bytes());
        let mut out = self.out.take().expect("writer present until finish");
        out.write_all(&t)
            .map_err(|e| StoreError::io("write blob", &tmp, e))?;
        let file = out
            .into_inner()
            .map_err(|e| StoreError::io("write blob", &tmp, e.into_error()))?;
        file.sync_all()
            .map_err(|e| StoreError::io("fsync blob", &tmp, e))?;
        drop(file);
        let blob = BlobRef {
            id: self.id,
            len: self.len,
            hash,
        };
        // Protect it from pack before it appears in blobs/.
        self.db.pending_blobs.lock().insert(self.id);
        let dest = self.db.blob_path(self.id);
        let renamed = std::fs::rename(&tmp, &dest)
            .map_err(|e| StoreError::io("rename blob into place", &dest, e))
            .and_then(|()| fsync_dir(&self.db.blob_dir()));
        if let Err(e) = renamed {
            self.db.pending_blobs.lock().remove(&self.id);
            return Err(e);
        }
        // The transaction commits it (or deletes it on abort).
        self.finished_into.lock().push(blob);
        tracing::debug!(id = %self.id, len = self.len, "blob written and fsynced");
        Ok(blob)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, mut buf: &[u8]) -> io::Result<usize> {
        let n = buf.len();
        while !buf.is_empty() {
            let room = CHUNK - self.chunk.len();
            let take = room.min(buf.len());
            self.chunk.extend_from_slice(&buf[..take]);
            buf = &buf[take..];
            if self.chunk.len() == CHUNK {
                self.emit_chunk()?;
            }
        }
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Chunks are written whole; durability comes from `finish`.
        Ok(())
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if self.out.is_some() {
            drop(self.out.take());
            let _ = std::fs::remove_file(&self.tmp_path);
        }
    }
}

/// Streams a committed blob out, checking each chunk's checksum before returning its
/// bytes, and the length and BLAKE3 hash at the end. Errors are `io::Error`s wrapping a
/// [`StoreError`] (`BlobCorrupt`, `BlobTruncated`); [`BlobReader::copy_to`] returns the
/// typed error directly.
pub struct BlobReader {
    blob: BlobRef,
    path: PathBuf,
    file: io::BufReader<File>,
    chunk: Vec<u8>,
    pos_in_chunk: usize,
    read: u64,
    chunks: u64,
    hasher: blake3::Hasher,
    done: bool,
}

impl BlobReader {
    pub(crate) fn open(path: PathBuf, blob: BlobRef) -> Result<BlobReader> {
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::BlobMissing { id: blob.id, path })
            }
            Err(e) => return Err(StoreError::io("open blob", &path, e)),
        };
        let mut file = io::BufReader::with_capacity(CHUNK + 64, file);
        let corrupt = |detail: String| StoreError::BlobCorrupt {
            id: blob.id,
            path: path.clone(),
            detail,
        };
        let mut h = [0u8; HEADER_LEN];
        if let Err(e) = file.read_exact(&mut h) {
            return Err(if e.kind() == io::ErrorKind::UnexpectedEof {
                StoreError::BlobTruncated {
                    id: blob.id,
                    path: path.clone(),
                    expected: blob.len,
                    got: 0,
                }
            } else {
                StoreError::io("read blob", &path, e)
            });
        }
        if &h[0..8] != BLOB_MAGIC {
            return Err(corrupt("bad header magic".into()));
        }
        let version = u32::from_le_bytes(h[8..12].try_into().expect("4"));
        if version != BLOB_VERSION {
            return Err(StoreError::UnsupportedVersion {
                path: path.clone(),
                found: version,
                supported: BLOB_VERSION,
            });
        }
        let id = u128::from_le_bytes(h[16..32].try_into().expect("16"));
        if id != blob.id.0 {
            return Err(corrupt(format!("header names blob {id:032x}")));
        }
        Ok(BlobReader {
            blob,
            path,
            file,
            chunk: Vec::new(),
            pos_in_chunk: 0,
            read: 0,
            chunks: 0,
            hasher: blake3::Hasher::new(),
            done: false,
        })
    }

    /// The blob being read.
    pub fn blob(&self) -> BlobRef {
        self.blob
    }

    fn corrupt(&self, detail: String) -> StoreError {
        StoreError::BlobCorrupt {
            id: self.blob.id,
            path: self.path.clone(),
            detail,
        }
    }

    fn truncated(&self) -> StoreError {
        StoreError::BlobTruncated {
            id: self.blob.id,
            path: self.path.clone(),
            expected: self.blob.len,
            got: self.read,
        }
    }

    fn read_exact_or(&mut self, buf: &mut [u8]) -> Result<()> {
        match self.file.read_exact(buf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(self.truncated()),
            Err(e) => Err(StoreError::io("read blob", &self.path, e)),
        }
    }

    /// Loads the next chunk, or checks the trailer at the end. Ok(false) = end of blob.
    fn fill(&mut self) -> Result<bool> {
        if self.done {
            return Ok(false);
        }
        if self.read >= self.blob.len {
            let mut t = [0u8; TRAILER_LEN];
            self.read_exact_or(&mut t)?;
            if &t[0..8] != TRAILER_MAGIC {
                return Err(self.corrupt(format!(
                    "expected the trailer after {} bytes of content",
                    self.read
                )));
            }
            if u32::from_le_bytes(t[60..64].try_into().expect("4")) != crate::log::crc(&t[0..60]) {
                return Err(self.corrupt("trailer checksum mismatch".into()));
            }
            let len = u64::from_le_bytes(t[8..16].try_into().expect("8"));
            let chunks = u64::from_le_bytes(t[16..24].try_into().expect("8"));
            if len != self.blob.len || chunks != self.chunks {
                return Err(self.corrupt(format!(
                    "trailer says {len} bytes in {chunks} chunks, reference says {} bytes ({} chunks read)",
                    self.blob.len, self.chunks
                )));
            }
            let hash = *self.hasher.finalize().as_bytes();
            if hash != self.blob.hash || t[24..56] != hash {
                return Err(self.corrupt("content hash mismatch".into()));
            }
            self.done = true;
            return Ok(false);
        }
        let mut h = [0u8; 8];
        self.read_exact_or(&mut h)?;
        let len = u32::from_le_bytes(h[0..4].try_into().expect("4")) as usize;
        let want = u32::from_le_bytes(h[4..8].try_into().expect("4"));
        if len == 0 || len > CHUNK || self.read + len as u64 > self.blob.len {
            return Err(self.corrupt(format!(
                "chunk {} has implausible length {len}",
                self.chunks
            )));
        }
        self.chunk.resize(len, 0);
        let mut chunk = std::mem::take(&mut self.chunk);
        let res = self.read_exact_or(&mut chunk);
        self.chunk = chunk;
        res?;
        if crate::log::crc(&self.chunk) != want {
            return Err(self.corrupt(format!(
                "chunk {} (content offset {}) checksum mismatch",
                self.chunks, self.read
            )));
        }
        self.hasher.update(&self.chunk);
        self.chunks += 1;
        self.read += len as u64;
        self.pos_in_chunk = 0;
        Ok(true)
    }

    /// Copies the whole blob into `w`, returning the byte count or a typed error.
    pub fn copy_to(&mut self, w: &mut impl Write) -> Result<u64> {
        let mut n = 0u64;
        loop {
            if self.pos_in_chunk < self.chunk.len() {
                w.write_all(&self.chunk[self.pos_in_chunk..])
                    .map_err(|e| StoreError::io("copy blob to writer", &self.path, e))?;
                n += (self.chunk.len() - self.pos_in_chunk) as u64;
                self.pos_in_chunk = self.chunk.len();
            }
            if !self.fill()? {
                return Ok(n);
            }
        }
    }

    /// Reads the whole blob into memory (for small blobs and tests).
    pub fn read_all(mut self) -> Result<Vec<u8>> {
        let mut v = Vec::with_capacity(self.blob.len.min(1 << 30) as usize);
        self.copy_to(&mut v)?;
        Ok(v)
    }
}

impl Read for BlobReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pos_in_chunk >= self.chunk.len() {
            match self.fill() {
                Ok(true) => {}
                Ok(false) => return Ok(0),
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos_in_chunk);
        buf[..n].copy_from_slice(&self.chunk[self.pos_in_chunk..self.pos_in_chunk + n]);
        self.pos_in_chunk += n;
        Ok(n)
    }
}

/// Checks a whole blob file against its reference (used by verify).
pub(crate) fn verify_blob(path: PathBuf, blob: BlobRef) -> Result<()> {
    let mut r = BlobReader::open(path, blob)?;
    r.copy_to(&mut io::sink())?;
    Ok(())
}
