//! `cargo xtask bench-forward`: the f32 `small` forward in Rust against diffusers, side by side.
//!
//! Both sides load the same synthetic checkpoint and inputs (batch 1, a 16×32×32 latent = 256
//! image tokens, 128 T5 tokens, 32 Llama layers of 128 tokens), run one warm-up forward and then
//! `--repeat` timed ones on `--threads` threads. Rounds alternate Rust and Python so that both see
//! the same machine noise; the figure is the ratio of the medians.

use std::path::PathBuf;

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
    /// Alternating rounds.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Threads for both sides.
    #[arg(long, default_value_t = 2)]
    threads: usize,
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
            "no Python at {}: create one with `python3 -m venv ~/refenv && ~/refenv/bin/pip install torch diffusers safetensors` or pass --python",
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

    let threads = args.threads.to_string();
    let repeat = args.repeat.to_string();
    let rust_sample = dir.join("rust_sample.safetensors");
    let (mut rust_seconds, mut torch_seconds) = (Vec::new(), Vec::new());
    let mut max_diff = f64::NAN;
    for round in 0..args.rounds {
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

fn read_json(path: &std::path::Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn seconds(path: &std::path::Path, key: &str) -> Result<Vec<f64>> {
    let report = read_json(path)?;
    let values = report[key].as_array().with_context(|| format!("{} has no {key}", path.display()))?;
    Ok(values.iter().filter_map(Value::as_f64).collect())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}
