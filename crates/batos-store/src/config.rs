//! Validated configuration of a [`crate::Db`].

use crate::error::{Result, StoreError};

/// What `open` does when the directory does not exist (or is empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpenMode {
    /// Create a new image if the directory is missing or empty.
    #[default]
    CreateIfMissing,
    /// Fail with `ImageMissing` unless an image is already there.
    OpenExisting,
}

/// Whether long operations (pack, verify, index rebuild) draw a progress bar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProgressMode {
    /// Draw on stderr when it is a terminal.
    #[default]
    Auto,
    /// Never draw.
    Hidden,
}

/// Configuration of an image handle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Create or require an existing image.
    pub open_mode: OpenMode,
    /// Progress bars for long operations.
    pub progress: ProgressMode,
    /// Memory the sled index may use for its page cache, in bytes (at least 1 MiB).
    pub index_cache_bytes: u64,
    /// Attempts `Db::transact` makes before giving up on conflicts (at least 1).
    pub max_attempts: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            open_mode: OpenMode::CreateIfMissing,
            progress: ProgressMode::Auto,
            index_cache_bytes: 64 << 20,
            max_attempts: 8,
        }
    }
}

impl StoreConfig {
    /// Checks the values; `Db::open` calls this.
    pub fn validate(&self) -> Result<()> {
        if self.index_cache_bytes < (1 << 20) {
            return Err(StoreError::Config {
                detail: format!(
                    "index_cache_bytes must be at least 1 MiB, got {}",
                    self.index_cache_bytes
                ),
            });
        }
        if self.max_attempts == 0 {
            return Err(StoreError::Config {
                detail: "max_attempts must be at least 1".into(),
            });
        }
        Ok(())
    }
}
