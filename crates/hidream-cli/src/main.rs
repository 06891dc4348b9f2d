//! `hidream`: run, synthesise and inspect HiDream-I1 transformers from the command line.
//!
//! Every failure is one `error:` line and a non-zero exit status, never a panic backtrace.
#![forbid(unsafe_code)]

mod denoise;
mod forward;
mod generate;
mod inspect;
mod plan;
mod residency;
mod synth;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Counts heap bytes, so that reports can give the peak of the device tier on CPU.
#[global_allocator]
static ALLOCATOR: hidream_memory::CountingAllocator = hidream_memory::CountingAllocator;

#[derive(Debug, Parser)]
#[command(name = "hidream", version, about = "HiDream-I1 in Rust: exact, and as small in memory as you ask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one transformer forward on tensors dumped from Python (diffusers' argument names).
    Forward(forward::ForwardArgs),
    /// Text to image with the whole pipeline (text encoders, sampler, VAE) under a memory budget.
    Generate(generate::GenerateArgs),
    /// Run a few plain Euler flow-matching steps under a memory policy (for comparing policies).
    Denoise(denoise::DenoiseArgs),
    /// Write a synthetic checkpoint in the diffusers layout, and/or matching random inputs.
    Synth(synth::SynthArgs),
    /// Print a checkpoint's config and the size of every loadable unit.
    Inspect(inspect::InspectArgs),
    /// What fits in a GPU memory budget and how fast it can run, from the config alone.
    Plan(plan::PlanArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Forward(args) => forward::run(&args),
        Command::Denoise(args) => denoise::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Synth(args) => synth::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Plan(args) => plan::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
