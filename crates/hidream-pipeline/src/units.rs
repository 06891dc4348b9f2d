//! The transformer as memory units: which HiDream units one step runs, in order, and their bytes.
//!
//! This is the one place that turns the size model into the generic planner's `UnitSpec`s, so that
//! `hidream plan` and the runner always agree.
//!
//! - The embedders and final layer are small and needed by every step: always resident.
//! - Without precomputation, a step runs the caption projections and every block with its adaLN
//!   modulation weights.
//! - With precomputation ([`Precompute::PerPrompt`]), the caption projections and every adaLN
//!   weight run once per prompt, before the steps, one layer at a time; a step then needs only the
//!   blocks without their modulation weights.

use hidream_config::{DType, SizeModel, TensorSpec, TransformerConfig, Unit};
use hidream_memory::UnitSpec;

/// Whether prompt-only work is done once per prompt or inside every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Precompute {
    /// Caption projections and adaLN modulation run inside every forward, as in diffusers.
    PerStep,
    /// They run once per prompt; steps load blocks without modulation weights.
    PerPrompt,
}

impl Precompute {
    /// True for [`Precompute::PerPrompt`].
    pub fn is_per_prompt(self) -> bool {
        self == Precompute::PerPrompt
    }
}

/// The units of one step, in execution order, with their bytes in the compute dtype.
#[derive(Debug, Clone)]
pub struct UnitTable {
    units: Vec<Unit>,
    specs: Vec<UnitSpec>,
    precompute: Precompute,
    compute_dtype: DType,
    weight_bytes_total: u64,
}

impl UnitTable {
    pub fn new(cfg: &TransformerConfig, compute_dtype: DType, precompute: Precompute) -> Self {
        let sizes = SizeModel::new(cfg);
        let mut units = Vec::new();
        let mut specs = Vec::new();
        for unit in sizes.units() {
            let size = sizes.unit_size(unit);
            let spec = match (unit, precompute) {
                (Unit::Embedders, _) => UnitSpec::resident(size.bytes(compute_dtype)),
                (Unit::CaptionProjection(_), Precompute::PerPrompt) => continue,
                (Unit::CaptionProjection(_), Precompute::PerStep) => UnitSpec::streamable(size.bytes(compute_dtype)),
                (_, Precompute::PerStep) => UnitSpec::streamable(size.bytes(compute_dtype)),
                (_, Precompute::PerPrompt) => UnitSpec::streamable(size.bytes_without_modulation(compute_dtype)),
            };
            units.push(unit);
            specs.push(spec);
        }
        UnitTable { units, specs, precompute, compute_dtype, weight_bytes_total: sizes.total_bytes(compute_dtype) }
    }

    /// The units, in execution order.
    pub fn units(&self) -> &[Unit] {
        &self.units
    }

    /// The planner's view of [`Self::units`], index for index.
    pub fn specs(&self) -> &[UnitSpec] {
        &self.specs
    }

    /// The index of `unit` in this table, if a step runs it.
    pub fn index_of(&self, unit: Unit) -> Option<usize> {
        self.units.iter().position(|u| *u == unit)
    }

    pub fn precompute(&self) -> Precompute {
        self.precompute
    }

    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Every weight of the transformer in the compute dtype, whatever runs per step.
    pub fn weight_bytes_total(&self) -> u64 {
        self.weight_bytes_total
    }

    /// Bytes that one step needs: every unit in the table.
    pub fn step_bytes(&self) -> u64 {
        self.specs.iter().map(|s| s.bytes).sum()
    }

    /// Whether a tensor of `unit` is loaded per step (false for modulation weights when they are
    /// precomputed).
    pub fn loads_per_step(&self, spec: &TensorSpec) -> bool {
        !(self.precompute.is_per_prompt() && spec.is_modulation)
    }
}

/// The checkpoint key prefix of a block's modulation layer.
pub fn modulation_prefix(unit: Unit) -> Option<String> {
    match unit {
        Unit::DoubleBlock(idx) => Some(format!("double_stream_blocks.{idx}.block.adaLN_modulation.")),
        Unit::SingleBlock(idx) => Some(format!("single_stream_blocks.{idx}.block.adaLN_modulation.")),
        Unit::Embedders | Unit::CaptionProjection(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The small preset's minimum budget at prefetch depth 1, from DESIGN: 27.8% of its weights
    /// with modulation and captions per step, 23.0% once they are precomputed. Full: 5.1% and 4.2%.
    #[test]
    fn minimum_budget_shares() {
        let check = |cfg: TransformerConfig, precompute: Precompute, expected_percent: f64| {
            let table = UnitTable::new(&cfg, DType::F32, precompute);
            let minimum = hidream_memory::Plan::minimum_budget(table.specs(), 1);
            let share = 100.0 * minimum as f64 / table.weight_bytes_total() as f64;
            assert!((share - expected_percent).abs() < 0.05, "{precompute:?}: {share:.2}% vs {expected_percent}%");
        };
        check(TransformerConfig::small(), Precompute::PerStep, 27.8);
        check(TransformerConfig::small(), Precompute::PerPrompt, 23.0);
        check(TransformerConfig::full(), Precompute::PerStep, 5.1);
        check(TransformerConfig::full(), Precompute::PerPrompt, 4.2);
    }

    #[test]
    fn precompute_removes_captions_and_modulation_from_the_step() {
        let cfg = TransformerConfig::full();
        let sizes = SizeModel::new(&cfg);
        let per_step = UnitTable::new(&cfg, DType::BF16, Precompute::PerStep);
        let per_prompt = UnitTable::new(&cfg, DType::BF16, Precompute::PerPrompt);
        let modulation: u64 = sizes.units().map(|u| sizes.unit_size(u).modulation_params as u64 * 2).sum();
        let embedders_modulation = sizes.unit_size(Unit::Embedders).modulation_params as u64 * 2;
        let captions: u64 = (0..49).map(|idx| sizes.unit_size(Unit::CaptionProjection(idx)).bytes(DType::BF16)).sum();
        assert_eq!(per_step.step_bytes(), per_step.weight_bytes_total());
        // The final layer's modulation stays in the resident embedders.
        assert_eq!(per_step.step_bytes() - per_prompt.step_bytes(), modulation - embedders_modulation + captions);
        assert_eq!(per_prompt.index_of(Unit::CaptionProjection(0)), None);
    }
}
