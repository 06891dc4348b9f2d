//! The staged-upload protocol ([`Stager`] over [`ThreadQueues`]) driven by the residency runtime,
//! as the GPU loader drives it over CUDA streams: a real copy thread, a real compute thread, real
//! events and random delays on both.
//!
//! Every "kernel" runs on the compute thread and checks the bytes of the unit it was launched
//! with, when it runs. So a slot refilled before its consumer's fence, or a unit read before its
//! ready fence, shows as a kernel that saw the wrong bytes. The negative controls skip one wait
//! each and must see exactly that.

#[path = "support/fake_loader.rs"]
mod fake_loader;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fake_loader::with_timeout;
use hidream_memory::staged::{CopyQueues, HostBuffer, HostEvent, QueueError, StageError, Stager, ThreadQueues};
use hidream_memory::{BudgetLedger, Plan, Ready, Residency, ScheduleError, SlotBuffer, UnitLoader, UnitSpec};
use proptest::prelude::*;

/// Byte `offset` of unit `unit_idx`: different for neighbouring units at every offset.
fn pattern(unit_idx: usize, offset: u64) -> u8 {
    (unit_idx as u64 * 37 + offset * 7 + 1) as u8
}

/// A unit as the consumer sees it: its index, and the device buffer it lives in.
#[derive(Debug)]
struct StagedUnit {
    unit_idx: usize,
    buffer: HostBuffer,
    len: u64,
}

/// The source failed while filling a staging buffer.
#[derive(Debug, thiserror::Error)]
#[error("the source failed on unit {0} (injected)")]
struct SourceFailed(usize);

/// Which waits the loader leaves out: the negative controls.
#[derive(Debug, Clone, Copy, Default)]
struct Skip {
    /// Does not order a slot's refill after its consumed fence.
    consumed: bool,
    /// Does not make the compute queue wait for a unit's ready fence.
    ready: bool,
}

/// A GPU-shaped loader on the CPU: each unit is uploaded from the host through the stager.
struct StagedLoader {
    stager: Stager<ThreadQueues>,
    sizes: Vec<u64>,
    skip: Skip,
    /// Fails the source on this load (counted from 0 over every load).
    fail_source_at: Option<usize>,
    loads: Mutex<usize>,
}

impl StagedLoader {
    fn queues(&self) -> &ThreadQueues {
        self.stager.queues()
    }
}

impl UnitLoader for StagedLoader {
    type Buffer = HostBuffer;
    type Unit = StagedUnit;
    /// `None` is a fence that has completed.
    type Fence = Option<HostEvent>;
    type Error = StageError<QueueError, SourceFailed>;

    fn allocate(&self, bytes: u64) -> Result<HostBuffer, Self::Error> {
        Ok(HostBuffer::new(bytes as usize))
    }

    fn load_into(
        &self,
        unit_idx: usize,
        slot: &mut SlotBuffer<HostBuffer, Option<HostEvent>>,
    ) -> Result<Ready<StagedUnit, Option<HostEvent>>, Self::Error> {
        let load = {
            let mut loads = self.loads.lock().unwrap();
            *loads += 1;
            *loads - 1
        };
        let (buffer, consumed) = slot.reuse();
        if !self.skip.consumed {
            self.stager.begin(consumed.flatten().as_ref()).map_err(StageError::Queue)?;
        }
        let len = self.sizes[unit_idx];
        let fail = self.fail_source_at == Some(load);
        self.stager.upload(buffer, 0, len, |offset, out| {
            if fail {
                return Err(SourceFailed(unit_idx));
            }
            for (idx, byte) in out.iter_mut().enumerate() {
                *byte = pattern(unit_idx, offset + idx as u64);
            }
            Ok(())
        })?;
        let ready = self.stager.finish().map_err(StageError::Queue)?;
        Ok(Ready { unit: StagedUnit { unit_idx, buffer: buffer.clone(), len }, ready: Some(ready), bytes_loaded: len })
    }

    fn wait_ready(&self, ready: &Option<HostEvent>) -> Result<(), Self::Error> {
        match ready {
            Some(ready) if !self.skip.ready => self.queues().compute_waits(ready).map_err(StageError::Queue),
            _ => Ok(()),
        }
    }

    fn record_consumed(&self) -> Option<HostEvent> {
        // A compute queue that cannot record has failed; waiting for it on the host is the
        // safe, complete fence.
        self.queues().record_compute().ok().or_else(|| {
            let _ = self.queues().synchronize();
            None
        })
    }
}

/// One run: units, a plan, the queues' behaviour and the faults.
#[derive(Debug, Clone)]
struct Setup {
    sizes: Vec<u64>,
    /// Units that must stay resident.
    resident: Vec<bool>,
    /// `None` streams every streamable unit; `Some(budget)` plans within it.
    budget: Option<u64>,
    prefetch_depth: usize,
    staging_bytes: usize,
    copy_delays_us: Vec<u64>,
    compute_delays_us: Vec<u64>,
    /// Host time per unit, cycled.
    host_delays_us: Vec<u64>,
    passes: usize,
    skip: Skip,
    fail_copy: Option<usize>,
    fail_source_at: Option<usize>,
}

/// What a run saw: the kernels' checks, in the order they ran, and how it ended.
#[derive(Debug)]
struct Outcome {
    /// `(unit_idx, whether the bytes were the unit's)` per kernel.
    kernels: Vec<(usize, bool)>,
    result: Result<(), ScheduleError<StageError<QueueError, SourceFailed>>>,
}

impl Outcome {
    fn mismatches(&self) -> usize {
        self.kernels.iter().filter(|(_, ok)| !ok).count()
    }
}

fn micros(delays: &[u64]) -> Vec<Duration> {
    delays.iter().map(|&us| Duration::from_micros(us)).collect()
}

impl Setup {
    fn units(&self) -> Vec<UnitSpec> {
        self.sizes
            .iter()
            .zip(&self.resident)
            .map(|(&bytes, &resident)| if resident { UnitSpec::resident(bytes) } else { UnitSpec::streamable(bytes) })
            .collect()
    }

    fn plan(&self) -> Plan {
        let units = self.units();
        match self.budget {
            None => Plan::stream(&units, self.prefetch_depth),
            Some(budget) => {
                let minimum = Plan::minimum_budget(&units, self.prefetch_depth);
                Plan::budget(&units, budget.max(minimum), self.prefetch_depth).expect("at least the minimum fits")
            }
        }
    }

    /// Runs the passes on a thread, under a timeout, so that a hang fails the test.
    fn run(&self) -> Outcome {
        let setup = self.clone();
        with_timeout(move || setup.run_here())
    }

    fn run_here(&self) -> Outcome {
        let mut queues = ThreadQueues::new(micros(&self.copy_delays_us), micros(&self.compute_delays_us));
        if let Some(nth) = self.fail_copy {
            queues = queues.fail_copy(nth);
        }
        let queues = Arc::new(queues);
        let loader = Arc::new(StagedLoader {
            stager: Stager::new(Arc::clone(&queues), self.staging_bytes).unwrap(),
            sizes: self.sizes.clone(),
            skip: self.skip,
            fail_source_at: self.fail_source_at,
            loads: Mutex::new(0),
        });
        let kernels = Arc::new(Mutex::new(Vec::new()));
        let result = self.passes_over(&loader, &kernels);
        // Every kernel launched so far has run before the checks are read.
        queues.synchronize().unwrap();
        let kernels = kernels.lock().unwrap().clone();
        Outcome { kernels, result }
    }

    fn passes_over(
        &self,
        loader: &Arc<StagedLoader>,
        kernels: &Arc<Mutex<Vec<(usize, bool)>>>,
    ) -> Result<(), ScheduleError<StageError<QueueError, SourceFailed>>> {
        let units = self.units();
        let ledger = Arc::new(BudgetLedger::new(None));
        let mut residency = Residency::new(Arc::clone(loader), &units, self.plan(), ledger)?;
        residency.expect_passes(self.passes as u64);
        let mut host_delays = micros(&self.host_delays_us).into_iter().cycle();
        for _ in 0..self.passes {
            let mut pass = residency.pass()?;
            for unit_idx in 0..units.len() {
                let unit = pass.unit(unit_idx)?;
                assert_eq!(unit.unit_idx, unit_idx);
                let (buffer, len, kernels) = (unit.buffer.clone(), unit.len, Arc::clone(kernels));
                loader
                    .queues()
                    .launch(move || {
                        let ok = buffer
                            .read(|bytes| (0..len).all(|offset| bytes[offset as usize] == pattern(unit_idx, offset)));
                        kernels.lock().unwrap().push((unit_idx, ok));
                    })
                    .map_err(|error| ScheduleError::Load { unit_idx, source: StageError::Queue(error) })?;
                // The host releases the unit at once; the kernel still has to run.
                drop(unit);
                if let Some(delay) = host_delays.next() {
                    std::thread::sleep(delay);
                }
            }
        }
        Ok(())
    }
}

fn setup() -> impl Strategy<Value = Setup> {
    (2usize..7)
        .prop_flat_map(|n_units| {
            (
                prop::collection::vec(1u64..300, n_units),
                prop::collection::vec(prop::bool::weighted(0.2), n_units),
                prop::option::of(0u64..1500),
                0usize..3,
                1usize..96,
                prop::collection::vec(0u64..400, 0..4),
                prop::collection::vec(0u64..400, 0..4),
                prop::collection::vec(0u64..300, 0..3),
                1usize..4,
            )
        })
        .prop_map(
            |(
                sizes,
                resident,
                budget,
                prefetch_depth,
                staging_bytes,
                copy_delays_us,
                compute_delays_us,
                host_delays_us,
                passes,
            )| Setup {
                sizes,
                resident,
                budget,
                prefetch_depth,
                staging_bytes,
                copy_delays_us,
                compute_delays_us,
                host_delays_us,
                passes,
                skip: Skip::default(),
                fail_copy: None,
                fail_source_at: None,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Under any delays, every kernel sees its own unit's bytes: no slot is refilled before its
    /// consumer's fence and no unit is read before its ready fence. Every unit ran in every pass.
    #[test]
    fn kernels_see_their_units_under_random_delays(setup in setup()) {
        let outcome = setup.run();
        prop_assert!(outcome.result.is_ok(), "{:?}", outcome.result);
        prop_assert_eq!(outcome.mismatches(), 0, "{:?}", outcome.kernels);
        let expected: Vec<usize> = (0..setup.passes).flat_map(|_| 0..setup.sizes.len()).collect();
        let ran: Vec<usize> = outcome.kernels.iter().map(|&(unit_idx, _)| unit_idx).collect();
        prop_assert_eq!(ran, expected);
    }

    /// A copy that fails, or a source that fails, anywhere ends the run with that error, without
    /// a hang, and every kernel that ran before it saw the right bytes.
    #[test]
    fn a_failure_anywhere_ends_the_run_with_its_error(
        setup in setup(),
        copy_fault in any::<bool>(),
        at in any::<prop::sample::Index>(),
    ) {
        let mut setup = setup;
        // Pieces per load and loads per run, so that the fault lands inside the run.
        let pieces: usize = setup.sizes.iter().map(|&len| (len as usize).div_ceil(setup.staging_bytes)).sum();
        if copy_fault {
            setup.fail_copy = Some(at.index(pieces));
        } else {
            setup.fail_source_at = Some(at.index(setup.sizes.len()));
        }
        let outcome = setup.run();
        prop_assert_eq!(outcome.mismatches(), 0, "{:?}", outcome.kernels);
        match &outcome.result {
            Err(ScheduleError::Load { source: StageError::Queue(QueueError::Injected(_)), .. }) => prop_assert!(copy_fault),
            Err(ScheduleError::Load { source: StageError::Source(SourceFailed(_)), .. }) => prop_assert!(!copy_fault),
            other => prop_assert!(false, "expected the injected failure, got {:?}", other),
        }
    }
}

/// Four streamed units of 64 bytes over two slots, with the given delays and a skipped wait.
fn control(copy_delay_ms: u64, compute_delay_ms: u64, skip: Skip) -> Outcome {
    Setup {
        sizes: vec![64; 4],
        resident: vec![false; 4],
        budget: None,
        prefetch_depth: 1,
        staging_bytes: 64,
        copy_delays_us: vec![copy_delay_ms * 1000],
        compute_delays_us: vec![compute_delay_ms * 1000],
        host_delays_us: Vec::new(),
        passes: 1,
        skip,
        fail_copy: None,
        fail_source_at: None,
    }
    .run()
}

/// Negative control: a loader that does not wait for the ready fence lets kernels read a slot
/// before its copy lands (a slow copy queue makes it certain). With the wait, none does.
#[test]
fn skipping_the_ready_wait_reads_before_the_copy() {
    let skipped = control(20, 0, Skip { ready: true, ..Skip::default() });
    assert!(skipped.result.is_ok(), "{:?}", skipped.result);
    assert!(skipped.mismatches() > 0, "the check must catch a read before the ready fence: {:?}", skipped.kernels);
    let kept = control(20, 0, Skip::default());
    assert_eq!(kept.mismatches(), 0, "{:?}", kept.kernels);
}

/// Negative control: a loader that does not order a refill after the consumed fence overwrites a
/// slot while a slow kernel still has to read it. With the wait, nothing is overwritten early.
#[test]
fn skipping_the_consumed_wait_overwrites_a_slot_in_use() {
    let skipped = control(0, 20, Skip { consumed: true, ..Skip::default() });
    assert!(skipped.result.is_ok(), "{:?}", skipped.result);
    assert!(skipped.mismatches() > 0, "the check must catch a refill before the consumed fence: {:?}", skipped.kernels);
    let kept = control(0, 20, Skip::default());
    assert_eq!(kept.mismatches(), 0, "{:?}", kept.kernels);
}

/// A plain upload larger than the staging buffers goes in staging-sized pieces, alternating the
/// two buffers, and lands whole; the ready event completes after the last piece.
#[test]
fn an_upload_goes_through_the_staging_buffers_in_pieces() {
    with_timeout(|| {
        let queues = Arc::new(ThreadQueues::new(vec![Duration::from_micros(200)], Vec::new()));
        let stager = Stager::new(Arc::clone(&queues), 64).unwrap();
        assert_eq!(stager.staging_bytes(), 64);
        let mut device = HostBuffer::new(1100);
        let mut pieces = Vec::new();
        stager
            .upload(&mut device, 100, 1000, |offset, out| {
                pieces.push((offset, out.len()));
                out.iter_mut().enumerate().for_each(|(idx, byte)| *byte = pattern(3, offset + idx as u64));
                Ok::<(), std::io::Error>(())
            })
            .unwrap();
        let ready = stager.finish().unwrap();
        queues.host_waits(&ready).unwrap();
        assert!(ready.is_complete());
        assert_eq!(pieces.len(), 1000usize.div_ceil(64));
        assert!(pieces.iter().all(|&(offset, len)| len == 64 || offset + len as u64 == 1000), "{pieces:?}");
        device.read(|bytes| {
            assert!(bytes[..100].iter().all(|&byte| byte == 0), "bytes before the offset are untouched");
            assert!((0..1000).all(|offset| bytes[100 + offset as usize] == pattern(3, offset)));
        });
        // A copy past the buffer's end is refused before anything is queued.
        let error = stager.upload(&mut device, 1000, 200, |_, _| Ok::<(), std::io::Error>(())).unwrap_err();
        assert!(matches!(error, StageError::Queue(QueueError::OutOfBounds { .. })), "{error:?}");
    });
}
