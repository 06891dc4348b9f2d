//! adaLN modulation: the per-block `SiLU → Linear(dim, n · dim)` of `temb`, and precomputed sets.
//!
//! Modulation depends only on `temb` (timestep and pooled text), never on the image. A caller can
//! therefore compute every block's modulation for every step of a schedule up front
//! ([`StepModulation`]) and run the blocks without their modulation weights
//! ([`Modulation::Precomputed`]). The same layer on the same `temb` gives the same bits, so the
//! prepared path is bit-identical to computing it inside the forward.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::nn::Linear;

/// `adaLN_modulation = Sequential(SiLU, Linear(dim, n_chunks · dim))` of one block.
#[derive(Debug, Clone)]
pub struct BlockModulation {
    linear: Linear,
}

impl BlockModulation {
    /// `vb` points at the block (`double_stream_blocks.{i}.block`, ...).
    pub fn new(dim: usize, n_chunks: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { linear: Linear::new(dim, n_chunks * dim, vb.pp("adaLN_modulation").pp(1))? })
    }

    /// Builds the layer only when `vb` holds its weights.
    pub(crate) fn optional(dim: usize, n_chunks: usize, vb: &VarBuilder) -> candle_core::Result<Option<Self>> {
        if vb.contains_tensor("adaLN_modulation.1.weight") {
            Ok(Some(Self::new(dim, n_chunks, vb.clone())?))
        } else {
            Ok(None)
        }
    }

    /// `[B, n_chunks · dim]` modulation vectors of `temb` (`[B, dim]`).
    pub fn forward(&self, temb: &Tensor) -> candle_core::Result<Tensor> {
        self.linear.forward(&temb.silu()?)
    }
}

/// Every block's modulation vectors for one step.
#[derive(Debug, Clone)]
pub struct StepModulation {
    /// `[B, 12 · dim]` per double-stream block.
    pub double: Vec<Tensor>,
    /// `[B, 6 · dim]` per single-stream block.
    pub single: Vec<Tensor>,
}

impl StepModulation {
    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.double.iter().chain(&self.single).map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum()
    }
}

/// Where a forward gets each block's modulation.
#[derive(Debug, Clone, Copy)]
pub enum Modulation<'a> {
    /// Each block computes it from `temb` with its own weights.
    FromBlocks,
    /// Precomputed for this step; blocks may be loaded without their modulation weights.
    Precomputed(&'a StepModulation),
}

pub(crate) fn missing_modulation() -> candle_core::Error {
    candle_core::Error::Msg(
        "block was loaded without its adaLN modulation weights; pass Modulation::Precomputed".into(),
    )
}
