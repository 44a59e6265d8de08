//! The one OS call std does not offer. Kept tiny: every `unsafe` lives here.

use std::fs::File;

/// Asks the kernel to start writing back `len` bytes at `offset` of `file` without waiting.
/// Purely a throughput hint for long blob writes (the disk works while we hash the next
/// chunk); durability still comes from the fsync in `BlobWriter::finish`.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(off), Ok(n)) = (i64::try_from(offset), i64::try_from(len)) else {
            return;
        };
        // SAFETY: sync_file_range takes a file descriptor and three integers and touches no
        // memory of ours; the descriptor stays open for the duration of the borrow of
        // `file`. A failure only means no early writeback, so the result is ignored.
        let _ =
            unsafe { libc::sync_file_range(file.as_raw_fd(), off, n, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, offset, len);
    }
}

/// Maps `file` read-only. The store only maps its own index checkpoints, which are
/// immutable once renamed into place (a new checkpoint is a new file), so the mapping
/// never sees the file change under it.
pub(crate) fn map_readonly(file: &File) -> std::io::Result<memmap2::Mmap> {
    // SAFETY: memmap2 requires that the file is not modified (truncated or written) while
    // mapped, or reads of the map are undefined. Checkpoint files are written completely
    // under a temp name, fsynced and renamed, and never opened for writing again; a
    // replacement is a new inode, so an existing mapping keeps the old, unchanged one.
    unsafe { memmap2::Mmap::map(file) }
}
