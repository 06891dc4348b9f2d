//! The CUDA device tier (feature `cuda`): units copied into GPU slots over a copy stream from pinned
//! staging buffers, ordered by CUDA events. The thin leaf behind `hidream_memory::staged`'s
//! [`CopyQueues`]: the protocol itself is [`Stager`]'s, which runs on CPU threads in the tests.
//!
//! - **Streams.** The compute stream is candle's (the device should be made with
//!   `Device::new_cuda_with_stream`, so that it is ours and not the per-thread default stream). The
//!   copy stream is a second stream of the same context.
//! - **Staging.** Two pinned host buffers, allocated once. The loader thread reads a unit's stored
//!   bytes into one with `pread` (no trip through the mmap and no extra copy) while the other is
//!   copied with `cuMemcpyHtoDAsync`.
//! - **Slots.** A [`UnitBuffer`] is one flat tensor in GPU memory, allocated once; a unit's weights
//!   are `narrow`/`reshape` views into it.
//! - **Stored bytes on the bus.** A tensor stored in the buffer's dtype (bf16 into bf16) is copied
//!   as it is. Another (f32 or f16 into bf16) is copied in its stored dtype into a temporary device
//!   tensor and converted by candle's cast kernel on the compute stream into the slot. That slow
//!   path orders the copy stream after the compute enqueued so far, so it does not overlap.
//! - **Events.** A load ends with a *ready* event on the copy stream; the compute stream waits on it
//!   (no host block). A release records a *consumed* event on the compute stream; the copy stream
//!   waits on it before it refills the slot. A staging buffer is refilled only after the host has
//!   waited on its last copy's event.
//!
//! **Why candle's event tracking can be off.** candle (through cudarc) records a read and a write
//! event per buffer per kernel, so that a buffer used on two streams is ordered automatically. That
//! costs CPU time at every launch once a second stream exists. Only the slot buffers and the
//! temporary conversion tensors are ever touched by the copy stream, and each of those uses is
//! ordered explicitly: a slot is allocated and zeroed on the compute stream, and the copy stream
//! waits on an event recorded after that; the copy stream writes a slot only after the consumed
//! event of its previous unit; compute reads it only after the ready event. Every other tensor
//! lives on the compute stream alone, where stream order is enough. So [`open_device`] turns the
//! tracking off before any tensor exists.
#![allow(unsafe_code)] // The driver calls: pinned memory, async copies, pool attributes.

use std::ffi::c_void;
use std::sync::Arc;

use candle_core::{CudaDevice, DType, Device, Storage};
use cudarc::driver::{CudaEvent, CudaStream, DevicePtr, DriverError, PinnedHostSlice, result, sys};
use hidream_memory::staged::{CopyQueues, StageError, Stager};

use hidream_weights::{Checkpoint, LoadedTensors, Placed, Result, UnitBuffer, WeightsError};

use crate::DeviceBuffer;

fn driver(doing: &str) -> impl FnOnce(DriverError) -> WeightsError + '_ {
    move |error| WeightsError::Cuda { doing: doing.to_owned(), message: error.to_string() }
}

fn candle(doing: &str) -> impl FnOnce(candle_core::Error) -> WeightsError + '_ {
    move |error| WeightsError::Cuda { doing: doing.to_owned(), message: error.to_string() }
}

/// Opens CUDA device `ordinal` for a run: its own compute stream, candle's per-buffer event
/// tracking off (see the module doc), and a memory pool that keeps freed memory for reuse, so
/// that the pool's used-memory figures are the measurement. Make one per run and clone it: every
/// call makes a new device, whose tensors do not mix with another's.
pub fn open_device(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda_with_stream(ordinal).map_err(candle("opening the CUDA device"))?;
    let cuda = device.as_cuda_device().map_err(candle("opening the CUDA device"))?;
    // SAFETY: no tensor exists on this device yet, and every cross-stream use is ordered by
    // explicit events, as the module doc explains.
    unsafe { cuda.disable_event_tracking() };
    let pool = default_pool(cuda)?;
    let mut keep = u64::MAX;
    // SAFETY: the pool is the device's default pool; the attribute takes a u64.
    unsafe {
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&raw mut keep).cast::<c_void>(),
        )
    }
    .map_err(driver("setting the memory pool's release threshold"))?;
    Ok(device)
}

fn default_pool(cuda: &CudaDevice) -> Result<sys::CUmemoryPool> {
    let stream = cuda.cuda_stream();
    let context = stream.context();
    context.bind_to_thread().map_err(driver("binding the CUDA context"))?;
    // SAFETY: the device handle comes from a live context.
    unsafe { result::device::get_default_mem_pool(context.cu_device()) }.map_err(driver("reading the memory pool"))
}

pub use crate::DeviceMemory;

fn pool_attribute(pool: sys::CUmemoryPool, attribute: sys::CUmemPool_attribute) -> Result<u64> {
    let mut value = 0u64;
    // SAFETY: the used-memory attributes are u64.
    unsafe { result::mem_pool::get_attribute(pool, attribute, (&raw mut value).cast::<c_void>()) }
        .map_err(driver("reading the memory pool"))?;
    Ok(value)
}

/// The GPU memory figures of `device` now.
pub fn device_memory(device: &Device) -> Result<DeviceMemory> {
    let cuda = device.as_cuda_device().map_err(candle("reading GPU memory"))?;
    let pool = default_pool(cuda)?;
    let pool_used = pool_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?;
    let pool_peak = pool_attribute(pool, sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?;
    let (free, total) = result::mem_get_info().map_err(driver("reading GPU memory"))?;
    Ok(DeviceMemory { pool_used, pool_peak, driver_used: (total - free) as u64, total: total as u64 })
}

/// Starts a new peak: the pool's high-water mark becomes its current use.
pub fn reset_peak(device: &Device) -> Result<()> {
    let cuda = device.as_cuda_device().map_err(candle("resetting the GPU memory peak"))?;
    let pool = default_pool(cuda)?;
    let mut zero = 0u64;
    // SAFETY: setting the high-water mark to 0 resets it to the current use, as documented.
    unsafe {
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
            (&raw mut zero).cast::<c_void>(),
        )
    }
    .map_err(driver("resetting the GPU memory peak"))
}

/// The two streams of a device, its pinned staging and its unit buffers: [`CopyQueues`] on CUDA.
#[derive(Debug)]
pub struct CudaQueues {
    compute: Arc<CudaStream>,
    copy: Arc<CudaStream>,
}

const NO_TIMING: Option<sys::CUevent_flags> = Some(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);

impl CudaQueues {
    pub fn new(device: &CudaDevice) -> Result<Self> {
        let compute = device.cuda_stream();
        let copy = compute.context().new_stream().map_err(driver("creating the copy stream"))?;
        Ok(CudaQueues { compute, copy })
    }

    /// Makes the compute stream's later work (a free, above all) wait for every copy queued so
    /// far; if that cannot be ordered, waits on the host.
    pub(crate) fn order_frees_after_copies(&self) {
        let ordered = self.record_copy().and_then(|copied| self.compute_waits(&copied));
        if ordered.is_err() {
            let _ = self.copy.synchronize();
        }
    }
}

/// The device address of a buffer's first byte, and its capacity.
fn device_address(buffer: &UnitBuffer, stream: &CudaStream) -> Result<(sys::CUdeviceptr, u64)> {
    let (storage, layout) = buffer.flat().storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        return Err(WeightsError::Cuda {
            doing: "copying to a slot".into(),
            message: "the buffer is not on CUDA".into(),
        });
    };
    let slice_error = candle("reading a slot's address");
    let base = match buffer.dtype() {
        DType::BF16 => cuda.as_cuda_slice::<half::bf16>().map(|slice| slice.device_ptr(stream).0),
        DType::F16 => cuda.as_cuda_slice::<half::f16>().map(|slice| slice.device_ptr(stream).0),
        DType::F32 => cuda.as_cuda_slice::<f32>().map(|slice| slice.device_ptr(stream).0),
        other => return Err(WeightsError::BufferDtype { dtype: other }),
    }
    .map_err(slice_error)?;
    let start = (layout.start_offset() * buffer.dtype().size_in_bytes()) as u64;
    Ok((base + start, buffer.bytes()))
}

impl CopyQueues for CudaQueues {
    type Staging = PinnedHostSlice<u8>;
    type Buffer = UnitBuffer;
    type Event = CudaEvent;
    type Error = WeightsError;

    fn alloc_staging(&self, bytes: usize) -> Result<PinnedHostSlice<u8>> {
        // SAFETY: the bytes are uninitialised until the host fills them, and only filled bytes are
        // copied.
        unsafe { self.compute.context().alloc_pinned::<u8>(bytes) }.map_err(driver("allocating pinned staging memory"))
    }

    fn fill_staging<E>(
        &self,
        staging: &mut PinnedHostSlice<u8>,
        len: usize,
        fill: &mut dyn FnMut(&mut [u8]) -> std::result::Result<(), E>,
    ) -> Result<std::result::Result<(), E>> {
        let capacity = staging.len();
        let bytes = staging.as_mut_slice().map_err(driver("filling a staging buffer"))?;
        let out = bytes.get_mut(..len).ok_or_else(|| WeightsError::Cuda {
            doing: "filling a staging buffer".into(),
            message: format!("{len} bytes do not fit its {capacity}"),
        })?;
        Ok(fill(out))
    }

    fn copy(&self, src: &PinnedHostSlice<u8>, len: usize, dst: &mut UnitBuffer, dst_offset: u64) -> Result<()> {
        let host = src.as_slice().map_err(driver("copying to a slot"))?;
        let (address, capacity) = device_address(dst, &self.copy)?;
        let (Some(host), true) = (host.get(..len), dst_offset + len as u64 <= capacity) else {
            return Err(WeightsError::Cuda {
                doing: "copying to a slot".into(),
                message: format!("{len} bytes at {dst_offset} overrun a staging buffer or a slot of {capacity}"),
            });
        };
        // SAFETY: the range is inside the slot (checked above) and inside the pinned buffer. The
        // pinned buffer is not written or freed before the copy completes: the stager waits on its
        // copy event before refilling it, and before dropping it. The slot is not read or freed
        // before the copy completes: compute waits on the ready event, and a slot is freed only
        // after the host synchronises (see `CudaTier`'s drop).
        unsafe { result::memcpy_htod_async(address + dst_offset, host, self.copy.cu_stream()) }
            .map_err(driver("copying to a slot"))
    }

    fn record_copy(&self) -> Result<CudaEvent> {
        self.copy.record_event(NO_TIMING).map_err(driver("recording a copy event"))
    }

    fn copy_waits(&self, event: &CudaEvent) -> Result<()> {
        self.copy.wait(event).map_err(driver("ordering the copy stream"))
    }

    fn record_compute(&self) -> Result<CudaEvent> {
        self.compute.record_event(NO_TIMING).map_err(driver("recording a compute event"))
    }

    fn compute_waits(&self, event: &CudaEvent) -> Result<()> {
        self.compute.wait(event).map_err(driver("ordering the compute stream"))
    }

    fn host_waits(&self, event: &CudaEvent) -> Result<()> {
        event.synchronize().map_err(driver("waiting for a copy"))
    }
}

/// The CUDA device tier: the staged-upload protocol over [`CudaQueues`].
#[derive(Debug)]
pub struct CudaTier {
    device: Device,
    stager: Stager<CudaQueues>,
}

impl CudaTier {
    /// The tier of `device`, with two pinned staging buffers of `staging_bytes`.
    pub fn new(device: &CudaDevice, staging_bytes: usize) -> Result<Self> {
        let queues = Arc::new(CudaQueues::new(device)?);
        let stager = Stager::new(queues, staging_bytes)?;
        Ok(CudaTier { device: Device::Cuda(device.clone()), stager })
    }

    pub fn device(&self) -> Device {
        self.device.clone()
    }

    fn queues(&self) -> &Arc<CudaQueues> {
        self.stager.queues()
    }

    /// A buffer in GPU memory, allocated (and zeroed) on the compute stream; the copy stream's
    /// later work waits for that.
    pub fn allocate(&self, bytes: u64, dtype: DType) -> Result<DeviceBuffer> {
        let buffer = DeviceBuffer {
            buffer: UnitBuffer::new(bytes, dtype, &self.device)?,
            copies: Some(Arc::clone(self.queues())),
        };
        let allocated = self.queues().record_compute()?;
        self.queues().copy_waits(&allocated)?;
        Ok(buffer)
    }

    /// Loads `names` into `buffer` after `consumed`: the views and the ready event.
    pub fn load(
        &self,
        checkpoint: &Checkpoint,
        names: &[&str],
        buffer: &mut UnitBuffer,
        consumed: Option<&CudaEvent>,
    ) -> Result<(LoadedTensors, CudaEvent)> {
        let placed = buffer.place(checkpoint, names)?;
        let element = buffer.dtype().size_in_bytes();
        self.stager.begin(consumed)?;
        // Consecutive tensors stored in the buffer's dtype go up in one upload; the others are
        // copied as stored and converted on the device.
        let mut convert = Vec::new();
        let mut run_start = 0;
        for (idx, tensor) in placed.iter().enumerate() {
            if stored_dtype(tensor) != Some(buffer.dtype()) {
                self.upload_run(checkpoint, &placed[run_start..idx], buffer, element)?;
                run_start = idx + 1;
                convert.push(tensor);
            }
        }
        self.upload_run(checkpoint, &placed[run_start..], buffer, element)?;
        let mut stored = Vec::with_capacity(convert.len());
        for &tensor in &convert {
            let dtype = stored_dtype(tensor).ok_or_else(|| WeightsError::UnsupportedDtype {
                file: tensor.file.clone(),
                tensor: tensor.name.to_owned(),
                dtype: tensor.stored,
            })?;
            let mut temporary = self.allocate((tensor.elements * dtype.size_in_bytes()) as u64, dtype)?;
            self.upload_run(checkpoint, std::slice::from_ref(tensor), temporary.buffer_mut(), dtype.size_in_bytes())?;
            stored.push((tensor, temporary));
        }
        let mut ready = self.stager.finish()?;
        if !stored.is_empty() {
            self.queues().compute_waits(&ready)?;
            for (tensor, temporary) in stored {
                let converted = temporary.buffer().flat().to_dtype(buffer.dtype()).map_err(tensor.candle_error())?;
                buffer.flat().slice_set(&converted, 0, tensor.offset).map_err(tensor.candle_error())?;
            }
            ready = self.queues().record_compute()?;
        }
        Ok((buffer.views(&placed)?, ready))
    }

    /// One upload of consecutive tensors, stored as `buffer` holds them, to their place in it.
    fn upload_run(
        &self,
        checkpoint: &Checkpoint,
        run: &[Placed<'_>],
        buffer: &mut UnitBuffer,
        element: usize,
    ) -> Result<()> {
        let (Some(first), Some(last)) = (run.first(), run.last()) else {
            return Ok(());
        };
        let start = (first.offset * element) as u64;
        let len = ((last.offset + last.elements - first.offset) * element) as u64;
        self.stager
            .upload(buffer, start, len, |offset, out| read_run(checkpoint, run, element, start + offset, out))
            .map_err(|error| match error {
                StageError::Queue(error) | StageError::Source(error) => error,
            })
    }

    pub fn wait_ready(&self, ready: &CudaEvent) -> Result<()> {
        self.queues().compute_waits(ready)
    }

    /// The consumed event; if it cannot be recorded, the host waits for the compute stream
    /// instead, so that the slot is free when it goes back.
    pub fn record_consumed(&self) -> Option<CudaEvent> {
        match self.queues().record_compute() {
            Ok(event) => Some(event),
            Err(_) => {
                // The device is failing: the next call that can report an error will.
                let _ = self.queues().compute.synchronize();
                None
            }
        }
    }
}

impl Drop for CudaTier {
    /// Slots may be freed right after: nothing of the copy stream may still write them.
    fn drop(&mut self) {
        let _ = self.queues().copy.synchronize();
    }
}

/// The candle dtype a tensor is stored in, where candle has one.
fn stored_dtype(tensor: &Placed<'_>) -> Option<DType> {
    match tensor.stored {
        safetensors::Dtype::BF16 => Some(DType::BF16),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::F32 => Some(DType::F32),
        _ => None,
    }
}

/// Reads the stored bytes at `offset..offset + out.len()` of the buffer range that `run` fills.
fn read_run(checkpoint: &Checkpoint, run: &[Placed<'_>], element: usize, offset: u64, out: &mut [u8]) -> Result<()> {
    let end = offset + out.len() as u64;
    for tensor in run {
        let (t_start, t_end) = ((tensor.offset * element) as u64, ((tensor.offset + tensor.elements) * element) as u64);
        let (from, to) = (offset.max(t_start), end.min(t_end));
        if from < to {
            let dst = &mut out[(from - offset) as usize..(to - offset) as usize];
            checkpoint.read_stored(tensor.name, from - t_start, dst)?;
        }
    }
    Ok(())
}

impl CudaTier {
    /// Seconds for `total` bytes of staged uploads into one buffer of `buffer_bytes`, from the first
    /// copy queued to the last one complete.
    pub(crate) fn time_uploads(&self, total: u64, buffer_bytes: u64) -> Result<f64> {
        let mut buffer = self.allocate(buffer_bytes, DType::BF16)?;
        self.queues().copy.synchronize().map_err(driver("timing staged uploads"))?;
        let bytes = buffer.buffer().bytes();
        let started = std::time::Instant::now();
        crate::upload_cycles(&self.stager, buffer.buffer_mut(), total, bytes).map_err(|error| match error {
            StageError::Queue(error) => error,
            StageError::Source(never) => match never {},
        })?;
        self.queues().copy.synchronize().map_err(driver("timing staged uploads"))?;
        Ok(started.elapsed().as_secs_f64())
    }
}
