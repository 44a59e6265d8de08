//! The crate's only `unsafe`: read-only memory maps of model files.

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use crate::error::{ModelError, Result};

/// Maps `path` read-only into memory.
pub(crate) fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| ModelError::io("open", path, e))?;
    // SAFETY: the map is read-only and private to this process. Another process truncating or
    // rewriting the file while it is mapped is outside our control (as for every mmap user);
    // model files are written once and then only read, and every offset we use is
    // bounds-checked against the length observed at mapping time.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| ModelError::io("map", path, e))?;
    Ok(map)
}
