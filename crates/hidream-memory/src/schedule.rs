//! The scheduler: streamed units handed out in a fixed cyclic order, loaded ahead on a worker.
//!
//! A [`Prefetcher`] walks the streamed units of a pass in order, and after the last one starts
//! the next pass, so the first units of the next step can load while the current step ends. A
//! background worker loads ahead of the unit the caller computes with, into the free slots of a
//! [`SlotPool`], so at most `n_slots` streamed units are ever alive: the bound is the slots, not
//! a channel capacity. With one slot (depth 0) units load on the caller's thread, with no worker.
//!
//! The worker loads only what it is admitted to: the rest of the current pass, or as many passes
//! as the caller said will come ([`Prefetcher::expect_passes`]). So at the end of a run no unit is
//! loaded for a pass that never comes, and dropping the prefetcher waits for nothing but a load
//! already under way.

mod worker;

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::loader::{SlotBuffer, UnitLoader, accept};
use crate::slots::SlotPool;
use crate::{MemoryError, ResidencyError, ScheduleError, UnitSpec};
use worker::{Counters, Delivery, SlotLease, Worker};

/// Hands out streamed units in order, pass after pass, loading the next ones in the background.
///
/// Dropping it stops and joins the worker; units the caller still holds stay valid and give
/// their slots back when dropped.
pub struct Prefetcher<L: UnitLoader> {
    loader: Arc<L>,
    /// Unit index and bytes of each streamed unit, in the order of one pass.
    order: Arc<[(usize, u64)]>,
    slots: SlotPool<L>,
    /// `None` with one slot: units load on the caller's thread.
    worker: Option<Worker<L>>,
    /// Units handed out so far; the next one is `order[delivered % order.len()]`.
    delivered: u64,
    bytes_delivered: u64,
    stall_time: Duration,
    /// Units the caller holds now, from this stream or an earlier one over the same slots.
    held: Arc<AtomicUsize>,
    counters: Arc<Counters>,
    stopped: bool,
}

/// Figures of a [`Prefetcher`] since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchStats {
    /// Units loaded, including those loaded ahead and not handed out yet.
    pub units_loaded: u64,
    /// Bytes of the units loaded.
    pub bytes_loaded: u64,
    /// Time spent inside [`UnitLoader::load_into`].
    pub load_time: Duration,
    /// Units handed out by [`Prefetcher::next`]: deterministic, unlike `units_loaded`.
    pub units_delivered: u64,
    /// Bytes of the units handed out.
    pub bytes_delivered: u64,
    /// Time the caller waited inside [`Prefetcher::next`]: the part of loading not hidden by compute.
    pub stall_time: Duration,
}

impl PrefetchStats {
    /// Adds `more` to these figures.
    pub fn add(&mut self, more: &PrefetchStats) {
        self.units_loaded += more.units_loaded;
        self.bytes_loaded += more.bytes_loaded;
        self.load_time += more.load_time;
        self.units_delivered += more.units_delivered;
        self.bytes_delivered += more.bytes_delivered;
        self.stall_time += more.stall_time;
    }
}

impl<L: UnitLoader> Prefetcher<L> {
    /// Streams `order` (indices into `units`, in the order one pass uses them) through `slots`,
    /// loading up to `slots.n_slots() - 1` units ahead. Every unit in `order` must fit a slot. The
    /// slots must not be in use by another prefetcher.
    pub fn new(loader: Arc<L>, units: &[UnitSpec], order: &[usize], slots: &SlotPool<L>) -> Result<Self, MemoryError> {
        if order.is_empty() {
            return Err(MemoryError::NothingToStream);
        }
        let order = order
            .iter()
            .map(|&unit_idx| {
                let unit = units.get(unit_idx).ok_or(MemoryError::UnitOutOfRange { unit_idx, n_units: units.len() })?;
                if unit.bytes > slots.slot_bytes() {
                    return Err(MemoryError::UnitLargerThanSlot {
                        unit_idx,
                        unit_bytes: unit.bytes,
                        slot_bytes: slots.slot_bytes(),
                    });
                }
                Ok((unit_idx, unit.bytes))
            })
            .collect::<Result<Arc<[_]>, _>>()?;
        let slots = slots.share();
        slots.reopen();
        let counters = Arc::new(Counters::default());
        let worker = match slots.n_slots() {
            0 | 1 => None,
            _ => Some(Worker::spawn(Arc::clone(&loader), Arc::clone(&order), slots.share(), Arc::clone(&counters))?),
        };
        let held = slots.held();
        Ok(Prefetcher {
            loader,
            order,
            slots,
            worker,
            delivered: 0,
            bytes_delivered: 0,
            stall_time: Duration::ZERO,
            // Shared with the slots, not fresh: units kept from an earlier stream still hold slots.
            held,
            counters,
            stopped: false,
        })
    }

    /// Says that `n_passes` passes will be taken from now, counting the current one if it has
    /// begun: the worker may load ahead up to the end of the last of them, and no further.
    /// Without it, the worker loads only to the end of the pass the caller is in.
    pub fn expect_passes(&self, n_passes: u64) {
        let len = self.order.len() as u64;
        let pass_start = self.delivered - self.delivered % len;
        self.slots.admit_until(pass_start.saturating_add(n_passes.saturating_mul(len)));
    }

    /// The next unit in order, waiting until it is loaded.
    ///
    /// A load error arrives on the call that would have returned that unit, and a panic of the
    /// loader as [`ResidencyError::WorkerPanicked`] (with one slot the loader runs on this thread,
    /// so it panics here). After either, the prefetcher is stopped and every later call returns
    /// [`ResidencyError::Stopped`]. Asking for a unit while holding every slot returns
    /// [`ResidencyError::AllSlotsHeld`] instead of waiting forever, and stops nothing.
    #[allow(clippy::should_implement_trait)] // Not an `Iterator`: it never ends, and fails instead.
    pub fn next(&mut self) -> Result<Loaded<L>, ScheduleError<L::Error>> {
        if self.stopped {
            return Err(ResidencyError::Stopped.into());
        }
        let n_slots = self.slots.n_slots();
        if self.held.load(Ordering::Acquire) >= n_slots {
            return Err(ResidencyError::AllSlotsHeld { n_slots }.into());
        }
        if self.delivered >= self.slots.admitted() {
            self.expect_passes(1);
        }
        let started = Instant::now();
        let result = match &mut self.worker {
            Some(worker) => worker.receive(),
            None => self.load_here(),
        }
        .and_then(|delivery| self.check(delivery));
        self.stall_time += started.elapsed();
        let (unit_idx, unit, lease) = result.inspect_err(|error| {
            if !matches!(error, ScheduleError::Residency(ResidencyError::AllSlotsHeld { .. })) {
                self.stop();
            }
        })?;
        self.bytes_delivered += self.order[self.pass_position()].1;
        self.delivered += 1;
        let held = HeldGuard::new(&self.held);
        Ok(Loaded { unit: Some(unit), unit_idx, lease, loader: Arc::clone(&self.loader), _held: held })
    }

    /// The index in the pass of the unit the next call to [`Self::next`] returns.
    pub fn pass_position(&self) -> usize {
        (self.delivered % self.order.len() as u64) as usize
    }

    /// Complete passes handed out so far.
    pub fn passes_completed(&self) -> u64 {
        self.delivered / self.order.len() as u64
    }

    /// The number of streamed units in a pass.
    pub fn pass_len(&self) -> usize {
        self.order.len()
    }

    /// How many units load ahead of the one the caller holds.
    pub fn prefetch_depth(&self) -> usize {
        self.slots.n_slots().saturating_sub(1)
    }

    /// Figures since creation.
    pub fn stats(&self) -> PrefetchStats {
        let (units_loaded, bytes_loaded, load_time) = self.counters.snapshot();
        PrefetchStats {
            units_loaded,
            bytes_loaded,
            load_time,
            units_delivered: self.delivered,
            bytes_delivered: self.bytes_delivered,
            stall_time: self.stall_time,
        }
    }

    /// One slot: loads the next unit on this thread, into the only slot.
    fn load_here(&self) -> Result<Delivery<L>, ScheduleError<L::Error>> {
        let n_slots = self.slots.n_slots();
        let slot = self.slots.try_take().ok_or(ResidencyError::AllSlotsHeld { n_slots })?;
        let mut lease = SlotLease::new(slot, self.slots.share());
        let (unit_idx, bytes) = self.order[self.pass_position()];
        let result = self.counters.load(&*self.loader, unit_idx, bytes, lease.slot_mut());
        Ok(Delivery { unit_idx, result, lease })
    }

    /// Checks a delivery's size and waits for its ready fence.
    #[allow(clippy::type_complexity)]
    fn check(&self, delivery: Delivery<L>) -> Result<(usize, L::Unit, SlotLease<L>), ScheduleError<L::Error>> {
        let Delivery { unit_idx, result, lease } = delivery;
        let (expected_idx, planned) = self.order[self.pass_position()];
        debug_assert_eq!(unit_idx, expected_idx, "units arrive in order");
        let unit = accept(&*self.loader, unit_idx, planned, result)?;
        Ok((unit_idx, unit, lease))
    }

    fn stop(&mut self) {
        self.stopped = true;
        self.slots.close();
        if let Some(worker) = &mut self.worker {
            worker.join();
        }
    }
}

impl<L: UnitLoader> Drop for Prefetcher<L> {
    fn drop(&mut self) {
        self.stop();
    }
}

impl<L: UnitLoader> std::fmt::Debug for Prefetcher<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prefetcher")
            .field("pass_len", &self.order.len())
            .field("delivered", &self.delivered)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

/// A streamed unit handed out by [`Prefetcher::next`]. It dereferences to the unit and holds the
/// unit's slot; dropping it records the consumed fence and gives the slot back for the next load.
#[must_use = "dropping a loaded unit frees its slot at once"]
pub struct Loaded<L: UnitLoader> {
    /// `Some` until dropped: the unit goes before its slot is given back.
    unit: Option<L::Unit>,
    unit_idx: usize,
    lease: SlotLease<L>,
    loader: Arc<L>,
    _held: HeldGuard,
}

impl<L: UnitLoader> Loaded<L> {
    /// The unit's index in the `UnitSpec` list.
    pub fn unit_idx(&self) -> usize {
        self.unit_idx
    }

    /// The slot the unit was loaded into.
    pub fn slot(&self) -> &SlotBuffer<L::Buffer, L::Fence> {
        self.lease.slot()
    }
}

impl<L: UnitLoader> Deref for Loaded<L> {
    type Target = L::Unit;

    fn deref(&self) -> &L::Unit {
        self.unit.as_ref().expect("a loaded unit holds its unit until dropped")
    }
}

impl<L: UnitLoader> Drop for Loaded<L> {
    fn drop(&mut self) {
        self.unit = None;
        self.lease.give_back(self.loader.record_consumed());
    }
}

impl<L: UnitLoader> std::fmt::Debug for Loaded<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded").field("unit_idx", &self.unit_idx).field("slot", &self.slot().index()).finish()
    }
}

/// Counts a unit as held by the caller while it lives.
#[derive(Debug)]
struct HeldGuard(Arc<AtomicUsize>);

impl HeldGuard {
    fn new(held: &Arc<AtomicUsize>) -> Self {
        held.fetch_add(1, Ordering::AcqRel);
        HeldGuard(Arc::clone(held))
    }
}

impl Drop for HeldGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
