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
use hidream_config::{SizeModel, TransformerConfig, Unit};
use hidream_memory::{DevicePool, Plan, Policy, PrefetchStats, Prefetcher, Reservation, UnitLoader};
use hidream_model::{
    AttentionConfig, HiDreamTransformer, Modulation, StepInputs, StepModulation, TextTokens, TransformerInputs,
    caption_input,
};
use hidream_weights::Checkpoint;

pub use loader::{CheckpointLoader, LoadedUnit};
use provider::StreamingUnits;

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

/// The transformer, its resident units, and the scheduler for the streamed ones.
pub struct TransformerRunner {
    cfg: TransformerConfig,
    config: RunnerConfig,
    plan: Plan,
    pool: Arc<DevicePool>,
    loader: Arc<CheckpointLoader>,
    transformer: HiDreamTransformer,
    /// The resident units by table index (`None` for streamed units and the embedders, which live
    /// in `transformer`), each with its pool reservation.
    resident: Vec<Option<LoadedUnit>>,
    _reservations: Vec<Reservation>,
    prefetcher: Option<Prefetcher<CheckpointLoader>>,
    /// Statistics of prefetchers already dropped (one per `prepare`).
    past_stats: PrefetchStats,
}

impl TransformerRunner {
    /// Opens the plan for `checkpoint` under `config` and loads the resident units.
    pub fn new(checkpoint: Checkpoint, device: &Device, config: RunnerConfig) -> Result<Self> {
        let cfg = checkpoint.config()?;
        checkpoint.validate(&SizeModel::new(&cfg))?;
        let table = UnitTable::new(&cfg, config.compute_dtype, config.precompute);
        let plan = config.policy.plan(table.specs())?;
        let budget = match config.policy {
            Policy::Budget { budget_bytes, .. } => Some(budget_bytes),
            _ => None,
        };
        let pool = Arc::new(DevicePool::new(budget));
        let dtype = candle_dtype(config.compute_dtype);
        let loader = Arc::new(CheckpointLoader::new(checkpoint, cfg.clone(), table, dtype, device.clone()));

        let table = loader.table();
        let mut resident: Vec<Option<LoadedUnit>> = (0..table.units().len()).map(|_| None).collect();
        let mut reservations = Vec::with_capacity(plan.resident().len());
        let mut embedders = None;
        for &unit_idx in plan.resident() {
            let unit = table.units()[unit_idx];
            reservations.push(pool.try_reserve(table.specs()[unit_idx].bytes, &unit.to_string())?);
            match loader.load(unit_idx)? {
                LoadedUnit::Embedders(loaded) => embedders = Some(loaded),
                other => resident[unit_idx] = Some(other),
            }
        }
        let embedders = embedders.ok_or_else(|| PipelineError::invalid("plan", "the embedders are not resident"))?;
        let mut transformer = HiDreamTransformer::from_embedders(&cfg, embedders);
        transformer.set_attention(config.attention);
        Ok(Self {
            cfg,
            config,
            plan,
            pool,
            loader,
            transformer,
            resident,
            _reservations: reservations,
            prefetcher: None,
            past_stats: PrefetchStats::default(),
        })
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    pub fn runner_config(&self) -> &RunnerConfig {
        &self.config
    }

    /// The residency plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The units of one step and their bytes.
    pub fn table(&self) -> &UnitTable {
        self.loader.table()
    }

    /// The device pool's accounting (current and peak weight bytes).
    pub fn pool(&self) -> &DevicePool {
        &self.pool
    }

    /// Loading statistics over the runner's life.
    pub fn stats(&self) -> PrefetchStats {
        let mut stats = self.past_stats;
        if let Some(prefetcher) = &self.prefetcher {
            add_stats(&mut stats, &prefetcher.stats());
        }
        stats
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
        self.ensure_prefetcher()?;
        let dtype = self.transformer.dtype();
        let mut units = StreamingUnits::new(self.loader.table(), &self.resident, self.prefetcher.as_mut());
        let mut projected = Vec::with_capacity(self.cfg.n_blocks() + 1);
        for idx in 0..=self.cfg.n_blocks() {
            let input =
                caption_input(&self.cfg, idx, &inputs.encoder_hidden_states_t5, &inputs.encoder_hidden_states_llama3)?;
            let projection = units.sources.caption(idx)?;
            projected.push(projection.forward(&input, dtype)?);
        }
        let text = TextTokens::from_projections(projected)?;
        let step = StepInputs {
            hidden_states: &inputs.hidden_states,
            timesteps: &inputs.timesteps,
            pooled_embeds: &inputs.pooled_embeds,
            text: &text,
            modulation: Modulation::FromBlocks,
        };
        let result = self.transformer.forward(&step, &mut units);
        finish(result, units.error)
    }

    /// Computes once what the prompt and the schedule determine: the caption projections and
    /// every block's modulation for each step's `timesteps` (`[B]` each). Loads one projection or
    /// modulation layer at a time, each accounted in the pool.
    pub fn prepare(
        &mut self,
        encoder_hidden_states_t5: &Tensor,
        encoder_hidden_states_llama3: &Tensor,
        pooled_embeds: &Tensor,
        timesteps: &[Tensor],
    ) -> Result<Prepared> {
        // Free the streaming slots: preparation loads its own layers, one at a time.
        if let Some(prefetcher) = self.prefetcher.take() {
            add_stats(&mut self.past_stats, &prefetcher.stats());
        }
        let cfg = self.cfg.clone();
        let dtype = self.transformer.dtype();
        let sizes = SizeModel::new(&cfg);
        let mut projected = Vec::with_capacity(cfg.n_blocks() + 1);
        for idx in 0..=cfg.n_blocks() {
            let unit = Unit::CaptionProjection(idx);
            let _reservation =
                self.pool.try_reserve(sizes.unit_size(unit).bytes(self.config.compute_dtype), &unit.to_string())?;
            let LoadedUnit::Caption(projection) = self.loader.load_unit(unit)? else {
                return Err(PipelineError::invalid(unit.to_string(), "did not load as a caption projection"));
            };
            let input = caption_input(&cfg, idx, encoder_hidden_states_t5, encoder_hidden_states_llama3)?;
            projected.push(projection.forward(&input, dtype)?);
        }
        let text = TextTokens::from_projections(projected)?;

        let tembs = timesteps
            .iter()
            .map(|t| self.transformer.temb(t, pooled_embeds))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut modulation: Vec<StepModulation> =
            tembs.iter().map(|_| StepModulation { double: Vec::new(), single: Vec::new() }).collect();
        let blocks =
            (0..cfg.num_layers).map(Unit::DoubleBlock).chain((0..cfg.num_single_layers).map(Unit::SingleBlock));
        for unit in blocks {
            let size = sizes.unit_size(unit);
            let bytes = (size.modulation_params * self.config.compute_dtype.size_in_bytes()) as u64;
            let _reservation = self.pool.try_reserve(bytes, &format!("{unit}.adaLN_modulation"))?;
            let layer = self.loader.load_modulation(unit)?;
            for (step, temb) in modulation.iter_mut().zip(&tembs) {
                let vectors = layer.forward(temb)?;
                match unit {
                    Unit::DoubleBlock(_) => step.double.push(vectors),
                    _ => step.single.push(vectors),
                }
            }
        }
        Ok(Prepared { text, pooled_embeds: pooled_embeds.clone(), timesteps: timesteps.to_vec(), modulation })
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
        self.ensure_prefetcher()?;
        let mut units = StreamingUnits::new(self.loader.table(), &self.resident, self.prefetcher.as_mut());
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

    /// Starts the prefetcher if the plan streams anything and none runs.
    fn ensure_prefetcher(&mut self) -> Result<()> {
        if self.prefetcher.is_none() && !self.plan.streamed().is_empty() {
            let specs = self.loader.table().specs().to_vec();
            self.prefetcher = Some(Prefetcher::from_plan(Arc::clone(&self.loader), &specs, &self.plan, &self.pool)?);
        }
        Ok(())
    }
}

impl std::fmt::Debug for TransformerRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransformerRunner")
            .field("config", &self.config)
            .field("plan", &self.plan)
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

fn add_stats(total: &mut PrefetchStats, more: &PrefetchStats) {
    total.units_loaded += more.units_loaded;
    total.bytes_loaded += more.bytes_loaded;
    total.load_time += more.load_time;
    total.units_delivered += more.units_delivered;
    total.bytes_delivered += more.bytes_delivered;
    total.stall_time += more.stall_time;
}

/// The candle dtype of a config dtype.
pub fn candle_dtype(dtype: hidream_config::DType) -> candle_core::DType {
    match dtype {
        hidream_config::DType::F32 => candle_core::DType::F32,
        hidream_config::DType::F16 => candle_core::DType::F16,
        hidream_config::DType::BF16 => candle_core::DType::BF16,
    }
}
