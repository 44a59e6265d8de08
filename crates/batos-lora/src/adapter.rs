//! A decoded, audited adapter: f32 A/B pairs per (layer, projection), its config and
//! its content-hash generation.

use crate::config::LoraConfig;
use crate::shapes::{BaseShapes, Projection};
use batos_kernels::cpu::lora::LoraSlot;
use batos_types::AdapterGeneration;

/// One projection's low-rank pair, decoded to f32.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair {
    pub rank: usize,
    pub scale: f32,
    /// `[rank, in]` row-major (PEFT `lora_A.weight`).
    pub a: Vec<f32>,
    /// `[out, rank]` row-major (PEFT `lora_B.weight`).
    pub b: Vec<f32>,
}

impl LoraPair {
    /// The kernels' borrowed view of this pair.
    pub fn slot(&self) -> LoraSlot<'_> {
        LoraSlot::new(&self.a, &self.b, self.rank, self.scale)
    }

    /// Bytes of f32 data held.
    pub fn bytes(&self) -> u64 {
        ((self.a.len() + self.b.len()) * 4) as u64
    }
}

/// Every pair of an adapter, indexed by (layer, projection); absent where the adapter
/// does not adapt that module.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraWeights {
    num_layers: usize,
    pairs: Vec<Option<LoraPair>>,
}

impl LoraWeights {
    /// No pairs, for a model of `num_layers` layers.
    pub fn empty(num_layers: usize) -> Self {
        LoraWeights {
            num_layers,
            pairs: vec![None; num_layers * Projection::ALL.len()],
        }
    }

    fn idx(layer: usize, p: Projection) -> usize {
        layer * Projection::ALL.len() + p.index()
    }

    /// The pair for `(layer, p)`, if the adapter adapts it.
    pub fn pair(&self, layer: usize, p: Projection) -> Option<&LoraPair> {
        if layer >= self.num_layers {
            return None;
        }
        self.pairs[Self::idx(layer, p)].as_ref()
    }

    pub(crate) fn set(&mut self, layer: usize, p: Projection, pair: LoraPair) {
        let i = Self::idx(layer, p);
        self.pairs[i] = Some(pair);
    }

    /// Puts `pair` at `(layer, p)` (for building adapters in code, e.g. a trainer);
    /// checks the layer and that `A`/`B` are whole `rank`-wide matrices. Shapes
    /// against a base model are the audit's job: in-code adapters enter the tiers
    /// through [`crate::AdapterManager::add_files`] like any other.
    pub fn insert(&mut self, layer: usize, p: Projection, pair: LoraPair) -> crate::Result<()> {
        let bad = |reason: String| {
            Err(crate::LoraError::InvalidConfig {
                what: "LoRA pair",
                reason,
            })
        };
        if layer >= self.num_layers {
            return bad(format!("layer {layer} of {}", self.num_layers));
        }
        if pair.rank == 0
            || !pair.a.len().is_multiple_of(pair.rank)
            || !pair.b.len().is_multiple_of(pair.rank)
        {
            return bad(format!(
                "rank {} does not divide A ({}) and B ({})",
                pair.rank,
                pair.a.len(),
                pair.b.len()
            ));
        }
        self.set(layer, p, pair);
        Ok(())
    }

    /// Number of layers the weights were built for.
    pub fn num_layers(&self) -> usize {
        self.num_layers
    }

    /// Every present pair with its (layer, projection), in layer-then-projection order.
    pub fn iter(&self) -> impl Iterator<Item = (usize, Projection, &LoraPair)> {
        self.pairs.iter().enumerate().filter_map(|(i, p)| {
            p.as_ref().map(|p| {
                let n = Projection::ALL.len();
                (i / n, Projection::ALL[i % n], p)
            })
        })
    }

    /// Bytes of f32 data held by all pairs.
    pub fn bytes(&self) -> u64 {
        self.iter().map(|(_, _, p)| p.bytes()).sum()
    }

    /// The largest rank of any pair (0 when empty).
    pub fn max_rank(&self) -> usize {
        self.iter().map(|(_, _, p)| p.rank).max().unwrap_or(0)
    }

    /// Number of present pairs.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether no module is adapted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An adapter that passed its audit: ready for the warm tier.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraAdapter {
    pub generation: AdapterGeneration,
    pub config: LoraConfig,
    pub weights: LoraWeights,
}

impl LoraAdapter {
    /// Builds an adapter from decoded parts, computing its generation.
    pub fn new(config: LoraConfig, weights: LoraWeights) -> Self {
        let generation = generation_of(&config, &weights);
        LoraAdapter {
            generation,
            config,
            weights,
        }
    }

    /// An adapter whose generation is already known (the cold tier: the record's
    /// generation, bound to the blob by the store's content hash).
    pub(crate) fn with_generation(
        config: LoraConfig,
        weights: LoraWeights,
        generation: AdapterGeneration,
    ) -> Self {
        LoraAdapter {
            generation,
            config,
            weights,
        }
    }

    /// Bytes of decoded weights (what the warm tier reserves).
    pub fn bytes(&self) -> u64 {
        self.weights.bytes()
    }

    /// Whether this adapter fits `base` (every pair's shapes).
    pub fn fits(&self, base: &BaseShapes) -> bool {
        self.weights.num_layers() == base.num_layers
            && self.weights.iter().all(|(_, p, pair)| {
                let (i, o) = base.dims(p);
                pair.a.len() == pair.rank * i && pair.b.len() == o * pair.rank
            })
    }
}

/// The generation: BLAKE3 over a domain tag, the canonical config, and every pair in
/// (layer, projection) order with its rank, scale and f32 little-endian data. Two
/// encodings of the same numbers (f16 file vs f32 file) give the same generation
/// exactly when they decode to the same f32 values.
pub fn generation_of(config: &LoraConfig, weights: &LoraWeights) -> AdapterGeneration {
    let mut h = blake3::Hasher::new();
    h.update(b"batos-lora generation v1\0");
    let cfg = config.canonical_bytes();
    h.update(&(cfg.len() as u64).to_le_bytes());
    h.update(&cfg);
    h.update(&(weights.num_layers() as u64).to_le_bytes());
    for (layer, p, pair) in weights.iter() {
        h.update(&(layer as u64).to_le_bytes());
        h.update(&[p.index() as u8]);
        h.update(&(pair.rank as u64).to_le_bytes());
        h.update(&pair.scale.to_le_bytes());
        for m in [&pair.a, &pair.b] {
            h.update(&(m.len() as u64).to_le_bytes());
            h.update(f32_bytes(m));
        }
    }
    AdapterGeneration(*h.finalize().as_bytes())
}

/// The little-endian bytes of an f32 slice.
pub(crate) fn f32_bytes(v: &[f32]) -> &[u8] {
    // The on-disk and hashed encodings are little-endian; so is every target batos
    // supports (x86_64, aarch64), where this cast is the identity.
    bytemuck::cast_slice(v)
}

#[cfg(not(target_endian = "little"))]
compile_error!("batos-lora assumes a little-endian target");
