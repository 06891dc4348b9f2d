//! `hidream forward`: one transformer forward from a safetensors file of inputs, under a memory
//! policy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use hidream_model::TransformerInputs;
use hidream_pipeline::Precompute;
use hidream_weights::Checkpoint;

use crate::parse;
use crate::residency::{HeapProbe, TransformerArgs, compare_to, report, write_json};

#[derive(Debug, clap::Args)]
pub struct ForwardArgs {
    #[command(flatten)]
    run: TransformerArgs,
    /// Run the forward this many times after one warm-up run, and report each time (benchmarks).
    #[arg(long, default_value_t = 1, value_parser = parse::positive, allow_negative_numbers = true)]
    repeat: usize,
    /// Report max |out − REF.sample| for this reference output and whether the bits are identical;
    /// a golden case's `expected.safetensors` also gives its bf16 drift (`reference_bf16_drift`).
    #[arg(long)]
    compare_to: Option<PathBuf>,
}

pub fn run(args: &ForwardArgs) -> Result<()> {
    let run = &args.run;
    run.check_outputs()?;
    let started = Instant::now();
    let device = run.residency.open_device()?;
    let inputs = read_inputs(&run.inputs, &device)?;
    let (mut runner, config) =
        run.residency.open_runner(Checkpoint::open(&run.model)?, &device, run.compute_dtype())?;
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
    let mut probe = HeapProbe::new(&device);
    let mut seconds = Vec::new();
    let mut sample = None;
    for _ in 0..args.repeat.saturating_add(warm_up) {
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
    let comparison = args.compare_to.as_ref().map(|reference| compare_to(reference, &sample)).transpose()?;
    hidream_weights::write_tensors(&run.out, &HashMap::from([("sample".to_owned(), sample)]))?;
    let median = median(&seconds);
    outln!(
        "sample {dims:?} {} -> {} (load {loaded:.3} s, forward {median:.3} s{}, {})",
        run.compute_dtype(),
        run.out.display(),
        if seconds.len() > 1 { format!(" median of {}", seconds.len()) } else { String::new() },
        runner.plan(),
    )?;
    if let Some(comparison) = &comparison {
        outln!(
            "against {}: {}",
            args.compare_to.as_deref().unwrap_or(Path::new("")).display(),
            serde_json::Value::from(comparison.clone())
        )?;
    }
    if let Some(path) = &run.residency.report {
        let mut value = report(&runner, &config, &probe, &seconds);
        value["load_seconds"] = loaded.into();
        value["prepare_seconds"] = prepare_seconds.into();
        value["median_seconds"] = median.into();
        value["shape"] = dims.into();
        if let Some(comparison) = &comparison {
            value.as_object_mut().context("the report is an object")?.extend(comparison.clone());
        }
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
