//! The HiDream-I1 diffusion transformer as candle layers.
//!
//! The mathematics follow diffusers' `transformer_hidream_image.py` line for line; the layer
//! structs follow candle-transformers (`new(cfg, vb)`, `vb.pp` names equal to the checkpoint keys).
//! See `docs/architecture.md` for how the pieces fit.
//!
//! This crate knows nothing of files, mmap, threads or memory budgets. The transformer receives its
//! blocks through the narrow [`BlockProvider`] trait, so that a caller can keep every block resident
//! ([`ResidentBlocks`]) or stream them from elsewhere without the model noticing.
#![forbid(unsafe_code)]

mod attention;
mod block;
mod embeddings;
mod error;
mod modulation;
mod moe;
mod nn;
mod provider;
mod transformer;

pub use attention::{AttentionConfig, HiDreamAttention};
pub use attention::{AttentionContext, scaled_dot_product_attention};
pub use block::{DoubleStreamBlock, SingleStreamBlock};
pub use embeddings::{PatchEmbed, TimestepEmbed, rope_table, timestep_frequencies};
pub use error::{ModelError, Result};
pub use modulation::{BlockModulation, Modulation, StepModulation};
pub use moe::{FeedForwardSwiGlu, MoeFeedForward, MoeGate};
pub use provider::{BlockProvider, BlockRef, ResidentBlocks};
pub use transformer::{
    CaptionProjection, Embedders, HiDreamModel, HiDreamTransformer, Patchified, StepInputs, TextProjection, TextTokens,
    TransformerInputs, caption_input, patchify,
};
