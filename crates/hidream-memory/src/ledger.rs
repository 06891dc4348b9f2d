//! The budget ledger: byte accounting of unit weights on the device tier against a budget.
//!
//! Every byte of unit weights that lives on the device tier is held through a [`Reservation`], an
//! RAII guard that gives its bytes back when dropped. The ledger keeps the current and peak totals
//! and the number of reservations ever made, which is what the memory gate reports and checks.
//!
//! The ledger accounts; it does not allocate. The buffers behind the reservations are allocated
//! by the [`UnitLoader`](crate::UnitLoader): one per resident unit and one per streaming slot
//! ([`SlotPool`](crate::SlotPool)), each reserved here first. Its figures are therefore the
//! planned weight bytes, not a measurement of memory: on the CPU the heap peak is measured
//! separately ([`CountingAllocator`](crate::CountingAllocator)).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use crate::MemoryError;

/// Byte accounting of the device tier against a budget, shared between the compute thread and
/// the loader thread.
#[derive(Debug)]
pub struct BudgetLedger {
    budget_bytes: Option<u64>,
    state: Mutex<LedgerState>,
    /// Signalled when bytes are given back or the ledger closes.
    changed: Condvar,
}

#[derive(Debug, Default)]
struct LedgerState {
    current_bytes: u64,
    peak_bytes: u64,
    n_allocations: u64,
    closed: bool,
}

impl BudgetLedger {
    /// A ledger that holds at most `budget_bytes`, or any amount when `None`.
    pub fn new(budget_bytes: Option<u64>) -> Self {
        BudgetLedger { budget_bytes, state: Mutex::default(), changed: Condvar::new() }
    }

    /// Reserves `bytes` now, or fails with [`MemoryError::OverBudget`] if they do not fit.
    ///
    /// `label` names what the bytes are for in the error.
    pub fn try_reserve(self: &Arc<Self>, bytes: u64, label: &str) -> Result<Reservation, MemoryError> {
        let mut state = self.lock();
        if state.closed {
            return Err(MemoryError::LedgerClosed);
        }
        if !self.fits(&state, bytes) {
            return Err(self.over_budget(&state, bytes, label));
        }
        Ok(self.grant(&mut state, bytes))
    }

    /// Reserves `bytes`, waiting until other reservations give back enough of them.
    ///
    /// Fails at once with [`MemoryError::OverBudget`] if `bytes` exceed the whole budget, and with
    /// [`MemoryError::LedgerClosed`] if the ledger is closed before or while waiting.
    pub fn reserve_blocking(self: &Arc<Self>, bytes: u64, label: &str) -> Result<Reservation, MemoryError> {
        if self.budget_bytes.is_some_and(|budget| bytes > budget) {
            return Err(self.over_budget(&self.lock(), bytes, label));
        }
        let mut state = self.lock();
        loop {
            if state.closed {
                return Err(MemoryError::LedgerClosed);
            }
            if self.fits(&state, bytes) {
                return Ok(self.grant(&mut state, bytes));
            }
            state = self.changed.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Closes the ledger: waiting and later reservations fail with [`MemoryError::LedgerClosed`].
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

    /// The number of reservations ever granted. Constant while streaming through a
    /// [`SlotPool`](crate::SlotPool).
    pub fn n_allocations(&self) -> u64 {
        self.lock().n_allocations
    }

    /// Starts a new peak measurement: the peak becomes the current figure.
    pub fn reset_peak(&self) {
        let mut state = self.lock();
        state.peak_bytes = state.current_bytes;
    }

    fn fits(&self, state: &LedgerState, bytes: u64) -> bool {
        let total = state.current_bytes.checked_add(bytes);
        total.is_some_and(|total| self.budget_bytes.is_none_or(|budget| total <= budget))
    }

    fn over_budget(&self, state: &LedgerState, bytes: u64, label: &str) -> MemoryError {
        MemoryError::OverBudget {
            label: label.to_owned(),
            requested: bytes,
            current: state.current_bytes,
            budget: self.budget_bytes.unwrap_or(u64::MAX),
        }
    }

    fn grant(self: &Arc<Self>, state: &mut LedgerState, bytes: u64) -> Reservation {
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
    fn lock(&self) -> MutexGuard<'_, LedgerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Bytes held in a [`BudgetLedger`]; they go back to the ledger when this is dropped.
#[derive(Debug)]
#[must_use = "the bytes go back to the ledger as soon as the reservation is dropped"]
pub struct Reservation {
    pool: Arc<BudgetLedger>,
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
