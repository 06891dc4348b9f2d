//! Loading HiDream units from a checkpoint into unit buffers: the memory crate's `UnitLoader` for
//! the transformer, both for the units of a step and for the layers of the per-prompt
//! precomputation.

use candle_core::DType;
use hidream_config::{SizeModel, TransformerConfig, Unit};
use hidream_device::{DeviceBuffer, DeviceTier, TierFence};
use hidream_memory::{Ready, SlotBuffer, UnitLoader, UnitSpec};
use hidream_model::{BlockModulation, DoubleStreamBlock, Embedders, SingleStreamBlock, TextProjection};
use hidream_weights::Checkpoint;

use crate::units::{UnitTable, modulation_prefix};
use crate::{PipelineError, Result};

/// A unit materialised on the device tier in the compute dtype, as views into its buffer.
#[derive(Debug)]
pub enum LoadedUnit {
    Embedders(Embedders),
    Caption(TextProjection),
    Double(DoubleStreamBlock),
    Single(SingleStreamBlock),
    /// A block's adaLN modulation layer alone, for the per-prompt precomputation.
    Modulation(BlockModulation),
}

/// What one loadable part of the checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Every tensor of the unit.
    Whole(Unit),
    /// A block without its adaLN modulation weights (they are precomputed).
    WithoutModulation(Unit),
    /// Only a block's adaLN modulation layer.
    Modulation(Unit),
}

impl Part {
    fn unit(self) -> Unit {
        match self {
            Part::Whole(unit) | Part::WithoutModulation(unit) | Part::Modulation(unit) => unit,
        }
    }
}

/// Loads the parts of a list (a step's units, or the precomputation's layers) from a
/// checkpoint into unit buffers on the device tier, converting to the compute dtype on the way.
#[derive(Debug)]
pub struct CheckpointLoader {
    checkpoint: Checkpoint,
    cfg: TransformerConfig,
    parts: Vec<Part>,
    /// The checkpoint keys of each part, in the order they are laid out in its buffer.
    names: Vec<Vec<String>>,
    dtype: DType,
    tier: DeviceTier,
}

impl CheckpointLoader {
    /// A loader of the units of `table`.
    pub fn for_steps(
        checkpoint: Checkpoint,
        cfg: TransformerConfig,
        table: &UnitTable,
        dtype: DType,
        tier: DeviceTier,
    ) -> Result<Self> {
        let per_prompt = table.precompute().is_per_prompt();
        let parts = table
            .units()
            .iter()
            .map(|&unit| match unit {
                Unit::DoubleBlock(_) | Unit::SingleBlock(_) if per_prompt => Part::WithoutModulation(unit),
                _ => Part::Whole(unit),
            })
            .collect();
        Self::new(checkpoint, cfg, parts, dtype, tier)
    }

    /// A loader of the per-prompt precomputation's layers, as [`prepare_parts`] lists them.
    pub fn for_prepare(checkpoint: Checkpoint, cfg: TransformerConfig, dtype: DType, tier: DeviceTier) -> Result<Self> {
        let parts = prepare_parts(&cfg);
        Self::new(checkpoint, cfg, parts, dtype, tier)
    }

    fn new(
        checkpoint: Checkpoint,
        cfg: TransformerConfig,
        parts: Vec<Part>,
        dtype: DType,
        tier: DeviceTier,
    ) -> Result<Self> {
        let names = parts.iter().map(|&part| part_names(&checkpoint, part)).collect::<Result<Vec<_>>>()?;
        Ok(Self { checkpoint, cfg, parts, names, dtype, tier })
    }

    /// The parts, by unit index.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// Loads part `unit_idx` into `slot`: the unit, its ready fence and the bytes filled.
    fn load(
        &self,
        unit_idx: usize,
        slot: &mut SlotBuffer<DeviceBuffer, TierFence>,
    ) -> Result<Ready<LoadedUnit, TierFence>> {
        let (Some(&part), Some(names)) = (self.parts.get(unit_idx), self.names.get(unit_idx)) else {
            return Err(PipelineError::invalid(
                format!("unit {unit_idx}"),
                format!("out of {} units", self.parts.len()),
            ));
        };
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let (loaded, ready) = self.tier.load(&self.checkpoint, &names, slot)?;
        let vb = hidream_weights::unit_var_builder(loaded.tensors, self.dtype, &self.tier.device());
        let cfg = &self.cfg;
        let unit = match part {
            Part::Whole(Unit::Embedders) => LoadedUnit::Embedders(Embedders::new(cfg, &vb)?),
            Part::Whole(Unit::CaptionProjection(idx)) => LoadedUnit::Caption(TextProjection::new(
                cfg.caption_input_channels(idx),
                cfg.inner_dim(),
                vb.pp("caption_projection").pp(idx),
            )?),
            Part::Whole(Unit::DoubleBlock(idx)) | Part::WithoutModulation(Unit::DoubleBlock(idx)) => {
                LoadedUnit::Double(DoubleStreamBlock::new(cfg, vb.pp("double_stream_blocks").pp(idx).pp("block"))?)
            }
            Part::Whole(Unit::SingleBlock(idx)) | Part::WithoutModulation(Unit::SingleBlock(idx)) => {
                LoadedUnit::Single(SingleStreamBlock::new(cfg, vb.pp("single_stream_blocks").pp(idx).pp("block"))?)
            }
            Part::Modulation(Unit::DoubleBlock(idx)) => LoadedUnit::Modulation(BlockModulation::new(
                cfg.inner_dim(),
                12,
                vb.pp(format!("double_stream_blocks.{idx}.block")),
            )?),
            Part::Modulation(Unit::SingleBlock(idx)) => LoadedUnit::Modulation(BlockModulation::new(
                cfg.inner_dim(),
                6,
                vb.pp(format!("single_stream_blocks.{idx}.block")),
            )?),
            Part::WithoutModulation(unit) | Part::Modulation(unit) => {
                return Err(PipelineError::invalid(unit.to_string(), "has no block modulation"));
            }
        };
        Ok(Ready { unit, ready, bytes_loaded: loaded.bytes })
    }
}

/// The per-prompt precomputation's layers: every caption projection, then every block's
/// modulation layer, in forward order.
pub fn prepare_parts(cfg: &TransformerConfig) -> Vec<Part> {
    let captions = (0..=cfg.n_blocks()).map(|idx| Part::Whole(Unit::CaptionProjection(idx)));
    let blocks = (0..cfg.num_layers).map(Unit::DoubleBlock).chain((0..cfg.num_single_layers).map(Unit::SingleBlock));
    captions.chain(blocks.map(Part::Modulation)).collect()
}

/// The planner's view of a part: its bytes in `dtype`, from the size model.
pub fn part_spec(sizes: &SizeModel, part: Part, dtype: hidream_config::DType) -> UnitSpec {
    let size = sizes.unit_size(part.unit());
    UnitSpec::streamable(match part {
        Part::Whole(_) => size.bytes(dtype),
        Part::WithoutModulation(_) => size.bytes_without_modulation(dtype),
        Part::Modulation(_) => (size.modulation_params * dtype.size_in_bytes()) as u64,
    })
}

/// The checkpoint keys of a part, sorted, so that its buffer layout is the same at every load.
fn part_names(checkpoint: &Checkpoint, part: Part) -> Result<Vec<String>> {
    let unit = part.unit();
    let (prefixes, strip) = match part {
        Part::Whole(_) => (unit.prefixes(), None),
        Part::WithoutModulation(_) => (unit.prefixes(), modulation_prefix(unit)),
        Part::Modulation(_) => (modulation_prefix(unit).into_iter().collect(), None),
    };
    let names: Vec<String> = checkpoint
        .tensor_names()
        .filter(|name| prefixes.iter().any(|prefix| name.starts_with(prefix.as_str())))
        .filter(|name| strip.as_ref().is_none_or(|strip| !name.starts_with(strip.as_str())))
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        return Err(PipelineError::invalid(
            prefixes.join(", "),
            format!("no tensor in the checkpoint at {}", checkpoint.dir().display()),
        ));
    }
    Ok(names)
}

/// The fences are the device tier's: complete at once on the CPU, CUDA events on a GPU.
impl UnitLoader for CheckpointLoader {
    type Buffer = DeviceBuffer;
    type Unit = LoadedUnit;
    type Fence = TierFence;
    type Error = PipelineError;

    fn allocate(&self, bytes: u64) -> Result<DeviceBuffer> {
        Ok(self.tier.allocate(bytes, self.dtype)?)
    }

    fn load_into(
        &self,
        unit_idx: usize,
        slot: &mut SlotBuffer<DeviceBuffer, TierFence>,
    ) -> Result<Ready<LoadedUnit, TierFence>> {
        self.load(unit_idx, slot)
    }

    fn wait_ready(&self, ready: &TierFence) -> Result<()> {
        Ok(self.tier.wait_ready(ready)?)
    }

    fn record_consumed(&self) -> TierFence {
        self.tier.record_consumed()
    }
}
