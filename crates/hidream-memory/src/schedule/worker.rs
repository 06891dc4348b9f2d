//! The prefetch worker thread: takes a free slot once a load is admitted, loads the next unit of
//! the cyclic order into it, sends it to the caller, and repeats until the slots close or a load
//! fails.

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::loader::{Ready, SlotBuffer, UnitLoader};
use crate::slots::SlotPool;
use crate::{MemoryError, ResidencyError, ScheduleError};

/// A slot taken from the pool; it goes back when dropped, with a consumed fence if one is given.
pub(crate) struct SlotLease<L: UnitLoader> {
    slot: Option<SlotBuffer<L::Buffer, L::Fence>>,
    slots: SlotPool<L>,
}

impl<L: UnitLoader> SlotLease<L> {
    pub(crate) fn new(slot: SlotBuffer<L::Buffer, L::Fence>, slots: SlotPool<L>) -> Self {
        SlotLease { slot: Some(slot), slots }
    }

    pub(crate) fn slot(&self) -> &SlotBuffer<L::Buffer, L::Fence> {
        self.slot.as_ref().expect("a lease holds its slot until it is given back")
    }

    pub(crate) fn slot_mut(&mut self) -> &mut SlotBuffer<L::Buffer, L::Fence> {
        self.slot.as_mut().expect("a lease holds its slot until it is given back")
    }

    /// Gives the slot back after its unit was used, once `consumed` completes.
    pub(crate) fn give_back(&mut self, consumed: L::Fence) {
        if let Some(slot) = self.slot.take() {
            self.slots.give_back(slot, consumed);
        }
    }
}

impl<L: UnitLoader> Drop for SlotLease<L> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.slots.give_back_unused(slot);
        }
    }
}

/// A unit loaded (or not) into its slot, on its way to the caller.
pub(crate) struct Delivery<L: UnitLoader> {
    pub(crate) unit_idx: usize,
    // Declared before the lease, so a unit dropped undelivered goes before its slot is given back.
    pub(crate) result: Result<Ready<L::Unit, L::Fence>, L::Error>,
    pub(crate) lease: SlotLease<L>,
}

/// The caller's side of the worker thread.
pub(crate) struct Worker<L: UnitLoader> {
    /// Unbounded: the slots bound what is in flight, and the worker must never block on sending.
    deliveries: Option<Receiver<Delivery<L>>>,
    thread: Option<JoinHandle<()>>,
}

impl<L: UnitLoader> Worker<L> {
    pub(crate) fn spawn(
        loader: Arc<L>,
        order: Arc<[(usize, u64)]>,
        slots: SlotPool<L>,
        counters: Arc<Counters>,
    ) -> Result<Self, MemoryError> {
        let (sender, deliveries) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("unit-prefetch".to_owned())
            .spawn(move || run(&*loader, &order, &slots, &sender, &counters))
            .map_err(MemoryError::Spawn)?;
        Ok(Worker { deliveries: Some(deliveries), thread: Some(thread) })
    }

    /// The next delivery in order, waiting for it.
    pub(crate) fn receive(&mut self) -> Result<Delivery<L>, ScheduleError<L::Error>> {
        // The worker only hangs up after sending a failed load (which stops the caller first)
        // or when the slots close (which only the caller does), so a hang-up here is a panic.
        let received = self.deliveries.as_ref().and_then(|deliveries| deliveries.recv().ok());
        received.ok_or_else(|| {
            let message = match self.thread.take().map(JoinHandle::join) {
                Some(Err(payload)) => panic_message(payload.as_ref()),
                _ => "the worker stopped without a reason".to_owned(),
            };
            ResidencyError::WorkerPanicked { message }.into()
        })
    }

    /// Waits for the thread to end (the caller closes the slots first, so that it does), then
    /// drops what it loaded ahead, which gives those slots back.
    pub(crate) fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            // A panic was already reported by the panic hook, and by `receive` if it was asked.
            let _ = thread.join();
        }
        self.deliveries = None;
    }
}

/// Load figures, written by whichever thread loads.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    units: AtomicU64,
    bytes: AtomicU64,
    load_nanos: AtomicU64,
}

impl Counters {
    /// Loads one unit into `slot` and counts it if it loaded.
    pub(crate) fn load<L: UnitLoader>(
        &self,
        loader: &L,
        unit_idx: usize,
        bytes: u64,
        slot: &mut SlotBuffer<L::Buffer, L::Fence>,
    ) -> Result<Ready<L::Unit, L::Fence>, L::Error> {
        let started = Instant::now();
        let result = loader.load_into(unit_idx, slot);
        let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.load_nanos.fetch_add(nanos, Ordering::Relaxed);
        if result.is_ok() {
            self.units.fetch_add(1, Ordering::Relaxed);
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        result
    }

    /// Units loaded, their bytes, and the time spent loading.
    pub(crate) fn snapshot(&self) -> (u64, u64, Duration) {
        let load_time = Duration::from_nanos(self.load_nanos.load(Ordering::Relaxed));
        (self.units.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed), load_time)
    }
}

fn run<L: UnitLoader>(
    loader: &L,
    order: &[(usize, u64)],
    slots: &SlotPool<L>,
    deliveries: &Sender<Delivery<L>>,
    counters: &Counters,
) {
    for &(unit_idx, bytes) in order.iter().cycle() {
        let Some(slot) = slots.take_admitted() else {
            return; // The slots closed: the prefetcher is stopping.
        };
        let mut lease = SlotLease::new(slot, slots.share());
        let result = counters.load(loader, unit_idx, bytes, lease.slot_mut());
        let failed = result.is_err();
        if deliveries.send(Delivery { unit_idx, result, lease }).is_err() || failed {
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
