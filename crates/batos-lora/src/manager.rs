//! The adapter manager: names and generations over the three tiers, leases, admission
//! against the shared memory budget, prefetch and materialisation.
//!
//! Lock order (to stay deadlock-free): `warm` before `hot`; `loading` gates are taken
//! with no tier lock held; the transition model is taken alone.

use crate::audit::{audit, audit_dir, AdapterFiles, AuditPolicy, AuditReport};
use crate::error::{LoraError, Result};
use crate::hot::{HotFormat, HotWeights};
use crate::prefetch::{PrefetchPolicy, PrefetchStats, TransitionModel};
use crate::repo::{AdapterRecord, AdapterRepository, Expect};
use crate::shapes::BaseShapes;
use crate::tiers::{Hot, HotSnapshot, Resident, SlotData, Warm};
use crate::LoraAdapter;
use batos_store::Db;
use batos_types::{AdapterGeneration, MemoryBudget, ReservationKind, SlotIdx};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where hot slots keep their weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HotStorage {
    /// The slot refers to the warm copy in host memory (the CPU backend reads it in
    /// place): making an adapter hot copies nothing and reserves nothing more.
    #[default]
    SharedHost,
    /// The slot holds its own copy, reserved as `AdapterHot` (how a device slot
    /// behaves; on the CPU it models upload cost and exercises the hot budget).
    Copy,
}

/// Configuration of an [`AdapterManager`], checked by [`ManagerConfig::validate`].
#[derive(Clone, Debug, PartialEq)]
pub struct ManagerConfig {
    /// Hot slots: the most distinct adapters one batch can use.
    pub max_loras: usize,
    /// Largest rank a hot slot takes.
    pub max_lora_rank: usize,
    /// Most adapters in the warm tier (at least `max_loras`).
    pub max_cpu_loras: usize,
    /// Most decoded bytes in the warm tier (the shared budget also applies).
    pub max_cpu_bytes: u64,
    pub hot_storage: HotStorage,
    /// The precision hot slots stream A and B in (see [`HotFormat`] for the
    /// tolerance): a narrowed copy is made when an adapter enters the warm tier.
    pub hot_format: HotFormat,
    pub audit: AuditPolicy,
    pub prefetch: PrefetchPolicy,
    /// Where [`AdapterManager::materialise`] writes PEFT directories; default: the
    /// image directory's path with `.lora-export` appended.
    pub export_dir: Option<PathBuf>,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            max_loras: 8,
            max_lora_rank: 64,
            max_cpu_loras: 32,
            max_cpu_bytes: 4 << 30,
            hot_storage: HotStorage::SharedHost,
            hot_format: HotFormat::default(),
            audit: AuditPolicy::default(),
            prefetch: PrefetchPolicy::AfterUse {
                top_k: 1,
                min_probability: 0.25,
            },
            export_dir: None,
        }
    }
}

impl ManagerConfig {
    /// Checks the bounds against each other.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(LoraError::InvalidConfig {
                what: "ManagerConfig",
                reason,
            })
        };
        if self.max_loras == 0 || self.max_loras > u16::MAX as usize {
            return bad(format!("max_loras {} must be in 1..=65535", self.max_loras));
        }
        if self.max_cpu_loras < self.max_loras {
            return bad(format!(
                "max_cpu_loras {} is below max_loras {}",
                self.max_cpu_loras, self.max_loras
            ));
        }
        if self.max_lora_rank == 0 {
            return bad("max_lora_rank is zero".into());
        }
        if self.audit.max_rank > self.max_lora_rank {
            return bad(format!(
                "the audit admits rank {} but hot slots take at most {}",
                self.audit.max_rank, self.max_lora_rank
            ));
        }
        if let PrefetchPolicy::AfterUse {
            min_probability, ..
        } = self.prefetch
        {
            if !(0.0..=1.0).contains(&min_probability) {
                return bad(format!(
                    "min_probability {min_probability} is not in [0, 1]"
                ));
            }
        }
        Ok(())
    }
}

/// Counters and sizes, for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoraStats {
    pub warm_adapters: usize,
    pub warm_bytes: u64,
    pub hot_filled: usize,
    pub hot_slots: usize,
    /// Acquires served from the warm tier.
    pub warm_hits: u64,
    /// Loads from the image (demand and prefetch).
    pub cold_loads: u64,
    pub prefetch: PrefetchStats,
}

#[derive(Default)]
struct Counters {
    warm_hits: AtomicU64,
    cold_loads: AtomicU64,
    prefetch_issued: AtomicU64,
    prefetch_hits: AtomicU64,
    prefetch_wasted: AtomicU64,
}

struct Inner {
    repo: AdapterRepository,
    base: BaseShapes,
    budget: MemoryBudget,
    config: ManagerConfig,
    warm: Mutex<Warm>,
    hot: Mutex<Hot>,
    /// One gate per generation being loaded: concurrent loads of one adapter do the
    /// work once.
    loading: Mutex<HashMap<AdapterGeneration, Arc<Mutex<()>>>>,
    /// Per-name locks: add/replace/delete/unload of one name are serialised.
    name_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    model: Mutex<TransitionModel>,
    counters: Counters,
    export_root: PathBuf,
}

/// Many adapters over one base model, across the cold (image), warm (host RAM) and hot
/// (slot) tiers. Cheap to clone; `Send + Sync`.
#[derive(Clone)]
pub struct AdapterManager {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for AdapterManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdapterManager")
            .field("stats", &self.stats())
            .finish()
    }
}

/// A running request's hold on one adapter generation: its decoded weights stay alive
/// (and their bytes reserved) until the lease drops, whatever happens to the name.
#[derive(Clone, Debug)]
pub struct AdapterLease {
    resident: Arc<Resident>,
}

impl AdapterLease {
    /// The generation this lease pins.
    pub fn generation(&self) -> AdapterGeneration {
        self.resident.generation()
    }

    /// The name it was acquired under.
    pub fn name(&self) -> &str {
        self.resident.name()
    }

    /// The decoded adapter.
    pub fn adapter(&self) -> &LoraAdapter {
        self.resident.adapter()
    }
}

/// A pin on a hot slot: the slot cannot be evicted or refilled while any pin on it
/// lives.
pub struct HotPin {
    inner: Arc<Inner>,
    slot: usize,
    generation: AdapterGeneration,
}

impl HotPin {
    /// The slot the kernels should use for this request's tokens.
    pub fn slot(&self) -> SlotIdx {
        SlotIdx(self.slot as u16)
    }

    /// The generation in the slot.
    pub fn generation(&self) -> AdapterGeneration {
        self.generation
    }
}

impl std::fmt::Debug for HotPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotPin")
            .field("slot", &self.slot)
            .field("generation", &self.generation)
            .finish()
    }
}

impl Drop for HotPin {
    fn drop(&mut self) {
        self.inner.hot.lock().unpin(self.slot);
    }
}

/// An adapter written out as a PEFT directory for an external engine; the directory
/// is removed when this is dropped (and swept on the next open after a crash).
#[derive(Debug)]
pub struct MaterialisedAdapter {
    dir: tempfile::TempDir,
    generation: AdapterGeneration,
}

impl MaterialisedAdapter {
    /// The directory holding `adapter_config.json` and `adapter_model.safetensors`.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The generation written.
    pub fn generation(&self) -> AdapterGeneration {
        self.generation
    }
}

const EXPORT_PREFIX: &str = "batos-lora-";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Demand {
    Request,
    Prefetch,
}

impl AdapterManager {
    /// Opens the manager over the adapter repository in `db`, drawing memory from
    /// `budget`. Sweeps materialised directories left by an earlier process.
    pub fn open(
        db: &Db,
        base: BaseShapes,
        budget: MemoryBudget,
        config: ManagerConfig,
    ) -> Result<Self> {
        base.validate()?;
        config.validate()?;
        let repo = AdapterRepository::open(db)?;
        let export_root = config.export_dir.clone().unwrap_or_else(|| {
            let mut p = db.path().as_os_str().to_owned();
            p.push(".lora-export");
            PathBuf::from(p)
        });
        sweep_exports(&export_root)?;
        let inner = Inner {
            repo,
            base,
            budget,
            warm: Mutex::new(Warm::new(config.max_cpu_loras, config.max_cpu_bytes)),
            hot: Mutex::new(Hot::new(config.max_loras)),
            config,
            loading: Mutex::default(),
            name_locks: Mutex::default(),
            model: Mutex::default(),
            counters: Counters::default(),
            export_root,
        };
        Ok(AdapterManager {
            inner: Arc::new(inner),
        })
    }

    /// The cold tier.
    pub fn repository(&self) -> &AdapterRepository {
        &self.inner.repo
    }

    /// The base model's geometry adapters are audited against.
    pub fn base(&self) -> &BaseShapes {
        &self.inner.base
    }

    fn name_lock(&self, name: &str) -> Arc<Mutex<()>> {
        self.inner
            .name_locks
            .lock()
            .entry(name.to_string())
            .or_default()
            .clone()
    }

    /// Audits the PEFT directory `dir` and stores it under `name` in the image (one
    /// transaction), if `expect` holds. Returns the new generation and the audit's
    /// report (warnings). Requests already running keep their generation.
    pub fn add_dir(
        &self,
        name: &str,
        dir: &Path,
        expect: Expect,
    ) -> Result<(AdapterGeneration, AuditReport)> {
        let files = AdapterFiles::read_dir(dir, &self.inner.config.audit)?;
        self.add_files(name, files, &dir.display().to_string(), expect)
    }

    /// [`AdapterManager::add_dir`] for files already in memory.
    pub fn add_files(
        &self,
        name: &str,
        files: AdapterFiles,
        source: &str,
        expect: Expect,
    ) -> Result<(AdapterGeneration, AuditReport)> {
        if name.is_empty() {
            return Err(LoraError::InvalidConfig {
                what: "adapter name",
                reason: "empty".into(),
            });
        }
        let (adapter, report) =
            audit(&files, &self.inner.base, &self.inner.config.audit).map_err(|report| {
                LoraError::Rejected {
                    name: name.into(),
                    report,
                }
            })?;
        let config_json = files.config.unwrap_or_default();
        let gate = self.name_lock(name);
        let _g = gate.lock();
        let record = self
            .inner
            .repo
            .put(name, &adapter, &config_json, source, expect)?;
        if let Some(prev) = &record.lineage.previous {
            if prev.generation != record.generation {
                self.retire(name, AdapterGeneration(prev.generation));
            }
        }
        Ok((adapter.generation, report))
    }

    /// Deletes `name` from the image (one transaction) if `expect` holds, and drops
    /// it from the warm and hot tiers; running requests keep their leases.
    pub fn delete(&self, name: &str, expect: Expect) -> Result<AdapterGeneration> {
        let gate = self.name_lock(name);
        let _g = gate.lock();
        let record = self.inner.repo.delete(name, expect)?;
        self.retire(name, record.generation());
        self.inner.model.lock().forget(name);
        Ok(record.generation())
    }

    /// Drops `name` from the warm and hot tiers (it stays in the image). Entries in use
    /// go when their last lease or pin does. Returns how many warm entries it dropped.
    pub fn unload(&self, name: &str) -> usize {
        let gate = self.name_lock(name);
        let _g = gate.lock();
        let mut warm = self.inner.warm.lock();
        let gens = warm.generations_named(name);
        for g in &gens {
            if let Some(e) = warm.remove(*g) {
                self.note_eviction(&e);
            }
        }
        self.inner.hot.lock().retire(|s| s.name == name);
        gens.len()
    }

    fn retire(&self, name: &str, g: AdapterGeneration) {
        let mut warm = self.inner.warm.lock();
        if let Some(e) = warm.remove(g) {
            self.note_eviction(&e);
        }
        self.inner
            .hot
            .lock()
            .retire(|s| s.generation == g && s.name == name);
    }

    fn note_eviction(&self, e: &crate::tiers::Evicted) {
        if e.unused_prefetch {
            self.inner
                .counters
                .prefetch_wasted
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The generation `name` points to now.
    pub fn current(&self, name: &str) -> Result<Option<AdapterGeneration>> {
        Ok(self.inner.repo.get(name)?.map(|r| r.generation()))
    }

    /// Every adapter name with its current generation.
    pub fn list(&self) -> Result<Vec<(String, AdapterGeneration)>> {
        Ok(self
            .inner
            .repo
            .list()?
            .into_iter()
            .map(|(n, r)| (n, r.generation()))
            .collect())
    }

    /// Leases the current generation of `name`, loading it cold → warm if needed
    /// (admitted against the budget first). Then, by the prefetch policy, promotes its
    /// likely successors.
    pub fn acquire(&self, name: &str) -> Result<AdapterLease> {
        let record = self
            .inner
            .repo
            .get(name)?
            .ok_or_else(|| LoraError::UnknownAdapter { name: name.into() })?;
        let resident = self.ensure_warm(name, &record, Demand::Request)?;
        self.inner.model.lock().observe(name);
        if let PrefetchPolicy::AfterUse {
            top_k,
            min_probability,
        } = self.inner.config.prefetch
        {
            let next = self.inner.model.lock().predict(name, top_k);
            for (n, p) in next {
                if p >= min_probability && n != name {
                    if let Err(e) = self.prefetch(&n) {
                        tracing::debug!(adapter = %n, error = %e, "prefetch skipped");
                    }
                }
            }
        }
        Ok(AdapterLease { resident })
    }

    /// Promotes `name` cold → warm without leasing it. Returns whether it loaded
    /// anything (false when already warm).
    pub fn prefetch(&self, name: &str) -> Result<bool> {
        let record = self
            .inner
            .repo
            .get(name)?
            .ok_or_else(|| LoraError::UnknownAdapter { name: name.into() })?;
        if self.inner.warm.lock().contains(record.generation()) {
            return Ok(false);
        }
        self.ensure_warm(name, &record, Demand::Prefetch)?;
        Ok(true)
    }

    /// Feeds recorded history (adapter names in use order) to the transition model.
    pub fn learn<S: AsRef<str>>(&self, history: impl IntoIterator<Item = S>) {
        self.inner.model.lock().learn(history);
    }

    fn ensure_warm(
        &self,
        name: &str,
        record: &AdapterRecord,
        demand: Demand,
    ) -> Result<Arc<Resident>> {
        let g = record.generation();
        if let Some(hit) = self.warm_hit(g, demand) {
            return Ok(hit);
        }
        let gate = self.inner.loading.lock().entry(g).or_default().clone();
        let _loading = gate.lock();
        // Someone may have loaded it while we waited at the gate.
        if let Some(hit) = self.warm_hit(g, demand) {
            return Ok(hit);
        }
        let result = self.load_warm(name, record, demand);
        self.inner.loading.lock().remove(&g);
        let resident = result?;
        let c = &self.inner.counters;
        c.cold_loads.fetch_add(1, Ordering::Relaxed);
        if demand == Demand::Prefetch {
            c.prefetch_issued.fetch_add(1, Ordering::Relaxed);
        }
        tracing::debug!(adapter = name, generation = %g.short(), bytes = record.decoded_bytes, "cold → warm");
        Ok(resident)
    }

    /// Admits, loads and inserts one generation (the caller holds its loading gate).
    fn load_warm(
        &self,
        name: &str,
        record: &AdapterRecord,
        demand: Demand,
    ) -> Result<Arc<Resident>> {
        let bytes = record.decoded_bytes;
        let format = self.inner.config.hot_format;
        let admitted = bytes + format.extra_bytes_estimate(bytes);
        let mut reservation = self.admit_warm(name, admitted)?;
        let loaded = self
            .inner
            .repo
            .load(name, record, &self.inner.base, &self.inner.config.audit)
            .and_then(|a| {
                if a.bytes() == bytes {
                    Ok(a)
                } else {
                    Err(LoraError::Corrupt {
                        name: name.into(),
                        reason: format!("decodes to {} bytes, the record says {bytes}", a.bytes()),
                    })
                }
            });
        let loaded = loaded.map(|a| {
            let hot = (!format.is_f32()).then(|| HotWeights::convert(&a.weights, format));
            (a, hot)
        });
        let mut warm = self.inner.warm.lock();
        warm.remove_pending(admitted);
        let (adapter, hot) = loaded?;
        let exact = adapter.bytes() + hot.as_ref().map_or(0, HotWeights::bytes);
        if exact > admitted {
            // The estimate was short (int8 row scales on very narrow matrices).
            reservation
                .grow(exact - admitted)
                .map_err(|source| LoraError::Admission {
                    name: name.into(),
                    bytes: exact,
                    source,
                })?;
        } else {
            reservation.shrink(admitted - exact);
        }
        let resident = Arc::new(Resident::new(name.into(), adapter, hot, reservation));
        warm.insert(resident.clone(), demand == Demand::Prefetch);
        Ok(resident)
    }

    fn warm_hit(&self, g: AdapterGeneration, demand: Demand) -> Option<Arc<Resident>> {
        let hit = self.inner.warm.lock().get(g, demand == Demand::Request)?;
        if demand == Demand::Request {
            let c = &self.inner.counters;
            c.warm_hits.fetch_add(1, Ordering::Relaxed);
            if hit.was_prefetched {
                c.prefetch_hits.fetch_add(1, Ordering::Relaxed);
            }
        }
        Some(hit.resident)
    }

    /// Makes room for `bytes` in the warm tier and reserves them in the budget,
    /// evicting idle adapters LRU-first (warm entries, then unpinned hot slots that
    /// keep warm entries alive). Registers the load as pending on success.
    fn admit_warm(&self, name: &str, bytes: u64) -> Result<batos_types::Reservation> {
        loop {
            let mut warm = self.inner.warm.lock();
            if warm.would_exceed(bytes) {
                if let Some(e) = warm.evict_idle_lru() {
                    self.note_eviction(&e);
                    continue;
                }
                if self.inner.hot.lock().evict_lru_unpinned().is_some() {
                    continue;
                }
                return Err(LoraError::WarmFull {
                    name: name.into(),
                    count: warm.len(),
                    bytes: warm.bytes(),
                    max_count: warm.max_count,
                    max_bytes: warm.max_bytes,
                });
            }
            match self
                .inner
                .budget
                .reserve(ReservationKind::AdapterWarm, bytes)
            {
                Ok(r) => {
                    warm.add_pending(bytes);
                    return Ok(r);
                }
                Err(source) => {
                    if let Some(e) = warm.evict_idle_lru() {
                        self.note_eviction(&e);
                        continue;
                    }
                    if self.inner.hot.lock().evict_lru_unpinned().is_some() {
                        continue;
                    }
                    return Err(LoraError::Admission {
                        name: name.into(),
                        bytes,
                        source,
                    });
                }
            }
        }
    }

    /// Puts the lease's generation in a hot slot (if it is not there already) and pins
    /// it. Fails with [`LoraError::SlotsBusy`] when every slot is pinned — an expected
    /// outcome: the scheduler waits for a slot.
    pub fn pin_hot(&self, lease: &AdapterLease) -> Result<HotPin> {
        let g = lease.generation();
        let name = lease.name();
        let rank = lease.adapter().weights.max_rank();
        if rank > self.inner.config.max_lora_rank {
            return Err(LoraError::RankAboveSlots {
                name: name.into(),
                rank,
                max: self.inner.config.max_lora_rank,
            });
        }
        loop {
            let mut hot = self.inner.hot.lock();
            if let Some(i) = hot.find(g) {
                if let Some(s) = &mut hot.slots[i] {
                    s.pins += 1;
                }
                return Ok(self.pin(i, g));
            }
            let data = match self.inner.config.hot_storage {
                HotStorage::SharedHost => SlotData::Shared(lease.resident.clone()),
                HotStorage::Copy => {
                    let bytes = lease.resident.bytes();
                    match self
                        .inner
                        .budget
                        .reserve(ReservationKind::AdapterHot, bytes)
                    {
                        Ok(r) => SlotData::Copied {
                            weights: lease.adapter().weights.clone(),
                            hot: lease.resident.hot().cloned(),
                            _reservation: r,
                        },
                        Err(source) => {
                            // Free memory: an idle hot copy first, else an idle warm entry.
                            if hot.evict_lru_unpinned().is_some() {
                                continue;
                            }
                            drop(hot);
                            let freed = self.inner.warm.lock().evict_idle_lru();
                            match freed {
                                Some(e) => {
                                    self.note_eviction(&e);
                                    continue;
                                }
                                None => {
                                    return Err(LoraError::Admission {
                                        name: name.into(),
                                        bytes,
                                        source,
                                    })
                                }
                            }
                        }
                    }
                }
            };
            let Some(i) = hot.free_slot().or_else(|| hot.evict_lru_unpinned()) else {
                return Err(LoraError::SlotsBusy {
                    name: name.into(),
                    slots: hot.slots.len(),
                });
            };
            hot.fill(i, name.into(), g, data);
            if let Some(s) = &mut hot.slots[i] {
                s.pins += 1;
            }
            tracing::debug!(adapter = name, slot = i, "warm → hot");
            return Ok(self.pin(i, g));
        }
    }

    fn pin(&self, slot: usize, generation: AdapterGeneration) -> HotPin {
        HotPin {
            inner: self.inner.clone(),
            slot,
            generation,
        }
    }

    /// The hot slots as the kernels will read them this step.
    pub fn hot_snapshot(&self) -> HotSnapshot {
        self.inner.hot.lock().snapshot()
    }

    /// Writes the current generation of `name` from the image into a fresh PEFT
    /// directory (config as stored, weights as canonical f32 safetensors), for an
    /// external engine such as vLLM (`/v1/load_lora_adapter` with `lora_path`).
    pub fn materialise(&self, name: &str) -> Result<MaterialisedAdapter> {
        let record = self
            .inner
            .repo
            .get(name)?
            .ok_or_else(|| LoraError::UnknownAdapter { name: name.into() })?;
        let root = &self.inner.export_root;
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| LoraError::Io { op, path, source }
        };
        std::fs::create_dir_all(root).map_err(io("creating export directory", root))?;
        let safe: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(64)
            .collect();
        let dir = tempfile::Builder::new()
            .prefix(&format!("{EXPORT_PREFIX}{safe}-"))
            .tempdir_in(root)
            .map_err(io("creating export directory", root))?;
        let cfg = dir.path().join(crate::audit::CONFIG_FILE);
        std::fs::write(&cfg, &record.config_json).map_err(io("writing", &cfg))?;
        let wpath = dir.path().join(crate::audit::WEIGHTS_FILE);
        let mut f = std::fs::File::create(&wpath).map_err(io("writing", &wpath))?;
        let txn = self.inner.repo.db().begin();
        txn.open_blob(&record.blob)?.copy_to(&mut f)?;
        f.sync_all().map_err(io("writing", &wpath))?;
        Ok(MaterialisedAdapter {
            dir,
            generation: record.generation(),
        })
    }

    /// Sizes and counters.
    pub fn stats(&self) -> LoraStats {
        let (warm_adapters, warm_bytes) = {
            let w = self.inner.warm.lock();
            (w.len(), w.bytes())
        };
        let (hot_filled, hot_slots) = {
            let h = self.inner.hot.lock();
            (h.filled(), h.slots.len())
        };
        let c = &self.inner.counters;
        LoraStats {
            warm_adapters,
            warm_bytes,
            hot_filled,
            hot_slots,
            warm_hits: c.warm_hits.load(Ordering::Relaxed),
            cold_loads: c.cold_loads.load(Ordering::Relaxed),
            prefetch: PrefetchStats {
                issued: c.prefetch_issued.load(Ordering::Relaxed),
                hits: c.prefetch_hits.load(Ordering::Relaxed),
                wasted: c.prefetch_wasted.load(Ordering::Relaxed),
            },
        }
    }

    /// The audit policy adapters are checked against.
    pub fn audit_policy(&self) -> &AuditPolicy {
        &self.inner.config.audit
    }

    /// Audits a directory against this manager's base and policy without storing it.
    pub fn audit_dir(&self, name: &str, dir: &Path) -> Result<(LoraAdapter, AuditReport)> {
        audit_dir(name, dir, &self.inner.base, &self.inner.config.audit)
    }
}

/// Removes materialised directories an earlier process left behind. The image is
/// locked by one process at a time, so every such directory under its export root is
/// an orphan.
fn sweep_exports(root: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(LoraError::Io {
                op: "sweeping export directory",
                path: root.to_path_buf(),
                source,
            })
        }
    };
    let mut swept = 0;
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(EXPORT_PREFIX) {
            let p = e.path();
            std::fs::remove_dir_all(&p).map_err(|source| LoraError::Io {
                op: "removing orphaned export",
                path: p.clone(),
                source,
            })?;
            swept += 1;
        }
    }
    if swept > 0 {
        tracing::info!(swept, root = %root.display(), "removed orphaned materialised adapters");
    }
    Ok(())
}
