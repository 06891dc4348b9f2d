//! The two official HiDream-I1 samplers, exact against the official code, and a plain
//! flow-matching Euler loop ([`euler`]).
//!
//! This crate needs candle-core only: it must NOT know hidream-config (variants, transformer
//! configs), weights, tokenizers, the model or memory budgets. It takes plain parameters (a shift,
//! a `max_seq`, a diffusers `scheduler_config.json`); which sampler a HiDream-I1 variant uses is
//! decided in hidream-pipeline (`hidream_pipeline::sampling`).
//!
//! The reference is the official HiDream-I1 code (github.com/HiDream-ai/HiDream-I1, `hi_diffusers/`)
//! as the PyPI package `hdi1` 1.0.4 ships it (github.com/hykilpikonna/HiDream-I1-nf4: the official
//! schedulers and pipeline, plus 4-bit model loading):
//!
//! - [`FlowUniPc`]: `FlowUniPCMultistepScheduler` of `hdi1/schedulers/fm_solvers_unipc.py`, the
//!   Wan team's flow-matching port of diffusers' UniPC (a multistep predictor, UniP, plus a corrector,
//!   UniC, on the predicted `x0`). HiDream-I1-Full samples with it: order 2, `bh2`, 50 steps.
//! - [`FlashEuler`]: `FlashFlowMatchEulerDiscreteScheduler` of `hdi1/schedulers/flash_flow_match.py`,
//!   a stochastic flow-matching Euler: each step predicts `x0` and re-noises it with fresh Gaussian
//!   noise to the next sigma. HiDream-I1-Dev (shift 6, 28 steps) and -Fast (shift 3, 16 steps)
//!   sample with it.
//!
//! [`Scheduler`] drives either the way the official pipeline
//! (`hdi1/pipelines/hidream_image/pipeline_hidream_image.py`, `HiDreamImagePipeline.__call__`) does:
//!
//! - The scheduler is built as `cls(num_train_timesteps=1000, shift=<variant shift>,
//!   use_dynamic_shifting=False)` (`hdi1/nf4.py`, `MODEL_CONFIGS` and `load_models`), every other
//!   argument at its default, whatever the checkpoint's `scheduler_config.json` says
//!   (`hidream_pipeline::sampling::scheduler_config_for_variant`).
//! - The pipeline computes `mu = calculate_shift(transformer.max_seq)` ([`PipelineShift`]) and calls
//!   `set_timesteps(n, shift=exp(mu))` for FlowUniPC: an *extra* shift, exp(1.15) = 3.158 for the
//!   released transformer (max_seq 4096), which replaces the configured 3.0 inside `set_timesteps`
//!   (3.0 still shapes `sigma_max` in `__init__`, so the schedule is shifted twice). For
//!   FlashFlowMatchEuler it calls `set_timesteps(n, mu=mu)`, and `mu` is ignored unless
//!   `use_dynamic_shifting` is set; the configured shift is applied twice too (in `__init__` to
//!   `sigma_max`/`sigma_min`, and again in `set_timesteps`).
//! - The model output handed to `step` is the pipeline's `noise_pred`: the transformer output
//!   *negated* (`noise_pred = -noise_pred`), then guided.
//! - Neither scheduler defines `init_noise_sigma`: the pipeline draws unit Gaussian latents
//!   ([`Scheduler::init_noise_sigma`] is 1).
//!
//! Numerics follow the reference: schedules are computed in f64 where numpy computes them and
//! rounded to f32 where torch holds them; step coefficients are f32 (torch computes them on 0-d
//! float32 tensors); each tensor operation runs in the sample's dtype and applies a float32 scalar
//! the way torch's CPU kernels do: `tensor * s` and `tensor / s` compute in f32 and round once to
//! the tensor's dtype, while `s * tensor`, `tensor + s` and `tensor - s` first cast `s` to the
//! tensor's dtype (this matters for bf16 samples, the official pipeline's dtype). The only
//! deliberate difference: torch's float32 `log`/`expm1` (MKL VML on CPU) and `linalg.solve` (MKL
//! LAPACK) are within an ulp or two of the correctly rounded result, and we use the correctly rounded
//! one (f64 evaluation rounded to f32).

#![forbid(unsafe_code)]

mod error;
pub mod euler;
pub mod flash_euler;
pub mod flow_unipc;

use std::path::Path;

use candle_core::{DType, Tensor};

pub use error::{Result, SchedulerError};
pub use flash_euler::{FlashEuler, FlashEulerConfig};
pub use flow_unipc::{FlowUniPc, FlowUniPcConfig, PredictionType, SolverType};

/// The timesteps and sigmas of one sampling run, as the reference scheduler holds them after
/// `set_timesteps`.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
}

impl Schedule {
    fn new(timesteps: Vec<f32>, sigmas: Vec<f32>) -> Self {
        debug_assert_eq!(sigmas.len(), timesteps.len() + 1);
        Schedule { timesteps, sigmas }
    }

    /// The timestep of each step as the transformer receives it, in `[0, 1000]`. FlowUniPC's
    /// timesteps are int64 in the reference (truncated `sigma * 1000`); these are their f32 values.
    pub fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// `n_steps + 1` sigmas, the last one 0 (the reference's `scheduler.sigmas`, float32).
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    pub fn n_steps(&self) -> usize {
        self.timesteps.len()
    }
}

/// What the official pipeline passes to `set_timesteps` besides the step count:
/// `mu = calculate_shift(transformer.max_seq)` (`pipeline_hidream_image.py`, step 5). FlowUniPC
/// gets `shift = exp(mu)`; FlashFlowMatchEuler gets `mu`, used only with `use_dynamic_shifting`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PipelineShift {
    pub mu: f64,
}

impl PipelineShift {
    /// The max_seq of the released HiDream-I1 transformer: `max_resolution` 128×128, patch size 2.
    pub const RELEASED_MAX_SEQ: usize = 128 * 128 / (2 * 2);

    /// `mu` for a transformer whose `max_seq` (padded image tokens) is `max_seq`.
    pub fn from_max_seq(max_seq: usize) -> Self {
        PipelineShift { mu: calculate_shift(max_seq) }
    }

    /// The shift FlowUniPC's `set_timesteps` receives: `math.exp(mu)`.
    pub fn unipc_shift(self) -> f64 {
        self.mu.exp()
    }
}

impl Default for PipelineShift {
    fn default() -> Self {
        Self::from_max_seq(Self::RELEASED_MAX_SEQ)
    }
}

/// The pipeline's `calculate_shift` (copied from Flux) with its default arguments, in f64 as Python
/// evaluates it: base_seq_len 256, max_seq_len 4096, base_shift 0.5, max_shift 1.15.
pub fn calculate_shift(image_seq_len: usize) -> f64 {
    let (base_seq_len, max_seq_len, base_shift, max_shift) = (256.0, 4096.0, 0.5, 1.15);
    let m = (max_shift - base_shift) / (max_seq_len - base_seq_len);
    let b = base_shift - m * base_seq_len;
    image_seq_len as f64 * m + b
}

/// A scheduler's configuration, as a diffusers `scheduler/scheduler_config.json` names it in
/// `_class_name`.
#[derive(Debug, Clone, PartialEq)]
pub enum SchedulerConfig {
    FlowUniPc(FlowUniPcConfig),
    FlashEuler(FlashEulerConfig),
}

impl SchedulerConfig {
    /// The `_class_name` of FlowUniPC in the official code.
    pub const FLOW_UNIPC_CLASS: &str = "FlowUniPCMultistepScheduler";
    /// The `_class_name` of FlashFlowMatchEuler in the official code.
    pub const FLASH_EULER_CLASS: &str = "FlashFlowMatchEulerDiscreteScheduler";

    /// Parses a diffusers `scheduler_config.json`. Keys the reference does not read (and unknown
    /// ones) are ignored; a missing key takes the reference's default.
    pub fn from_json(json: &str) -> Result<Self> {
        Self::parse(json, "scheduler config")
    }

    /// Reads and parses a `scheduler_config.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let json =
            std::fs::read_to_string(path).map_err(|source| SchedulerError::Io { path: path.to_path_buf(), source })?;
        Self::parse(&json, &path.display().to_string())
    }

    fn parse(json: &str, what: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(json).map_err(|err| SchedulerError::invalid(what, err.to_string()))?;
        let class = value.get("_class_name").and_then(serde_json::Value::as_str).unwrap_or("");
        let config = match class {
            Self::FLOW_UNIPC_CLASS => SchedulerConfig::FlowUniPc(
                serde_json::from_value(value).map_err(|err| SchedulerError::invalid(what, err.to_string()))?,
            ),
            Self::FLASH_EULER_CLASS => SchedulerConfig::FlashEuler(
                serde_json::from_value(value).map_err(|err| SchedulerError::invalid(what, err.to_string()))?,
            ),
            "" => return Err(SchedulerError::invalid(what, "no \"_class_name\"")),
            other => {
                return Err(SchedulerError::invalid(
                    what,
                    format!(
                        "_class_name {other:?} is not an official HiDream sampler (expected {} or {}); \
                         diffusers' own schedulers (UniPCMultistepScheduler, FlowMatchLCMScheduler, ...) \
                         compute other schedules: use the variant's scheduler instead",
                        Self::FLOW_UNIPC_CLASS,
                        Self::FLASH_EULER_CLASS
                    ),
                ));
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// Rejects what the reference rejects, breaks on, or what is not implemented here.
    pub fn validate(&self) -> Result<()> {
        match self {
            SchedulerConfig::FlowUniPc(config) => config.validate(),
            SchedulerConfig::FlashEuler(config) => config.validate(),
        }
    }
}

/// Either official sampler, driven as the official pipeline drives it.
#[derive(Debug, Clone)]
pub struct Scheduler {
    inner: Inner,
    shift: PipelineShift,
}

#[derive(Debug, Clone)]
enum Inner {
    FlowUniPc(FlowUniPc),
    FlashEuler(FlashEuler),
}

impl Scheduler {
    /// Builds the scheduler for a config; `shift` is what the pipeline passes to `set_timesteps`.
    pub fn new(config: SchedulerConfig, shift: PipelineShift) -> Result<Self> {
        let inner = match config {
            SchedulerConfig::FlowUniPc(config) => Inner::FlowUniPc(FlowUniPc::new(config)?),
            SchedulerConfig::FlashEuler(config) => Inner::FlashEuler(FlashEuler::new(config)?),
        };
        Ok(Scheduler { inner, shift })
    }

    /// Reads a diffusers `scheduler/scheduler_config.json` ([`SchedulerConfig::from_file`]).
    pub fn from_config_file(path: &Path, shift: PipelineShift) -> Result<Self> {
        Self::new(SchedulerConfig::from_file(path)?, shift)
    }

    pub fn pipeline_shift(&self) -> PipelineShift {
        self.shift
    }

    /// The reference's `init_noise_sigma`: neither scheduler defines one, and the pipeline starts
    /// from unit Gaussian latents.
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Computes the schedule of `n_steps` steps and resets the scheduler's state, as the pipeline's
    /// `set_timesteps` call does.
    pub fn set_timesteps(&mut self, n_steps: usize) -> Result<&Schedule> {
        match &mut self.inner {
            Inner::FlowUniPc(scheduler) => scheduler.set_timesteps(n_steps, self.shift.unipc_shift()),
            Inner::FlashEuler(scheduler) => scheduler.set_timesteps(n_steps, self.shift.mu),
        }
    }

    /// The schedule of the last [`Scheduler::set_timesteps`], if any.
    pub fn schedule(&self) -> Option<&Schedule> {
        match &self.inner {
            Inner::FlowUniPc(scheduler) => scheduler.schedule(),
            Inner::FlashEuler(scheduler) => scheduler.schedule(),
        }
    }

    /// One step: the sample at step `step_idx + 1` from the model output at step `step_idx`.
    /// Steps must come in order, from 0. `noise` is the standard normal noise FlashFlowMatchEuler
    /// re-noises with (required where [`Scheduler::needs_noise`]; ignored elsewhere and by FlowUniPC).
    pub fn step(
        &mut self,
        model_output: &Tensor,
        step_idx: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        match &mut self.inner {
            Inner::FlowUniPc(scheduler) => scheduler.step(model_output, step_idx, sample),
            Inner::FlashEuler(scheduler) => scheduler.step(model_output, step_idx, sample, noise),
        }
    }

    /// Whether step `step_idx` draws noise: FlashFlowMatchEuler's every step but the last.
    pub fn needs_noise(&self, step_idx: usize) -> bool {
        match &self.inner {
            Inner::FlowUniPc(_) => false,
            Inner::FlashEuler(scheduler) => scheduler.needs_noise(step_idx),
        }
    }

    /// Whether step `step_idx`'s result depends on the model output. FlashFlowMatchEuler's last step
    /// returns its input sample unchanged, so the pipeline's last transformer call there is wasted;
    /// a caller may skip it and pass any tensor of the model output's dtype and shape.
    pub fn uses_model_output(&self, step_idx: usize) -> bool {
        match &self.inner {
            Inner::FlowUniPc(_) => true,
            Inner::FlashEuler(scheduler) => !scheduler.is_last_step(step_idx),
        }
    }

    pub fn as_flow_unipc(&self) -> Option<&FlowUniPc> {
        match &self.inner {
            Inner::FlowUniPc(scheduler) => Some(scheduler),
            Inner::FlashEuler(_) => None,
        }
    }

    pub fn as_flash_euler(&self) -> Option<&FlashEuler> {
        match &self.inner {
            Inner::FlowUniPc(_) => None,
            Inner::FlashEuler(scheduler) => Some(scheduler),
        }
    }
}

/// numpy's `linspace(start, stop, num)` (endpoint included), operation for operation.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    let delta = stop - start;
    let div = num - 1;
    let mut values: Vec<f64> = if div == 0 {
        vec![0.0 * delta]
    } else {
        let step = delta / div as f64;
        if step == 0.0 {
            (0..num).map(|idx| idx as f64 / div as f64 * delta).collect()
        } else {
            (0..num).map(|idx| idx as f64 * step).collect()
        }
    };
    for value in &mut values {
        *value += start;
    }
    if num > 1 {
        values[num - 1] = stop;
    }
    values
}

/// The static timestep shift `shift * sigma / (1 + (shift - 1) * sigma)` on a float32 torch tensor
/// and a Python float `shift`: every operation in f32, `shift` and `shift - 1` rounded to f32.
fn shift_f32(sigma: f32, shift: f64) -> f32 {
    (shift as f32 * sigma) / (1.0 + (shift - 1.0) as f32 * sigma)
}

/// The same shift on a numpy float64 array.
fn shift_f64(sigma: f64, shift: f64) -> f64 {
    shift * sigma / (1.0 + (shift - 1.0) * sigma)
}

/// Rejects tensors the schedulers cannot step.
fn check_float(what: &str, tensor: &Tensor) -> Result<()> {
    match tensor.dtype() {
        DType::F16 | DType::BF16 | DType::F32 | DType::F64 => Ok(()),
        other => Err(SchedulerError::invalid(what, format!("dtype {other:?} is not a float dtype"))),
    }
}

fn check_same_shape(what: &str, tensor: &Tensor, expected: &Tensor) -> Result<()> {
    if tensor.dims() == expected.dims() {
        Ok(())
    } else {
        Err(SchedulerError::invalid(what, format!("shape {:?}, expected {:?}", tensor.dims(), expected.dims())))
    }
}

/// `tensor <op> scalar` with a float32 0-d tensor (or Python float) as the *second* operand of a
/// `mul` or `div`: torch's CPU kernels keep the scalar in f32 and compute reduced-precision tensors
/// in f32 (f64 tensors in f64), rounding once to the tensor's dtype.
fn opmath_scalar_op(
    tensor: &Tensor,
    scalar: f32,
    op: fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let dtype = tensor.dtype();
    let compute = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
    let scalar = Tensor::new(scalar, tensor.device())?.to_dtype(compute)?;
    op(&tensor.to_dtype(compute)?, &scalar)?.to_dtype(dtype)
}

/// `tensor <op> scalar` where torch casts the 0-d scalar to the tensor's dtype first: a `mul` with
/// the scalar as the *first* operand, and any `add`/`sub`. bf16 and f16 round the scalar.
fn cast_scalar_op(
    tensor: &Tensor,
    scalar: f32,
    op: fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    op(tensor, &Tensor::new(scalar, tensor.device())?.to_dtype(tensor.dtype())?)
}

/// `tensor * scalar`.
fn mul_scalar(tensor: &Tensor, scalar: f32) -> candle_core::Result<Tensor> {
    opmath_scalar_op(tensor, scalar, Tensor::broadcast_mul)
}

/// `scalar * tensor` (the scalar is cast to the tensor's dtype).
fn scalar_mul(scalar: f32, tensor: &Tensor) -> candle_core::Result<Tensor> {
    cast_scalar_op(tensor, scalar, Tensor::broadcast_mul)
}

/// `tensor / scalar`.
fn div_scalar(tensor: &Tensor, scalar: f32) -> candle_core::Result<Tensor> {
    opmath_scalar_op(tensor, scalar, Tensor::broadcast_div)
}

/// `tensor + scalar` (the scalar is cast to the tensor's dtype).
fn add_scalar(tensor: &Tensor, scalar: f32) -> candle_core::Result<Tensor> {
    cast_scalar_op(tensor, scalar, Tensor::broadcast_add)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_matches_numpy_endpoints_and_steps() {
        assert_eq!(linspace(1.0, 0.0, 0), Vec::<f64>::new());
        assert_eq!(linspace(0.7, 0.0, 1), vec![0.7]);
        assert_eq!(linspace(1.0, 0.0, 5), vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        assert_eq!(linspace(0.3, 0.3, 3), vec![0.3, 0.3, 0.3]);
        // numpy.linspace(0.9996663928031921, 0.0, 51)[1] == 0.9796730649471282
        assert_eq!(linspace(0.9996663928031921, 0.0, 51)[1], 0.9796730649471282);
    }

    #[test]
    fn calculate_shift_of_the_released_transformer_is_max_shift() {
        assert_eq!(PipelineShift::RELEASED_MAX_SEQ, 4096);
        // Python: calculate_shift(4096) == 1.15 and math.exp(1.15) == 3.158192909689767.
        assert_eq!(calculate_shift(4096), 1.15);
        assert_eq!(PipelineShift::default().unipc_shift(), 3.158192909689767);
        assert_eq!(calculate_shift(256), 0.5);
    }

    /// Asserts that `json` is rejected with an `Invalid` error whose message contains `needle`.
    fn check_rejected(json: &str, needle: &str) {
        match SchedulerConfig::from_json(json) {
            Err(SchedulerError::Invalid { problem, .. }) => {
                assert!(problem.contains(needle), "{json}: {problem:?} lacks {needle:?}")
            }
            other => panic!("{json}: expected an Invalid error, got {other:?}"),
        }
    }

    #[test]
    fn invalid_configs_are_typed_errors() {
        check_rejected("{", "EOF");
        check_rejected("{}", "_class_name");
        check_rejected(r#"{"_class_name": "UniPCMultistepScheduler"}"#, "not an official HiDream sampler");
        check_rejected(r#"{"_class_name": "FlowMatchLCMScheduler"}"#, "not an official HiDream sampler");
        let unipc = r#"{"_class_name": "FlowUniPCMultistepScheduler", "#;
        check_rejected(&format!(r#"{unipc} "solver_type": "dpm"}}"#), "unknown variant");
        check_rejected(&format!(r#"{unipc} "prediction_type": "epsilon"}}"#), "unknown variant");
        check_rejected(&format!(r#"{unipc} "final_sigmas_type": "sigma_min"}}"#), "unknown variant");
        check_rejected(&format!(r#"{unipc} "shift": null}}"#), "invalid type");
        check_rejected(&format!(r#"{unipc} "shift": -1.0}}"#), "shift");
        check_rejected(&format!(r#"{unipc} "solver_order": 0}}"#), "solver_order");
        check_rejected(&format!(r#"{unipc} "num_train_timesteps": 1}}"#), "num_train_timesteps");
        check_rejected(&format!(r#"{unipc} "thresholding": true}}"#), "thresholding");
        check_rejected(&format!(r#"{unipc} "use_dynamic_shifting": true}}"#), "mu");
        check_rejected(&format!(r#"{unipc} "solver_p": {{"a": 1}}}}"#), "solver_p");
        let flash = r#"{"_class_name": "FlashFlowMatchEulerDiscreteScheduler", "#;
        check_rejected(&format!(r#"{flash} "shift": "six"}}"#), "invalid type");
        check_rejected(&format!(r#"{flash} "use_karras_sigmas": true}}"#), "use_karras_sigmas");
        check_rejected(&format!(r#"{flash} "invert_sigmas": true}}"#), "invert_sigmas");
        check_rejected(&format!(r#"{flash} "shift": 0.0}}"#), "shift");
    }

    #[test]
    fn configs_parse_with_defaults_and_ignore_unknown_keys() -> Result<()> {
        let json = r#"{"_class_name": "FlowUniPCMultistepScheduler", "_diffusers_version": "0.32.1",
            "shift": 3.0, "solver_type": "midpoint", "timestep_spacing": "linspace", "made_up": [1, 2]}"#;
        let SchedulerConfig::FlowUniPc(config) = SchedulerConfig::from_json(json)? else {
            panic!("expected FlowUniPC");
        };
        // `midpoint`, `heun` and `logrho` are registered as bh2, as the reference's `__init__` does.
        assert_eq!(config, FlowUniPcConfig { shift: 3.0, ..FlowUniPcConfig::default() });
        let json = r#"{"_class_name": "FlashFlowMatchEulerDiscreteScheduler", "shift": 6.0, "base_shift": 0.5}"#;
        let dev = SchedulerConfig::FlashEuler(FlashEulerConfig { shift: 6.0, ..FlashEulerConfig::default() });
        assert_eq!(SchedulerConfig::from_json(json)?, dev);
        Ok(())
    }

    proptest::proptest! {
        /// Any valid schedule runs from sigma 1 down to 0, never rising, with timesteps in [0, 1000]
        /// that track the sigmas; `set_timesteps` is repeatable. The f32 shift in `__init__` can put
        /// FlashFlowMatchEuler's first sigma a few ulps above 1 (the reference does too: shift
        /// 1.33912856603577 gives 1.0000001 and timestep 1000.0001).
        #[test]
        fn schedules_are_monotone(n_steps in 1usize..300, shift in 0.5f64..12.0, flash: bool, mu in 0.3f64..1.5) {
            let config = if flash {
                SchedulerConfig::FlashEuler(FlashEulerConfig { shift, ..FlashEulerConfig::default() })
            } else {
                SchedulerConfig::FlowUniPc(FlowUniPcConfig { shift, ..FlowUniPcConfig::default() })
            };
            let mut scheduler = Scheduler::new(config, PipelineShift { mu })?;
            let Ok(schedule) = scheduler.set_timesteps(n_steps).cloned() else {
                // Only schedules whose first timestep repeats are refused.
                proptest::prop_assert!(!flash && n_steps > 100);
                return Ok(());
            };
            let (timesteps, sigmas) = (schedule.timesteps(), schedule.sigmas());
            proptest::prop_assert_eq!(timesteps.len(), n_steps);
            proptest::prop_assert_eq!(sigmas.len(), n_steps + 1);
            proptest::prop_assert_eq!(sigmas[n_steps], 0.0);
            proptest::prop_assert!(sigmas[0] <= 1.000_001, "{}", sigmas[0]);
            proptest::prop_assert!(sigmas.windows(2).all(|pair| pair[0] >= pair[1]));
            for (timestep, sigma) in timesteps.iter().zip(sigmas) {
                proptest::prop_assert!((0.0..=1000.001).contains(timestep));
                let drift = sigma * 1000.0 - timestep;
                // FlowUniPC truncates the f64 `sigma * 1000`; the f32 sigma is a rounding away.
                proptest::prop_assert!(if flash { drift == 0.0 } else { (-1e-3..=1.001).contains(&drift) }, "{drift}");
            }
            proptest::prop_assert_eq!(scheduler.set_timesteps(n_steps)?, &schedule);
        }
    }

    #[test]
    fn missing_config_file_is_an_io_error() {
        let err =
            Scheduler::from_config_file(Path::new("/nonexistent/scheduler_config.json"), PipelineShift::default());
        assert!(matches!(err, Err(SchedulerError::Io { .. })), "{err:?}");
    }
}
