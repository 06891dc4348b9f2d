//! Generic device-memory management for a model that runs its weight units in a fixed cycle.
//!
//! - [`DevicePool`] accounts every byte of unit weights on the device tier against a budget,
//!   with current and peak figures; [`SlotPool`] reserves reusable slots for streamed units once.
//! - [`Plan`] decides which units stay resident and which stream, or says exactly how much budget
//!   is missing ([`MemoryError::BudgetTooSmall`]). [`Policy`] names the choices.
//! - [`Prefetcher`] hands out the streamed units in order, pass after pass, loading the next ones
//!   on a worker thread while the current one computes, through the narrow [`UnitLoader`] trait.
//! - [`CountingAllocator`] counts heap bytes, the device tier of a CPU-only run.
//!
//! This crate knows no HiDream types, no candle and no files: a unit is a size and an index, and
//! loading one is the business of whoever implements [`UnitLoader`].
//!
//! ```
//! use std::sync::Arc;
//! use hidream_memory::{DevicePool, Plan, Prefetcher, UnitLoader, UnitSpec};
//!
//! struct Blocks;
//! impl UnitLoader for Blocks {
//!     type Unit = Vec<f32>;
//!     type Error = std::io::Error;
//!     fn load(&self, unit_idx: usize) -> Result<Vec<f32>, std::io::Error> {
//!         Ok(vec![unit_idx as f32; 256])
//!     }
//! }
//!
//! // Unit 0 must stay resident; four 1 KiB blocks run every step.
//! let units = [UnitSpec::resident(100), UnitSpec::streamable(1024), UnitSpec::streamable(1024), UnitSpec::streamable(1024), UnitSpec::streamable(1024)];
//! let plan = Plan::budget(&units, 3200, 1)?;
//! assert_eq!(plan.resident(), [0, 1]); // Block 1 also fits beside two slots of 1 KiB.
//! assert_eq!(plan.streamed(), [2, 3, 4]);
//!
//! let pool = Arc::new(DevicePool::new(Some(3200)));
//! let _resident: Vec<_> =
//!     plan.resident().iter().map(|&idx| pool.try_reserve(units[idx].bytes, "resident unit")).collect::<Result<_, _>>()?;
//! let mut prefetcher = Prefetcher::from_plan(Arc::new(Blocks), &units, &plan, &pool)?;
//! for _step in 0..2 {
//!     for &unit_idx in plan.streamed() {
//!         let block = prefetcher.next()?;
//!         assert_eq!((block.unit_idx(), block[0]), (unit_idx, unit_idx as f32));
//!     }
//! }
//! assert_eq!(pool.peak_bytes(), plan.peak_weight_bytes());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod alloc;
mod bytes;
mod error;
mod plan;
mod pool;
mod schedule;

pub use alloc::CountingAllocator;
pub use bytes::{Budget, format_bytes, parse_bytes};
pub use error::{MemoryError, ScheduleError};
pub use plan::{DEFAULT_PREFETCH_DEPTH, Plan, Policy, PolicyKind, UnitSpec};
pub use pool::{DevicePool, Reservation, Slot, SlotPool};
pub use schedule::{Loaded, PrefetchStats, Prefetcher, UnitLoader};
