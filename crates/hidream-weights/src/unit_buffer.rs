//! Loading a unit's tensors *into* a reusable buffer: the device tier's side of a streaming slot.
//!
//! A [`UnitBuffer`] is one flat tensor of the compute dtype, allocated once (per streaming slot,
//! or per resident unit). [`Checkpoint::load_into_buffer`] converts each stored tensor straight
//! from the file (by positioned reads) into consecutive ranges of it, in one pass and without a temporary
//! tensor, and returns the unit's weights as views (`narrow` + `reshape`) into the buffer. So a
//! streamed load allocates nothing and touches no fresh page after the first pass.
//!
//! The conversions are [`Checkpoint::read_into`]'s, candle's own `to_dtype` element for element,
//! so the weights are bit-identical to [`Checkpoint::load`]'s.
//!
//! Overwriting a buffer while views of an earlier unit are still in use would change that unit's
//! weights under it; the residency runtime's consumed fence is what rules that out.

use std::collections::HashMap;

use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Tensor};

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

/// Where one tensor of a unit lies in a buffer ([`UnitBuffer::place`]): for a device tier that
/// fills the buffer itself, such as one that copies the stored bytes to a GPU.
#[derive(Debug, Clone)]
pub struct Placed<'a> {
    pub name: &'a str,
    /// The file that holds it.
    pub file: std::path::PathBuf,
    /// The dtype it is stored in.
    pub stored: safetensors::Dtype,
    pub shape: Vec<usize>,
    /// Its first element in the buffer.
    pub offset: usize,
    pub elements: usize,
}

impl Placed<'_> {
    /// Wraps a candle error as this tensor's.
    pub fn candle_error(&self) -> impl Fn(candle_core::Error) -> WeightsError + '_ {
        |source| WeightsError::Candle {
            file: self.file.clone(),
            tensor: self.name.to_owned(),
            source: Box::new(source),
        }
    }
}

impl UnitBuffer {
    /// Lays `names` out, in order, in consecutive ranges of the buffer, checking that they fit:
    /// the layout [`Checkpoint::load_into_buffer`] fills.
    pub fn place<'a>(&self, checkpoint: &Checkpoint, names: &[&'a str]) -> Result<Vec<Placed<'a>>> {
        let element_bytes = self.flat.dtype().size_in_bytes() as u64;
        let mut offset = 0usize;
        names
            .iter()
            .map(|&name| {
                let info = checkpoint.require_tensor(name)?;
                let elements: usize = info.shape.iter().product();
                if offset + elements > self.flat.elem_count() {
                    return Err(WeightsError::BufferTooSmall {
                        file: info.file,
                        tensor: name.to_owned(),
                        offset: offset as u64 * element_bytes,
                        needed: elements as u64 * element_bytes,
                        capacity: self.bytes(),
                    });
                }
                let placed = Placed { name, file: info.file, stored: info.dtype, shape: info.shape, offset, elements };
                offset += elements;
                Ok(placed)
            })
            .collect()
    }

    /// The placed tensors as views (`narrow` + `reshape`) into the buffer, once their bytes are
    /// in it.
    pub fn views(&self, placed: &[Placed<'_>]) -> Result<LoadedTensors> {
        let mut tensors = HashMap::with_capacity(placed.len());
        for tensor in placed {
            let view = self
                .flat
                .narrow(0, tensor.offset, tensor.elements)
                .and_then(|view| view.reshape(tensor.shape.as_slice()))
                .map_err(tensor.candle_error())?;
            tensors.insert(tensor.name.to_owned(), view);
        }
        let elements = placed.last().map_or(0, |last| last.offset + last.elements);
        Ok(LoadedTensors { tensors, bytes: (elements * self.flat.dtype().size_in_bytes()) as u64 })
    }

    /// The flat tensor itself (for a device tier that fills it).
    pub fn flat(&self) -> &Tensor {
        &self.flat
    }
}

impl Checkpoint {
    /// Loads the tensors `names`, in order, into consecutive ranges of `buffer`, converted to the
    /// buffer's dtype, and returns them as views into it.
    ///
    /// On the CPU the bytes go straight from the file into the buffer (positioned reads, converted
    /// on the way where the dtypes differ). Other devices go
    /// through their device tier (`hidream-device`) (staged copies on CUDA); called on one here, the tensors
    /// are read as [`Checkpoint::load`] reads them, and the buffer is left unused.
    pub fn load_into_buffer(&self, names: &[&str], buffer: &mut UnitBuffer) -> Result<LoadedTensors> {
        if !buffer.device().is_cpu() {
            let mut tensors = HashMap::with_capacity(names.len());
            let mut bytes = 0;
            for &name in names {
                let tensor = self.load(name, buffer.dtype(), buffer.device())?;
                bytes += (tensor.elem_count() * buffer.dtype().size_in_bytes()) as u64;
                tensors.insert(name.to_owned(), tensor);
            }
            return Ok(LoadedTensors { tensors, bytes });
        }
        let placed = buffer.place(self, names)?;
        for tensor in &placed {
            let view = buffer.flat.narrow(0, tensor.offset, tensor.elements).map_err(tensor.candle_error())?;
            let fill = Fill { checkpoint: self, name: tensor.name, error: Mutex::new(None) };
            if let Err(source) = view.inplace_op1(&fill) {
                let kept = fill.error.into_inner().unwrap_or_else(PoisonError::into_inner);
                return Err(kept.unwrap_or_else(|| tensor.candle_error()(source)));
            }
        }
        buffer.views(&placed)
    }
}

/// Writes one stored tensor into the range of a CPU buffer that the layout selects, through
/// [`Checkpoint::read_into`]; its typed error is kept aside, since the op can only return candle's.
struct Fill<'a> {
    checkpoint: &'a Checkpoint,
    name: &'a str,
    error: Mutex<Option<WeightsError>>,
}

impl InplaceOp1 for Fill<'_> {
    fn name(&self) -> &'static str {
        "load-into-unit-buffer"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let start = layout.start_offset();
        let range = start..start + layout.shape().elem_count();
        let out_of_range = || candle_core::Error::Msg(format!("buffer range {range:?} is out of bounds"));
        let result = match storage {
            CpuStorage::F32(data) => {
                self.checkpoint.read_into(self.name, data.get_mut(range.clone()).ok_or_else(out_of_range)?)
            }
            CpuStorage::BF16(data) => {
                self.checkpoint.read_into(self.name, data.get_mut(range.clone()).ok_or_else(out_of_range)?)
            }
            CpuStorage::F16(data) => {
                self.checkpoint.read_into(self.name, data.get_mut(range.clone()).ok_or_else(out_of_range)?)
            }
            _ => return Err(candle_core::Error::Msg("a unit buffer holds f32, f16 or bf16".to_owned())),
        };
        result.map_err(|error| {
            let message = error.to_string();
            *self.error.lock().unwrap_or_else(PoisonError::into_inner) = Some(error);
            candle_core::Error::Msg(message)
        })
    }
}
