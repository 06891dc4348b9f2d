//! The device pool and its slots: accounting, waiting, closing.

use std::sync::Arc;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

use hidream_memory::{DevicePool, MemoryError, SlotPool};

/// Long enough that a thread that should finish does; a deadlock fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(10);
/// Long enough that a thread that should wait would usually have finished if it did not wait.
const GRACE: Duration = Duration::from_millis(50);

#[test]
fn reservations_are_counted_and_given_back() {
    let pool = Arc::new(DevicePool::new(Some(100)));
    let first = pool.try_reserve(60, "first").unwrap();
    let second = pool.try_reserve(40, "second").unwrap();
    assert_eq!((pool.current_bytes(), pool.peak_bytes(), pool.n_allocations()), (100, 100, 2));
    assert_eq!(first.bytes() + second.bytes(), 100);

    let error = pool.try_reserve(1, "third").unwrap_err();
    assert!(matches!(
        &error,
        MemoryError::OverBudget { label, requested: 1, current: 100, budget: 100 } if label == "third"
    ));
    assert_eq!(
        error.to_string(),
        "cannot reserve 1 B (1 bytes) for third: 100 B (100 bytes) of the 100 B (100 bytes) budget is in use"
    );

    drop(first);
    assert_eq!((pool.current_bytes(), pool.peak_bytes()), (40, 100));
    pool.reset_peak();
    assert_eq!(pool.peak_bytes(), 40);
    let _third = pool.try_reserve(50, "third").unwrap();
    assert_eq!((pool.current_bytes(), pool.peak_bytes(), pool.n_allocations()), (90, 90, 3));
    drop(second);
    assert_eq!(pool.current_bytes(), 50);
}

#[test]
fn an_unlimited_pool_never_refuses() {
    let pool = Arc::new(DevicePool::new(None));
    let reservations: Vec<_> = (0..4).map(|_| pool.try_reserve(u64::MAX / 8, "big").unwrap()).collect();
    assert_eq!(pool.current_bytes(), u64::MAX / 8 * 4);
    assert_eq!(pool.budget_bytes(), None);
    drop(reservations);
    assert_eq!((pool.current_bytes(), pool.peak_bytes()), (0, u64::MAX / 8 * 4));
}

#[test]
fn blocking_reservations_wait_for_room() {
    let pool = Arc::new(DevicePool::new(Some(100)));
    let held = pool.try_reserve(60, "held").unwrap();
    let (sender, granted) = mpsc::channel();
    let waiter = {
        let pool = Arc::clone(&pool);
        thread::spawn(move || sender.send(pool.reserve_blocking(50, "waiter").map(|r| r.bytes())).unwrap())
    };
    assert!(granted.recv_timeout(GRACE).is_err(), "60 + 50 bytes do not fit in 100");
    drop(held);
    assert_eq!(granted.recv_timeout(PATIENCE).unwrap().unwrap(), 50);
    waiter.join().unwrap();
    assert_eq!(pool.current_bytes(), 0);

    let error = pool.reserve_blocking(101, "too big").unwrap_err();
    assert!(matches!(error, MemoryError::OverBudget { requested: 101, .. }), "it would wait forever");
}

#[test]
fn closing_wakes_waiters() {
    let pool = Arc::new(DevicePool::new(Some(10)));
    let held = pool.try_reserve(10, "held").unwrap();
    let (sender, result) = mpsc::channel();
    let waiter = {
        let pool = Arc::clone(&pool);
        thread::spawn(move || sender.send(pool.reserve_blocking(5, "waiter").map(|r| r.bytes())).unwrap())
    };
    assert!(result.recv_timeout(GRACE).is_err());
    pool.close();
    assert!(matches!(result.recv_timeout(PATIENCE).unwrap(), Err(MemoryError::PoolClosed)));
    waiter.join().unwrap();
    assert!(pool.is_closed());
    assert!(matches!(pool.try_reserve(0, "late"), Err(MemoryError::PoolClosed)));
    drop(held);
    assert_eq!(pool.current_bytes(), 0, "reservations made before closing still give their bytes back");
}

#[test]
fn slots_are_reserved_once_and_reused() {
    let pool = Arc::new(DevicePool::new(Some(100)));
    let slots = SlotPool::new(&pool, 3, 30).unwrap();
    assert_eq!((slots.n_slots(), slots.slot_bytes(), slots.n_free()), (3, 30, 3));
    assert_eq!((pool.current_bytes(), pool.n_allocations()), (90, 3));

    for _ in 0..10 {
        let taken: Vec<_> = (0..3).map(|_| slots.try_acquire().unwrap()).collect();
        let mut indices: Vec<usize> = taken.iter().map(|slot| slot.index()).collect();
        indices.sort();
        assert_eq!(indices, [0, 1, 2]);
        assert!(taken.iter().all(|slot| slot.bytes() == 30));
        assert!(slots.try_acquire().is_none(), "every slot is out");
    }
    assert_eq!((pool.current_bytes(), pool.n_allocations()), (90, 3), "streaming reserves nothing more");

    let extra = SlotPool::new(&pool, 1, 11);
    assert!(matches!(extra, Err(MemoryError::OverBudget { requested: 11, current: 90, .. })));

    let slot = slots.acquire().unwrap();
    drop(slots);
    assert_eq!(pool.current_bytes(), 90, "a slot still out keeps the reservations");
    drop(slot);
    assert_eq!(pool.current_bytes(), 0);
}

#[test]
fn closing_slots_wakes_waiters() {
    let pool = Arc::new(DevicePool::new(None));
    let slots = Arc::new(SlotPool::new(&pool, 1, 8).unwrap());
    let held = slots.acquire().unwrap();
    let (sender, result) = mpsc::channel();
    let waiter = {
        let slots = Arc::clone(&slots);
        thread::spawn(move || sender.send(slots.acquire().map(|slot| slot.index())).unwrap())
    };
    assert!(result.recv_timeout(GRACE).is_err(), "the only slot is out");
    slots.close();
    assert_eq!(result.recv_timeout(PATIENCE).unwrap(), None);
    waiter.join().unwrap();
    assert!(slots.is_closed() && slots.try_acquire().is_none());
    drop(held);

    let no_slots = SlotPool::new(&pool, 0, 8).unwrap();
    assert!(no_slots.acquire().is_none(), "with no slots, waiting would never end");
}

#[test]
fn a_returned_slot_wakes_a_waiter() {
    let pool = Arc::new(DevicePool::new(None));
    let slots = Arc::new(SlotPool::new(&pool, 1, 8).unwrap());
    let held = slots.acquire().unwrap();
    let (sender, result) = mpsc::channel();
    let waiter = {
        let slots = Arc::clone(&slots);
        thread::spawn(move || sender.send(slots.acquire().map(|slot| slot.index())).unwrap())
    };
    assert!(result.recv_timeout(GRACE).is_err());
    drop(held);
    assert_eq!(result.recv_timeout(PATIENCE).unwrap(), Some(0));
    waiter.join().unwrap();
}
