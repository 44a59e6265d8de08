//! Many threads loading, unloading, replacing, deleting and using adapters at once:
//! no panic, no wrong output (every use computes with exactly the weights of the
//! generation it leased), never over budget, and no budget leak at the end.

mod common;

use batos_kernels::cpu::lora::{self, LoraSlots};
use batos_lora::{
    generation_of, AdapterFiles, AdapterManager, Expect, HotFormat, HotStorage, HotWeights,
    LoraError, ManagerConfig, PrefetchPolicy, Projection,
};
use batos_store::{Db, StoreConfig};
use batos_types::{MemoryBudget, SlotIdx};
use common::{tiny_base, Synth};
use std::sync::atomic::{AtomicU64, Ordering};

const NAMES: [&str; 6] = ["alfred", "brick", "robin", "babs", "ada", "alan"];

fn files(seed: u64) -> AdapterFiles {
    // Ranks vary with the seed so one batch mixes ranks.
    let r = [2, 4, 8][(seed % 3) as usize];
    let s = Synth::good(&tiny_base(), r, seed);
    AdapterFiles::from_bytes(s.config_bytes(), s.safetensors_bytes())
}

/// A tiny deterministic RNG per thread.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Expected outcomes under contention; anything else fails the test.
fn expected(e: &LoraError) -> bool {
    matches!(
        e,
        LoraError::Admission { .. }
            | LoraError::WarmFull { .. }
            | LoraError::SlotsBusy { .. }
            | LoraError::GenerationConflict { .. }
            | LoraError::UnknownAdapter { .. }
    )
}

fn run(storage: HotStorage) {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("image"), StoreConfig::default()).unwrap();
    // Room for about 3.5 rank-8 adapters of the tiny base in f32 (7,424 bytes each),
    // 2.3 with the default f16 hot copy: eviction and refusals are constant.
    let budget = MemoryBudget::new("stress", 26_000);
    let cfg = ManagerConfig {
        max_loras: 3,
        max_cpu_loras: 4,
        hot_storage: storage,
        prefetch: PrefetchPolicy::AfterUse {
            top_k: 1,
            min_probability: 0.2,
        },
        ..ManagerConfig::default()
    };
    let mgr = AdapterManager::open(&db, tiny_base(), budget.clone(), cfg).unwrap();
    for (i, n) in NAMES.iter().enumerate() {
        mgr.add_files(n, files(i as u64), "seed", Expect::Absent)
            .unwrap();
    }
    let uses = AtomicU64::new(0);
    let seeds = AtomicU64::new(100);
    let refusals = AtomicU64::new(0);
    std::thread::scope(|s| {
        for t in 0..6u64 {
            let (mgr, budget, uses, seeds, refusals) = (&mgr, &budget, &uses, &seeds, &refusals);
            s.spawn(move || {
                let mut rng = Rng(0x9E37_79B9 ^ ((t + 1) * 0x1234_5678_9ABC));
                let base = tiny_base();
                for _ in 0..150 {
                    let name = NAMES[rng.below(NAMES.len() as u64) as usize];
                    let op = rng.below(100);
                    let r: Result<(), LoraError> = (|| {
                        if op < 60 {
                            // Use: lease, pin, run the kernel through the hot slot and
                            // compare with the leased weights themselves.
                            let lease = mgr.acquire(name)?;
                            let a = lease.adapter();
                            assert_eq!(generation_of(&a.config, &a.weights), lease.generation());
                            let pin = mgr.pin_hot(&lease)?;
                            let snap = mgr.hot_snapshot();
                            let layer = rng.below(2) as usize;
                            let proj = Projection::ALL[rng.below(7) as usize];
                            let (n_in, n_out) = base.dims(proj);
                            let table = snap.table(layer, proj);
                            let slots = LoraSlots::new(n_in, n_out, &table).unwrap();
                            // The leased f32 weights narrowed afresh: the slot must
                            // serve exactly these.
                            let narrowed = HotWeights::convert(&a.weights, HotFormat::default());
                            let own = [narrowed.slot(&a.weights, layer, proj)];
                            assert!(own[0].is_some());
                            let own = LoraSlots::new(n_in, n_out, &own).unwrap();
                            let tokens = 3;
                            let x: Vec<f32> = (0..tokens * n_in)
                                .map(|i| (i as f32 * 0.37).sin())
                                .collect();
                            let mut via_slot = vec![0f32; tokens * n_out];
                            let mut via_lease = vec![0f32; tokens * n_out];
                            let mapping = [Some(pin.slot()), None, Some(pin.slot())];
                            lora::bgmv(&x, &mapping, &slots, &mut via_slot).unwrap();
                            lora::bgmv(
                                &x,
                                &[Some(SlotIdx(0)), None, Some(SlotIdx(0))],
                                &own,
                                &mut via_lease,
                            )
                            .unwrap();
                            assert_eq!(
                                via_slot,
                                via_lease,
                                "slot {:?} served other weights",
                                pin.slot()
                            );
                            uses.fetch_add(1, Ordering::Relaxed);
                        } else if op < 75 {
                            let seed = seeds.fetch_add(1, Ordering::Relaxed);
                            match mgr.current(name)? {
                                Some(g) => mgr.add_files(
                                    name,
                                    files(seed),
                                    "replace",
                                    Expect::Generation(g),
                                )?,
                                None => mgr.add_files(name, files(seed), "add", Expect::Absent)?,
                            };
                        } else if op < 87 {
                            mgr.unload(name);
                        } else if op < 94 {
                            mgr.delete(name, Expect::Any)?;
                        } else {
                            mgr.prefetch(name)?;
                        }
                        Ok(())
                    })();
                    if let Err(e) = r {
                        assert!(expected(&e), "unexpected error: {e}");
                        refusals.fetch_add(1, Ordering::Relaxed);
                    }
                    assert!(budget.used() <= budget.capacity(), "over budget");
                }
            });
        }
    });
    assert!(
        uses.load(Ordering::Relaxed) > 100,
        "the stress test mostly failed to use adapters"
    );
    eprintln!(
        "{storage:?}: {} uses, {} expected refusals, {:?}",
        uses.load(Ordering::Relaxed),
        refusals.load(Ordering::Relaxed),
        mgr.stats()
    );
    assert!(
        refusals.load(Ordering::Relaxed) > 0,
        "no contention was exercised"
    );
    for n in NAMES {
        mgr.unload(n);
    }
    let s = mgr.stats();
    assert_eq!((s.warm_adapters, s.hot_filled), (0, 0), "{s:?}");
    assert_eq!(budget.used(), 0, "budget leaked: {budget:?}");
}

#[test]
fn stress_shared_host_slots() {
    run(HotStorage::SharedHost);
}

#[test]
fn stress_copied_slots() {
    run(HotStorage::Copy);
}
