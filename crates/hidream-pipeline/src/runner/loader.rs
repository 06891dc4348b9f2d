//! Loading HiDream units from a checkpoint: the memory crate's `UnitLoader` for the transformer.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use hidream_config::{TransformerConfig, Unit};
use hidream_memory::UnitLoader;
use hidream_model::{BlockModulation, DoubleStreamBlock, Embedders, SingleStreamBlock, TextProjection};
use hidream_weights::Checkpoint;

use crate::units::{UnitTable, modulation_prefix};
use crate::{PipelineError, Result};

/// A unit materialised on the device tier in the compute dtype.
#[derive(Debug)]
pub enum LoadedUnit {
    Embedders(Embedders),
    Caption(TextProjection),
    Double(DoubleStreamBlock),
    Single(SingleStreamBlock),
}

/// Loads the units of a [`UnitTable`] from a memory-mapped checkpoint, converting to the compute
/// dtype on the way. With per-prompt precomputation, blocks load without their modulation weights.
#[derive(Debug)]
pub struct CheckpointLoader {
    checkpoint: Checkpoint,
    cfg: TransformerConfig,
    table: UnitTable,
    dtype: DType,
    device: Device,
}

impl CheckpointLoader {
    pub fn new(checkpoint: Checkpoint, cfg: TransformerConfig, table: UnitTable, dtype: DType, device: Device) -> Self {
        Self { checkpoint, cfg, table, dtype, device }
    }

    pub fn table(&self) -> &UnitTable {
        &self.table
    }

    /// Loads `unit` as a step runs it.
    pub fn load_unit(&self, unit: Unit) -> Result<LoadedUnit> {
        let strip = self.table.precompute().is_per_prompt().then(|| modulation_prefix(unit)).flatten();
        let tensors = self.tensors(&unit.prefixes(), |name| strip.as_ref().is_none_or(|p| !name.starts_with(p)))?;
        let vb = hidream_weights::unit_var_builder(tensors, self.dtype, &self.device);
        let cfg = &self.cfg;
        Ok(match unit {
            Unit::Embedders => LoadedUnit::Embedders(Embedders::new(cfg, &vb)?),
            Unit::CaptionProjection(idx) => LoadedUnit::Caption(TextProjection::new(
                cfg.caption_input_channels(idx),
                cfg.inner_dim(),
                vb.pp("caption_projection").pp(idx),
            )?),
            Unit::DoubleBlock(idx) => {
                LoadedUnit::Double(DoubleStreamBlock::new(cfg, vb.pp("double_stream_blocks").pp(idx).pp("block"))?)
            }
            Unit::SingleBlock(idx) => {
                LoadedUnit::Single(SingleStreamBlock::new(cfg, vb.pp("single_stream_blocks").pp(idx).pp("block"))?)
            }
        })
    }

    /// Loads only the adaLN modulation layer of a block, for the per-prompt precomputation.
    pub fn load_modulation(&self, unit: Unit) -> Result<BlockModulation> {
        let (prefix, block_path, n_chunks) = match unit {
            Unit::DoubleBlock(idx) => (modulation_prefix(unit), format!("double_stream_blocks.{idx}.block"), 12),
            Unit::SingleBlock(idx) => (modulation_prefix(unit), format!("single_stream_blocks.{idx}.block"), 6),
            Unit::Embedders | Unit::CaptionProjection(_) => {
                return Err(PipelineError::invalid(unit.to_string(), "has no block modulation"));
            }
        };
        let prefix = prefix.unwrap_or_default();
        let tensors = self.tensors(std::slice::from_ref(&prefix), |_| true)?;
        let vb = hidream_weights::unit_var_builder(tensors, self.dtype, &self.device);
        Ok(BlockModulation::new(self.cfg.inner_dim(), n_chunks, vb.pp(block_path))?)
    }

    /// Every tensor under `prefixes` that `keep` accepts, read from the mmap and converted.
    fn tensors(&self, prefixes: &[String], keep: impl Fn(&str) -> bool) -> Result<HashMap<String, Tensor>> {
        let names: Vec<&str> = self
            .checkpoint
            .tensor_names()
            .filter(|name| prefixes.iter().any(|prefix| name.starts_with(prefix.as_str())) && keep(name))
            .collect();
        if names.is_empty() {
            return Err(PipelineError::invalid(
                prefixes.join(", "),
                format!("no tensor in the checkpoint at {}", self.checkpoint.dir().display()),
            ));
        }
        names
            .into_iter()
            .map(|name| Ok((name.to_owned(), self.checkpoint.load(name, self.dtype, &self.device)?)))
            .collect()
    }
}

impl UnitLoader for CheckpointLoader {
    type Unit = LoadedUnit;
    type Error = PipelineError;

    fn load(&self, unit_idx: usize) -> Result<LoadedUnit> {
        let unit = *self.table.units().get(unit_idx).ok_or_else(|| {
            PipelineError::invalid(format!("unit {unit_idx}"), format!("out of {} units", self.table.units().len()))
        })?;
        self.load_unit(unit)
    }
}
