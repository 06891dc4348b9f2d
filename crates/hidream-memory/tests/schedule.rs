//! The prefetcher over a slot pool, against the fake loader with random delays: order, the slot
//! bound, the fence protocol, admission, errors, panics and drops at any point, each under a
//! timeout so that a deadlock fails the test.

#[path = "support/fake_loader.rs"]
mod fake_loader;

use std::collections::VecDeque;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use fake_loader::{Config, FakeError, FakeLoader, with_timeout};
use hidream_memory::{BudgetLedger, Loaded, MemoryError, Prefetcher, ResidencyError, ScheduleError, SlotPool};
use proptest::prelude::*;

/// A scheduling scenario: units, the order of a pass, and how the caller behaves.
#[derive(Debug, Clone)]
struct Scenario {
    unit_bytes: Vec<u64>,
    /// Indices into `unit_bytes`; a unit may come more than once in a pass.
    order: Vec<usize>,
    n_slots: usize,
    load_delay_us: Vec<u64>,
    /// Host-side time per unit, cycled.
    compute_delay_us: Vec<u64>,
    /// Time the compute stream works with each unit after the host let go of it, cycled.
    device_delay_us: Vec<u64>,
    /// Units the caller keeps besides the one it computes with, fewer than `n_slots`.
    keep: usize,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (1usize..8, 1usize..=5).prop_flat_map(|(n_units, n_slots)| {
        (
            prop::collection::vec(1u64..1000, n_units),
            prop::collection::vec(0..n_units, 1..10),
            prop::collection::vec(0u64..300, n_units),
            prop::collection::vec(0u64..300, 1..10),
            prop::collection::vec(0u64..300, 1..10),
            0..n_slots,
        )
            .prop_map(move |(unit_bytes, order, load_delay_us, compute_delay_us, device_delay_us, keep)| {
                Scenario { unit_bytes, order, n_slots, load_delay_us, compute_delay_us, device_delay_us, keep }
            })
    })
}

/// A running scenario: the loader, the ledger, the slots and the prefetcher over them.
struct Run {
    scenario: Scenario,
    loader: Arc<FakeLoader>,
    ledger: Arc<BudgetLedger>,
    slots: SlotPool<FakeLoader>,
    prefetcher: Prefetcher<FakeLoader>,
    held: VecDeque<Loaded<FakeLoader>>,
    step: usize,
}

impl Scenario {
    fn config(&self) -> Config {
        Config {
            load_delay_us: self.load_delay_us.clone(),
            device_delay_us: self.device_delay_us.clone(),
            ..Config::new(&self.unit_bytes)
        }
    }

    fn slot_bytes(&self) -> u64 {
        self.order.iter().map(|&idx| self.unit_bytes[idx]).max().unwrap()
    }

    fn start(&self, config: Config) -> Run {
        let loader = FakeLoader::new(config);
        let ledger = Arc::new(BudgetLedger::new(None));
        let slots = SlotPool::new(&ledger, &*loader, self.n_slots, self.slot_bytes()).unwrap();
        let prefetcher = Prefetcher::new(Arc::clone(&loader), &self.config().specs(), &self.order, &slots).unwrap();
        Run { scenario: self.clone(), loader, ledger, slots, prefetcher, held: VecDeque::new(), step: 0 }
    }
}

impl Run {
    /// Takes the next unit, checks it is the one the order says, uses it and keeps the last `keep`.
    fn step(&mut self) -> Result<(), ScheduleError<FakeError>> {
        let expected = self.scenario.order[self.step % self.scenario.order.len()];
        assert_eq!(self.prefetcher.pass_position(), self.step % self.scenario.order.len());
        let unit = self.prefetcher.next()?;
        assert_eq!(unit.unit_idx(), expected, "step {}", self.step);
        self.loader.use_unit(expected, &unit);
        let delay = self.scenario.compute_delay_us[self.step % self.scenario.compute_delay_us.len()];
        thread::sleep(Duration::from_micros(delay));
        self.held.push_back(unit);
        while self.held.len() > self.scenario.keep {
            self.held.pop_front();
        }
        self.step += 1;
        Ok(())
    }

    /// Drops the prefetcher and the units, then checks that the worker is gone, every unit and
    /// slot is given back, and the protocol held throughout.
    fn finish(self) {
        let Run { scenario, loader, ledger, slots, prefetcher, held, .. } = self;
        drop(prefetcher);
        drop(held);
        assert_eq!(Arc::strong_count(&loader), 1, "the worker thread still holds the loader");
        assert_eq!(loader.alive(), 0, "units leaked");
        assert_eq!(slots.n_free(), scenario.n_slots, "slots leaked");
        assert_eq!(loader.allocations(), scenario.n_slots, "one buffer per slot, allocated once");
        assert_eq!(loader.consumed_recorded(), loader.ready_waits(), "every unit handed out is released once");
        loader.assert_clean();
        drop(slots);
        assert_eq!((ledger.current_bytes(), loader.live_bytes()), (0, 0), "slot bytes leaked");
    }
}

fn check_passes(scenario: Scenario, n_passes: usize) {
    let mut run = scenario.start(scenario.config());
    let n_reservations = run.ledger.n_allocations();
    for pass in 0..n_passes {
        for _ in 0..scenario.order.len() {
            run.step().unwrap();
        }
        assert_eq!(run.prefetcher.passes_completed(), pass as u64 + 1);
    }
    let stats = run.prefetcher.stats();
    let pass_len = scenario.order.len() as u64;
    let pass_bytes: u64 = scenario.order.iter().map(|&idx| scenario.unit_bytes[idx]).sum();
    assert_eq!(
        (stats.units_delivered, stats.bytes_delivered),
        (n_passes as u64 * pass_len, n_passes as u64 * pass_bytes)
    );
    // Nothing was admitted past the end of the last pass, so nothing loaded for a pass to come.
    assert_eq!((stats.units_loaded, stats.bytes_loaded), (stats.units_delivered, stats.bytes_delivered));
    assert_eq!(run.loader.loads_started(), stats.units_loaded as usize);
    assert_eq!(run.loader.ready_waits(), stats.units_delivered as usize, "every unit's ready fence was waited on");
    assert_eq!(run.ledger.n_allocations(), n_reservations, "streaming reserves nothing per unit");
    let loads = run.loader.loads_per_buffer();
    assert!(loads.len() <= scenario.n_slots, "{} buffers loaded into, {} slots", loads.len(), scenario.n_slots);
    assert_eq!(loads.values().sum::<u64>(), stats.units_loaded);
    let max_alive = run.loader.max_alive();
    assert!(max_alive <= scenario.n_slots, "{max_alive} units alive at once in {} slots", scenario.n_slots);
    assert_eq!(run.loader.peak_live_bytes(), scenario.n_slots as u64 * scenario.slot_bytes());
    run.finish();
}

/// Fails load `fail_on_load` and checks that the error arrives on that unit's `next`.
fn check_failure(scenario: Scenario, fail_on_load: usize) {
    let mut run = scenario.start(Config { fail_on_load: Some(fail_on_load), ..scenario.config() });
    for _ in 0..fail_on_load {
        run.step().unwrap();
    }
    match run.prefetcher.next() {
        Err(ScheduleError::Load { unit_idx, source: FakeError::Load(load_idx) }) => {
            assert_eq!((unit_idx, load_idx), (scenario.order[fail_on_load % scenario.order.len()], fail_on_load));
        }
        other => panic!("expected the load error, got {other:?}"),
    }
    assert!(matches!(run.prefetcher.next(), Err(ScheduleError::Residency(ResidencyError::Stopped))));
    run.finish();
}

/// Drops the prefetcher after `n_next` units, with or without units still held.
fn check_drop(scenario: Scenario, n_next: usize, release_units_first: bool) {
    let mut run = scenario.start(scenario.config());
    for _ in 0..n_next {
        run.step().unwrap();
    }
    if release_units_first {
        run.held.clear();
    }
    let Run { loader, ledger, slots, prefetcher, held, .. } = run;
    drop(prefetcher);
    // Each unit the caller holds keeps a handle to the loader, to record its consumed fence.
    assert_eq!(Arc::strong_count(&loader), 1 + held.len(), "dropping the prefetcher joins the worker");
    assert_eq!(loader.alive(), held.len(), "units the caller holds stay valid, the others are dropped");
    for unit in &held {
        loader.use_unit(unit.unit_idx(), unit);
    }
    drop(held);
    assert_eq!((loader.alive(), slots.n_free()), (0, scenario.n_slots));
    loader.assert_clean();
    drop(slots);
    assert_eq!((ledger.current_bytes(), loader.live_bytes()), (0, 0));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

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

fn simple(n_slots: usize) -> Scenario {
    Scenario {
        unit_bytes: vec![10, 20, 30],
        order: vec![0, 1, 2],
        n_slots,
        load_delay_us: vec![0; 3],
        compute_delay_us: vec![0],
        device_delay_us: vec![200],
        keep: 0,
    }
}

#[test]
fn dropping_while_the_worker_waits_for_a_slot() {
    with_timeout(|| {
        let mut run = simple(2).start(simple(2).config());
        let unit = run.prefetcher.next().unwrap();
        // One slot computes, the other holds the next unit: the worker now waits for a slot.
        while run.prefetcher.stats().units_loaded < 2 {
            thread::sleep(Duration::from_millis(1));
        }
        run.held.push_back(unit);
        let Run { loader, slots, prefetcher, held, .. } = run;
        drop(prefetcher);
        assert_eq!(Arc::strong_count(&loader), 2, "the worker is gone; the unit held keeps a handle");
        assert_eq!(loader.alive(), 1, "the unit the caller holds stays valid");
        loader.use_unit(0, &held[0]);
        drop(held);
        assert_eq!(slots.n_free(), 2);
        loader.assert_clean();
    });
}

#[test]
fn holding_every_slot_is_an_error_not_a_deadlock() {
    with_timeout(|| {
        for n_slots in 1..4 {
            let mut run = simple(n_slots).start(simple(n_slots).config());
            let mut held: Vec<_> = (0..n_slots).map(|_| run.prefetcher.next().unwrap()).collect();
            let error = run.prefetcher.next().unwrap_err();
            assert!(
                matches!(error, ScheduleError::Residency(ResidencyError::AllSlotsHeld { n_slots: n }) if n == n_slots),
                "{error:?}"
            );
            drop(held.remove(0));
            let unit = run.prefetcher.next().expect("the prefetcher goes on once a slot is free");
            assert_eq!(unit.unit_idx(), n_slots % 3);
            run.held.extend(held);
            run.held.push_back(unit);
            run.finish();
        }
    });
}

#[test]
fn a_panicking_loader_is_reported() {
    with_timeout(|| {
        let scenario = simple(3);
        let mut run = scenario.start(Config { panic_on_load: Some(4), ..scenario.config() });
        for _ in 0..4 {
            run.step().unwrap();
        }
        match run.prefetcher.next() {
            Err(ScheduleError::Residency(ResidencyError::WorkerPanicked { message })) => {
                assert!(message.contains("fake panic"), "{message}");
            }
            other => panic!("expected the panic, got {other:?}"),
        }
        assert!(matches!(run.prefetcher.next(), Err(ScheduleError::Residency(ResidencyError::Stopped))));
        run.finish();
    });
}

#[test]
fn a_single_slot_loads_on_the_callers_thread() {
    with_timeout(|| {
        let mut run = simple(1).start(simple(1).config());
        for step in 0..7 {
            run.step().unwrap();
            assert_eq!(run.prefetcher.stats().units_loaded, step as u64 + 1, "nothing loads ahead");
        }
        assert_eq!(run.prefetcher.prefetch_depth(), 0);
        assert_eq!(Arc::strong_count(&run.loader), 2, "no worker thread holds the loader");
        assert_eq!(run.loader.loads_per_buffer().into_values().collect::<Vec<_>>(), [7], "one buffer, reused");
        run.finish();
    });
}

#[test]
fn a_wrong_size_is_refused() {
    with_timeout(|| {
        for n_slots in [1, 2] {
            let scenario = simple(n_slots);
            let mut run = scenario.start(Config { wrong_size_unit: Some(1), ..scenario.config() });
            run.step().unwrap();
            let error = run.prefetcher.next().unwrap_err();
            assert!(
                matches!(
                    error,
                    ScheduleError::Residency(ResidencyError::SizeMismatch { unit_idx: 1, planned: 20, loaded: 21 })
                ),
                "{error:?}"
            );
            assert!(matches!(run.prefetcher.next(), Err(ScheduleError::Residency(ResidencyError::Stopped))));
            run.finish();
        }
    });
}

#[test]
fn expected_passes_bound_the_loads() {
    with_timeout(|| {
        let scenario = Scenario { n_slots: 3, ..simple(3) };
        let mut run = scenario.start(scenario.config());
        run.prefetcher.expect_passes(2);
        run.step().unwrap();
        // Mid-pass, the admission grows only: asking for fewer passes takes nothing back.
        run.prefetcher.expect_passes(1);
        for _ in 1..6 {
            run.step().unwrap();
        }
        thread::sleep(Duration::from_millis(5));
        assert_eq!(run.prefetcher.stats().units_loaded, 6, "two passes admitted, two loaded");
        run.prefetcher.expect_passes(1);
        thread::sleep(Duration::from_millis(5));
        let loaded = run.prefetcher.stats().units_loaded;
        assert!(loaded <= 9, "{loaded} loaded: the third pass may load ahead into the free slots, and no further");
        for _ in 6..9 {
            run.step().unwrap();
        }
        assert_eq!(run.prefetcher.stats().units_loaded, 9);
        run.finish();
    });
}

#[test]
fn invalid_setups_are_refused() {
    let config = Config::new(&[10, 20]);
    let loader = FakeLoader::new(config.clone());
    let ledger = Arc::new(BudgetLedger::new(None));
    let start = |order: &[usize], n_slots: usize, slot_bytes: u64| {
        let slots = SlotPool::new(&ledger, &*loader, n_slots, slot_bytes).unwrap();
        Prefetcher::new(Arc::clone(&loader), &config.specs(), order, &slots).err()
    };
    assert!(matches!(start(&[], 2, 20), Some(MemoryError::NothingToStream)));
    assert!(matches!(start(&[0, 2], 2, 20), Some(MemoryError::UnitOutOfRange { unit_idx: 2, n_units: 2 })));
    assert!(matches!(
        start(&[0, 1], 2, 15),
        Some(MemoryError::UnitLargerThanSlot { unit_idx: 1, unit_bytes: 20, slot_bytes: 15 })
    ));
    assert!(start(&[0, 1], 2, 20).is_none());
    assert_eq!(ledger.current_bytes(), 0);
}
