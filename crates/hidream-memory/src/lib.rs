//! Generic device-memory management for a model that runs its weight units in a fixed cycle.
//!
//! - [`Plan`] decides which units stay resident and which stream, or says exactly how much budget
//!   is missing ([`MemoryError::BudgetTooSmall`]). [`Policy`] names the choices.
//! - [`Residency`] is the runtime every streamed model uses: it loads the plan's resident units
//!   once and streams the others pass after pass through [`Pass`]es. Its [`Prefetcher`] loads
//!   the next streamed units on a worker thread, into the reusable buffers of a [`SlotPool`],
//!   while the current one computes.
//! - [`UnitLoader`] is the narrow interface to whoever moves the bytes: it allocates device
//!   buffers, loads a unit *into* one, and orders copies and compute with ready and consumed
//!   fences (trivial on the CPU, events on CUDA). See [`loader`](UnitLoader) for the protocol.
//! - [`BudgetLedger`] accounts every byte of unit weights on the device tier against a budget,
//!   with current and peak figures: the planned bytes, reserved before each buffer is allocated.
//! - [`CountingAllocator`] counts heap bytes: on a CPU-only run, the measured peak.
//! - [`staged`] is the host side of a GPU loader: a unit's bytes go through two reusable staging
//!   buffers and a copy queue, ordered by events ([`staged::Stager`] over [`staged::CopyQueues`]).
//!   [`staged::ThreadQueues`] runs the same protocol on CPU threads, for the tests.
//!
//! This crate knows no HiDream types, no candle and no files: a unit is a size and an index, and
//! loading one is the business of whoever implements [`UnitLoader`].
//!
//! ```
//! use std::sync::Arc;
//! use hidream_memory::{BudgetLedger, Plan, Ready, Residency, SlotBuffer, UnitLoader, UnitSpec};
//!
//! /// Blocks of `bytes` each, whose byte `i` is the block index; the unit is its first byte.
//! struct Blocks;
//! impl UnitLoader for Blocks {
//!     type Buffer = Vec<u8>;
//!     type Unit = u8;
//!     type Fence = ();
//!     type Error = std::io::Error;
//!     fn allocate(&self, bytes: u64) -> Result<Vec<u8>, std::io::Error> {
//!         Ok(vec![0; bytes as usize])
//!     }
//!     fn load_into(&self, unit_idx: usize, slot: &mut SlotBuffer<Vec<u8>, ()>) -> Result<Ready<u8, ()>, std::io::Error> {
//!         let (buffer, _consumed) = slot.reuse(); // On the CPU the consumed fence is complete.
//!         let bytes = if unit_idx == 0 { 100 } else { 1024 };
//!         buffer[..bytes].fill(unit_idx as u8);
//!         Ok(Ready { unit: buffer[0], ready: (), bytes_loaded: bytes as u64 })
//!     }
//!     fn wait_ready(&self, _ready: &()) -> Result<(), std::io::Error> {
//!         Ok(())
//!     }
//!     fn record_consumed(&self) {}
//! }
//!
//! // Unit 0 must stay resident; four 1 KiB blocks run every step.
//! let units = [UnitSpec::resident(100), UnitSpec::streamable(1024), UnitSpec::streamable(1024), UnitSpec::streamable(1024), UnitSpec::streamable(1024)];
//! let plan = Plan::budget(&units, 3200, 1)?;
//! assert_eq!(plan.resident(), [0, 1]); // Block 1 also fits beside two slots of 1 KiB.
//! assert_eq!(plan.streamed(), [2, 3, 4]);
//!
//! let ledger = Arc::new(BudgetLedger::new(Some(3200)));
//! let mut residency = Residency::new(Arc::new(Blocks), &units, plan, Arc::clone(&ledger))?;
//! residency.expect_passes(2); // Load ahead across the step boundary, and no further.
//! for _step in 0..2 {
//!     let mut pass = residency.pass()?;
//!     for unit_idx in 0..units.len() {
//!         assert_eq!(*pass.unit(unit_idx)?, unit_idx as u8);
//!     }
//! }
//! assert_eq!(residency.stats().units_loaded, 6); // 3 streamed units, 2 passes, nothing wasted.
//! assert_eq!(ledger.peak_bytes(), 100 + 1024 + 2 * 1024);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod alloc;
mod bytes;
mod error;
mod ledger;
mod loader;
mod plan;
mod residency;
mod schedule;
mod slots;
pub mod staged;

pub use alloc::CountingAllocator;
pub use bytes::{Budget, format_bytes, parse_bytes};
pub use error::{MemoryError, ResidencyError, ScheduleError};
pub use ledger::{BudgetLedger, Reservation};
pub use loader::{Ready, SlotBuffer, UnitLoader};
pub use plan::{DEFAULT_PREFETCH_DEPTH, Plan, Policy, PolicyKind, UnitSpec};
pub use residency::{Pass, Residency, UnitRef};
pub use schedule::{Loaded, PrefetchStats, Prefetcher};
pub use slots::SlotPool;
