//! The `hidream` binary end to end: a real forward on a synthetic checkpoint, and one clear
//! `error:` line with a non-zero exit status for every bad flag or file (never a panic).

use std::path::Path;
use std::process::{Command, Output};

fn hidream(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hidream")).args(args).output().expect("the hidream binary runs")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

/// Asserts a clean failure whose `error:` line mentions `needle`.
fn check_error(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "expected failure, got success; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic instead of an error: {stderr}");
    assert!(stderr.contains(needle), "stderr does not mention `{needle}`: {stderr}");
}

#[test]
fn synth_then_forward_then_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let inputs = dir.path().join("inputs.safetensors");
    let out = dir.path().join("out.safetensors");
    let synth = hidream(&[
        "synth",
        "--preset",
        "tiny",
        "--dtype",
        "f32",
        "--out",
        path(&model),
        "--inputs",
        path(&inputs),
        // Width 12, height 8: `hidden_states` is [B, C, 8, 12].
        "--latent",
        "12x8",
        "--batch",
        "2",
        "--t5-tokens",
        "5",
        "--llama-tokens",
        "6",
    ]);
    assert!(synth.status.success(), "{}", String::from_utf8_lossy(&synth.stderr));

    let forward = hidream(&[
        "forward",
        "--model",
        path(&model),
        "--inputs",
        path(&inputs),
        "--out",
        path(&out),
        "--dtype",
        "f32",
    ]);
    assert!(forward.status.success(), "{}", String::from_utf8_lossy(&forward.stderr));
    assert!(String::from_utf8_lossy(&forward.stdout).contains("sample [2, 4, 8, 12]"));
    let sample = hidream_weights::read_tensors(&out, &candle_core::Device::Cpu).unwrap();
    assert_eq!(sample["sample"].dims(), &[2, 4, 8, 12]);
    assert_eq!(sample["sample"].dtype(), candle_core::DType::F32);

    let inspect = hidream(&["inspect", path(&model)]);
    let stdout = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success());
    assert!(stdout.contains("all 157 present"), "{stdout}");
    assert!(stdout.contains("double_stream_blocks.1"), "{stdout}");
}

#[test]
fn bad_flags_and_files_are_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let inputs = dir.path().join("inputs.safetensors");
    let out = dir.path().join("out.safetensors");
    assert!(
        hidream(&["synth", "--preset", "tiny", "--out", path(&model), "--inputs", path(&inputs), "--latent", "8x8"])
            .status
            .success()
    );

    check_error(&hidream(&["synth", "--preset", "huge", "--out", path(&out)]), "unknown preset `huge`");
    check_error(&hidream(&["synth", "--preset", "tiny", "--inputs", path(&out), "--latent", "8by8"]), "--latent");
    check_error(&hidream(&["synth", "--preset", "tiny", "--out", path(&out), "--max-shard-size", "lots"]), "lots");
    check_error(
        &hidream(&[
            "forward",
            "--model",
            path(&model),
            "--inputs",
            path(&inputs),
            "--out",
            path(&out),
            "--dtype",
            "f8",
        ]),
        "f8",
    );
    let missing = dir.path().join("nowhere");
    check_error(
        &hidream(&["forward", "--model", path(&missing), "--inputs", path(&inputs), "--out", path(&out)]),
        "nowhere",
    );

    // Inputs without `pooled_embeds`.
    let mut tensors = hidream_weights::read_tensors(&inputs, &candle_core::Device::Cpu).unwrap();
    tensors.remove("pooled_embeds");
    let partial = dir.path().join("partial.safetensors");
    hidream_weights::write_tensors(&partial, &tensors).unwrap();
    check_error(
        &hidream(&["forward", "--model", path(&model), "--inputs", path(&partial), "--out", path(&out)]),
        "pooled_embeds",
    );

    // A truncated weights file names the file.
    let weights = model.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    check_error(
        &hidream(&["forward", "--model", path(&model), "--inputs", path(&inputs), "--out", path(&out)]),
        "diffusion_pytorch_model.safetensors",
    );
    assert!(!out.exists(), "a failed forward leaves no output behind");
}

/// A model without blocks (a config edited to 0 double and 0 single blocks) is a config error
/// naming the field, in `synth` and in `forward`, not a panic in the forward.
#[test]
fn a_model_without_blocks_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let inputs = dir.path().join("inputs.safetensors");
    let out = dir.path().join("out.safetensors");
    check_error(&hidream(&["synth", "--preset", "tiny", "--layers", "0,0", "--out", path(&model)]), "num_layers");
    assert!(
        hidream(&["synth", "--preset", "tiny", "--out", path(&model), "--inputs", path(&inputs), "--latent", "8x8"])
            .status
            .success()
    );
    let config = model.join("config.json");
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["num_layers"] = 0.into();
    json["num_single_layers"] = 0.into();
    json["llama_layers"] = serde_json::json!([]);
    std::fs::write(&config, json.to_string()).unwrap();
    let output = hidream(&["forward", "--model", path(&model), "--inputs", path(&inputs), "--out", path(&out)]);
    check_error(&output, "num_layers plus num_single_layers must be at least 1");
}

/// Outputs are written whole or not at all: a run that fails leaves an existing output as it
/// was and no temporary file beside it, and an output path that cannot be written is refused
/// before the run.
#[test]
fn failed_runs_leave_outputs_alone() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    let inputs = dir.path().join("inputs.safetensors");
    assert!(
        hidream(&["synth", "--preset", "tiny", "--out", path(&model), "--inputs", path(&inputs), "--latent", "8x8"])
            .status
            .success()
    );
    let outputs = dir.path().join("outputs");
    std::fs::create_dir(&outputs).unwrap();
    let out = outputs.join("out.safetensors");
    let report = outputs.join("report.json");
    std::fs::write(&out, "old output").unwrap();
    let listing = || {
        let mut names: Vec<String> =
            std::fs::read_dir(&outputs).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        names.sort();
        names
    };
    let forward = |extra: &[&str]| {
        let args = [&["forward", "--model", path(&model), "--inputs", path(&inputs), "--out", path(&out)], extra];
        hidream(&args.concat())
    };
    // The budget is below the minimum: the run fails after loading, and the report says so.
    check_error(&forward(&["--budget", "1KiB", "--report", path(&report)]), "too small");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "old output");
    assert_eq!(listing(), ["out.safetensors", "report.json"]);
    // A report path that is a folder is refused before the run.
    let folder = outputs.join("folder.json");
    std::fs::create_dir(&folder).unwrap();
    check_error(&forward(&["--report", path(&folder)]), "is a folder");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "old output");
    // A successful run replaces the output, leaving nothing else.
    assert!(forward(&[]).status.success());
    assert!(hidream_weights::read_tensors(&out, &candle_core::Device::Cpu).unwrap().contains_key("sample"));
    assert_eq!(listing(), ["folder.json", "out.safetensors", "report.json"]);
}
