use std::fmt;

/// Stable numeric id of an adapter name inside one engine (names live in the store).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AdapterId(pub u32);

/// Content hash of one adapter version (its weights and config).
///
/// Two adapters with equal generations are the same adapter, whatever their names; the
/// prefix cache keys blocks by generation so a hit never crosses adapters.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AdapterGeneration(pub [u8; 32]);

impl AdapterGeneration {
    /// The first 8 bytes in hex: enough to tell generations apart in logs.
    pub fn short(&self) -> String {
        self.0[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Debug for AdapterGeneration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AdapterGeneration({})", self.short())
    }
}

impl fmt::Display for AdapterGeneration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Index of a KV-cache block in its pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId(pub u32);

impl BlockId {
    /// The block's index as a `usize`, for addressing pool storage.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Index of a hot adapter slot that the batched LoRA kernels read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SlotIdx(pub u16);

impl SlotIdx {
    /// The slot's index as a `usize`.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

/// Engine-wide id of one generation request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// Element type of a tensor as stored or computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    F32,
    F16,
    BF16,
    /// 4-bit integers packed eight to a `u32` with per-group scales and zero points (AWQ).
    Int4,
}

impl DType {
    /// Bytes per element for byte-addressable types; `None` for packed sub-byte types.
    pub fn size_in_bytes(self) -> Option<usize> {
        match self {
            DType::F32 => Some(4),
            DType::F16 | DType::BF16 => Some(2),
            DType::Int4 => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::Int4 => "int4",
        })
    }
}

/// Where computation runs. Every variant exists on every build; a backend that was not
/// compiled in answers with a typed error when used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum DeviceKind {
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal.
    Cuda(usize),
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceKind::Cpu => f.write_str("cpu"),
            DeviceKind::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}
