//! `hidream forward`: one transformer forward from a safetensors file of inputs, under a memory
//! policy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use hidream_model::TransformerInputs;
use hidream_pipeline::Precompute;
use hidream_weights::Checkpoint;

use crate::residency::{HeapProbe, ResidencyArgs, report, write_json};

#[derive(Debug, clap::Args)]
pub struct ForwardArgs {
    /// The transformer checkpoint: a diffusers `transformer/` folder, or a model folder holding one.
    #[arg(long)]
    model: PathBuf,
    /// Safetensors file with `hidden_states`, `timesteps`, `encoder_hidden_states_t5`,
    /// `encoder_hidden_states_llama3` and `pooled_embeds`.
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write `sample` (f32).
    #[arg(long)]
    out: PathBuf,
    /// Compute dtype; weights are converted to it as they load.
    #[arg(long, default_value = "f32")]
    dtype: hidream_config::DType,
    /// Run the forward this many times after one warm-up run, and report each time (benchmarks).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    #[command(flatten)]
    residency: ResidencyArgs,
}

pub fn run(args: &ForwardArgs) -> Result<()> {
    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let started = Instant::now();
    let inputs = read_inputs(&args.inputs, &Device::Cpu)?;
    let (mut runner, config) = args.residency.open_runner(Checkpoint::open(&args.model)?, args.dtype)?;
    let loaded = started.elapsed().as_secs_f64();

    // With the per-prompt precomputation, the prompt's work is done once, outside the timings.
    let prepare_started = Instant::now();
    let prepared = match runner.runner_config().precompute {
        Precompute::PerPrompt => {
            inputs.validate(runner.config())?;
            Some(runner.prepare(
                &inputs.encoder_hidden_states_t5,
                &inputs.encoder_hidden_states_llama3,
                &inputs.pooled_embeds,
                std::slice::from_ref(&inputs.timesteps),
            )?)
        }
        Precompute::PerStep => None,
    };
    let prepare_seconds = prepare_started.elapsed().as_secs_f64();
    let warm_up = usize::from(args.repeat > 1);
    let mut probe = HeapProbe::default();
    let mut seconds = Vec::with_capacity(args.repeat + warm_up);
    let mut sample = None;
    for _ in 0..args.repeat + warm_up {
        probe.start();
        let forward_started = Instant::now();
        sample = Some(match &prepared {
            Some(prepared) => runner.forward_prepared(prepared, 0, &inputs.hidden_states)?,
            None => runner.forward(&inputs)?,
        });
        seconds.push(forward_started.elapsed().as_secs_f64());
        probe.stop();
    }
    let seconds = seconds.split_off(warm_up);
    let sample = sample.context("no forward ran")?.to_dtype(DType::F32)?;
    let dims = sample.dims().to_vec();
    hidream_weights::write_tensors(&args.out, &HashMap::from([("sample".to_owned(), sample)]))?;
    let median = median(&seconds);
    println!(
        "sample {dims:?} {} -> {} (load {loaded:.3} s, forward {median:.3} s{}, {})",
        args.dtype,
        args.out.display(),
        if seconds.len() > 1 { format!(" median of {}", seconds.len()) } else { String::new() },
        runner.plan(),
    );
    if let Some(path) = &args.residency.report {
        let mut value = report(&runner, &config, &probe, &seconds);
        value["load_seconds"] = loaded.into();
        value["prepare_seconds"] = prepare_seconds.into();
        value["median_seconds"] = median.into();
        value["shape"] = dims.into();
        write_json(path, &value)?;
    }
    Ok(())
}

/// Reads the five forward inputs, as f32, naming any that is missing.
pub fn read_inputs(path: &Path, device: &Device) -> Result<TransformerInputs> {
    let mut tensors = hidream_weights::read_tensors(path, device)?;
    TransformerInputs::from_tensors(&mut tensors, "").with_context(|| format!("reading {}", path.display()))
}

pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}
