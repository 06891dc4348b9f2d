//! The transformer under a memory policy.
//!
//! [`TransformerRunner`] plans which units stay resident (hidream-memory's planner over the
//! [`UnitTable`]), loads those once, and streams the rest through the prefetching scheduler, which
//! loads the next units in the background while the current one computes. The order is cyclic, so
//! the next step's first blocks load while this step's last blocks run.
//!
//! Two ways to run a step:
//! - [`TransformerRunner::forward`]: diffusers' forward, caption projections and modulation
//!   included ([`Precompute::PerStep`]).
//! - [`TransformerRunner::prepare`] once per prompt and schedule, then
//!   [`TransformerRunner::forward_prepared`] per step ([`Precompute::PerPrompt`]): the caption
//!   projections and every block's modulation for every step are computed up front, one layer at a
//!   time, and the steps stream blocks without their modulation weights. Same inputs, same
//!   operations, so the output is bit-identical to the per-step path.
//!
//! Every policy gives bit-identical outputs: the same tensors are loaded and converted the same way
//! whether they stay resident or stream.

mod loader;
mod provider;

use std::sync::Arc;

use candle_core::{Device, Tensor};
use hidream_config::{SizeModel, TransformerConfig};
use hidream_device::DeviceTier;
use hidream_memory::{BudgetLedger, Plan, Policy, PrefetchStats, Residency, ScheduleError, UnitSpec};
use hidream_model::{
    AttentionConfig, HiDreamTransformer, Modulation, StepInputs, StepModulation, TextTokens, TransformerInputs,
    caption_input,
};
use hidream_weights::Checkpoint;

pub use loader::{CheckpointLoader, LoadedUnit, Part, part_spec, prepare_parts};
use provider::PassUnits;

use crate::units::{Precompute, UnitTable};
use crate::{PipelineError, Result};

/// How to run the transformer.
#[derive(Debug, Clone, Copy)]
pub struct RunnerConfig {
    pub policy: Policy,
    /// The dtype weights are converted to and computed in.
    pub compute_dtype: hidream_config::DType,
    pub precompute: Precompute,
    pub attention: AttentionConfig,
}

/// Everything a prompt and a schedule determine before the steps run.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The projected text tokens.
    pub text: TextTokens,
    /// `[B, text_emb_dim]`.
    pub pooled_embeds: Tensor,
    /// `[B]` timesteps of each step.
    pub timesteps: Vec<Tensor>,
    /// Every block's modulation for each step.
    pub modulation: Vec<StepModulation>,
}

impl Prepared {
    /// Bytes held by the projected text and the modulation vectors.
    pub fn bytes(&self) -> u64 {
        self.text.bytes() + self.modulation.iter().map(StepModulation::bytes).sum::<u64>()
    }
}

/// The transformer, its resident units, and the stream of the others: one residency runtime for
/// the steps, and one per prompt for the precomputation.
pub struct TransformerRunner {
    cfg: TransformerConfig,
    config: RunnerConfig,
    checkpoint: Checkpoint,
    /// How units reach the device; shared by the steps' loader and the precomputation's.
    tier: DeviceTier,
    table: UnitTable,
    steps: Residency<CheckpointLoader>,
    transformer: HiDreamTransformer,
    /// The plan of the last precomputation, and the loading figures of every one so far.
    prepare_plan: Option<Plan>,
    prepare_stats: PrefetchStats,
}

impl TransformerRunner {
    /// Opens the plan for `checkpoint` under `config` and loads the resident units.
    ///
    /// With the per-prompt precomputation, the plan keeps room for its largest layer beside the
    /// resident units (the steps' slots are free while it runs), so that a budget the plan accepts
    /// also holds the precomputation.
    pub fn new(checkpoint: Checkpoint, device: &Device, config: RunnerConfig) -> Result<Self> {
        let cfg = checkpoint.config()?;
        checkpoint.validate(&SizeModel::new(&cfg))?;
        let table = UnitTable::new(&cfg, config.compute_dtype, config.precompute);
        let dtype = candle_dtype(config.compute_dtype);
        let plan = plan_transformer(&cfg, &config)?;
        let ledger = Arc::new(BudgetLedger::new(config.policy.budget_bytes()));
        let tier = DeviceTier::for_device(device)?;
        let loader = CheckpointLoader::for_steps(checkpoint.clone(), cfg.clone(), &table, dtype, tier.clone())?;
        let steps = Residency::new(Arc::new(loader), table.specs(), plan, ledger).map_err(ScheduleError::into_error)?;
        let embedders = table
            .index_of(hidream_config::Unit::Embedders)
            .and_then(|unit_idx| match steps.resident(unit_idx) {
                Some(LoadedUnit::Embedders(embedders)) => Some(embedders.clone()),
                _ => None,
            })
            .ok_or_else(|| PipelineError::invalid("plan", "the embedders are not resident"))?;
        let mut transformer = HiDreamTransformer::from_embedders(&cfg, embedders);
        transformer.set_attention(config.attention);
        Ok(Self {
            cfg,
            config,
            checkpoint,
            tier,
            table,
            steps,
            transformer,
            prepare_plan: None,
            prepare_stats: PrefetchStats::default(),
        })
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    pub fn runner_config(&self) -> &RunnerConfig {
        &self.config
    }

    /// The residency plan of the steps.
    /// The compute device.
    pub fn device(&self) -> Device {
        self.tier.device()
    }

    pub fn plan(&self) -> &Plan {
        self.steps.plan()
    }

    /// The plan of the last per-prompt precomputation, if one ran.
    pub fn prepare_plan(&self) -> Option<&Plan> {
        self.prepare_plan.as_ref()
    }

    /// The units of one step and their bytes.
    pub fn table(&self) -> &UnitTable {
        &self.table
    }

    /// The budget ledger: current and peak weight bytes reserved on the device tier, over the
    /// steps and the precomputation. These are planned bytes; the heap is measured elsewhere.
    pub fn ledger(&self) -> &BudgetLedger {
        self.steps.ledger()
    }

    /// Loading statistics of the steps over the runner's life.
    pub fn stats(&self) -> PrefetchStats {
        self.steps.stats()
    }

    /// Loading statistics of every per-prompt precomputation so far.
    pub fn prepare_stats(&self) -> PrefetchStats {
        self.prepare_stats
    }

    /// The smallest budget under which this runner's plan works, at its prefetch depth, with the
    /// room the precomputation needs: one byte less is refused.
    pub fn minimum_budget(&self) -> u64 {
        let plan = self.steps.plan();
        let depth = plan.requested_prefetch_depth().unwrap_or(plan.prefetch_depth());
        minimum_budget(&self.cfg, self.config.compute_dtype, self.config.precompute, depth)
    }

    /// Says that `n_steps` forwards will run from now: the stream loads the next step's first
    /// blocks while a step ends, and nothing after the last step.
    pub fn expect_steps(&mut self, n_steps: usize) {
        self.steps.expect_passes(n_steps as u64);
    }

    /// One forward with the caption projections and modulation inside, as diffusers runs it.
    /// Needs a runner built with [`Precompute::PerStep`].
    pub fn forward(&mut self, inputs: &TransformerInputs) -> Result<Tensor> {
        if self.config.precompute != Precompute::PerStep {
            return Err(PipelineError::invalid(
                "forward",
                "this runner streams blocks without modulation weights; use prepare + forward_prepared",
            ));
        }
        inputs.validate(&self.cfg)?;
        let dtype = self.transformer.dtype();
        let mut pass = self.steps.pass().map_err(ScheduleError::into_error)?;
        let mut units = PassUnits::new(&mut pass, &self.table);
        let mut projected = Vec::with_capacity(self.cfg.n_blocks() + 1);
        for idx in 0..=self.cfg.n_blocks() {
            let input =
                caption_input(&self.cfg, idx, &inputs.encoder_hidden_states_t5, &inputs.encoder_hidden_states_llama3)?;
            let projection = units.caption(idx)?;
            projected.push(projection.forward(&input, dtype)?);
        }
        let text = TextTokens::from_projections(projected)?;
        let result = self.transformer.forward(&StepInputs::per_step(inputs, &text), &mut units);
        finish(result, units.error)
    }

    /// Computes once what the prompt and the schedule determine: the caption projections and
    /// every block's modulation for each step's `timesteps` (`[B]` each).
    ///
    /// The steps' slots are freed first, and the layers stream once through a runtime of their
    /// own, in the room the plan kept for them, loading ahead as deep as that room allows.
    pub fn prepare(
        &mut self,
        encoder_hidden_states_t5: &Tensor,
        encoder_hidden_states_llama3: &Tensor,
        pooled_embeds: &Tensor,
        timesteps: &[Tensor],
    ) -> Result<Prepared> {
        self.steps.release_slots();
        let cfg = self.cfg.clone();
        let dtype = self.transformer.dtype();
        let loader = CheckpointLoader::for_prepare(self.checkpoint.clone(), cfg.clone(), dtype, self.tier.clone())?;
        let specs = prepare_specs(&cfg, self.config.compute_dtype);
        let ledger = Arc::clone(self.steps.ledger());
        let room = ledger.budget_bytes().map(|budget| budget.saturating_sub(ledger.current_bytes()));
        // Loading ahead takes a second layer's room; `all` keeps its peak at the resident units
        // plus one layer, as `sequential` does.
        let depth = match self.config.policy {
            Policy::All | Policy::Sequential => 0,
            Policy::Stream { prefetch } | Policy::Budget { prefetch, .. } => prefetch,
        };
        let plan = Plan::single_pass(&specs, room, depth)?;
        self.prepare_plan = Some(plan.clone());
        let mut layers = Residency::new(Arc::new(loader), &specs, plan, ledger).map_err(ScheduleError::into_error)?;
        let inputs = PrepareInputs {
            t5: encoder_hidden_states_t5,
            llama3: encoder_hidden_states_llama3,
            pooled_embeds,
            timesteps,
        };
        let result = prepare_pass(&mut layers, &cfg, &self.transformer, inputs);
        self.prepare_stats.add(&layers.stats());
        result
    }

    /// Step `step_idx` of a prepared schedule on `hidden_states` (`[B, C, H, W]`).
    pub fn forward_prepared(&mut self, prepared: &Prepared, step_idx: usize, hidden_states: &Tensor) -> Result<Tensor> {
        let (Some(timesteps), Some(modulation)) = (prepared.timesteps.get(step_idx), prepared.modulation.get(step_idx))
        else {
            return Err(PipelineError::invalid(
                format!("step {step_idx}"),
                format!("the schedule was prepared for {} steps", prepared.timesteps.len()),
            ));
        };
        let mut pass = self.steps.pass().map_err(ScheduleError::into_error)?;
        let mut units = PassUnits::new(&mut pass, &self.table);
        let step = StepInputs {
            hidden_states,
            timesteps,
            pooled_embeds: &prepared.pooled_embeds,
            text: &prepared.text,
            modulation: Modulation::Precomputed(modulation),
        };
        let result = self.transformer.forward(&step, &mut units);
        finish(result, units.error)
    }
}

/// What the precomputation reads.
struct PrepareInputs<'a> {
    t5: &'a Tensor,
    llama3: &'a Tensor,
    pooled_embeds: &'a Tensor,
    timesteps: &'a [Tensor],
}

/// The plan [`TransformerRunner::new`] makes for `cfg` under `config`, from the config alone: what a
/// pipeline checks before it loads anything, so that a budget too small for the transformer is
/// refused before the text encoders run.
pub fn plan_transformer(cfg: &TransformerConfig, config: &RunnerConfig) -> Result<Plan> {
    let table = UnitTable::new(cfg, config.compute_dtype, config.precompute);
    let scratch_bytes = prepare_scratch_bytes(cfg, config.compute_dtype, config.precompute);
    Ok(config.policy.plan_with_scratch(table.specs(), scratch_bytes)?)
}

/// The room the plan keeps for the per-prompt precomputation: its largest layer, which it must be
/// able to load beside the resident units; 0 without the precomputation.
pub fn prepare_scratch_bytes(cfg: &TransformerConfig, dtype: hidream_config::DType, precompute: Precompute) -> u64 {
    match precompute {
        Precompute::PerPrompt => prepare_specs(cfg, dtype).iter().map(|spec| spec.bytes).max().unwrap_or(0),
        Precompute::PerStep => 0,
    }
}

/// The smallest budget under which a runner of `cfg` works at `prefetch`, counting the room the
/// precomputation needs: one byte less is refused with [`hidream_memory::MemoryError::BudgetTooSmall`].
pub fn minimum_budget(
    cfg: &TransformerConfig,
    dtype: hidream_config::DType,
    precompute: Precompute,
    prefetch: usize,
) -> u64 {
    let table = UnitTable::new(cfg, dtype, precompute);
    Plan::minimum_budget_with_scratch(table.specs(), prefetch, prepare_scratch_bytes(cfg, dtype, precompute))
}

/// The precomputation's layers, as [`CheckpointLoader::for_prepare`] loads them, with their bytes.
fn prepare_specs(cfg: &TransformerConfig, dtype: hidream_config::DType) -> Vec<UnitSpec> {
    let sizes = SizeModel::new(cfg);
    prepare_parts(cfg).into_iter().map(|part| part_spec(&sizes, part, dtype)).collect()
}

/// One pass over the precomputation's layers: caption projections, then modulation.
fn prepare_pass(
    layers: &mut Residency<CheckpointLoader>,
    cfg: &TransformerConfig,
    transformer: &HiDreamTransformer,
    inputs: PrepareInputs<'_>,
) -> Result<Prepared> {
    let dtype = transformer.dtype();
    layers.expect_passes(1);
    let mut pass = layers.pass().map_err(ScheduleError::into_error)?;
    let n_captions = cfg.n_blocks() + 1;
    let mut projected = Vec::with_capacity(n_captions);
    for idx in 0..n_captions {
        let input = caption_input(cfg, idx, inputs.t5, inputs.llama3)?;
        let unit = pass.unit(idx).map_err(ScheduleError::into_error)?;
        let LoadedUnit::Caption(projection) = &*unit else {
            return Err(PipelineError::invalid(format!("caption projection {idx}"), "loaded as another kind"));
        };
        projected.push(projection.forward(&input, dtype)?);
    }
    let text = TextTokens::from_projections(projected)?;
    let tembs = inputs
        .timesteps
        .iter()
        .map(|t| transformer.temb(t, inputs.pooled_embeds))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut modulation: Vec<StepModulation> =
        tembs.iter().map(|_| StepModulation { double: Vec::new(), single: Vec::new() }).collect();
    for block_idx in 0..cfg.n_blocks() {
        let unit = pass.unit(n_captions + block_idx).map_err(ScheduleError::into_error)?;
        let LoadedUnit::Modulation(layer) = &*unit else {
            return Err(PipelineError::invalid(format!("block {block_idx}'s modulation"), "loaded as another kind"));
        };
        for (step, temb) in modulation.iter_mut().zip(&tembs) {
            let vectors = layer.forward(temb)?;
            if block_idx < cfg.num_layers {
                step.double.push(vectors);
            } else {
                step.single.push(vectors);
            }
        }
    }
    Ok(Prepared { text, pooled_embeds: inputs.pooled_embeds.clone(), timesteps: inputs.timesteps.to_vec(), modulation })
}

impl std::fmt::Debug for TransformerRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransformerRunner")
            .field("config", &self.config)
            .field("plan", self.steps.plan())
            .finish_non_exhaustive()
    }
}

/// The model's error, unless a streaming error caused it: then that one, with its type.
fn finish(result: hidream_model::Result<Tensor>, streaming_error: Option<PipelineError>) -> Result<Tensor> {
    match (result, streaming_error) {
        (Ok(tensor), _) => Ok(tensor),
        (Err(_), Some(err)) => Err(err),
        (Err(err), None) => Err(err.into()),
    }
}

/// The candle dtype of a config dtype.
pub fn candle_dtype(dtype: hidream_config::DType) -> candle_core::DType {
    match dtype {
        hidream_config::DType::F32 => candle_core::DType::F32,
        hidream_config::DType::F16 => candle_core::DType::F16,
        hidream_config::DType::BF16 => candle_core::DType::BF16,
    }
}
