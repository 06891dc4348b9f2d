//! HiDream-I1 end to end, in the order diffusers' `HiDreamImagePipeline` runs it.
//!
//! - [`runner`]: the transformer under a memory policy: the planner's resident set, streamed
//!   blocks prefetched in the background, and the exact per-prompt precomputation.
//! - [`denoise`]: hidream-schedulers' plain flow-matching Euler loop over the runner, for
//!   benchmarks.
//! - [`sampling`]: which official sampler (hidream-schedulers) each variant uses.
//! - [`vae`]: the Flux 16-channel AutoencoderKL decoder with tiling and slicing.
//! - [`generate`]: text to image, stage by stage, under a memory policy.
//! - [`planning`]: what fits in a memory budget and how fast it can run, from the config alone;
//!   image sizes (width × height) and diffusers' size rescaling.
//!
//! The text encoders are hidream-text's and the samplers hidream-schedulers'; this crate
//! re-exports neither. It wires the others; it is the first that knows weights, memory and model
//! together. It must not know the command line: the `hidream` binary is a thin layer over it.
#![forbid(unsafe_code)]

pub mod denoise;
mod error;
pub mod generate;
pub mod planning;
pub mod runner;
pub mod sampling;
mod units;
pub mod vae;

pub use error::{PipelineError, Result};
pub use units::{Precompute, UnitTable, modulation_prefix};
