//! Safetensors I/O for HiDream-I1: sharded diffusers checkpoints, lazy loading by unit with
//! positioned reads, candle `VarBuilder` adapters, and synthetic checkpoints and inputs for tests and benches.
//!
//! The synthetic writer (`write_synthetic`, `synthetic_inputs`) is behind the `synth` cargo
//! feature, off by default, so that the loader alone has no rand dependency of its own (candle-core
//! still brings one).
//!
//! This is the ONLY crate of the workspace that knows files and mmap. It opens a checkpoint (a
//! diffusers `transformer/` folder with `diffusion_pytorch_model.safetensors.index.json` and its
//! shards, or a single `.safetensors` file), checks every header before any long work, and reads
//! the bytes of one tensor or one unit (every tensor under a prefix) only when asked, converting
//! them to the requested dtype and device on the way.
//!
//! It knows nothing of the model's layers or of memory budgets: the tensor list it validates
//! against comes from [`hidream_config::SizeModel`], and which units to load, when and where is
//! decided by the memory and model crates.
//!
//! Every malformed input is a typed [`WeightsError`] naming the file and the tensor; no input
//! makes this crate panic. The only `unsafe` code is the mapping of files, in the `mmap` module;
//! the map serves the headers, read once at open, and every tensor's bytes are read with `pread`,
//! so a shard truncated under a run is a [`WeightsError::ShardChanged`], never a SIGBUS.
//!
//! ```no_run
//! # fn main() -> hidream_weights::Result<()> {
//! use hidream_weights::Checkpoint;
//! use candle_core::{DType, Device};
//!
//! let checkpoint = Checkpoint::open(std::path::Path::new("HiDream-I1-Full"))?;
//! let sizes = hidream_config::SizeModel::new(&checkpoint.config()?);
//! checkpoint.validate(&sizes)?;
//! let block = hidream_config::Unit::DoubleBlock(7).prefixes();
//! let tensors = checkpoint.load_prefixes(&block, DType::BF16, &Device::Cpu)?;
//! # Ok(()) }
//! ```
#![deny(unsafe_code)]

mod atomic;
mod checkpoint;
mod convert;
mod error;
mod header;
mod inputs;
mod mmap;
#[cfg(feature = "synth")]
mod synth;
mod unit_buffer;
mod var_builder;

pub use atomic::{check_writable, remove_partial_files, write_atomic};
pub use checkpoint::{Checkpoint, TensorInfo};
pub use convert::ReadDType;
pub use error::{Result, WeightsError};
#[cfg(feature = "synth")]
pub use inputs::{InputSpec, synthetic_inputs};
pub use inputs::{read_tensors, write_tensors};
#[cfg(feature = "synth")]
pub use synth::{SynthOptions, SynthSummary, write_synthetic};
pub use unit_buffer::{LoadedTensors, Placed, UnitBuffer};
pub use var_builder::unit_var_builder;
