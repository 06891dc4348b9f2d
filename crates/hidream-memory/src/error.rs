//! The error types of hidream-memory: [`MemoryError`] for the pool, the planner and the size
//! parser, and [`ScheduleError`], generic over the loader's own error, for the prefetch scheduler.

use crate::bytes::format_bytes;

/// Everything that can go wrong while accounting, planning or parsing sizes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// A reservation would take the device pool over its budget.
    #[error(
        "cannot reserve {} for {label}: {} of the {} budget is in use",
        exact(*requested),
        exact(*current),
        exact(*budget)
    )]
    OverBudget { label: String, requested: u64, current: u64, budget: u64 },
    /// The pool was closed while a caller waited for room in it.
    #[error("the device pool is closed")]
    PoolClosed,
    /// No residency plan fits the budget.
    #[error("{}", budget_too_small(*budget, *minimum, *prefetch_depth, *minimum_sequential))]
    BudgetTooSmall {
        /// The budget that was asked for.
        budget: u64,
        /// The smallest budget that succeeds with `prefetch_depth`: one byte less fails.
        minimum: u64,
        /// The prefetch depth that was asked for.
        prefetch_depth: usize,
        /// The smallest budget that succeeds with prefetch depth 0 (load, run, free).
        minimum_sequential: u64,
    },
    /// A byte size such as `8GiB` or a budget such as `25%` that cannot be parsed.
    #[error("invalid size `{given}`: {problem} (expected a size such as 1073741824, 512MiB, 8GiB, 1.5GB or 25%)")]
    InvalidSize { given: String, problem: &'static str },
    /// A memory policy that cannot be parsed.
    #[error(
        "invalid memory policy `{given}`: {problem} (expected all, sequential, stream[:DEPTH] or budget:SIZE[:DEPTH])"
    )]
    InvalidPolicy { given: String, problem: String },
    /// A unit index past the end of the unit list.
    #[error("unit {unit_idx} does not exist: there are {n_units} units")]
    UnitOutOfRange { unit_idx: usize, n_units: usize },
    /// A streamed unit that does not fit in a slot.
    #[error("unit {unit_idx} needs {} but a slot holds only {}", exact(*unit_bytes), exact(*slot_bytes))]
    UnitLargerThanSlot { unit_idx: usize, unit_bytes: u64, slot_bytes: u64 },
    /// A slot pool whose size does not match the prefetch depth (depth + 1 slots).
    #[error("prefetch depth {prefetch_depth} needs {} slots, the slot pool has {n_slots}", prefetch_depth + 1)]
    SlotCount { n_slots: usize, prefetch_depth: usize },
    /// A prefetcher was asked to stream an empty list of units.
    #[error("nothing to stream: the plan keeps every unit resident")]
    NothingToStream,
    /// The prefetch worker thread could not be started.
    #[error("cannot start the prefetch worker: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Everything that can go wrong while the prefetcher hands out units.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError<E: std::error::Error + 'static> {
    /// The loader failed on this unit. The prefetcher stops: later calls return [`Self::Stopped`].
    #[error("cannot load unit {unit_idx}: {source}")]
    Load { unit_idx: usize, source: E },
    /// The caller holds every slot, so no further unit can load: drop a unit before asking for the next.
    #[error("all {n_slots} slots are held by the caller: drop a unit before asking for the next one")]
    AllSlotsHeld { n_slots: usize },
    /// An earlier call failed and the prefetcher stopped.
    #[error("the prefetcher stopped after an earlier error")]
    Stopped,
    /// The loader panicked on the worker thread.
    #[error("the prefetch worker panicked: {message}")]
    WorkerPanicked { message: String },
}

/// `1.50 GiB (1610612736 bytes)`: human units with the exact figure.
pub(crate) fn exact(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", format_bytes(bytes))
}

fn budget_too_small(budget: u64, minimum: u64, prefetch_depth: usize, minimum_sequential: u64) -> String {
    let mut message = format!(
        "memory budget {} is too small: with prefetch depth {prefetch_depth} the smallest budget that works is {}; \
         raise the budget to at least that",
        exact(budget),
        exact(minimum),
    );
    if prefetch_depth > 0 && minimum_sequential < minimum {
        message.push_str(&format!(
            ", or lower the prefetch depth (depth 0, no overlap, needs {})",
            exact(minimum_sequential)
        ));
    }
    message
}
