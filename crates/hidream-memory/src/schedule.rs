//! The scheduler: streamed units handed out in a fixed cyclic order, loaded ahead on a worker.
//!
//! A [`Prefetcher`] walks the streamed units of a pass in order, and after the last one starts
//! the next pass, so the first units of the next step load while the current step ends. A
//! background worker keeps up to `prefetch_depth` units loading ahead of the one the caller
//! computes with. Every unit occupies a [`Slot`] from the moment it starts loading until the
//! caller drops it, so at most `prefetch_depth + 1` streamed units are ever alive: the bound is
//! the slots, not a channel capacity. Depth 0 loads on the caller's thread, with no worker.

mod worker;

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::pool::{DevicePool, Slot, SlotPool};
use crate::{MemoryError, Plan, ScheduleError, UnitSpec};
use worker::{Counters, Delivery, Worker};

/// Loads one unit onto the device tier. Implemented outside this crate, for instance by reading
/// a unit's tensors from a checkpoint.
pub trait UnitLoader: Send + Sync + 'static {
    /// A loaded unit, such as a transformer block's weights.
    type Unit: Send + 'static;
    /// Why a unit could not be loaded.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Loads unit `unit_idx` (an index into the `UnitSpec` list) onto the device tier.
    fn load(&self, unit_idx: usize) -> Result<Self::Unit, Self::Error>;
}

/// Hands out streamed units in order, pass after pass, loading the next ones in the background.
///
/// Dropping it stops and joins the worker, whatever state it is in; units the caller still holds
/// stay valid and free their slots when dropped.
pub struct Prefetcher<L: UnitLoader> {
    loader: Arc<L>,
    /// Unit index and bytes of each streamed unit, in the order of one pass.
    order: Arc<[(usize, u64)]>,
    slots: SlotPool,
    /// `None` for depth 0: units load on the caller's thread.
    worker: Option<Worker<L>>,
    /// Units handed out so far; the next one is `order[delivered % order.len()]`.
    delivered: u64,
    bytes_delivered: u64,
    stall_time: Duration,
    /// Units the caller holds now.
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
    /// Time spent inside [`UnitLoader::load`].
    pub load_time: Duration,
    /// Units handed out by [`Prefetcher::next`]: deterministic, unlike `units_loaded`.
    pub units_delivered: u64,
    /// Bytes of the units handed out.
    pub bytes_delivered: u64,
    /// Time the caller waited inside [`Prefetcher::next`]: the part of loading not hidden by compute.
    pub stall_time: Duration,
}

impl<L: UnitLoader> Prefetcher<L> {
    /// Streams `order` (indices into `units`, in the order one pass uses them) through `slots`,
    /// which must hold `prefetch_depth + 1` slots, each large enough for every unit in `order`.
    pub fn new(
        loader: Arc<L>,
        units: &[UnitSpec],
        order: &[usize],
        prefetch_depth: usize,
        slots: SlotPool,
    ) -> Result<Self, MemoryError> {
        if order.is_empty() {
            return Err(MemoryError::NothingToStream);
        }
        if slots.n_slots() != prefetch_depth.saturating_add(1) {
            return Err(MemoryError::SlotCount { n_slots: slots.n_slots(), prefetch_depth });
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
        let counters = Arc::new(Counters::default());
        let worker = match prefetch_depth {
            0 => None,
            _ => Some(Worker::spawn(Arc::clone(&loader), Arc::clone(&order), slots.share(), Arc::clone(&counters))?),
        };
        Ok(Prefetcher {
            loader,
            order,
            slots,
            worker,
            delivered: 0,
            bytes_delivered: 0,
            stall_time: Duration::ZERO,
            held: Arc::new(AtomicUsize::new(0)),
            counters,
            stopped: false,
        })
    }

    /// Streams the plan's streamed units through slots reserved from `pool`.
    pub fn from_plan(
        loader: Arc<L>,
        units: &[UnitSpec],
        plan: &Plan,
        pool: &Arc<DevicePool>,
    ) -> Result<Self, MemoryError> {
        if plan.streamed().is_empty() {
            return Err(MemoryError::NothingToStream);
        }
        let slots = SlotPool::new(pool, plan.n_slots(), plan.slot_bytes())?;
        Prefetcher::new(loader, units, plan.streamed(), plan.prefetch_depth(), slots)
    }

    /// The next unit in order, waiting until it is loaded.
    ///
    /// A load error arrives on the call that would have returned that unit, and a panic of the
    /// loader as [`ScheduleError::WorkerPanicked`] (at depth 0 the loader runs on this thread, so
    /// it panics here). After either, the prefetcher is stopped and every later call returns
    /// [`ScheduleError::Stopped`]. Asking for a unit while holding every slot returns
    /// [`ScheduleError::AllSlotsHeld`] instead of waiting forever, and does not stop anything.
    #[allow(clippy::should_implement_trait)] // Not an `Iterator`: it never ends, and fails instead.
    pub fn next(&mut self) -> Result<Loaded<L::Unit>, ScheduleError<L::Error>> {
        if self.stopped {
            return Err(ScheduleError::Stopped);
        }
        let n_slots = self.slots.n_slots();
        if self.held.load(Ordering::Acquire) >= n_slots {
            return Err(ScheduleError::AllSlotsHeld { n_slots });
        }
        let started = Instant::now();
        let delivery = match &mut self.worker {
            Some(worker) => worker.receive(),
            None => self.load_here(),
        };
        self.stall_time += started.elapsed();
        let result = delivery.and_then(|Delivery { unit_idx, result, slot }| match result {
            Ok(unit) => Ok((unit_idx, unit, slot)),
            Err(source) => Err(ScheduleError::Load { unit_idx, source }),
        });
        let (unit_idx, unit, slot) = result.inspect_err(|error| {
            if !matches!(error, ScheduleError::AllSlotsHeld { .. }) {
                self.stop();
            }
        })?;
        let (expected_idx, bytes) = self.order[self.pass_position()];
        debug_assert_eq!(unit_idx, expected_idx, "units arrive in order");
        self.delivered += 1;
        self.bytes_delivered += bytes;
        Ok(Loaded { unit, unit_idx, _slot: slot, _held: HeldGuard::new(&self.held) })
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
        self.slots.n_slots() - 1
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

    /// Depth 0: loads the next unit on this thread, into the only slot.
    fn load_here(&self) -> Result<Delivery<L>, ScheduleError<L::Error>> {
        let n_slots = self.slots.n_slots();
        let slot = self.slots.try_acquire().ok_or(ScheduleError::AllSlotsHeld { n_slots })?;
        let (unit_idx, bytes) = self.order[self.pass_position()];
        Ok(Delivery { unit_idx, result: self.counters.load(&*self.loader, unit_idx, bytes), slot })
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

/// A streamed unit handed out by [`Prefetcher::next`]. It dereferences to the unit and holds the
/// unit's slot; dropping it frees the slot for the next unit to load.
#[derive(Debug)]
#[must_use = "dropping a loaded unit frees its slot at once"]
pub struct Loaded<U> {
    // Fields drop in order: the unit, then its slot, then the count of held units.
    unit: U,
    unit_idx: usize,
    _slot: Slot,
    _held: HeldGuard,
}

impl<U> Loaded<U> {
    /// The unit's index in the `UnitSpec` list.
    pub fn unit_idx(&self) -> usize {
        self.unit_idx
    }
}

impl<U> Deref for Loaded<U> {
    type Target = U;

    fn deref(&self) -> &U {
        &self.unit
    }
}

impl<U> DerefMut for Loaded<U> {
    fn deref_mut(&mut self) -> &mut U {
        &mut self.unit
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
