//! The residency planner: which units stay on the device and which stream through slots.
//!
//! The units run in a fixed cyclic order (every pass uses all of them, in the same order), so a
//! cache has nothing to gain: whatever it evicts is the unit needed furthest in the future, which
//! comes round again every pass. The right structure is a fixed resident set plus streamed units,
//! and the planner keeps resident whatever saves the most streamed bytes per pass.
//!
//! A streamed unit passes through one of `prefetch_depth + 1` equal slots (one computing, the
//! others loading ahead), each as large as the largest streamed unit. So streaming a large unit
//! costs slot space as well: under a budget the planner tries every slot size `s` among the
//! streamable unit sizes, keeps every larger unit resident, and fills the room left with more
//! resident units.

mod fill;
mod policy;

use std::cmp::Reverse;
use std::fmt;

pub use policy::{DEFAULT_PREFETCH_DEPTH, Policy, PolicyKind};

use crate::MemoryError;
use crate::bytes::format_bytes;

/// The size of one loadable unit, and whether it must stay resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UnitSpec {
    /// Bytes of the unit's weights on the device tier.
    pub bytes: u64,
    /// The unit may never be streamed (it is needed outside the cyclic pass, or is tiny).
    pub always_resident: bool,
}

impl UnitSpec {
    /// A unit the planner may stream.
    pub const fn streamable(bytes: u64) -> Self {
        UnitSpec { bytes, always_resident: false }
    }

    /// A unit that always stays resident.
    pub const fn resident(bytes: u64) -> Self {
        UnitSpec { bytes, always_resident: true }
    }
}

/// Where every unit lives: resident for the whole run, or streamed through slots every pass.
///
/// Unit indices refer to the `UnitSpec` list the plan was made from, in execution order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    resident: Vec<usize>,
    streamed: Vec<usize>,
    slot_bytes: u64,
    n_slots: usize,
    prefetch_depth: usize,
    /// The depth asked for, when more than the streamed units allow.
    requested_prefetch_depth: Option<usize>,
    /// Room kept beside the resident units for work outside the passes, which uses it while the
    /// slots are free.
    scratch_bytes: u64,
    resident_bytes: u64,
    streamed_bytes_per_pass: u64,
}

impl Plan {
    /// Every unit resident, nothing streamed.
    pub fn all(units: &[UnitSpec]) -> Plan {
        Plan::from_resident(units, &vec![true; units.len()], 0, 0)
    }

    /// Nothing resident but the `always_resident` units; one slot: load, run, free, no overlap.
    pub fn sequential(units: &[UnitSpec]) -> Plan {
        Plan::stream(units, 0)
    }

    /// Nothing resident but the `always_resident` units; `prefetch_depth + 1` slots, or one slot
    /// per streamed unit when the depth asks for more (see [`Plan::requested_prefetch_depth`]).
    pub fn stream(units: &[UnitSpec], prefetch_depth: usize) -> Plan {
        let resident: Vec<bool> = units.iter().map(|unit| unit.always_resident).collect();
        Plan::from_resident(units, &resident, prefetch_depth, 0)
    }

    /// The plan that streams the fewest bytes per pass within `budget_bytes` of weights.
    ///
    /// Everything stays resident if it fits. Otherwise the budget holds the resident units plus
    /// `prefetch_depth + 1` slots. Fails with [`MemoryError::BudgetTooSmall`], which gives the
    /// exact [`Plan::minimum_budget`], when no plan fits.
    pub fn budget(units: &[UnitSpec], budget_bytes: u64, prefetch_depth: usize) -> Result<Plan, MemoryError> {
        Plan::budget_with_scratch(units, budget_bytes, prefetch_depth, 0)
    }

    /// [`Plan::budget`], keeping at least `scratch_bytes` beside the resident units for work that
    /// runs outside the passes, while the slots are free (such as a per-prompt precomputation that
    /// loads its own layers). The slots and the scratch share that room: the plan needs the larger
    /// of the two.
    pub fn budget_with_scratch(
        units: &[UnitSpec],
        budget_bytes: u64,
        prefetch_depth: usize,
        scratch_bytes: u64,
    ) -> Result<Plan, MemoryError> {
        let requested_depth = prefetch_depth;
        let prefetch_depth = prefetch_depth.min(streamable_count(units).saturating_sub(1));
        if total_bytes(units).saturating_add(scratch_bytes) <= budget_bytes {
            return Ok(Plan::from_resident(units, &vec![true; units.len()], prefetch_depth, scratch_bytes));
        }
        let mut best: Option<Plan> = None;
        for candidate in SlotCandidates::new(units).iter() {
            let base = candidate.base_bytes(units, prefetch_depth, scratch_bytes);
            if base > budget_bytes {
                continue;
            }
            let mut resident: Vec<bool> = units.iter().map(|unit| unit.always_resident).collect();
            for &unit_idx in candidate.larger {
                resident[unit_idx] = true;
            }
            let sizes: Vec<u64> = candidate.rest.iter().map(|&unit_idx| units[unit_idx].bytes).collect();
            for (&unit_idx, chosen) in candidate.rest.iter().zip(fill::fill(&sizes, budget_bytes - base)) {
                resident[unit_idx] |= chosen;
            }
            let plan = Plan::from_resident(units, &resident, requested_depth, scratch_bytes);
            let key = |plan: &Plan| (plan.streamed_bytes_per_pass, plan.peak_weight_bytes());
            if best.as_ref().is_none_or(|best| key(&plan) < key(best)) {
                best = Some(plan);
            }
        }
        best.ok_or_else(|| MemoryError::BudgetTooSmall {
            budget: budget_bytes,
            minimum: Plan::minimum_budget_with_scratch(units, prefetch_depth, scratch_bytes),
            prefetch_depth,
            minimum_sequential: Plan::minimum_budget_with_scratch(units, 0, scratch_bytes),
        })
    }

    /// For units that run once, such as a per-prompt precomputation's layers: every
    /// streamable unit streams, since keeping one resident would not save a byte, at the deepest
    /// prefetch up to `prefetch_depth` whose slots fit `budget_bytes` beside the pinned units.
    /// Fails with [`MemoryError::BudgetTooSmall`] if even one slot does not fit.
    pub fn single_pass(
        units: &[UnitSpec],
        budget_bytes: Option<u64>,
        prefetch_depth: usize,
    ) -> Result<Plan, MemoryError> {
        let widest = Plan::stream(units, prefetch_depth);
        let Some(budget_bytes) = budget_bytes else {
            return Ok(widest);
        };
        let room = budget_bytes.saturating_sub(widest.resident_bytes);
        let fitting_slots =
            room.checked_div(widest.slot_bytes).map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
        if widest.resident_bytes > budget_bytes || (widest.n_slots > 0 && fitting_slots == 0) {
            let minimum = widest.resident_bytes.saturating_add(widest.slot_bytes);
            return Err(MemoryError::BudgetTooSmall {
                budget: budget_bytes,
                minimum,
                prefetch_depth: 0,
                minimum_sequential: minimum,
            });
        }
        Ok(Plan::stream(units, prefetch_depth.min(fitting_slots.saturating_sub(1))))
    }

    /// The same placement, keeping `scratch_bytes` of room beside the resident units for work
    /// outside the passes (which [`Plan::peak_weight_bytes`] then counts).
    pub fn with_scratch(mut self, scratch_bytes: u64) -> Plan {
        self.scratch_bytes = scratch_bytes;
        self
    }

    /// The smallest budget for which [`Plan::budget`] succeeds: one byte less fails.
    pub fn minimum_budget(units: &[UnitSpec], prefetch_depth: usize) -> u64 {
        Plan::minimum_budget_with_scratch(units, prefetch_depth, 0)
    }

    /// The smallest budget for which [`Plan::budget_with_scratch`] succeeds.
    pub fn minimum_budget_with_scratch(units: &[UnitSpec], prefetch_depth: usize, scratch_bytes: u64) -> u64 {
        let prefetch_depth = prefetch_depth.min(streamable_count(units).saturating_sub(1));
        SlotCandidates::new(units)
            .iter()
            .map(|candidate| candidate.base_bytes(units, prefetch_depth, scratch_bytes))
            .fold(total_bytes(units).saturating_add(scratch_bytes), u64::min)
    }

    /// Resident unit indices, ascending.
    pub fn resident(&self) -> &[usize] {
        &self.resident
    }

    /// Streamed unit indices in execution order: the order one pass loads them.
    pub fn streamed(&self) -> &[usize] {
        &self.streamed
    }

    /// Whether unit `unit_idx` stays resident.
    pub fn is_resident(&self, unit_idx: usize) -> bool {
        self.resident.binary_search(&unit_idx).is_ok()
    }

    /// The size of each slot: the largest streamed unit, or 0 when nothing streams.
    pub fn slot_bytes(&self) -> u64 {
        self.slot_bytes
    }

    /// The number of slots: `prefetch_depth + 1`, or 0 when nothing streams.
    pub fn n_slots(&self) -> usize {
        self.n_slots
    }

    /// How many streamed units load ahead of the one computing; 0 when nothing streams.
    pub fn prefetch_depth(&self) -> usize {
        self.prefetch_depth
    }

    /// The prefetch depth that was asked for, when it was more than the plan uses: a pass of `n`
    /// streamed units has at most `n - 1` units to load ahead, and a deeper prefetch would load
    /// copies of units already in a slot.
    pub fn requested_prefetch_depth(&self) -> Option<usize> {
        self.requested_prefetch_depth
    }

    /// The room kept beside the resident units for work outside the passes.
    pub fn scratch_bytes(&self) -> u64 {
        self.scratch_bytes
    }

    /// Bytes of the resident units.
    pub fn resident_bytes(&self) -> u64 {
        self.resident_bytes
    }

    /// Bytes loaded per pass: the sum of the streamed units.
    pub fn streamed_bytes_per_pass(&self) -> u64 {
        self.streamed_bytes_per_pass
    }

    /// The most weight bytes on the device at once: the resident units plus every slot, or the
    /// scratch room where that is larger.
    pub fn peak_weight_bytes(&self) -> u64 {
        self.resident_bytes.saturating_add(slots_bytes(self.n_slots, self.slot_bytes).max(self.scratch_bytes))
    }

    fn from_resident(units: &[UnitSpec], resident: &[bool], prefetch_depth: usize, scratch_bytes: u64) -> Plan {
        let (resident_units, streamed): (Vec<usize>, Vec<usize>) = (0..units.len()).partition(|&idx| resident[idx]);
        let sum = |indices: &[usize]| indices.iter().fold(0u64, |sum, &idx| sum.saturating_add(units[idx].bytes));
        let slot_bytes = streamed.iter().map(|&idx| units[idx].bytes).max().unwrap_or(0);
        // With nothing to stream there are no slots, and nothing to load ahead; a pass of n
        // streamed units has at most n - 1 to load ahead.
        let usable_depth = streamed.len().saturating_sub(1);
        let requested_prefetch_depth =
            (prefetch_depth > usable_depth && !streamed.is_empty()).then_some(prefetch_depth);
        let prefetch_depth = prefetch_depth.min(usable_depth);
        Plan {
            n_slots: if streamed.is_empty() { 0 } else { prefetch_depth + 1 },
            resident_bytes: sum(&resident_units),
            streamed_bytes_per_pass: sum(&streamed),
            resident: resident_units,
            streamed,
            slot_bytes,
            prefetch_depth,
            requested_prefetch_depth,
            scratch_bytes,
        }
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n_units = self.resident.len() + self.streamed.len();
        if self.streamed.is_empty() {
            return write!(f, "all {n_units} units resident ({}), nothing streamed", format_bytes(self.resident_bytes));
        }
        write!(
            f,
            "{} of {n_units} units resident ({}), {} streamed ({} per pass) through {} slots of {}; peak weights {}",
            self.resident.len(),
            format_bytes(self.resident_bytes),
            self.streamed.len(),
            format_bytes(self.streamed_bytes_per_pass),
            self.n_slots,
            format_bytes(self.slot_bytes),
            format_bytes(self.peak_weight_bytes()),
        )?;
        if let Some(requested) = self.requested_prefetch_depth {
            write!(
                f,
                " (prefetch depth {requested} clamped to {}: a pass streams {} units)",
                self.prefetch_depth,
                self.streamed.len()
            )?;
        }
        Ok(())
    }
}

/// One choice of slot size: the streamable units larger than it must stay resident.
struct SlotCandidate<'a> {
    slot_bytes: u64,
    /// Streamable units larger than the slot.
    larger: &'a [usize],
    /// Streamable units that fit the slot, largest first.
    rest: &'a [usize],
}

impl SlotCandidate<'_> {
    /// The budget this slot size needs before any optional unit is made resident.
    fn base_bytes(&self, units: &[UnitSpec], prefetch_depth: usize, scratch_bytes: u64) -> u64 {
        let pinned =
            units.iter().filter(|unit| unit.always_resident).fold(0u64, |sum, unit| sum.saturating_add(unit.bytes));
        let larger = self.larger.iter().fold(0u64, |sum, &idx| sum.saturating_add(units[idx].bytes));
        let slots = slots_bytes(prefetch_depth.saturating_add(1), self.slot_bytes);
        pinned.saturating_add(larger).saturating_add(slots.max(scratch_bytes))
    }
}

/// The distinct sizes of the streamable units, each a [`SlotCandidate`], largest first.
struct SlotCandidates {
    /// Streamable unit indices by size, largest first, ties by index.
    by_size: Vec<usize>,
    /// Each distinct size with the position in `by_size` of its first unit.
    starts: Vec<(u64, usize)>,
}

impl SlotCandidates {
    fn new(units: &[UnitSpec]) -> Self {
        let mut by_size: Vec<usize> = (0..units.len()).filter(|&idx| !units[idx].always_resident).collect();
        by_size.sort_by_key(|&idx| (Reverse(units[idx].bytes), idx));
        let mut starts: Vec<(u64, usize)> = Vec::new();
        for (position, &idx) in by_size.iter().enumerate() {
            if starts.last().is_none_or(|&(slot_bytes, _)| slot_bytes != units[idx].bytes) {
                starts.push((units[idx].bytes, position));
            }
        }
        SlotCandidates { by_size, starts }
    }

    fn iter(&self) -> impl Iterator<Item = SlotCandidate<'_>> {
        self.starts.iter().map(|&(slot_bytes, start)| SlotCandidate {
            slot_bytes,
            larger: &self.by_size[..start],
            rest: &self.by_size[start..],
        })
    }
}

fn streamable_count(units: &[UnitSpec]) -> usize {
    units.iter().filter(|unit| !unit.always_resident).count()
}

fn total_bytes(units: &[UnitSpec]) -> u64 {
    units.iter().fold(0u64, |sum, unit| sum.saturating_add(unit.bytes))
}

fn slots_bytes(n_slots: usize, slot_bytes: u64) -> u64 {
    u64::try_from(n_slots).unwrap_or(u64::MAX).saturating_mul(slot_bytes)
}
