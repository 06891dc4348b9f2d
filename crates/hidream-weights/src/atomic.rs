//! Files that appear whole or not at all: every output of the workspace (tensor files, images,
//! JSON reports, synthetic configs) is written through [`write_atomic`].
//!
//! The bytes go to a temporary file in the target's folder (`tempfile::NamedTempFile`), which is
//! renamed onto the target only once everything is written and flushed. A failed write removes the
//! temporary file and leaves an existing target as it was; a reader never sees half a file.
//!
//! A process that is about to exit without unwinding (the command line's Ctrl-C handler) calls
//! [`remove_partial_files`] first: the temporary files of writes still under way are removed, so
//! an interrupted run leaves neither a half-written output nor a `.partial` file behind.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::{Result, WeightsError};

/// Checks, before any long work, that [`write_atomic`] can write `target`: it is not a folder and
/// its folder exists. Returns that folder.
pub fn check_writable(target: &Path) -> Result<&Path> {
    let io_error = |kind, problem: String| WeightsError::Io {
        path: target.to_owned(),
        source: std::io::Error::new(kind, problem),
    };
    if target.is_dir() {
        return Err(io_error(std::io::ErrorKind::IsADirectory, "is a folder; give the path of a file to write".into()));
    }
    let folder = match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        let problem = format!("the folder {} does not exist; create it first", folder.display());
        return Err(io_error(std::io::ErrorKind::NotFound, problem));
    }
    Ok(folder)
}

/// Writes `target` through `write`, atomically: on any error (from `write`, the disk, or the
/// final rename) the folder holds no new file and an existing `target` is untouched.
///
/// `write` gets a buffered writer; it need not flush. A `target` that is an existing folder, or
/// whose folder does not exist, is an error naming the target.
pub fn write_atomic(target: &Path, write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    let io_error = |source| WeightsError::Io { path: target.to_owned(), source };
    let folder = check_writable(target)?;
    // The prefix names the target, so that a file left by a killed process says what it was.
    let prefix = format!(".{}.", target.file_name().map(|name| name.to_string_lossy()).unwrap_or_default());
    let mut temp =
        tempfile::Builder::new().prefix(&prefix).suffix(".partial").tempfile_in(folder).map_err(|source| {
            let kind = source.kind();
            let problem =
                format!("cannot create a file in the folder {}: {}", folder.display(), std::io::Error::from(kind));
            io_error(std::io::Error::new(kind, problem))
        })?;
    let _pending = Pending::register(temp.path());
    {
        let mut writer = BufWriter::new(temp.as_file_mut());
        write(&mut writer).map_err(io_error)?;
        writer.flush().map_err(io_error)?;
    }
    temp.persist(target).map_err(|err| io_error(err.error))?;
    Ok(())
}

/// The temporary files of the writes under way in this process.
static PENDING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes the temporary file of every [`write_atomic`] still under way, for a process that exits
/// now without unwinding (an interrupt): its outputs are then either whole or absent. The writes
/// themselves fail (their rename finds no file), and the targets are untouched. Returns how many
/// files were removed.
pub fn remove_partial_files() -> usize {
    let pending = std::mem::take(&mut *PENDING.lock().unwrap_or_else(PoisonError::into_inner));
    pending.iter().filter(|path| std::fs::remove_file(path).is_ok()).count()
}

/// One entry of [`PENDING`], removed from it when the write ends either way.
struct Pending(PathBuf);

impl Pending {
    fn register(path: &Path) -> Pending {
        PENDING.lock().unwrap_or_else(PoisonError::into_inner).push(path.to_owned());
        Pending(path.to_owned())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        PENDING.lock().unwrap_or_else(PoisonError::into_inner).retain(|path| path != &self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The names in `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().file_name().to_string_lossy().into()).collect();
        names.sort();
        names
    }

    /// Each case writes through `write` onto `out.bin`, which holds `old` beforehand: success
    /// replaces it, any failure leaves `old` and no other file.
    #[test]
    fn a_failed_write_leaves_the_folder_as_it_was() {
        fn check(write: fn(&mut dyn Write) -> std::io::Result<()>, expected: std::result::Result<&[u8], &str>) {
            let dir = tempfile::tempdir().unwrap();
            let target = dir.path().join("out.bin");
            std::fs::write(&target, b"old").unwrap();
            let result = write_atomic(&target, write);
            match expected {
                Ok(bytes) => {
                    result.unwrap();
                    assert_eq!(std::fs::read(&target).unwrap(), bytes);
                }
                Err(needle) => {
                    let err = result.unwrap_err().to_string();
                    assert!(err.contains(needle) && err.contains("out.bin"), "{err}");
                    assert_eq!(std::fs::read(&target).unwrap(), b"old", "the target is not clobbered");
                }
            }
            assert_eq!(listing(dir.path()), ["out.bin"], "no stray file");
        }
        check(|w| w.write_all(b"new"), Ok(b"new"));
        check(|w| w.write_all(&[7; 1 << 20]), Ok(&[7; 1 << 20]));
        check(
            |w| {
                w.write_all(b"half")?;
                Err(std::io::Error::other("encoder failed"))
            },
            Err("encoder failed"),
        );
    }

    #[test]
    fn folders_and_missing_folders_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("sub");
        std::fs::create_dir(&folder).unwrap();
        let err = write_atomic(&folder, |w| w.write_all(b"x")).unwrap_err().to_string();
        assert!(err.contains("is a folder"), "{err}");
        let err = write_atomic(&dir.path().join("nowhere/out.bin"), |w| w.write_all(b"x")).unwrap_err().to_string();
        assert!(err.contains("nowhere"), "{err}");
        assert_eq!(listing(dir.path()), ["sub"]);
        assert!(listing(&folder).is_empty());
    }
}
