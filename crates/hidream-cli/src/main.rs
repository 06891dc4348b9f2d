//! `hidream`: run, synthesise and inspect HiDream-I1 transformers from the command line.
//!
//! Every failure is one `error:` line and a non-zero exit status, never a panic backtrace. Ctrl-C
//! (or SIGTERM) stops any command at once (exit status 130): outputs are written atomically, and the partial
//! files of writes under way are removed first, so an interrupted run leaves no half-written image,
//! tensor file or report.
#![forbid(unsafe_code)]

/// `println!` that returns an error instead of panicking, and ends quietly on a closed pipe
/// (see [`print_stdout`]).
macro_rules! outln {
    () => {
        $crate::print_stdout("\n")
    };
    ($($arg:tt)*) => {
        $crate::print_stdout(&format!("{}\n", format_args!($($arg)*)))
    };
}

mod bandwidth;
mod denoise;
mod forward;
mod generate;
mod inspect;
mod parse;
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
    /// Measure the host-to-device bandwidth of the staged upload path that streamed units take.
    Bandwidth(bandwidth::BandwidthArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    on_interrupt_exit();
    let result = match cli.command {
        Command::Forward(args) => forward::run(&args),
        Command::Denoise(args) => denoise::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Synth(args) => synth::run(&args),
        Command::Inspect(args) => inspect::run(&args),
        Command::Plan(args) => plan::run(&args),
        Command::Bandwidth(args) => bandwidth::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C (SIGINT, and SIGTERM): remove the partial files of the writes under way, say so, and
/// exit with 130 now. Nothing else needs unwinding: loader threads, mapped files and device memory
/// go with the process, and every finished output is already whole.
fn on_interrupt_exit() {
    let installed = ctrlc::set_handler(|| {
        let removed = hidream_weights::remove_partial_files();
        let partial = if removed > 0 { format!(" ({removed} partial file(s) removed)") } else { String::new() };
        eprintln!("\ninterrupted: stopped; the outputs written so far are whole, and no partial file is left{partial}");
        std::process::exit(130);
    });
    if let Err(err) = installed {
        eprintln!("warning: Ctrl-C will not clean up partial outputs: {err}");
    }
}

/// The error and its causes on one line, each cause once: many errors already quote their
/// source in their own message, which `{:#}` would print a second time.
fn one_line(err: &anyhow::Error) -> String {
    let mut message = err.to_string();
    for cause in err.chain().skip(1) {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
    }
    message.replace('\n', " ")
}

/// Prints `text` to stdout; a closed pipe (`hidream plan | head`) ends the output quietly
/// instead of panicking as `println!` does.
pub fn print_stdout(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => Err(err.into()),
        _ => Ok(()),
    }
}
