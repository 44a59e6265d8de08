//! The crate's one error enum. Expected outcomes (an audit rejection, a generation
//! conflict, a full budget, an unknown name) are variants of their own, apart from the
//! fail-stop ones (I/O, a corrupt image).

use crate::audit::AuditReport;
use batos_types::{AdapterGeneration, BudgetError};
use std::path::PathBuf;

/// Everything batos-lora can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoraError {
    /// The adapter failed its audit; the report lists every problem found.
    #[error("adapter '{name}' rejected by the audit: {report}")]
    Rejected { name: String, report: AuditReport },

    /// No adapter of this name is known (in the image, or to the manager).
    #[error("no adapter named '{name}'")]
    UnknownAdapter { name: String },

    /// Replace-if-unchanged lost a race: the name points to another generation.
    #[error(
        "adapter '{name}' is at generation {actual}, not the expected {expected}",
        expected = fmt_gen(expected),
        actual = fmt_gen(actual)
    )]
    GenerationConflict {
        name: String,
        expected: Option<AdapterGeneration>,
        actual: Option<AdapterGeneration>,
    },

    /// Loading would exceed a memory budget, and nothing idle could be evicted to
    /// make room.
    #[error("cannot admit adapter '{name}' ({bytes} bytes): {source}")]
    Admission {
        name: String,
        bytes: u64,
        #[source]
        source: BudgetError,
    },

    /// Every hot slot holds an adapter leased by a running request.
    #[error("all {slots} hot adapter slots are leased; cannot make '{name}' hot")]
    SlotsBusy { name: String, slots: usize },

    /// The adapter's rank is larger than the hot slots were sized for.
    #[error("adapter '{name}' has rank {rank}, above the hot tier's max_lora_rank {max}")]
    RankAboveSlots {
        name: String,
        rank: usize,
        max: usize,
    },

    /// A configuration struct failed validation.
    #[error("invalid {what}: {reason}")]
    InvalidConfig { what: &'static str, reason: String },

    /// A file could not be read or written.
    #[error("{op} {path}: {source}", path = path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The living image failed underneath the cold tier.
    #[error("adapter repository: {0}")]
    Store(#[from] batos_store::StoreError),

    /// The warm tier is at its count or byte bound and every entry is in use.
    #[error(
        "cannot make '{name}' warm: the warm tier holds {count} adapters / {bytes} bytes          (max_cpu_loras {max_count}, max {max_bytes} bytes) and all are in use"
    )]
    WarmFull {
        name: String,
        count: usize,
        bytes: u64,
        max_count: usize,
        max_bytes: u64,
    },

    /// A stored adapter record or blob is damaged (bad encoding, checksum mismatch).
    #[error("adapter '{name}' in the image is corrupt: {reason}")]
    Corrupt { name: String, reason: String },

    /// A kernel rejected its arguments (a bug in slot bookkeeping, never user input).
    #[error(transparent)]
    Kernel(#[from] batos_kernels::KernelError),
}

fn fmt_gen(g: &Option<AdapterGeneration>) -> String {
    match g {
        Some(g) => g.short(),
        None => "none (absent)".into(),
    }
}

/// Shorthand.
pub type Result<T, E = LoraError> = std::result::Result<T, E>;
