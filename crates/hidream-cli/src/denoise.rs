//! `hidream denoise`: a few plain Euler flow-matching steps under a memory policy, for comparing
//! policies (the official samplers come with `generate`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use hidream_pipeline::denoise::{TextConditioning, denoise};
use hidream_schedulers::euler::{EulerSchedule, StepEvent};
use hidream_weights::Checkpoint;
use indicatif::{ProgressBar, ProgressStyle};

use crate::forward::read_inputs;
use crate::parse;
use crate::residency::{HeapProbe, TransformerArgs, compare_to, report, write_json};

#[derive(Debug, clap::Args)]
pub struct DenoiseArgs {
    #[command(flatten)]
    run: TransformerArgs,
    /// Euler steps, with sigmas falling linearly from 1 to 0 (1 to 1000).
    #[arg(long, default_value_t = 4, value_parser = parse::steps, allow_negative_numbers = true)]
    steps: usize,
    /// Report max |out − REF.sample| for this reference output (checks bit-identity across policies).
    #[arg(long)]
    compare_to: Option<PathBuf>,
}

pub fn run(args: &DenoiseArgs) -> Result<()> {
    let run = &args.run;
    run.check_outputs()?;
    let started = Instant::now();
    let device = run.residency.open_device()?;
    let inputs = read_inputs(&run.inputs, &device)?;
    let schedule = EulerSchedule::linear(args.steps)?;
    let (mut runner, config) =
        run.residency.open_runner(Checkpoint::open(&run.model)?, &device, run.compute_dtype())?;
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
    let mut probe = HeapProbe::new(&device);
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
        value.as_object_mut().context("the report is an object")?.extend(compare_to(reference, &sample)?);
    }
    let dims = sample.dims().to_vec();
    hidream_weights::write_tensors(&run.out, &HashMap::from([("sample".to_owned(), sample)]))?;
    outln!(
        "latents {dims:?} after {} steps -> {} ({:.3} s/step, {})",
        args.steps,
        run.out.display(),
        value["seconds_per_step"].as_f64().unwrap_or(f64::NAN),
        runner.plan()
    )?;
    if let Some(path) = &run.residency.report {
        write_json(path, &value)?;
    }
    Ok(())
}
