//! The unified memory ledger (S-LoRA's unified pool): KV blocks and adapter weights are
//! admitted against one byte budget, so neither can starve the other unnoticed.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// What a reservation holds bytes for; the ledger keeps a per-kind breakdown.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReservationKind {
    /// Paged KV-cache blocks.
    KvCache,
    /// Decoded adapter weights in host RAM (warm tier).
    AdapterWarm,
    /// Adapter weights in device slots (hot tier).
    AdapterHot,
    /// Anything else (scratch buffers, activations).
    Other,
}

impl ReservationKind {
    const ALL: [ReservationKind; 4] = [
        ReservationKind::KvCache,
        ReservationKind::AdapterWarm,
        ReservationKind::AdapterHot,
        ReservationKind::Other,
    ];

    fn index(self) -> usize {
        match self {
            ReservationKind::KvCache => 0,
            ReservationKind::AdapterWarm => 1,
            ReservationKind::AdapterHot => 2,
            ReservationKind::Other => 3,
        }
    }
}

impl fmt::Display for ReservationKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ReservationKind::KvCache => "kv-cache",
            ReservationKind::AdapterWarm => "adapter-warm",
            ReservationKind::AdapterHot => "adapter-hot",
            ReservationKind::Other => "other",
        })
    }
}

/// A request for bytes that the budget could not grant. An expected outcome: callers
/// evict by policy and retry, or pass it up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BudgetError {
    #[error(
        "memory budget '{budget}' exhausted: asked {requested} bytes for {kind}, \
         {available} of {capacity} bytes free"
    )]
    Exhausted {
        budget: String,
        kind: ReservationKind,
        requested: u64,
        available: u64,
        capacity: u64,
    },
}

struct Ledger {
    name: String,
    capacity: u64,
    used: AtomicU64,
    by_kind: [AtomicU64; 4],
}

/// A byte budget shared by every component that holds large memory. Cheap to clone.
///
/// ```
/// use batos_types::{MemoryBudget, ReservationKind};
/// let budget = MemoryBudget::new("host", 1024);
/// let r = budget.reserve(ReservationKind::KvCache, 1000).unwrap();
/// assert!(budget.reserve(ReservationKind::AdapterWarm, 100).is_err());
/// drop(r);
/// assert_eq!(budget.used(), 0);
/// ```
#[derive(Clone)]
pub struct MemoryBudget {
    ledger: Arc<Ledger>,
}

impl MemoryBudget {
    /// A budget named `name` (shown in errors) of `capacity` bytes.
    pub fn new(name: impl Into<String>, capacity: u64) -> Self {
        MemoryBudget {
            ledger: Arc::new(Ledger {
                name: name.into(),
                capacity,
                used: AtomicU64::new(0),
                by_kind: Default::default(),
            }),
        }
    }

    /// Reserves `bytes` for `kind`, or says how far short the budget is. Never exceeds
    /// the capacity, even under concurrent callers.
    pub fn reserve(&self, kind: ReservationKind, bytes: u64) -> Result<Reservation, BudgetError> {
        let l = &self.ledger;
        let mut used = l.used.load(Ordering::Relaxed);
        loop {
            let next = match used.checked_add(bytes) {
                Some(n) if n <= l.capacity => n,
                _ => {
                    return Err(BudgetError::Exhausted {
                        budget: l.name.clone(),
                        kind,
                        requested: bytes,
                        available: l.capacity.saturating_sub(used),
                        capacity: l.capacity,
                    })
                }
            };
            match l
                .used
                .compare_exchange_weak(used, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(now) => used = now,
            }
        }
        l.by_kind[kind.index()].fetch_add(bytes, Ordering::Relaxed);
        Ok(Reservation {
            budget: self.clone(),
            kind,
            bytes,
        })
    }

    /// Total capacity in bytes.
    pub fn capacity(&self) -> u64 {
        self.ledger.capacity
    }

    /// Bytes currently reserved.
    pub fn used(&self) -> u64 {
        self.ledger.used.load(Ordering::Acquire)
    }

    /// Bytes still free.
    pub fn available(&self) -> u64 {
        self.capacity().saturating_sub(self.used())
    }

    /// Bytes currently reserved for `kind`.
    pub fn used_by(&self, kind: ReservationKind) -> u64 {
        self.ledger.by_kind[kind.index()].load(Ordering::Acquire)
    }

    /// The budget's name, as shown in errors.
    pub fn name(&self) -> &str {
        &self.ledger.name
    }

    fn release(&self, kind: ReservationKind, bytes: u64) {
        self.ledger.by_kind[kind.index()].fetch_sub(bytes, Ordering::Relaxed);
        self.ledger.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

impl fmt::Debug for MemoryBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("MemoryBudget");
        d.field("name", &self.ledger.name)
            .field("capacity", &self.capacity())
            .field("used", &self.used());
        for k in ReservationKind::ALL {
            d.field(&k.to_string(), &self.used_by(k));
        }
        d.finish()
    }
}

/// Bytes held against a [`MemoryBudget`]; released when dropped.
#[must_use = "dropping a reservation releases its bytes at once"]
pub struct Reservation {
    budget: MemoryBudget,
    kind: ReservationKind,
    bytes: u64,
}

impl Reservation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// What the bytes are held for.
    pub fn kind(&self) -> ReservationKind {
        self.kind
    }

    /// Gives back `bytes` of this reservation early (e.g. after trimming a buffer).
    /// Asking for more than is held releases everything held.
    pub fn shrink(&mut self, bytes: u64) {
        let b = bytes.min(self.bytes);
        self.budget.release(self.kind, b);
        self.bytes -= b;
    }

    /// Grows this reservation by `bytes`, under the same rules as [`MemoryBudget::reserve`].
    pub fn grow(&mut self, bytes: u64) -> Result<(), BudgetError> {
        let extra = self.budget.reserve(self.kind, bytes)?;
        self.bytes += extra.bytes;
        std::mem::forget(extra);
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.release(self.kind, self.bytes);
    }
}

impl fmt::Debug for Reservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reservation")
            .field("budget", &self.budget.name())
            .field("kind", &self.kind)
            .field("bytes", &self.bytes)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_exceeds_capacity_under_contention() {
        let budget = MemoryBudget::new("t", 10_000);
        let held: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let b = budget.clone();
                    s.spawn(move || {
                        (0..1000)
                            .filter_map(|_| b.reserve(ReservationKind::Other, 7).ok())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(held.len(), 10_000 / 7);
        assert!(budget.used() <= budget.capacity());
        drop(held);
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.used_by(ReservationKind::Other), 0);
    }

    #[test]
    fn exhausted_error_names_budget_and_kind() {
        let budget = MemoryBudget::new("gpu0", 100);
        let _a = budget.reserve(ReservationKind::KvCache, 60).unwrap();
        let err = budget.reserve(ReservationKind::AdapterHot, 50).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("gpu0") && msg.contains("adapter-hot") && msg.contains("40 of 100"),
            "{msg}"
        );
    }

    #[test]
    fn grow_and_shrink_track_kinds() {
        let budget = MemoryBudget::new("t", 100);
        let mut r = budget.reserve(ReservationKind::AdapterWarm, 10).unwrap();
        r.grow(30).unwrap();
        assert_eq!(budget.used_by(ReservationKind::AdapterWarm), 40);
        assert!(r.grow(61).is_err());
        r.shrink(15);
        assert_eq!(r.bytes(), 25);
        assert_eq!(budget.used(), 25);
        drop(r);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn overflow_request_is_refused_not_wrapped() {
        let budget = MemoryBudget::new("t", u64::MAX - 1);
        let _a = budget.reserve(ReservationKind::Other, 10).unwrap();
        assert!(budget.reserve(ReservationKind::Other, u64::MAX).is_err());
    }
}
