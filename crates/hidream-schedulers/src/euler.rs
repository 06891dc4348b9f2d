//! A plain flow-matching Euler loop, for benchmarks and tests.
//!
//! Sigmas fall linearly from 1 to 0; the transformer sees `timestep = 1000 · sigma`; HiDream's
//! velocity is the negated transformer output (`noise_pred = -transformer(...)`, as in diffusers'
//! pipeline), and each step is `x ← x + (σ_next − σ) · noise_pred`. The official samplers are in
//! the crate root; this loop exists so that memory policies can be compared over several steps
//! without them. The loop knows no transformer: [`denoise`] asks a closure for each step's
//! velocity (hidream-pipeline's `denoise` runs its `TransformerRunner` there).

use std::time::Instant;

use candle_core::{DType, Tensor};

use crate::{Result, SchedulerError};

/// `n_steps + 1` sigmas from 1 down to 0.
#[derive(Debug, Clone, PartialEq)]
pub struct EulerSchedule {
    sigmas: Vec<f64>,
}

impl EulerSchedule {
    pub fn linear(n_steps: usize) -> Result<Self> {
        if n_steps == 0 {
            return Err(SchedulerError::invalid("steps", "must be at least 1"));
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

/// What [`denoise`] tells its observer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepEvent {
    /// Step `idx` is about to run (after any preparation).
    Start(usize),
    /// Step `idx` finished after `seconds`.
    Done(usize, f64),
}

/// Runs the Euler loop from `noise` (`[B, C, H, W]`, f32) and returns the final latents in f32
/// with the seconds of each step (velocity plus update). `velocity(step_idx, sigma, sample)` gives
/// the step's `noise_pred`; `observe` sees each step start and finish (for progress bars and
/// memory probes).
pub fn denoise<E: From<SchedulerError>>(
    noise: &Tensor,
    schedule: &EulerSchedule,
    mut velocity: impl FnMut(usize, f64, &Tensor) -> Result<Tensor, E>,
    mut observe: impl FnMut(StepEvent),
) -> Result<(Tensor, Vec<f64>), E> {
    let mut sample = noise.to_dtype(DType::F32).map_err(SchedulerError::from)?;
    let mut step_seconds = Vec::with_capacity(schedule.n_steps());
    for step_idx in 0..schedule.n_steps() {
        observe(StepEvent::Start(step_idx));
        let started = Instant::now();
        let noise_pred = velocity(step_idx, schedule.sigmas[step_idx], &sample)?;
        sample = schedule.step(step_idx, &sample, &noise_pred)?;
        let seconds = started.elapsed().as_secs_f64();
        step_seconds.push(seconds);
        observe(StepEvent::Done(step_idx, seconds));
    }
    Ok((sample, step_seconds))
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn a_constant_velocity_moves_the_sample_by_its_sigma_range() -> Result<()> {
        let schedule = EulerSchedule::linear(4)?;
        let noise = Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu)?;
        let velocity = Tensor::new(&[0.25f32, 1.0, -4.0], &Device::Cpu)?;
        let mut events = Vec::new();
        let mut sigmas = Vec::new();
        let (sample, step_seconds) = denoise(
            &noise,
            &schedule,
            |step_idx, sigma, _sample: &Tensor| -> Result<Tensor> {
                sigmas.push((step_idx, sigma));
                Ok(velocity.clone())
            },
            |event| events.push(event),
        )?;
        // σ runs from 1 to 0 in quarters (exact in binary): x_final = x − v.
        assert_eq!(sample.to_vec1::<f32>()?, vec![0.75, -3.0, 4.5]);
        assert_eq!(sigmas, vec![(0, 1.0), (1, 0.75), (2, 0.5), (3, 0.25)]);
        assert_eq!(step_seconds.len(), 4);
        assert_eq!(events.len(), 8);
        assert!(matches!(events[..2], [StepEvent::Start(0), StepEvent::Done(0, _)]));
        assert!(matches!(EulerSchedule::linear(0), Err(SchedulerError::Invalid { .. })));
        Ok(())
    }
}
