//! Plain-data configuration for HiDream-I1.
//!
//! This crate holds the transformer config exactly as diffusers' `transformer/config.json` spells
//! it, the named presets (the real `full` model, and the `tiny` and `small` test and benchmark
//! models), the variant presets (Full, Dev, Fast) and the size model: every tensor of the checkpoint
//! with its shape, grouped into the loadable units that the memory planner moves around.
//!
//! It must not know candle, safetensors, files or devices: it is serde and arithmetic only, so that
//! every other crate (and a planner run before any weight is downloaded) can depend on it cheaply.
#![forbid(unsafe_code)]

mod cost;
mod dtype;
mod error;
mod transformer;
mod units;
mod variant;

pub use cost::{
    ActivationPeak, ActivationTerms, BlockKind, ForwardFlops, MAX_SEQUENCE_LENGTH, PreparedState, Workload,
    image_tokens,
};
pub use dtype::DType;
pub use error::{ConfigError, Result};
pub use transformer::TransformerConfig;
pub use units::{Init, SizeModel, TensorSpec, Unit, UnitKind, UnitSize};
pub use variant::{SchedulerKind, Variant, VariantDefaults};
