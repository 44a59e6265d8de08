//! The cold tier: the adapter repository in the living image.
//!
//! A persistent B-tree maps each adapter name to an [`AdapterRecord`] (config,
//! generation, blob reference, checksum, creation time, lineage). The weights live in a
//! checksummed blob as canonical f32 PEFT safetensors. Adding, replacing and deleting
//! an adapter are each one transaction, so a crash leaves either the old or the new
//! version, never a mix. Earlier versions stay readable through the image's snapshots
//! until a pack removes them; [`AdapterRepository::history`] walks them.

use crate::adapter::LoraAdapter;
use crate::audit::{audit_parts, AdapterFiles, AuditPolicy};
use crate::error::{LoraError, Result};
use crate::peft::to_safetensors;
use crate::shapes::BaseShapes;
use batos_store::{BTree, BlobRef, Db, StoreError, Tid, Txn};
use batos_types::AdapterGeneration;
use serde::{Deserialize, Serialize};

/// The image's named root for the adapter tree.
pub const ADAPTER_TREE: &str = "batos.lora.adapters";

/// Where a version came from and what it replaced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    /// Free text supplied by the caller: a path, `forge:<run>`, ….
    pub source: String,
    /// The version this one replaced, if any.
    pub previous: Option<PreviousVersion>,
}

/// A pointer to the replaced version: readable in the snapshot at `visible_at` until
/// a pack removes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousVersion {
    pub generation: [u8; 32],
    /// A tid at which the previous version was the current one.
    pub visible_at: u64,
}

/// One adapter version as stored in the image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterRecord {
    /// Content hash of config + weights ([`crate::generation_of`]).
    pub generation: [u8; 32],
    /// The `adapter_config.json` bytes as received.
    pub config_json: Vec<u8>,
    /// Canonical f32 safetensors of the weights.
    pub blob: BlobRef,
    /// BLAKE3 of the blob's bytes, checked again on every load.
    pub checksum: [u8; 32],
    /// Milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    pub lineage: Lineage,
    /// Decoded size in bytes (what the warm tier will reserve).
    pub decoded_bytes: u64,
    /// Largest rank of any module.
    pub max_rank: u32,
}

impl AdapterRecord {
    /// The generation as the shared id type.
    pub fn generation(&self) -> AdapterGeneration {
        AdapterGeneration(self.generation)
    }
}

/// What the caller believes the name currently points to; the write happens only if
/// it is so (compare-and-set, checked inside the transaction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Whatever it points to (vLLM's `load_inplace`).
    Any,
    /// The name must be free (a plain add).
    Absent,
    /// The name must point to this generation (replace-if-unchanged).
    Generation(AdapterGeneration),
}

impl Expect {
    fn check(self, name: &str, current: Option<&AdapterRecord>) -> Result<()> {
        let actual = current.map(AdapterRecord::generation);
        let ok = match self {
            Expect::Any => true,
            Expect::Absent => actual.is_none(),
            Expect::Generation(g) => actual == Some(g),
        };
        if ok {
            Ok(())
        } else {
            Err(LoraError::GenerationConflict {
                name: name.into(),
                expected: match self {
                    Expect::Generation(g) => Some(g),
                    _ => None,
                },
                actual,
            })
        }
    }
}

/// The cold tier over a living image. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AdapterRepository {
    db: Db,
    tree: BTree<String, AdapterRecord>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl AdapterRepository {
    /// Opens (creating if needed) the adapter tree in `db`.
    pub fn open(db: &Db) -> Result<Self> {
        let tree = db.transact(|txn| BTree::named(txn, ADAPTER_TREE))?;
        Ok(AdapterRepository {
            db: db.clone(),
            tree,
        })
    }

    /// The image this repository lives in.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Stores `adapter` under `name` in one transaction, if `expect` holds. The
    /// blob and the record commit together.
    pub fn put(
        &self,
        name: &str,
        adapter: &LoraAdapter,
        config_json: &[u8],
        source: &str,
        expect: Expect,
    ) -> Result<AdapterRecord> {
        let blob_bytes = to_safetensors(&adapter.weights)?;
        let record = self.db.transact(|txn| {
            let current = self.tree.get(txn, &name.to_string())?;
            expect.check(name, current.as_ref())?;
            let blob = txn.write_blob(&mut &blob_bytes[..])?;
            let record = AdapterRecord {
                generation: adapter.generation.0,
                config_json: config_json.to_vec(),
                blob,
                // The store computed the content's BLAKE3 while writing the blob.
                checksum: blob.hash(),
                created_unix_ms: now_ms(),
                lineage: Lineage {
                    source: source.into(),
                    previous: current.map(|c| PreviousVersion {
                        generation: c.generation,
                        visible_at: txn.snapshot().get(),
                    }),
                },
                decoded_bytes: adapter.bytes(),
                max_rank: adapter.weights.max_rank() as u32,
            };
            self.tree.insert(txn, name.to_string(), record.clone())?;
            Ok::<_, LoraError>(record)
        })?;
        tracing::info!(name, generation = %adapter.generation.short(), "adapter stored in the image");
        Ok(record)
    }

    /// Removes `name` in one transaction, if `expect` holds; returns the removed record.
    pub fn delete(&self, name: &str, expect: Expect) -> Result<AdapterRecord> {
        self.db.transact(|txn| {
            let current = self.tree.get(txn, &name.to_string())?;
            let Some(current) = current else {
                return Err(LoraError::UnknownAdapter { name: name.into() });
            };
            expect.check(name, Some(&current))?;
            self.tree.remove(txn, &name.to_string())?;
            Ok(current)
        })
    }

    /// The current record of `name`.
    pub fn get(&self, name: &str) -> Result<Option<AdapterRecord>> {
        let txn = self.db.begin();
        Ok(self.tree.get(&txn, &name.to_string())?)
    }

    /// Every adapter name with its current record, in name order.
    pub fn list(&self) -> Result<Vec<(String, AdapterRecord)>> {
        let txn = self.db.begin();
        let out = self
            .tree
            .iter(&txn)?
            .collect::<std::result::Result<_, StoreError>>()?;
        Ok(out)
    }

    /// Reads `record`'s blob, checks its checksum, audits it again and checks that it
    /// decodes to the recorded generation: a cold load never serves damaged weights.
    pub fn load(
        &self,
        name: &str,
        record: &AdapterRecord,
        base: &BaseShapes,
        policy: &AuditPolicy,
    ) -> Result<LoraAdapter> {
        let txn = self.db.begin();
        self.load_in(&txn, name, record, base, policy)
    }

    fn load_in(
        &self,
        txn: &Txn,
        name: &str,
        record: &AdapterRecord,
        base: &BaseShapes,
        policy: &AuditPolicy,
    ) -> Result<LoraAdapter> {
        let corrupt = |reason: String| LoraError::Corrupt {
            name: name.into(),
            reason,
        };
        // The record's checksum must be the blob's content hash, and the reader checks
        // each chunk's CRC and that BLAKE3 at the end: the bytes are the ones audited
        // and hashed when the record was written.
        if record.checksum != record.blob.hash() {
            return Err(corrupt(
                "record checksum differs from its blob's hash".into(),
            ));
        }
        let bytes = txn.open_blob(&record.blob)?.read_all()?;
        let files = AdapterFiles::from_bytes(record.config_json.clone(), bytes);
        // Audited again: the base or the policy may have changed since it was stored.
        let (config, weights, _) =
            audit_parts(&files, base, policy).map_err(|report| LoraError::Rejected {
                name: name.into(),
                report,
            })?;
        let adapter = LoraAdapter::with_generation(config, weights, record.generation());
        Ok(adapter)
    }

    /// The versions of `name`, newest first: the current one, then each version it
    /// replaced, as long as the image still holds it (a pack ends the chain). Empty
    /// when the name does not exist now.
    pub fn history(&self, name: &str) -> Result<Vec<AdapterRecord>> {
        let mut out = Vec::new();
        let Some(mut rec) = self.get(name)? else {
            return Ok(out);
        };
        loop {
            let prev = rec.lineage.previous.clone();
            out.push(rec);
            let Some(prev) = prev else { break };
            let Some(tid) = Tid::new(prev.visible_at) else {
                break;
            };
            let snap = match self.db.snapshot_at(tid) {
                Ok(s) => s,
                Err(StoreError::SnapshotPacked { .. }) => break,
                Err(e) => return Err(e.into()),
            };
            match self.tree.get(&snap, &name.to_string())? {
                Some(r) if r.generation == prev.generation => rec = r,
                _ => break,
            }
        }
        Ok(out)
    }
}
