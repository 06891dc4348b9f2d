//! [`ThreadQueues`]: the [`CopyQueues`] protocol on the CPU, with a real copy thread, a real
//! compute thread and real events, for testing the order a GPU needs.
//!
//! Each queue is a thread that runs its jobs in the order they were enqueued, after an optional
//! delay per job. A copy job copies staging bytes into a device buffer when the copy thread gets to
//! it, not when it is enqueued; a wait job blocks its queue until the event completes. So a host
//! that refills a staging buffer too early, a copy that does not wait for a consumed event, or a
//! kernel that does not wait for a ready event reads or writes bytes at the wrong time, and the
//! bytes show it.
//!
//! Nothing waits forever: an event that does not complete within the patience is an error on the
//! queue (or the host) that waited for it.

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use super::CopyQueues;

/// How long a queue or the host waits for an event before it reports one that never completes.
const PATIENCE: Duration = Duration::from_secs(10);

/// What went wrong on a [`ThreadQueues`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// A failure injected by the test ([`ThreadQueues::fail_copy`]).
    #[error("copy {0} failed (injected)")]
    Injected(usize),
    /// An event did not complete within the patience.
    #[error("the {queue} waited {PATIENCE:?} for an event that never completed")]
    Stalled { queue: &'static str },
    /// A copy out of a buffer's bounds.
    #[error("a copy of {len} bytes at {offset} overruns a buffer of {capacity}")]
    OutOfBounds { offset: u64, len: usize, capacity: usize },
    /// The queue's thread is gone.
    #[error("the {0} thread is gone")]
    Gone(&'static str),
}

/// Host memory shared between the host and a queue thread: a staging or device buffer.
#[derive(Debug, Clone, Default)]
pub struct HostBuffer(Arc<Mutex<Vec<u8>>>);

impl HostBuffer {
    pub fn new(bytes: usize) -> Self {
        HostBuffer(Arc::new(Mutex::new(vec![0; bytes])))
    }

    /// Runs `read` over the bytes as they are now.
    pub fn read<R>(&self, read: impl FnOnce(&[u8]) -> R) -> R {
        read(&self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn len(&self) -> usize {
        self.read(<[u8]>::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An event of a [`ThreadQueues`]: complete once its queue has run the work enqueued before it.
#[derive(Debug, Clone, Default)]
pub struct HostEvent(Arc<(Mutex<bool>, Condvar)>);

impl HostEvent {
    fn complete(&self) {
        *self.0.0.lock().unwrap_or_else(PoisonError::into_inner) = true;
        self.0.1.notify_all();
    }

    pub fn is_complete(&self) -> bool {
        *self.0.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits up to `patience`; whether the event completed.
    fn wait(&self, patience: Duration) -> bool {
        let done = self.0.0.lock().unwrap_or_else(PoisonError::into_inner);
        let (done, _) =
            self.0.1.wait_timeout_while(done, patience, |done| !*done).unwrap_or_else(PoisonError::into_inner);
        *done
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// One queue: a thread running jobs in order, with a sticky error once a wait stalls.
struct Queue {
    name: &'static str,
    jobs: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    failed: Arc<Mutex<Option<QueueError>>>,
}

impl Queue {
    fn spawn(name: &'static str, delays: Vec<Duration>) -> Self {
        let (sender, jobs) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(name.replace(' ', "-"))
            .spawn(move || {
                for (idx, job) in jobs.into_iter().enumerate() {
                    if let Some(delay) = (!delays.is_empty()).then(|| delays[idx % delays.len()]) {
                        std::thread::sleep(delay);
                    }
                    job();
                }
            })
            .ok();
        let sender = thread.is_some().then_some(sender);
        Queue { name, jobs: Mutex::new(sender), thread: Mutex::new(thread), failed: Arc::new(Mutex::new(None)) }
    }

    fn enqueue(&self, job: impl FnOnce() + Send + 'static) -> Result<(), QueueError> {
        if let Some(error) = self.failed.lock().unwrap_or_else(PoisonError::into_inner).clone() {
            return Err(error);
        }
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let sent = jobs.as_ref().map(|jobs| jobs.send(Box::new(job)));
        match sent {
            Some(Ok(())) => Ok(()),
            _ => Err(QueueError::Gone(self.name)),
        }
    }

    fn record(&self) -> Result<HostEvent, QueueError> {
        let event = HostEvent::default();
        let signal = event.clone();
        self.enqueue(move || signal.complete())?;
        Ok(event)
    }

    fn wait(&self, event: &HostEvent) -> Result<(), QueueError> {
        let (event, failed, name) = (event.clone(), Arc::clone(&self.failed), self.name);
        self.enqueue(move || {
            if !event.wait(PATIENCE) {
                *failed.lock().unwrap_or_else(PoisonError::into_inner) = Some(QueueError::Stalled { queue: name });
            }
        })
    }

    fn close(&self) {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(thread) = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take() {
            let _ = thread.join();
        }
    }
}

/// The copy and compute queues of a CPU "device", each a thread. Dropping it finishes the work
/// already enqueued and joins both threads.
pub struct ThreadQueues {
    copy: Queue,
    compute: Queue,
    copies: Mutex<usize>,
    fail_copy: Option<usize>,
}

impl std::fmt::Debug for ThreadQueues {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadQueues").field("fail_copy", &self.fail_copy).finish_non_exhaustive()
    }
}

impl Default for ThreadQueues {
    fn default() -> Self {
        Self::new(Vec::new(), Vec::new())
    }
}

impl ThreadQueues {
    /// Queues whose jobs each start after a delay, cycled from `copy_delays` and `compute_delays`
    /// (none when empty).
    pub fn new(copy_delays: Vec<Duration>, compute_delays: Vec<Duration>) -> Self {
        ThreadQueues {
            copy: Queue::spawn("copy queue", copy_delays),
            compute: Queue::spawn("compute queue", compute_delays),
            copies: Mutex::new(0),
            fail_copy: None,
        }
    }

    /// Makes the `nth` call of [`CopyQueues::copy`] (counted from 0) fail.
    pub fn fail_copy(mut self, nth: usize) -> Self {
        self.fail_copy = Some(nth);
        self
    }

    /// Enqueues `kernel` on the compute queue: the consumer's work with a unit.
    pub fn launch(&self, kernel: impl FnOnce() + Send + 'static) -> Result<(), QueueError> {
        self.compute.enqueue(kernel)
    }

    /// Waits on the host until both queues have run what was enqueued so far.
    pub fn synchronize(&self) -> Result<(), QueueError> {
        for queue in [&self.copy, &self.compute] {
            let event = queue.record()?;
            if !event.wait(PATIENCE) {
                return Err(QueueError::Stalled { queue: "host" });
            }
        }
        Ok(())
    }
}

impl Drop for ThreadQueues {
    fn drop(&mut self) {
        self.copy.close();
        self.compute.close();
    }
}

impl CopyQueues for ThreadQueues {
    type Staging = HostBuffer;
    type Buffer = HostBuffer;
    type Event = HostEvent;
    type Error = QueueError;

    fn alloc_staging(&self, bytes: usize) -> Result<HostBuffer, QueueError> {
        Ok(HostBuffer::new(bytes))
    }

    fn fill_staging<E>(
        &self,
        staging: &mut HostBuffer,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), E>,
    ) -> Result<Result<(), E>, QueueError> {
        let mut bytes = staging.0.lock().unwrap_or_else(PoisonError::into_inner);
        let capacity = bytes.len();
        let out = bytes.get_mut(..len).ok_or(QueueError::OutOfBounds { offset: 0, len, capacity })?;
        Ok(fill(out))
    }

    fn copy(&self, src: &HostBuffer, len: usize, dst: &mut HostBuffer, dst_offset: u64) -> Result<(), QueueError> {
        let nth = {
            let mut copies = self.copies.lock().unwrap_or_else(PoisonError::into_inner);
            *copies += 1;
            *copies - 1
        };
        if self.fail_copy == Some(nth) {
            return Err(QueueError::Injected(nth));
        }
        let capacity = dst.len();
        let start = usize::try_from(dst_offset).unwrap_or(usize::MAX);
        if start.checked_add(len).is_none_or(|end| end > capacity) {
            return Err(QueueError::OutOfBounds { offset: dst_offset, len, capacity });
        }
        let (src, dst) = (src.clone(), dst.clone());
        // The bytes move when the copy thread runs the job, as a DMA engine moves them.
        self.copy.enqueue(move || {
            let src = src.0.lock().unwrap_or_else(PoisonError::into_inner);
            let mut dst = dst.0.lock().unwrap_or_else(PoisonError::into_inner);
            dst[start..start + len].copy_from_slice(&src[..len]);
        })
    }

    fn record_copy(&self) -> Result<HostEvent, QueueError> {
        self.copy.record()
    }

    fn copy_waits(&self, event: &HostEvent) -> Result<(), QueueError> {
        self.copy.wait(event)
    }

    fn record_compute(&self) -> Result<HostEvent, QueueError> {
        self.compute.record()
    }

    fn compute_waits(&self, event: &HostEvent) -> Result<(), QueueError> {
        self.compute.wait(event)
    }

    fn host_waits(&self, event: &HostEvent) -> Result<(), QueueError> {
        if event.wait(PATIENCE) { Ok(()) } else { Err(QueueError::Stalled { queue: "host" }) }
    }
}
