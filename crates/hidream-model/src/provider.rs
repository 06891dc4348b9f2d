//! How the transformer gets its blocks: the [`BlockProvider`] trait.
//!
//! The forward asks for block `i` just before it runs it and drops the handle right after, so a
//! provider may load blocks on demand, prefetch them, or keep them all resident.

use std::ops::Deref;

use candle_nn::VarBuilder;
use hidream_config::TransformerConfig;

use crate::block::{DoubleStreamBlock, SingleStreamBlock};

/// A borrowed block. Whatever keeps the block alive (a reference, a streaming slot) lives as long
/// as the handle; dropping it tells the provider that the block has run.
pub type BlockRef<'a, T> = Box<dyn Deref<Target = T> + 'a>;

/// Hands the transformer its blocks, in forward order: double blocks `0..num_layers`, then single
/// blocks `0..num_single_layers`, once each per forward.
pub trait BlockProvider {
    /// Double-stream block `block_idx`.
    fn double_block(&mut self, block_idx: usize) -> candle_core::Result<BlockRef<'_, DoubleStreamBlock>>;
    /// Single-stream block `block_idx`.
    fn single_block(&mut self, block_idx: usize) -> candle_core::Result<BlockRef<'_, SingleStreamBlock>>;
}

/// Every block loaded up front and kept: the plain, all-resident policy.
#[derive(Debug, Clone)]
pub struct ResidentBlocks {
    double: Vec<DoubleStreamBlock>,
    single: Vec<SingleStreamBlock>,
}

impl ResidentBlocks {
    /// Loads every block of `cfg` from `vb` (the transformer's root).
    pub fn new(cfg: &TransformerConfig, vb: &VarBuilder) -> candle_core::Result<Self> {
        let double = (0..cfg.num_layers)
            .map(|block_idx| DoubleStreamBlock::new(cfg, vb.pp("double_stream_blocks").pp(block_idx).pp("block")))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let single = (0..cfg.num_single_layers)
            .map(|block_idx| SingleStreamBlock::new(cfg, vb.pp("single_stream_blocks").pp(block_idx).pp("block")))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { double, single })
    }
}

impl BlockProvider for ResidentBlocks {
    fn double_block(&mut self, block_idx: usize) -> candle_core::Result<BlockRef<'_, DoubleStreamBlock>> {
        let block = self.double.get(block_idx).ok_or_else(|| out_of_range("double", block_idx))?;
        Ok(Box::new(block))
    }

    fn single_block(&mut self, block_idx: usize) -> candle_core::Result<BlockRef<'_, SingleStreamBlock>> {
        let block = self.single.get(block_idx).ok_or_else(|| out_of_range("single", block_idx))?;
        Ok(Box::new(block))
    }
}

fn out_of_range(kind: &str, block_idx: usize) -> candle_core::Error {
    candle_core::Error::Msg(format!("no {kind}-stream block {block_idx} in this model"))
}
