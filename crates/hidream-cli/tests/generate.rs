//! `hidream generate` end to end on the tiny pipeline of `tests/golden/pipeline` (no download):
//! every stage runs and a PNG comes out; reproduction flags reproduce diffusers' latents; bad
//! folders and flags are one clear error.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/pipeline")
}

fn hidream(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hidream")).args(args).output().expect("the hidream binary runs")
}

fn path(p: &Path) -> &str {
    p.to_str().expect("UTF-8 paths")
}

#[test]
fn generates_a_png_through_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let (model, llama) = (golden().join("model"), golden().join("llama"));
    let out = dir.path().join("fox.png");
    let report = dir.path().join("report.json");
    let latents_out = dir.path().join("latents.safetensors");
    let case = golden().join("cases/dev");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("case.json")).unwrap()).unwrap();
    let prompt = meta["prompt"].as_str().unwrap();
    let requested = format!("{}x{}", meta["requested_size"]["width"], meta["requested_size"]["height"]);
    let default_sample_size = meta["default_sample_size"].to_string();
    let steps = meta["steps"].to_string();
    // The initial noise under the key `generate --latents` reads.
    let initial = hidream_weights::read_tensors(&case.join("latents.safetensors"), &candle_core::Device::Cpu).unwrap();
    let latents_in = dir.path().join("initial.safetensors");
    let initial = std::collections::HashMap::from([("latents".to_owned(), initial["initial"].clone())]);
    hidream_weights::write_tensors(&latents_in, &initial).unwrap();
    let output = hidream(&[
        "generate",
        "--model",
        path(&model),
        "--llama",
        path(&llama),
        "--prompt",
        prompt,
        "--variant",
        "dev",
        "--steps",
        &steps,
        "--dtype",
        "f32",
        "--default-sample-size",
        &default_sample_size,
        "--size",
        &requested,
        "--latents",
        path(&latents_in),
        "--step-noise",
        path(&case.join("noise.safetensors")),
        "--output-latents",
        path(&latents_out),
        "--out",
        path(&out),
        "--report",
        path(&report),
        "--residency",
        "stream",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let image = image::open(&out).unwrap().to_rgb8();
    let size = |key: &str| meta["size"][key].as_u64().unwrap() as u32;
    assert_eq!(image.dimensions(), (size("width"), size("height")));
    assert!(stderr.contains("rescaled to"), "the size notice is printed: {stderr}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let stages: Vec<&str> = report["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["text encoders", "denoising", "vae decode"]);
    assert!(report["stages"][1]["peak_device_bytes"].as_u64().unwrap() > 0);
    // The run's peak is its largest stage's, and each stage says what it held and streamed.
    let stage_peaks: Vec<u64> =
        report["stages"].as_array().unwrap().iter().map(|s| s["peak_device_bytes"].as_u64().unwrap()).collect();
    assert_eq!(report["peak_device_bytes"].as_u64(), stage_peaks.iter().max().copied());
    let transformer = &report["transformer_stage"];
    assert!(transformer["bytes_streamed"].as_u64().unwrap() > 0, "--residency stream streams: {transformer}");
    assert!(transformer["peak_weight_bytes"].as_u64().unwrap() > 0, "{transformer}");
    assert!(report["vae_stage"]["weight_bytes"].as_u64().unwrap() > 0, "{}", report["vae_stage"]);
    let text: Vec<&str> =
        report["text_stages"].as_array().unwrap().iter().map(|s| s["encoder"].as_str().unwrap()).collect();
    assert_eq!(text, ["CLIP-L", "CLIP-G", "T5", "Llama"]);
    assert!(report["text_stages"].as_array().unwrap().iter().all(|s| s["bytes_streamed"].as_u64().unwrap() > 0));

    // The reproduction flags reproduce the golden run: same prompt, noise and schedule.
    let ours = hidream_weights::read_tensors(&latents_out, &candle_core::Device::Cpu).unwrap();
    let theirs = hidream_weights::read_tensors(&case.join("latents.safetensors"), &candle_core::Device::Cpu).unwrap();
    let diff = (&ours["latents"] - &theirs["final"]).unwrap().abs().unwrap().max_all().unwrap();
    let diff = diff.to_scalar::<f32>().unwrap();
    assert!(diff < 1e-4, "final latents differ from diffusers' by {diff}");
}

#[test]
fn bad_folders_and_flags_are_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let llama = golden().join("llama");
    let check = |args: &[&str], needle: &str| {
        let output = hidream(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "expected failure: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(stderr.contains(needle), "`{needle}` not in: {stderr}");
    };
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = dir.path().join("x.png");
    check(
        &["generate", "--model", path(&empty), "--llama", path(&llama), "--prompt", "x", "--out", path(&out)],
        "transformer/config.json",
    );
    check(
        &["generate", "--model", "HiDream-ai/HiDream-I1-Nowhere", "--llama", path(&llama), "--prompt", "x"],
        "huggingface-cli download HiDream-ai/HiDream-I1-Nowhere",
    );
    let model = golden().join("model");
    check(
        &["generate", "--model", path(&model), "--llama", path(&llama), "--prompt", "x", "--out", "image.jpg"],
        ".png",
    );
    check(
        &["generate", "--model", path(&model), "--llama", path(&llama), "--prompt", "x", "--size", "64by64"],
        "WIDTHxHEIGHT",
    );
    check(
        &["generate", "--model", path(&model), "--llama", path(&empty), "--prompt", "x", "--out", path(&out)],
        "config.json",
    );
    assert!(!out.exists(), "no image is written when generation fails");
}

/// Ctrl-C in the middle of denoising: the process stops with status 130 and a notice, and the
/// folder it was to write into holds no image, latents, report or partial file.
#[cfg(unix)]
#[test]
fn an_interrupt_stops_the_run_and_leaves_no_output() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let dir = tempfile::tempdir().unwrap();
    let (model, llama) = (golden().join("model"), golden().join("llama"));
    let (out, report, latents) =
        (dir.path().join("x.png"), dir.path().join("report.json"), dir.path().join("latents.safetensors"));
    // Far more steps than the run gets to: it is interrupted once the text stage is over.
    let mut child = Command::new(env!("CARGO_BIN_EXE_hidream"))
        .args(["generate", "--model", path(&model), "--llama", path(&llama), "--prompt", "a fox", "--steps"])
        .args(["1000", "--default-sample-size", "16", "--dtype", "f32", "--out", path(&out), "--report"])
        .args([path(&report), "--output-latents", path(&latents)])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the run ended before the text stage finished: {seen}");
        seen.push_str(&line);
        if line.starts_with("text encoders:") {
            break;
        }
    }
    let kill = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(kill.success());
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(rest.contains("interrupted"), "{rest}");
    assert!(!rest.contains("panicked"), "{rest}");
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert!(left.is_empty(), "an interrupted run left {left:?}");
}

/// A budget that a stage cannot run under stops `generate` before the first stage starts: the one
/// error names the stage and the smallest budget that works, and no stage has run.
#[test]
fn a_budget_too_small_for_a_stage_stops_before_any_stage_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (model, llama) = (golden().join("model"), golden().join("llama"));
    let out = dir.path().join("x.png");
    let output = hidream(&[
        "generate",
        "--model",
        path(&model),
        "--llama",
        path(&llama),
        "--prompt",
        "a fox",
        "--steps",
        "2",
        "--default-sample-size",
        "16",
        "--dtype",
        "f32",
        "--budget",
        "1KiB",
        "--out",
        path(&out),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("the denoising (the transformer) stage cannot run"), "{stderr}");
    assert!(stderr.contains("the smallest budget that works is"), "{stderr}");
    assert!(!stderr.contains("text encoders:"), "no stage ran first: {stderr}");
    assert!(!out.exists());
}
