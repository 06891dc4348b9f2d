//! The prefetch scheduler against a fake loader with random delays: order, the slot bound, errors,
//! panics and drops at any point, each under a timeout so that a deadlock fails the test.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::Duration;

use hidream_memory::{DevicePool, Loaded, MemoryError, Plan, Prefetcher, ScheduleError, SlotPool, UnitSpec};
use proptest::prelude::*;

/// Runs `body` on its own thread and fails if it takes longer than this: a deadlock fails the
/// test instead of hanging it.
fn with_timeout<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, result) = mpsc::channel();
    let thread = thread::spawn(move || sender.send(body()).unwrap());
    match result.recv_timeout(Duration::from_secs(20)) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Disconnected) => std::panic::resume_unwind(thread.join().unwrap_err()),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("deadlock: the test did not finish in time"),
    }
}

/// A loader that sleeps, counts the units alive, and fails or panics on a chosen load.
#[derive(Default)]
struct FakeLoader {
    /// Sleep per unit index, in microseconds.
    load_delay_us: Vec<u64>,
    /// The load (counted from 0 over the whole run) that fails.
    fail_on_load: Option<usize>,
    /// The load that panics.
    panic_on_load: Option<usize>,
    loads: AtomicUsize,
    alive: Arc<AtomicUsize>,
    max_alive: AtomicUsize,
}

#[derive(Debug)]
struct FakeUnit {
    /// The index the loader was asked for, to check against the one the prefetcher reports.
    loaded_idx: usize,
    alive: Arc<AtomicUsize>,
}

impl Drop for FakeUnit {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug)]
struct FakeError(usize);

impl fmt::Display for FakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fake failure on load {}", self.0)
    }
}

impl std::error::Error for FakeError {}

impl hidream_memory::UnitLoader for FakeLoader {
    type Unit = FakeUnit;
    type Error = FakeError;

    fn load(&self, unit_idx: usize) -> Result<FakeUnit, FakeError> {
        let load_idx = self.loads.fetch_add(1, Ordering::SeqCst);
        if self.fail_on_load == Some(load_idx) {
            return Err(FakeError(load_idx));
        }
        assert_ne!(self.panic_on_load, Some(load_idx), "fake panic");
        thread::sleep(Duration::from_micros(self.load_delay_us.get(unit_idx).copied().unwrap_or(0)));
        let alive = self.alive.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_alive.fetch_max(alive, Ordering::SeqCst);
        Ok(FakeUnit { loaded_idx: unit_idx, alive: Arc::clone(&self.alive) })
    }
}

/// A scheduling scenario: units, the order of a pass, and how the caller behaves.
#[derive(Debug, Clone)]
struct Scenario {
    unit_bytes: Vec<u64>,
    order: Vec<usize>,
    depth: usize,
    load_delay_us: Vec<u64>,
    compute_delay_us: Vec<u64>,
    /// Units the caller keeps besides the one it computes with, at most `depth`.
    keep: usize,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..8, 0usize..=4).prop_flat_map(|(n_units, depth)| {
        (
            prop::collection::vec(1u64..1000, n_units),
            prop::collection::vec(0..n_units, 1..10),
            prop::collection::vec(0u64..300, n_units),
            prop::collection::vec(0u64..300, 1..10),
            0..=depth,
        )
            .prop_map(move |(unit_bytes, order, load_delay_us, compute_delay_us, keep)| Scenario {
                unit_bytes,
                order,
                depth,
                load_delay_us,
                compute_delay_us,
                keep,
            })
    })
}

impl Scenario {
    fn units(&self) -> Vec<UnitSpec> {
        self.unit_bytes.iter().map(|&bytes| UnitSpec::streamable(bytes)).collect()
    }

    fn start(&self, loader: FakeLoader) -> (Arc<FakeLoader>, Arc<DevicePool>, Prefetcher<FakeLoader>) {
        let loader = Arc::new(FakeLoader { load_delay_us: self.load_delay_us.clone(), ..loader });
        let pool = Arc::new(DevicePool::new(None));
        let slot_bytes = self.order.iter().map(|&idx| self.unit_bytes[idx]).max().unwrap();
        let slots = SlotPool::new(&pool, self.depth + 1, slot_bytes).unwrap();
        let prefetcher = Prefetcher::new(Arc::clone(&loader), &self.units(), &self.order, self.depth, slots).unwrap();
        (loader, pool, prefetcher)
    }

    /// Computes with one unit, keeping the last `keep` units as well.
    fn compute(&self, step: usize, held: &mut VecDeque<Loaded<FakeUnit>>, unit: Loaded<FakeUnit>) {
        thread::sleep(Duration::from_micros(self.compute_delay_us[step % self.compute_delay_us.len()]));
        held.push_back(unit);
        while held.len() > self.keep {
            held.pop_front();
        }
    }
}

/// After everything is dropped, the worker is gone and every unit and byte is given back.
fn assert_all_released(loader: &Arc<FakeLoader>, pool: &DevicePool) {
    assert_eq!(Arc::strong_count(loader), 1, "the worker thread still holds the loader");
    assert_eq!(loader.alive.load(Ordering::SeqCst), 0, "units leaked");
    assert_eq!(pool.current_bytes(), 0, "slot bytes leaked");
}

fn check_passes(scenario: Scenario, n_passes: usize) {
    let (loader, pool, mut prefetcher) = scenario.start(FakeLoader::default());
    let n_allocations = pool.n_allocations();
    let mut held = VecDeque::new();
    let mut step = 0;
    for pass in 0..n_passes {
        for (position, &unit_idx) in scenario.order.iter().enumerate() {
            assert_eq!(prefetcher.pass_position(), position);
            let unit = prefetcher.next().unwrap();
            assert_eq!((unit.unit_idx(), unit.loaded_idx), (unit_idx, unit_idx), "pass {pass}, position {position}");
            scenario.compute(step, &mut held, unit);
            step += 1;
        }
        assert_eq!(prefetcher.passes_completed(), pass as u64 + 1);
    }
    let stats = prefetcher.stats();
    let pass_bytes: u64 = scenario.order.iter().map(|&idx| scenario.unit_bytes[idx]).sum();
    assert_eq!((stats.units_delivered, stats.bytes_delivered), (step as u64, n_passes as u64 * pass_bytes));
    assert!(stats.units_loaded >= stats.units_delivered && stats.bytes_loaded >= stats.bytes_delivered);
    assert!(stats.units_loaded <= stats.units_delivered + scenario.depth as u64 + 1);
    assert_eq!(pool.n_allocations(), n_allocations, "streaming reserves nothing per unit");
    let max_alive = loader.max_alive.load(Ordering::SeqCst);
    assert!(max_alive <= scenario.depth + 1, "{max_alive} units alive at once with depth {}", scenario.depth);
    drop(prefetcher);
    drop(held);
    assert_all_released(&loader, &pool);
}

/// Fails load `fail_on_load` and checks that the error arrives on that unit's `next`.
fn check_failure(scenario: Scenario, fail_on_load: usize) {
    let (loader, pool, mut prefetcher) =
        scenario.start(FakeLoader { fail_on_load: Some(fail_on_load), ..Default::default() });
    let mut held = VecDeque::new();
    for step in 0..fail_on_load {
        let unit = prefetcher.next().unwrap();
        assert_eq!(unit.unit_idx(), scenario.order[step % scenario.order.len()]);
        scenario.compute(step, &mut held, unit);
    }
    match prefetcher.next() {
        Err(ScheduleError::Load { unit_idx, source: FakeError(load_idx) }) => {
            assert_eq!((unit_idx, load_idx), (scenario.order[fail_on_load % scenario.order.len()], fail_on_load));
        }
        other => panic!("expected the load error, got {other:?}"),
    }
    assert!(matches!(prefetcher.next(), Err(ScheduleError::Stopped)));
    drop(prefetcher);
    drop(held);
    assert_all_released(&loader, &pool);
}

/// Drops the prefetcher after `n_next` units, with or without units still held.
fn check_drop(scenario: Scenario, n_next: usize, release_units_first: bool) {
    let (loader, pool, mut prefetcher) = scenario.start(FakeLoader::default());
    let mut held = VecDeque::new();
    for step in 0..n_next {
        let unit = prefetcher.next().unwrap();
        scenario.compute(step, &mut held, unit);
    }
    if release_units_first {
        held.clear();
    }
    drop(prefetcher);
    assert_eq!(Arc::strong_count(&loader), 1, "dropping the prefetcher joins the worker");
    drop(held);
    assert_all_released(&loader, &pool);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn every_pass_delivers_every_unit_in_order(scenario in scenario(), n_passes in 1usize..4) {
        with_timeout(move || check_passes(scenario, n_passes));
    }

    #[test]
    fn a_load_error_arrives_on_its_unit(scenario in scenario(), fail_on_load in 0usize..20) {
        with_timeout(move || check_failure(scenario, fail_on_load));
    }

    #[test]
    fn dropping_at_any_point_stops_cleanly(scenario in scenario(), n_next in 0usize..20, release_units_first: bool) {
        with_timeout(move || check_drop(scenario, n_next, release_units_first));
    }
}

fn simple(depth: usize) -> Scenario {
    Scenario {
        unit_bytes: vec![10, 20, 30],
        order: vec![0, 1, 2],
        depth,
        load_delay_us: vec![0; 3],
        compute_delay_us: vec![0],
        keep: 0,
    }
}

#[test]
fn dropping_while_the_worker_waits_for_a_slot() {
    with_timeout(|| {
        let (loader, pool, mut prefetcher) = simple(1).start(FakeLoader::default());
        let unit = prefetcher.next().unwrap();
        // One slot computes, the other holds the next unit: the worker now waits for a slot.
        while prefetcher.stats().units_loaded < 2 {
            thread::sleep(Duration::from_millis(1));
        }
        drop(prefetcher);
        assert_eq!(Arc::strong_count(&loader), 1);
        assert_eq!(loader.alive.load(Ordering::SeqCst), 1, "the unit the caller holds stays valid");
        assert_eq!(unit.loaded_idx, 0);
        drop(unit);
        assert_all_released(&loader, &pool);
    });
}

#[test]
fn holding_every_slot_is_an_error_not_a_deadlock() {
    with_timeout(|| {
        for depth in 0..3 {
            let (loader, pool, mut prefetcher) = simple(depth).start(FakeLoader::default());
            let mut held: Vec<_> = (0..=depth).map(|_| prefetcher.next().unwrap()).collect();
            assert!(matches!(prefetcher.next(), Err(ScheduleError::AllSlotsHeld { n_slots }) if n_slots == depth + 1));
            drop(held.remove(0));
            let unit = prefetcher.next().expect("the prefetcher goes on once a slot is free");
            assert_eq!(unit.unit_idx(), (depth + 1) % 3);
            drop((held, unit, prefetcher));
            assert_all_released(&loader, &pool);
        }
    });
}

#[test]
fn a_panicking_loader_is_reported() {
    with_timeout(|| {
        let (loader, pool, mut prefetcher) =
            simple(2).start(FakeLoader { panic_on_load: Some(4), ..Default::default() });
        for _ in 0..4 {
            drop(prefetcher.next().unwrap());
        }
        match prefetcher.next() {
            Err(ScheduleError::WorkerPanicked { message }) => assert!(message.contains("fake panic"), "{message}"),
            other => panic!("expected the panic, got {other:?}"),
        }
        assert!(matches!(prefetcher.next(), Err(ScheduleError::Stopped)));
        drop(prefetcher);
        assert_all_released(&loader, &pool);
    });
}

#[test]
fn depth_zero_loads_on_the_callers_thread() {
    let (loader, pool, mut prefetcher) = simple(0).start(FakeLoader::default());
    for step in 0..7 {
        let unit = prefetcher.next().unwrap();
        assert_eq!(unit.unit_idx(), step % 3);
        assert_eq!(prefetcher.stats().units_loaded, step as u64 + 1, "nothing loads ahead");
    }
    assert_eq!(prefetcher.prefetch_depth(), 0);
    assert_eq!(Arc::strong_count(&loader), 2, "no worker thread holds the loader");
    drop(prefetcher);
    assert_all_released(&loader, &pool);
}

#[test]
fn prefetching_from_a_plan_stays_within_the_budget() {
    with_timeout(|| {
        let units = [
            UnitSpec::resident(5),
            UnitSpec::streamable(40),
            UnitSpec::streamable(30),
            UnitSpec::streamable(40),
            UnitSpec::streamable(40),
        ];
        let budget_bytes = 5 + 40 + 2 * 40;
        let plan = Plan::budget(&units, budget_bytes, 1).unwrap();
        assert_eq!((plan.resident(), plan.streamed()), (&[0, 1][..], &[2, 3, 4][..]));
        let pool = Arc::new(DevicePool::new(Some(budget_bytes)));
        let resident: Vec<_> =
            plan.resident().iter().map(|&idx| pool.try_reserve(units[idx].bytes, "resident").unwrap()).collect();
        let loader = Arc::new(FakeLoader::default());
        let mut prefetcher = Prefetcher::from_plan(Arc::clone(&loader), &units, &plan, &pool).unwrap();
        for _ in 0..3 * plan.streamed().len() {
            drop(prefetcher.next().unwrap());
        }
        assert_eq!(prefetcher.stats().bytes_delivered, 3 * plan.streamed_bytes_per_pass());
        assert_eq!(pool.peak_bytes(), plan.peak_weight_bytes());
        drop((prefetcher, resident));
        assert_all_released(&loader, &pool);
    });
}

#[test]
fn invalid_setups_are_refused() {
    let units = [UnitSpec::streamable(10), UnitSpec::streamable(20)];
    let pool = Arc::new(DevicePool::new(None));
    let loader = Arc::new(FakeLoader::default());
    let start = |order: &[usize], depth: usize, n_slots: usize, slot_bytes: u64| {
        let slots = SlotPool::new(&pool, n_slots, slot_bytes).unwrap();
        Prefetcher::new(Arc::clone(&loader), &units, order, depth, slots).err()
    };
    assert!(matches!(start(&[], 1, 2, 20), Some(MemoryError::NothingToStream)));
    assert!(matches!(start(&[0, 1], 1, 3, 20), Some(MemoryError::SlotCount { n_slots: 3, prefetch_depth: 1 })));
    assert!(matches!(start(&[0, 2], 1, 2, 20), Some(MemoryError::UnitOutOfRange { unit_idx: 2, n_units: 2 })));
    assert!(matches!(
        start(&[0, 1], 1, 2, 15),
        Some(MemoryError::UnitLargerThanSlot { unit_idx: 1, unit_bytes: 20, slot_bytes: 15 })
    ));
    let all = Plan::all(&units);
    assert!(matches!(Prefetcher::from_plan(loader, &units, &all, &pool), Err(MemoryError::NothingToStream)));
}
