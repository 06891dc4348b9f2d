//! The plain flow-matching Euler loop of `hidream_schedulers::euler` over the transformer, for
//! benchmarks and tests: the runner gives each step's velocity (`noise_pred = -transformer(...)`),
//! after the per-prompt precomputation when the runner does it.

use std::time::Instant;

use candle_core::Tensor;
use hidream_model::TransformerInputs;
use hidream_schedulers::euler::{EulerSchedule, StepEvent};

use crate::runner::TransformerRunner;
use crate::{Precompute, Result};

/// The text conditioning of a run, under diffusers' names.
#[derive(Debug, Clone)]
pub struct TextConditioning {
    /// `[B, S_t5, C_t5]`.
    pub encoder_hidden_states_t5: Tensor,
    /// `[n_llama_layers, B, S_llama, C_llama]`.
    pub encoder_hidden_states_llama3: Tensor,
    /// `[B, text_emb_dim]`.
    pub pooled_embeds: Tensor,
}

/// What a denoising run measured.
#[derive(Debug, Clone, Default)]
pub struct DenoiseTimings {
    /// Seconds of each step (transformer plus update).
    pub step_seconds: Vec<f64>,
    /// Seconds of the per-prompt preparation, when the runner precomputes.
    pub prepare_seconds: f64,
    /// Bytes of the prepared state, when the runner precomputes.
    pub prepared_bytes: u64,
}

/// Runs the Euler loop from `noise` (`[B, C, H, W]`, f32) and returns the final latents in f32.
/// `observe` sees each step start and finish (for progress bars and memory probes).
pub fn denoise(
    runner: &mut TransformerRunner,
    noise: &Tensor,
    text: &TextConditioning,
    schedule: &EulerSchedule,
    observe: impl FnMut(StepEvent),
) -> Result<(Tensor, DenoiseTimings)> {
    let batch = noise.dim(0)?;
    let timesteps = (0..schedule.n_steps())
        .map(|step_idx| Tensor::full(schedule.timestep(step_idx), batch, noise.device()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut timings = DenoiseTimings::default();
    let prepared = match runner.runner_config().precompute {
        Precompute::PerStep => None,
        Precompute::PerPrompt => {
            let started = Instant::now();
            let prepared = runner.prepare(
                &text.encoder_hidden_states_t5,
                &text.encoder_hidden_states_llama3,
                &text.pooled_embeds,
                &timesteps,
            )?;
            timings.prepare_seconds = started.elapsed().as_secs_f64();
            timings.prepared_bytes = prepared.bytes();
            Some(prepared)
        }
    };
    runner.expect_steps(schedule.n_steps());
    let velocity = |step_idx: usize, _sigma: f64, sample: &Tensor| -> Result<Tensor> {
        let output = match &prepared {
            Some(prepared) => runner.forward_prepared(prepared, step_idx, sample)?,
            None => runner.forward(&TransformerInputs {
                hidden_states: sample.clone(),
                timesteps: timesteps[step_idx].clone(),
                encoder_hidden_states_t5: text.encoder_hidden_states_t5.clone(),
                encoder_hidden_states_llama3: text.encoder_hidden_states_llama3.clone(),
                pooled_embeds: text.pooled_embeds.clone(),
            })?,
        };
        Ok(output.neg()?)
    };
    let (sample, step_seconds) = hidream_schedulers::euler::denoise(noise, schedule, velocity, observe)?;
    timings.step_seconds = step_seconds;
    Ok((sample, timings))
}
