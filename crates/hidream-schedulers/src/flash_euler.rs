//! `FlashFlowMatchEulerDiscreteScheduler` of the official HiDream code
//! (`hdi1/schedulers/flash_flow_match.py`), the sampler of HiDream-I1-Dev and -Fast.
//!
//! A stochastic flow-matching Euler: step `i` predicts `x0 = x - sigma_i * v` and re-noises it to the
//! next sigma with fresh standard normal noise, `x = sigma_{i+1} * noise + (1 - sigma_{i+1}) * x0`.
//! The last step returns its input sample unchanged (its model output and `x0` are discarded).
//!
//! Line numbers below refer to `flash_flow_match.py` of `hdi1` 1.0.4.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::{Schedule, check_float, check_same_shape, linspace, mul_scalar, scalar_mul, shift_f32, shift_f64};
use crate::{Result, SchedulerError};

/// The constructor arguments of `FlashFlowMatchEulerDiscreteScheduler` that the code reads, with
/// its defaults (lines 67-80). `base_shift`, `max_shift`, `base_image_seq_len` and
/// `max_image_seq_len` are accepted but never read (the pipeline computes `mu` with its own
/// defaults); they are ignored here, like any unknown key.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct FlashEulerConfig {
    pub num_train_timesteps: usize,
    /// Applied to the training sigmas in `__init__` (fixing `sigma_min`) and again in
    /// `set_timesteps`.
    pub shift: f64,
    /// Replace the static shift by `exp(mu) / (exp(mu) + 1/t - 1)` with the pipeline's `mu`.
    pub use_dynamic_shifting: bool,
    /// Must be false (not implemented here).
    pub invert_sigmas: bool,
    /// Must be false (not implemented here).
    pub use_karras_sigmas: bool,
    /// Must be false (not implemented here).
    pub use_exponential_sigmas: bool,
    /// Must be false (not implemented here).
    pub use_beta_sigmas: bool,
}

impl Default for FlashEulerConfig {
    fn default() -> Self {
        FlashEulerConfig {
            num_train_timesteps: 1000,
            shift: 1.0,
            use_dynamic_shifting: false,
            invert_sigmas: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
        }
    }
}

impl FlashEulerConfig {
    /// Rejects degenerate settings and what is not implemented here.
    pub fn validate(&self) -> Result<()> {
        let invalid =
            |problem: String| Err(SchedulerError::invalid("FlashFlowMatchEulerDiscreteScheduler config", problem));
        if self.num_train_timesteps < 2 {
            return invalid(format!("num_train_timesteps {} < 2 gives no schedule", self.num_train_timesteps));
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return invalid(format!("shift {} must be positive and finite", self.shift));
        }
        let unsupported = [
            ("invert_sigmas", self.invert_sigmas),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
        ];
        match unsupported.iter().find(|(_, set)| *set) {
            Some((name, _)) => invalid(format!("{name} is not supported")),
            None => Ok(()),
        }
    }
}

/// The FlashFlowMatchEuler sampler.
#[derive(Debug, Clone)]
pub struct FlashEuler {
    config: FlashEulerConfig,
    /// `sigmas[0]` and `sigmas[-1]` after `__init__` (f32).
    sigma_max: f32,
    sigma_min: f32,
    schedule: Option<Schedule>,
    next_step: usize,
}

impl FlashEuler {
    pub fn new(config: FlashEulerConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self::new_unchecked(config))
    }

    pub(super) fn new_unchecked(config: FlashEulerConfig) -> Self {
        // Lines 87-102: timesteps = linspace(1, N, N, float32)[::-1], sigmas = timesteps / N in f32,
        // shifted in f32 unless dynamic. Only the endpoints survive: N / N and 1 / N.
        let n_train = config.num_train_timesteps as f32;
        let endpoint = |timestep: f32| {
            let sigma = timestep / n_train;
            if config.use_dynamic_shifting { sigma } else { shift_f32(sigma, config.shift) }
        };
        let (sigma_max, sigma_min) = (endpoint(n_train), endpoint(1.0));
        FlashEuler { config, sigma_max, sigma_min, schedule: None, next_step: 0 }
    }

    pub fn config(&self) -> &FlashEulerConfig {
        &self.config
    }

    /// `set_timesteps(n_steps, mu=mu)` (lines 183-240); `mu` is used only with
    /// `use_dynamic_shifting`.
    pub fn set_timesteps(&mut self, n_steps: usize, mu: f64) -> Result<&Schedule> {
        if n_steps == 0 {
            return Err(SchedulerError::invalid("FlashFlowMatchEuler set_timesteps", "0 steps"));
        }
        let n_train = self.config.num_train_timesteps as f64;
        // timesteps = linspace(sigma_max * N, sigma_min * N, n) and sigmas = timesteps / N, in f64.
        let timesteps = linspace(f64::from(self.sigma_max) * n_train, f64::from(self.sigma_min) * n_train, n_steps);
        let exp_mu = mu.exp();
        let sigmas64 = timesteps.iter().map(|timestep| {
            let sigma = timestep / n_train;
            // time_shift(mu, 1.0, t) = exp(mu) / (exp(mu) + (1 / t - 1) ** 1.0)
            if self.config.use_dynamic_shifting {
                exp_mu / (exp_mu + (1.0 / sigma - 1.0))
            } else {
                shift_f64(sigma, self.config.shift)
            }
        });
        // sigmas to float32, timesteps = sigmas * N in float32, then a final sigma 0.
        let mut sigmas: Vec<f32> = sigmas64.map(|sigma| sigma as f32).collect();
        let timesteps: Vec<f32> = sigmas.iter().map(|sigma| sigma * n_train as f32).collect();
        sigmas.push(0.0);
        // See FlowUniPc::set_timesteps: a repeated first timestep makes the reference start at index 1.
        if timesteps.iter().filter(|t| **t == timesteps[0]).count() > 1 {
            return Err(SchedulerError::invalid(
                "FlashFlowMatchEuler set_timesteps",
                format!("{n_steps} steps repeat the first timestep {}; the reference fails on them", timesteps[0]),
            ));
        }
        self.next_step = 0;
        Ok(self.schedule.insert(Schedule::new(timesteps, sigmas)))
    }

    pub fn schedule(&self) -> Option<&Schedule> {
        self.schedule.as_ref()
    }

    /// Whether `step_idx` is the last step, which returns its input sample.
    pub fn is_last_step(&self, step_idx: usize) -> bool {
        self.schedule.as_ref().is_some_and(|schedule| step_idx + 1 == schedule.n_steps())
    }

    /// Whether step `step_idx` re-noises (every step but the last).
    pub fn needs_noise(&self, step_idx: usize) -> bool {
        self.schedule.as_ref().is_some_and(|schedule| step_idx + 1 < schedule.n_steps())
    }

    /// `step(model_output, timesteps[step_idx], sample)` (lines 264-345). `noise` is the standard
    /// normal tensor the reference draws with `randn_tensor` (float32, the model output's shape);
    /// it is required on every step but the last, where it is ignored. The sample is upcast to f32;
    /// the result has the model output's dtype. On the last step the result is the input sample.
    pub fn step(
        &mut self,
        model_output: &Tensor,
        step_idx: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        let sigmas = match &self.schedule {
            Some(schedule) if step_idx == self.next_step && step_idx < schedule.n_steps() => schedule.sigmas(),
            Some(schedule) => {
                return Err(SchedulerError::invalid(
                    "FlashFlowMatchEuler step",
                    format!("step {step_idx} out of order: expected step {} of {}", self.next_step, schedule.n_steps()),
                ));
            }
            None => return Err(SchedulerError::invalid("FlashFlowMatchEuler step", "set_timesteps was not called")),
        };
        check_float("FlashFlowMatchEuler model output", model_output)?;
        check_float("FlashFlowMatchEuler sample", sample)?;
        check_same_shape("FlashFlowMatchEuler sample", sample, model_output)?;
        let sample = sample.to_dtype(DType::F32)?;
        let next = if step_idx + 1 < sigmas.len() - 1 {
            let noise = noise.ok_or_else(|| {
                SchedulerError::invalid("FlashFlowMatchEuler step", format!("step {step_idx} needs noise"))
            })?;
            check_float("FlashFlowMatchEuler noise", noise)?;
            check_same_shape("FlashFlowMatchEuler noise", noise, model_output)?;
            // denoised = sample - model_output * sigma (the product in the model output's dtype).
            let denoised = sample.sub(&mul_scalar(model_output, sigmas[step_idx])?.to_dtype(DType::F32)?)?;
            let sigma_next = sigmas[step_idx + 1];
            // sigma_next * noise + (1.0 - sigma_next) * denoised, all float32.
            scalar_mul(sigma_next, &noise.to_dtype(DType::F32)?)?.add(&scalar_mul(1.0 - sigma_next, &denoised)?)?
        } else {
            sample
        };
        self.next_step += 1;
        Ok(next.to_dtype(model_output.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn scheduler(shift: f64) -> FlashEuler {
        FlashEuler::new(FlashEulerConfig { shift, ..FlashEulerConfig::default() }).expect("valid preset")
    }

    fn tensor(values: &[f32]) -> Tensor {
        Tensor::new(values, &Device::Cpu).expect("cpu tensor")
    }

    fn values(tensor: &Tensor) -> Vec<f32> {
        tensor.to_vec1().expect("f32 vector")
    }

    #[test]
    fn schedule_of_dev_matches_the_reference() -> Result<()> {
        let mut dev = scheduler(6.0);
        // Python: sigma_max 1.0, sigma_min 0.005970149300992489; timesteps 1000, 993.6698, ...
        assert_eq!(dev.sigma_max, 1.0);
        assert_eq!(f64::from(dev.sigma_min), 0.005970149300992489);
        let schedule = dev.set_timesteps(28, 1.15)?;
        assert_eq!(schedule.timesteps()[0], 1000.0);
        assert!((schedule.timesteps()[1] - 993.6698).abs() < 1e-4);
        assert_eq!(schedule.sigmas().len(), 29);
        assert_eq!(schedule.sigmas()[28], 0.0);
        // The f32 shift can round sigma_max above 1; Python gives 1.0000001192092896 too.
        assert_eq!(f64::from(scheduler(1.33912856603577).sigma_max), 1.0000001192092896);
        Ok(())
    }

    #[test]
    fn last_step_returns_the_input_unchanged() -> Result<()> {
        let mut fast = scheduler(3.0);
        fast.set_timesteps(2, 1.15)?;
        let sample = tensor(&[0.5, -1.0, 2.0]);
        let model_output = tensor(&[0.25, 1.0, -0.5]);
        let noise = tensor(&[1.0, 0.0, -1.0]);
        assert!(fast.needs_noise(0) && !fast.needs_noise(1) && fast.is_last_step(1));
        let first = fast.step(&model_output, 0, &sample, Some(&noise))?;
        assert_ne!(values(&first), values(&sample));
        let last = fast.step(&tensor(&[9.0, 9.0, 9.0]), 1, &first, None)?;
        assert_eq!(values(&last), values(&first));
        // One step: the only step is the last one, and it returns the initial noise.
        fast.set_timesteps(1, 1.15)?;
        assert_eq!(values(&fast.step(&model_output, 0, &sample, None)?), values(&sample));
        Ok(())
    }

    #[test]
    fn a_step_re_noises_the_predicted_x0() -> Result<()> {
        let mut fast = scheduler(3.0);
        let sigmas = fast.set_timesteps(4, 1.15)?.sigmas().to_vec();
        let (sample, model_output, noise) = ([0.5f32, -1.0], [0.25f32, 1.0], [1.5f32, -0.5]);
        let out = fast.step(&tensor(&model_output), 0, &tensor(&sample), Some(&tensor(&noise)))?;
        let expected: Vec<f32> = (0..2)
            .map(|idx| {
                let denoised = sample[idx] - model_output[idx] * sigmas[0];
                sigmas[1] * noise[idx] + (1.0 - sigmas[1]) * denoised
            })
            .collect();
        assert_eq!(values(&out), expected);
        Ok(())
    }

    #[test]
    fn missing_noise_and_bad_shapes_are_errors() -> Result<()> {
        let mut fast = scheduler(3.0);
        fast.set_timesteps(3, 1.15)?;
        let sample = tensor(&[0.5, -1.0]);
        assert!(matches!(fast.step(&sample, 0, &sample, None), Err(SchedulerError::Invalid { .. })));
        let short = tensor(&[1.0]);
        assert!(matches!(fast.step(&sample, 0, &sample, Some(&short)), Err(SchedulerError::Invalid { .. })));
        assert!(matches!(fast.step(&sample, 1, &sample, Some(&sample)), Err(SchedulerError::Invalid { .. })));
        let ints = Tensor::new(&[1u32, 2], &Device::Cpu)?;
        assert!(matches!(fast.step(&ints, 0, &sample, Some(&sample)), Err(SchedulerError::Invalid { .. })));
        Ok(())
    }

    #[test]
    fn output_takes_the_model_output_dtype() -> Result<()> {
        let mut fast = scheduler(3.0);
        fast.set_timesteps(2, 1.15)?;
        let sample = tensor(&[0.5, -1.0]);
        let model_output = tensor(&[0.25, 1.0]).to_dtype(DType::BF16)?;
        let out = fast.step(&model_output, 0, &sample, Some(&sample))?;
        assert_eq!(out.dtype(), DType::BF16);
        Ok(())
    }
}
