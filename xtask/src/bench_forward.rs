//! `cargo xtask bench-forward`: the f32 `small` forward in Rust against diffusers, side by side.
//!
//! Both sides load the same synthetic checkpoint and inputs (batch 1, a 16×32×32 latent = 256
//! image tokens, 128 T5 tokens, 32 Llama layers of 128 tokens), run one warm-up forward and then
//! `--repeat` timed ones on `--threads` threads. Rounds alternate Rust and Python so that both see
//! the same machine noise; the figure is the ratio of the medians.
//!
//! With `--whole-process` it times what a user waits for instead: complete processes, from start
//! to exit, measured from outside. The Rust side is `hidream forward` (open the checkpoint, load,
//! prepare, one forward, write the sample); the Python side imports torch and diffusers, runs
//! `from_pretrained` and one forward, and writes its sample. After one untimed warm-up run of each,
//! the two alternate (Rust, Python, Rust, ...) and each pair gives a ratio, so that a drift of the
//! machine's speed moves both sides of a pair alike. The figures are medians, with min and max.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::util;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The Python with torch and diffusers (default: $HIDREAM_PYTHON, else ~/refenv/bin/python).
    #[arg(long)]
    python: Option<PathBuf>,
    /// Timed forwards per round and side.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Alternating rounds (default 2; 7 with --whole-process).
    #[arg(long)]
    rounds: Option<usize>,
    /// Threads for both sides.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Time complete processes (load, prepare, one forward, write) instead of forwards.
    #[arg(long)]
    whole_process: bool,
    /// With --whole-process: run the Rust side with `--no-precompute` (no prepare step; caption
    /// projections and modulation inside the forward, as diffusers runs them).
    #[arg(long, requires = "whole_process")]
    no_precompute: bool,
}

pub fn run(args: &Args) -> Result<()> {
    let python = match &args.python {
        Some(python) => python.clone(),
        None => std::env::var_os("HIDREAM_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join("refenv/bin/python")),
    };
    if !python.exists() {
        bail!(
            "no Python at {}: create one with `python3 -m venv ~/refenv && ~/refenv/bin/pip install torch diffusers transformers safetensors` or pass --python",
            python.display()
        );
    }
    let hidream = util::build_hidream()?;
    let dir = util::root().join("target/bench-forward");
    let model = dir.join("small");
    let inputs = dir.join("inputs.safetensors");
    if !model.join("config.json").exists() {
        util::run(
            util::command(&hidream).args(["synth", "--preset", "small", "--dtype", "bf16", "--out"]).arg(&model),
        )?;
    }
    util::run(
        util::command(&hidream)
            .args(["synth", "--preset", "small", "--latent", "32x32", "--t5-tokens", "128", "--llama-tokens", "128"])
            .arg("--inputs")
            .arg(&inputs),
    )?;
    let sides = Sides { hidream, python, dir, model, inputs };
    if args.whole_process {
        return whole_process(args, &sides);
    }
    let Sides { hidream, python, dir, model, inputs } = sides;

    let threads = args.threads.to_string();
    let repeat = args.repeat.to_string();
    let rust_sample = dir.join("rust_sample.safetensors");
    let (mut rust_seconds, mut torch_seconds) = (Vec::new(), Vec::new());
    let mut max_diff = f64::NAN;
    for round in 0..args.rounds.unwrap_or(2) {
        let rust_report = dir.join(format!("rust_{round}.json"));
        util::run(
            util::command(&hidream)
                .env("RAYON_NUM_THREADS", &threads)
                // Caption projections and modulation inside the forward, as diffusers runs it.
                .args(["forward", "--dtype", "f32", "--no-precompute", "--repeat", &repeat, "--model"])
                .arg(&model)
                .arg("--inputs")
                .arg(&inputs)
                .arg("--out")
                .arg(&rust_sample)
                .arg("--report")
                .arg(&rust_report),
        )?;
        rust_seconds.extend(seconds(&rust_report, "step_seconds")?);
        let torch_report = dir.join(format!("torch_{round}.json"));
        util::run(
            util::command(&python)
                .arg(util::root().join("benches/forward_diffusers.py"))
                .args(["--threads", &threads, "--repeat", &repeat, "--model"])
                .arg(&model)
                .arg("--inputs")
                .arg(&inputs)
                .arg("--report")
                .arg(&torch_report)
                .arg("--rust-sample")
                .arg(&rust_sample),
        )?;
        torch_seconds.extend(seconds(&torch_report, "seconds")?);
        max_diff = read_json(&torch_report)?["max_abs_diff_vs_rust"].as_f64().unwrap_or(f64::NAN);
    }
    let rust = median(&rust_seconds);
    let torch = median(&torch_seconds);
    println!("small preset, f32, batch 1, 256 image + 384 text tokens, {} threads", args.threads);
    println!("  rust (candle)  median {rust:.3} s over {} forwards", rust_seconds.len());
    println!("  diffusers      median {torch:.3} s over {} forwards", torch_seconds.len());
    println!("  ratio rust / diffusers = {:.3}", rust / torch);
    println!("  max |rust - diffusers| on the output = {max_diff:.3e}");
    let summary = serde_json::json!({
        "rust_seconds": rust_seconds, "torch_seconds": torch_seconds,
        "rust_median": rust, "torch_median": torch, "ratio": rust / torch, "max_abs_diff": max_diff,
        "threads": args.threads,
    });
    std::fs::write(dir.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    Ok(())
}

/// The two programs and the shared files of a run.
struct Sides {
    hidream: PathBuf,
    python: PathBuf,
    dir: PathBuf,
    model: PathBuf,
    inputs: PathBuf,
}

/// `--whole-process`: complete processes timed from outside, alternating, ratios pair by pair.
fn whole_process(args: &Args, sides: &Sides) -> Result<()> {
    let threads = args.threads.to_string();
    let rust_sample = sides.dir.join("whole_rust_sample.safetensors");
    let torch_sample = sides.dir.join("whole_torch_sample.safetensors");
    let rust_report = sides.dir.join("whole_rust.json");
    let torch_report = sides.dir.join("whole_torch.json");
    let mut rust = util::command(&sides.hidream);
    rust.env("RAYON_NUM_THREADS", &threads).args(["forward", "--dtype", "f32"]);
    if args.no_precompute {
        rust.arg("--no-precompute");
    }
    rust.arg("--model").arg(&sides.model).arg("--inputs").arg(&sides.inputs).arg("--out").arg(&rust_sample);
    rust.arg("--report").arg(&rust_report);
    let mut torch = util::command(&sides.python);
    torch.arg(util::root().join("benches/forward_diffusers.py")).args(["--whole-process", "--threads", &threads]);
    torch.arg("--model").arg(&sides.model).arg("--inputs").arg(&sides.inputs).arg("--out").arg(&torch_sample);
    torch.arg("--report").arg(&torch_report);

    // One untimed run of each: the page cache holds the checkpoint and Python's bytecode is compiled.
    timed(&mut rust)?;
    timed(&mut torch)?;
    let rounds = args.rounds.unwrap_or(7);
    let mut pairs = Vec::with_capacity(rounds);
    let mut phases: Vec<(Value, Value)> = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let rust_seconds = timed(&mut rust)?;
        let torch_seconds = timed(&mut torch)?;
        pairs.push((rust_seconds, torch_seconds));
        phases.push((read_json(&rust_report)?, read_json(&torch_report)?));
    }
    let mut diff = util::command(&sides.python);
    let diff_report = sides.dir.join("whole_diff.json");
    diff.arg(util::root().join("benches/forward_diffusers.py")).arg("--diff").arg(&rust_sample).arg(&torch_sample);
    util::run(diff.arg("--report").arg(&diff_report))?;
    let max_diff = read_json(&diff_report)?["max_abs_diff"].as_f64().unwrap_or(f64::NAN);

    let rust_seconds: Vec<f64> = pairs.iter().map(|pair| pair.0).collect();
    let torch_seconds: Vec<f64> = pairs.iter().map(|pair| pair.1).collect();
    let ratios: Vec<f64> = pairs.iter().map(|(rust, torch)| rust / torch).collect();
    let phase = |pick: fn(&(Value, Value)) -> &Value, key: &str| {
        median(&phases.iter().filter_map(|pair| pick(pair)[key].as_f64()).collect::<Vec<_>>())
    };
    let precompute = if args.no_precompute { "--no-precompute" } else { "with prepare" };
    println!(
        "whole process: small preset, f32, batch 1, 256 image + 384 text tokens, {} threads, {rounds} alternating pairs",
        args.threads
    );
    println!("  hidream forward ({precompute})  {}", spread(&rust_seconds));
    println!("  python diffusers            {}", spread(&torch_seconds));
    println!("  ratio rust / python, pair by pair  {}", spread(&ratios).replace(" s", ""));
    println!(
        "  inside, medians: rust load {:.3} s, prepare {:.3} s, forward {:.3} s; python import {:.3} s, \
         from_pretrained {:.3} s, forward {:.3} s, write {:.3} s",
        phase(|pair| &pair.0, "load_seconds"),
        phase(|pair| &pair.0, "prepare_seconds"),
        phase(|pair| &pair.0, "median_seconds"),
        phase(|pair| &pair.1, "import_seconds"),
        phase(|pair| &pair.1, "load_seconds"),
        phase(|pair| &pair.1, "forward_seconds"),
        phase(|pair| &pair.1, "write_seconds"),
    );
    println!("  max |rust - diffusers| on the output = {max_diff:.3e}");
    let summary = serde_json::json!({
        "rust_seconds": rust_seconds, "torch_seconds": torch_seconds, "pair_ratios": ratios,
        "rust_median": median(&rust_seconds), "torch_median": median(&torch_seconds),
        "ratio_median": median(&ratios), "max_abs_diff": max_diff, "threads": args.threads,
        "no_precompute": args.no_precompute,
    });
    std::fs::write(sides.dir.join("whole_summary.json"), serde_json::to_string_pretty(&summary)?)?;
    Ok(())
}

/// Runs a command to completion and returns its wall seconds, from just before the start to just
/// after the exit; its output is kept, and shown only if it fails.
fn timed(command: &mut Command) -> Result<f64> {
    let started = Instant::now();
    let output = command.output().with_context(|| format!("cannot start {command:?}"))?;
    let seconds = started.elapsed().as_secs_f64();
    if !output.status.success() {
        bail!("{command:?} failed with {}: {}", output.status, String::from_utf8_lossy(&output.stderr));
    }
    Ok(seconds)
}

/// `median M s (min A, max B)`.
fn spread(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("median {:.3} s (min {min:.3}, max {max:.3})", median(values))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn seconds(path: &Path, key: &str) -> Result<Vec<f64>> {
    let report = read_json(path)?;
    let values = report[key].as_array().with_context(|| format!("{} has no {key}", path.display()))?;
    Ok(values.iter().filter_map(Value::as_f64).collect())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}
