//! The one module with `unsafe` code: mapping a checkpoint file into memory.
//!
//! The map is read, through the safe [`MappedFile::bytes`], only to parse the header at open;
//! tensor data goes through [`MappedFile::read_at`] (`pread`), which a truncated file cannot fault.
#![allow(unsafe_code)]

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use crate::Result;
use crate::error::io_error;

/// A read-only memory map of a whole file.
#[derive(Debug)]
pub(crate) struct MappedFile {
    map: Mmap,
    /// The same file, for positioned reads that do not touch the map.
    file: File,
}

impl MappedFile {
    /// Maps the file at `path`.
    ///
    /// The crate's documented contract (see [`crate::Checkpoint::open`]) is that checkpoint files
    /// are not modified or truncated while they are open, as with every mmap-based loader
    /// (candle's `MmapedSafetensors`, Python's `safetensors.safe_open`).
    pub(crate) fn open(path: &Path) -> Result<MappedFile> {
        let file = File::open(path).map_err(io_error(path))?;
        // SAFETY: `map` requires that nobody modifies or truncates the file while it is mapped.
        // Checkpoint files are read-only inputs; `Checkpoint::open` documents this requirement to
        // its callers, and this crate itself never writes a file it has open (the synthetic writers
        // write into a fresh temporary path and rename it into place).
        let map = unsafe { map(&file) }.map_err(io_error(path))?;
        Ok(MappedFile { map, file })
    }

    /// The bytes of the whole file.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Reads `out.len()` bytes at `offset` with `pread`, not through the map: a file truncated
    /// since it was opened gives an `UnexpectedEof` error here where the map would fault.
    #[cfg(unix)]
    pub(crate) fn read_at(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, out, offset)
    }

    /// Copies the bytes from the map where there is no `pread`.
    #[cfg(not(unix))]
    pub(crate) fn read_at(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::UnexpectedEof)?;
        let bytes = self.map.get(start..start + out.len()).ok_or(std::io::ErrorKind::UnexpectedEof)?;
        out.copy_from_slice(bytes);
        Ok(())
    }
}

/// Maps `file` read-only.
///
/// # Safety
///
/// The caller must ensure that the file is not modified or truncated, by this process or any
/// other, while the returned map is alive: the map would observe the change (breaking the
/// immutability of the returned `&[u8]`) or fault with `SIGBUS` on access past a new end.
unsafe fn map(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the contract above is forwarded unchanged to the caller.
    unsafe { Mmap::map(file) }
}
