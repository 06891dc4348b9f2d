//! A fake [`UnitLoader`] for the runtime's tests, shared by `schedule.rs` and `residency.rs`.
//!
//! It plays a device with two streams, as CUDA does:
//!
//! - **Buffers** are real heap buffers whose bytes the loader counts while they live (allocated
//!   minus dropped), so a test measures the peak instead of restating the planner's formula.
//! - **Fences** are checkable objects: a sequence number, a signalled flag and, for a consumed
//!   fence, the buffer and load it releases.
//! - **A compute stream** (a thread) runs the consumer's work on each unit *after* the host has let
//!   go of it, reading the unit's buffer after a delay, and signals a consumed fence only once the
//!   work queued before it is done. So a slot handed back too early, or a load that does not wait
//!   for the fence it was given, overwrites a buffer the compute stream still reads, and the read
//!   sees it.
//! - `load_into` checks the protocol: the consumed fence that [`SlotBuffer::reuse`] hands it must
//!   be the one recorded when the slot's previous unit was released (or none, for a fresh buffer or
//!   a unit never handed out), and it waits for that fence before it writes, as a copy stream does.
//!
//! Problems found on the worker or the compute stream are collected, not panicked on, so that the
//! runtime's behaviour stays the same; every test ends with [`FakeLoader::assert_clean`].
#![allow(dead_code)] // Each test binary uses part of it.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use hidream_memory::{Ready, ResidencyError, SlotBuffer, UnitLoader, UnitSpec};

/// How long a load waits for a consumed fence before it reports a fence that never signals.
const FENCE_PATIENCE: Duration = Duration::from_secs(5);

/// What the fake does, and when it fails.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Bytes of each unit: what a load fills and reports.
    pub unit_bytes: Vec<u64>,
    /// Host-side sleep inside each load, by unit index (missing: 0), in microseconds.
    pub load_delay_us: Vec<u64>,
    /// How long the compute stream works with each unit, in microseconds, cycled over uses.
    pub device_delay_us: Vec<u64>,
    /// The load (counted from 0 over the loader's life) that fails, once.
    pub fail_on_load: Option<usize>,
    /// The load that panics.
    pub panic_on_load: Option<usize>,
    /// The allocation (counted from 0) that fails.
    pub fail_on_allocation: Option<usize>,
    /// A unit whose loads report one byte more than they fill.
    pub wrong_size_unit: Option<usize>,
}

impl Config {
    pub fn new(unit_bytes: &[u64]) -> Self {
        Config { unit_bytes: unit_bytes.to_vec(), ..Config::default() }
    }

    pub fn specs(&self) -> Vec<UnitSpec> {
        self.unit_bytes.iter().map(|&bytes| UnitSpec::streamable(bytes)).collect()
    }
}

#[derive(Debug)]
pub enum FakeError {
    Load(usize),
    Allocate(usize),
    /// The runtime's own error, as a caller's error type wraps it ([`ScheduleError::into_error`]).
    Runtime(ResidencyError),
}

impl fmt::Display for FakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FakeError::Load(load_idx) => write!(f, "fake failure on load {load_idx}"),
            FakeError::Allocate(allocation_idx) => write!(f, "fake failure on allocation {allocation_idx}"),
            FakeError::Runtime(error) => write!(f, "runtime: {error}"),
        }
    }
}

impl std::error::Error for FakeError {}

impl From<ResidencyError> for FakeError {
    fn from(error: ResidencyError) -> Self {
        FakeError::Runtime(error)
    }
}

/// An ordering point: signalled once the work before it is done.
#[derive(Debug, Clone)]
pub struct Fence(Arc<FenceCell>);

#[derive(Debug)]
pub struct FenceCell {
    pub seq: u64,
    /// For a consumed fence: the buffer and the load it releases.
    pub releases: Option<(usize, u64)>,
    signalled: Mutex<bool>,
    changed: Condvar,
    /// For a ready fence: whether the consumer side waited on it.
    waited: AtomicBool,
}

impl Fence {
    fn new(seq: u64, releases: Option<(usize, u64)>, signalled: bool) -> Self {
        Fence(Arc::new(FenceCell {
            seq,
            releases,
            signalled: Mutex::new(signalled),
            changed: Condvar::new(),
            waited: AtomicBool::new(false),
        }))
    }

    fn signal(&self) {
        *lock(&self.0.signalled) = true;
        self.0.changed.notify_all();
    }

    pub fn is_signalled(&self) -> bool {
        *lock(&self.0.signalled)
    }

    /// Waits until signalled; false if it was not within `patience`.
    fn wait(&self, patience: Duration) -> bool {
        let guard = lock(&self.0.signalled);
        let (guard, _) = self.0.changed.wait_timeout_while(guard, patience, |signalled| !*signalled).unwrap();
        *guard
    }
}

/// A buffer on the fake device. Its bytes count as live until it is dropped.
#[derive(Debug)]
pub struct FakeBuffer(Arc<BufferCell>);

#[derive(Debug)]
pub struct BufferCell {
    id: usize,
    bytes: u64,
    contents: Mutex<Contents>,
    counters: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Contents {
    /// The load whose bytes are in the buffer: its unit index and generation.
    loaded: Option<(usize, u64)>,
    data: Vec<u8>,
}

impl Drop for BufferCell {
    fn drop(&mut self) {
        self.counters.live_bytes.fetch_sub(self.bytes, Ordering::SeqCst);
    }
}

/// A loaded unit: a view into its buffer, with its ready fence.
#[derive(Debug)]
pub struct FakeUnit {
    /// The index the loader was asked for, to check against the one the runtime reports.
    pub loaded_idx: usize,
    generation: u64,
    buffer: Arc<BufferCell>,
    ready: Fence,
    counters: Arc<Counters>,
}

impl FakeUnit {
    /// The buffer this unit lives in (each slot and each resident unit has its own).
    pub fn buffer_id(&self) -> usize {
        self.buffer.id
    }
}

thread_local! {
    /// The buffer and load of the last unit dropped on this thread: `record_consumed` must come
    /// right after the unit it releases is dropped, on the same thread.
    static JUST_DROPPED: Cell<Option<(usize, u64)>> = const { Cell::new(None) };
}

impl Drop for FakeUnit {
    fn drop(&mut self) {
        JUST_DROPPED.set(Some((self.buffer.id, self.generation)));
        let mut alive = lock(&self.counters.alive_by_unit);
        alive[self.loaded_idx] -= 1;
        self.counters.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Figures shared by the loader, its buffers, its units and the compute stream.
#[derive(Debug, Default)]
struct Counters {
    live_bytes: AtomicU64,
    peak_live_bytes: AtomicU64,
    alive: AtomicUsize,
    max_alive: AtomicUsize,
    alive_by_unit: Mutex<Vec<usize>>,
    /// Whether two loads of one unit were ever alive at once.
    duplicates: AtomicUsize,
    violations: Mutex<Vec<String>>,
}

impl Counters {
    fn violation(&self, problem: String) {
        lock(&self.violations).push(problem);
    }
}

/// What the loader knows of one buffer's history.
#[derive(Debug, Default)]
struct BufferHistory {
    loads: u64,
    /// The last load into the buffer, and the consumed fence recorded when its unit was released.
    last_load: Option<(u64, Option<u64>)>,
}

#[derive(Debug, Default)]
struct State {
    buffers: HashMap<usize, BufferHistory>,
    /// Sequence numbers of fences, loads and buffers.
    next_seq: u64,
}

enum Task {
    /// The consumer's work with a unit: read its buffer after a delay, expecting that load.
    Compute {
        buffer: Arc<BufferCell>,
        loaded: (usize, u64),
        delay: Duration,
    },
    Signal(Fence),
}

pub struct FakeLoader {
    config: Config,
    state: Mutex<State>,
    counters: Arc<Counters>,
    compute_stream: Mutex<Sender<Task>>,
    uses: AtomicUsize,
    allocations: AtomicUsize,
    loads_started: AtomicUsize,
    loads_in_flight: AtomicUsize,
    ready_waits: AtomicUsize,
    consumed_recorded: AtomicUsize,
}

impl FakeLoader {
    pub fn new(config: Config) -> Arc<Self> {
        let counters = Arc::new(Counters::default());
        *lock(&counters.alive_by_unit) = vec![0; config.unit_bytes.len()];
        let (sender, tasks) = mpsc::channel();
        let stream_counters = Arc::clone(&counters);
        thread::spawn(move || run_compute_stream(&tasks, &stream_counters));
        Arc::new(FakeLoader {
            config,
            state: Mutex::default(),
            counters,
            compute_stream: Mutex::new(sender),
            uses: AtomicUsize::new(0),
            allocations: AtomicUsize::new(0),
            loads_started: AtomicUsize::new(0),
            loads_in_flight: AtomicUsize::new(0),
            ready_waits: AtomicUsize::new(0),
            consumed_recorded: AtomicUsize::new(0),
        })
    }

    /// The consumer uses `unit` (handed out by the runtime as `unit_idx`): checks that its ready
    /// fence was waited on and that its buffer holds it, queues the compute stream's work with it,
    /// and returns what it holds, to compare runs.
    pub fn use_unit(&self, unit_idx: usize, unit: &FakeUnit) -> (usize, u64) {
        assert_eq!(unit.loaded_idx, unit_idx, "the runtime handed out a different unit than it says");
        assert!(
            unit.ready.0.waited.load(Ordering::SeqCst),
            "unit {unit_idx} used before its ready fence was waited on"
        );
        let checksum = {
            let contents = lock(&unit.buffer.contents);
            assert_eq!(contents.loaded, Some((unit_idx, unit.generation)), "unit {unit_idx}'s buffer was overwritten");
            checksum(&contents.data[..self.config.unit_bytes[unit_idx] as usize])
        };
        let use_idx = self.uses.fetch_add(1, Ordering::SeqCst);
        let delay = cycled(&self.config.device_delay_us, use_idx);
        let task = Task::Compute { buffer: Arc::clone(&unit.buffer), loaded: (unit_idx, unit.generation), delay };
        self.send(task);
        (unit_idx, checksum)
    }

    /// Waits until the compute stream has done everything queued so far.
    pub fn sync(&self) {
        let fence = Fence::new(u64::MAX, None, false);
        self.send(Task::Signal(fence.clone()));
        assert!(fence.wait(FENCE_PATIENCE), "the compute stream is stuck");
    }

    /// Panics with every protocol violation seen on any thread.
    pub fn assert_clean(&self) {
        self.sync();
        let violations = lock(&self.counters.violations);
        assert!(violations.is_empty(), "protocol violations:\n{}", violations.join("\n"));
    }

    pub fn allocations(&self) -> usize {
        self.allocations.load(Ordering::SeqCst)
    }

    /// Calls of `load_into`, failed ones included.
    pub fn loads_started(&self) -> usize {
        self.loads_started.load(Ordering::SeqCst)
    }

    pub fn loads_in_flight(&self) -> usize {
        self.loads_in_flight.load(Ordering::SeqCst)
    }

    pub fn ready_waits(&self) -> usize {
        self.ready_waits.load(Ordering::SeqCst)
    }

    pub fn consumed_recorded(&self) -> usize {
        self.consumed_recorded.load(Ordering::SeqCst)
    }

    /// Bytes of the buffers alive now, and the most alive at once.
    pub fn live_bytes(&self) -> u64 {
        self.counters.live_bytes.load(Ordering::SeqCst)
    }

    pub fn peak_live_bytes(&self) -> u64 {
        self.counters.peak_live_bytes.load(Ordering::SeqCst)
    }

    /// Starts a new peak measurement.
    pub fn reset_peak(&self) {
        self.counters.peak_live_bytes.store(self.live_bytes(), Ordering::SeqCst);
    }

    /// Loaded units alive now, and the most alive at once.
    pub fn alive(&self) -> usize {
        self.counters.alive.load(Ordering::SeqCst)
    }

    pub fn max_alive(&self) -> usize {
        self.counters.max_alive.load(Ordering::SeqCst)
    }

    /// How many times a unit was loaded while an earlier load of it was still alive.
    pub fn duplicates(&self) -> usize {
        self.counters.duplicates.load(Ordering::SeqCst)
    }

    /// How many loads each buffer took, by buffer id.
    pub fn loads_per_buffer(&self) -> HashMap<usize, u64> {
        lock(&self.state).buffers.iter().map(|(&id, history)| (id, history.loads)).collect()
    }

    fn send(&self, task: Task) {
        lock(&self.compute_stream).send(task).expect("the compute stream runs while the loader lives");
    }

    fn next_seq(&self) -> u64 {
        let mut state = lock(&self.state);
        state.next_seq += 1;
        state.next_seq
    }

    /// Checks the consumed fence a load got against the buffer's history, then waits for it.
    fn follow_consumed(&self, buffer_id: usize, loads_before: u64, consumed: Option<Fence>) {
        let expected = {
            let mut state = lock(&self.state);
            let history = state.buffers.entry(buffer_id).or_default();
            if loads_before != history.loads {
                self.counters.violation(format!(
                    "buffer {buffer_id}: slot.loads() says {loads_before} earlier loads, the loader saw {}",
                    history.loads
                ));
            }
            history.last_load
        };
        let got = consumed.as_ref().map(|fence| (fence.0.seq, fence.0.releases));
        match (expected, got) {
            (None | Some((_, None)), None) => {}
            (Some((generation, Some(seq))), Some((got_seq, releases)))
                if got_seq == seq && releases == Some((buffer_id, generation)) => {}
            _ => self.counters.violation(format!(
                "buffer {buffer_id}: a load got consumed fence {got:?}, expected the one recorded for {expected:?}"
            )),
        }
        if let Some(fence) = consumed {
            // A copy stream waits on the consumed event before it overwrites the slot.
            if !fence.wait(FENCE_PATIENCE) || !fence.is_signalled() {
                self.counters.violation(format!("buffer {buffer_id}: consumed fence {} never signalled", fence.0.seq));
            }
        }
    }
}

impl UnitLoader for FakeLoader {
    type Buffer = FakeBuffer;
    type Unit = FakeUnit;
    type Fence = Fence;
    type Error = FakeError;

    fn allocate(&self, bytes: u64) -> Result<FakeBuffer, FakeError> {
        let allocation_idx = self.allocations.fetch_add(1, Ordering::SeqCst);
        if self.config.fail_on_allocation == Some(allocation_idx) {
            return Err(FakeError::Allocate(allocation_idx));
        }
        let live = self.counters.live_bytes.fetch_add(bytes, Ordering::SeqCst) + bytes;
        self.counters.peak_live_bytes.fetch_max(live, Ordering::SeqCst);
        let contents = Contents { loaded: None, data: vec![0; bytes as usize] };
        let id = self.next_seq() as usize;
        Ok(FakeBuffer(Arc::new(BufferCell {
            id,
            bytes,
            contents: Mutex::new(contents),
            counters: Arc::clone(&self.counters),
        })))
    }

    fn load_into(
        &self,
        unit_idx: usize,
        slot: &mut SlotBuffer<FakeBuffer, Fence>,
    ) -> Result<Ready<FakeUnit, Fence>, FakeError> {
        let load_idx = self.loads_started.fetch_add(1, Ordering::SeqCst);
        self.loads_in_flight.fetch_add(1, Ordering::SeqCst);
        let _in_flight = InFlight(&self.loads_in_flight);
        if self.config.fail_on_load == Some(load_idx) {
            return Err(FakeError::Load(load_idx));
        }
        if self.config.panic_on_load == Some(load_idx) {
            panic!("fake panic on load {load_idx}");
        }
        let bytes = self.config.unit_bytes[unit_idx];
        if bytes > slot.bytes() {
            self.counters.violation(format!("unit {unit_idx} ({bytes} bytes) loaded into a slot of {}", slot.bytes()));
        }
        let loads_before = slot.loads();
        let (buffer, consumed) = slot.reuse();
        let buffer = Arc::clone(&buffer.0);
        self.follow_consumed(buffer.id, loads_before, consumed);
        thread::sleep(Duration::from_micros(self.config.load_delay_us.get(unit_idx).copied().unwrap_or(0)));

        let generation = self.next_seq();
        {
            let mut contents = lock(&buffer.contents);
            contents.loaded = Some((unit_idx, generation));
            for (offset, byte) in contents.data[..bytes as usize].iter_mut().enumerate() {
                *byte = pattern(unit_idx, offset);
            }
        }
        let mut state = lock(&self.state);
        let history = state.buffers.entry(buffer.id).or_default();
        history.loads += 1;
        history.last_load = Some((generation, None));
        let ready = Fence::new(generation, None, true);
        drop(state);

        let mut alive_by_unit = lock(&self.counters.alive_by_unit);
        alive_by_unit[unit_idx] += 1;
        if alive_by_unit[unit_idx] > 1 {
            self.counters.duplicates.fetch_add(1, Ordering::SeqCst);
        }
        drop(alive_by_unit);
        let alive = self.counters.alive.fetch_add(1, Ordering::SeqCst) + 1;
        self.counters.max_alive.fetch_max(alive, Ordering::SeqCst);
        let unit = FakeUnit {
            loaded_idx: unit_idx,
            generation,
            buffer,
            ready: ready.clone(),
            counters: Arc::clone(&self.counters),
        };
        let bytes_loaded = bytes + u64::from(self.config.wrong_size_unit == Some(unit_idx));
        Ok(Ready { unit, ready, bytes_loaded })
    }

    fn wait_ready(&self, ready: &Fence) -> Result<(), FakeError> {
        if ready.0.releases.is_some() || !ready.is_signalled() {
            self.counters.violation(format!("wait_ready on fence {} that is not a loaded unit's", ready.0.seq));
        }
        ready.0.waited.store(true, Ordering::SeqCst);
        self.ready_waits.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn record_consumed(&self) -> Fence {
        self.consumed_recorded.fetch_add(1, Ordering::SeqCst);
        let releases = JUST_DROPPED.take();
        let seq = self.next_seq();
        match releases {
            None => self.counters.violation("record_consumed before the unit it releases was dropped".to_owned()),
            Some((buffer_id, generation)) => {
                let mut state = lock(&self.state);
                let history = state.buffers.entry(buffer_id).or_default();
                match &mut history.last_load {
                    Some((last, consumed @ None)) if *last == generation => *consumed = Some(seq),
                    last => self.counters.violation(format!(
                        "buffer {buffer_id}: load {generation} released, but the buffer's last load is {last:?}"
                    )),
                }
            }
        }
        let fence = Fence::new(seq, releases, false);
        // Signalled by the compute stream once the work queued before it is done.
        self.send(Task::Signal(fence.clone()));
        fence
    }
}

fn run_compute_stream(tasks: &Receiver<Task>, counters: &Counters) {
    for task in tasks {
        match task {
            Task::Compute { buffer, loaded, delay } => {
                thread::sleep(delay);
                let now = lock(&buffer.contents).loaded;
                if now != Some(loaded) {
                    counters.violation(format!(
                        "buffer {}: overwritten by load {now:?} while the compute stream still read load {loaded:?}",
                        buffer.id
                    ));
                }
            }
            Task::Signal(fence) => fence.signal(),
        }
    }
}

/// Counts a load as in flight while it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a correct load of `unit_idx` holds: the figures [`FakeLoader::use_unit`] returns.
pub fn contents_of(unit_idx: usize, bytes: u64) -> (usize, u64) {
    let data: Vec<u8> = (0..bytes as usize).map(|offset| pattern(unit_idx, offset)).collect();
    (unit_idx, checksum(&data))
}

/// The byte a load of `unit_idx` writes at `offset`.
fn pattern(unit_idx: usize, offset: usize) -> u8 {
    (unit_idx.wrapping_mul(31).wrapping_add(offset) % 251) as u8
}

fn checksum(data: &[u8]) -> u64 {
    data.iter().fold(0u64, |sum, &byte| sum.wrapping_mul(257).wrapping_add(u64::from(byte)))
}

fn cycled(values: &[u64], idx: usize) -> Duration {
    Duration::from_micros(if values.is_empty() { 0 } else { values[idx % values.len()] })
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `body` on its own thread and fails if it takes longer than 20 s: a deadlock fails the test
/// instead of hanging it.
pub fn with_timeout<T: Send + 'static>(body: impl FnOnce() -> T + Send + 'static) -> T {
    let (sender, result) = mpsc::channel();
    let thread = thread::spawn(move || sender.send(body()).unwrap());
    match result.recv_timeout(Duration::from_secs(20)) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Disconnected) => std::panic::resume_unwind(thread.join().unwrap_err()),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("deadlock: the test did not finish in time"),
    }
}
