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
    /// Revisions committed since the last index checkpoint before the next one is
    /// written (at least 1). After a crash, open replays at most about this many
    /// revisions' records; after a clean close, none.
    pub index_checkpoint_revisions: u64,
    /// Attempts `Db::transact` makes before giving up on conflicts (at least 1).
    pub max_attempts: u32,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            open_mode: OpenMode::CreateIfMissing,
            progress: ProgressMode::Auto,
            index_checkpoint_revisions: 65_536,
            max_attempts: 8,
        }
    }
}

impl StoreConfig {
    /// Checks the values; `Db::open` calls this.
    pub fn validate(&self) -> Result<()> {
        if self.index_checkpoint_revisions == 0 {
            return Err(StoreError::Config {
                detail: "index_checkpoint_revisions must be at least 1".into(),
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
