//! batos-store: the living image.
//!
//! A transactional object store in the spirit of ZODB, for Rust:
//!
//! - objects with stable ids ([`Oid`]), typed state (serde, bincode), typed references
//!   ([`Ref`]) loaded on demand, a root with named roots;
//! - transactions ([`Txn`]) with snapshot isolation: reads see the state as of `begin`,
//!   readers never block, the first committer wins and later ones get a
//!   [`ConflictError`]; [`Db::transact`] retries; `read_current` validates reads;
//!   [`ResolveConflict`] merges concurrent changes of counters, logs and B-tree leaves;
//! - commits that are durable when `commit` returns: an append-only, checksummed commit
//!   log is the source of truth, fdatasync'ed with group commit into preallocated space; the
//!   index (a memory-mapped checkpoint plus the revisions since) is a cache of the log,
//!   checked and caught up on open;
//! - a persistent B-tree ([`BTree`]), streaming checksummed blobs ([`BlobWriter`],
//!   [`BlobReader`]), time travel ([`Db::snapshot_at`]), [`Db::pack`] and [`Db::verify`].
//!
//! The store knows no tensors. See `docs/store.md` for the on-disk design and the
//! durability argument.

mod blob;
mod btree;
mod codec;
mod config;
mod db;
mod error;
mod ids;
mod index;
mod log;
mod nodecache;
mod resolve;
mod sys;
mod txn;

pub use blob::{BlobReader, BlobWriter};
pub use btree::{BTree, Range, MAX_BRANCH, MAX_LEAF};
pub use config::{OpenMode, ProgressMode, StoreConfig};
pub use db::{Db, LivingImage, LogInfo, PackReport, VerifyReport};
pub use error::{CommitError, ConflictError, Result, StoreError};
pub use ids::{BlobId, BlobRef, Oid, Ref, Tid};
pub use log::FORMAT_VERSION;
pub use resolve::{AppendLog, Counter, ResolveConflict};
pub use txn::{Txn, TxnMode};
