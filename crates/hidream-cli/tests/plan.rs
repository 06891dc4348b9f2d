//! `hidream plan` end to end: its plans are the planner's plans of the pipeline's unit table, its
//! times follow from its FLOPs and streamed bytes, and every bad input is one clear `error:` line.

use std::path::Path;
use std::process::{Command, Output};

use hidream_config::{DType, TransformerConfig};
use hidream_memory::{Plan, Policy, format_bytes};
use hidream_pipeline::{Precompute, UnitTable};
use serde_json::Value;

fn hidream(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hidream")).args(args).output().expect("the hidream binary runs")
}

/// Runs `hidream plan ARGS --json`, which must succeed, and parses its report.
fn plan_json(args: &[&str]) -> Value {
    let output = hidream(&[&["plan"], args, &["--json"]].concat());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "plan {args:?} failed: {stderr}");
    serde_json::from_slice(&output.stdout).expect("plan --json prints JSON")
}

/// Asserts a clean failure whose `error:` line mentions `needle`.
fn check_error(output: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "expected failure, got success; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic instead of an error: {stderr}");
    assert!(stderr.starts_with("error:"), "no `error:` line: {stderr}");
    assert!(stderr.contains(needle), "stderr does not mention `{needle}`: {stderr}");
}

fn u64_at(report: &Value, pointer: &str) -> u64 {
    report.pointer(pointer).and_then(Value::as_u64).unwrap_or_else(|| panic!("no integer at {pointer}: {report:#}"))
}

fn f64_at(report: &Value, pointer: &str) -> f64 {
    report.pointer(pointer).and_then(Value::as_f64).unwrap_or_else(|| panic!("no number at {pointer}: {report:#}"))
}

/// Checks one setting of a report against the planner run on the pipeline's unit table directly.
fn check_setting(report: &Value, cfg: &TransformerConfig, precompute: Precompute, budget_bytes: u64) {
    let key = if precompute.is_per_prompt() { "/settings/per_prompt" } else { "/settings/per_step" };
    let table = UnitTable::new(cfg, DType::BF16, precompute);
    let minimum = Plan::minimum_budget(table.specs(), 1);
    assert_eq!(u64_at(report, &format!("{key}/minimum_budget")), minimum);
    assert_eq!(u64_at(report, &format!("{key}/step_bytes")), table.step_bytes());
    let plan = Policy::Budget { budget_bytes, prefetch: 1 }.plan(table.specs()).expect("the budget fits");
    assert_eq!(u64_at(report, &format!("{key}/plan/resident_bytes")), plan.resident_bytes());
    assert_eq!(u64_at(report, &format!("{key}/plan/streamed_bytes_per_step")), plan.streamed_bytes_per_pass());
    assert_eq!(u64_at(report, &format!("{key}/plan/peak_weight_bytes")), plan.peak_weight_bytes());
    assert!(plan.peak_weight_bytes() <= budget_bytes);

    // The lower bound: max(FLOPs / 700 TFLOP/s, streamed bytes / 55 GB/s), per step.
    let compute = u64_at(report, &format!("{key}/flops_per_step")) as f64 / 700e12;
    let stream = plan.streamed_bytes_per_pass() as f64 / 55e9;
    assert!((f64_at(report, &format!("{key}/time/compute_s_per_step")) - compute).abs() < 1e-9);
    assert!((f64_at(report, &format!("{key}/time/stream_s_per_step")) - stream).abs() < 1e-9);
    assert!((f64_at(report, &format!("{key}/time/s_per_step")) - compute.max(stream)).abs() < 1e-9);
}

/// The full model under 8 GiB, Dev: the minimum budgets are DESIGN's 5.1% (per step) and 4.2%
/// (precomputed) of the bf16 weights, and each plan is the planner's.
#[test]
fn full_dev_under_8_gib() {
    let cfg = TransformerConfig::full();
    let budget_bytes = 8 << 30;
    let report = plan_json(&["--preset", "full", "--budget", "8GiB", "--variant", "dev"]);
    assert_eq!(u64_at(&report, "/budget/bytes"), budget_bytes);
    assert_eq!(u64_at(&report, "/variant/steps"), 28);
    assert_eq!(u64_at(&report, "/variant/batch"), 1);
    assert_eq!(u64_at(&report, "/size/image_tokens"), 4096);
    assert_eq!(u64_at(&report, "/size/joint_tokens"), 4096 + 3 * 128);
    assert_eq!(report.pointer("/activations/estimate"), Some(&Value::Bool(true)));
    check_setting(&report, &cfg, Precompute::PerStep, budget_bytes);
    check_setting(&report, &cfg, Precompute::PerPrompt, budget_bytes);

    let weight_bytes = u64_at(&report, "/config/weight_bytes");
    for (key, expected_percent) in [("per_step", 5.1), ("per_prompt", 4.2)] {
        let share = f64_at(&report, &format!("/settings/{key}/minimum_budget_percent"));
        assert!((share - expected_percent).abs() < 0.05, "{key}: {share:.2}%");
        let minimum = u64_at(&report, &format!("/settings/{key}/minimum_budget"));
        assert!((100.0 * minimum as f64 / weight_bytes as f64 - share).abs() < 1e-9);
    }
    // Precomputation takes its weights out of every step and pays for them once.
    let saved = u64_at(&report, "/settings/per_step/step_bytes") - u64_at(&report, "/settings/per_prompt/step_bytes");
    assert_eq!(u64_at(&report, "/precompute/saved_bytes_per_step"), saved);
    assert!(
        u64_at(&report, "/settings/per_prompt/plan/streamed_bytes_per_step")
            < u64_at(&report, "/settings/per_step/plan/streamed_bytes_per_step")
    );
    // Streaming binds at 8 GiB over 55 GB/s.
    assert_eq!(report.pointer("/settings/per_prompt/time/bound"), Some(&Value::from("streaming")));

    // The text report says the same, and says what is assumed and what is estimated.
    let output = hidream(&["plan", "--preset", "full", "--budget", "8GiB", "--variant", "dev"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    for key in ["per_step", "per_prompt"] {
        let minimum = u64_at(&report, &format!("/settings/{key}/minimum_budget"));
        assert!(stdout.contains(&format!("minimum budget   {}", format_bytes(minimum))), "{stdout}");
    }
    for needle in ["an estimate", "--tflops", "--bandwidth", "28 steps", "streaming binds", "4480 per block"] {
        assert!(stdout.contains(needle), "no `{needle}` in: {stdout}");
    }
}

/// Full has guidance: both halves go through one forward, which doubles the FLOPs and the
/// activations but not the weights streamed per step.
#[test]
fn full_variant_runs_batch_2() {
    let dev = plan_json(&["--variant", "dev", "--budget", "24GiB"]);
    let full = plan_json(&["--variant", "full", "--budget", "24GiB"]);
    assert_eq!(u64_at(&full, "/variant/batch"), 2);
    assert_eq!(u64_at(&full, "/variant/steps"), 50);
    assert_eq!(u64_at(&full, "/flops_per_forward_total"), 2 * u64_at(&dev, "/flops_per_forward_total"));
    assert_eq!(u64_at(&full, "/activations/peak_bytes"), 2 * u64_at(&dev, "/activations/peak_bytes"));
    for pointer in
        ["/settings/per_step/plan/streamed_bytes_per_step", "/settings/per_prompt/plan/streamed_bytes_per_step"]
    {
        assert_eq!(u64_at(&full, pointer), u64_at(&dev, pointer));
    }
    // Without a budget every weight stays resident and compute binds.
    let all = plan_json(&["--preset", "full"]);
    assert_eq!(all.pointer("/budget"), Some(&Value::Null));
    assert_eq!(u64_at(&all, "/settings/per_step/plan/streamed_bytes_per_step"), 0);
    assert_eq!(all.pointer("/settings/per_step/time/bound"), Some(&Value::from("compute")));
}

/// A folder with only a config is enough, at its root or under `transformer/`; a percentage
/// budget is a share of the weights; chunked attention lowers the activation estimate.
#[test]
fn config_only_folders_and_percent_budgets() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("model");
    std::fs::create_dir_all(root.join("transformer")).unwrap();
    std::fs::write(root.join("transformer/config.json"), TransformerConfig::tiny().to_diffusers_json()).unwrap();
    let root_str = root.to_str().expect("temp paths are UTF-8");
    let from_folder = plan_json(&["--model", root_str, "--size", "64x64", "--budget", "60%"]);
    let from_preset = plan_json(&["--preset", "tiny", "--size", "64x64", "--budget", "60%"]);
    assert_eq!(from_folder.pointer("/settings"), from_preset.pointer("/settings"));
    assert!(from_folder.pointer("/config/source").and_then(Value::as_str).unwrap().contains("config.json"));
    let weight_bytes = u64_at(&from_preset, "/config/weight_bytes");
    assert_eq!(u64_at(&from_preset, "/budget/bytes"), (weight_bytes as f64 * 0.6).floor() as u64);

    let chunked = plan_json(&["--preset", "tiny", "--size", "64x64", "--attention-chunk", "8"]);
    assert!(u64_at(&chunked, "/activations/peak_bytes") < u64_at(&from_preset, "/activations/peak_bytes"));

    // Non-square sizes are padded to max_seq image tokens (64 for the tiny preset).
    let padded = plan_json(&["--preset", "tiny", "--size", "32x64"]);
    assert_eq!(u64_at(&padded, "/size/image_tokens"), 64);
    assert_eq!(padded.pointer("/size/padded"), Some(&Value::Bool(true)));
}

/// A budget that only the precomputed setting fits: the run succeeds and reports why the other
/// setting does not fit.
#[test]
fn one_setting_failing_is_not_an_error() {
    let report = plan_json(&["--preset", "full", "--budget", "1.5GiB", "--variant", "fast"]);
    assert_eq!(report.pointer("/settings/per_step/plan"), Some(&Value::Null));
    let error = report.pointer("/settings/per_step/error").and_then(Value::as_str).unwrap();
    assert!(error.contains("too small"), "{error}");
    assert!(report.pointer("/settings/per_prompt/plan/peak_weight_bytes").is_some());
    assert_eq!(report.pointer("/settings/per_prompt/error"), Some(&Value::Null));
}

#[test]
fn bad_inputs_are_one_clear_error() {
    check_error(&hidream(&["plan", "--budget", "lots"]), "lots");
    check_error(&hidream(&["plan", "--size", "100x"]), "100x");
    check_error(&hidream(&["plan", "--size", "1000x1000"]), "multiples of 16");
    check_error(&hidream(&["plan", "--size", "1024x2048"]), "max_seq");
    check_error(&hidream(&["plan", "--variant", "turbo"]), "turbo");
    check_error(&hidream(&["plan", "--preset", "huge"]), "unknown preset `huge`");
    check_error(&hidream(&["plan", "--bandwidth", "0GB/s"]), "bandwidth");
    check_error(&hidream(&["plan", "--tflops", "0"]), "--tflops");
    check_error(&hidream(&["plan", "--attention-chunk", "0"]), "--attention-chunk");

    // Below the minimum of both settings: the report, then one error giving both minimums.
    let cfg = TransformerConfig::full();
    let minimum = |precompute| Plan::minimum_budget(UnitTable::new(&cfg, DType::BF16, precompute).specs(), 1);
    let output = hidream(&["plan", "--preset", "full", "--budget", "100MiB"]);
    check_error(&output, "fits neither setting");
    for precompute in [Precompute::PerStep, Precompute::PerPrompt] {
        check_error(&output, &format!("({} bytes)", minimum(precompute)));
    }

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    check_error(&hidream(&["plan", "--model", path(&missing)]), "nowhere");
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("config.json"), r#"{"patch_size": 2}"#).unwrap();
    check_error(&hidream(&["plan", "--model", path(&broken)]), "config.json");
}

fn path(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}
