//! `FlowUniPCMultistepScheduler` of the official HiDream code (`hdi1/schedulers/fm_solvers_unipc.py`),
//! the sampler of HiDream-I1-Full.
//!
//! UniPC (Zhao et al., 2023) adapted to flow matching by the Wan team, in its `B(h)` form: the model
//! output `v` is converted to a predicted `x0 = x - sigma * v` (`convert_model_output`), a multistep
//! predictor (UniP, `multistep_uni_p_bh_update`) moves the sample to the next sigma, and before that a
//! corrector (UniC, `multistep_uni_c_bh_update`) refines the current sample with the model output just
//! computed at it. `alpha = 1 - sigma`, `lambda = log(alpha) - log(sigma)`.
//!
//! Line numbers below refer to `fm_solvers_unipc.py` of `hdi1` 1.0.4.

use candle_core::{DType, Tensor};
use serde::Deserialize;

use super::{
    Schedule, add_scalar, check_float, check_same_shape, div_scalar, linspace, mul_scalar, scalar_mul, shift_f32,
    shift_f64,
};
use crate::{Result, SchedulerError};

/// The constructor arguments of `FlowUniPCMultistepScheduler` that the code reads, with its defaults
/// (lines 77-95). `timestep_spacing`, `steps_offset`, `dynamic_thresholding_ratio` and
/// `sample_max_value` are accepted by the reference but never read without `thresholding`; they are
/// ignored here, like any unknown key.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct FlowUniPcConfig {
    pub num_train_timesteps: usize,
    /// UniPC's order `p`; HiDream uses 2.
    pub solver_order: usize,
    pub prediction_type: PredictionType,
    /// The shift applied in `__init__` to the training sigmas, which fixes `sigma_max`. The pipeline
    /// passes its own shift to `set_timesteps`.
    pub shift: f64,
    /// Must be false: the pipeline passes no `mu` to FlowUniPC, and the reference raises.
    pub use_dynamic_shifting: bool,
    /// Must be false (dynamic thresholding is not implemented here; HiDream does not use it).
    pub thresholding: bool,
    /// Update on the predicted `x0` (true) or on the predicted noise.
    pub predict_x0: bool,
    pub solver_type: SolverType,
    /// Lower the order on the last steps: `order = min(solver_order, n_steps - step_idx)`.
    pub lower_order_final: bool,
    /// Steps after which the corrector is skipped: the corrector at step `i` runs unless `i - 1` is
    /// listed.
    pub disable_corrector: Vec<usize>,
    /// Must be null: an external predictor scheduler is not supported.
    pub solver_p: Option<serde_json::Value>,
    pub final_sigmas_type: FinalSigmas,
}

impl Default for FlowUniPcConfig {
    fn default() -> Self {
        FlowUniPcConfig {
            num_train_timesteps: 1000,
            solver_order: 2,
            prediction_type: PredictionType::FlowPrediction,
            shift: 1.0,
            use_dynamic_shifting: false,
            thresholding: false,
            predict_x0: true,
            solver_type: SolverType::Bh2,
            lower_order_final: true,
            disable_corrector: Vec::new(),
            solver_p: None,
            final_sigmas_type: FinalSigmas::Zero,
        }
    }
}

impl FlowUniPcConfig {
    /// Rejects what the reference rejects or breaks on, and what is not implemented here.
    pub fn validate(&self) -> Result<()> {
        let invalid = |problem: String| Err(SchedulerError::invalid("FlowUniPCMultistepScheduler config", problem));
        if self.num_train_timesteps < 2 {
            return invalid(format!("num_train_timesteps {} < 2 gives no schedule", self.num_train_timesteps));
        }
        if self.solver_order == 0 {
            return invalid("solver_order must be at least 1".into());
        }
        if !(self.shift.is_finite() && self.shift > 0.0) {
            return invalid(format!("shift {} must be positive and finite", self.shift));
        }
        if self.use_dynamic_shifting {
            return invalid(
                "use_dynamic_shifting needs a mu, which the pipeline never passes (the reference raises)".into(),
            );
        }
        if self.thresholding {
            return invalid("thresholding is not supported".into());
        }
        if self.solver_p.as_ref().is_some_and(|solver_p| !solver_p.is_null()) {
            return invalid("solver_p (an external predictor) is not supported".into());
        }
        Ok(())
    }
}

/// `prediction_type`: only `flow_prediction` is implemented by the reference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum PredictionType {
    #[serde(rename = "flow_prediction")]
    FlowPrediction,
}

/// `solver_type`. The reference registers `midpoint`, `heun` and `logrho` as `bh2` (lines 97-102).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SolverType {
    /// `B(h) = h`.
    Bh1,
    /// `B(h) = expm1(h)`.
    #[serde(alias = "midpoint", alias = "heun", alias = "logrho")]
    Bh2,
}

/// `final_sigmas_type`: the reference's `sigma_min` reads a missing `alphas_cumprod` and raises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinalSigmas {
    Zero,
}

/// The FlowUniPC sampler with its multistep state.
#[derive(Debug, Clone)]
pub struct FlowUniPc {
    config: FlowUniPcConfig,
    /// `sigmas[0]` after `__init__` (f32, shifted by `config.shift`); `sigma_min` is 0.
    sigma_max: f32,
    schedule: Option<Schedule>,
    /// The last `solver_order` converted model outputs, oldest first (`self.model_outputs`).
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    last_sample: Option<Tensor>,
    this_order: usize,
    next_step: usize,
}

impl FlowUniPc {
    pub fn new(config: FlowUniPcConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self::new_unchecked(config))
    }

    pub(super) fn new_unchecked(config: FlowUniPcConfig) -> Self {
        // Lines 107-118: alphas = linspace(1, 1/N, N)[::-1] in f64, sigmas = 1 - alphas cast to f32,
        // then shifted in f32. Only the endpoints survive: sigmas[0] = shift(f32(1 - 1/N)),
        // sigmas[-1] = shift(1 - 1) = 0.
        let n_train = config.num_train_timesteps as f64;
        let sigma_max = shift_f32((1.0 - 1.0 / n_train) as f32, config.shift);
        let model_outputs = vec![None; config.solver_order];
        FlowUniPc {
            config,
            sigma_max,
            schedule: None,
            model_outputs,
            lower_order_nums: 0,
            last_sample: None,
            this_order: 0,
            next_step: 0,
        }
    }

    pub fn config(&self) -> &FlowUniPcConfig {
        &self.config
    }

    /// `set_timesteps(n_steps, shift=shift)` (lines 160-227); the pipeline passes
    /// `shift = exp(mu)`. Resets the multistep state.
    pub fn set_timesteps(&mut self, n_steps: usize, shift: f64) -> Result<&Schedule> {
        if n_steps == 0 {
            return Err(SchedulerError::invalid("FlowUniPC set_timesteps", "0 steps"));
        }
        if !(shift.is_finite() && shift > 0.0) {
            return Err(SchedulerError::invalid("FlowUniPC set_timesteps", format!("shift {shift}")));
        }
        let n_train = self.config.num_train_timesteps as f64;
        // linspace(sigma_max, sigma_min = 0, n + 1)[:-1] in f64, shifted in f64.
        let mut shifted = linspace(f64::from(self.sigma_max), 0.0, n_steps + 1);
        shifted.truncate(n_steps);
        shifted.iter_mut().for_each(|sigma| *sigma = shift_f64(*sigma, shift));
        // timesteps = (sigmas * N) as int64 (truncation); sigmas = [sigmas, 0] as float32.
        let timesteps: Vec<f32> = shifted.iter().map(|sigma| (sigma * n_train).trunc() as f32).collect();
        let mut sigmas: Vec<f32> = shifted.iter().map(|sigma| *sigma as f32).collect();
        sigmas.push(0.0);
        // `_init_step_index` finds the first timestep in `timesteps` and takes its *second*
        // occurrence if it repeats (`index_for_timestep`); the run then starts at index 1 and its last
        // step reads sigmas[n + 1], which raises. Such schedules (from 355 steps on for Full) are
        // refused.
        if timesteps.iter().filter(|t| **t == timesteps[0]).count() > 1 {
            return Err(SchedulerError::invalid(
                "FlowUniPC set_timesteps",
                format!("{n_steps} steps repeat the first timestep {}; the reference fails on them", timesteps[0]),
            ));
        }
        self.model_outputs = vec![None; self.config.solver_order];
        self.lower_order_nums = 0;
        self.last_sample = None;
        self.this_order = 0;
        self.next_step = 0;
        Ok(self.schedule.insert(Schedule::new(timesteps, sigmas)))
    }

    pub fn schedule(&self) -> Option<&Schedule> {
        self.schedule.as_ref()
    }

    /// `step(model_output, timesteps[step_idx], sample)` (lines 655-739): the corrector on `sample`
    /// (from the second step on), then the predictor to the next sigma. `model_output` and `sample`
    /// share shape and dtype; the result has that dtype.
    pub fn step(&mut self, model_output: &Tensor, step_idx: usize, sample: &Tensor) -> Result<Tensor> {
        let n_steps = self.check_step(step_idx)?;
        check_float("FlowUniPC sample", sample)?;
        check_same_shape("FlowUniPC model output", model_output, sample)?;
        if model_output.dtype() != sample.dtype() {
            return Err(SchedulerError::invalid(
                "FlowUniPC model output",
                format!("dtype {:?}, the sample's is {:?}", model_output.dtype(), sample.dtype()),
            ));
        }
        let use_corrector =
            step_idx > 0 && !self.config.disable_corrector.contains(&(step_idx - 1)) && self.last_sample.is_some();
        let converted = self.convert_model_output(model_output, step_idx, sample)?;
        let sample = match &self.last_sample {
            Some(last_sample) if use_corrector => {
                self.uni_c_update(&converted, last_sample, sample, self.this_order, step_idx)?
            }
            _ => sample.clone(),
        };
        self.model_outputs.rotate_left(1);
        if let Some(newest) = self.model_outputs.last_mut() {
            *newest = Some(converted);
        }
        let order = if self.config.lower_order_final {
            self.config.solver_order.min(n_steps - step_idx)
        } else {
            self.config.solver_order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev_sample = self.uni_p_update(&sample, self.this_order, step_idx)?;
        self.last_sample = Some(sample);
        if self.lower_order_nums < self.config.solver_order {
            self.lower_order_nums += 1;
        }
        self.next_step += 1;
        Ok(prev_sample)
    }

    /// The order UniP used on the last step (UniC uses it on the next one).
    pub fn this_order(&self) -> usize {
        self.this_order
    }

    fn check_step(&self, step_idx: usize) -> Result<usize> {
        let schedule = self
            .schedule
            .as_ref()
            .ok_or_else(|| SchedulerError::invalid("FlowUniPC step", "set_timesteps was not called"))?;
        if step_idx != self.next_step || step_idx >= schedule.n_steps() {
            return Err(SchedulerError::invalid(
                "FlowUniPC step",
                format!("step {step_idx} out of order: expected step {} of {}", self.next_step, schedule.n_steps()),
            ));
        }
        Ok(schedule.n_steps())
    }

    fn sigmas(&self) -> &[f32] {
        self.schedule.as_ref().map_or(&[], Schedule::sigmas)
    }

    /// The `back`-th newest stored model output (`model_outputs[-(back + 1)]`).
    fn stored_output(&self, back: usize) -> Result<&Tensor> {
        self.model_outputs
            .len()
            .checked_sub(back + 1)
            .and_then(|idx| self.model_outputs[idx].as_ref())
            .ok_or_else(|| SchedulerError::invalid("FlowUniPC", format!("no model output {back} steps back")))
    }

    /// `convert_model_output` (lines 279-347): `x0 = x - sigma * v`, or `eps = x - (1 - sigma) * v`.
    fn convert_model_output(&self, model_output: &Tensor, step_idx: usize, sample: &Tensor) -> Result<Tensor> {
        let sigma = self.sigmas()[step_idx];
        let factor = if self.config.predict_x0 { sigma } else { 1.0 - sigma };
        Ok(sample.sub(&scalar_mul(factor, model_output)?)?)
    }

    /// `multistep_uni_p_bh_update` (lines 349-484): from `sigmas[step_idx]` to `sigmas[step_idx + 1]`
    /// with the `order` newest converted outputs (the newest is this step's).
    fn uni_p_update(&self, sample: &Tensor, order: usize, step_idx: usize) -> Result<Tensor> {
        let sigmas = self.sigmas();
        let prior: Vec<f32> = (1..order).map(|back| sigmas[step_idx - back]).collect();
        let coefficients = Coefficients::new(&self.config, sigmas[step_idx + 1], sigmas[step_idx], &prior, order);
        let m0 = self.stored_output(0)?;
        let d1s = self.differences(m0, &coefficients.rks[..order - 1])?;
        let pred_res = if d1s.is_empty() {
            None
        } else {
            // Order 2 uses rho = 0.5 (line 458); higher orders solve the leading (order-1)² system.
            let rhos = if order == 2 {
                vec![0.5]
            } else {
                let r: Vec<Vec<f32>> =
                    coefficients.r[..order - 1].iter().map(|row| row[..order - 1].to_vec()).collect();
                solve(&r, &coefficients.b[..order - 1])?
            };
            Some(weighted_sum(&round_to(&rhos, sample.dtype(), sample)?, &d1s)?)
        };
        let x_t = coefficients.x_t_base(&self.config, sample, m0)?;
        let factor = coefficients.residual_factor(&self.config);
        match pred_res {
            Some(pred_res) => Ok(x_t.sub(&scalar_mul(factor, &pred_res)?)?),
            // `x_t_ - alpha_t * B_h * 0`: adds nothing unless the factor is not finite.
            None => Ok(add_scalar(&x_t, -(factor * 0.0))?),
        }
    }

    /// `multistep_uni_c_bh_update` (lines 486-626): corrects `this_sample` (at `sigmas[step_idx]`,
    /// predicted from `last_sample` at `sigmas[step_idx - 1]`) with this step's converted output.
    fn uni_c_update(
        &self,
        this_model_output: &Tensor,
        last_sample: &Tensor,
        this_sample: &Tensor,
        order: usize,
        step_idx: usize,
    ) -> Result<Tensor> {
        let sigmas = self.sigmas();
        let prior: Vec<f32> = (1..order).map(|back| sigmas[step_idx - 1 - back]).collect();
        let coefficients = Coefficients::new(&self.config, sigmas[step_idx], sigmas[step_idx - 1], &prior, order);
        let m0 = self.stored_output(0)?;
        let d1s = self.differences(m0, &coefficients.rks[..order - 1])?;
        // Order 1 uses rho = 0.5 (line 605); otherwise the full order² system.
        let rhos = if order == 1 { vec![0.5] } else { solve(&coefficients.r, &coefficients.b)? };
        let rhos = round_to(&rhos, this_sample.dtype(), this_sample)?;
        let x_t = coefficients.x_t_base(&self.config, last_sample, m0)?;
        let d1_t = this_model_output.sub(m0)?;
        let newest = scalar_mul(rhos[order - 1], &d1_t)?;
        let correction = if d1s.is_empty() { newest } else { weighted_sum(&rhos[..order - 1], &d1s)?.add(&newest)? };
        let factor = coefficients.residual_factor(&self.config);
        Ok(x_t.sub(&scalar_mul(factor, &correction)?)?)
    }

    /// `D1s`: `(m_i - m0) / r_i` for the outputs `i = 1..` steps back.
    fn differences(&self, m0: &Tensor, rks: &[f32]) -> Result<Vec<Tensor>> {
        rks.iter().enumerate().map(|(idx, rk)| Ok(div_scalar(&self.stored_output(idx + 1)?.sub(m0)?, *rk)?)).collect()
    }
}

/// The f32 scalars of one UniP or UniC update, computed as the reference computes them on 0-d
/// float32 tensors (lines 401-452 and 548-596).
struct Coefficients {
    alpha_t: f32,
    sigma_t: f32,
    alpha_s0: f32,
    sigma_s0: f32,
    h_phi_1: f32,
    b_h: f32,
    /// `rks`: `(lambda_si - lambda_s0) / h` for each earlier step, then 1.
    rks: Vec<f32>,
    /// `R[i][k] = rks[k]^i`, `order × order`.
    r: Vec<Vec<f32>>,
    b: Vec<f32>,
}

impl Coefficients {
    /// `sigma_t` is the target, `sigma_s0` the current sigma, `prior[i - 1]` the sigma `i` steps
    /// before `sigma_s0`.
    fn new(config: &FlowUniPcConfig, sigma_t: f32, sigma_s0: f32, prior: &[f32], order: usize) -> Self {
        let lambda = |sigma: f32| ln(1.0 - sigma) - ln(sigma);
        let lambda_s0 = lambda(sigma_s0);
        let h = lambda(sigma_t) - lambda_s0;
        let mut rks: Vec<f32> = prior.iter().map(|sigma| (lambda(*sigma) - lambda_s0) / h).collect();
        rks.push(1.0);
        let hh = if config.predict_x0 { -h } else { h };
        let h_phi_1 = expm1(hh);
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let b_h = match config.solver_type {
            SolverType::Bh1 => hh,
            SolverType::Bh2 => expm1(hh),
        };
        let mut factorial: u64 = 1;
        let mut r = Vec::with_capacity(order);
        let mut b = Vec::with_capacity(order);
        for power in 1..=order {
            r.push(rks.iter().map(|rk| pow_int(*rk, power - 1)).collect());
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= power as u64 + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        Coefficients { alpha_t: 1.0 - sigma_t, sigma_t, alpha_s0: 1.0 - sigma_s0, sigma_s0, h_phi_1, b_h, rks, r, b }
    }

    /// `x_t_`: `sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0` (on `x0`), or
    /// `alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0` (on the noise).
    fn x_t_base(&self, config: &FlowUniPcConfig, x: &Tensor, m0: &Tensor) -> candle_core::Result<Tensor> {
        let (x_factor, m0_factor) = if config.predict_x0 {
            (self.sigma_t / self.sigma_s0, self.alpha_t * self.h_phi_1)
        } else {
            (self.alpha_t / self.alpha_s0, self.sigma_t * self.h_phi_1)
        };
        scalar_mul(x_factor, x)?.sub(&scalar_mul(m0_factor, m0)?)
    }

    /// The factor of the residual term: `alpha_t * B_h` (on `x0`) or `sigma_t * B_h`.
    fn residual_factor(&self, config: &FlowUniPcConfig) -> f32 {
        if config.predict_x0 { self.alpha_t * self.b_h } else { self.sigma_t * self.b_h }
    }
}

/// `torch.log` of a float32 value, correctly rounded.
fn ln(value: f32) -> f32 {
    f64::from(value).ln() as f32
}

/// `torch.expm1` of a float32 value, correctly rounded.
fn expm1(value: f32) -> f32 {
    f64::from(value).exp_m1() as f32
}

/// `torch.pow(x, n)` for a float32 tensor and an integer exponent: torch's special cases for 0 to 3,
/// `pow` otherwise.
fn pow_int(value: f32, exponent: usize) -> f32 {
    match exponent {
        0 => 1.0,
        1 => value,
        2 => value * value,
        3 => value * value * value,
        _ => f64::from(value).powf(exponent as f64) as f32,
    }
}

/// `torch.linalg.solve(R, b)` in float32: Gaussian elimination with partial pivoting in f64, rounded.
fn solve(r: &[Vec<f32>], b: &[f32]) -> Result<Vec<f32>> {
    let n = b.len();
    let mut a: Vec<Vec<f64>> = r.iter().map(|row| row.iter().map(|v| f64::from(*v)).collect()).collect();
    let mut x: Vec<f64> = b.iter().map(|v| f64::from(*v)).collect();
    for col in 0..n {
        let pivot = (col..n).fold(col, |best, row| if a[row][col].abs() > a[best][col].abs() { row } else { best });
        if a[pivot][col] == 0.0 {
            return Err(SchedulerError::invalid("FlowUniPC", "the UniPC system is singular (repeated sigmas)"));
        }
        a.swap(col, pivot);
        x.swap(col, pivot);
        for row in col + 1..n {
            let factor = a[row][col] / a[col][col];
            let (above, below) = a.split_at_mut(row);
            for (target, source) in below[0][col..].iter_mut().zip(&above[col][col..]) {
                *target -= factor * source;
            }
            x[row] -= factor * x[col];
        }
    }
    for col in (0..n).rev() {
        let tail: f64 = (col + 1..n).map(|k| a[col][k] * x[k]).sum();
        x[col] = (x[col] - tail) / a[col][col];
    }
    Ok(x.into_iter().map(|v| v as f32).collect())
}

/// `rhos.to(x.dtype)`: the coefficients rounded to the sample's dtype (a no-op for f32).
fn round_to(values: &[f32], dtype: DType, like: &Tensor) -> Result<Vec<f32>> {
    if dtype == DType::F32 || dtype == DType::F64 {
        return Ok(values.to_vec());
    }
    Ok(Tensor::new(values, like.device())?.to_dtype(dtype)?.to_dtype(DType::F32)?.to_vec1()?)
}

/// `einsum("k,bkc...->bc...", rhos, D1s)`: accumulated in f32 (f64 for f64 tensors), rounded once.
fn weighted_sum(rhos: &[f32], d1s: &[Tensor]) -> Result<Tensor> {
    let (first, rest) = d1s.split_first().ok_or_else(|| SchedulerError::invalid("FlowUniPC", "empty D1s"))?;
    if rest.is_empty() {
        return Ok(mul_scalar(first, rhos[0])?);
    }
    let dtype = first.dtype();
    let compute = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
    let mut sum = mul_scalar(&first.to_dtype(compute)?, rhos[0])?;
    for (rho, d1) in rhos[1..].iter().zip(rest) {
        sum = sum.add(&mul_scalar(&d1.to_dtype(compute)?, *rho)?)?;
    }
    Ok(sum.to_dtype(dtype)?)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::PipelineShift;

    fn full() -> FlowUniPc {
        FlowUniPc::new(FlowUniPcConfig { shift: 3.0, ..FlowUniPcConfig::default() }).expect("valid preset")
    }

    fn tensor(values: &[f32]) -> Tensor {
        Tensor::new(values, &Device::Cpu).expect("cpu tensor")
    }

    fn values(tensor: &Tensor) -> Vec<f32> {
        tensor.to_vec1().expect("f32 vector")
    }

    #[test]
    fn schedule_of_full_matches_the_reference() -> Result<()> {
        let mut scheduler = full();
        // Python: FlowUniPCMultistepScheduler(shift=3.0).sigma_max == 0.9996663928031921.
        assert_eq!(f64::from(scheduler.sigma_max), 0.9996663928031921);
        let schedule = scheduler.set_timesteps(50, PipelineShift::default().unipc_shift())?;
        assert_eq!(schedule.timesteps()[..5], [999.0, 993.0, 986.0, 980.0, 973.0]);
        assert_eq!(schedule.timesteps()[45..], [259.0, 215.0, 167.0, 116.0, 60.0]);
        assert_eq!(schedule.sigmas().len(), 51);
        assert_eq!(schedule.sigmas()[50], 0.0);
        Ok(())
    }

    #[test]
    fn one_step_is_a_first_order_step_to_sigma_zero() -> Result<()> {
        let mut scheduler = full();
        let sigma = scheduler.set_timesteps(1, 3.0)?.sigmas()[0];
        let sample = tensor(&[0.5, -1.0, 2.0]);
        let model_output = tensor(&[0.25, 1.0, -0.5]);
        let out = scheduler.step(&model_output, 0, &sample)?;
        assert_eq!(scheduler.this_order(), 1);
        // With sigma_t = 0 the predictor returns x0 = x - sigma * v exactly.
        let expected: Vec<f32> =
            values(&sample).iter().zip(values(&model_output)).map(|(x, v)| x - sigma * v).collect();
        assert_eq!(values(&out), expected);
        Ok(())
    }

    #[test]
    fn two_steps_stay_first_order_and_correct_the_second() -> Result<()> {
        let mut scheduler = full();
        scheduler.set_timesteps(2, 3.0)?;
        let sample = tensor(&[0.5, -1.0, 2.0]);
        let first = scheduler.step(&tensor(&[0.25, 1.0, -0.5]), 0, &sample)?;
        assert_eq!(scheduler.this_order(), 1);
        let second = scheduler.step(&tensor(&[0.0, 0.5, -1.0]), 1, &first)?;
        // lower_order_final: min(2, n_steps - 1) = 1 on the last step.
        assert_eq!(scheduler.this_order(), 1);
        assert!(values(&second).iter().all(|v| v.is_finite()));
        // Without lower_order_final the second step is second order.
        let config = FlowUniPcConfig { shift: 3.0, lower_order_final: false, ..FlowUniPcConfig::default() };
        let mut scheduler = FlowUniPc::new(config)?;
        scheduler.set_timesteps(3, 3.0)?;
        let first = scheduler.step(&tensor(&[0.25, 1.0, -0.5]), 0, &sample)?;
        scheduler.step(&tensor(&[0.0, 0.5, -1.0]), 1, &first)?;
        assert_eq!(scheduler.this_order(), 2);
        Ok(())
    }

    #[test]
    fn the_corrector_changes_the_sample_unless_disabled() -> Result<()> {
        let run = |disable_corrector: Vec<usize>| -> Result<Vec<f32>> {
            let config = FlowUniPcConfig { shift: 3.0, disable_corrector, ..FlowUniPcConfig::default() };
            let mut scheduler = FlowUniPc::new(config)?;
            scheduler.set_timesteps(4, 3.0)?;
            let mut sample = tensor(&[0.5, -1.0, 2.0]);
            for (step_idx, output) in [[0.25, 1.0, -0.5], [0.0, 0.5, -1.0]].iter().enumerate() {
                sample = scheduler.step(&tensor(output), step_idx, &sample)?;
            }
            Ok(values(&sample))
        };
        assert_ne!(run(vec![])?, run(vec![0])?);
        assert_eq!(run(vec![1])?, run(vec![])?);
        Ok(())
    }

    #[test]
    fn steps_must_come_in_order_after_set_timesteps() -> Result<()> {
        let mut scheduler = full();
        let sample = tensor(&[1.0]);
        assert!(matches!(scheduler.step(&sample, 0, &sample), Err(SchedulerError::Invalid { .. })));
        scheduler.set_timesteps(3, 3.0)?;
        assert!(matches!(scheduler.step(&sample, 1, &sample), Err(SchedulerError::Invalid { .. })));
        let next = scheduler.step(&sample, 0, &sample)?;
        assert!(matches!(scheduler.step(&sample, 0, &next), Err(SchedulerError::Invalid { .. })));
        assert!(matches!(scheduler.step(&tensor(&[1.0, 2.0]), 1, &next), Err(SchedulerError::Invalid { .. })));
        assert!(matches!(scheduler.set_timesteps(0, 3.0), Err(SchedulerError::Invalid { .. })));
        Ok(())
    }

    #[test]
    fn schedules_that_repeat_the_first_timestep_are_refused() -> Result<()> {
        let mut scheduler = full();
        let shift = PipelineShift::default().unipc_shift();
        // Python: 354 steps start 999, 996, ...; 355 steps start 999, 999 (index_for_timestep picks 1).
        assert!(scheduler.set_timesteps(354, shift).is_ok());
        assert!(matches!(scheduler.set_timesteps(355, shift), Err(SchedulerError::Invalid { .. })));
        Ok(())
    }

    #[test]
    fn solve_pivots() -> Result<()> {
        assert_eq!(solve(&[vec![1.0, 1.0], vec![-2.0, 1.0]], &[3.0, 0.0])?, vec![1.0, 2.0]);
        assert_eq!(solve(&[vec![0.0, 1.0], vec![1.0, 0.0]], &[2.0, 3.0])?, vec![3.0, 2.0]);
        assert!(solve(&[vec![1.0, 1.0], vec![1.0, 1.0]], &[1.0, 2.0]).is_err());
        Ok(())
    }
}
