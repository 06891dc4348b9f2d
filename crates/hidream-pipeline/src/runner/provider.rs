//! The model's `BlockProvider` over a pass of the residency runtime.

use std::ops::Deref;

use hidream_config::Unit;
use hidream_memory::{Pass, UnitRef};
use hidream_model::{BlockProvider, BlockRef, DoubleStreamBlock, SingleStreamBlock, TextProjection};

use super::loader::{CheckpointLoader, LoadedUnit};
use crate::units::UnitTable;
use crate::{PipelineError, Result};

/// The model's block provider for one forward: the units of one pass, in the table's order. The
/// first error is kept in `error` with its type, because the model's trait carries candle errors.
pub(super) struct PassUnits<'p, 'r> {
    pass: &'p mut Pass<'r, CheckpointLoader>,
    table: &'p UnitTable,
    pub error: Option<PipelineError>,
}

impl<'p, 'r> PassUnits<'p, 'r> {
    pub fn new(pass: &'p mut Pass<'r, CheckpointLoader>, table: &'p UnitTable) -> Self {
        PassUnits { pass, table, error: None }
    }

    /// Caption projection `idx`.
    pub fn caption(&mut self, idx: usize) -> Result<Typed<'_, TextProjection>> {
        next_unit(self.pass, self.table, Unit::CaptionProjection(idx), |loaded| match loaded {
            LoadedUnit::Caption(projection) => Some(projection),
            _ => None,
        })
    }
}

/// The next unit of the pass, which must be `unit`, of the kind `view` picks out.
fn next_unit<'a, T: ?Sized>(
    pass: &'a mut Pass<'_, CheckpointLoader>,
    table: &UnitTable,
    unit: Unit,
    view: fn(&LoadedUnit) -> Option<&T>,
) -> Result<Typed<'a, T>> {
    let unit_idx = table
        .index_of(unit)
        .ok_or_else(|| PipelineError::invalid(unit.to_string(), "is not part of a step in this runner"))?;
    let loaded = pass.unit(unit_idx).map_err(hidream_memory::ScheduleError::into_error)?;
    if view(&loaded).is_none() {
        return Err(PipelineError::invalid(unit.to_string(), "the unit loaded for it is of another kind"));
    }
    Ok(Typed { unit: loaded, view })
}

/// A unit of the pass, dereferencing to the part of it that `view` picks out.
pub(super) struct Typed<'a, T: ?Sized> {
    unit: UnitRef<'a, CheckpointLoader>,
    view: fn(&LoadedUnit) -> Option<&T>,
}

impl<T: ?Sized> Deref for Typed<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        (self.view)(&self.unit).expect("the kind was checked when the unit was handed out")
    }
}

impl BlockProvider for PassUnits<'_, '_> {
    fn double_block(&mut self, block_idx: usize) -> candle_core::Result<BlockRef<'_, DoubleStreamBlock>> {
        let result = next_unit(self.pass, self.table, Unit::DoubleBlock(block_idx), |loaded| match loaded {
            LoadedUnit::Double(block) => Some(block),
            _ => None,
        });
        match result.map(|typed| Box::new(typed) as BlockRef<'_, DoubleStreamBlock>) {
            Ok(block) => Ok(block),
            Err(err) => Err(keep_error(&mut self.error, err)),
        }
    }

    fn single_block(&mut self, block_idx: usize) -> candle_core::Result<BlockRef<'_, SingleStreamBlock>> {
        let result = next_unit(self.pass, self.table, Unit::SingleBlock(block_idx), |loaded| match loaded {
            LoadedUnit::Single(block) => Some(block),
            _ => None,
        });
        match result.map(|typed| Box::new(typed) as BlockRef<'_, SingleStreamBlock>) {
            Ok(block) => Ok(block),
            Err(err) => Err(keep_error(&mut self.error, err)),
        }
    }
}

fn keep_error(slot: &mut Option<PipelineError>, err: PipelineError) -> candle_core::Error {
    let message = err.to_string();
    slot.get_or_insert(err);
    candle_core::Error::Msg(message)
}
