//! The device pool: byte accounting of unit weights on the device tier against a budget.
//!
//! Every byte of unit weights that lives on the device tier is held through a [`Reservation`], an
//! RAII guard that gives its bytes back when dropped. The pool keeps the current and peak totals
//! and the number of reservations ever made, which is what the memory gate reports and checks.
//!
//! The pool accounts; it does not allocate. On CPU the backend allocates its own tensors and the
//! pool is the budget. A CUDA backend will back each [`Slot`] of a [`SlotPool`] with a real device
//! buffer reserved once, so streaming reuses memory instead of allocating it per unit.

mod slots;

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

pub use slots::{Slot, SlotPool};

use crate::MemoryError;

/// Byte accounting of the device tier, shared between the compute thread and the loader thread.
#[derive(Debug)]
pub struct DevicePool {
    budget_bytes: Option<u64>,
    state: Mutex<PoolState>,
    /// Signalled when bytes are given back or the pool closes.
    changed: Condvar,
}

#[derive(Debug, Default)]
struct PoolState {
    current_bytes: u64,
    peak_bytes: u64,
    n_allocations: u64,
    closed: bool,
}

impl DevicePool {
    /// A pool that holds at most `budget_bytes`, or any amount when `None`.
    pub fn new(budget_bytes: Option<u64>) -> Self {
        DevicePool { budget_bytes, state: Mutex::default(), changed: Condvar::new() }
    }

    /// Reserves `bytes` now, or fails with [`MemoryError::OverBudget`] if they do not fit.
    ///
    /// `label` names what the bytes are for in the error.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64, label: &str) -> Result<Reservation, MemoryError> {
        let mut state = self.lock();
        if state.closed {
            return Err(MemoryError::PoolClosed);
        }
        if !self.fits(&state, bytes) {
            return Err(self.over_budget(&state, bytes, label));
        }
        Ok(self.grant(&mut state, bytes))
    }

    /// Reserves `bytes`, waiting until other reservations give back enough of them.
    ///
    /// Fails at once with [`MemoryError::OverBudget`] if `bytes` exceed the whole budget, and with
    /// [`MemoryError::PoolClosed`] if the pool is closed before or while waiting.
    pub fn reserve_blocking(self: &Arc<Self>, bytes: u64, label: &str) -> Result<Reservation, MemoryError> {
        if self.budget_bytes.is_some_and(|budget| bytes > budget) {
            return Err(self.over_budget(&self.lock(), bytes, label));
        }
        let mut state = self.lock();
        loop {
            if state.closed {
                return Err(MemoryError::PoolClosed);
            }
            if self.fits(&state, bytes) {
                return Ok(self.grant(&mut state, bytes));
            }
            state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Closes the pool: waiting and later reservations fail with [`MemoryError::PoolClosed`].
    /// Existing reservations stay valid and still give their bytes back.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// Whether [`Self::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The budget, or `None` when unlimited.
    pub fn budget_bytes(&self) -> Option<u64> {
        self.budget_bytes
    }

    /// Bytes reserved now.
    pub fn current_bytes(&self) -> u64 {
        self.lock().current_bytes
    }

    /// The largest number of bytes reserved at once since creation or [`Self::reset_peak`].
    pub fn peak_bytes(&self) -> u64 {
        self.lock().peak_bytes
    }

    /// The number of reservations ever granted. Constant while streaming through a [`SlotPool`].
    pub fn n_allocations(&self) -> u64 {
        self.lock().n_allocations
    }

    /// Starts a new peak measurement: the peak becomes the current figure.
    pub fn reset_peak(&self) {
        let mut state = self.lock();
        state.peak_bytes = state.current_bytes;
    }

    fn fits(&self, state: &PoolState, bytes: u64) -> bool {
        let total = state.current_bytes.checked_add(bytes);
        total.is_some_and(|total| self.budget_bytes.is_none_or(|budget| total <= budget))
    }

    fn over_budget(&self, state: &PoolState, bytes: u64, label: &str) -> MemoryError {
        MemoryError::OverBudget {
            label: label.to_owned(),
            requested: bytes,
            current: state.current_bytes,
            budget: self.budget_bytes.unwrap_or(u64::MAX),
        }
    }

    fn grant(self: &Arc<Self>, state: &mut PoolState, bytes: u64) -> Reservation {
        state.current_bytes += bytes;
        state.peak_bytes = state.peak_bytes.max(state.current_bytes);
        state.n_allocations += 1;
        Reservation { pool: Arc::clone(self), bytes }
    }

    fn release(&self, bytes: u64) {
        let mut state = self.lock();
        state.current_bytes -= bytes;
        drop(state);
        self.changed.notify_all();
    }

    /// Locks the state. The state is plain counters that no panic leaves half-written, so a
    /// poisoned lock is still sound to use.
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Bytes held in a [`DevicePool`]; they go back to the pool when this is dropped.
#[derive(Debug)]
#[must_use = "the bytes go back to the pool as soon as the reservation is dropped"]
pub struct Reservation {
    pool: Arc<DevicePool>,
    bytes: u64,
}

impl Reservation {
    /// The number of bytes held.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pool.release(self.bytes);
    }
}
