//! `hidream plan`: the report of `hidream_pipeline::planning`, checked through the library, and
//! two smoke tests that the binary prints that report (as text and as JSON).

use std::path::Path;
use std::process::{Command, Output};

use hidream_config::{DType, TransformerConfig, Variant};
use hidream_pipeline::planning::{
    Bound, ConfigSource, DeviceAssumptions, ImageSize, PlanReport, PlanRequest, SettingReport,
};
use serde_json::Value;

/// The request `hidream plan` makes by default, with `size` (WIDTHxHEIGHT), `variant` and `budget`.
fn request(size: &str, variant: Variant, budget: Option<&str>) -> PlanRequest {
    PlanRequest {
        size: size.parse().expect("a valid size"),
        variant,
        budget: budget.map(|budget| budget.parse().expect("a valid budget")),
        prefetch: 1,
        dtype: DType::BF16,
        attention_chunk: None,
        device: DeviceAssumptions::H100_PCIE5,
    }
}

fn report(cfg: &TransformerConfig, request: &PlanRequest) -> PlanReport {
    PlanReport::new(cfg, "test", request).expect("the request is valid")
}

/// The invariants of one setting of a report: the plan stays in the budget, the times are the
/// lower bound `max(FLOPs / rate, streamed bytes / bandwidth)`, and the device estimate adds up.
fn check_setting(report: &PlanReport, setting: &SettingReport) {
    let Some(plan) = &setting.plan else {
        assert!(setting.error.is_some(), "a setting without a plan says why");
        assert!(setting.time.is_none() && setting.device_estimate.is_none());
        return;
    };
    if let Some(budget) = &report.budget {
        assert!(plan.peak_weight_bytes <= budget.bytes, "peak {} over budget {}", plan.peak_weight_bytes, budget.bytes);
        assert!(setting.minimum_budget <= budget.bytes);
    }
    assert!(plan.resident_bytes + plan.streamed_bytes_per_step == setting.step_bytes, "every step byte is placed");
    let time = setting.time.expect("a plan has times");
    let device = &report.assumptions;
    let compute = setting.flops_per_step as f64 / (device.tflops * 1e12);
    let stream = plan.streamed_bytes_per_step as f64 / device.bandwidth_bytes_per_s as f64;
    assert_eq!(time.compute_s_per_step, compute);
    assert_eq!(time.stream_s_per_step, stream);
    assert_eq!(time.s_per_step, compute.max(stream));
    assert_eq!(time.bound, if stream > compute { Bound::Streaming } else { Bound::Compute });
    assert_eq!(time.total_s, time.once_per_prompt_s + time.s_per_step * report.variant.steps as f64);
    let estimate = setting.device_estimate.expect("a plan has a device estimate");
    assert_eq!(estimate.total_bytes, plan.peak_weight_bytes + report.activations.peak_bytes + estimate.state_bytes);
}

/// Plans of the full model: each setting's invariants hold, and the minimum budgets are DESIGN's
/// 5.1% (per step) and 4.2% (precomputed) of the bf16 weights.
#[test]
fn full_model_plans() {
    let cfg = TransformerConfig::full();
    for (variant, budget) in [
        (Variant::Dev, Some("8GiB")),
        (Variant::Full, Some("24GiB")),
        (Variant::Fast, Some("1.5GiB")),
        (Variant::Full, None),
    ] {
        let report = report(&cfg, &request("1024x1024", variant, budget));
        for setting in report.settings.both() {
            check_setting(&report, setting);
        }
        for (setting, expected_percent) in [(&report.settings.per_step, 5.1), (&report.settings.per_prompt, 4.2)] {
            let share = setting.minimum_budget_percent;
            assert!((share - expected_percent).abs() < 0.05, "{:?}: {share:.2}%", setting.precompute);
        }
    }
}

/// Dev under 8 GiB: one forward's tokens, precomputation streaming less, and streaming binding.
#[test]
fn dev_under_8_gib() {
    let report = report(&TransformerConfig::full(), &request("1024x1024", Variant::Dev, Some("8GiB")));
    assert_eq!(report.budget.as_ref().map(|budget| budget.bytes), Some(8 << 30));
    assert_eq!((report.variant.steps, report.variant.batch), (28, 1));
    assert_eq!((report.size.image_tokens, report.size.joint_tokens), (4096, 4096 + 3 * 128));
    assert!(report.activations.estimate);
    let [per_step, per_prompt] = report.settings.both();
    assert_eq!(report.precompute.saved_bytes_per_step, per_step.step_bytes - per_prompt.step_bytes);
    let streamed = |setting: &SettingReport| setting.plan.as_ref().map(|plan| plan.streamed_bytes_per_step);
    assert!(streamed(per_prompt) < streamed(per_step));
    assert_eq!(per_prompt.time.map(|time| time.bound), Some(Bound::Streaming));
}

/// Full has guidance: both halves go through one forward, which doubles the FLOPs and the
/// activations but not the weights streamed per step. Without a budget nothing streams.
#[test]
fn guidance_doubles_compute_not_streaming() {
    let cfg = TransformerConfig::full();
    let dev = report(&cfg, &request("1024x1024", Variant::Dev, Some("24GiB")));
    let full = report(&cfg, &request("1024x1024", Variant::Full, Some("24GiB")));
    assert_eq!((full.variant.batch, full.variant.steps), (2, 50));
    assert_eq!(full.flops_per_forward_total, 2 * dev.flops_per_forward_total);
    assert_eq!(full.activations.peak_bytes, 2 * dev.activations.peak_bytes);
    for (full, dev) in full.settings.both().into_iter().zip(dev.settings.both()) {
        let streamed = |setting: &SettingReport| setting.plan.as_ref().map(|plan| plan.streamed_bytes_per_step);
        assert_eq!(streamed(full), streamed(dev));
    }
    let all = report(&cfg, &request("1024x1024", Variant::Full, None));
    assert!(all.budget.is_none());
    assert_eq!(all.settings.per_step.plan.as_ref().map(|plan| plan.streamed_bytes_per_step), Some(0));
    assert_eq!(all.settings.per_step.time.map(|time| time.bound), Some(Bound::Compute));
}

/// A folder with only a config plans as the preset does; a percentage budget is a share of the
/// weights; chunked attention lowers the activation estimate; sizes are width × height and
/// non-square ones are padded to max_seq.
#[test]
fn sources_budgets_chunks_and_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("model");
    std::fs::create_dir_all(root.join("transformer")).unwrap();
    std::fs::write(root.join("transformer/config.json"), TransformerConfig::tiny().to_diffusers_json()).unwrap();
    let (from_folder, source) = ConfigSource::Folder(&root).load().unwrap();
    assert!(source.ends_with("config.json"), "{source}");
    let (from_preset, _) = ConfigSource::Preset("tiny").load().unwrap();
    let tiny = request("64x64", Variant::Full, Some("60%"));
    let settings = |cfg: &TransformerConfig| serde_json::to_value(&report(cfg, &tiny).settings).unwrap();
    assert_eq!(settings(&from_folder), settings(&from_preset));

    let planned = report(&from_preset, &tiny);
    let expected = (planned.config.weight_bytes as f64 * 0.6).floor() as u64;
    assert_eq!(planned.budget.as_ref().map(|budget| budget.bytes), Some(expected));

    let chunked = report(&from_preset, &PlanRequest { attention_chunk: Some(8), ..tiny });
    assert!(chunked.activations.peak_bytes < planned.activations.peak_bytes);

    // 64 wide and 32 high: a latent of 8 × 4, padded to the tiny preset's 64 image tokens.
    let landscape = report(&from_preset, &request("64x32", Variant::Full, None));
    let size = &landscape.size;
    assert_eq!((size.width, size.height, size.latent_width, size.latent_height), (64, 32, 8, 4));
    assert_eq!((size.image_tokens, size.padded), (64, true));
    assert_eq!(landscape.size.diffusers_rescaled, Some(ImageSize::new(1440, 720)));
}

/// A budget that only the precomputed setting fits is not an error; one that fits neither is,
/// and gives both minimums.
#[test]
fn budgets_that_fit_one_or_no_setting() {
    let cfg = TransformerConfig::full();
    let one = report(&cfg, &request("1024x1024", Variant::Fast, Some("1.5GiB")));
    assert!(one.settings.per_step.plan.is_none());
    let error = one.settings.per_step.error.as_ref().map(ToString::to_string).unwrap_or_default();
    assert!(error.contains("too small"), "{error}");
    assert!(one.settings.per_prompt.plan.is_some() && one.settings.per_prompt.error.is_none());
    one.check_fits().unwrap();

    let none = report(&cfg, &request("1024x1024", Variant::Full, Some("100MiB")));
    let error = none.check_fits().unwrap_err().to_string();
    assert!(error.contains("fits neither setting"), "{error}");
    for setting in none.settings.both() {
        assert!(error.contains(&format!("({} bytes)", setting.minimum_budget)), "{error}");
    }
}

/// Each bad request is a typed error that says what is wrong.
#[test]
fn bad_requests_are_clear_errors() {
    let check = |edit: fn(&mut PlanRequest), needle: &str| {
        let mut bad = request("1024x1024", Variant::Full, None);
        edit(&mut bad);
        let error = PlanReport::new(&TransformerConfig::full(), "test", &bad).unwrap_err().to_string();
        assert!(error.contains(needle), "`{needle}` not in: {error}");
    };
    check(|r| r.size = ImageSize::new(1000, 1024), "the width 1000 is not a positive multiple of 16");
    check(|r| r.size = ImageSize::new(1024, 1000), "the height 1000 is not a positive multiple of 16");
    check(|r| r.size = ImageSize::new(2048, 1024), "max_seq");
    check(|r| r.attention_chunk = Some(0), "attention_chunk");
    check(|r| r.device.tflops = 0.0, "tflops");
    check(|r| r.device.tflops = f64::NAN, "tflops");
    check(|r| r.device.bandwidth_bytes_per_s = 0, "bandwidth");

    let dir = tempfile::tempdir().unwrap();
    let load_error = |source: ConfigSource<'_>| source.load().unwrap_err().to_string();
    assert!(load_error(ConfigSource::Preset("huge")).contains("unknown preset `huge`"));
    assert!(load_error(ConfigSource::Folder(&dir.path().join("nowhere"))).contains("nowhere"));
    let broken = dir.path().join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("config.json"), r#"{"patch_size": 2}"#).unwrap();
    assert!(load_error(ConfigSource::Folder(&broken)).contains("config.json"));
}

fn hidream(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hidream")).args(args).output().expect("the hidream binary runs")
}

/// The binary prints the library's report: `--json` is its serialisation, and the text says the
/// same figures, what is assumed and what is estimated.
#[test]
fn the_binary_prints_the_report() {
    let output = hidream(&["plan", "--preset", "full", "--budget", "8GiB", "--variant", "dev", "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let printed: Value = serde_json::from_slice(&output.stdout).expect("plan --json prints JSON");
    let library = report(&TransformerConfig::full(), &request("1024x1024", Variant::Dev, Some("8GiB")));
    // Through text on both sides: serde_json's float parsing may differ from the f64 by an ulp.
    let mut expected: Value = serde_json::from_str(&serde_json::to_string(&library).unwrap()).unwrap();
    expected["config"]["source"] = "preset full".into();
    assert_eq!(printed, expected);

    let output = hidream(&["plan", "--preset", "full", "--budget", "8GiB", "--variant", "dev"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    for setting in library.settings.both() {
        let minimum = hidream_memory::format_bytes(setting.minimum_budget);
        assert!(stdout.contains(&format!("minimum budget   {minimum}")), "{stdout}");
    }
    for needle in ["an estimate", "--tflops", "--bandwidth", "28 steps", "streaming binds", "4480 per block"] {
        assert!(stdout.contains(needle), "no `{needle}` in: {stdout}");
    }
    let landscape = hidream(&["plan", "--preset", "tiny", "--size", "64x32"]);
    let stdout = String::from_utf8_lossy(&landscape.stdout);
    assert!(stdout.contains("image 64x32 px (width x height): latent 8x4"), "{stdout}");
}

/// A budget below both settings' minimums prints the report, then one `error:` line.
#[test]
fn the_binary_fails_cleanly_when_nothing_fits() {
    let output = hidream(&["plan", "--preset", "full", "--budget", "100MiB"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.starts_with("error: memory budget 100.00 MiB"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("does not fit"));
}

/// `plan --llama` on a pipeline folder plans every stage of `generate` from the headers: one row per
/// stage, the same figures in the JSON, and a budget one stage cannot fit is an error naming it.
#[test]
fn a_pipeline_folder_is_planned_stage_by_stage() {
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/pipeline");
    let (model, llama) = (golden.join("model"), golden.join("llama"));
    let args = |budget: &str, json: bool| {
        let mut args = vec!["plan", "--model", model.to_str().unwrap(), "--llama", llama.to_str().unwrap()];
        args.extend(["--dtype", "f32", "--size", "64x64", "--budget", budget]);
        if json {
            args.push("--json");
        }
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        hidream(&args)
    };
    let output = run(args("1GiB", true));
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let stages = report["stages"].as_array().unwrap();
    let names: Vec<&str> = stages.iter().map(|stage| stage["stage"].as_str().unwrap()).collect();
    assert_eq!(names, ["CLIP-L", "CLIP-G", "T5", "Llama", "transformer", "VAE decode"]);
    for stage in stages {
        let bytes = |key: &str| stage[key].as_u64().unwrap();
        assert!(stage["error"].is_null(), "{stage}");
        assert!(bytes("predicted_peak_bytes") <= 1 << 30, "{stage}");
        assert!(bytes("minimum_budget") <= bytes("exact_minimum_budget"), "{stage}");
        if stage["stage"] != "VAE decode" {
            // Weights only: streaming needs no more than all of them, and 1 GiB holds them all.
            assert!(bytes("minimum_budget") <= bytes("weight_bytes"), "{stage}");
            assert!(bytes("predicted_peak_bytes") <= bytes("weight_bytes"), "{stage}");
        }
    }
    let text = run(args("1GiB", false));
    let stdout = String::from_utf8_lossy(&text.stdout);
    assert!(stdout.contains("stages of `generate`") && stdout.contains("VAE decode"), "{stdout}");

    // 1 MiB holds every text encoder but not the transformer: the error names it.
    let output = run(args("1MiB", false));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("the transformer stage cannot run"), "{stderr}");
}
