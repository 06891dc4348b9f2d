//! The prefetch worker thread: takes a free slot, loads the next unit of the cyclic order into
//! it, sends it to the caller, and repeats until the slots close or a load fails.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::UnitLoader;
use crate::pool::{Slot, SlotPool};
use crate::{MemoryError, ScheduleError};

/// A unit loaded (or not) into its slot, on its way to the caller.
pub(super) struct Delivery<L: UnitLoader> {
    pub(super) unit_idx: usize,
    // Declared before the slot, so a unit dropped undelivered frees its memory before its slot.
    pub(super) result: Result<L::Unit, L::Error>,
    pub(super) slot: Slot,
}

/// The caller's side of the worker thread.
pub(super) struct Worker<L: UnitLoader> {
    /// Unbounded: the slots bound what is in flight, and the worker must never block on sending.
    deliveries: Receiver<Delivery<L>>,
    thread: Option<JoinHandle<()>>,
}

impl<L: UnitLoader> Worker<L> {
    pub(super) fn spawn(
        loader: Arc<L>,
        order: Arc<[(usize, u64)]>,
        slots: SlotPool,
        counters: Arc<Counters>,
    ) -> Result<Self, MemoryError> {
        let (sender, deliveries) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("unit-prefetch".to_owned())
            .spawn(move || run(&*loader, &order, &slots, &sender, &counters))
            .map_err(MemoryError::Spawn)?;
        Ok(Worker { deliveries, thread: Some(thread) })
    }

    /// The next delivery in order, waiting for it.
    pub(super) fn receive(&mut self) -> Result<Delivery<L>, ScheduleError<L::Error>> {
        // The worker only hangs up after sending a failed load (which stops the caller first)
        // or when the slots close (which only the caller does), so a hang-up here is a panic.
        self.deliveries.recv().map_err(|_| {
            let message = match self.thread.take().map(JoinHandle::join) {
                Some(Err(payload)) => panic_message(payload.as_ref()),
                _ => "the worker stopped without a reason".to_owned(),
            };
            ScheduleError::WorkerPanicked { message }
        })
    }

    /// Waits for the thread to end; the caller closes the slots first so that it does.
    pub(super) fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            // A panic was already reported by the panic hook, and by `receive` if it was asked.
            let _ = thread.join();
        }
    }
}

/// Load figures, written by whichever thread loads.
#[derive(Debug, Default)]
pub(super) struct Counters {
    units: AtomicU64,
    bytes: AtomicU64,
    load_nanos: AtomicU64,
}

impl Counters {
    /// Loads one unit and counts it if it loaded.
    pub(super) fn load<L: UnitLoader>(&self, loader: &L, unit_idx: usize, bytes: u64) -> Result<L::Unit, L::Error> {
        let started = Instant::now();
        let result = loader.load(unit_idx);
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.load_nanos.fetch_add(nanos, Ordering::Relaxed);
        if result.is_ok() {
            self.units.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        result
    }

    /// Units loaded, their bytes, and the time spent loading.
    pub(super) fn snapshot(&self) -> (u64, u64, Duration) {
        let load_time = Duration::from_nanos(self.load_nanos.load(Ordering::Relaxed));
        (self.units.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed), load_time)
    }
}

fn run<L: UnitLoader>(
    loader: &L,
    order: &[(usize, u64)],
    slots: &SlotPool,
    deliveries: &Sender<Delivery<L>>,
    counters: &Counters,
) {
    for &(unit_idx, bytes) in order.iter().cycle() {
        let Some(slot) = slots.acquire() else {
            return; // The slots closed: the prefetcher is stopping.
        };
        let result = counters.load(loader, unit_idx, bytes);
        let failed = result.is_err();
        if deliveries.send(Delivery { unit_idx, result, slot }).is_err() || failed {
            return;
        }
    }
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(message), _) => (*message).to_owned(),
        (_, Some(message)) => message.clone(),
        _ => "a panic without a message".to_owned(),
    }
}
