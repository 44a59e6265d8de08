//! The one error enum of batos-store, plus the expected-outcome types.
//!
//! [`StoreError`] is fail-stop: corruption, I/O failure, misuse. A [`ConflictError`] is an
//! expected outcome of optimistic concurrency (retry the transaction); [`CommitError`]
//! keeps the two apart so callers can match on them.

use std::path::PathBuf;

use crate::ids::{BlobId, Oid, Tid};

/// Fail-stop errors of the store. Every variant names what it is about.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// An I/O operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What the store was doing.
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The directory exists, is not empty and is not a batos image.
    #[error("{path} is not a batos living image (no BATOS-IMAGE marker, directory not empty)")]
    NotAnImage {
        /// The directory given to `open`.
        path: PathBuf,
    },
    /// The image does not exist and the open mode forbids creating it.
    #[error("{path} does not exist (open mode is OpenExisting)")]
    ImageMissing {
        /// The directory given to `open`.
        path: PathBuf,
    },
    /// Another `Db` (in this or another process) holds the image.
    #[error("the image at {path} is locked by another opener (process or Db handle)")]
    Locked {
        /// The image directory.
        path: PathBuf,
    },
    /// The image was written by an incompatible format version.
    #[error("{path}: unsupported format version {found} (this build reads {supported})")]
    UnsupportedVersion {
        /// The file with the version header.
        path: PathBuf,
        /// Version found on disk.
        found: u32,
        /// Version this build understands.
        supported: u32,
    },
    /// A commit-log record failed its checksum or structure check inside acknowledged data.
    #[error("corrupt commit record in {path} at offset {offset}{}: {detail}", tid.map(|t| format!(" (tid {t})")).unwrap_or_default())]
    CorruptRecord {
        /// The log segment.
        path: PathBuf,
        /// Byte offset of the record (or entry) in the segment.
        offset: u64,
        /// The record's tid, when it could be read.
        tid: Option<Tid>,
        /// What was wrong.
        detail: String,
    },
    /// An object revision failed its checksum when read.
    #[error("corrupt object {oid} revision {tid} in {path} at offset {offset}: {detail}")]
    CorruptObject {
        /// The object.
        oid: Oid,
        /// The revision.
        tid: Tid,
        /// The log segment.
        path: PathBuf,
        /// Byte offset of the entry.
        offset: u64,
        /// What was wrong.
        detail: String,
    },
    /// The index (a cache of the log) disagrees with the log.
    #[error("index inconsistent with the log: {detail}")]
    IndexInconsistent {
        /// What disagreed.
        detail: String,
    },
    /// A block of an index checkpoint failed its check when read. The checkpoint is a
    /// cache of the log: deleting the file makes the next open rebuild it.
    #[error("corrupt index checkpoint {path} at offset {offset}: {detail}")]
    CorruptIndex {
        /// The checkpoint file.
        path: PathBuf,
        /// Byte offset of the damaged block.
        offset: u64,
        /// What was wrong.
        detail: String,
    },
    /// A blob file is corrupt (checksum, header or hash mismatch).
    #[error("blob {id} ({path}) is corrupt: {detail}")]
    BlobCorrupt {
        /// The blob.
        id: BlobId,
        /// Its file.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
    /// A blob file ends early.
    #[error("blob {id} ({path}) is truncated: expected {expected} bytes of content, file ends after {got}")]
    BlobTruncated {
        /// The blob.
        id: BlobId,
        /// Its file.
        path: PathBuf,
        /// Content length recorded in the reference.
        expected: u64,
        /// Content bytes readable before the file ended.
        got: u64,
    },
    /// A committed blob's file is missing.
    #[error("blob {id} is missing: {path} does not exist")]
    BlobMissing {
        /// The blob.
        id: BlobId,
        /// The expected file.
        path: PathBuf,
    },
    /// The object does not exist in this snapshot.
    #[error("object {oid} does not exist as of tid {snapshot}")]
    ObjectNotFound {
        /// The object.
        oid: Oid,
        /// The snapshot read.
        snapshot: Tid,
    },
    /// The stored object has a different type than the one asked for.
    #[error(
        "object {oid} was stored as another type (fingerprint {stored:#018x}), not as {expected}"
    )]
    WrongType {
        /// The object.
        oid: Oid,
        /// The Rust type asked for.
        expected: &'static str,
        /// Fingerprint of the stored type.
        stored: u64,
    },
    /// The stored bytes do not decode as the requested type.
    #[error("object {oid} does not decode as {expected}: {detail}")]
    Decode {
        /// The object.
        oid: Oid,
        /// The Rust type asked for.
        expected: &'static str,
        /// The decoder's message.
        detail: String,
    },
    /// A value could not be encoded.
    #[error("cannot encode {type_name}: {detail}")]
    Encode {
        /// The Rust type.
        type_name: &'static str,
        /// The encoder's message.
        detail: String,
    },
    /// The snapshot is older than the last pack horizon: its revisions are gone.
    #[error(
        "snapshot {snapshot} is older than the pack horizon {horizon}; its history was packed away"
    )]
    SnapshotPacked {
        /// The snapshot asked for.
        snapshot: Tid,
        /// The oldest readable tid.
        horizon: Tid,
    },
    /// `snapshot_at` was given a tid that has not been committed.
    #[error("tid {tid} is in the future (last durable commit is {last})")]
    FutureTid {
        /// The tid asked for.
        tid: Tid,
        /// The last visible commit.
        last: Tid,
    },
    /// A write was attempted through a read-only snapshot.
    #[error("snapshot at tid {snapshot} is read-only")]
    ReadOnly {
        /// The snapshot.
        snapshot: Tid,
    },
    /// A transaction record would exceed the record size limit.
    #[error("transaction too large: {bytes} bytes of object state (limit {limit}); use blobs for large values")]
    TooLarge {
        /// Encoded size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// An earlier fsync or write failed; the Db refuses further commits (reopen to recover).
    #[error("the image is poisoned after an earlier durability failure ({cause}); reopen it")]
    Poisoned {
        /// The first failure.
        cause: String,
    },
    /// The configuration is invalid.
    #[error("invalid store config: {detail}")]
    Config {
        /// What is wrong.
        detail: String,
    },
    /// `transact` gave up after the configured number of conflicting attempts.
    #[error("gave up after {attempts} attempts; last conflict: {last}")]
    RetriesExhausted {
        /// Attempts made.
        attempts: u32,
        /// The last conflict.
        last: ConflictError,
    },
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// Why a commit lost against another transaction. An expected outcome: retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConflictError {
    /// Another transaction committed a newer revision of an object this one wrote.
    #[error("write conflict on {oid}: snapshot {snapshot}, committed by tid {committed}")]
    Write {
        /// The object.
        oid: Oid,
        /// This transaction's snapshot.
        snapshot: Tid,
        /// The newer committed revision.
        committed: Tid,
    },
    /// An object registered with `read_current` changed after the snapshot.
    #[error("read conflict on {oid}: snapshot {snapshot}, changed by tid {committed}")]
    Read {
        /// The object.
        oid: Oid,
        /// This transaction's snapshot.
        snapshot: Tid,
        /// The newer committed revision.
        committed: Tid,
    },
    /// A pack ran after this transaction began and may have removed what it read.
    #[error("pack to {horizon} ran after this transaction's snapshot {snapshot}")]
    Packed {
        /// This transaction's snapshot.
        snapshot: Tid,
        /// The pack horizon.
        horizon: Tid,
    },
}

impl ConflictError {
    /// The object the conflict is about, if any.
    pub fn oid(&self) -> Option<Oid> {
        match self {
            ConflictError::Write { oid, .. } | ConflictError::Read { oid, .. } => Some(*oid),
            ConflictError::Packed { .. } => None,
        }
    }
}

/// The outcome of a failed commit: an expected conflict, or a fail-stop error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CommitError {
    /// Another transaction won; retry.
    #[error(transparent)]
    Conflict(#[from] ConflictError),
    /// The store failed; do not retry blindly.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl CommitError {
    /// The conflict, if this is one.
    pub fn as_conflict(&self) -> Option<&ConflictError> {
        match self {
            CommitError::Conflict(c) => Some(c),
            CommitError::Store(_) => None,
        }
    }
}

/// Result alias for fail-stop store operations.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;
