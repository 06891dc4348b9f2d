//! `hidream denoise`: a few plain Euler flow-matching steps under a memory policy, for comparing
//! policies (the official samplers come with `generate`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use hidream_pipeline::euler::{EulerSchedule, StepEvent, TextConditioning, denoise};
use hidream_weights::Checkpoint;
use indicatif::{ProgressBar, ProgressStyle};

use crate::forward::read_inputs;
use crate::residency::{HeapProbe, ResidencyArgs, max_abs_diff, report, write_json};

#[derive(Debug, clap::Args)]
pub struct DenoiseArgs {
    /// The transformer checkpoint: a diffusers `transformer/` folder, or a model folder holding one.
    #[arg(long)]
    model: PathBuf,
    /// Inputs as for `forward`; `hidden_states` is the initial noise and `timesteps` is ignored.
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write the final latents, under `sample` (f32).
    #[arg(long)]
    out: PathBuf,
    /// Euler steps, with sigmas falling linearly from 1 to 0.
    #[arg(long, default_value_t = 4)]
    steps: usize,
    /// Compute dtype; weights are converted to it as they load.
    #[arg(long, default_value = "f32")]
    dtype: hidream_config::DType,
    /// Report max |out − REF.sample| for this reference output (checks bit-identity across policies).
    #[arg(long)]
    compare_to: Option<PathBuf>,
    #[command(flatten)]
    residency: ResidencyArgs,
}

pub fn run(args: &DenoiseArgs) -> Result<()> {
    let started = Instant::now();
    let inputs = read_inputs(&args.inputs, &Device::Cpu)?;
    let schedule = EulerSchedule::linear(args.steps)?;
    let (mut runner, config) = args.residency.open_runner(Checkpoint::open(&args.model)?, args.dtype)?;
    let loaded = started.elapsed().as_secs_f64();

    let text = TextConditioning {
        encoder_hidden_states_t5: inputs.encoder_hidden_states_t5.clone(),
        encoder_hidden_states_llama3: inputs.encoder_hidden_states_llama3.clone(),
        pooled_embeds: inputs.pooled_embeds.clone(),
    };
    let progress = ProgressBar::new(args.steps as u64);
    progress.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps, {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    progress.set_message(format!("denoise ({})", config.policy));
    let mut probe = HeapProbe::default();
    let (sample, timings) = denoise(&mut runner, &inputs.hidden_states, &text, &schedule, |event| match event {
        StepEvent::Start(_) => probe.start(),
        StepEvent::Done(..) => {
            probe.stop();
            progress.inc(1);
        }
    })?;
    progress.finish_and_clear();

    let mut value = report(&runner, &config, &probe, &timings.step_seconds);
    value["load_seconds"] = loaded.into();
    value["prepare_seconds"] = timings.prepare_seconds.into();
    value["prepared_bytes"] = timings.prepared_bytes.into();
    if let Some(reference) = &args.compare_to {
        let reference = hidream_weights::read_tensors(reference, &Device::Cpu)?
            .remove("sample")
            .with_context(|| format!("{} has no `sample`", reference.display()))?;
        let (max_diff, bit_identical) = max_abs_diff(&sample, &reference)?;
        value["max_abs_diff"] = f64::from(max_diff).into();
        value["bit_identical"] = bit_identical.into();
    }
    let dims = sample.dims().to_vec();
    hidream_weights::write_tensors(&args.out, &HashMap::from([("sample".to_owned(), sample)]))?;
    println!(
        "latents {dims:?} after {} steps -> {} ({:.3} s/step, {})",
        args.steps,
        args.out.display(),
        value["seconds_per_step"].as_f64().unwrap_or(f64::NAN),
        runner.plan()
    );
    if let Some(path) = &args.residency.report {
        write_json(path, &value)?;
    }
    Ok(())
}
