//! The error types of hidream-memory: [`MemoryError`] for the ledger, the planner and the size
//! parser; [`ResidencyError`] for the runtime; and [`ScheduleError`], which adds the loader's own
//! error to it.

use crate::bytes::format_bytes;

/// Everything that can go wrong while accounting, planning or parsing sizes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MemoryError {
    /// A reservation would take the budget ledger over its budget.
    #[error(
        "cannot reserve {} for {label}: {} of the {} budget is in use",
        exact(*requested),
        exact(*current),
        exact(*budget)
    )]
    OverBudget { label: String, requested: u64, current: u64, budget: u64 },
    /// The ledger was closed while a caller waited for room in it.
    #[error("the budget ledger is closed")]
    LedgerClosed,
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
    /// A prefetcher was asked to stream an empty list of units.
    #[error("nothing to stream: the plan keeps every unit resident")]
    NothingToStream,
    /// The prefetch worker thread could not be started.
    #[error("cannot start the prefetch worker: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Everything that can go wrong while the runtime hands out units, apart from the loader's own
/// errors: see [`ScheduleError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResidencyError {
    /// Reserving the resident units or the slots failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// A loader filled a different number of bytes than the unit's spec, which the plan used.
    #[error(
        "unit {unit_idx} loaded {} but its size was planned as {}: the loader and the size model disagree",
        exact(*loaded),
        exact(*planned)
    )]
    SizeMismatch { unit_idx: usize, planned: u64, loaded: u64 },
    /// A pass asked for a streamed unit out of the plan's order.
    #[error("unit {requested} was asked for, but the next streamed unit of the pass is {expected}")]
    OutOfOrder { requested: usize, expected: usize },
    /// A pass asked for a unit that the plan neither keeps resident nor streams.
    #[error("unit {unit_idx} is not part of the plan ({n_units} units)")]
    NotInPlan { unit_idx: usize, n_units: usize },
    /// A pass asked for more streamed units than a pass has.
    #[error("the pass already delivered all {pass_len} streamed units")]
    PassComplete { pass_len: usize },
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

/// Everything that can go wrong while the runtime loads and hands out units: the loader's own
/// error `E`, or a [`ResidencyError`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError<E: std::error::Error + 'static> {
    /// The loader failed on this unit. A prefetcher stops: later calls return
    /// [`ResidencyError::Stopped`] until the runtime starts a fresh pass.
    #[error("cannot load unit {unit_idx}: {source}")]
    Load { unit_idx: usize, source: E },
    /// The loader could not allocate a buffer.
    #[error("cannot allocate {} for {what}: {source}", exact(*bytes))]
    Allocate { what: String, bytes: u64, source: E },
    /// Anything else.
    #[error(transparent)]
    Residency(#[from] ResidencyError),
}

impl<E: std::error::Error + 'static> From<MemoryError> for ScheduleError<E> {
    fn from(error: MemoryError) -> Self {
        ScheduleError::Residency(ResidencyError::Memory(error))
    }
}

impl<E: std::error::Error + 'static> ScheduleError<E> {
    /// The loader's error as it was, or the runtime's converted into the caller's error type:
    /// the one mapping every user of the runtime needs (`E` derives `From<ResidencyError>`).
    pub fn into_error(self) -> E
    where
        E: From<ResidencyError>,
    {
        match self {
            ScheduleError::Load { source, .. } | ScheduleError::Allocate { source, .. } => source,
            ScheduleError::Residency(error) => error.into(),
        }
    }
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
