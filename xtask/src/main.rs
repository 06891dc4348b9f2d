//! `cargo xtask`: the project's developer commands, one binary with subcommands.
//!
//! - `ci` runs `.ci/run`, what CI runs, cheapest check first.
//! - `layering` proves the crate DAG of `docs/architecture.md` with `cargo tree`.
//! - `demo` synthesises the `small` model and runs a forward (the README's first command).
//! - `bench-forward` times the Rust forward against diffusers on the same weights, side by side.
//! - `bench-memory` runs `hidream denoise` under every memory policy: the memory report and gate.
//! - `bench-full` runs the whole 17.1B architecture from disk under budgets far below its size.
//!
//! xtask keeps few dependencies: it drives `cargo` and the `hidream` binary as processes.
#![forbid(unsafe_code)]

mod bench_forward;
mod bench_full;
mod bench_memory;
mod layering;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run what CI runs (`.ci/run`).
    Ci,
    /// Check the crate layering (what each crate must not depend on).
    Layering,
    /// Synthesise the `small` model (bf16, under target/) and run one forward, printing shape and time.
    Demo,
    /// Time the f32 `small` forward in Rust and in diffusers on the same weights, side by side.
    BenchForward(bench_forward::Args),
    /// Run `hidream denoise` under every memory policy; report, and gate the byte figures against
    /// bench/memory-baseline.toml.
    BenchMemory(bench_memory::Args),
    /// Synthesise the full model in bf16 on disk (34 GB) and run Dev steps under 8, 4 and 2 GiB
    /// budgets: peaks, disk bytes, seconds and the planner's prediction (not in CI).
    BenchFull(bench_full::Args),
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Ci => util::run(util::command("bash").arg(util::root().join(".ci/run"))),
        Command::Layering => layering::check(),
        Command::Demo => demo(),
        Command::BenchForward(args) => bench_forward::run(&args),
        Command::BenchMemory(args) => bench_memory::run(&args),
        Command::BenchFull(args) => bench_full::run(&args),
    }
}

fn demo() -> Result<()> {
    let hidream = util::build_hidream()?;
    let dir = util::root().join("target/demo");
    let model = dir.join("small");
    if !model.join("config.json").exists() {
        util::run(
            util::command(&hidream).args(["synth", "--preset", "small", "--dtype", "bf16", "--out"]).arg(&model),
        )?;
    }
    let inputs = dir.join("inputs.safetensors");
    util::run(
        util::command(&hidream).args(["synth", "--preset", "small", "--latent", "32x32", "--inputs"]).arg(&inputs),
    )?;
    util::run(
        util::command(&hidream)
            .arg("forward")
            .arg("--model")
            .arg(&model)
            .arg("--inputs")
            .arg(&inputs)
            .arg("--out")
            .arg(dir.join("sample.safetensors")),
    )
}
