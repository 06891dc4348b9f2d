//! Property tests: no file content makes opening or loading panic; errors are fine.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;

use super::util::{index_json, open_and_load_all, write_files};

/// One way of damaging a valid file.
#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte (the position wraps around the file length).
    Flip { at: usize, mask: u8 },
    /// Keep only the first `len` bytes.
    Truncate { len: usize },
    /// Replace the 8-byte header length.
    SetHeaderLen(u64),
    /// Add a small signed amount to the header length.
    NudgeHeaderLen(i64),
    /// Append bytes.
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), 1..=255u8).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        2 => any::<usize>().prop_map(|len| Mutation::Truncate { len }),
        1 => any::<u64>().prop_map(Mutation::SetHeaderLen),
        1 => (-64i64..64).prop_map(Mutation::NudgeHeaderLen),
        1 => prop::collection::vec(any::<u8>(), 1..32).prop_map(Mutation::Append),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation) {
    match mutation {
        Mutation::Flip { at, mask } if !bytes.is_empty() => {
            let at = at % bytes.len();
            bytes[at] ^= mask;
        }
        Mutation::Flip { .. } => {}
        Mutation::Truncate { len } => bytes.truncate(len % (bytes.len() + 1)),
        Mutation::SetHeaderLen(len) if bytes.len() >= 8 => bytes[..8].copy_from_slice(&len.to_le_bytes()),
        Mutation::NudgeHeaderLen(delta) if bytes.len() >= 8 => {
            let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()).wrapping_add_signed(*delta);
            bytes[..8].copy_from_slice(&len.to_le_bytes());
        }
        Mutation::SetHeaderLen(_) | Mutation::NudgeHeaderLen(_) => {}
        Mutation::Append(extra) => bytes.extend_from_slice(extra),
    }
}

/// A valid file with tensors of every stored dtype this crate reads, and one it refuses.
fn valid_file(dir: &Path) -> Vec<u8> {
    let cpu = &Device::Cpu;
    let base = Tensor::arange(0f32, 6.0, cpu).unwrap().reshape((2, 3)).unwrap();
    let tensors = HashMap::from([
        ("a.weight".to_owned(), base.clone()),
        ("b.weight".to_owned(), base.to_dtype(DType::BF16).unwrap()),
        ("c.weight".to_owned(), base.to_dtype(DType::F16).unwrap().flatten_all().unwrap()),
        ("d.scalar".to_owned(), Tensor::new(1.5f64, cpu).unwrap()),
    ]);
    let path = dir.join("valid.safetensors");
    hidream_weights::write_tensors(&path, &tensors).unwrap();
    let mut bytes = std::fs::read(path).unwrap();
    // Append a refused dtype by hand, as the last tensor of the data section.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + header_len]).unwrap().trim_end();
    let data_len = bytes.len() - 8 - header_len;
    let extra = format!(r#","ids":{{"dtype":"I64","shape":[1],"data_offsets":[{data_len},{}]}}}}"#, data_len + 8);
    let header = format!("{}{extra}", &header[..header.len() - 1]);
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header.as_bytes());
    file.extend_from_slice(&bytes.split_off(8 + header_len));
    file.extend_from_slice(&[0; 8]);
    file
}

fn open_file(bytes: &[u8]) -> Result<(), String> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let from_checkpoint = open_and_load_all(&path).map(drop).map_err(|err| err.to_string());
    let from_read_tensors = hidream_weights::read_tensors(&path, &Device::Cpu).map(drop).map_err(|e| e.to_string());
    from_checkpoint.and(from_read_tensors)
}

#[test]
fn the_base_file_is_valid_except_for_its_integer_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let err = open_file(&valid_file(dir.path())).unwrap_err();
    assert!(err.contains("tensor `ids`") && err.contains("I64"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = open_file(&bytes);
    }

    #[test]
    fn random_bytes_after_a_plausible_length_never_panic(
        header in "\\{[ -~]{0,120}\\}",
        data in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&data);
        let _ = open_file(&bytes);
    }

    #[test]
    fn mutated_files_never_panic(mutations in prop::collection::vec(mutation(), 1..4)) {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = valid_file(dir.path());
        for mutation in &mutations {
            apply(&mut bytes, mutation);
        }
        let _ = open_file(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]

    /// A two-shard checkpoint with one of its three files (index or shard) damaged.
    #[test]
    fn mutated_sharded_checkpoints_never_panic(
        target in 0usize..3,
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let shard = valid_file(dir.path());
        let (one, two) = ("s-00001-of-00002.safetensors", "s-00002-of-00002.safetensors");
        let map = [("a.weight", one), ("b.weight", one), ("c.weight", two), ("d.scalar", two)];
        let mut files = vec![
            ("diffusion_pytorch_model.safetensors.index.json", index_json(&map)),
            (one, shard.clone()),
            (two, shard),
        ];
        for mutation in &mutations {
            apply(&mut files[target].1, mutation);
        }
        write_files(dir.path(), &files);
        let _ = open_and_load_all(dir.path());
    }
}
