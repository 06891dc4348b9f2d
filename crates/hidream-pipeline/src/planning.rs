//! What fits on a device and how fast it can run, from the config alone (`hidream plan`).
//!
//! For both ways of running prompt-only work (inside every step, or once per prompt) a
//! [`PlanReport`] holds the residency plan that `hidream-memory`'s planner makes from the
//! pipeline's [`UnitTable`], the smallest budget that works, the estimated activation peak, the
//! device bytes and a lower bound on the time per step:
//! `max(FLOPs / compute rate, streamed bytes / host-to-device bandwidth)`, under
//! [`DeviceAssumptions`]. Nothing is downloaded and no weight is read.
//!
//! The report is typed and `serde::Serialize`; the command line only prints it.
//!
//! - [`size`]: image sizes, always width × height, and diffusers' rescaling of a requested size.
//! - [`summary`]: sets of units as one line of text.

pub mod size;
pub mod summary;

use std::path::Path;

use hidream_config::{
    ActivationPeak, ActivationTerms, DType, ForwardFlops, PreparedState, SizeModel, TransformerConfig, Variant,
    Workload,
};
use hidream_memory::{Budget, MemoryError, Plan, Policy, format_bytes};
use serde::{Serialize, Serializer};

pub use self::size::{ImageSize, VAE_SCALE_FACTOR, pipeline_size};
pub use self::summary::summarise;
use crate::{PipelineError, Precompute, Result, UnitTable};

/// What the device is assumed to sustain; the times of a report are lower bounds under them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DeviceAssumptions {
    /// Host-to-device copy bandwidth, bytes per second.
    pub bandwidth_bytes_per_s: u64,
    /// Sustained compute rate, in TFLOP/s.
    pub tflops: f64,
}

impl DeviceAssumptions {
    /// An H100: PCIe Gen5 from pinned host buffers (about 55 GB/s) and a realistic sustained bf16
    /// rate (700 TFLOP/s; the dense peak is about 990).
    pub const H100_PCIE5: DeviceAssumptions =
        DeviceAssumptions { bandwidth_bytes_per_s: 55_000_000_000, tflops: 700.0 };

    /// Both rates must be positive (and the compute rate finite).
    pub fn validate(&self) -> Result<()> {
        if self.bandwidth_bytes_per_s == 0 {
            return Err(PipelineError::invalid("bandwidth", "must be more than 0 bytes per second"));
        }
        if !(self.tflops.is_finite() && self.tflops > 0.0) {
            return Err(PipelineError::invalid("tflops", format!("must be a positive number, got {}", self.tflops)));
        }
        Ok(())
    }

    fn compute_seconds(&self, flops: u64) -> f64 {
        flops as f64 / (self.tflops * 1e12)
    }

    fn stream_seconds(&self, bytes: u64) -> f64 {
        bytes as f64 / self.bandwidth_bytes_per_s as f64
    }
}

impl Default for DeviceAssumptions {
    fn default() -> Self {
        Self::H100_PCIE5
    }
}

/// Where a plan's transformer config comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigSource<'a> {
    /// A named preset (`full`, `small`, `tiny`).
    Preset(&'a str),
    /// A model folder holding `config.json` or `transformer/config.json`, or the file itself.
    Folder(&'a Path),
}

impl ConfigSource<'_> {
    /// Reads and validates the config, with a description of where it came from.
    pub fn load(self) -> Result<(TransformerConfig, String)> {
        let dir = match self {
            ConfigSource::Preset(name) => return Ok((TransformerConfig::preset(name)?, format!("preset {name}"))),
            ConfigSource::Folder(dir) => dir,
        };
        let candidates = if dir.is_file() {
            vec![dir.to_path_buf()]
        } else {
            vec![dir.join("config.json"), dir.join("transformer").join("config.json")]
        };
        let Some(path) = candidates.iter().find(|path| path.is_file()) else {
            return Err(PipelineError::MissingFile {
                path: dir.to_path_buf(),
                hint: "no transformer config here: expected config.json or transformer/config.json".into(),
            });
        };
        Ok((TransformerConfig::from_json_file(path)?, path.display().to_string()))
    }
}

/// What to plan for.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlanRequest {
    pub size: ImageSize,
    /// Sets the steps and guidance (and so the batch per forward).
    pub variant: Variant,
    /// Device memory for weights; `None` keeps every weight resident (policy `all`).
    pub budget: Option<Budget>,
    /// Streamed units loaded ahead of the one computing.
    pub prefetch: usize,
    /// Compute dtype of weights and activations.
    pub dtype: DType,
    /// Queries per attention chunk; `None` evaluates all queries at once. At least 1.
    pub attention_chunk: Option<usize>,
    pub device: DeviceAssumptions,
}

/// Everything a plan says, for both [`Precompute`] settings.
#[derive(Debug, Serialize)]
pub struct PlanReport {
    pub config: ConfigSummary,
    pub variant: VariantSummary,
    pub size: SizeSummary,
    pub budget: Option<BudgetSummary>,
    pub prefetch: usize,
    pub assumptions: DeviceAssumptions,
    pub attention_chunk: Option<usize>,
    pub flops_per_forward: ForwardFlops,
    pub flops_per_forward_total: u64,
    pub activations: ActivationSummary,
    pub precompute: PrecomputeSummary,
    pub settings: Settings,
    /// The shape of one forward.
    #[serde(skip)]
    pub workload: Workload,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConfigSummary {
    pub source: String,
    pub dtype: DType,
    /// Every weight of the transformer in the compute dtype.
    pub weight_bytes: u64,
    pub params: usize,
    pub inner_dim: usize,
    pub num_attention_heads: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct VariantSummary {
    pub name: Variant,
    pub steps: usize,
    pub guidance_scale: f64,
    /// Samples per forward: 2 with classifier-free guidance (both halves go through one forward).
    pub batch: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct SizeSummary {
    pub width: usize,
    pub height: usize,
    pub latent_width: usize,
    pub latent_height: usize,
    /// Image tokens per sample as the blocks see them (non-square sizes are padded to max_seq).
    pub image_tokens: usize,
    pub padded: bool,
    pub text_tokens: usize,
    pub joint_tokens: usize,
    /// The size diffusers' `HiDreamImagePipeline` would generate instead, if it differs.
    pub diffusers_rescaled: Option<ImageSize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BudgetSummary {
    /// The budget as given: bytes or a share of the weights.
    #[serde(serialize_with = "display")]
    pub given: Budget,
    /// The budget in bytes.
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ActivationSummary {
    /// Always true: the activation figures are an estimate of the cost model, not a measurement.
    pub estimate: bool,
    pub peak_bytes: u64,
    /// The block kind whose activations are largest (`double` or `single`).
    pub block: &'static str,
    pub phase: Phase,
    /// The terms of that block.
    pub terms: ActivationTerms,
    pub double: ActivationTerms,
    pub single: ActivationTerms,
}

/// The part of a block whose activations bind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Attention,
    FeedForward,
}

#[derive(Debug, Clone, Serialize)]
pub struct PrecomputeSummary {
    /// Weight bytes that precomputation takes out of every step.
    pub saved_bytes_per_step: u64,
    pub prepared_state: PreparedState,
    pub prepared_state_bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct Settings {
    /// Caption projections and adaLN modulation in every step, as diffusers does.
    pub per_step: SettingReport,
    /// Both run once per prompt; the steps stream blocks without their modulation weights.
    pub per_prompt: SettingReport,
}

impl Settings {
    /// Both settings, per step first.
    pub fn both(&self) -> [&SettingReport; 2] {
        [&self.per_step, &self.per_prompt]
    }
}

/// The plan, times and device bytes of one [`Precompute`] setting.
#[derive(Debug, Serialize)]
pub struct SettingReport {
    #[serde(skip)]
    pub precompute: Precompute,
    /// Weight bytes one step needs.
    pub step_bytes: u64,
    pub n_units: usize,
    /// The smallest budget that works at the request's prefetch depth.
    pub minimum_budget: u64,
    pub minimum_budget_percent: f64,
    /// The smallest budget at prefetch depth 0 (load, run, free: no overlap).
    pub minimum_budget_without_prefetch: u64,
    /// `None` when the budget is below [`Self::minimum_budget`]; [`Self::error`] says why.
    pub plan: Option<PlanSummary>,
    #[serde(serialize_with = "display_option")]
    pub error: Option<MemoryError>,
    /// FLOPs of one step's forward.
    pub flops_per_step: u64,
    /// Prompt-only work done before the steps: FLOPs, and weight bytes loaded once.
    pub flops_once_per_prompt: u64,
    pub bytes_once_per_prompt: u64,
    pub time: Option<StepTimes>,
    pub device_estimate: Option<DeviceEstimate>,
}

/// The planner's plan, in the report's terms.
#[derive(Debug, Clone, Serialize)]
pub struct PlanSummary {
    pub resident: String,
    pub resident_units: Vec<String>,
    pub resident_bytes: u64,
    pub streamed: String,
    pub streamed_bytes_per_step: u64,
    pub n_slots: usize,
    pub slot_bytes: u64,
    pub peak_weight_bytes: u64,
}

/// The lower bound on time, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepTimes {
    pub compute_s_per_step: f64,
    pub stream_s_per_step: f64,
    pub bound: Bound,
    /// `max(compute, stream)`.
    pub s_per_step: f64,
    pub once_per_prompt_s: f64,
    /// `once + steps × per step`.
    pub total_s: f64,
}

/// What limits a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    Compute,
    Streaming,
}

/// Device bytes of one setting: peak weights, estimated activations and the prepared state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DeviceEstimate {
    /// The text (and, precomputed, the modulation of every step) kept on the device.
    pub state_bytes: u64,
    pub total_bytes: u64,
}

impl PlanReport {
    /// Plans `request` for the transformer `cfg`; `source` says where `cfg` came from.
    ///
    /// A budget that fits neither setting is not an error here: the report says so per setting,
    /// and [`Self::check_fits`] turns it into one.
    pub fn new(cfg: &TransformerConfig, source: &str, request: &PlanRequest) -> Result<Self> {
        cfg.validate()?;
        request.device.validate()?;
        if request.attention_chunk == Some(0) {
            return Err(PipelineError::invalid("attention_chunk", "must be at least 1"));
        }
        let size = request.size;
        let (latent_height, latent_width) = size.latent_height_width(VAE_SCALE_FACTOR, cfg.patch_size)?;
        let image_tokens = hidream_config::image_tokens(cfg, latent_height, latent_width).ok_or_else(|| {
            let what = format!("image size {size} (width x height)");
            if size.is_square() {
                return PipelineError::invalid(what, "is too large");
            }
            PipelineError::invalid(
                what,
                format!(
                    "is not square and has {} patches; non-square images are padded to max_seq = {} patches \
                     (max_resolution {:?}), so they must have at most that many",
                    (latent_height / cfg.patch_size).saturating_mul(latent_width / cfg.patch_size),
                    cfg.max_seq(),
                    cfg.max_resolution,
                ),
            )
        })?;
        let defaults = request.variant.defaults();
        // diffusers' `do_classifier_free_guidance`: both halves go through one forward.
        let batch = if defaults.guidance_scale > 1.0 { 2 } else { 1 };
        let workload = Workload {
            batch,
            image_tokens,
            t5_tokens: hidream_config::MAX_SEQUENCE_LENGTH,
            llama_tokens: hidream_config::MAX_SEQUENCE_LENGTH,
            attention_chunk: request.attention_chunk,
            dtype: request.dtype,
        };
        let flops = workload.flops(cfg);
        let activations = workload.activations(cfg);
        let prepared = workload.prepared_state(cfg, defaults.steps);
        let tables = [Precompute::PerStep, Precompute::PerPrompt].map(|p| UnitTable::new(cfg, request.dtype, p));
        let weight_bytes = tables[0].weight_bytes_total();
        let budget = request.budget.map(|given| BudgetSummary { given, bytes: given.resolve(weight_bytes) });
        let policy = match &budget {
            Some(budget) => Policy::Budget { budget_bytes: budget.bytes, prefetch: request.prefetch },
            None => Policy::All,
        };
        let saved_bytes = tables[0].step_bytes().saturating_sub(tables[1].step_bytes());
        let setting = |table: &UnitTable| {
            let per_prompt = table.precompute().is_per_prompt();
            let step_flops = if per_prompt { flops.without_prompt_work() } else { flops.total() };
            let once_flops = if per_prompt {
                flops.caption_projections.saturating_add(flops.modulation.saturating_mul(defaults.steps as u64))
            } else {
                0
            };
            let once_bytes = if per_prompt { saved_bytes } else { 0 };
            // The room the runner keeps for the precomputation's layers, as the runner plans it.
            let scratch = crate::runner::prepare_scratch_bytes(cfg, request.dtype, table.precompute());
            let minimum_budget = Plan::minimum_budget_with_scratch(table.specs(), request.prefetch, scratch);
            let (plan, error) = match policy.plan_with_scratch(table.specs(), scratch) {
                Ok(plan) => (Some(plan), None),
                Err(err) => (None, Some(err)),
            };
            let time = plan.as_ref().map(|plan| {
                let compute = request.device.compute_seconds(step_flops);
                let stream = request.device.stream_seconds(plan.streamed_bytes_per_pass());
                let once = request.device.compute_seconds(once_flops).max(request.device.stream_seconds(once_bytes));
                let step = compute.max(stream);
                StepTimes {
                    compute_s_per_step: compute,
                    stream_s_per_step: stream,
                    bound: if stream > compute { Bound::Streaming } else { Bound::Compute },
                    s_per_step: step,
                    once_per_prompt_s: once,
                    total_s: once + step * defaults.steps as f64,
                }
            });
            let device_estimate = plan.as_ref().map(|plan| {
                let state_bytes = if per_prompt { prepared.total() } else { prepared.text_tokens };
                let total_bytes =
                    plan.peak_weight_bytes().saturating_add(activations.bytes()).saturating_add(state_bytes);
                DeviceEstimate { state_bytes, total_bytes }
            });
            SettingReport {
                precompute: table.precompute(),
                step_bytes: table.step_bytes(),
                n_units: table.units().len(),
                minimum_budget,
                minimum_budget_percent: percent(minimum_budget, weight_bytes),
                minimum_budget_without_prefetch: Plan::minimum_budget_with_scratch(table.specs(), 0, scratch),
                plan: plan.as_ref().map(|plan| plan_summary(table, plan)),
                error,
                flops_per_step: step_flops,
                flops_once_per_prompt: once_flops,
                bytes_once_per_prompt: once_bytes,
                time,
                device_estimate,
            }
        };
        let [per_step, per_prompt] = &tables;
        let terms = *activations.binding();
        let diffusers_rescaled = pipeline_size(Some((size.width, size.height)), VAE_SCALE_FACTOR, 128)
            .ok()
            .map(|(width, height)| ImageSize::new(width, height))
            .filter(|rescaled| *rescaled != size);
        Ok(PlanReport {
            config: ConfigSummary {
                source: source.to_owned(),
                dtype: request.dtype,
                weight_bytes,
                params: SizeModel::new(cfg).total_params(),
                inner_dim: cfg.inner_dim(),
                num_attention_heads: cfg.num_attention_heads,
            },
            variant: VariantSummary {
                name: request.variant,
                steps: defaults.steps,
                guidance_scale: defaults.guidance_scale,
                batch,
            },
            size: SizeSummary {
                width: size.width,
                height: size.height,
                latent_width,
                latent_height,
                image_tokens,
                padded: !size.is_square(),
                text_tokens: workload.text_tokens(),
                joint_tokens: workload.joint_tokens(),
                diffusers_rescaled,
            },
            budget,
            prefetch: request.prefetch,
            assumptions: request.device,
            attention_chunk: request.attention_chunk,
            flops_per_forward: flops,
            flops_per_forward_total: flops.total(),
            activations: activation_summary(&activations, terms),
            precompute: PrecomputeSummary {
                saved_bytes_per_step: saved_bytes,
                prepared_state: prepared,
                prepared_state_bytes: prepared.total(),
            },
            settings: Settings { per_step: setting(per_step), per_prompt: setting(per_prompt) },
            workload,
        })
    }

    /// An error when the budget fits neither setting, giving the smallest budgets that would.
    pub fn check_fits(&self) -> Result<()> {
        let Settings { per_step, per_prompt } = &self.settings;
        if per_step.plan.is_some() || per_prompt.plan.is_some() {
            return Ok(());
        }
        let budget = self.budget.as_ref().map_or(0, |budget| budget.bytes);
        let mut problem = format!(
            "fits neither setting: at prefetch depth {} the smallest budget that works is {} with per-prompt \
             precomputation and {} without",
            self.prefetch,
            exact(per_prompt.minimum_budget),
            exact(per_step.minimum_budget),
        );
        let sequential = per_prompt.minimum_budget_without_prefetch;
        if self.prefetch > 0 && sequential < per_prompt.minimum_budget {
            problem.push_str(&format!(" (prefetch depth 0, without overlap, needs {})", exact(sequential)));
        }
        Err(PipelineError::invalid(format!("memory budget {}", exact(budget)), problem))
    }
}

fn plan_summary(table: &UnitTable, plan: &Plan) -> PlanSummary {
    PlanSummary {
        resident: summarise(table.units(), plan.resident()),
        resident_units: plan
            .resident()
            .iter()
            .filter_map(|&idx| table.units().get(idx))
            .map(|u| u.to_string())
            .collect(),
        resident_bytes: plan.resident_bytes(),
        streamed: summarise(table.units(), plan.streamed()),
        streamed_bytes_per_step: plan.streamed_bytes_per_pass(),
        n_slots: plan.n_slots(),
        slot_bytes: plan.slot_bytes(),
        peak_weight_bytes: plan.peak_weight_bytes(),
    }
}

fn activation_summary(activations: &ActivationPeak, terms: ActivationTerms) -> ActivationSummary {
    ActivationSummary {
        estimate: true,
        peak_bytes: activations.bytes(),
        block: terms.kind.as_str(),
        phase: if terms.attention_binds() { Phase::Attention } else { Phase::FeedForward },
        terms,
        double: activations.double,
        single: activations.single,
    }
}

/// `part` as a percentage of `whole` (0 for an empty whole).
pub fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { 100.0 * part as f64 / whole as f64 }
}

/// `1.50 GiB (1610612736 bytes)`.
fn exact(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", format_bytes(bytes))
}

fn display<T: std::fmt::Display, S: Serializer>(value: &T, serializer: S) -> std::result::Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

fn display_option<T: std::fmt::Display, S: Serializer>(
    value: &Option<T>,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    match value {
        Some(value) => serializer.collect_str(value),
        None => serializer.serialize_none(),
    }
}
