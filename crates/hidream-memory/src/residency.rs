//! The residency runtime: one plan's resident set, loaded once, and its streamed units,
//! prefetched pass after pass through reusable slots.
//!
//! [`Residency`] is what every streamed model uses (the transformer's blocks, Llama's and T5's
//! layers): it reserves and loads the resident units at creation, allocates the slots at the
//! first pass that streams, and hands out units through a [`Pass`] in the plan's order.
//!
//! **Recovery.** A pass that ends before its last streamed unit (an error of the loader, of the
//! caller, or of the computation in between) leaves the stream out of step. The next pass then
//! starts a fresh stream from the first unit, with the same slots, so one failure does not spoil
//! the runtime: a later pass is exactly what a fresh runtime would give.
//!
//! **No wasted loads.** The stream loads ahead only within the passes the caller said will come
//! ([`Residency::expect_passes`]), or else to the end of the current pass.

use std::ops::Deref;
use std::sync::Arc;

use crate::ledger::{BudgetLedger, Reservation};
use crate::loader::{SlotBuffer, UnitLoader, accept};
use crate::schedule::{Loaded, PrefetchStats, Prefetcher};
use crate::slots::SlotPool;
use crate::{Plan, ResidencyError, ScheduleError, UnitSpec};

/// A plan's units on the device tier: the resident ones, and a stream of the others.
pub struct Residency<L: UnitLoader> {
    loader: Arc<L>,
    specs: Vec<UnitSpec>,
    plan: Plan,
    ledger: Arc<BudgetLedger>,
    /// The resident units by unit index.
    resident: Vec<Option<ResidentUnit<L>>>,
    /// Allocated at the first pass that streams, then kept until [`Residency::release_slots`].
    slots: Option<SlotPool<L>>,
    stream: Option<Prefetcher<L>>,
    /// Passes said to come, for a stream not started yet.
    expected_passes: u64,
    /// Whether the last pass ended before its last streamed unit.
    out_of_step: bool,
    /// Figures of streams already dropped.
    past_stats: PrefetchStats,
    streams_started: u64,
}

/// A resident unit with the buffer it lives in and the bytes it holds in the ledger.
struct ResidentUnit<L: UnitLoader> {
    // Fields drop in order: the unit (views into the buffer), the buffer, then the reservation.
    unit: L::Unit,
    _buffer: SlotBuffer<L::Buffer, L::Fence>,
    _reservation: Reservation,
}

impl<L: UnitLoader> Residency<L> {
    /// Reserves the plan's resident units in `ledger` and loads each into a buffer of its own.
    ///
    /// `specs` are the units the plan was made from, in execution order.
    pub fn new(
        loader: Arc<L>,
        specs: &[UnitSpec],
        plan: Plan,
        ledger: Arc<BudgetLedger>,
    ) -> Result<Self, ScheduleError<L::Error>> {
        let n_units = specs.len();
        let mut resident: Vec<Option<ResidentUnit<L>>> = (0..n_units).map(|_| None).collect();
        for &unit_idx in plan.resident() {
            let spec = specs.get(unit_idx).ok_or(ResidencyError::NotInPlan { unit_idx, n_units })?;
            let reservation = ledger.try_reserve(spec.bytes, &format!("resident unit {unit_idx}"))?;
            let buffer = loader.allocate(spec.bytes).map_err(|source| ScheduleError::Allocate {
                what: format!("resident unit {unit_idx}"),
                bytes: spec.bytes,
                source,
            })?;
            let mut buffer = SlotBuffer::new(usize::MAX, spec.bytes, buffer);
            let unit = accept(&*loader, unit_idx, spec.bytes, loader.load_into(unit_idx, &mut buffer))?;
            resident[unit_idx] = Some(ResidentUnit { unit, _buffer: buffer, _reservation: reservation });
        }
        Ok(Residency {
            loader,
            specs: specs.to_vec(),
            plan,
            ledger,
            resident,
            slots: None,
            stream: None,
            expected_passes: 0,
            out_of_step: false,
            past_stats: PrefetchStats::default(),
            streams_started: 0,
        })
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn loader(&self) -> &Arc<L> {
        &self.loader
    }

    /// The budget ledger the resident units and the slots are reserved in.
    pub fn ledger(&self) -> &Arc<BudgetLedger> {
        &self.ledger
    }

    /// A resident unit, or `None` if `unit_idx` streams.
    pub fn resident(&self, unit_idx: usize) -> Option<&L::Unit> {
        self.resident.get(unit_idx)?.as_ref().map(|resident| &resident.unit)
    }

    /// Loading figures over the runtime's life.
    pub fn stats(&self) -> PrefetchStats {
        let mut stats = self.past_stats;
        if let Some(stream) = &self.stream {
            stats.add(&stream.stats());
        }
        stats
    }

    /// How many streams were started: one, plus one per recovery or [`Self::release_slots`].
    pub fn streams_started(&self) -> u64 {
        self.streams_started
    }

    /// Says that `n_passes` passes will run from now (counting one under way): the stream may load
    /// ahead across their boundaries, and never past the last of them.
    pub fn expect_passes(&mut self, n_passes: u64) {
        match &self.stream {
            Some(stream) if !self.out_of_step => stream.expect_passes(n_passes),
            _ => self.expected_passes = n_passes,
        }
    }

    /// Begins a pass: units are then asked for in execution order through [`Pass::unit`].
    pub fn pass(&mut self) -> Result<Pass<'_, L>, ScheduleError<L::Error>> {
        if self.out_of_step {
            self.drop_stream();
            self.out_of_step = false;
        }
        if !self.plan.streamed().is_empty() && self.stream.is_none() {
            self.start_stream()?;
        }
        Ok(Pass { residency: self, position: 0, failed: false })
    }

    /// Stops the stream and frees the slots, so that other work can use their room (see
    /// [`Plan::budget_with_scratch`]); the next pass allocates them again.
    pub fn release_slots(&mut self) {
        self.drop_stream();
        self.slots = None;
    }

    fn start_stream(&mut self) -> Result<(), ScheduleError<L::Error>> {
        let slots = match self.slots.take() {
            Some(slots) => slots,
            None => SlotPool::new(&self.ledger, &*self.loader, self.plan.n_slots(), self.plan.slot_bytes())?,
        };
        let stream = Prefetcher::new(Arc::clone(&self.loader), &self.specs, self.plan.streamed(), &slots);
        self.slots = Some(slots);
        let stream = stream?;
        if self.expected_passes > 0 {
            stream.expect_passes(self.expected_passes);
            self.expected_passes = 0;
        }
        self.stream = Some(stream);
        self.streams_started += 1;
        Ok(())
    }

    fn drop_stream(&mut self) {
        if let Some(stream) = self.stream.take() {
            self.past_stats.add(&stream.stats());
        }
    }
}

impl<L: UnitLoader> std::fmt::Debug for Residency<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Residency").field("plan", &self.plan).field("stream", &self.stream).finish_non_exhaustive()
    }
}

/// One pass over a [`Residency`]'s units. Dropping it before its last streamed unit (after an
/// error, say) makes the next pass start a fresh stream.
pub struct Pass<'r, L: UnitLoader> {
    residency: &'r mut Residency<L>,
    /// Streamed units handed out in this pass.
    position: usize,
    failed: bool,
}

impl<L: UnitLoader> Pass<'_, L> {
    /// Unit `unit_idx`: a resident unit by reference, or the next streamed unit, which must be
    /// `unit_idx` (streamed units come in the plan's order).
    pub fn unit(&mut self, unit_idx: usize) -> Result<UnitRef<'_, L>, ScheduleError<L::Error>> {
        // Marked failed until the unit is in hand, so that any early return counts as a failure.
        self.failed = true;
        self.fetch(unit_idx)
    }

    /// Streamed units still to come in this pass.
    pub fn remaining(&self) -> usize {
        self.residency.plan.streamed().len() - self.position
    }

    fn fetch(&mut self, unit_idx: usize) -> Result<UnitRef<'_, L>, ScheduleError<L::Error>> {
        let n_units = self.residency.specs.len();
        if unit_idx >= n_units {
            return Err(ResidencyError::NotInPlan { unit_idx, n_units }.into());
        }
        if let Some(resident) = &self.residency.resident[unit_idx] {
            self.failed = false;
            return Ok(UnitRef::Resident(&resident.unit));
        }
        let streamed = self.residency.plan.streamed();
        let Some(&expected) = streamed.get(self.position) else {
            return Err(ResidencyError::PassComplete { pass_len: streamed.len() }.into());
        };
        if unit_idx != expected {
            return Err(ResidencyError::OutOfOrder { requested: unit_idx, expected }.into());
        }
        let stream = self.residency.stream.as_mut().ok_or(ResidencyError::Stopped)?;
        let loaded = stream.next()?;
        self.position += 1;
        self.failed = false;
        Ok(UnitRef::Streamed(loaded))
    }
}

impl<L: UnitLoader> Drop for Pass<'_, L> {
    fn drop(&mut self) {
        let complete = self.position == self.residency.plan.streamed().len();
        if self.failed || (self.position > 0 && !complete) {
            self.residency.out_of_step = true;
        }
    }
}

/// A unit of a pass: resident (borrowed) or streamed (holding its slot until dropped).
pub enum UnitRef<'a, L: UnitLoader> {
    Resident(&'a L::Unit),
    Streamed(Loaded<L>),
}

impl<L: UnitLoader> Deref for UnitRef<'_, L> {
    type Target = L::Unit;

    fn deref(&self) -> &L::Unit {
        match self {
            UnitRef::Resident(unit) => unit,
            UnitRef::Streamed(loaded) => loaded,
        }
    }
}
