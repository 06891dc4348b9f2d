//! A plain flow-matching Euler loop over the transformer, for benchmarks and tests.
//!
//! Sigmas fall linearly from 1 to 0; the transformer sees `timestep = 1000 · sigma`; HiDream's
//! velocity is the negated transformer output (`noise_pred = -transformer(...)`, as in diffusers'
//! pipeline), and each step is `x ← x + (σ_next − σ) · noise_pred`. The official samplers are in
//! [`crate::schedulers`]; this loop exists so that memory policies can be compared over several
//! steps without them.

use std::time::Instant;

use candle_core::{DType, Tensor};
use hidream_model::TransformerInputs;

use crate::runner::TransformerRunner;
use crate::{PipelineError, Precompute, Result};

/// `n_steps + 1` sigmas from 1 down to 0.
#[derive(Debug, Clone, PartialEq)]
pub struct EulerSchedule {
    sigmas: Vec<f64>,
}

impl EulerSchedule {
    pub fn linear(n_steps: usize) -> Result<Self> {
        if n_steps == 0 {
            return Err(PipelineError::invalid("steps", "must be at least 1"));
        }
        Ok(Self { sigmas: (0..=n_steps).map(|idx| 1.0 - idx as f64 / n_steps as f64).collect() })
    }

    pub fn n_steps(&self) -> usize {
        self.sigmas.len() - 1
    }

    /// The transformer's timestep at step `step_idx`.
    pub fn timestep(&self, step_idx: usize) -> f32 {
        (self.sigmas[step_idx] * 1000.0) as f32
    }

    /// `sample + (σ_next − σ) · noise_pred`.
    pub fn step(&self, step_idx: usize, sample: &Tensor, noise_pred: &Tensor) -> Result<Tensor> {
        let delta = self.sigmas[step_idx + 1] - self.sigmas[step_idx];
        Ok((sample + (noise_pred.to_dtype(sample.dtype())? * delta)?)?)
    }
}

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

/// What [`denoise`] tells its observer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepEvent {
    /// Step `idx` is about to run (after any preparation).
    Start(usize),
    /// Step `idx` finished after `seconds`.
    Done(usize, f64),
}

/// Runs the Euler loop from `noise` (`[B, C, H, W]`, f32) and returns the final latents in f32.
/// `observe` sees each step start and finish (for progress bars and memory probes).
pub fn denoise(
    runner: &mut TransformerRunner,
    noise: &Tensor,
    text: &TextConditioning,
    schedule: &EulerSchedule,
    mut observe: impl FnMut(StepEvent),
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
    let mut sample = noise.to_dtype(DType::F32)?;
    for (step_idx, step_timesteps) in timesteps.iter().enumerate() {
        observe(StepEvent::Start(step_idx));
        let started = Instant::now();
        let output = match &prepared {
            Some(prepared) => runner.forward_prepared(prepared, step_idx, &sample)?,
            None => runner.forward(&TransformerInputs {
                hidden_states: sample.clone(),
                timesteps: step_timesteps.clone(),
                encoder_hidden_states_t5: text.encoder_hidden_states_t5.clone(),
                encoder_hidden_states_llama3: text.encoder_hidden_states_llama3.clone(),
                pooled_embeds: text.pooled_embeds.clone(),
            })?,
        };
        sample = schedule.step(step_idx, &sample, &output.neg()?)?;
        let seconds = started.elapsed().as_secs_f64();
        timings.step_seconds.push(seconds);
        observe(StepEvent::Done(step_idx, seconds));
    }
    Ok((sample, timings))
}
