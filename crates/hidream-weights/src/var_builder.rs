//! candle-nn `VarBuilder` adapters: a lazy one over a whole checkpoint, and one over the tensors
//! of a unit that is already loaded.

use std::collections::HashMap;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use crate::{Checkpoint, WeightsError};

impl Checkpoint {
    /// A `VarBuilder` that reads each tensor from the checkpoint when a layer asks for it.
    ///
    /// `get(shape, name)` checks the stored shape before reading any byte. Its errors are this
    /// crate's [`WeightsError`] (`MissingTensor`, `ShapeMismatch`, ...) wrapped into candle's
    /// error; recover them with [`WeightsError::from_candle`].
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(CheckpointBackend { checkpoint: self.clone() }), dtype, device.clone())
    }
}

/// A `VarBuilder` over tensors already loaded, such as the result of
/// [`Checkpoint::load_prefixes`]. Names are full checkpoint keys; missing names and other shapes
/// are candle's own errors.
pub fn unit_var_builder(tensors: HashMap<String, Tensor>, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_tensors(tensors, dtype, device)
}

struct CheckpointBackend {
    checkpoint: Checkpoint,
}

impl SimpleBackend for CheckpointBackend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _hints: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.checkpoint.load_with_shape(name, shape.dims(), dtype, device).map_err(WeightsError::into_candle)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.checkpoint.load(name, dtype, device).map_err(WeightsError::into_candle)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.checkpoint.contains(name)
    }
}
