//! Reusable slots for streamed units: reserved from the device pool once, then handed out and
//! returned, so streaming a pass does not reserve and free a block's worth of budget per block.
//!
//! A slot is the budget unit of one streamed unit in flight. On CPU the backend still allocates
//! the unit's tensors itself; a CUDA backend will back slot `i` with device buffer `i`.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use super::{DevicePool, Reservation};
use crate::MemoryError;

/// A fixed set of equally sized slots, reserved from a [`DevicePool`] when created.
///
/// The reservations go back to the pool when the pool and every [`Slot`] handed out are dropped.
#[derive(Debug)]
pub struct SlotPool {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    slot_bytes: u64,
    /// One reservation per slot, held for the life of the slots.
    reservations: Vec<Reservation>,
    state: Mutex<State>,
    /// Signalled when a slot comes back or the slots close.
    returned: Condvar,
}

#[derive(Debug)]
struct State {
    /// Indices of free slots, used as a stack: slot 0 goes out first, then the latest returned.
    free: Vec<usize>,
    closed: bool,
}

impl SlotPool {
    /// Reserves `n_slots` slots of `slot_bytes` each from `pool`, failing if they do not fit.
    pub fn new(pool: &Arc<DevicePool>, n_slots: usize, slot_bytes: u64) -> Result<Self, MemoryError> {
        let reservations = (0..n_slots)
            .map(|slot_idx| pool.try_reserve(slot_bytes, &format!("streaming slot {slot_idx}")))
            .collect::<Result<Vec<_>, _>>()?;
        let state = State { free: (0..n_slots).rev().collect(), closed: false };
        let shared = Shared { slot_bytes, reservations, state: Mutex::new(state), returned: Condvar::new() };
        Ok(SlotPool { shared: Arc::new(shared) })
    }

    /// The number of slots.
    pub fn n_slots(&self) -> usize {
        self.shared.reservations.len()
    }

    /// The size of each slot.
    pub fn slot_bytes(&self) -> u64 {
        self.shared.slot_bytes
    }

    /// The number of slots not handed out now.
    pub fn n_free(&self) -> usize {
        self.shared.lock().free.len()
    }

    /// A free slot, or `None` if every slot is handed out or the slots are closed.
    pub fn try_acquire(&self) -> Option<Slot> {
        let mut state = self.shared.lock();
        if state.closed {
            return None;
        }
        let slot_idx = state.free.pop()?;
        Some(Slot { shared: Arc::clone(&self.shared), slot_idx })
    }

    /// A free slot, waiting until one is returned; `None` once the slots are closed, or at once
    /// when there are no slots at all.
    pub fn acquire(&self) -> Option<Slot> {
        if self.n_slots() == 0 {
            return None;
        }
        let mut state = self.shared.lock();
        loop {
            if state.closed {
                return None;
            }
            if let Some(slot_idx) = state.free.pop() {
                return Some(Slot { shared: Arc::clone(&self.shared), slot_idx });
            }
            state = self.shared.returned.wait(state).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Closes the slots: waiting and later acquisitions get `None`. Slots handed out stay valid.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.returned.notify_all();
    }

    /// Whether [`Self::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// A second handle to the same slots, for the prefetch worker.
    pub(crate) fn share(&self) -> SlotPool {
        SlotPool { shared: Arc::clone(&self.shared) }
    }
}

/// One slot handed out by a [`SlotPool`]; it returns to the pool when dropped.
#[derive(Debug)]
pub struct Slot {
    shared: Arc<Shared>,
    slot_idx: usize,
}

impl Slot {
    /// Which slot this is, in `0..n_slots`: a backend with real buffers uses buffer `index`.
    pub fn index(&self) -> usize {
        self.slot_idx
    }

    /// The size of the slot.
    pub fn bytes(&self) -> u64 {
        self.shared.slot_bytes
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.lock().free.push(self.slot_idx);
        self.shared.returned.notify_one();
    }
}

impl Shared {
    /// Locks the state. It is a free list that no panic leaves half-written, so a poisoned lock
    /// is still sound to use.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
