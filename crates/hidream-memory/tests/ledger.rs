//! The budget ledger and the slot pool over it: accounting, waiting, closing, and slots reserved
//! and allocated once.

#[path = "support/fake_loader.rs"]
mod fake_loader;

use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use fake_loader::{Config, FakeError, FakeLoader};
use hidream_memory::{BudgetLedger, MemoryError, Prefetcher, ResidencyError, ScheduleError, SlotPool};

/// Long enough that a thread that should finish does; a deadlock fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);
/// Long enough that a thread that should wait would usually have finished if it did not wait.
const GRACE: Duration = Duration::from_millis(50);

#[test]
fn reservations_are_counted_and_given_back() {
    let ledger = Arc::new(BudgetLedger::new(Some(100)));
    let first = ledger.try_reserve(60, "first").unwrap();
    let second = ledger.try_reserve(40, "second").unwrap();
    assert_eq!((ledger.current_bytes(), ledger.peak_bytes(), ledger.n_allocations()), (100, 100, 2));
    assert_eq!(first.bytes() + second.bytes(), 100);

    let error = ledger.try_reserve(1, "third").unwrap_err();
    assert!(matches!(
        &error,
        MemoryError::OverBudget { label, requested: 1, current: 100, budget: 100 } if label == "third"
    ));
    assert_eq!(
        error.to_string(),
        "cannot reserve 1 B (1 bytes) for third: 100 B (100 bytes) of the 100 B (100 bytes) budget is in use"
    );

    drop(first);
    assert_eq!((ledger.current_bytes(), ledger.peak_bytes()), (40, 100));
    ledger.reset_peak();
    assert_eq!(ledger.peak_bytes(), 40);
    let _third = ledger.try_reserve(50, "third").unwrap();
    assert_eq!((ledger.current_bytes(), ledger.peak_bytes(), ledger.n_allocations()), (90, 90, 3));
    drop(second);
    assert_eq!(ledger.current_bytes(), 50);
}

#[test]
fn an_unlimited_ledger_never_refuses() {
    let ledger = Arc::new(BudgetLedger::new(None));
    let reservations: Vec<_> = (0..4).map(|_| ledger.try_reserve(u64::MAX / 8, "big").unwrap()).collect();
    assert_eq!(ledger.current_bytes(), u64::MAX / 8 * 4);
    assert_eq!(ledger.budget_bytes(), None);
    assert!(matches!(ledger.try_reserve(u64::MAX, "overflow"), Err(MemoryError::OverBudget { .. })));
    drop(reservations);
    assert_eq!((ledger.current_bytes(), ledger.peak_bytes()), (0, u64::MAX / 8 * 4));
}

#[test]
fn blocking_reservations_wait_for_room() {
    let ledger = Arc::new(BudgetLedger::new(Some(100)));
    let held = ledger.try_reserve(60, "held").unwrap();
    let (sender, granted) = mpsc::channel();
    let waiter = {
        let ledger = Arc::clone(&ledger);
        thread::spawn(move || sender.send(ledger.reserve_blocking(50, "waiter").map(|r| r.bytes())).unwrap())
    };
    assert!(granted.recv_timeout(GRACE).is_err(), "60 + 50 bytes do not fit in 100");
    drop(held);
    assert_eq!(granted.recv_timeout(PATIENCE).unwrap().unwrap(), 50);
    waiter.join().unwrap();
    assert_eq!(ledger.current_bytes(), 0);

    let error = ledger.reserve_blocking(101, "too big").unwrap_err();
    assert!(matches!(error, MemoryError::OverBudget { requested: 101, .. }), "it would wait forever");
}

#[test]
fn closing_wakes_waiters() {
    let ledger = Arc::new(BudgetLedger::new(Some(10)));
    let held = ledger.try_reserve(10, "held").unwrap();
    let (sender, result) = mpsc::channel();
    let waiter = {
        let ledger = Arc::clone(&ledger);
        thread::spawn(move || sender.send(ledger.reserve_blocking(5, "waiter").map(|r| r.bytes())).unwrap())
    };
    assert!(result.recv_timeout(GRACE).is_err());
    ledger.close();
    assert!(matches!(result.recv_timeout(PATIENCE).unwrap(), Err(MemoryError::LedgerClosed)));
    waiter.join().unwrap();
    assert!(ledger.is_closed());
    assert!(matches!(ledger.try_reserve(0, "late"), Err(MemoryError::LedgerClosed)));
    drop(held);
    assert_eq!(ledger.current_bytes(), 0, "reservations made before closing still give their bytes back");
}

#[test]
fn slots_are_reserved_and_allocated_once() {
    let ledger = Arc::new(BudgetLedger::new(Some(100)));
    let loader = FakeLoader::new(Config::new(&[30, 20, 30]));
    let slots = SlotPool::new(&ledger, &*loader, 3, 30).unwrap();
    assert_eq!((slots.n_slots(), slots.slot_bytes(), slots.n_free()), (3, 30, 3));
    assert_eq!((ledger.current_bytes(), ledger.n_allocations()), (90, 3));
    assert_eq!((loader.allocations(), loader.live_bytes()), (3, 90));

    let extra = SlotPool::new(&ledger, &*loader, 1, 11);
    assert!(matches!(
        extra,
        Err(ScheduleError::Residency(ResidencyError::Memory(MemoryError::OverBudget {
            requested: 11,
            current: 90,
            ..
        })))
    ));
    assert_eq!(loader.allocations(), 3, "nothing is allocated before the reservation succeeds");

    // Streaming through the slots reserves and allocates nothing more.
    let mut prefetcher =
        Prefetcher::new(Arc::clone(&loader), &Config::new(&[30, 20, 30]).specs(), &[0, 1, 2], &slots).unwrap();
    prefetcher.expect_passes(5);
    for _ in 0..15 {
        let unit = prefetcher.next().unwrap();
        loader.use_unit(unit.unit_idx(), &unit);
    }
    assert_eq!((ledger.current_bytes(), ledger.n_allocations()), (90, 3));
    assert_eq!((loader.allocations(), loader.live_bytes()), (3, 90));

    // A unit kept after its prefetcher and its slots are dropped keeps its slot's buffer and bytes.
    let kept = prefetcher.next().unwrap();
    drop(prefetcher);
    drop(slots);
    assert_eq!((ledger.current_bytes(), loader.live_bytes()), (90, 90));
    loader.use_unit(kept.unit_idx(), &kept);
    drop(kept);
    loader.assert_clean();
    assert_eq!((ledger.current_bytes(), loader.live_bytes()), (0, 0));
}

#[test]
fn a_failed_slot_allocation_gives_everything_back() {
    let ledger = Arc::new(BudgetLedger::new(None));
    let loader = FakeLoader::new(Config { fail_on_allocation: Some(2), ..Config::new(&[10]) });
    let error = SlotPool::new(&ledger, &*loader, 3, 10).unwrap_err();
    assert!(
        matches!(&error, ScheduleError::Allocate { what, bytes: 10, source: FakeError::Allocate(2) } if what == "streaming slot 0"),
        "{error:?}"
    );
    assert_eq!((ledger.current_bytes(), loader.live_bytes()), (0, 0));
    assert_eq!(error.to_string(), "cannot allocate 10 B (10 bytes) for streaming slot 0: fake failure on allocation 2");
}
