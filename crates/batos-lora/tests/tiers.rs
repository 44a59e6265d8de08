//! The three tiers: each transition, eviction under the budget, leases across
//! replace/unload/delete, hot slots and pins, prefetch, materialisation, history.

mod common;

use batos_lora::{
    audit_dir, AdapterFiles, AdapterManager, AuditPolicy, Expect, HotFormat, HotStorage, LoraDType,
    LoraError, LoraMatrix, ManagerConfig, PrefetchPolicy, Projection,
};
use batos_store::{Db, StoreConfig};
use batos_types::{MemoryBudget, ReservationKind};
use common::{tiny_base, Synth};

struct Fixture {
    _dir: tempfile::TempDir,
    db: Db,
    budget: MemoryBudget,
    mgr: AdapterManager,
}

fn files(seed: u64, r: usize) -> AdapterFiles {
    let s = Synth::good(&tiny_base(), r, seed);
    AdapterFiles::from_bytes(s.config_bytes(), s.safetensors_bytes())
}

/// Decoded bytes of a rank-`r` adapter on the tiny base.
fn bytes_of(r: usize) -> u64 {
    let b = tiny_base();
    let per_layer: usize = Projection::ALL
        .iter()
        .map(|&p| {
            let (i, o) = b.dims(p);
            r * (i + o)
        })
        .sum();
    (per_layer * b.num_layers * 4) as u64
}

fn fixture(budget_bytes: u64, config: ManagerConfig) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path().join("image"), StoreConfig::default()).unwrap();
    let budget = MemoryBudget::new("test-host", budget_bytes);
    let mgr = AdapterManager::open(&db, tiny_base(), budget.clone(), config).unwrap();
    Fixture {
        _dir: dir,
        db,
        budget,
        mgr,
    }
}

/// f32 hot slots (the byte counts below are f32 sizes; the half formats have their own
/// test).
fn no_prefetch() -> ManagerConfig {
    ManagerConfig {
        prefetch: PrefetchPolicy::Off,
        hot_format: HotFormat::F32,
        ..ManagerConfig::default()
    }
}

#[test]
fn cold_to_warm_to_hot_and_back() {
    let f = fixture(1 << 30, no_prefetch());
    let (g, _) = f
        .mgr
        .add_files("alfred", files(1, 4), "test", Expect::Absent)
        .unwrap();
    assert_eq!(f.mgr.current("alfred").unwrap(), Some(g));
    let s = f.mgr.stats();
    assert_eq!((s.warm_adapters, s.cold_loads, s.hot_filled), (0, 0, 0));
    assert_eq!(f.budget.used(), 0, "cold adapters hold no memory");

    // cold → warm
    let lease = f.mgr.acquire("alfred").unwrap();
    assert_eq!(lease.generation(), g);
    let s = f.mgr.stats();
    assert_eq!((s.warm_adapters, s.cold_loads, s.warm_hits), (1, 1, 0));
    assert_eq!(f.budget.used_by(ReservationKind::AdapterWarm), bytes_of(4));
    // warm hit
    let again = f.mgr.acquire("alfred").unwrap();
    assert_eq!(f.mgr.stats().warm_hits, 1);
    assert_eq!(f.mgr.stats().cold_loads, 1);

    // warm → hot
    let pin = f.mgr.pin_hot(&lease).unwrap();
    let pin2 = f.mgr.pin_hot(&again).unwrap();
    assert_eq!(pin.slot(), pin2.slot(), "one generation, one slot");
    assert_eq!(f.mgr.stats().hot_filled, 1);
    let snap = f.mgr.hot_snapshot();
    assert!(snap.is_filled(pin.slot()));
    let table = snap.table(1, Projection::Down);
    let slot = table[pin.slot().index()].unwrap();
    assert_eq!((slot.rank(), slot.scale()), (4, 2.0));
    assert_eq!(
        slot.a(),
        LoraMatrix::F32(&lease.adapter().weights.pair(1, Projection::Down).unwrap().a)
    );

    // hot → (unpinned) → evicted by unload; warm → gone once leases drop
    drop((pin, pin2, snap));
    assert_eq!(f.mgr.unload("alfred"), 1);
    assert_eq!(f.mgr.stats().hot_filled, 0);
    assert_eq!(f.mgr.stats().warm_adapters, 0);
    assert!(f.budget.used() > 0, "leases still hold the weights");
    drop((lease, again));
    assert_eq!(f.budget.used(), 0, "no leak after unload");
    // Still in the image: the next acquire loads it again.
    f.mgr.acquire("alfred").unwrap();
    assert_eq!(f.mgr.stats().cold_loads, 2);
}

#[test]
fn leases_keep_their_generation_across_replace_unload_and_delete() {
    let f = fixture(1 << 30, no_prefetch());
    let (g1, _) = f
        .mgr
        .add_files("brick", files(1, 4), "v1", Expect::Absent)
        .unwrap();
    let old = f.mgr.acquire("brick").unwrap();
    let old_pin = f.mgr.pin_hot(&old).unwrap();
    let old_a = old
        .adapter()
        .weights
        .pair(0, Projection::Q)
        .unwrap()
        .a
        .clone();

    let (g2, _) = f
        .mgr
        .add_files("brick", files(2, 4), "v2", Expect::Generation(g1))
        .unwrap();
    assert_ne!(g1, g2);
    assert_eq!(f.mgr.current("brick").unwrap(), Some(g2));
    // The running request is untouched: same generation, same weights, same slot.
    assert_eq!(old.generation(), g1);
    assert_eq!(
        old.adapter().weights.pair(0, Projection::Q).unwrap().a,
        old_a
    );
    let snap = f.mgr.hot_snapshot();
    assert!(
        snap.is_filled(old_pin.slot()),
        "a pinned slot survives the replace"
    );
    drop(snap);
    // New requests get the new generation, in another slot.
    let new = f.mgr.acquire("brick").unwrap();
    assert_eq!(new.generation(), g2);
    let new_pin = f.mgr.pin_hot(&new).unwrap();
    assert_ne!(new_pin.slot(), old_pin.slot());

    // Delete while both are in use: leases stay valid, new acquires fail.
    f.mgr.delete("brick", Expect::Generation(g2)).unwrap();
    assert!(matches!(
        f.mgr.acquire("brick"),
        Err(LoraError::UnknownAdapter { .. })
    ));
    assert_eq!(new.generation(), g2);
    assert!(f.budget.used() > 0);
    // The retired slots empty when their pins go.
    drop(old_pin);
    drop(new_pin);
    assert_eq!(f.mgr.stats().hot_filled, 0);
    drop((old, new));
    assert_eq!(f.budget.used(), 0);
}

#[test]
fn replace_if_unchanged_detects_a_stale_expectation() {
    let f = fixture(1 << 30, no_prefetch());
    let (g1, _) = f
        .mgr
        .add_files("robin", files(1, 4), "v1", Expect::Absent)
        .unwrap();
    // A second plain add of the same name is a conflict, not an overwrite.
    let err = f
        .mgr
        .add_files("robin", files(2, 4), "v2", Expect::Absent)
        .unwrap_err();
    assert!(
        matches!(err, LoraError::GenerationConflict { expected: None, actual: Some(a), .. } if a == g1),
        "{err}"
    );
    let (g2, _) = f
        .mgr
        .add_files("robin", files(2, 4), "v2", Expect::Generation(g1))
        .unwrap();
    // A writer that still believes in g1 loses.
    let err = f
        .mgr
        .add_files("robin", files(3, 4), "v3", Expect::Generation(g1))
        .unwrap_err();
    assert!(
        matches!(err, LoraError::GenerationConflict { actual: Some(a), .. } if a == g2),
        "{err}"
    );
    let err = f.mgr.delete("robin", Expect::Generation(g1)).unwrap_err();
    assert!(matches!(err, LoraError::GenerationConflict { .. }), "{err}");
    assert_eq!(f.mgr.current("robin").unwrap(), Some(g2));
    // Any: load-in-place semantics.
    f.mgr
        .add_files("robin", files(3, 4), "v3", Expect::Any)
        .unwrap();
    assert!(matches!(
        f.mgr.delete("nobody", Expect::Any),
        Err(LoraError::UnknownAdapter { .. })
    ));
}

#[test]
fn warm_eviction_under_the_shared_budget_is_lru_and_never_over_budget() {
    let one = bytes_of(4);
    // Room for two adapters plus some KV cache.
    let f = fixture(2 * one + 100, no_prefetch());
    let kv = f.budget.reserve(ReservationKind::KvCache, 100).unwrap();
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        f.mgr
            .add_files(n, files(i as u64 * 10, 4), "t", Expect::Absent)
            .unwrap();
    }
    drop(f.mgr.acquire("a").unwrap());
    drop(f.mgr.acquire("b").unwrap());
    drop(f.mgr.acquire("a").unwrap()); // b is now least recently used
    assert_eq!(f.budget.used(), 2 * one + 100);
    drop(f.mgr.acquire("c").unwrap()); // evicts b
    assert!(f.budget.used() <= f.budget.capacity());
    let before = f.mgr.stats().cold_loads;
    drop(f.mgr.acquire("a").unwrap());
    assert_eq!(f.mgr.stats().cold_loads, before, "a stayed warm");
    drop(f.mgr.acquire("b").unwrap());
    assert_eq!(f.mgr.stats().cold_loads, before + 1, "b had been evicted");

    // With both warm adapters leased nothing is idle: a third load fails with a typed
    // error naming the budget, and nothing is over budget.
    let la = f.mgr.acquire("a").unwrap();
    let lb = f.mgr.acquire("b").unwrap();
    let err = f.mgr.acquire("c").unwrap_err();
    assert!(matches!(err, LoraError::Admission { .. }), "{err}");
    assert!(err.to_string().contains("test-host"), "{err}");
    assert!(f.budget.used() <= f.budget.capacity());
    drop((la, lb));
    f.mgr.acquire("c").unwrap();
    drop(kv);
}

#[test]
fn warm_count_bound_evicts_lru() {
    let cfg = ManagerConfig {
        max_loras: 1,
        max_cpu_loras: 2,
        ..no_prefetch()
    };
    let f = fixture(1 << 30, cfg);
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        f.mgr
            .add_files(n, files(i as u64 * 10, 4), "t", Expect::Absent)
            .unwrap();
        drop(f.mgr.acquire(n).unwrap());
    }
    assert_eq!(f.mgr.stats().warm_adapters, 2);
    assert_eq!(f.budget.used(), 2 * bytes_of(4));
    // All warm entries leased: the count bound refuses.
    let lb = f.mgr.acquire("b").unwrap();
    let lc = f.mgr.acquire("c").unwrap();
    let err = f.mgr.acquire("a").unwrap_err();
    assert!(
        matches!(err, LoraError::WarmFull { max_count: 2, .. }),
        "{err}"
    );
    drop((lb, lc));
}

#[test]
fn hot_slots_never_evict_a_pinned_adapter() {
    let cfg = ManagerConfig {
        max_loras: 2,
        max_cpu_loras: 4,
        ..no_prefetch()
    };
    let f = fixture(1 << 30, cfg);
    let mut leases = Vec::new();
    for (i, n) in ["a", "b", "c"].iter().enumerate() {
        f.mgr
            .add_files(n, files(i as u64 * 10, 4), "t", Expect::Absent)
            .unwrap();
        leases.push(f.mgr.acquire(n).unwrap());
    }
    let pa = f.mgr.pin_hot(&leases[0]).unwrap();
    let pb = f.mgr.pin_hot(&leases[1]).unwrap();
    let err = f.mgr.pin_hot(&leases[2]).unwrap_err();
    assert!(
        matches!(err, LoraError::SlotsBusy { slots: 2, .. }),
        "{err}"
    );
    let b_slot = pb.slot();
    drop(pa);
    let pc = f.mgr.pin_hot(&leases[2]).unwrap();
    assert_ne!(pc.slot(), b_slot, "the pinned slot was not taken");
    let snap = f.mgr.hot_snapshot();
    let t = snap.table(0, Projection::Q);
    assert_eq!(
        t[b_slot.index()].unwrap().a(),
        LoraMatrix::F32(
            &leases[1]
                .adapter()
                .weights
                .pair(0, Projection::Q)
                .unwrap()
                .a
        )
    );
    assert_eq!(
        t[pc.slot().index()].unwrap().a(),
        LoraMatrix::F32(
            &leases[2]
                .adapter()
                .weights
                .pair(0, Projection::Q)
                .unwrap()
                .a
        )
    );
}

#[test]
fn hot_fill_ids_name_a_slots_contents_without_holding_them() {
    // One slot and one warm entry: the next adapter can come in only once nothing
    // holds the previous one (a mirror that kept old snapshots would block it).
    let cfg = ManagerConfig {
        max_loras: 1,
        max_cpu_loras: 1,
        ..no_prefetch()
    };
    let f = fixture(1 << 30, cfg);
    for (i, n) in ["a", "b"].iter().enumerate() {
        f.mgr
            .add_files(n, files(i as u64 * 10 + 1, 4), "t", Expect::Absent)
            .unwrap();
    }
    let slot = batos_types::SlotIdx(0);
    let lease = f.mgr.acquire("a").unwrap();
    let pin = f.mgr.pin_hot(&lease).unwrap();
    let first = f.mgr.hot_snapshot().fill_id(slot).expect("slot 0 filled");
    assert_eq!(f.mgr.hot_snapshot().fill_id(slot), Some(first), "same fill");
    assert_eq!(f.mgr.hot_snapshot().fill_id(batos_types::SlotIdx(1)), None);
    drop((pin, lease));

    // A held snapshot keeps `a` alive: `b` cannot be loaded into the one warm entry.
    let held = f.mgr.hot_snapshot();
    let err = f.mgr.acquire("b").unwrap_err();
    assert!(matches!(err, LoraError::WarmFull { .. }), "{err}");
    drop(held);

    // With only the id kept, `b` loads; its fill has a new id.
    let lease = f.mgr.acquire("b").unwrap();
    let _pin = f.mgr.pin_hot(&lease).unwrap();
    let second = f.mgr.hot_snapshot().fill_id(slot).expect("slot 0 refilled");
    assert_ne!(second, first, "a new fill of the same slot has a new id");
}

#[test]
fn copied_hot_slots_reserve_hot_bytes_and_yield_under_pressure() {
    let one = bytes_of(4);
    let cfg = ManagerConfig {
        max_loras: 2,
        max_cpu_loras: 4,
        hot_storage: HotStorage::Copy,
        ..no_prefetch()
    };
    // Two warm copies and one hot copy fit; a second hot copy does not.
    let f = fixture(3 * one, cfg);
    f.mgr
        .add_files("a", files(1, 4), "t", Expect::Absent)
        .unwrap();
    f.mgr
        .add_files("b", files(2, 4), "t", Expect::Absent)
        .unwrap();
    let la = f.mgr.acquire("a").unwrap();
    let lb = f.mgr.acquire("b").unwrap();
    let pa = f.mgr.pin_hot(&la).unwrap();
    assert_eq!(f.budget.used_by(ReservationKind::AdapterHot), one);
    let err = f.mgr.pin_hot(&lb).unwrap_err();
    assert!(matches!(err, LoraError::Admission { .. }), "{err}");
    assert!(f.budget.used() <= f.budget.capacity());
    // Once a's slot is unpinned it yields to b.
    drop(pa);
    let pb = f.mgr.pin_hot(&lb).unwrap();
    assert_eq!(f.budget.used_by(ReservationKind::AdapterHot), one);
    assert_eq!(
        f.mgr.hot_snapshot().table(1, Projection::Up)[pb.slot().index()]
            .unwrap()
            .b(),
        LoraMatrix::F32(&lb.adapter().weights.pair(1, Projection::Up).unwrap().b)
    );
    drop((pb, la, lb));
    f.mgr.unload("a");
    f.mgr.unload("b");
    assert_eq!(f.budget.used(), 0, "no leak");
}

#[test]
fn concurrent_loads_of_one_name_load_once() {
    let f = fixture(1 << 30, no_prefetch());
    let (g, _) = f
        .mgr
        .add_files("babs", files(5, 8), "t", Expect::Absent)
        .unwrap();
    let leases: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|_| s.spawn(|| f.mgr.acquire("babs").unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(leases.iter().all(|l| l.generation() == g));
    assert_eq!(f.mgr.stats().cold_loads, 1);
    assert_eq!(f.budget.used(), bytes_of(8));
}

#[test]
fn prefetch_promotes_the_likely_next_adapter() {
    let cfg = ManagerConfig {
        prefetch: PrefetchPolicy::AfterUse {
            top_k: 1,
            min_probability: 0.5,
        },
        ..ManagerConfig::default()
    };
    let f = fixture(1 << 30, cfg);
    for (i, n) in ["alfred", "brick", "robin"].iter().enumerate() {
        f.mgr
            .add_files(n, files(i as u64, 4), "t", Expect::Absent)
            .unwrap();
    }
    f.mgr
        .learn(["alfred", "brick", "alfred", "brick", "alfred", "robin"]);
    drop(f.mgr.acquire("alfred").unwrap());
    let s = f.mgr.stats();
    assert_eq!(
        (s.prefetch.issued, s.cold_loads, s.warm_adapters),
        (1, 2, 2)
    );
    drop(f.mgr.acquire("brick").unwrap());
    let s = f.mgr.stats();
    assert_eq!(s.prefetch.hits, 1);
    assert_eq!(s.cold_loads, 2, "brick was already warm");
    assert_eq!(s.prefetch.hit_rate(), 1.0);
}

#[test]
fn materialised_adapter_round_trips_and_is_cleaned_up() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    let export = dir.path().join("exports");
    let cfg = ManagerConfig {
        export_dir: Some(export.clone()),
        ..no_prefetch()
    };
    let db = Db::open(&image, StoreConfig::default()).unwrap();
    let budget = MemoryBudget::new("m", 1 << 30);
    let mgr = AdapterManager::open(&db, tiny_base(), budget.clone(), cfg.clone()).unwrap();
    let (g, _) = mgr
        .add_files("alfred", files(7, 4), "t", Expect::Absent)
        .unwrap();
    let m = mgr.materialise("alfred").unwrap();
    assert!(m.path().starts_with(&export));
    let (a, _) = audit_dir("alfred", m.path(), &tiny_base(), &AuditPolicy::default()).unwrap();
    assert_eq!(a.generation, g, "the PEFT directory holds the same adapter");
    let p = m.path().to_path_buf();
    drop(m);
    assert!(!p.exists(), "removed on drop");

    // A crash leaves an export behind: the next open sweeps it.
    let m = mgr.materialise("alfred").unwrap();
    let orphan = m.path().to_path_buf();
    std::mem::forget(m);
    assert!(orphan.exists());
    drop(mgr);
    drop(db);
    let db = Db::open(&image, StoreConfig::default()).unwrap();
    let mgr = AdapterManager::open(&db, tiny_base(), budget, cfg).unwrap();
    assert!(!orphan.exists(), "orphan swept on open");
    // The adapter survived the reopen.
    assert_eq!(mgr.current("alfred").unwrap(), Some(g));
    assert_eq!(mgr.acquire("alfred").unwrap().generation(), g);
}

#[test]
fn history_is_kept_until_pack() {
    let f = fixture(1 << 30, no_prefetch());
    let (g1, _) = f
        .mgr
        .add_files("persona", files(1, 4), "v1", Expect::Absent)
        .unwrap();
    let (g2, _) = f
        .mgr
        .add_files("persona", files(2, 4), "v2", Expect::Any)
        .unwrap();
    let (g3, _) = f
        .mgr
        .add_files("persona", files(3, 4), "v3", Expect::Any)
        .unwrap();
    let repo = f.mgr.repository();
    let h = repo.history("persona").unwrap();
    let gens: Vec<_> = h.iter().map(|r| r.generation()).collect();
    assert_eq!(gens, vec![g3, g2, g1]);
    assert_eq!(h[0].lineage.source, "v3");
    // Old versions are loadable from their snapshots until pack.
    let old = repo
        .load("persona", &h[2], &tiny_base(), &AuditPolicy::default())
        .unwrap();
    assert_eq!(old.generation, g1);
    f.db.pack(f.db.last_tid()).unwrap();
    let h = repo.history("persona").unwrap();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].generation(), g3);
    f.mgr.acquire("persona").unwrap();
}

#[test]
fn damaged_blob_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image");
    let db = Db::open(&image, StoreConfig::default()).unwrap();
    let mgr = AdapterManager::open(
        &db,
        tiny_base(),
        MemoryBudget::new("m", 1 << 30),
        no_prefetch(),
    )
    .unwrap();
    mgr.add_files("alfred", files(1, 4), "t", Expect::Absent)
        .unwrap();
    // Flip one byte in the middle of every blob file.
    let mut flipped = 0;
    for e in walk(&image) {
        if e.to_string_lossy().contains("blobs") && e.is_file() {
            let mut b = std::fs::read(&e).unwrap();
            if b.len() > 1000 {
                let mid = b.len() / 2;
                b[mid] ^= 0x40;
                std::fs::write(&e, b).unwrap();
                flipped += 1;
            }
        }
    }
    assert!(flipped > 0, "found the blob file");
    let err = mgr.acquire("alfred").unwrap_err();
    assert!(
        matches!(err, LoraError::Store(_) | LoraError::Corrupt { .. }),
        "{err}"
    );
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            let path = e.path();
            if path.is_dir() {
                out.extend(walk(&path));
            } else {
                out.push(path);
            }
        }
    }
    out
}

#[test]
fn rejected_adapters_never_reach_the_image() {
    let f = fixture(1 << 30, no_prefetch());
    let mut s = Synth::good(&tiny_base(), 4, 1);
    s.config["use_dora"] = serde_json::json!(true);
    let err = f
        .mgr
        .add_files(
            "bad",
            AdapterFiles::from_bytes(s.config_bytes(), s.safetensors_bytes()),
            "t",
            Expect::Absent,
        )
        .unwrap_err();
    assert!(matches!(err, LoraError::Rejected { .. }), "{err}");
    assert_eq!(f.mgr.current("bad").unwrap(), None);
    assert!(f.mgr.list().unwrap().is_empty());
}

#[test]
fn config_validation_rejects_inconsistent_bounds() {
    for cfg in [
        ManagerConfig {
            max_loras: 0,
            ..ManagerConfig::default()
        },
        ManagerConfig {
            max_loras: 8,
            max_cpu_loras: 4,
            ..ManagerConfig::default()
        },
        ManagerConfig {
            max_lora_rank: 16,
            ..ManagerConfig::default()
        }, // audit admits 64
    ] {
        assert!(
            matches!(cfg.validate(), Err(LoraError::InvalidConfig { .. })),
            "{cfg:?}"
        );
    }
    ManagerConfig::default().validate().unwrap();
}

#[test]
fn half_hot_formats_narrow_once_and_charge_their_bytes() {
    let formats = [
        (HotFormat::BF16, LoraDType::BF16),
        (HotFormat::F16, LoraDType::F16),
    ];
    for (format, dtype) in formats {
        for storage in [HotStorage::SharedHost, HotStorage::Copy] {
            let cfg = ManagerConfig {
                max_loras: 1,
                max_cpu_loras: 2,
                hot_format: format,
                hot_storage: storage,
                ..no_prefetch()
            };
            let f = fixture(1 << 30, cfg);
            f.mgr
                .add_files("a", files(3, 4), "t", Expect::Absent)
                .unwrap();
            let lease = f.mgr.acquire("a").unwrap();
            // The f32 decode plus a half-size copy, in the one warm reservation.
            let warm = bytes_of(4) * 3 / 2;
            assert_eq!(f.budget.used_by(ReservationKind::AdapterWarm), warm);
            assert_eq!(f.mgr.stats().warm_bytes, warm);
            let pin = f.mgr.pin_hot(&lease).unwrap();
            let hot = match storage {
                HotStorage::Copy => warm,
                HotStorage::SharedHost => 0,
            };
            assert_eq!(f.budget.used_by(ReservationKind::AdapterHot), hot);
            let snap = f.mgr.hot_snapshot();
            for (layer, p) in [(0, Projection::Q), (1, Projection::Down)] {
                let slot = snap.table(layer, p)[pin.slot().index()].unwrap();
                let pair = lease.adapter().weights.pair(layer, p).unwrap();
                let narrow = |v: f32| match dtype {
                    LoraDType::F16 => half::f16::from_f32(v).to_f32(),
                    _ => half::bf16::from_f32(v).to_f32(),
                };
                assert_eq!((slot.a().dtype(), slot.b().dtype()), (dtype, dtype));
                let want_a: Vec<f32> = pair.a.iter().map(|&v| narrow(v)).collect();
                // Both may be stored packed: compare element by element.
                let n_in = pair.a.len() / pair.rank;
                let got_a: Vec<f32> = (0..pair.a.len())
                    .map(|i| slot.a_at(i / n_in, i % n_in).unwrap())
                    .collect();
                assert_eq!(got_a, want_a, "A rounds to nearest");
                for (i, &v) in pair.b.iter().enumerate() {
                    let (o, j) = (i / pair.rank, i % pair.rank);
                    assert_eq!(slot.b_at(o, j), Some(narrow(v)), "B[{o}, {j}]");
                }
            }
            drop((snap, pin, lease));
            f.mgr.unload("a");
            assert_eq!(f.budget.used(), 0, "{format:?} {storage:?}: no leak");
        }
    }
}

/// A step's tables built at once hold, for the slots asked for, exactly what the
/// per-projection tables hold (the same matrices, layouts, ranks and scales), and
/// nothing for the others or past the layers built.
#[test]
fn step_tables_match_the_per_projection_tables_for_the_used_slots() {
    let config = ManagerConfig {
        max_loras: 3,
        hot_format: HotFormat::F16,
        ..no_prefetch()
    };
    let f = fixture(1 << 30, config);
    let mut pins = Vec::new();
    for (i, r) in [2usize, 4, 8].into_iter().enumerate() {
        let name = format!("a{i}");
        f.mgr
            .add_files(&name, files(10 + i as u64, r), "test", Expect::Absent)
            .unwrap();
        let lease = f.mgr.acquire(&name).unwrap();
        pins.push((f.mgr.pin_hot(&lease).unwrap(), lease));
    }
    let snap = f.mgr.hot_snapshot();
    let layers = tiny_base().num_layers;
    let (used_slot, unused_slot) = (pins[2].0.slot(), pins[0].0.slot());
    let mut used = vec![false; snap.len()];
    used[used_slot.index()] = true;
    used[pins[1].0.slot().index()] = true;
    let tables = snap.tables(layers, &used);
    let same =
        |a: Option<batos_lora::LoraSlot<'_>>, b: Option<batos_lora::LoraSlot<'_>>| match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                a.a() == b.a()
                    && a.b() == b.b()
                    && (a.a_layout(), a.b_layout(), a.rank(), a.scale())
                        == (b.a_layout(), b.b_layout(), b.rank(), b.scale())
            }
            _ => false,
        };
    for layer in 0..layers {
        for p in Projection::ALL {
            let (all, step) = (snap.table(layer, p), tables.table(layer, p));
            assert_eq!(step.len(), snap.len());
            for (i, (a, b)) in all.iter().zip(step).enumerate() {
                let want = if used[i] { *a } else { None };
                assert!(same(want, *b), "layer {layer} {p:?} slot {i}");
            }
            assert!(all[used_slot.index()].is_some());
            assert!(step[unused_slot.index()].is_none());
        }
    }
    assert!(tables.table(layers, Projection::Q).is_empty());
    // `iter` walks the same tables, layer by layer in `Projection::ALL`'s order.
    let walked: Vec<_> = tables.iter().collect();
    assert_eq!(walked.len(), layers * Projection::ALL.len());
    for (i, t) in walked.iter().enumerate() {
        let (layer, p) = (
            i / Projection::ALL.len(),
            Projection::ALL[i % Projection::ALL.len()],
        );
        assert_eq!(t.as_ptr(), tables.table(layer, p).as_ptr());
        assert_eq!(t.len(), snap.len());
    }
    // A `used` shorter than the snapshot leaves the slots past its end empty.
    let short = snap.tables(layers, &[]);
    assert!(short.table(0, Projection::Q).iter().all(Option::is_none));
}
