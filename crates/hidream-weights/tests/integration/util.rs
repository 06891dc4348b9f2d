//! Helpers shared by the integration tests: crafting safetensors bytes and small checkpoints.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use hidream_config::TransformerConfig;
use hidream_weights::{Checkpoint, SynthOptions, SynthSummary, WeightsError};

/// A safetensors file from its header JSON and its data bytes.
pub fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// One header entry, `"name": {...}`.
pub fn entry(name: &str, dtype: &str, shape: &[usize], offsets: (usize, usize)) -> String {
    format!(r#""{name}":{{"dtype":"{dtype}","shape":{shape:?},"data_offsets":[{},{}]}}"#, offsets.0, offsets.1)
}

/// A valid file with two f32 tensors, `a` of 2 elements and `b` of 3.
pub fn two_tensor_file() -> Vec<u8> {
    let header = format!("{{{},{}}}", entry("a", "F32", &[2], (0, 8)), entry("b", "F32", &[3], (8, 20)));
    let data: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    raw_file(&header, &data)
}

/// diffusers' index JSON for `(tensor, shard)` pairs.
pub fn index_json(weight_map: &[(&str, &str)]) -> Vec<u8> {
    let map: HashMap<&str, &str> = weight_map.iter().copied().collect();
    serde_json::to_vec(&serde_json::json!({ "metadata": { "total_size": 0 }, "weight_map": map })).unwrap()
}

/// Writes `files` (relative path, bytes) under `dir`.
pub fn write_files(dir: &Path, files: &[(&str, Vec<u8>)]) {
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
}

/// Opens `path` and loads every tensor as f32, as a long run would.
pub fn open_and_load_all(path: &Path) -> Result<Checkpoint, WeightsError> {
    let checkpoint = Checkpoint::open(path)?;
    for name in checkpoint.tensor_names() {
        checkpoint.load(name, DType::F32, &Device::Cpu)?;
    }
    Ok(checkpoint)
}

/// The tiny preset written as a synthetic checkpoint into `dir/name`.
pub fn tiny_checkpoint(dir: &Path, name: &str, options: SynthOptions) -> SynthSummary {
    hidream_weights::write_synthetic(&dir.join(name), &TransformerConfig::tiny(), &options).unwrap()
}

/// Every tensor of a checkpoint in f32, by name.
pub fn load_all(checkpoint: &Checkpoint) -> HashMap<String, Tensor> {
    checkpoint.tensor_names().map(|n| (n.to_owned(), checkpoint.load(n, DType::F32, &Device::Cpu).unwrap())).collect()
}

/// The values of a tensor, flattened, as f32.
pub fn values(tensor: &Tensor) -> Vec<f32> {
    tensor.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

/// Every file under `dir`, relative, with its bytes.
pub fn read_dir_bytes(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (PathBuf::from(p.file_name().unwrap()), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}
