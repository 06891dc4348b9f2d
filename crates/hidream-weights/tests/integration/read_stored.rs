//! `Checkpoint::read_stored`: a tensor's stored bytes by positioned read, as a GPU loader's
//! staging buffer takes them; a range past the tensor and a shard truncated under the run are
//! typed errors, not faults.

use hidream_weights::{Checkpoint, WeightsError};

use super::util::{two_tensor_file, write_files};

fn le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn reads_the_stored_bytes_at_any_offset() {
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), &[("model.safetensors", two_tensor_file())]);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let mut whole = [0u8; 12];
    checkpoint.read_stored("b", 0, &mut whole).unwrap();
    assert_eq!(whole.to_vec(), le(&[3.0, 4.0, 5.0]));
    let mut middle = [0u8; 5];
    checkpoint.read_stored("b", 3, &mut middle).unwrap();
    assert_eq!(middle, whole[3..8]);
    let mut a = [0u8; 8];
    checkpoint.read_stored("a", 0, &mut a).unwrap();
    assert_eq!(a.to_vec(), le(&[1.0, 2.0]));
    checkpoint.read_stored("a", 8, &mut []).unwrap();
}

#[test]
fn a_range_past_the_tensor_or_a_missing_tensor_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), &[("model.safetensors", two_tensor_file())]);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    // `a` is followed by `b` in the file: reading past `a`'s end must not return `b`'s bytes.
    let error = checkpoint.read_stored("a", 4, &mut [0u8; 8]).unwrap_err();
    assert!(matches!(&error, WeightsError::BadOffsets { tensor, .. } if tensor == "a"), "{error}");
    let error = checkpoint.read_stored("c", 0, &mut [0u8; 4]).unwrap_err();
    assert!(matches!(&error, WeightsError::MissingTensor { .. }), "{error}");
}

#[test]
fn a_shard_truncated_under_the_run_is_shard_changed() {
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), &[("model.safetensors", two_tensor_file())]);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let path = dir.path().join("model.safetensors");
    let full = std::fs::metadata(&path).unwrap().len();
    // Cut the file in the middle of `b`, as a copy or a download over it would.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(full - 6).unwrap();
    let mut a = [0u8; 8];
    checkpoint.read_stored("a", 0, &mut a).unwrap();
    assert_eq!(a.to_vec(), le(&[1.0, 2.0]), "what is still there reads as before");
    let error = checkpoint.read_stored("b", 0, &mut [0u8; 12]).unwrap_err();
    match &error {
        WeightsError::ShardChanged { file, tensor, needed } => {
            assert_eq!((file.as_path(), tensor.as_str(), *needed), (path.as_path(), "b", full));
        }
        other => panic!("expected ShardChanged, got {other}"),
    }
    let message = error.to_string();
    assert!(message.contains("changed while it was in use") && message.contains("run again"), "{message}");
}
