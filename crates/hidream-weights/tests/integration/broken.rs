//! Every malformed input is a typed error that names the file and the tensor and says what to do.

use std::path::Path;

use candle_core::{DType, Device};
use hidream_config::{SizeModel, TransformerConfig};
use hidream_weights::{Checkpoint, SynthOptions, WeightsError};

use super::util::{entry, index_json, open_and_load_all, raw_file, tiny_checkpoint, two_tensor_file, write_files};

/// Writes `files` into a fresh folder, opens `open` (relative to it) and loads every tensor, and
/// checks that the error's `Debug` and `Display` together contain every `expected` string.
#[track_caller]
fn check(files: &[(&str, Vec<u8>)], open: &str, expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), files);
    let got = match open_and_load_all(&dir.path().join(open)) {
        Ok(checkpoint) => format!("ok {checkpoint:?}"),
        Err(err) => format!("{err:?}\n{err}"),
    };
    for want in expected {
        assert!(got.contains(want), "opening {open:?}: expected {want:?} in\n{got}");
    }
}

const SHARD_1: &str = "diffusion_pytorch_model-00001-of-00002.safetensors";
const SHARD_2: &str = "diffusion_pytorch_model-00002-of-00002.safetensors";
const INDEX: &str = "diffusion_pytorch_model.safetensors.index.json";

#[test]
fn folders_and_indexes() {
    let good = two_tensor_file;
    check(&[], "", &["NoWeights", "pass the `transformer` folder"]);
    check(&[("model_index.json", b"{}".to_vec())], "", &["NoWeights"]);
    check(&[("a.safetensors", good()), ("b.safetensors", good())], "", &["AmbiguousWeights", "pass one file"]);
    check(&[("only.safetensors", good())], "", &["ok", "only.safetensors", "n_tensors: 2"]);
    check(&[("diffusion_pytorch_model.safetensors", good()), ("other.safetensors", good())], "", &["ok"]);
    check(&[("transformer/x.safetensors", good())], "", &["ok", "transformer/x.safetensors"]);
    check(&[("transformer/notes.txt", vec![])], "", &["NoWeights", "transformer"]);
    check(&[(SHARD_1, good()), (INDEX, index_json(&[("a", SHARD_1), ("b", SHARD_1)]))], "", &["ok", "n_files: 1"]);
    check(&[(SHARD_1, good()), (INDEX, index_json(&[("a", SHARD_1), ("b", SHARD_1)]))], INDEX, &["ok"]);
    check(
        &[(SHARD_1, good()), (INDEX, index_json(&[("a", SHARD_1), ("b", SHARD_2)]))],
        "",
        &["MissingShard", "tensor: \"b\"", SHARD_2, "re-download the shard"],
    );
    check(
        &[(SHARD_1, good()), (INDEX, index_json(&[("a", SHARD_1), ("c", SHARD_1)]))],
        "",
        &["NotInShard", "tensor: \"c\"", SHARD_1, "re-download both"],
    );
    check(&[(INDEX, b"{\"weight_map\": [".to_vec())], "", &["MalformedIndex", INDEX, "re-download"]);
    check(&[(INDEX, b"{\"metadata\": {}}".to_vec())], "", &["MalformedIndex", "weight_map"]);
    check(&[(INDEX, index_json(&[]))], "", &["MalformedIndex", "names no tensor"]);
    check(&[(INDEX, index_json(&[("a", "../escape.safetensors")]))], "", &["MalformedIndex", "not a file name"]);
}

#[test]
fn headers_and_data() {
    let a = entry("a", "F32", &[2], (0, 8));
    let eight_bytes = vec![0u8; 8];
    let mut truncated = two_tensor_file();
    truncated.truncate(truncated.len() - 3);
    let mut oversized = two_tensor_file();
    let too_long = (oversized.len() as u64).to_le_bytes();
    oversized[..8].copy_from_slice(&too_long);
    let cases: Vec<(Vec<u8>, Vec<&str>)> = vec![
        (two_tensor_file(), vec!["ok"]),
        (truncated, vec!["Truncated", "tensor: \"b\"", "needed: 20", "actual: 17", "re-download the shard"]),
        (vec![], vec!["MalformedHeader", "fewer than the 8"]),
        (raw_file("{\"a\": {\"dtype\": ", &[]), vec!["MalformedHeader", "not a safetensors JSON header"]),
        (raw_file("[1, 2]", &[]), vec!["MalformedHeader"]),
        (raw_file(&format!("{{{a}}}\u{0}"), &eight_bytes), vec!["MalformedHeader"]),
        (oversized, vec!["HeaderTooLarge", "re-download it"]),
        (
            raw_file(&format!("{{{a},{}}}", entry("b", "F32", &[2], (4, 12))), &[0; 12]),
            vec!["BadOffsets", "tensor: \"b\"", "overlapping `a`"],
        ),
        (
            raw_file(&format!("{{{}}}", entry("a", "F32", &[2], (1_000_000, 1_000_008))), &eight_bytes),
            vec!["BadOffsets", "tensor: \"a\"", "gap"],
        ),
        (raw_file(&format!("{{{a}}}"), &[0; 4]), vec!["Truncated", "tensor: \"a\"", "needed: 8", "actual: 4"]),
        (raw_file(&format!("{{{a}}}"), &[0; 12]), vec!["BadOffsets", "4 bytes of data follow"]),
        (
            raw_file(&format!("{{{}}}", entry("ids", "I64", &[1], (0, 8))), &eight_bytes),
            vec!["UnsupportedDtype", "tensor: \"ids\"", "I64", "only F32, F16, BF16 and F64"],
        ),
        (
            raw_file(&format!("{{{}}}", entry("q", "F8_E4M3", &[8], (0, 8))), &eight_bytes),
            vec!["UnsupportedDtype", "tensor: \"q\""],
        ),
    ];
    for (bytes, expected) in cases {
        check(&[("broken.safetensors", bytes)], "broken.safetensors", &expected);
    }
    // The same file as a shard, found through the index, still names the shard file.
    let mut truncated = two_tensor_file();
    truncated.truncate(truncated.len() - 14);
    check(
        &[(SHARD_1, truncated), (INDEX, index_json(&[("a", SHARD_1), ("b", SHARD_1)]))],
        "",
        &["Truncated", SHARD_1, "tensor: \"a\"", "needed: 8, actual: 6"],
    );
}

/// A header length over safetensors' 100 MB limit is refused even when the file is that large
/// (a sparse file, so the test stays cheap).
#[test]
fn header_over_the_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("huge.safetensors");
    std::fs::write(&path, 150_000_000u64.to_le_bytes()).unwrap();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(200_000_000).unwrap();
    match Checkpoint::open(&path).unwrap_err() {
        WeightsError::HeaderTooLarge { file, declared, available } => {
            assert_eq!((file, declared, available), (path, 150_000_000, 100_000_000));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn missing_or_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    write_files(dir.path(), &[("x.safetensors", two_tensor_file())]);
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let err = checkpoint.config().unwrap_err();
    assert!(matches!(&err, WeightsError::MissingConfig { path } if path == &dir.path().join("config.json")), "{err}");
    assert!(err.to_string().contains("no config.json"), "{err}");

    write_files(dir.path(), &[("config.json", br#"{"patch_size": 2}"#.to_vec())]);
    let err = checkpoint.config().unwrap_err();
    assert!(matches!(err, WeightsError::Config(_)), "{err:?}");
    assert!(err.to_string().contains("caption_channels"), "{err}");
}

/// A checkpoint that does not fit the config the model is built from: through `validate`, before
/// any long work, and through the `VarBuilder`, where candle's error carries ours.
#[test]
fn checkpoint_that_does_not_match_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let summary = tiny_checkpoint(dir.path(), "tiny", SynthOptions { max_shard_bytes: 1 << 16, ..Default::default() });
    let checkpoint = Checkpoint::open(&summary.dir).unwrap();
    checkpoint.validate(&SizeModel::new(&TransformerConfig::tiny())).unwrap();

    let validate = |edit: fn(&mut TransformerConfig)| {
        let mut config = TransformerConfig::tiny();
        edit(&mut config);
        checkpoint.validate(&SizeModel::new(&config)).unwrap_err()
    };
    match validate(|c| c.text_emb_dim = 8) {
        WeightsError::ShapeMismatch { file, tensor, expected, actual } => {
            assert_eq!(tensor, "p_embedder.pooled_embedder.linear_1.weight");
            assert_eq!((expected, actual), (vec![32, 8], vec![32, 16]));
            assert!(file.starts_with(&summary.dir), "{}", file.display());
        }
        other => panic!("{other:?}"),
    }
    match validate(|c| c.num_routed_experts = 5) {
        WeightsError::MissingTensor { tensor, file } => {
            assert_eq!(tensor, "double_stream_blocks.0.block.ff_i.experts.4.w1.weight");
            assert!(file.ends_with("diffusion_pytorch_model.safetensors.index.json"), "{}", file.display());
        }
        other => panic!("{other:?}"),
    }

    let vb = checkpoint.var_builder(DType::F32, &Device::Cpu);
    let linear = vb.pp("x_embedder").pp("proj");
    assert_eq!(linear.get((32, 16), "weight").unwrap().dims(), &[32, 16]);
    let err = linear.get((16, 32), "weight").unwrap_err();
    match WeightsError::from_candle(&err) {
        Some(WeightsError::ShapeMismatch { tensor, expected, actual, .. }) => {
            assert_eq!(
                (tensor.as_str(), expected.as_slice(), actual.as_slice()),
                ("x_embedder.proj.weight", &[16, 32][..], &[32, 16][..])
            );
        }
        other => panic!("{other:?} from {err}"),
    }
    assert!(err.to_string().contains("the model expects [16, 32]"), "{err}");
    let err = linear.get(32, "no_such_bias").unwrap_err();
    assert!(
        matches!(WeightsError::from_candle(&err), Some(WeightsError::MissingTensor { tensor, .. }) if tensor == "x_embedder.proj.no_such_bias"),
        "{err}"
    );
    assert!(linear.contains_tensor("bias") && !linear.contains_tensor("no_such_bias"));

    let prefixes = vec!["t_embedder.".to_owned(), "double_stream_blocks.9.".to_owned()];
    match checkpoint.load_prefixes(&prefixes, DType::F32, &Device::Cpu).unwrap_err() {
        WeightsError::NoTensorUnderPrefix { prefix, .. } => assert_eq!(prefix, "double_stream_blocks.9."),
        other => panic!("{other:?}"),
    }
}

#[test]
fn unreadable_paths() {
    let err = Checkpoint::open(Path::new("/nonexistent/hidream/checkpoint")).unwrap_err();
    assert!(matches!(err, WeightsError::Io { .. }), "{err:?}");
    let err = hidream_weights::read_tensors(Path::new("/nonexistent/x.safetensors"), &Device::Cpu).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/x.safetensors"), "{err}");
}
