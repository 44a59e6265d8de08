use std::fmt;

use batos_types::AdapterGeneration;

/// Content key of one full block in the prefix cache: a 256-bit BLAKE3 hash chained over
/// the parent block's hash, the adapter generation (or none) and the block's token ids.
///
/// Equal hashes mean equal token prefixes under the same adapter, so a hit never crosses
/// adapters and never differs in any token (up to a 2^-128 collision bound).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockHash(pub [u8; 32]);

/// Domain separation: a hash from any other use of BLAKE3 can never equal ours.
const CONTEXT: &str = "batos-kv 2026 prefix-cache block hash v1";

impl BlockHash {
    /// The hash of a full block of `tokens` that follows the block hashed `parent`
    /// (`None` for a sequence's first block), computed under `adapter`.
    ///
    /// ```
    /// use batos_kv::BlockHash;
    /// use batos_types::AdapterGeneration;
    /// let a = BlockHash::chain(None, &[1, 2, 3, 4], None);
    /// let lora = Some(AdapterGeneration([7; 32]));
    /// assert_ne!(a, BlockHash::chain(None, &[1, 2, 3, 4], lora.as_ref()));
    /// assert_ne!(a, BlockHash::chain(None, &[1, 2, 3, 5], None));
    /// let b = BlockHash::chain(Some(&a), &[5, 6, 7, 8], None);
    /// assert_ne!(b, BlockHash::chain(None, &[5, 6, 7, 8], None));
    /// ```
    pub fn chain(
        parent: Option<&BlockHash>,
        tokens: &[u32],
        adapter: Option<&AdapterGeneration>,
    ) -> BlockHash {
        let mut h = blake3::Hasher::new_derive_key(CONTEXT);
        // Tag bytes keep `None` apart from any value, and the length prefix keeps token
        // runs of different block sizes apart.
        match parent {
            None => h.update(&[0]),
            Some(p) => h.update(&[1]).update(&p.0),
        };
        match adapter {
            None => h.update(&[0]),
            Some(g) => h.update(&[1]).update(&g.0),
        };
        h.update(&(tokens.len() as u64).to_le_bytes());
        // Little-endian bytes, fed in stack-sized runs (one `update` per token is slow).
        let mut buf = [0u8; 256];
        for run in tokens.chunks(buf.len() / 4) {
            for (dst, t) in buf.chunks_exact_mut(4).zip(run) {
                dst.copy_from_slice(&t.to_le_bytes());
            }
            h.update(&buf[..run.len() * 4]);
        }
        BlockHash(*h.finalize().as_bytes())
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BlockHash(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str(")")
    }
}
