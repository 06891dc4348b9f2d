//! Loading a unit's tensors *into* a reusable buffer: the device tier's side of a streaming slot.
//!
//! A [`UnitBuffer`] is one flat tensor of the compute dtype, allocated once (per streaming slot,
//! or per resident unit). [`Checkpoint::load_into_buffer`] converts each stored tensor straight
//! from the mapped file into consecutive ranges of it, in one pass and without a temporary
//! tensor, and returns the unit's weights as views (`narrow` + `reshape`) into the buffer. So a
//! streamed load allocates nothing and touches no fresh page after the first pass.
//!
//! The conversions are candle's own (`Tensor::to_dtype` on the CPU), element for element, so the
//! weights are bit-identical to [`Checkpoint::load`]'s.
//!
//! Overwriting a buffer while views of an earlier unit are still in use would change that unit's
//! weights under it; the residency runtime's consumed fence is what rules that out.

use std::collections::HashMap;

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};
use half::{bf16, f16};

use crate::checkpoint::StoredTensor;
use crate::{Checkpoint, Result, WeightsError};

/// A reusable flat buffer of one dtype on one device, that units are loaded into.
#[derive(Debug)]
pub struct UnitBuffer {
    flat: Tensor,
}

/// A unit's weights, as views into the buffer they were loaded into.
#[derive(Debug)]
pub struct LoadedTensors {
    /// The weights by checkpoint key.
    pub tensors: HashMap<String, Tensor>,
    /// Bytes of the buffer filled: the unit's size in the buffer's dtype.
    pub bytes: u64,
}

impl UnitBuffer {
    /// A buffer of `bytes` (rounded down to whole elements of `dtype`) on `device`.
    pub fn new(bytes: u64, dtype: DType, device: &Device) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(WeightsError::BufferDtype { dtype });
        }
        let elements = usize::try_from(bytes / dtype.size_in_bytes() as u64).unwrap_or(usize::MAX);
        let flat = Tensor::zeros(elements, dtype, device).map_err(|source| WeightsError::Candle {
            file: "unit buffer".into(),
            tensor: format!("{elements} elements of {dtype:?}"),
            source: Box::new(source),
        })?;
        Ok(UnitBuffer { flat })
    }

    /// The capacity in bytes.
    pub fn bytes(&self) -> u64 {
        (self.flat.elem_count() * self.flat.dtype().size_in_bytes()) as u64
    }

    pub fn dtype(&self) -> DType {
        self.flat.dtype()
    }

    pub fn device(&self) -> &Device {
        self.flat.device()
    }
}

impl Checkpoint {
    /// Loads the tensors `names`, in order, into consecutive ranges of `buffer`, converted to the
    /// buffer's dtype, and returns them as views into it.
    ///
    /// On the CPU the bytes go straight from the mapped file into the buffer. Other devices do
    /// not have that path yet: there the tensors are read as [`Checkpoint::load`] reads them, and
    /// the buffer is left unused.
    pub fn load_into_buffer(&self, names: &[&str], buffer: &mut UnitBuffer) -> Result<LoadedTensors> {
        let dtype = buffer.dtype();
        let element_bytes = dtype.size_in_bytes() as u64;
        let mut tensors = HashMap::with_capacity(names.len());
        let mut offset = 0usize;
        for &name in names {
            let stored = self.stored(name)?;
            let elements: usize = stored.shape.iter().product();
            let candle_error = |source| WeightsError::Candle {
                file: stored.file.to_owned(),
                tensor: name.to_owned(),
                source: Box::new(source),
            };
            let tensor = if buffer.device().is_cpu() {
                if offset + elements > buffer.flat.elem_count() {
                    return Err(WeightsError::BufferTooSmall {
                        file: stored.file.to_owned(),
                        tensor: name.to_owned(),
                        offset: offset as u64 * element_bytes,
                        needed: elements as u64 * element_bytes,
                        capacity: buffer.bytes(),
                    });
                }
                let view = buffer.flat.narrow(0, offset, elements).map_err(candle_error)?;
                view.inplace_op1(&Fill { stored: &stored }).map_err(candle_error)?;
                view.reshape(stored.shape).map_err(candle_error)?
            } else {
                self.load(name, dtype, buffer.device())?
            };
            offset += elements;
            tensors.insert(name.to_owned(), tensor);
        }
        Ok(LoadedTensors { tensors, bytes: offset as u64 * element_bytes })
    }
}

/// Writes one stored tensor into the range of a CPU buffer that the layout selects.
struct Fill<'a> {
    stored: &'a StoredTensor<'a>,
}

impl InplaceOp1 for Fill<'_> {
    fn name(&self) -> &'static str {
        "load-into-unit-buffer"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let start = layout.start_offset();
        let range = start..start + layout.shape().elem_count();
        let out_of_range = || candle_core::Error::Msg(format!("buffer range {range:?} is out of bounds"));
        let (bytes, stored) = (self.stored.bytes, self.stored.dtype);
        match storage {
            CpuStorage::F32(data) => convert_f32(data.get_mut(range.clone()).ok_or_else(out_of_range)?, bytes, stored),
            CpuStorage::BF16(data) => {
                convert_bf16(data.get_mut(range.clone()).ok_or_else(out_of_range)?, bytes, stored)
            }
            CpuStorage::F16(data) => convert_f16(data.get_mut(range.clone()).ok_or_else(out_of_range)?, bytes, stored),
            _ => Err(candle_core::Error::Msg("a unit buffer holds f32, f16 or bf16".to_owned())),
        }
    }
}

// The conversions below mirror candle's CPU `to_dtype` pair by pair, so they are bit-identical.

fn convert_f32(out: &mut [f32], bytes: &[u8], stored: DType) -> candle_core::Result<()> {
    match stored {
        DType::F32 => each(out, bytes, f32::from_le_bytes),
        DType::BF16 => each(out, bytes, |b| bf16::from_le_bytes(b).to_f32()),
        DType::F16 => each(out, bytes, |b| f16::from_le_bytes(b).to_f32()),
        DType::F64 => each(out, bytes, |b| f64::from_le_bytes(b) as f32),
        other => unsupported(other),
    }
}

fn convert_bf16(out: &mut [bf16], bytes: &[u8], stored: DType) -> candle_core::Result<()> {
    match stored {
        DType::F32 => each(out, bytes, |b| bf16::from_f32(f32::from_le_bytes(b))),
        DType::BF16 => each(out, bytes, bf16::from_le_bytes),
        DType::F16 => each(out, bytes, |b| bf16::from_f32(f16::from_le_bytes(b).to_f32())),
        DType::F64 => each(out, bytes, |b| bf16::from_f64(f64::from_le_bytes(b))),
        other => unsupported(other),
    }
}

fn convert_f16(out: &mut [f16], bytes: &[u8], stored: DType) -> candle_core::Result<()> {
    match stored {
        DType::F32 => each(out, bytes, |b| f16::from_f32(f32::from_le_bytes(b))),
        DType::BF16 => each(out, bytes, |b| f16::from_f32(bf16::from_le_bytes(b).to_f32())),
        DType::F16 => each(out, bytes, f16::from_le_bytes),
        DType::F64 => each(out, bytes, |b| f16::from_f64(f64::from_le_bytes(b))),
        other => unsupported(other),
    }
}

/// Decodes `out.len()` little-endian elements of `W` bytes from `bytes` into `out`.
fn each<const W: usize, T>(out: &mut [T], bytes: &[u8], decode: impl Fn([u8; W]) -> T) -> candle_core::Result<()> {
    if bytes.len() != out.len() * W {
        return Err(candle_core::Error::Msg(format!(
            "{} stored bytes for {} elements of {W} bytes",
            bytes.len(),
            out.len()
        )));
    }
    for (element, chunk) in out.iter_mut().zip(bytes.chunks_exact(W)) {
        let mut array = [0u8; W];
        array.copy_from_slice(chunk);
        *element = decode(array);
    }
    Ok(())
}

fn unsupported(dtype: DType) -> candle_core::Result<()> {
    Err(candle_core::Error::Msg(format!("weights stored as {dtype:?} cannot be converted")))
}
