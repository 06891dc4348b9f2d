//! Staged uploads: a unit's bytes go from the host through two reusable staging buffers and a copy
//! queue into a device buffer, ordered by events. The host side of a GPU loader.
//!
//! [`CopyQueues`] is the device: two queues (copy and compute), host staging buffers, device
//! buffers and events. On CUDA the queues are streams, the staging buffers are pinned host memory
//! and the events are CUDA events. [`ThreadQueues`] is the same protocol on the CPU, with a real copy
//! thread, a real compute thread and real events, so that the order can be tested without a GPU.
//!
//! [`Stager`] is the protocol, written once for both:
//!
//! 1. [`Stager::begin`]: the copy queue waits for the slot's *consumed* event, so that no byte of
//!    the new unit lands before the slot's previous unit is done with.
//! 2. [`Stager::upload`], as often as the unit needs: the host fills a staging buffer (waiting, on
//!    the host, for that buffer's previous copy to finish), and the copy queue copies it into the
//!    device buffer. The two staging buffers alternate, so the host fills one while the other copies.
//! 3. [`Stager::finish`]: records the *ready* event on the copy queue. The consumer makes the
//!    compute queue wait for it ([`CopyQueues::compute_waits`]) and the host does not block.
//!
//! A failure anywhere returns an error and leaves the stager usable: a staging buffer whose copy
//! was never queued has no event to wait for.

mod thread;

use std::sync::{Mutex, PoisonError};

pub use thread::{HostBuffer, HostEvent, QueueError, ThreadQueues};

/// A device with a copy queue and a compute queue, host staging buffers and events.
///
/// Every method that names a queue only *enqueues* work on it; only [`CopyQueues::host_waits`]
/// blocks the calling thread.
pub trait CopyQueues: Send + Sync + 'static {
    /// Host memory the copy queue reads from: pinned memory on CUDA.
    type Staging: Send + 'static;
    /// Device memory a unit is copied into.
    type Buffer: Send + 'static;
    /// An ordering point recorded on one queue, that the other queue or the host can wait for.
    type Event: Send + Sync + 'static;
    type Error: std::error::Error + Send + Sync + 'static;

    /// A staging buffer of `bytes`. Called twice per stager, never per load.
    fn alloc_staging(&self, bytes: usize) -> Result<Self::Staging, Self::Error>;
    /// Lets `fill` write the first `len` bytes of `staging` on the host. The caller has waited for
    /// the buffer's previous copy.
    fn fill_staging<E>(
        &self,
        staging: &mut Self::Staging,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> Result<(), E>,
    ) -> Result<Result<(), E>, Self::Error>;
    /// Enqueues on the copy queue: the first `len` bytes of `src` into `dst` at `dst_offset`.
    fn copy(&self, src: &Self::Staging, len: usize, dst: &mut Self::Buffer, dst_offset: u64)
    -> Result<(), Self::Error>;
    /// Records an event after the work enqueued on the copy queue so far.
    fn record_copy(&self) -> Result<Self::Event, Self::Error>;
    /// Makes the copy queue's later work wait for `event`.
    fn copy_waits(&self, event: &Self::Event) -> Result<(), Self::Error>;
    /// Records an event after the work enqueued on the compute queue so far.
    fn record_compute(&self) -> Result<Self::Event, Self::Error>;
    /// Makes the compute queue's later work wait for `event`.
    fn compute_waits(&self, event: &Self::Event) -> Result<(), Self::Error>;
    /// Blocks the calling thread until `event` has completed.
    fn host_waits(&self, event: &Self::Event) -> Result<(), Self::Error>;
}

/// Why a staged upload failed: the device, or the source of the bytes.
#[derive(Debug, thiserror::Error)]
pub enum StageError<Q: std::error::Error + 'static, S: std::error::Error + 'static> {
    #[error(transparent)]
    Queue(Q),
    #[error(transparent)]
    Source(S),
}

/// One staging buffer and the event of its last queued copy.
struct StagingSlot<Q: CopyQueues> {
    buffer: Q::Staging,
    copied: Option<Q::Event>,
}

/// The staged-upload protocol over a [`CopyQueues`]: two staging buffers used in turn.
pub struct Stager<Q: CopyQueues> {
    queues: std::sync::Arc<Q>,
    staging_bytes: usize,
    /// Both staging buffers and which one is next. One loader thread uses them at a time; the lock
    /// makes the resident uploads of the caller's thread safe too.
    staging: Mutex<(Vec<StagingSlot<Q>>, usize)>,
}

impl<Q: CopyQueues> std::fmt::Debug for Stager<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stager").field("staging_bytes", &self.staging_bytes).finish_non_exhaustive()
    }
}

impl<Q: CopyQueues> Drop for Stager<Q> {
    /// The staging buffers are freed after the copies that read them.
    fn drop(&mut self) {
        let (slots, _) = &mut *self.staging.lock().unwrap_or_else(PoisonError::into_inner);
        for copied in slots.iter_mut().filter_map(|slot| slot.copied.take()) {
            let _ = self.queues.host_waits(&copied);
        }
    }
}

impl<Q: CopyQueues> Stager<Q> {
    /// A stager with two staging buffers of `staging_bytes` each (at least 1).
    pub fn new(queues: std::sync::Arc<Q>, staging_bytes: usize) -> Result<Self, Q::Error> {
        let staging_bytes = staging_bytes.max(1);
        let slots = (0..2)
            .map(|_| Ok(StagingSlot { buffer: queues.alloc_staging(staging_bytes)?, copied: None }))
            .collect::<Result<Vec<_>, Q::Error>>()?;
        Ok(Stager { queues, staging_bytes, staging: Mutex::new((slots, 0)) })
    }

    pub fn queues(&self) -> &std::sync::Arc<Q> {
        &self.queues
    }

    /// Bytes of each of the two staging buffers.
    pub fn staging_bytes(&self) -> usize {
        self.staging_bytes
    }

    /// Starts a load into a buffer whose previous unit released it with `consumed`: the copy
    /// queue's later work waits for that event.
    pub fn begin(&self, consumed: Option<&Q::Event>) -> Result<(), Q::Error> {
        match consumed {
            Some(event) => self.queues.copy_waits(event),
            None => Ok(()),
        }
    }

    /// Copies `len` bytes into `dst` at `dst_offset`, in staging-sized pieces. `fill(offset, out)`
    /// writes the source's bytes `offset..offset + out.len()` (counted from the start of this
    /// upload) into `out`.
    pub fn upload<E: std::error::Error + 'static>(
        &self,
        dst: &mut Q::Buffer,
        dst_offset: u64,
        len: u64,
        mut fill: impl FnMut(u64, &mut [u8]) -> Result<(), E>,
    ) -> Result<(), StageError<Q::Error, E>> {
        let mut guard = self.staging.lock().unwrap_or_else(PoisonError::into_inner);
        let (slots, next) = &mut *guard;
        let mut done = 0u64;
        while done < len {
            let piece = usize::try_from(len - done).unwrap_or(usize::MAX).min(self.staging_bytes);
            let slot = &mut slots[*next];
            // The host must not overwrite a staging buffer the copy queue still reads.
            if let Some(copied) = slot.copied.take() {
                self.queues.host_waits(&copied).map_err(StageError::Queue)?;
            }
            self.queues
                .fill_staging(&mut slot.buffer, piece, &mut |out| fill(done, out))
                .map_err(StageError::Queue)?
                .map_err(StageError::Source)?;
            self.queues.copy(&slot.buffer, piece, dst, dst_offset + done).map_err(StageError::Queue)?;
            slot.copied = Some(self.queues.record_copy().map_err(StageError::Queue)?);
            *next = (*next + 1) % slots.len();
            done += piece as u64;
        }
        Ok(())
    }

    /// Ends a load: the ready event, after every copy queued so far.
    pub fn finish(&self) -> Result<Q::Event, Q::Error> {
        self.queues.record_copy()
    }
}
