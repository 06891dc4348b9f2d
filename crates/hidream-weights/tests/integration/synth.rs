//! Synthetic checkpoints and inputs: layout, validity, determinism and value ranges.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use hidream_config::{DType as StorageDType, Init, SizeModel, TransformerConfig, Unit};
use hidream_test_support::bits;
use hidream_weights::{Checkpoint, InputSpec, SynthOptions, WeightsError};

use super::util::{load_all, read_dir_bytes, tiny_checkpoint, values, write_files};

const SMALL_SHARDS: SynthOptions = SynthOptions { seed: 7, dtype: StorageDType::BF16, max_shard_bytes: 1 << 16 };

#[test]
fn sharded_tiny_checkpoint_opens_and_validates() {
    let dir = tempfile::tempdir().unwrap();
    let summary = tiny_checkpoint(dir.path(), "tiny", SMALL_SHARDS);
    let sizes = SizeModel::new(&TransformerConfig::tiny());
    assert!(summary.shards.len() > 2, "{summary:?}");
    // The summary's figures against what the files hold: the data sections of the shards (each
    // file less its 8-byte length and its header), and the tensors their headers name.
    let data_bytes: u64 = summary.shards.iter().map(|shard| data_section_bytes(shard)).sum();
    assert_eq!(data_bytes, summary.total_bytes);
    assert_eq!(data_bytes, sizes.total_bytes(StorageDType::BF16));

    let index: serde_json::Value = serde_json::from_slice(
        &std::fs::read(summary.dir.join("diffusion_pytorch_model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(index["metadata"]["total_size"], summary.total_bytes);
    assert_eq!(index["weight_map"].as_object().unwrap().len(), summary.n_tensors);
    for shard in &summary.shards {
        let bytes = std::fs::metadata(shard).unwrap().len();
        assert!(
            bytes < (1 << 16) + 8192 || index_has_one_tensor(&index, shard),
            "{} is {bytes} bytes",
            shard.display()
        );
    }

    let checkpoint = Checkpoint::open(&summary.dir).unwrap();
    assert_eq!(checkpoint.dir(), summary.dir);
    assert_eq!(checkpoint.files().count(), summary.shards.len());
    assert_eq!(checkpoint.tensor_names().count(), summary.n_tensors);
    assert_eq!(checkpoint.tensor_names().count(), sizes.all_tensors().count());
    assert_eq!(checkpoint.config().unwrap(), TransformerConfig::tiny());
    checkpoint.validate(&sizes).unwrap();
    let tensors = load_all(&checkpoint);
    assert_eq!(tensors.len(), summary.n_tensors);
    for spec in sizes.all_tensors() {
        assert_eq!(tensors[&spec.name].dims(), spec.shape.as_slice(), "{}", spec.name);
        let info = checkpoint.tensor_info(&spec.name).unwrap();
        assert_eq!((info.dtype, &info.shape), (safetensors::Dtype::BF16, &spec.shape));
        assert!(summary.shards.contains(&info.file), "{}", info.file.display());
    }

    // A unit is exactly the tensors the size model lists for it.
    for unit in [Unit::Embedders, Unit::CaptionProjection(4), Unit::DoubleBlock(1), Unit::SingleBlock(0)] {
        let loaded = checkpoint.load_prefixes(&unit.prefixes(), DType::F16, &Device::Cpu).unwrap();
        let mut names: Vec<_> = loaded.keys().cloned().collect();
        let mut expected: Vec<_> = sizes.tensors(unit).iter().map(|s| s.name.clone()).collect();
        names.sort();
        expected.sort();
        assert_eq!(names, expected, "{unit}");
        assert!(loaded.values().all(|t| t.dtype() == DType::F16));
    }
}

/// The bytes after a safetensors file's header: its length, less 8 and the declared header size.
fn data_section_bytes(file: &std::path::Path) -> u64 {
    let bytes = std::fs::read(file).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    bytes.len() as u64 - 8 - header_len
}

fn index_has_one_tensor(index: &serde_json::Value, shard: &std::path::Path) -> bool {
    let name = shard.file_name().unwrap().to_str().unwrap();
    index["weight_map"].as_object().unwrap().values().filter(|v| *v == name).count() == 1
}

#[test]
fn one_shard_is_written_as_diffusers_single_file() {
    let dir = tempfile::tempdir().unwrap();
    let summary =
        tiny_checkpoint(dir.path(), "single", SynthOptions { dtype: StorageDType::F32, ..Default::default() });
    let names: Vec<_> = read_dir_bytes(&summary.dir).into_iter().map(|(name, _)| name).collect();
    assert_eq!(names, ["config.json", "diffusion_pytorch_model.safetensors"].map(std::path::PathBuf::from));
    let checkpoint = Checkpoint::open(&summary.dir).unwrap();
    checkpoint.validate(&SizeModel::new(&TransformerConfig::tiny())).unwrap();
    let name = "final_layer.linear.weight";
    assert_eq!(checkpoint.tensor_info(name).unwrap().dtype, safetensors::Dtype::F32);
}

#[test]
fn values_are_deterministic_and_independent_of_the_shard_layout() {
    let dir = tempfile::tempdir().unwrap();
    let first = tiny_checkpoint(dir.path(), "first", SMALL_SHARDS);
    let again = tiny_checkpoint(dir.path(), "again", SMALL_SHARDS);
    let other_seed = tiny_checkpoint(dir.path(), "other_seed", SynthOptions { seed: 8, ..SMALL_SHARDS });
    let one_shard =
        tiny_checkpoint(dir.path(), "one_shard", SynthOptions { max_shard_bytes: u64::MAX, ..SMALL_SHARDS });
    assert_eq!(read_dir_bytes(&first.dir), read_dir_bytes(&again.dir));

    let load = |summary: &hidream_weights::SynthSummary| load_all(&Checkpoint::open(&summary.dir).unwrap());
    let (first, other_seed, one_shard) = (load(&first), load(&other_seed), load(&one_shard));
    let same = |a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>, name: &str| {
        bits(&a[name]).unwrap() == bits(&b[name]).unwrap()
    };
    for name in first.keys() {
        assert!(same(&first, &one_shard, name), "{name} depends on the shard layout");
        let is_ones = name.contains("rms_norm");
        assert_eq!(same(&first, &other_seed, name), is_ones, "{name} with another seed");
    }
}

#[test]
fn values_follow_the_init_of_each_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let config = TransformerConfig::tiny();
    for dtype in StorageDType::ALL {
        let summary = tiny_checkpoint(dir.path(), dtype.as_str(), SynthOptions { dtype, ..SMALL_SHARDS });
        let checkpoint = Checkpoint::open(&summary.dir).unwrap();
        for spec in SizeModel::new(&config).all_tensors() {
            let stored = values(&checkpoint.load(&spec.name, DType::F32, &Device::Cpu).unwrap());
            match spec.init {
                Init::Uniform { bound } => {
                    // Rounding is monotonic, so values within ±bound stay within ±round(bound).
                    let bound = round_to(bound as f32, dtype);
                    let worst = stored.iter().fold(0f32, |m, v| m.max(v.abs()));
                    assert!(worst <= bound, "{} ({dtype}): |{worst}| > {bound}", spec.name);
                    assert!(worst > 0.5 * bound, "{} ({dtype}): values do not spread: max {worst}", spec.name);
                }
                Init::Ones => assert!(stored.iter().all(|v| *v == 1.0), "{}", spec.name),
                Init::Normal { std } => {
                    let n = stored.len() as f64;
                    let rms = (stored.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / n).sqrt();
                    assert!((rms / std - 1.0).abs() < 0.5, "{}: rms {rms} for std {std}", spec.name);
                }
            }
        }
    }
}

fn round_to(value: f32, dtype: StorageDType) -> f32 {
    match dtype {
        StorageDType::F32 => value,
        StorageDType::F16 => half::f16::from_f32(value).to_f32(),
        StorageDType::BF16 => half::bf16::from_f32(value).to_f32(),
    }
}

/// bf16 widens to f32 exactly: the loaded f32 values are the stored bits, shifted; loaded as
/// bf16, they are the stored bits.
#[test]
fn bf16_storage_loads_into_f32_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let summary = tiny_checkpoint(dir.path(), "bf16", SMALL_SHARDS);
    let checkpoint = Checkpoint::open(&summary.dir).unwrap();
    let name = "double_stream_blocks.1.block.ff_i.experts.3.w2.weight";
    let info = checkpoint.tensor_info(name).unwrap();
    let file_bytes = std::fs::read(&info.file).unwrap();
    let file = safetensors::SafeTensors::deserialize(&file_bytes).unwrap();
    let stored: Vec<u16> =
        file.tensor(name).unwrap().data().chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    let loaded = bits(&checkpoint.load(name, DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert_eq!(loaded.len(), info.shape.iter().product::<usize>());
    assert_eq!(stored.len(), loaded.len());
    assert!(stored.iter().zip(&loaded).all(|(s, l)| u64::from(*s) << 16 == *l));
    let as_bf16 = checkpoint.load(name, DType::BF16, &Device::Cpu).unwrap();
    assert_eq!(as_bf16.dtype(), DType::BF16);
    assert!(stored.iter().map(|s| u64::from(*s)).eq(bits(&as_bf16).unwrap()));
}

#[test]
fn overwrites_only_previous_synthetic_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let config = TransformerConfig::tiny();
    let target = dir.path().join("out");
    hidream_weights::write_synthetic(&target, &config, &SMALL_SHARDS).unwrap();
    let single = SynthOptions { max_shard_bytes: u64::MAX, ..SMALL_SHARDS };
    hidream_weights::write_synthetic(&target, &config, &single).unwrap();
    let names: Vec<_> = read_dir_bytes(&target).into_iter().map(|(name, _)| name).collect();
    assert_eq!(names.len(), 2, "the old shards are gone: {names:?}");
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    hidream_weights::write_synthetic(&dir.path().join("empty"), &config, &single).unwrap();

    write_files(dir.path(), &[("foreign/config.json", b"{}".to_vec()), ("file", vec![])]);
    for refused in ["foreign", "file"] {
        let err = hidream_weights::write_synthetic(&dir.path().join(refused), &config, &single).unwrap_err();
        assert!(matches!(err, WeightsError::WouldOverwrite { .. }), "{err:?}");
    }
    assert_eq!(std::fs::read(dir.path().join("foreign/config.json")).unwrap(), b"{}");
    let err = hidream_weights::write_synthetic(&target, &config, &SynthOptions { max_shard_bytes: 0, ..single });
    assert!(matches!(err, Err(WeightsError::InvalidOption { what: "max_shard_bytes", .. })), "{err:?}");
    let mut left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    left.sort();
    assert_eq!(left, ["empty", "file", "foreign", "out"], "no partial folder is left behind");
}

#[test]
fn synthetic_inputs_have_diffusers_shapes() {
    let config = TransformerConfig::tiny();
    let spec = InputSpec { batch: 2, height: 8, width: 12, t5_tokens: 5, llama_tokens: 7, seed: 3 };
    let inputs = hidream_weights::synthetic_inputs(&config, &spec).unwrap();
    let shapes: HashMap<&str, Vec<usize>> = inputs.iter().map(|(k, v)| (k.as_str(), v.dims().to_vec())).collect();
    let expected = HashMap::from([
        ("hidden_states", vec![2, 4, 8, 12]),
        ("timesteps", vec![2]),
        ("encoder_hidden_states_t5", vec![2, 5, 32]),
        ("encoder_hidden_states_llama3", vec![3, 2, 7, 24]),
        ("pooled_embeds", vec![2, 16]),
    ]);
    assert_eq!(shapes, expected);
    assert!(inputs.values().all(|t| t.dtype() == DType::F32 && t.device().is_cpu()));
    assert!(values(&inputs["timesteps"]).iter().all(|t| (0.0..1000.0).contains(t)));

    let again = hidream_weights::synthetic_inputs(&config, &spec).unwrap();
    let other = hidream_weights::synthetic_inputs(&config, &InputSpec { seed: 4, ..spec }).unwrap();
    for name in expected.keys() {
        assert_eq!(bits(&inputs[*name]).unwrap(), bits(&again[*name]).unwrap(), "{name}");
        assert_ne!(bits(&inputs[*name]).unwrap(), bits(&other[*name]).unwrap(), "{name}");
    }

    for (bad, what) in [(InputSpec { batch: 0, ..spec }, "batch"), (InputSpec { width: 7, ..spec }, "width")] {
        let err = hidream_weights::synthetic_inputs(&config, &bad).unwrap_err();
        assert!(matches!(err, WeightsError::InvalidOption { what: w, .. } if w == what), "{err:?}");
    }
}

#[test]
fn tensor_files_round_trip_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let spec = InputSpec { batch: 1, height: 4, width: 4, t5_tokens: 2, llama_tokens: 3, seed: 0 };
    let mut tensors = hidream_weights::synthetic_inputs(&TransformerConfig::tiny(), &spec).unwrap();
    let pooled = tensors["pooled_embeds"].clone();
    tensors.insert("pooled_bf16".into(), pooled.to_dtype(DType::BF16).unwrap());
    tensors.insert("pooled_f16".into(), pooled.to_dtype(DType::F16).unwrap());
    tensors.insert("scalar_f64".into(), Tensor::new(2.5f64, &Device::Cpu).unwrap());
    let path = dir.path().join("inputs.safetensors");
    hidream_weights::write_tensors(&path, &tensors).unwrap();
    hidream_weights::write_tensors(&path, &tensors).unwrap(); // Replacing a file works too.
    let read = hidream_weights::read_tensors(&path, &Device::Cpu).unwrap();
    assert_eq!(read.len(), tensors.len());
    for (name, tensor) in &tensors {
        assert_eq!((read[name].dtype(), read[name].dims()), (tensor.dtype(), tensor.dims()), "{name}");
        assert_eq!(bits(&read[name]).unwrap(), bits(tensor).unwrap(), "{name}");
    }
    // Integer tensors (token ids, pixels) round-trip as stored; weights stay floats only.
    let ids = HashMap::from([
        ("ids".to_owned(), Tensor::new(&[1u32, 2], &Device::Cpu).unwrap()),
        ("tokens".to_owned(), Tensor::new(&[-1i64, 7], &Device::Cpu).unwrap()),
        ("pixels".to_owned(), Tensor::new(&[0u8, 255], &Device::Cpu).unwrap()),
    ]);
    let ids_path = dir.path().join("ids.safetensors");
    hidream_weights::write_tensors(&ids_path, &ids).unwrap();
    let read = hidream_weights::read_tensors(&ids_path, &Device::Cpu).unwrap();
    assert_eq!(read["ids"].to_vec1::<u32>().unwrap(), vec![1, 2]);
    assert_eq!(read["tokens"].to_vec1::<i64>().unwrap(), vec![-1, 7]);
    assert_eq!(read["pixels"].to_vec1::<u8>().unwrap(), vec![0, 255]);
    let err = Checkpoint::open(&ids_path).unwrap().load("ids", DType::F32, &Device::Cpu).unwrap_err();
    assert!(matches!(err, WeightsError::UnsupportedDtype { ref tensor, .. } if tensor == "ids"), "{err:?}");
}
