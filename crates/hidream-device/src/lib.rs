//! The device tier: how a unit's tensors get from a checkpoint into a unit buffer on the compute
//! device, and the fences that order those loads with compute. Every loader of a run (the
//! transformer's, the text encoders') loads through one [`DeviceTier`] and implements
//! `hidream_memory::UnitLoader` with its [`DeviceBuffer`]s and [`TierFence`]s.
//!
//! This crate knows checkpoints (hidream-weights) and the residency protocol (hidream-memory), but
//! no model layers, budgets or plans.
//!
//! - [`DeviceTier::Host`]: the device is the CPU (or one without a staged path). A load reads
//!   the stored bytes (by `pread`) straight into the buffer, converting them on the way, and both fences are complete
//!   at once: the loader's writes are done when the load returns, and compute is done with a unit
//!   when it is released.
//! - `DeviceTier::Cuda` (with the `cuda` feature): the bytes go through two pinned staging
//!   buffers and a copy stream into the buffer in GPU memory, ordered by CUDA events (see
//!   [`cuda`] and `hidream_memory::staged`, whose protocol it runs).
#![deny(unsafe_code)]

#[cfg(feature = "cuda")]
pub mod cuda;

#[cfg(feature = "cuda")]
use std::sync::Arc;

use candle_core::{DType, Device};
use hidream_memory::SlotBuffer;

use hidream_weights::{Checkpoint, LoadedTensors, Result, UnitBuffer};

/// Bytes of each of the two pinned staging buffers of a CUDA tier.
pub const STAGING_BYTES: usize = 64 << 20;

/// How units reach the compute device; see the module doc.
#[derive(Debug, Clone)]
pub enum DeviceTier {
    Host(Device),
    #[cfg(feature = "cuda")]
    Cuda(Arc<cuda::CudaTier>),
}

/// A unit buffer allocated by a [`DeviceTier`]. On CUDA, dropping it orders the free of its
/// memory after every copy queued so far, which may still be writing it.
#[derive(Debug)]
pub struct DeviceBuffer {
    buffer: UnitBuffer,
    #[cfg(feature = "cuda")]
    copies: Option<Arc<cuda::CudaQueues>>,
}

impl DeviceBuffer {
    fn host(buffer: UnitBuffer) -> Self {
        DeviceBuffer {
            buffer,
            #[cfg(feature = "cuda")]
            copies: None,
        }
    }

    pub fn buffer(&self) -> &UnitBuffer {
        &self.buffer
    }

    pub fn buffer_mut(&mut self) -> &mut UnitBuffer {
        &mut self.buffer
    }
}

#[cfg(feature = "cuda")]
impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Some(queues) = &self.copies {
            queues.order_frees_after_copies();
        }
    }
}

/// A ready or consumed fence of a [`DeviceTier`].
#[derive(Debug, Default)]
pub enum TierFence {
    /// Complete already.
    #[default]
    Done,
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaEvent),
}

impl DeviceTier {
    /// The tier of `device`: staged on CUDA, direct everywhere else. Every loader of a device
    /// gets the same CUDA tier while one is alive (one copy stream, one pair of pinned buffers).
    pub fn for_device(device: &Device) -> Result<Self> {
        match device {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => {
                use std::sync::{Mutex, PoisonError, Weak};
                static TIERS: Mutex<Vec<Weak<cuda::CudaTier>>> = Mutex::new(Vec::new());
                let mut tiers = TIERS.lock().unwrap_or_else(PoisonError::into_inner);
                tiers.retain(|tier| tier.strong_count() > 0);
                let live = tiers.iter().filter_map(Weak::upgrade).find(|tier| tier.device().same_device(device));
                let tier = match live {
                    Some(tier) => tier,
                    None => {
                        let tier = Arc::new(cuda::CudaTier::new(cuda, STAGING_BYTES)?);
                        tiers.push(Arc::downgrade(&tier));
                        tier
                    }
                };
                Ok(DeviceTier::Cuda(tier))
            }
            other => Ok(DeviceTier::Host(other.clone())),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            DeviceTier::Host(device) => device.clone(),
            #[cfg(feature = "cuda")]
            DeviceTier::Cuda(tier) => tier.device(),
        }
    }

    /// A buffer of `bytes` of `dtype` on the device, ready for the tier's loads.
    pub fn allocate(&self, bytes: u64, dtype: DType) -> Result<DeviceBuffer> {
        match self {
            DeviceTier::Host(device) => Ok(DeviceBuffer::host(UnitBuffer::new(bytes, dtype, device)?)),
            #[cfg(feature = "cuda")]
            DeviceTier::Cuda(tier) => tier.allocate(bytes, dtype),
        }
    }

    /// Loads the tensors `names` of `checkpoint` into `slot`'s buffer, after the slot's previous
    /// unit is done with it: the unit's weights as views into the buffer, and its ready fence.
    pub fn load(
        &self,
        checkpoint: &Checkpoint,
        names: &[&str],
        slot: &mut SlotBuffer<DeviceBuffer, TierFence>,
    ) -> Result<(LoadedTensors, TierFence)> {
        match self {
            DeviceTier::Host(_) => {
                // The previous unit's consumed fence is complete: the host computed with it.
                let (buffer, _complete) = slot.reuse();
                Ok((checkpoint.load_into_buffer(names, &mut buffer.buffer)?, TierFence::Done))
            }
            #[cfg(feature = "cuda")]
            DeviceTier::Cuda(tier) => {
                let (buffer, consumed) = slot.reuse();
                let consumed = match consumed {
                    Some(TierFence::Cuda(event)) => Some(event),
                    _ => None,
                };
                let (tensors, ready) = tier.load(checkpoint, names, &mut buffer.buffer, consumed.as_ref())?;
                Ok((tensors, TierFence::Cuda(ready)))
            }
        }
    }

    /// Makes the consumer's later work wait for `ready`, without blocking the host.
    pub fn wait_ready(&self, ready: &TierFence) -> Result<()> {
        match (self, ready) {
            #[cfg(feature = "cuda")]
            (DeviceTier::Cuda(tier), TierFence::Cuda(event)) => tier.wait_ready(event),
            _ => Ok(()),
        }
    }

    /// The consumed fence of a unit released now: after all the compute enqueued so far.
    pub fn record_consumed(&self) -> TierFence {
        match self {
            DeviceTier::Host(_) => TierFence::Done,
            #[cfg(feature = "cuda")]
            DeviceTier::Cuda(tier) => tier.record_consumed().map_or(TierFence::Done, TierFence::Cuda),
        }
    }
}

/// A device named on the command line: `cpu`, `cuda` or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;

    fn from_str(given: &str) -> std::result::Result<Self, String> {
        match given.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|ordinal| ordinal.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("invalid device `{given}` (expected cpu, cuda or cuda:N)")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device, once per run (clone the result): on CUDA with our own compute stream and
    /// the settings of [`cuda::open_device`].
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            #[cfg(feature = "cuda")]
            DeviceSpec::Cuda(ordinal) => cuda::open_device(ordinal),
            #[cfg(not(feature = "cuda"))]
            DeviceSpec::Cuda(_) => Err(hidream_weights::WeightsError::NoCudaBuild { device: self.to_string() }),
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }
}

/// GPU memory figures, measured: the pool's and the driver's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DeviceMemory {
    /// Bytes of the memory pool in use by live allocations now.
    pub pool_used: u64,
    /// The highest `pool_used` since the last [`reset_memory_peak`]: exact, kept by the driver.
    pub pool_peak: u64,
    /// Bytes the driver reports in use on the whole device (every process, the pool's reserve,
    /// cuBLAS's workspace and the context included), when it was read.
    pub driver_used: u64,
    pub total: u64,
}

/// GPU memory now, measured (`None` on the CPU, where the heap is the measure).
pub fn device_memory(device: &Device) -> Option<DeviceMemory> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return cuda::device_memory(device).ok();
    }
    let _ = device;
    None
}

/// Makes the next [`device_memory`] peak start from now (nothing on the CPU).
pub fn reset_memory_peak(device: &Device) {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        let _ = cuda::reset_peak(device);
    }
    let _ = device;
}

/// The figures of [`measure_upload`].
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct UploadFigures {
    pub bytes: u64,
    pub seconds: f64,
    /// Bytes per second.
    pub bandwidth: f64,
    pub staging_bytes: usize,
}

/// Times `total` bytes going through a tier's staged upload path into one device buffer of
/// `buffer_bytes`, with the staging buffers' contents as they are (no disk read): on CUDA the
/// pinned host-to-device bandwidth over the copy stream; on the CPU the copy thread of
/// [`hidream_memory::staged::ThreadQueues`], the same protocol in host memory.
pub fn measure_upload(device: &Device, total: u64, buffer_bytes: u64) -> Result<UploadFigures> {
    use hidream_memory::staged::{Stager, ThreadQueues};
    let timed = |run: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let started = std::time::Instant::now();
        run()?;
        Ok(started.elapsed().as_secs_f64())
    };
    let (seconds, staging_bytes) = match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => {
            let tier = cuda::CudaTier::new(cuda, STAGING_BYTES)?;
            let seconds = tier.time_uploads(total, buffer_bytes)?;
            (seconds, STAGING_BYTES)
        }
        _ => {
            let stager = Stager::new(std::sync::Arc::new(ThreadQueues::default()), STAGING_BYTES).map_err(queue)?;
            let mut buffer = hidream_memory::staged::HostBuffer::new(buffer_bytes as usize);
            let seconds = timed(&mut || {
                upload_cycles(&stager, &mut buffer, total, buffer_bytes).map_err(queue)?;
                stager.queues().synchronize().map_err(queue)
            })?;
            (seconds, STAGING_BYTES)
        }
    };
    Ok(UploadFigures { bytes: total, seconds, bandwidth: total as f64 / seconds.max(1e-9), staging_bytes })
}

fn queue(error: impl std::fmt::Display) -> hidream_weights::WeightsError {
    hidream_weights::WeightsError::Cuda { doing: "timing staged uploads".into(), message: error.to_string() }
}

/// Uploads `total` bytes into `buffer` (of `buffer_bytes`), over and over from offset 0.
pub(crate) fn upload_cycles<Q: hidream_memory::staged::CopyQueues>(
    stager: &hidream_memory::staged::Stager<Q>,
    buffer: &mut Q::Buffer,
    total: u64,
    buffer_bytes: u64,
) -> std::result::Result<(), hidream_memory::staged::StageError<Q::Error, std::convert::Infallible>> {
    let mut done = 0;
    while done < total {
        let len = (total - done).min(buffer_bytes.max(1));
        stager.upload(buffer, 0, len, |_, _| Ok::<(), std::convert::Infallible>(()))?;
        done += len;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs_parse_and_print_as_the_flag_takes_them() {
        for (given, spec, shown) in [
            ("cpu", DeviceSpec::Cpu, "cpu"),
            (" CPU ", DeviceSpec::Cpu, "cpu"),
            ("cuda", DeviceSpec::Cuda(0), "cuda:0"),
            ("gpu", DeviceSpec::Cuda(0), "cuda:0"),
            ("cuda:3", DeviceSpec::Cuda(3), "cuda:3"),
        ] {
            let parsed: DeviceSpec = given.parse().unwrap();
            assert_eq!(parsed, spec, "{given}");
            assert_eq!(parsed.to_string(), shown);
            assert_eq!(shown.parse::<DeviceSpec>().unwrap(), spec, "the printed form parses back");
            assert_eq!(parsed.is_cuda(), shown != "cpu");
        }
        for bad in ["", "tpu", "cuda:", "cuda:x", "cuda:-1", "cuda0"] {
            let error = bad.parse::<DeviceSpec>().unwrap_err();
            assert!(error.contains("expected cpu, cuda or cuda:N"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_cpu_opens_and_its_tier_is_direct() {
        let device = DeviceSpec::Cpu.open().unwrap();
        assert!(device.is_cpu());
        assert!(device_memory(&device).is_none(), "the CPU has no GPU pool to measure");
        let tier = DeviceTier::for_device(&device).unwrap();
        assert!(matches!(tier, DeviceTier::Host(_)));
        let buffer = tier.allocate(24, DType::F32).unwrap();
        assert_eq!(buffer.buffer().bytes(), 24);
        assert!(matches!(tier.record_consumed(), TierFence::Done));
        tier.wait_ready(&TierFence::Done).unwrap();
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_build_it() {
        let error = DeviceSpec::Cuda(1).open().unwrap_err();
        assert!(matches!(&error, hidream_weights::WeightsError::NoCudaBuild { device } if device == "cuda:1"));
        let message = error.to_string();
        assert!(message.contains("--features cuda") && message.contains("scripts/cuda-setup.sh"), "{message}");
        assert!(!message.contains('\n'), "one line: {message}");
    }

    #[test]
    fn the_cpu_upload_measurement_moves_the_bytes_asked_for() {
        let figures = measure_upload(&Device::Cpu, 3 << 20, 1 << 20).unwrap();
        assert_eq!(figures.bytes, 3 << 20);
        assert_eq!(figures.staging_bytes, STAGING_BYTES);
        assert!(figures.seconds > 0.0 && figures.bandwidth > 0.0, "{figures:?}");
    }
}
