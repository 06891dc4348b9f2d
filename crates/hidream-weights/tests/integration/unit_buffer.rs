//! `Checkpoint::load_into_buffer`: a unit's tensors land in consecutive ranges of one reusable
//! buffer, as views bit-identical to `Checkpoint::load`; a later unit overwrites the buffer in
//! place; a unit larger than the buffer is a typed error. And `Checkpoint::load_rows`: a few rows
//! of a table, as the table loaded and indexed.

use candle_core::{DType, Device, Tensor};
use hidream_test_support::bits;
use hidream_weights::{Checkpoint, UnitBuffer, WeightsError};

use super::util::{entry, raw_file};

/// A file with a bf16 tensor `a` [2, 3] (with a NaN and a subnormal), an f32 tensor `b` [3], and an
/// f16 tensor `c` [5]: mixed dtypes, and `b` starts at an odd multiple of 2 bytes.
fn mixed_file() -> Vec<u8> {
    let a: Vec<u16> = vec![0x3f80, 0xc000, 0x7fc1, 0x0001, 0x8000, 0x4049];
    let b: Vec<f32> = vec![1.5, -0.0, f32::INFINITY];
    let c: Vec<u16> = vec![0x3c00, 0x0001, 0x7e01, 0xfbff, 0x0000];
    let mut data: Vec<u8> = a.iter().flat_map(|x| x.to_le_bytes()).collect();
    data.extend(b.iter().flat_map(|x| x.to_le_bytes()));
    data.extend(c.iter().flat_map(|x| x.to_le_bytes()));
    let header = format!(
        "{{{},{},{}}}",
        entry("a", "BF16", &[2, 3], (0, 12)),
        entry("b", "F32", &[3], (12, 24)),
        entry("c", "F16", &[5], (24, 34))
    );
    raw_file(&header, &data)
}

fn open(dir: &tempfile::TempDir) -> Checkpoint {
    let path = dir.path().join("unit.safetensors");
    std::fs::write(&path, mixed_file()).unwrap();
    Checkpoint::open(&path).unwrap()
}

#[test]
fn loads_into_the_buffer_bit_identical_to_load() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = open(&dir);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let mut buffer = UnitBuffer::new(14 * dtype.size_in_bytes() as u64, dtype, &Device::Cpu).unwrap();
        let loaded = checkpoint.load_into_buffer(&["a", "b", "c"], &mut buffer).unwrap();
        assert_eq!(loaded.bytes, 14 * dtype.size_in_bytes() as u64, "{dtype:?}");
        for name in ["a", "b", "c"] {
            let expected = checkpoint.load(name, dtype, &Device::Cpu).unwrap();
            let view = &loaded.tensors[name];
            assert_eq!(view.dims(), expected.dims(), "{dtype:?} {name}");
            assert_eq!(bits(view).unwrap(), bits(&expected).unwrap(), "{dtype:?} {name}");
        }
    }
}

#[test]
fn a_second_unit_overwrites_the_same_buffer() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = open(&dir);
    let mut buffer = UnitBuffer::new(6 * 4, DType::F32, &Device::Cpu).unwrap();
    let first = checkpoint.load_into_buffer(&["a"], &mut buffer).unwrap();
    let first_bits = bits(&first.tensors["a"]).unwrap();
    drop(first);
    let second = checkpoint.load_into_buffer(&["c"], &mut buffer).unwrap();
    let expected = checkpoint.load("c", DType::F32, &Device::Cpu).unwrap();
    assert_eq!(bits(&second.tensors["c"]).unwrap(), bits(&expected).unwrap());
    // The buffer itself holds the new unit now: no fresh allocation served it.
    let flat: Tensor = second.tensors["c"].flatten_all().unwrap();
    assert_ne!(bits(&flat).unwrap(), first_bits[..5].to_vec());
}

#[test]
fn a_unit_larger_than_the_buffer_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = open(&dir);
    let mut buffer = UnitBuffer::new(8 * 4, DType::F32, &Device::Cpu).unwrap();
    match checkpoint.load_into_buffer(&["a", "b", "c"], &mut buffer) {
        Err(WeightsError::BufferTooSmall { tensor, offset, needed, capacity, .. }) => {
            assert_eq!((tensor.as_str(), offset, needed, capacity), ("b", 24, 12, 32));
        }
        other => panic!("expected BufferTooSmall, got {other:?}"),
    }
    assert!(matches!(checkpoint.load_into_buffer(&["missing"], &mut buffer), Err(WeightsError::MissingTensor { .. })));
    assert!(matches!(UnitBuffer::new(8, DType::U8, &Device::Cpu), Err(WeightsError::BufferDtype { .. })));
}

/// `load_rows` reads a few rows of a 2-D table, bit-identical to loading the table and selecting
/// them; a row past the end and a tensor that is not 2-D are typed errors.
#[test]
fn rows_of_a_table_equal_the_table_indexed() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = open(&dir);
    let rows = [1u32, 0, 1, 1];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let table = checkpoint.load("a", dtype, &Device::Cpu).unwrap();
        let ids = Tensor::new(&rows[..], &Device::Cpu).unwrap();
        let expected = table.index_select(&ids, 0).unwrap();
        let picked = checkpoint.load_rows("a", &rows, dtype, &Device::Cpu).unwrap();
        assert_eq!(picked.dims(), [4, 3]);
        assert_eq!(bits(&picked).unwrap(), bits(&expected).unwrap(), "{dtype:?}");
    }
    assert!(matches!(
        checkpoint.load_rows("a", &[2], DType::F32, &Device::Cpu),
        Err(WeightsError::RowOutOfRange { row: 2, n_rows: 2, .. })
    ));
    assert!(matches!(
        checkpoint.load_rows("b", &[0], DType::F32, &Device::Cpu),
        Err(WeightsError::ShapeMismatch { .. })
    ));
}
