//! `cargo xtask bench-memory`: the memory regression gate and report.
//!
//! It synthesises a checkpoint and inputs (no downloads), then runs `hidream denoise` in f32 under
//! every residency policy, with and without the per-prompt precomputation, each run a process of
//! its own so that its heap peak starts clean. The `all` run with precomputation is the reference:
//! every other run must reproduce its output bit for bit. The byte figures are gated against
//! `bench/memory-baseline.toml` ([`gate`]); the table, the JSON of every run and a chart go to
//! `target/bench-memory/report.{md,json,svg}`.

mod chart;
mod gate;
mod runs;
mod table;

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

use crate::util;
use gate::{Baseline, Section};
use runs::{Outcome, RunResult, RunSpec};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Small inputs (latent 16x16, 32 + 32 text tokens) and 1 step: about a minute on 2 cores.
    #[arg(long)]
    quick: bool,
    /// Denoising steps per run [default: 3, or 1 with --quick].
    #[arg(long)]
    steps: Option<usize>,
    /// The model: `small` (8 blocks, 1024 wide), `tiny`, or `full` (a full-width slice, see --units).
    #[arg(long, value_enum, default_value_t = Preset::Small)]
    preset: Preset,
    /// With --preset full: the number of blocks, half double-stream and half single-stream.
    #[arg(long)]
    units: Option<usize>,
    /// Record this mode's figures in bench/memory-baseline.toml instead of failing on a change.
    #[arg(long)]
    update_baseline: bool,
    /// The build profile of `hidream`: `dev` reuses the build of `cargo build -p hidream-cli`.
    #[arg(long, value_enum, default_value_t = Profile::Release)]
    profile: Profile,
    /// Threads per run (RAYON_NUM_THREADS); the heap peak depends on it.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Where the runs compute: `cpu`, or `cuda`/`cuda:N` (bf16 compute, the GPU pool's measured
    /// peak; builds `hidream` with `--features cuda`, which needs `eval "$(scripts/cuda-setup.sh)"`
    /// on a machine without the CUDA toolkit). A device has its own baseline sections.
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: String,
    /// Run this `hidream` binary instead of building one.
    #[arg(long)]
    hidream: Option<PathBuf>,
}

/// `cpu`, `cuda` or `cuda:N`, as `hidream --device` takes them.
fn parse_device(text: &str) -> Result<String, String> {
    let text = text.trim().to_ascii_lowercase();
    let valid = text == "cpu"
        || text == "cuda"
        || text.strip_prefix("cuda:").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    if valid { Ok(text) } else { Err(format!("expected cpu, cuda or cuda:N, got `{text}`")) }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Preset {
    Small,
    Tiny,
    Full,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Profile {
    Dev,
    Release,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Profile::Dev => "dev",
            Profile::Release => "release",
        }
    }
}

/// Everything a run's figures depend on besides the code.
#[derive(Debug)]
struct Setup {
    preset: Preset,
    /// Blocks of the `full` slice: (double-stream, single-stream).
    layers: Option<(usize, usize)>,
    quick: bool,
    steps: usize,
    threads: usize,
    profile: Profile,
    latent: &'static str,
    text_tokens: usize,
    device: String,
}

impl Setup {
    fn new(args: &Args) -> Result<Setup> {
        ensure!(args.threads > 0, "--threads must be at least 1");
        let layers = match (args.preset, args.units) {
            (Preset::Full, Some(units)) if units >= 2 && units % 2 == 0 => Some((units / 2, units / 2)),
            (Preset::Full, Some(units)) => {
                bail!("--units must be even and at least 2 (half double, half single); got {units}")
            }
            (Preset::Full, None) => bail!(
                "--preset full needs --units N: the whole model is 34 GB on disk and 68 GB in f32; \
                 N blocks make a full-width slice (N/2 double-stream, N/2 single-stream)"
            ),
            (_, Some(_)) => bail!("--units applies to --preset full only"),
            (_, None) => None,
        };
        let steps = args.steps.unwrap_or(if args.quick { 1 } else { 3 });
        ensure!(steps > 0, "--steps must be at least 1");
        let (latent, text_tokens) = if args.quick { ("16x16", 32) } else { ("32x32", 128) };
        Ok(Setup {
            preset: args.preset,
            layers,
            quick: args.quick,
            steps,
            threads: args.threads,
            profile: args.profile,
            latent,
            text_tokens,
            device: args.device.clone(),
        })
    }

    /// The model's folder name under target/bench-memory: `small`, `tiny`, `full-4-units`.
    fn model_name(&self) -> String {
        match (self.preset, self.layers) {
            (Preset::Full, Some((double, single))) => format!("full-{}-units", double + single),
            (Preset::Full, None) => "full".to_owned(),
            (Preset::Small, _) => "small".to_owned(),
            (Preset::Tiny, _) => "tiny".to_owned(),
        }
    }

    fn preset_name(&self) -> &'static str {
        match self.preset {
            Preset::Small => "small",
            Preset::Tiny => "tiny",
            Preset::Full => "full",
        }
    }

    /// The baseline section: `quick` or `full` for the small preset, else prefixed by the model;
    /// suffixed by the device off the CPU (`quick-cuda`).
    fn mode(&self) -> String {
        let mode = if self.quick { "quick" } else { "full" };
        let mode = match self.preset {
            Preset::Small => mode.to_owned(),
            _ => format!("{}-{mode}", self.model_name()),
        };
        if self.is_cuda() { format!("{mode}-cuda") } else { mode }
    }

    fn is_cuda(&self) -> bool {
        self.device != "cpu"
    }

    /// The compute dtype: f32 on the CPU (the golden reference's), bf16 on CUDA.
    fn dtype(&self) -> &'static str {
        if self.is_cuda() { "bf16" } else { "f32" }
    }

    /// The setup as the baseline records it. The build profile is part of it: a streamed run's heap
    /// peak depends on how far the loader gets ahead of the compute, and so on the build's speed.
    /// The CPU's keeps the form the baselines were recorded under (no device named), so that
    /// their heap peaks stay gated; a GPU's names the device.
    fn describe(&self) -> String {
        let model = match self.layers {
            Some((double, single)) => format!("full preset sliced to {double} double + {single} single blocks"),
            None => format!("{} preset", self.preset_name()),
        };
        let device = if self.device == "cpu" { String::new() } else { format!(" on {}", self.device) };
        format!(
            "{model}, {} compute{device}, {} step(s), latent {}, {} T5 + {} Llama tokens, {} thread(s), {} build",
            self.dtype(),
            self.steps,
            self.latent,
            self.text_tokens,
            self.text_tokens,
            self.threads,
            self.profile.name()
        )
    }

    /// `hidream synth` flags for the preset (and the slice of the full one).
    fn synth_args(&self) -> Vec<String> {
        let mut args = vec!["synth".to_owned(), "--preset".to_owned(), self.preset_name().to_owned()];
        if let Some((double, single)) = self.layers {
            args.extend(["--layers".to_owned(), format!("{double},{single}")]);
        }
        args
    }
}

pub fn run(args: &Args) -> Result<()> {
    let setup = Setup::new(args)?;
    let hidream = match &args.hidream {
        Some(hidream) => hidream.clone(),
        None => build_hidream(setup.profile, setup.is_cuda())?,
    };
    let dir = util::root().join("target/bench-memory");
    let model = dir.join(setup.model_name());
    if !model.join("config.json").exists() {
        println!("synthesising the {} checkpoint (bf16) into {}", setup.model_name(), model.display());
        util::run(util::command(&hidream).args(setup.synth_args()).args(["--dtype", "bf16", "--out"]).arg(&model))?;
    }
    let inputs = dir.join(format!("inputs-{}.safetensors", setup.mode()));
    let tokens = setup.text_tokens.to_string();
    util::run(
        util::command(&hidream)
            .args(setup.synth_args())
            .args(["--latent", setup.latent, "--t5-tokens", &tokens, "--llama-tokens", &tokens, "--inputs"])
            .arg(&inputs),
    )?;

    let runs_dir = dir.join("runs");
    std::fs::create_dir_all(&runs_dir).with_context(|| format!("creating {}", runs_dir.display()))?;
    let specs = RunSpec::all_runs();
    let reference_out = runs_dir.join(format!("{}.safetensors", RunSpec::REFERENCE.file_stem()));
    println!("{}: {} runs of `hidream denoise`", setup.describe(), specs.len());
    let bar = ProgressBar::new(specs.len() as u64);
    bar.set_style(ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed}] {msg}")?);
    let mut results = Vec::new();
    for spec in specs {
        bar.set_message(spec.name());
        let paths = RunPaths { hidream: &hidream, model: &model, inputs: &inputs, runs_dir: &runs_dir };
        let reference = (spec != RunSpec::REFERENCE).then_some(reference_out.as_path());
        let result = run_one(&paths, &setup, spec, reference).with_context(|| format!("run {}", spec.name()))?;
        bar.suspend(|| println!("  {}", summary_line(&result)));
        bar.inc(1);
        results.push(result);
    }
    bar.finish_and_clear();

    let differing = runs::differences_from_reference(&results);

    let baseline_path = util::root().join("bench/memory-baseline.toml");
    let baseline = match std::fs::read_to_string(&baseline_path) {
        Ok(text) => Some(Baseline::parse(&text).with_context(|| format!("reading {}", baseline_path.display()))?),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => return Err(err).with_context(|| format!("reading {}", baseline_path.display())),
    };
    let current = Section::from_results(&setup.describe(), &results);
    let mode = setup.mode();
    let verdict = baseline
        .as_ref()
        .and_then(|baseline| Some(gate::compare(baseline.modes.get(&mode)?, baseline.tolerance, &current)));

    let rows = table::rows(&results);
    println!("\n{}", table::render_text(&rows));
    let machine = Machine::probe();
    write_reports(&dir, &setup, &machine, &results, &rows, verdict.as_ref())?;
    println!("reports: {}", dir.join("report.{md,json,svg}").display());

    ensure!(
        differing.is_empty(),
        "outputs differ from the reference (`{}`), which every policy must reproduce bit for bit:\n  {}",
        RunSpec::REFERENCE.name(),
        differing.join("\n  ")
    );
    if args.update_baseline {
        let mut baseline =
            baseline.unwrap_or(Baseline { tolerance: Baseline::DEFAULT_TOLERANCE, modes: Default::default() });
        baseline.modes.insert(mode.clone(), current);
        let order: Vec<String> = RunSpec::all_runs().iter().map(RunSpec::name).collect();
        std::fs::write(&baseline_path, baseline.render(&order))
            .with_context(|| format!("writing {}", baseline_path.display()))?;
        println!("recorded mode `{mode}` in {}", baseline_path.display());
        return Ok(());
    }
    let Some(verdict) = verdict else {
        println!(
            "warning: {} has no `{mode}` section: nothing gated; record one with --update-baseline",
            baseline_path.display()
        );
        return Ok(());
    };
    for note in &verdict.notes {
        println!("note: {note}");
    }
    if !verdict.failures.is_empty() {
        bail!("memory regression against {} [{mode}]:\n  {}", baseline_path.display(), verdict.failures.join("\n  "));
    }
    println!("gate: every byte figure is within the `{mode}` baseline");
    Ok(())
}

/// Builds `hidream` in `profile` (with the `cuda` feature for a GPU run) and returns its path.
fn build_hidream(profile: Profile, cuda: bool) -> Result<PathBuf> {
    match profile {
        Profile::Release if cuda => {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            // Its own target folder, so that the CPU build is not rebuilt with candle's CUDA backend.
            util::run(util::command(cargo).env("CARGO_TARGET_DIR", util::root().join("target/cuda")).args([
                "build",
                "--release",
                "-p",
                "hidream-cli",
                "--features",
                "cuda",
            ]))?;
            Ok(util::root().join("target/cuda/release/hidream"))
        }
        Profile::Dev if cuda => bail!("--device cuda builds a release binary: drop --profile dev, or pass --hidream"),
        Profile::Release => util::build_hidream(),
        Profile::Dev => {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            // The feature set of `cargo test --workspace`, so that CI reuses the build of its tests.
            util::run(util::command(cargo).args(["build", "--workspace", "--all-targets"]))?;
            Ok(util::root().join("target/debug/hidream"))
        }
    }
}

struct RunPaths<'a> {
    hidream: &'a Path,
    model: &'a Path,
    inputs: &'a Path,
    runs_dir: &'a Path,
}

/// Runs one configuration as its own process, its output and log under `runs_dir`.
fn run_one(paths: &RunPaths<'_>, setup: &Setup, spec: RunSpec, reference: Option<&Path>) -> Result<RunResult> {
    let stem = spec.file_stem();
    let report_path = paths.runs_dir.join(format!("{stem}.json"));
    let out = paths.runs_dir.join(format!("{stem}.safetensors"));
    let log_path = paths.runs_dir.join(format!("{stem}.log"));
    for stale in [&report_path, &out] {
        if stale.exists() {
            std::fs::remove_file(stale).with_context(|| format!("removing {}", stale.display()))?;
        }
    }
    let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let mut command = util::command(paths.hidream);
    command
        .env("RAYON_NUM_THREADS", setup.threads.to_string())
        .args(["denoise", "--device", &setup.device, "--dtype", setup.dtype(), "--steps", &setup.steps.to_string()])
        .arg("--model")
        .arg(paths.model)
        .arg("--inputs")
        .arg(paths.inputs)
        .arg("--out")
        .arg(&out)
        .arg("--report")
        .arg(&report_path)
        .args(spec.cli_args())
        .stdout(log.try_clone()?)
        .stderr(log);
    if let Some(reference) = reference {
        command.arg("--compare-to").arg(reference);
    }
    let status = command.status().with_context(|| format!("cannot start {command:?}"))?;
    let report = std::fs::read_to_string(&report_path).ok();
    let (outcome, report) =
        runs::parse_outcome(&spec, setup.steps, status.success(), report.as_deref()).with_context(|| {
            format!("{command:?} exited with {status}; the end of {}:\n{}", log_path.display(), tail(&log_path, 20))
        })?;
    Ok(RunResult { spec, outcome, report })
}

/// The last `n_lines` of a file, or a note that it cannot be read.
fn tail(path: &Path, n_lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(n_lines)..].join("\n")
        }
        Err(err) => format!("(cannot read it: {err})"),
    }
}

fn summary_line(result: &RunResult) -> String {
    match &result.outcome {
        Outcome::Ran(measured) => format!(
            "{:<28} peak device {:>11}, weights {:>11}, {:.3} s/step",
            result.spec.name(),
            hidream_memory::format_bytes(measured.peak_device_bytes),
            hidream_memory::format_bytes(measured.peak_weight_bytes),
            measured.seconds_per_step
        ),
        Outcome::BudgetTooSmall { minimum_budget_bytes, .. } => format!(
            "{:<28} refused as expected: the minimum budget is {}",
            result.spec.name(),
            hidream_memory::format_bytes(*minimum_budget_bytes)
        ),
    }
}

/// What the report says about the machine and the checkout.
struct Machine {
    date: String,
    nproc: String,
    cpu: String,
    git: String,
}

impl Machine {
    fn probe() -> Machine {
        let output = |program: &str, args: &[&str]| {
            util::output(util::command(program).args(args)).map(|text| text.trim().to_owned()).unwrap_or_default()
        };
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                let line = text.lines().find(|line| line.starts_with("model name"))?;
                Some(line.split_once(':')?.1.trim().to_owned())
            })
            .unwrap_or_default();
        let dirty = !output("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
        let git = output("git", &["rev-parse", "--short", "HEAD"]) + if dirty { " (with local changes)" } else { "" };
        Machine { date: output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]), nproc: output("nproc", &[]), cpu, git }
    }
}

fn write_reports(
    dir: &Path,
    setup: &Setup,
    machine: &Machine,
    results: &[RunResult],
    rows: &[[String; table::HEADER.len()]],
    verdict: Option<&gate::Verdict>,
) -> Result<()> {
    let command = format!("cargo xtask {}", std::env::args().skip(1).collect::<Vec<_>>().join(" "));
    let profile = setup.profile.name();
    let runs: Vec<Value> = results
        .iter()
        .map(|result| {
            json!({
                "name": result.spec.name(),
                "outcome": if result.outcome.measured().is_some() { "ran" } else { "budget_too_small" },
                "time_ratio_to_all": table::time_ratio_to_all(result, results),
                "report": result.report,
            })
        })
        .collect();
    let report = json!({
        "command": command, "date": machine.date, "nproc": machine.nproc, "cpu": machine.cpu, "git": machine.git,
        "profile": profile, "mode": setup.mode(), "setup": setup.describe(),
        "reference": RunSpec::REFERENCE.name(), "runs": runs,
    });
    let json_path = dir.join("report.json");
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json_path.display()))?;

    let gate = match verdict {
        None => "No baseline for this mode: nothing was gated.".to_owned(),
        Some(verdict) if verdict.failures.is_empty() && verdict.notes.is_empty() => {
            "Every byte figure equals the baseline's (the heap peak within its tolerance).".to_owned()
        }
        Some(verdict) => {
            let lines = verdict.failures.iter().map(|line| format!("- **fails**: {line}"));
            lines.chain(verdict.notes.iter().map(|line| format!("- note: {line}"))).collect::<Vec<_>>().join("\n")
        }
    };
    let markdown = format!(
        "# Memory bench: `{mode}`\n\n\
         `{command}` on {date}: {nproc} CPUs ({cpu}), git {git}, `hidream` built in the {profile} profile.\n\n\
         Setup: {setup}.\n\n\
         {table}\n\
         - The reference is `{reference}`; *max diff* is max |output − reference|, and every output \
         must have the reference's bits (`0 (identical)`).\n\
         - *peak device* is {peak_device}, *peak weights* the budget ledger's peak of unit weights.\n\
         - *× all* is the seconds per step over those of `all` with the same precompute setting, \
         measured in this same run; *stall* is the time the compute waited for streamed units.\n\
         - A budget below the planner's minimum is refused, as it must be: the row gives the minimum.\n\n\
         ## Gate\n\n{gate}\n\n\
         ![Peak memory and seconds per step of every run](report.svg)\n",
        mode = setup.mode(),
        peak_device = if setup.is_cuda() {
            "the GPU memory pool's measured peak (its used-memory high-water mark)"
        } else {
            "the process heap peak (the counting allocator's)"
        },
        date = machine.date,
        nproc = machine.nproc,
        cpu = machine.cpu,
        git = machine.git,
        setup = setup.describe(),
        table = table::render_markdown(rows),
        reference = RunSpec::REFERENCE.name(),
    );
    let md_path = dir.join("report.md");
    std::fs::write(&md_path, markdown).with_context(|| format!("writing {}", md_path.display()))?;
    let title = format!("hidream denoise, {} ({})", setup.describe(), machine.date);
    chart::write_svg(&dir.join("report.svg"), &title, results)
}
