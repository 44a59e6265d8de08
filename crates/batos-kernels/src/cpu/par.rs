//! Where parallel kernel work runs: rayon's global pool or the crate's spinning
//! fork-join [`pool`](super::pool). The default was chosen by measurement (see
//! `docs/perf/kernels.md`); the other stays selectable for benchmarks.

use std::sync::atomic::{AtomicU8, Ordering};

/// Which thread pool the CPU kernels use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ThreadBackend {
    /// rayon's global pool: the default, measured faster on a shared, oversubscribed
    /// machine, where spinning workers lose their time slices.
    #[default]
    Rayon,
    /// The crate's persistent fork-join pool (one thread per core, spins ~20 µs before
    /// parking): lower launch latency when cores are dedicated.
    SpinPool,
    /// Everything on the calling thread.
    Serial,
}

static BACKEND: AtomicU8 = AtomicU8::new(0);

/// Selects the thread pool for all later kernel calls in this process (a tuning knob
/// for benchmarks; results do not depend on it).
pub fn set_thread_backend(backend: ThreadBackend) {
    let v = match backend {
        ThreadBackend::Rayon => 0,
        ThreadBackend::SpinPool => 1,
        ThreadBackend::Serial => 2,
    };
    BACKEND.store(v, Ordering::Relaxed);
}

/// The thread pool kernel calls use now.
pub fn thread_backend() -> ThreadBackend {
    match BACKEND.load(Ordering::Relaxed) {
        1 => ThreadBackend::SpinPool,
        2 => ThreadBackend::Serial,
        _ => ThreadBackend::Rayon,
    }
}

/// Threads a parallel kernel spreads over.
pub fn num_threads() -> usize {
    match thread_backend() {
        ThreadBackend::SpinPool => super::pool::Pool::global().threads(),
        ThreadBackend::Serial => 1,
        _ => rayon::current_num_threads(),
    }
}

/// Runs `f(i)` for `i < n` in parallel; returns when all are done.
pub(crate) fn for_each(n: usize, f: &(dyn Fn(usize) + Sync)) {
    match thread_backend() {
        ThreadBackend::SpinPool => super::pool::Pool::global().run(n, f),
        ThreadBackend::Serial => (0..n).for_each(f),
        _ => {
            use rayon::prelude::*;
            (0..n).into_par_iter().with_max_len(1).for_each(f)
        }
    }
}

/// Splits `data` into consecutive chunks of `chunk` elements (the last may be short)
/// and runs `f(index, chunk)` on each in parallel.
pub(crate) fn for_each_chunk_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: &(dyn Fn(usize, &mut [T]) + Sync),
) {
    let chunk = chunk.max(1);
    let n = data.len().div_ceil(chunk);
    if n <= 1 {
        if !data.is_empty() {
            f(0, data);
        }
        return;
    }
    if thread_backend() == ThreadBackend::Rayon {
        use rayon::prelude::*;
        data.par_chunks_mut(chunk)
            .with_max_len(1)
            .enumerate()
            .for_each(|(i, c)| f(i, c));
        return;
    }
    // Hand each task its own chunk through a mutex-guarded slot; the lock is taken
    // once per task and never contended for the same slot.
    let slots: Vec<std::sync::Mutex<Option<&mut [T]>>> = data
        .chunks_mut(chunk)
        .map(|c| std::sync::Mutex::new(Some(c)))
        .collect();
    for_each(n, &|i| {
        let taken = slots[i].lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(c) = taken {
            f(i, c);
        }
    });
}
