//! The residency runtime against the fake loader: passes in plan order under the fence protocol,
//! buffers allocated once, measured peaks, no wasted loads, recovery after a failed or abandoned
//! pass, size checks and the clamped prefetch depth, each under a timeout so that a deadlock fails.

#[path = "support/fake_loader.rs"]
mod fake_loader;

use std::any::Any;
use std::collections::VecDeque;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use fake_loader::{Config, FakeError, FakeLoader, contents_of, with_timeout};
use hidream_memory::{BudgetLedger, Plan, Residency, ResidencyError, ScheduleError, UnitRef, UnitSpec};
use proptest::prelude::*;

type Outcome<T> = Result<T, ScheduleError<FakeError>>;

/// What a unit held when the consumer used it: its index and a checksum of its bytes.
type Contents = Vec<(usize, u64)>;

/// A model's units, the plan over them, and how the loader and the caller behave.
#[derive(Debug, Clone)]
struct Setup {
    units: Vec<UnitSpec>,
    plan: Plan,
    /// The ledger's budget: the plan's budget, or none for a fixed policy.
    budget: Option<u64>,
    config: Config,
    caller: Caller,
}

/// How the caller runs a pass.
#[derive(Debug, Clone, Default)]
struct Caller {
    /// Host-side time per unit, cycled, in microseconds.
    compute_delay_us: Vec<u64>,
    /// Streamed units the caller keeps besides the one it computes with (fewer than the slots).
    keep: usize,
}

/// A way for the caller to spoil a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// Drops the pass before its streamed unit at this position.
    Abandon(usize),
    /// Asks for the wrong streamed unit at this position.
    OutOfOrder(usize),
    /// Asks for a unit that does not exist at this position.
    NotInPlan(usize),
}

/// A started runtime with its loader and ledger.
struct Run {
    setup: Setup,
    loader: Arc<FakeLoader>,
    ledger: Arc<BudgetLedger>,
    residency: Residency<FakeLoader>,
}

impl Setup {
    fn new(units: Vec<UnitSpec>, plan: Plan) -> Self {
        let config = Config::new(&units.iter().map(|unit| unit.bytes).collect::<Vec<_>>());
        Setup { units, plan, budget: None, config, caller: Caller::default() }
    }

    fn with_config(mut self, change: impl FnOnce(&mut Config)) -> Self {
        change(&mut self.config);
        self
    }

    fn start(&self) -> Outcome<Run> {
        let loader = FakeLoader::new(self.config.clone());
        let ledger = Arc::new(BudgetLedger::new(self.budget));
        let residency = Residency::new(Arc::clone(&loader), &self.units, self.plan.clone(), Arc::clone(&ledger))?;
        Ok(Run { setup: self.clone(), loader, ledger, residency })
    }

    /// What every pass must deliver: each unit in execution order, as a correct load fills it.
    fn expected_contents(&self) -> Contents {
        self.units.iter().enumerate().map(|(unit_idx, unit)| contents_of(unit_idx, unit.bytes)).collect()
    }

    /// Weight bytes on the device while streaming: the resident units and every slot.
    fn streaming_bytes(&self) -> u64 {
        self.plan.resident().iter().map(|&idx| self.units[idx].bytes).sum::<u64>()
            + self.plan.n_slots() as u64 * self.plan.slot_bytes()
    }
}

impl Run {
    /// Runs one pass over every unit in execution order, spoiled by `fault` if given, and returns
    /// what the units held.
    fn pass(&mut self, fault: Option<Fault>) -> Outcome<Contents> {
        let streamed = self.setup.plan.streamed().to_vec();
        let caller = &self.setup.caller;
        let mut pass = self.residency.pass()?;
        let mut held = VecDeque::new();
        let mut contents = Vec::new();
        let mut position = 0;
        for unit_idx in 0..self.setup.units.len() {
            if streamed.get(position) == Some(&unit_idx) {
                match fault {
                    Some(Fault::Abandon(at)) if at == position => return Ok(contents),
                    Some(Fault::OutOfOrder(at)) if at == position => {
                        let wrong = streamed[(position + 1) % streamed.len()];
                        let error = pass.unit(wrong).err().expect("a unit out of order is refused");
                        assert!(
                            matches!(
                                error,
                                ScheduleError::Residency(ResidencyError::OutOfOrder { requested, expected })
                                    if (requested, expected) == (wrong, unit_idx)
                            ),
                            "{error:?}"
                        );
                        return Err(error);
                    }
                    Some(Fault::NotInPlan(at)) if at == position => {
                        let n_units = self.setup.units.len();
                        let error = pass.unit(n_units).err().expect("a unit past the end is refused");
                        assert!(
                            matches!(
                                error,
                                ScheduleError::Residency(ResidencyError::NotInPlan { unit_idx, n_units: n })
                                    if (unit_idx, n) == (n_units, n_units)
                            ),
                            "{error:?}"
                        );
                        return Err(error);
                    }
                    _ => {}
                }
                position += 1;
            }
            match pass.unit(unit_idx)? {
                UnitRef::Resident(unit) => contents.push(self.loader.use_unit(unit_idx, unit)),
                UnitRef::Streamed(loaded) => {
                    assert_eq!(loaded.unit_idx(), unit_idx);
                    contents.push(self.loader.use_unit(unit_idx, &loaded));
                    held.push_back(loaded);
                    while held.len() > caller.keep {
                        held.pop_front();
                    }
                }
            }
            let step = contents.len();
            if !caller.compute_delay_us.is_empty() {
                thread::sleep(Duration::from_micros(caller.compute_delay_us[step % caller.compute_delay_us.len()]));
            }
        }
        assert_eq!(pass.remaining(), 0);
        Ok(contents)
    }

    /// Checks, with every streamed unit the caller got released, that `n_slots` units can be held
    /// at once (no slot is lost or stuck), then drops the runtime and checks that everything is
    /// given back and the protocol held throughout.
    fn finish(mut self) {
        let n_slots = self.setup.plan.n_slots();
        let streamed = self.setup.plan.streamed().to_vec();
        if n_slots > 0 {
            let mut pass = self.residency.pass().unwrap();
            let mut held = Vec::new();
            for &unit_idx in &streamed[..n_slots] {
                match pass.unit(unit_idx).unwrap() {
                    UnitRef::Streamed(loaded) => held.push(loaded),
                    UnitRef::Resident(_) => unreachable!("unit {unit_idx} streams"),
                }
            }
            if let Some(&next) = streamed.get(n_slots) {
                let error = pass.unit(next).err().expect("every slot is held");
                assert!(
                    matches!(error, ScheduleError::Residency(ResidencyError::AllSlotsHeld { n_slots: n }) if n == n_slots),
                    "{error:?}"
                );
            }
        }
        let Run { setup, loader, ledger, residency } = self;
        assert_eq!(loader.live_bytes(), setup.streaming_bytes(), "a buffer was dropped while the runtime lives");
        assert_eq!(ledger.current_bytes(), setup.streaming_bytes());
        drop(residency);
        assert_eq!(Arc::strong_count(&loader), 1, "a worker thread still holds the loader");
        assert_eq!((loader.alive(), loader.loads_in_flight()), (0, 0), "units leaked");
        assert_eq!(loader.consumed_recorded(), loader.ready_waits() - setup.plan.resident().len());
        loader.assert_clean();
        assert_eq!((ledger.current_bytes(), loader.live_bytes()), (0, 0), "bytes leaked");
    }
}

/// Runs `n_passes` passes, told in advance or not, and checks order, contents, allocations, the
/// loads (none wasted), the measured peak and the protocol.
fn check_passes(setup: Setup, n_passes: usize, expect_passes: bool) {
    let mut run = setup.start().unwrap();
    let resident = setup.plan.resident().len();
    assert_eq!(run.loader.allocations(), resident, "the resident units are allocated at creation");
    let pass_len = setup.plan.streamed().len() as u64;
    if expect_passes {
        run.residency.expect_passes(n_passes as u64);
    }
    for pass_idx in 0..n_passes {
        assert_eq!(run.pass(None).unwrap(), setup.expected_contents(), "pass {pass_idx}");
        let loaded = run.residency.stats().units_loaded;
        if expect_passes {
            assert!(loaded <= n_passes as u64 * pass_len, "{loaded} loaded, {n_passes} passes admitted");
        } else {
            // Give the worker time to load what it should not.
            thread::sleep(Duration::from_millis(1));
            let loaded = run.residency.stats().units_loaded;
            assert_eq!(loaded, (pass_idx as u64 + 1) * pass_len, "loaded past the end of pass {pass_idx}");
        }
    }
    let stats = run.residency.stats();
    assert_eq!((stats.units_loaded, stats.units_delivered), (n_passes as u64 * pass_len, n_passes as u64 * pass_len));
    let pass_bytes = setup.plan.streamed_bytes_per_pass();
    assert_eq!(
        (stats.bytes_loaded, stats.bytes_delivered),
        (n_passes as u64 * pass_bytes, n_passes as u64 * pass_bytes)
    );
    assert_eq!(run.loader.loads_started(), resident + stats.units_loaded as usize);
    assert_eq!(run.loader.ready_waits(), resident + stats.units_delivered as usize);
    assert_eq!(run.residency.streams_started(), u64::from(pass_len > 0));

    let n_slots = setup.plan.n_slots();
    assert_eq!(run.loader.allocations(), resident + n_slots, "each buffer allocated once");
    let mut loads: Vec<u64> = run.loader.loads_per_buffer().into_values().collect();
    loads.sort_unstable();
    assert!(loads.len() <= resident + n_slots && loads[..resident].iter().all(|&n| n == 1), "{loads:?}");
    assert_eq!(loads.iter().sum::<u64>(), resident as u64 + stats.units_loaded);
    if n_passes as u64 * pass_len > n_slots as u64 {
        assert!(loads.last().is_some_and(|&most| most > 1), "no slot was reused: {loads:?}");
    }
    assert!(run.loader.max_alive() <= resident + n_slots);
    assert_eq!(run.loader.duplicates(), 0, "a unit was loaded while an earlier load of it was alive");

    let peak = run.loader.peak_live_bytes();
    assert_eq!(peak, setup.streaming_bytes(), "measured peak");
    assert_eq!(run.ledger.peak_bytes(), peak, "the ledger accounts what the loader allocated");
    if let Some(budget) = setup.budget {
        assert!(peak <= budget, "peak {peak} over the budget {budget}");
    }
    run.finish();
}

/// Spoils one pass (a failing or panicking load, a wrong request, or an abandoned pass) and checks
/// that the next pass is exactly what a fresh runtime delivers, on a fresh stream, in the same
/// slots.
fn check_recovery(setup: Setup, fault: Result<Fault, LoaderFault>, expect_passes: bool) {
    let reference = setup.start().unwrap().pass(None).unwrap();
    let n_resident = setup.plan.resident().len();
    let faulty = setup.clone().with_config(|config| match fault {
        Err(LoaderFault::Fail(load_idx)) => config.fail_on_load = Some(n_resident + load_idx),
        Err(LoaderFault::Panic(load_idx)) => config.panic_on_load = Some(n_resident + load_idx),
        Ok(_) => {}
    });
    let mut run = faulty.start().unwrap();
    if expect_passes {
        run.residency.expect_passes(4);
    }
    run.pass(None).unwrap();
    let current_bytes = run.ledger.current_bytes();
    let live_bytes = run.loader.live_bytes();
    match fault {
        Ok(fault) => {
            let spoiled = run.pass(Some(fault));
            assert_eq!(spoiled.is_err(), !matches!(fault, Fault::Abandon(_)), "{spoiled:?}");
        }
        Err(loader_fault) => {
            let n_slots = setup.plan.n_slots();
            let failure = (0..3).find_map(|_| match panic::catch_unwind(AssertUnwindSafe(|| run.pass(None))) {
                Ok(Ok(_)) => None,
                Ok(Err(error)) => Some(format!("{error:?}")),
                Err(payload) => Some(format!("caller panicked: {}", panic_message(payload.as_ref()))),
            });
            let failure = failure.expect("the fault strikes within three passes");
            let expected = match loader_fault {
                LoaderFault::Fail(_) => "Load { unit_idx",
                // With one slot the loader runs on the caller's thread: the panic is the caller's.
                LoaderFault::Panic(_) if n_slots == 1 => "caller panicked: fake panic",
                LoaderFault::Panic(_) => "WorkerPanicked { message: \"fake panic",
            };
            assert!(failure.contains(expected), "{loader_fault:?}: {failure}");
        }
    }
    let streams = run.residency.streams_started();
    assert_eq!(run.pass(None).unwrap(), reference, "the pass after the fault");
    assert_eq!(run.residency.streams_started(), streams + 1, "a fresh stream after the fault");
    assert_eq!(run.pass(None).unwrap(), reference, "and the pass after that");
    assert_eq!(run.residency.streams_started(), streams + 1, "one fresh stream only");
    assert_eq!((run.ledger.current_bytes(), run.loader.live_bytes()), (current_bytes, live_bytes));
    assert_eq!(run.loader.allocations(), n_resident + setup.plan.n_slots(), "recovery keeps the slots");
    run.finish();
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(message), _) => (*message).to_owned(),
        (_, Some(message)) => message.clone(),
        _ => "a panic without a message".to_owned(),
    }
}

#[derive(Debug, Clone, Copy)]
enum LoaderFault {
    /// The streamed load of this index (from 0, resident loads not counted) fails, once.
    Fail(usize),
    /// It panics, once.
    Panic(usize),
}

/// Unit lists with some always-resident units, planned by `stream` (depth up to far past the
/// units) or under a budget, with random delays.
fn setup() -> impl Strategy<Value = Setup> {
    let unit = (1u64..1000, prop::bool::weighted(0.2));
    let depth = prop_oneof![0usize..5, Just(100_000)];
    (
        prop::collection::vec(unit, 1..7),
        depth,
        prop::option::of(0.0..1.0f64),
        prop::collection::vec(0u64..200, 1..6),
        prop::collection::vec(0u64..200, 1..6),
        prop::collection::vec(0u64..300, 1..6),
        0usize..4,
    )
        .prop_map(|(units, depth, budget_fraction, load_delay_us, compute_delay_us, device_delay_us, keep)| {
            let units: Vec<UnitSpec> =
                units.into_iter().map(|(bytes, always_resident)| UnitSpec { bytes, always_resident }).collect();
            let (plan, budget) = match budget_fraction {
                None => (Plan::stream(&units, depth), None),
                Some(fraction) => {
                    // A budget between the smallest that works and a little more than the total.
                    let minimum = Plan::minimum_budget(&units, depth);
                    let total: u64 = units.iter().map(|unit| unit.bytes).sum();
                    let budget = minimum + ((total + 10 - minimum) as f64 * fraction) as u64;
                    (Plan::budget(&units, budget, depth).unwrap(), Some(budget))
                }
            };
            let keep = keep.min(plan.n_slots().saturating_sub(1));
            let mut setup = Setup::new(units, plan).with_config(|config| {
                config.load_delay_us = load_delay_us;
                config.device_delay_us = device_delay_us;
            });
            setup.budget = budget;
            setup.caller = Caller { compute_delay_us, keep };
            setup
        })
}

/// A setup that streams at least two units, with a fault somewhere in its second pass.
fn setup_with_fault() -> impl Strategy<Value = (Setup, Result<Fault, LoaderFault>)> {
    setup().prop_filter("two streamed units", |setup| setup.plan.streamed().len() >= 2).prop_flat_map(|setup| {
        let pass_len = setup.plan.streamed().len();
        let fault = prop_oneof![
            (1..pass_len).prop_map(|at| Ok(Fault::Abandon(at))),
            (0..pass_len).prop_map(|at| Ok(Fault::OutOfOrder(at))),
            (0..pass_len).prop_map(|at| Ok(Fault::NotInPlan(at))),
            (pass_len..2 * pass_len).prop_map(|at| Err(LoaderFault::Fail(at))),
            (pass_len..2 * pass_len).prop_map(|at| Err(LoaderFault::Panic(at))),
        ];
        (Just(setup), fault)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn passes_follow_the_plan_and_the_protocol(setup in setup(), n_passes in 1usize..4, expect_passes: bool) {
        with_timeout(move || check_passes(setup, n_passes, expect_passes));
    }

    #[test]
    fn a_spoiled_pass_is_followed_by_a_fresh_one((setup, fault) in setup_with_fault(), expect_passes: bool) {
        with_timeout(move || check_recovery(setup, fault, expect_passes));
    }
}

fn streamable(sizes: &[u64]) -> Vec<UnitSpec> {
    sizes.iter().map(|&bytes| UnitSpec::streamable(bytes)).collect()
}

/// Four streamed units after a resident one, with a slow caller and a slow device.
fn slow(depth: usize) -> Setup {
    let units = [vec![UnitSpec::resident(5)], streamable(&[40, 30, 40, 40])].concat();
    let mut setup = Setup::new(units.clone(), Plan::stream(&units, depth)).with_config(|config| {
        config.load_delay_us = vec![100; 5];
        config.device_delay_us = vec![300];
    });
    setup.caller.compute_delay_us = vec![1000];
    setup
}

/// Waits until the runtime has loaded `n_units` streamed units: the worker loads ahead. (The test's
/// timeout fails it if the worker never does.)
fn wait_until_loaded(residency: &Residency<FakeLoader>, n_units: u64) {
    while residency.stats().units_loaded < n_units {
        thread::sleep(Duration::from_micros(200));
    }
}

#[test]
fn told_passes_load_exactly_those_passes_even_with_a_deep_prefetch() {
    with_timeout(|| {
        for n_passes in [1u64, 3] {
            let setup = slow(100_000);
            assert_eq!(setup.plan.n_slots(), 4);
            let mut run = setup.start().unwrap();
            run.residency.expect_passes(n_passes);
            for pass_idx in 1..=n_passes {
                run.pass(None).unwrap();
                if pass_idx < n_passes {
                    // Told of the next pass, the worker loads its first units while this one ends.
                    wait_until_loaded(&run.residency, pass_idx * 4 + 1);
                }
            }
            thread::sleep(Duration::from_millis(5));
            assert_eq!(run.residency.stats().units_loaded, n_passes * 4, "{n_passes} passes");
            assert_eq!(run.loader.loads_started(), 1 + n_passes as usize * 4, "no load started for a later pass");
            assert_eq!(run.loader.loads_in_flight(), 0);
            // Nothing is in flight, so dropping the runtime waits for nothing.
            let Run { loader, residency, .. } = run;
            drop(residency);
            assert_eq!(Arc::strong_count(&loader), 1);
            loader.assert_clean();
        }
    });
}

#[test]
fn untold_passes_load_to_the_end_of_the_current_one() {
    with_timeout(|| {
        let mut run = slow(3).start().unwrap();
        for pass_idx in 1..=3 {
            run.pass(None).unwrap();
            thread::sleep(Duration::from_millis(5));
            assert_eq!(run.residency.stats().units_loaded, pass_idx * 4, "pass {pass_idx}");
        }
        // Told late, the next two passes load ahead across their boundary.
        run.residency.expect_passes(2);
        run.pass(None).unwrap();
        wait_until_loaded(&run.residency, 4 * 4 + 1);
        run.pass(None).unwrap();
        assert_eq!(run.residency.stats().units_loaded, 5 * 4);
        run.finish();
    });
}

#[test]
fn a_huge_prefetch_depth_is_clamped_to_the_streamed_units() {
    with_timeout(|| {
        let units = [vec![UnitSpec::resident(7)], streamable(&[10, 30, 20])].concat();
        let plan = Plan::stream(&units, 100_000);
        assert_eq!((plan.n_slots(), plan.prefetch_depth(), plan.requested_prefetch_depth()), (3, 2, Some(100_000)));
        assert_eq!(plan.peak_weight_bytes(), 7 + 3 * 30);
        assert_eq!(Plan::stream(&units, 2).requested_prefetch_depth(), None, "a depth that fits is not noted");

        let mut setup = Setup::new(units.to_vec(), plan);
        setup.config.device_delay_us = vec![200];
        setup.caller.keep = 2;
        let mut run = setup.start().unwrap();
        run.residency.expect_passes(4);
        for _ in 0..4 {
            assert_eq!(run.pass(None).unwrap(), setup.expected_contents());
        }
        assert_eq!(run.ledger.peak_bytes(), 7 + 3 * 30);
        assert_eq!(run.loader.peak_live_bytes(), 7 + 3 * 30);
        assert_eq!(run.loader.duplicates(), 0, "no unit is loaded while an earlier load of it is alive");
        assert_eq!(run.residency.stats().units_loaded, 4 * 3);
        run.finish();
    });
}

#[test]
fn a_wrong_size_is_refused() {
    with_timeout(|| {
        let units = [vec![UnitSpec::resident(10)], streamable(&[20, 30])].concat();
        let plan = Plan::stream(&units, 1);
        for (unit_idx, planned) in [(0, 10), (2, 30)] {
            let setup =
                Setup::new(units.clone(), plan.clone()).with_config(|config| config.wrong_size_unit = Some(unit_idx));
            let mismatch = |error: &ScheduleError<FakeError>| {
                matches!(
                    error,
                    ScheduleError::Residency(ResidencyError::SizeMismatch { unit_idx: u, planned: p, loaded: l })
                        if (*u, *p, *l) == (unit_idx, planned, planned + 1)
                )
            };
            if unit_idx == 0 {
                let error = setup.start().err().expect("a resident unit of the wrong size is refused at creation");
                assert!(mismatch(&error), "{error:?}");
                continue;
            }
            let mut run = setup.start().unwrap();
            for attempt in 0..2 {
                let error = run.pass(None).unwrap_err();
                assert!(mismatch(&error), "attempt {attempt}: {error:?}");
            }
            assert_eq!(run.residency.streams_started(), 2, "each attempt on a fresh stream");
            let Run { loader, ledger, residency, .. } = run;
            drop(residency);
            loader.assert_clean();
            assert_eq!((ledger.current_bytes(), loader.live_bytes(), loader.alive()), (0, 0, 0));
        }
    });
}

#[test]
fn a_failed_allocation_gives_everything_back() {
    with_timeout(|| {
        let units = [vec![UnitSpec::resident(10), UnitSpec::resident(15)], streamable(&[20, 30, 30])].concat();
        let plan = Plan::stream(&units, 1);
        // Allocation 1 is the second resident unit; 2 and 3 are the two slots.
        for (allocation_idx, what) in [(1, "resident unit 1"), (3, "streaming slot 0")] {
            let setup = Setup::new(units.clone(), plan.clone())
                .with_config(|config| config.fail_on_allocation = Some(allocation_idx));
            let error = match setup.start() {
                Err(error) => error,
                Ok(mut run) => {
                    assert_eq!(run.ledger.current_bytes(), 25, "slots are allocated at the first pass");
                    let error = run.pass(None).unwrap_err();
                    assert_eq!((run.ledger.current_bytes(), run.loader.live_bytes()), (25, 25));
                    // The next pass allocates again, and this time it works.
                    assert_eq!(run.pass(None).unwrap(), setup.expected_contents());
                    run.finish();
                    error
                }
            };
            assert!(
                matches!(
                    &error,
                    ScheduleError::Allocate { what: w, source: FakeError::Allocate(a), .. } if w == what && *a == allocation_idx
                ),
                "{error:?}"
            );
        }
    });
}

#[test]
fn released_slots_free_their_room_until_the_next_pass() {
    with_timeout(|| {
        let units = [vec![UnitSpec::resident(10)], streamable(&[20, 30, 30])].concat();
        let setup = Setup::new(units.clone(), Plan::stream(&units, 1));
        let mut run = setup.start().unwrap();
        run.pass(None).unwrap();
        assert_eq!((run.ledger.current_bytes(), run.loader.live_bytes()), (70, 70));
        run.residency.release_slots();
        assert_eq!(run.ledger.current_bytes(), 10, "the slots' room is free");
        // The buffers themselves go once the compute stream is done with them, as a stream-ordered
        // free would.
        run.loader.sync();
        assert_eq!(run.loader.live_bytes(), 10);
        assert_eq!(run.pass(None).unwrap(), setup.expected_contents());
        assert_eq!((run.residency.streams_started(), run.loader.allocations()), (2, 5));
        assert_eq!(run.residency.stats().units_loaded, 6, "the figures of the released stream still count");
        run.finish();
    });
}

#[test]
fn an_all_resident_plan_streams_nothing() {
    with_timeout(|| {
        let units = streamable(&[10, 20]);
        let setup = Setup::new(units.clone(), Plan::all(&units));
        let mut run = setup.start().unwrap();
        for _ in 0..3 {
            assert_eq!(run.pass(None).unwrap(), setup.expected_contents());
        }
        assert!(run.residency.resident(1).is_some_and(|unit| unit.loaded_idx == 1));
        assert_eq!((run.residency.streams_started(), run.residency.stats().units_loaded), (0, 0));
        assert_eq!(run.loader.allocations(), 2);
        run.finish();
    });
}

#[test]
fn misuse_of_a_pass_is_an_error() {
    with_timeout(|| {
        let units = [vec![UnitSpec::resident(10)], streamable(&[20, 30])].concat();
        let mut run = Setup::new(units.clone(), Plan::stream(&units, 1)).start().unwrap();
        let mut pass = run.residency.pass().unwrap();
        for unit_idx in [0, 1, 0, 2, 0] {
            drop(pass.unit(unit_idx).unwrap());
        }
        let error = pass.unit(1).err().unwrap();
        assert!(matches!(error, ScheduleError::Residency(ResidencyError::PassComplete { pass_len: 2 })), "{error:?}");
        let error = pass.unit(3).err().unwrap();
        assert!(matches!(error, ScheduleError::Residency(ResidencyError::NotInPlan { unit_idx: 3, n_units: 3 })));
        assert!(matches!(error.into_error(), FakeError::Runtime(ResidencyError::NotInPlan { .. })));
        let load = ScheduleError::<FakeError>::Load { unit_idx: 1, source: FakeError::Load(7) };
        assert!(matches!(load.into_error(), FakeError::Load(7)), "a loader's error comes back as it was");
        drop(pass);
        run.finish();
    });
}

/// Units the caller kept from an abandoned pass still hold their slots when a fresh stream starts:
/// asking for a unit then is an error, not a wait for a slot that never comes.
#[test]
fn units_kept_across_a_fresh_stream_still_count_as_held() {
    with_timeout(|| {
        let units = streamable(&[20, 30, 30]);
        let setup = Setup::new(units.clone(), Plan::stream(&units, 1));
        let mut run = setup.start().unwrap();
        let mut pass = run.residency.pass().unwrap();
        let kept: Vec<_> = (0..2)
            .map(|unit_idx| match pass.unit(unit_idx).unwrap() {
                UnitRef::Streamed(loaded) => loaded,
                UnitRef::Resident(_) => unreachable!(),
            })
            .collect();
        drop(pass);
        let mut pass = run.residency.pass().unwrap();
        let error = pass.unit(0).err().expect("both slots are held");
        assert!(matches!(error, ScheduleError::Residency(ResidencyError::AllSlotsHeld { n_slots: 2 })), "{error:?}");
        drop(pass);
        drop(kept);
        assert_eq!(run.pass(None).unwrap(), setup.expected_contents());
        run.finish();
    });
}
