//! A shard truncated while a run has it open (a copy or a download over the file): every read of
//! tensor data is a positioned read, so each way of loading a tensor past the new end is a typed
//! `ShardChanged` error naming the file and the tensor, never a SIGBUS from a mapped page that no
//! longer exists. (Through the map, the same loads killed the test process with SIGBUS.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use hidream_weights::{Checkpoint, UnitBuffer, WeightsError};

/// `small` (4 values) then `big` (64 Ki f32: 256 KiB, many pages), and the path.
fn checkpoint_with_a_big_tensor(dir: &Path) -> PathBuf {
    let path = dir.join("model.safetensors");
    let small = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu).unwrap();
    let big = Tensor::arange(0f32, 65536.0, &Device::Cpu).unwrap().reshape((256, 256)).unwrap();
    let tensors = HashMap::from([("a_small".to_owned(), small), ("b_big".to_owned(), big)]);
    hidream_weights::write_tensors(&path, &tensors).unwrap();
    path
}

fn assert_shard_changed(result: Result<impl std::fmt::Debug, WeightsError>, path: &Path, how: &str) {
    match result {
        Err(WeightsError::ShardChanged { file, tensor, needed }) => {
            assert_eq!((file.as_path(), tensor.as_str()), (path, "b_big"), "{how}");
            assert!(needed > std::fs::metadata(path).unwrap().len(), "{how}: needed {needed}");
        }
        other => panic!("{how}: expected ShardChanged, got {other:?}"),
    }
}

#[test]
fn every_load_past_the_new_end_is_shard_changed() {
    let dir = tempfile::tempdir().unwrap();
    let path = checkpoint_with_a_big_tensor(dir.path());
    let checkpoint = Checkpoint::open(&path).unwrap();
    let before = checkpoint.load("b_big", DType::F32, &Device::Cpu).unwrap();

    // safetensors writes tensors of one dtype in name order, so `b_big` is the file's last 256 KiB.
    // Keep its first 4 KiB: its other 63 pages are gone.
    let big_start = std::fs::metadata(&path).unwrap().len() - 4 * 65536;
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(big_start + 4096).unwrap();

    // What is still in the file reads as before.
    let small = checkpoint.load("a_small", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(small.to_vec1::<f32>().unwrap(), [1.0, 2.0, 3.0, 4.0]);
    let rows = checkpoint.load_rows("b_big", &[0, 3], DType::F32, &Device::Cpu).unwrap();
    let expected = before.to_vec2::<f32>().unwrap();
    assert_eq!(rows.to_vec2::<f32>().unwrap(), [expected[0].clone(), expected[3].clone()]);

    // Each path into the lost pages: the stored dtype, a conversion, a caller's slice, a unit
    // buffer (a streaming slot), rows of an embedding table.
    assert_shard_changed(checkpoint.load("b_big", DType::F32, &Device::Cpu), &path, "load as stored");
    assert_shard_changed(checkpoint.load("b_big", DType::BF16, &Device::Cpu), &path, "load converted");
    assert_shard_changed(checkpoint.read_into("b_big", &mut vec![0f32; 65536]), &path, "read_into");
    let mut buffer = UnitBuffer::new(4 * 65536 + 16, DType::F32, &Device::Cpu).unwrap();
    assert_shard_changed(
        checkpoint.load_into_buffer(&["a_small", "b_big"], &mut buffer).map(|loaded| loaded.bytes),
        &path,
        "load_into_buffer",
    );
    assert_shard_changed(checkpoint.load_rows("b_big", &[255], DType::F32, &Device::Cpu), &path, "load_rows");

    let message = checkpoint.load("b_big", DType::F32, &Device::Cpu).unwrap_err().to_string();
    assert!(message.contains("changed while it was in use") && message.contains("b_big"), "{message}");
}
