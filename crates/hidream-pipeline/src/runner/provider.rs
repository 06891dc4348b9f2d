//! The model's `BlockProvider`, served from the resident set and the prefetching scheduler.

use std::ops::Deref;

use hidream_config::Unit;
use hidream_memory::{Loaded, Prefetcher, ScheduleError};
use hidream_model::{BlockProvider, BlockRef, DoubleStreamBlock, SingleStreamBlock, TextProjection};

use super::loader::{CheckpointLoader, LoadedUnit};
use crate::units::UnitTable;
use crate::{PipelineError, Result};

/// The model's block provider for one forward. The first streaming error is kept in `error` with
/// its type, because the model's trait can only carry candle errors.
pub(super) struct StreamingUnits<'a> {
    pub sources: UnitSources<'a>,
    pub error: Option<PipelineError>,
}

impl<'a> StreamingUnits<'a> {
    pub fn new(
        table: &'a UnitTable,
        resident: &'a [Option<LoadedUnit>],
        prefetcher: Option<&'a mut Prefetcher<CheckpointLoader>>,
    ) -> Self {
        StreamingUnits { sources: UnitSources { table, resident, prefetcher }, error: None }
    }
}

/// Where units come from: resident ones by reference, streamed ones from the prefetcher, in the
/// table's order.
pub(super) struct UnitSources<'a> {
    pub table: &'a UnitTable,
    pub resident: &'a [Option<LoadedUnit>],
    pub prefetcher: Option<&'a mut Prefetcher<CheckpointLoader>>,
}

/// A unit from either source, dereferencing to the loaded unit.
pub(super) enum UnitRef<'a> {
    Resident(&'a LoadedUnit),
    Streamed(Box<Loaded<LoadedUnit>>),
}

impl Deref for UnitRef<'_> {
    type Target = LoadedUnit;

    fn deref(&self) -> &LoadedUnit {
        match self {
            UnitRef::Resident(unit) => unit,
            UnitRef::Streamed(loaded) => loaded,
        }
    }
}

impl UnitSources<'_> {
    /// The next unit of the pass, which must be `unit`.
    pub fn unit(&mut self, unit: Unit) -> Result<UnitRef<'_>> {
        let unit_idx = self
            .table
            .index_of(unit)
            .ok_or_else(|| PipelineError::invalid(unit.to_string(), "is not part of a step in this runner"))?;
        if let Some(Some(resident)) = self.resident.get(unit_idx) {
            return Ok(UnitRef::Resident(resident));
        }
        let prefetcher = self
            .prefetcher
            .as_deref_mut()
            .ok_or_else(|| PipelineError::invalid(unit.to_string(), "is streamed but no prefetcher is running"))?;
        let loaded = prefetcher.next().map_err(schedule_error)?;
        if loaded.unit_idx() != unit_idx {
            return Err(PipelineError::Schedule(format!(
                "expected {unit} (unit {unit_idx}) from the prefetcher, got unit {}",
                loaded.unit_idx()
            )));
        }
        Ok(UnitRef::Streamed(Box::new(loaded)))
    }

    /// Caption projection `idx`.
    pub fn caption(&mut self, idx: usize) -> Result<CaptionRef<'_>> {
        let unit = self.unit(Unit::CaptionProjection(idx))?;
        match &*unit {
            LoadedUnit::Caption(_) => Ok(CaptionRef(unit)),
            _ => Err(wrong_kind(Unit::CaptionProjection(idx))),
        }
    }
}

fn schedule_error(err: ScheduleError<PipelineError>) -> PipelineError {
    match err {
        ScheduleError::Load { source, .. } => source,
        other => PipelineError::Schedule(other.to_string()),
    }
}

fn wrong_kind(unit: Unit) -> PipelineError {
    PipelineError::Schedule(format!("the unit loaded for {unit} is of another kind"))
}

/// A caption projection, resident or streamed.
pub(super) struct CaptionRef<'a>(UnitRef<'a>);

impl Deref for CaptionRef<'_> {
    type Target = TextProjection;

    fn deref(&self) -> &TextProjection {
        match &*self.0 {
            LoadedUnit::Caption(projection) => projection,
            _ => unreachable!("CaptionRef is only built around a caption projection"),
        }
    }
}

struct DoubleRef<'a>(UnitRef<'a>);

impl Deref for DoubleRef<'_> {
    type Target = DoubleStreamBlock;

    fn deref(&self) -> &DoubleStreamBlock {
        match &*self.0 {
            LoadedUnit::Double(block) => block,
            _ => unreachable!("DoubleRef is only built around a double-stream block"),
        }
    }
}

struct SingleRef<'a>(UnitRef<'a>);

impl Deref for SingleRef<'_> {
    type Target = SingleStreamBlock;

    fn deref(&self) -> &SingleStreamBlock {
        match &*self.0 {
            LoadedUnit::Single(block) => block,
            _ => unreachable!("SingleRef is only built around a single-stream block"),
        }
    }
}

impl BlockProvider for StreamingUnits<'_> {
    fn double_block(&mut self, block_idx: usize) -> candle_core::Result<BlockRef<'_, DoubleStreamBlock>> {
        let unit = Unit::DoubleBlock(block_idx);
        let result = self.sources.unit(unit).and_then(|loaded| match &*loaded {
            LoadedUnit::Double(_) => Ok(DoubleRef(loaded)),
            _ => Err(wrong_kind(unit)),
        });
        match result {
            Ok(block) => Ok(Box::new(block)),
            Err(err) => Err(keep_error(&mut self.error, err)),
        }
    }

    fn single_block(&mut self, block_idx: usize) -> candle_core::Result<BlockRef<'_, SingleStreamBlock>> {
        let unit = Unit::SingleBlock(block_idx);
        let result = self.sources.unit(unit).and_then(|loaded| match &*loaded {
            LoadedUnit::Single(_) => Ok(SingleRef(loaded)),
            _ => Err(wrong_kind(unit)),
        });
        match result {
            Ok(block) => Ok(Box::new(block)),
            Err(err) => Err(keep_error(&mut self.error, err)),
        }
    }
}

fn keep_error(slot: &mut Option<PipelineError>, err: PipelineError) -> candle_core::Error {
    let message = err.to_string();
    slot.get_or_insert(err);
    candle_core::Error::Msg(message)
}
