//! `remove_partial_files`, as an interrupt handler calls it in the middle of a write. It is its
//! own test binary because it removes the partial file of *every* write under way in the process.

use std::path::Path;

use hidream_weights::{remove_partial_files, write_atomic};

fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|entry| entry.unwrap().file_name().to_string_lossy().into()).collect();
    names.sort();
    names
}

/// The handler runs on another thread: the partial file is removed, the write fails, and the
/// folder holds only what it held before.
#[test]
fn an_interrupted_write_leaves_no_partial_file() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("image.png");
    std::fs::write(dir.path().join("other.txt"), b"kept").unwrap();
    let mut seen_partial = Vec::new();
    let result = write_atomic(&target, |w| {
        w.write_all(&[1; 4096])?;
        seen_partial = listing(dir.path());
        let removed = std::thread::scope(|scope| scope.spawn(remove_partial_files).join().unwrap());
        assert_eq!(removed, 1, "the one write under way");
        w.write_all(&[2; 4096])
    });
    assert!(
        seen_partial.iter().any(|name| name.starts_with(".image.png.") && name.ends_with(".partial")),
        "{seen_partial:?}"
    );
    let err = result.unwrap_err().to_string();
    assert!(err.contains("image.png"), "{err}");
    assert_eq!(listing(dir.path()), ["other.txt"], "no image and no partial file");
    assert_eq!(remove_partial_files(), 0, "nothing is left registered");
    // A write after the interrupt is whole again.
    write_atomic(&target, |w| w.write_all(b"png")).unwrap();
    assert_eq!(std::fs::read(&target).unwrap(), b"png");
}
