//! A small fork-join pool tuned for back-to-back kernel launches: persistent workers
//! that spin briefly on a job counter before parking, and a caller that takes part in
//! the work. A decode step launches a few hundred short parallel regions; a parked
//! rayon worker needs a futex wake-up for each, this pool usually needs none.
//!
//! The only `unsafe` here is publishing a pointer to a job that lives on the caller's
//! stack; the caller does not return before every worker has let go of it.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One parallel region: run `f(i)` for every `i < n`.
struct Job<'a> {
    f: &'a (dyn Fn(usize) + Sync),
    n: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    /// A task panicked; the submitter re-raises once every thread has let go.
    panicked: AtomicBool,
}

impl Job<'_> {
    /// Claims and runs tasks until none are left. A panicking task is caught so that
    /// no thread unwinds while the job is shared.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, SeqCst);
            if i >= self.n {
                return;
            }
            if catch_unwind(AssertUnwindSafe(|| (self.f)(i))).is_err() {
                self.panicked.store(true, SeqCst);
            }
            self.done.fetch_add(1, SeqCst);
        }
    }
}

struct Shared {
    /// The current job, type-erased; null when none.
    job: AtomicPtr<Job<'static>>,
    /// Bumped for every new job, so parked workers know to wake.
    epoch: AtomicUsize,
    /// Workers holding (or about to read) the job pointer.
    active: AtomicUsize,
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
}

/// A fixed set of worker threads plus the calling thread.
pub(crate) struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// Serialises submissions; a nested or concurrent call runs inline instead.
    submit: Mutex<()>,
}

/// How long an idle worker spins before parking.
const SPIN: Duration = Duration::from_micros(20);

impl Pool {
    fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
        });
        let workers = threads.saturating_sub(1);
        for w in 0..workers {
            let s = Arc::clone(&shared);
            // A pool without its workers still works (the caller runs every task), so
            // a failed spawn only costs speed.
            let _ = std::thread::Builder::new()
                .name(format!("batos-kernels-{w}"))
                .spawn(move || worker(&s));
        }
        Pool {
            shared,
            workers,
            submit: Mutex::new(()),
        }
    }

    /// The process-wide pool, one thread per available core.
    pub(crate) fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::new(std::thread::available_parallelism().map_or(1, |n| n.get())))
    }

    /// Threads that take part in a job (workers plus the caller).
    pub(crate) fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(i)` for every `i < n`, spread over the pool; returns when all are done.
    pub(crate) fn run(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        let guard = match self.submit.try_lock() {
            Ok(g) if self.workers > 0 && n > 1 => g,
            _ => {
                (0..n).for_each(f);
                return;
            }
        };
        let job = Job {
            f,
            n,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        };
        let s = &*self.shared;
        // The lifetime is erased only for storage in the atomic: workers dereference
        // the pointer only between their `active` increment and decrement, and this
        // function does not return (so `job` stays alive) until it has cleared the
        // pointer and seen `active == 0`.
        let erased = std::ptr::from_ref(&job).cast_mut().cast::<Job<'static>>();
        s.job.store(erased, SeqCst);
        s.epoch.fetch_add(1, SeqCst);
        if s.sleepers.load(SeqCst) > 0 {
            let _l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.wake.notify_all();
        }
        job.work();
        let mut spins = 0u32;
        while job.done.load(SeqCst) < n {
            backoff(&mut spins);
        }
        s.job.store(std::ptr::null_mut(), SeqCst);
        while s.active.load(SeqCst) > 0 {
            backoff(&mut spins);
        }
        drop(guard);
        if job.panicked.load(SeqCst) {
            panic!("a parallel kernel task panicked");
        }
    }
}

fn backoff(spins: &mut u32) {
    *spins += 1;
    if *spins < 2000 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

fn worker(s: &Shared) {
    let mut seen = s.epoch.load(SeqCst);
    loop {
        let start = Instant::now();
        let mut polls = 0u32;
        while s.epoch.load(SeqCst) == seen {
            std::hint::spin_loop();
            polls += 1;
            if polls.is_multiple_of(64) && start.elapsed() > SPIN {
                let mut l = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleepers.fetch_add(1, SeqCst);
                while s.epoch.load(SeqCst) == seen {
                    l = s.wake.wait(l).unwrap_or_else(|e| e.into_inner());
                }
                s.sleepers.fetch_sub(1, SeqCst);
                break;
            }
        }
        seen = s.epoch.load(SeqCst);
        s.active.fetch_add(1, SeqCst);
        let p = s.job.load(SeqCst);
        if !p.is_null() {
            // SAFETY: non-null while the submitter waits for `active` to drop to zero
            // (see `Pool::run`), and we incremented `active` before loading it.
            let job = unsafe { &*p };
            job.work();
        }
        s.active.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::Pool;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn every_task_runs_exactly_once_across_many_jobs() {
        let pool = Pool::new(3);
        for n in [0usize, 1, 2, 3, 7, 64, 1000] {
            for _ in 0..50 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(n, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
            }
        }
    }

    #[test]
    fn nested_and_concurrent_submissions_complete() {
        let pool = Pool::new(2);
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        // Nested: the inner call finds the pool busy and runs inline.
                        pool.run(4, &|_| {
                            pool.run(3, &|_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 100 * 4 * 3);
    }
}

#[cfg(test)]
mod panic_tests {
    use super::Pool;

    #[test]
    fn a_panicking_task_is_reraised_after_all_threads_let_go() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(|| {
            pool.run(16, &|i| {
                if i == 5 {
                    panic!("task 5");
                }
            })
        });
        assert!(r.is_err());
        // The pool still works afterwards.
        let sum = std::sync::atomic::AtomicUsize::new(0);
        pool.run(10, &|i| {
            sum.fetch_add(i, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(sum.into_inner(), 45);
    }
}
