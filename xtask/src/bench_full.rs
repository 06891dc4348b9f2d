//! `cargo xtask bench-full`: the whole 17.1B-parameter architecture, run where it cannot be held in
//! memory (not in CI: it writes 34 GB and takes tens of minutes).
//!
//! 1. Synthesises the `full` preset in bf16 on disk in the Hub layout (shards of at most 5 GB and
//!    their index, as the published checkpoint is), once: a finished checkpoint is marked and
//!    reused.
//! 2. Measures what the disk delivers: one shard read sequentially with `O_DIRECT` (`dd`), so that
//!    the page cache is not what is measured.
//! 3. Runs Dev denoise steps (`hidream denoise`, f32 compute, each with the per-prompt
//!    precomputation) under each budget, each a process of its own under GNU `time`, which reports
//!    its peak RSS and the bytes it read from storage. The counting allocator's heap peak, the
//!    seconds per step and the stall come from the run's report; the planner's prediction from
//!    `hidream plan` on the same checkpoint. The first budget's output is the reference: every
//!    other run must reproduce it bit for bit.
//! 4. Writes `report.{md,json}` into the work folder; `--publish` copies them to `bench/full/`.
//!
//! A budget below the planner's minimum at prefetch depth 1 runs at depth 0 (load, run, free), and
//! the table says so. The time bound of a run is max(compute, disk bytes per step / disk
//! bandwidth), where compute is the run's own time per step outside stalls.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::util;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The budgets, largest first; the first run's output is the reference.
    #[arg(long, value_delimiter = ',', default_value = "8GiB,4GiB,2GiB")]
    budgets: Vec<String>,
    /// Denoising steps per run.
    #[arg(long, default_value_t = 2)]
    steps: usize,
    /// Latent size (the image is 8 times larger): 32x32 is 256² pixels.
    #[arg(long, default_value = "32x32")]
    latent: String,
    /// T5 and Llama tokens each.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Where the checkpoint, the runs and the report go (about 35 GB).
    #[arg(long, default_value = "target/bench-full")]
    work: PathBuf,
    /// Keep only D double and S single blocks (`--layers 1,1`): a full-width slice, for a quick
    /// check of the bench itself on a small disk.
    #[arg(long)]
    layers: Option<String>,
    /// Run this `hidream` binary instead of building one.
    #[arg(long)]
    hidream: Option<PathBuf>,
    /// Copy the report to bench/full/ for committing.
    #[arg(long)]
    publish: bool,
}

const GIB: f64 = (1u64 << 30) as f64;

pub fn run(args: &Args) -> Result<()> {
    ensure!(args.steps > 0, "--steps must be at least 1");
    ensure!(!args.budgets.is_empty(), "--budgets needs at least one budget");
    ensure!(Path::new("/usr/bin/time").exists(), "bench-full needs GNU time at /usr/bin/time (apt install time)");
    let hidream = match &args.hidream {
        Some(path) => path.clone(),
        None => util::build_hidream()?,
    };
    let work = util::root().join(&args.work);
    std::fs::create_dir_all(work.join("runs")).with_context(|| format!("cannot create {}", work.display()))?;
    let model = match &args.layers {
        Some(layers) => work.join(format!("full-bf16-layers-{}", layers.replace(',', "-"))),
        None => work.join("full-bf16"),
    };
    let complete = model.join(".complete");
    if !complete.exists() {
        eprintln!("bench-full: synthesising the full preset in bf16 into {}", model.display());
        let mut synth = util::command(&hidream);
        synth.args(["synth", "--preset", "full", "--dtype", "bf16", "--max-shard-size", "5GB", "--out"]).arg(&model);
        if let Some(layers) = &args.layers {
            synth.args(["--layers", layers]);
        }
        util::run(&mut synth)?;
        std::fs::write(&complete, b"").context("cannot mark the checkpoint complete")?;
    }
    let inputs = work.join(format!("inputs-{}-{}.safetensors", args.latent, args.tokens));
    let tokens = args.tokens.to_string();
    util::run(
        util::command(&hidream)
            .args(["synth", "--preset", "full", "--latent", &args.latent, "--t5-tokens", &tokens])
            .args(["--llama-tokens", &tokens, "--inputs"])
            .arg(&inputs),
    )?;
    let checkpoint_bytes = folder_bytes(&model)?;
    let disk = disk_bandwidth(&model)?;
    eprintln!("bench-full: the disk reads {:.2} GB/s sequentially (O_DIRECT)", disk / 1e9);

    let (width, height) = args.latent.split_once('x').context("--latent is WIDTHxHEIGHT")?;
    let pixels = format!("{}x{}", width.parse::<usize>()? * 8, height.parse::<usize>()? * 8);
    let mut rows = Vec::new();
    let reference = work.join("runs/reference.safetensors");
    for (idx, budget) in args.budgets.iter().enumerate() {
        // `hidream plan` prints its report, then fails, when a setting does not fit.
        let plan_at = |prefetch: usize| -> Result<Value> {
            let output = util::command(&hidream)
                .args(["plan", "--model"])
                .arg(&model)
                .args(["--dtype", "f32", "--variant", "dev", "--size", &pixels, "--budget", budget])
                .args(["--prefetch", &prefetch.to_string(), "--json"])
                .output()
                .context("cannot run hidream plan")?;
            serde_json::from_slice(&output.stdout)
                .with_context(|| format!("hidream plan printed no report: {}", String::from_utf8_lossy(&output.stderr)))
        };
        let mut prefetch = 1;
        let mut plan = plan_at(prefetch)?;
        if plan["settings"]["per_prompt"]["plan"].is_null() {
            prefetch = 0;
            plan = plan_at(prefetch)?;
        }
        let setting = &plan["settings"]["per_prompt"];
        ensure!(!setting["plan"].is_null(), "budget {budget} is below the planner's minimum even at prefetch depth 0");
        let name = format!("budget-{budget}");
        let (out, report, time_file) = (
            work.join(format!("runs/{name}.safetensors")),
            work.join(format!("runs/{name}.json")),
            work.join(format!("runs/{name}.time")),
        );
        eprintln!("bench-full: {name} at prefetch depth {prefetch}");
        let mut command = util::command("/usr/bin/time");
        command
            .args(["-f", "%e %M %I", "-o"])
            .arg(&time_file)
            .arg(&hidream)
            .args(["denoise", "--model"])
            .arg(&model)
            .arg("--inputs")
            .arg(&inputs)
            .args(["--dtype", "f32", "--steps", &args.steps.to_string(), "--budget", budget])
            .args(["--prefetch", &prefetch.to_string(), "--out"])
            .arg(if idx == 0 { &reference } else { &out })
            .arg("--report")
            .arg(&report);
        if idx > 0 {
            command.arg("--compare-to").arg(&reference);
        }
        util::run(&mut command)?;
        let measured: Value = serde_json::from_str(&std::fs::read_to_string(&report)?)?;
        let time = std::fs::read_to_string(&time_file)?;
        let fields: Vec<f64> = time.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
        let &[wall, max_rss_kib, blocks_read] = fields.as_slice() else {
            bail!("unexpected GNU time output in {}: {time}", time_file.display());
        };
        let steps = measured["steps"].as_f64().unwrap_or(1.0).max(1.0);
        let seconds_per_step = measured["seconds_per_step"].as_f64().unwrap_or(f64::NAN);
        let stall_per_step = measured["stall_seconds"].as_f64().unwrap_or(0.0) / steps;
        let disk_bytes = blocks_read * 512.0;
        let disk_per_step = disk_bytes / steps;
        let compute = seconds_per_step - stall_per_step;
        let bound = compute.max(disk_per_step / disk);
        rows.push(json!({
            "budget": budget,
            "budget_bytes": measured["budget_bytes"],
            "prefetch": prefetch,
            "peak_heap_bytes": measured["peak_heap_bytes"],
            "peak_rss_bytes": max_rss_kib * 1024.0,
            "peak_weight_bytes": measured["peak_weight_bytes"],
            "resident_bytes": measured["resident_bytes"],
            "bytes_streamed_per_step": measured["bytes_streamed"].as_f64().unwrap_or(0.0) / steps,
            "disk_bytes_read": disk_bytes,
            "disk_bytes_read_per_step": disk_per_step,
            "seconds_per_step": seconds_per_step,
            "stall_seconds_per_step": stall_per_step,
            "compute_seconds_per_step": compute,
            "bound_seconds_per_step": bound,
            "ratio_to_bound": seconds_per_step / bound,
            "wall_seconds": wall,
            "bit_identical_to_first": if idx == 0 { Value::Bool(true) } else { measured["bit_identical"].clone() },
            "predicted": {
                "peak_weight_bytes": setting["plan"]["peak_weight_bytes"],
                "peak_device_bytes": setting["device_estimate"]["total_bytes"],
                "streamed_bytes_per_step": setting["plan"]["streamed_bytes_per_step"],
                "resident": setting["plan"]["resident"],
            },
        }));
    }

    let report = json!({
        "command": std::env::args().skip(1).collect::<Vec<_>>().join(" "),
        "machine": machine(),
        "checkpoint": { "path": model, "layers": args.layers, "bytes_on_disk": checkpoint_bytes, "dtype": "bf16", "layout": "Hub: shards of at most 5 GB and the index" },
        "workload": { "variant": "dev", "latent": args.latent, "pixels": pixels, "text_tokens": [args.tokens, args.tokens], "steps": args.steps, "compute_dtype": "f32", "precompute": "per prompt" },
        "disk_bandwidth_bytes_per_s": disk,
        "runs": rows,
    });
    std::fs::write(work.join("report.json"), serde_json::to_string_pretty(&report)?)?;
    let markdown = table(&report);
    std::fs::write(work.join("report.md"), &markdown)?;
    println!("{markdown}");
    let failed: Vec<&str> = rows
        .iter()
        .filter(|row| row["bit_identical_to_first"] != Value::Bool(true))
        .filter_map(|row| row["budget"].as_str())
        .collect();
    if args.publish {
        let published = util::root().join("bench/full");
        std::fs::create_dir_all(&published)?;
        std::fs::copy(work.join("report.json"), published.join("report.json"))?;
        std::fs::copy(work.join("report.md"), published.join("report.md"))?;
        eprintln!("bench-full: published to {}", published.display());
    }
    ensure!(failed.is_empty(), "the outputs under {failed:?} differ from the first budget's");
    Ok(())
}

/// The markdown table of a report.
fn table(report: &Value) -> String {
    let gib = |value: &Value| value.as_f64().map_or("—".to_owned(), |bytes| format!("{:.2} GiB", bytes / GIB));
    let gb = |value: &Value| value.as_f64().map_or("—".to_owned(), |bytes| format!("{:.1} GB", bytes / 1e9));
    let sec = |value: &Value| value.as_f64().map_or("—".to_owned(), |s| format!("{s:.1}"));
    let mut lines = vec![
        format!("# bench-full: {}", report["machine"].as_str().unwrap_or_default()),
        String::new(),
        format!(
            "`cargo xtask {}`: the full 17.1B-parameter architecture, synthesised in bf16 ({}, {}), Dev, {} pixels \
             ({} latent), {} + {} text tokens, {} steps, f32 compute, the per-prompt precomputation. The disk reads \
             {:.2} GB/s (O_DIRECT, sequential).",
            report["command"].as_str().unwrap_or_default(),
            gb(&report["checkpoint"]["bytes_on_disk"]),
            report["checkpoint"]["layout"].as_str().unwrap_or_default(),
            report["workload"]["pixels"].as_str().unwrap_or_default(),
            report["workload"]["latent"].as_str().unwrap_or_default(),
            report["workload"]["text_tokens"][0],
            report["workload"]["text_tokens"][1],
            report["workload"]["steps"],
            report["disk_bandwidth_bytes_per_s"].as_f64().unwrap_or(0.0) / 1e9,
        ),
        String::new(),
        "| budget | prefetch | peak heap | peak RSS | ledger peak (predicted) | predicted peak | streamed/step (predicted) | disk read/step | s/step | stall/step | bound | × bound | identical |".to_owned(),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|".to_owned(),
    ];
    for row in report["runs"].as_array().into_iter().flatten() {
        let predicted = &row["predicted"];
        lines.push(format!(
            "| {} | {} | {} | {} | {} ({}) | {} | {} ({}) | {} | {} | {} | {} | {:.2} | {} |",
            row["budget"].as_str().unwrap_or_default(),
            row["prefetch"],
            gib(&row["peak_heap_bytes"]),
            gib(&row["peak_rss_bytes"]),
            gib(&row["peak_weight_bytes"]),
            gib(&predicted["peak_weight_bytes"]),
            gib(&predicted["peak_device_bytes"]),
            gib(&row["bytes_streamed_per_step"]),
            gib(&predicted["streamed_bytes_per_step"]),
            gb(&row["disk_bytes_read_per_step"]),
            sec(&row["seconds_per_step"]),
            sec(&row["stall_seconds_per_step"]),
            sec(&row["bound_seconds_per_step"]),
            row["ratio_to_bound"].as_f64().unwrap_or(f64::NAN),
            row["bit_identical_to_first"],
        ));
    }
    lines.extend([
        String::new(),
        "- *peak heap*: the counting allocator's peak; *peak RSS*: GNU time's maximum resident set (the page cache is \
         not in it: tensor data is read with `pread`)."
            .to_owned(),
        "- *streamed/step*: f32 bytes loaded into slots per step; *disk read/step*: the bytes the run read from \
         storage (GNU time's block inputs × 512), divided by the steps, the one-time loads included."
            .to_owned(),
        "- *bound*: max(compute, disk read per step / disk bandwidth), where compute is the run's s/step less its \
         stall; *identical*: the output is bit-identical to the first budget's."
            .to_owned(),
    ]);
    lines.join("\n") + "\n"
}

/// The bytes of every file in `dir`.
fn folder_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let metadata = entry?.metadata()?;
        if metadata.is_file() {
            total += metadata.len();
        }
    }
    Ok(total)
}

/// Bytes per second of a sequential `O_DIRECT` read of the checkpoint's first shard (at most 4 GiB).
fn disk_bandwidth(model: &Path) -> Result<f64> {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(model)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "safetensors"))
        .collect();
    shards.sort();
    let shard = shards.first().context("the checkpoint has no shard")?;
    let started = std::time::Instant::now();
    let output = util::command("dd")
        .arg(format!("if={}", shard.display()))
        .args(["of=/dev/null", "bs=16M", "count=256", "iflag=direct"])
        .output()
        .context("cannot run dd")?;
    let seconds = started.elapsed().as_secs_f64();
    ensure!(output.status.success(), "dd failed: {}", String::from_utf8_lossy(&output.stderr));
    let copied = String::from_utf8_lossy(&output.stderr)
        .lines()
        .last()
        .and_then(|line| line.split_whitespace().next().and_then(|bytes| bytes.parse::<f64>().ok()))
        .context("cannot read dd's byte count")?;
    Ok(copied / seconds)
}

/// The machine, in one line.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|line| line.starts_with("model name"))
                .map(|line| line.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| info.lines().next().and_then(|line| line.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map_or("? GiB".to_owned(), |kib| format!("{:.0} GiB", kib / 1024.0 / 1024.0));
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    format!("{cpu}, {cores} cores, {memory} of memory, no GPU")
}
