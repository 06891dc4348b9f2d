//! Reusable slots for streamed units: each owns a device buffer, allocated once, that every
//! streamed unit of a pass is loaded into in turn.
//!
//! The slots' bytes are reserved from the [`BudgetLedger`] once, when the pool is made, and the
//! buffers are allocated by the loader once, so streaming reserves and allocates nothing per unit.
//! A slot goes back to the free list carrying the consumed fence of the unit that used it (see
//! [`crate::loader`]); the next load into it orders its writes after that fence.
//!
//! The free list and the loading worker's admission (how many units it may start) share one lock
//! and one condition variable, so the worker sleeps until it has both a free slot and leave to
//! load.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::ledger::{BudgetLedger, Reservation};
use crate::loader::{SlotBuffer, UnitLoader};
use crate::{MemoryError, ScheduleError};

/// A fixed set of equally sized slots, each with its own buffer on the device tier.
pub struct SlotPool<L: UnitLoader> {
    shared: Arc<Shared<L>>,
}

struct Shared<L: UnitLoader> {
    slot_bytes: u64,
    n_slots: usize,
    /// One reservation per slot, held for the life of the slots.
    _reservations: Vec<Reservation>,
    state: Mutex<State<L>>,
    /// Units handed out to the caller and not dropped yet, by any prefetcher over these slots.
    held: Arc<AtomicUsize>,
    /// Signalled when a slot comes back, the admission grows, or the slots close.
    changed: Condvar,
}

struct State<L: UnitLoader> {
    /// Free slots, used as a stack: slot 0 goes out first, then the latest returned.
    free: Vec<SlotBuffer<L::Buffer, L::Fence>>,
    /// Units the worker may start loading in total, and units it has started.
    admitted: u64,
    started: u64,
    closed: bool,
}

impl<L: UnitLoader> SlotPool<L> {
    /// Reserves `n_slots` slots of `slot_bytes` each from `ledger`, then has `loader` allocate
    /// their buffers. Fails if they do not fit, or if an allocation fails.
    pub fn new(
        ledger: &Arc<BudgetLedger>,
        loader: &L,
        n_slots: usize,
        slot_bytes: u64,
    ) -> Result<Self, ScheduleError<L::Error>> {
        let reservations = (0..n_slots)
            .map(|slot_idx| ledger.try_reserve(slot_bytes, &format!("streaming slot {slot_idx}")))
            .collect::<Result<Vec<_>, MemoryError>>()?;
        let mut free = Vec::with_capacity(n_slots);
        for slot_idx in (0..n_slots).rev() {
            let buffer = loader.allocate(slot_bytes).map_err(|source| ScheduleError::Allocate {
                what: format!("streaming slot {slot_idx}"),
                bytes: slot_bytes,
                source,
            })?;
            free.push(SlotBuffer::new(slot_idx, slot_bytes, buffer));
        }
        let state = State { free, admitted: 0, started: 0, closed: false };
        let shared = Shared {
            slot_bytes,
            n_slots,
            _reservations: reservations,
            state: Mutex::new(state),
            held: Arc::default(),
            changed: Condvar::new(),
        };
        Ok(SlotPool { shared: Arc::new(shared) })
    }

    /// The number of slots.
    pub fn n_slots(&self) -> usize {
        self.shared.n_slots
    }

    /// The size of each slot.
    pub fn slot_bytes(&self) -> u64 {
        self.shared.slot_bytes
    }

    /// The number of slots not handed out now.
    pub fn n_free(&self) -> usize {
        self.shared.lock().free.len()
    }

    /// A second handle to the same slots.
    pub(crate) fn share(&self) -> SlotPool<L> {
        SlotPool { shared: Arc::clone(&self.shared) }
    }

    /// The count of units the caller holds, shared by every prefetcher over these slots: a unit
    /// kept after its prefetcher is dropped still holds its slot from the next one.
    pub(crate) fn held(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.shared.held)
    }

    /// A free slot now, or `None` if every slot is handed out. Ignores the admission: for loads
    /// on the caller's own thread.
    pub(crate) fn try_take(&self) -> Option<SlotBuffer<L::Buffer, L::Fence>> {
        let mut state = self.shared.lock();
        if state.closed {
            return None;
        }
        state.free.pop()
    }

    /// For the worker: waits until a slot is free and another load is admitted, then takes both.
    /// `None` once the slots are closed.
    pub(crate) fn take_admitted(&self) -> Option<SlotBuffer<L::Buffer, L::Fence>> {
        let mut state = self.shared.lock();
        loop {
            if state.closed {
                return None;
            }
            if state.started < state.admitted
                && let Some(slot) = state.free.pop()
            {
                state.started += 1;
                return Some(slot);
            }
            state = self.shared.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Gives a slot back, with the consumed fence of the unit that used it.
    pub(crate) fn give_back(&self, mut slot: SlotBuffer<L::Buffer, L::Fence>, consumed: L::Fence) {
        slot.release(consumed);
        self.give_back_unused(slot);
    }

    /// Gives back a slot whose load did not produce a unit (a failed load, or one never
    /// delivered): its pending fence, if any, stays with it.
    pub(crate) fn give_back_unused(&self, slot: SlotBuffer<L::Buffer, L::Fence>) {
        self.shared.lock().free.push(slot);
        self.shared.changed.notify_all();
    }

    /// Lets the worker start loads until `total` have been started in all.
    pub(crate) fn admit_until(&self, total: u64) {
        let mut state = self.shared.lock();
        if total > state.admitted {
            state.admitted = total;
            drop(state);
            self.shared.changed.notify_all();
        }
    }

    /// Units admitted so far.
    pub(crate) fn admitted(&self) -> u64 {
        self.shared.lock().admitted
    }

    /// Stops the worker: waiting and later takes get `None`. Slots handed out stay valid.
    pub(crate) fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_all();
    }

    /// Opens the slots again for a new stream, with nothing admitted.
    pub(crate) fn reopen(&self) {
        let mut state = self.shared.lock();
        state.closed = false;
        state.admitted = 0;
        state.started = 0;
    }
}

impl<L: UnitLoader> std::fmt::Debug for SlotPool<L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SlotPool")
            .field("n_slots", &self.n_slots())
            .field("slot_bytes", &self.slot_bytes())
            .field("n_free", &self.n_free())
            .finish()
    }
}

impl<L: UnitLoader> Shared<L> {
    /// Locks the state. It is a free list and two counters that no panic leaves half-written, so
    /// a poisoned lock is still sound to use.
    fn lock(&self) -> MutexGuard<'_, State<L>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
