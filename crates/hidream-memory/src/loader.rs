//! The narrow interface between the runtime and whatever moves a unit's bytes: [`UnitLoader`].
//!
//! A loader owns the device side of the protocol. It allocates a buffer on the device tier once
//! per slot (and once per resident unit), loads a unit *into* such a buffer, and speaks in
//! fences, two kinds of ordering points:
//!
//! - **ready**: recorded after a unit's bytes are in its buffer. The consumer waits on it before
//!   it computes with the unit ([`UnitLoader::wait_ready`]). On CUDA the compute stream waits on
//!   the copy stream's event, without blocking the host.
//! - **consumed**: recorded on the compute side when the consumer releases a unit
//!   ([`UnitLoader::record_consumed`]). The slot goes back for reuse carrying it, and the next
//!   load into that slot must order its writes after it: [`SlotBuffer::reuse`] hands the buffer
//!   out only together with that fence. On CUDA the copy stream waits on the compute stream's
//!   event before it overwrites the slot.
//!
//! On the CPU both fences are complete at once, but the runtime runs the same protocol, so the
//! tests exercise the order a GPU needs.

/// Moves units onto the device tier, into buffers it allocates, and orders that work with fences.
///
/// Implemented outside this crate, for instance by reading a unit's tensors from a checkpoint
/// into a slot's device buffer.
pub trait UnitLoader: Send + Sync + 'static {
    /// A reusable buffer on the device tier, such as one slot's device memory.
    type Buffer: Send + 'static;
    /// A loaded unit: typically views into the buffer it was loaded into.
    type Unit: Send + 'static;
    /// An ordering point on the device (a CUDA event; nothing on the CPU).
    type Fence: Send + Sync + 'static;
    /// Why a unit could not be allocated or loaded.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Allocates a buffer of `bytes` on the device tier. Called once per slot and once per
    /// resident unit, never per load.
    fn allocate(&self, bytes: u64) -> Result<Self::Buffer, Self::Error>;

    /// Loads unit `unit_idx` into `slot`'s buffer, after the slot's previous user is done with it
    /// (take the buffer with [`SlotBuffer::reuse`] and order the writes after the fence it
    /// returns), and records the unit's ready fence.
    fn load_into(
        &self,
        unit_idx: usize,
        slot: &mut SlotBuffer<Self::Buffer, Self::Fence>,
    ) -> Result<Ready<Self::Unit, Self::Fence>, Self::Error>;

    /// Makes the consumer's later work wait for `ready`. On CUDA the compute stream waits on the
    /// event; the host does not block.
    fn wait_ready(&self, ready: &Self::Fence) -> Result<(), Self::Error>;

    /// Records, on the consumer's side, the point after every use of a unit it releases now.
    fn record_consumed(&self) -> Self::Fence;
}

/// Takes a load's result: the unit, once its size is the planned one and the consumer waits on
/// its ready fence. The one check every load goes through, resident or streamed.
pub(crate) fn accept<L: UnitLoader>(
    loader: &L,
    unit_idx: usize,
    planned: u64,
    result: Result<Ready<L::Unit, L::Fence>, L::Error>,
) -> Result<L::Unit, crate::ScheduleError<L::Error>> {
    let Ready { unit, ready, bytes_loaded } =
        result.map_err(|source| crate::ScheduleError::Load { unit_idx, source })?;
    if bytes_loaded != planned {
        return Err(crate::ResidencyError::SizeMismatch { unit_idx, planned, loaded: bytes_loaded }.into());
    }
    loader.wait_ready(&ready).map_err(|source| crate::ScheduleError::Load { unit_idx, source })?;
    Ok(unit)
}

/// A unit just loaded, with its ready fence and the bytes it filled.
#[derive(Debug)]
pub struct Ready<U, F> {
    pub unit: U,
    /// Recorded after the unit's bytes are in place.
    pub ready: F,
    /// Bytes written into the buffer. The runtime checks them against the unit's `UnitSpec`, so
    /// that a loader and the size model it was planned with cannot disagree unnoticed.
    pub bytes_loaded: u64,
}

/// One reusable buffer on the device tier, with the consumed fence of its last use.
#[derive(Debug)]
pub struct SlotBuffer<B, F> {
    slot_idx: usize,
    bytes: u64,
    buffer: B,
    /// The consumed fence of the unit that used the buffer before; `None` for a fresh buffer.
    consumed: Option<F>,
    loads: u64,
}

impl<B, F> SlotBuffer<B, F> {
    pub(crate) fn new(slot_idx: usize, bytes: u64, buffer: B) -> Self {
        SlotBuffer { slot_idx, bytes, buffer, consumed: None, loads: 0 }
    }

    /// Which slot this is: `0..n_slots` for streaming slots; resident units get their own.
    pub fn index(&self) -> usize {
        self.slot_idx
    }

    /// The capacity of the buffer in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// How many units were loaded into this buffer before the current one.
    pub fn loads(&self) -> u64 {
        self.loads
    }

    /// The buffer, for writing a new unit into it, with the fence the writes must follow: the
    /// consumed fence of the buffer's previous unit (`None` for a fresh buffer).
    pub fn reuse(&mut self) -> (&mut B, Option<F>) {
        self.loads += 1;
        (&mut self.buffer, self.consumed.take())
    }

    /// The buffer, for reading.
    pub fn buffer(&self) -> &B {
        &self.buffer
    }

    /// Marks the buffer as free once `consumed` completes.
    pub(crate) fn release(&mut self, consumed: F) {
        self.consumed = Some(consumed);
    }
}
