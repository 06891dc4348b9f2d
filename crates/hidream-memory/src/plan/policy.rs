//! Memory policies by name, as the command line and config files give them.

use std::fmt;
use std::str::FromStr;

use super::{Plan, UnitSpec};
use crate::MemoryError;
use crate::bytes::{format_bytes_parseable, parse_bytes};

/// The prefetch depth of `stream` and `budget` when none is given: one unit loads while one computes.
pub const DEFAULT_PREFETCH_DEPTH: usize = 1;

/// The name of a policy, without its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    All,
    Sequential,
    Stream,
    Budget,
}

impl PolicyKind {
    /// Every kind, in a stable order.
    pub const ALL: [PolicyKind; 4] = [PolicyKind::All, PolicyKind::Sequential, PolicyKind::Stream, PolicyKind::Budget];

    /// The lowercase name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyKind::All => "all",
            PolicyKind::Sequential => "sequential",
            PolicyKind::Stream => "stream",
            PolicyKind::Budget => "budget",
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for PolicyKind {
    type Err = MemoryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL.into_iter().find(|kind| kind.as_str().eq_ignore_ascii_case(s.trim())).ok_or_else(|| {
            MemoryError::InvalidPolicy { given: s.to_owned(), problem: "unknown policy name".to_owned() }
        })
    }
}

/// How to place the units: a named policy with its settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Every unit resident ([`Plan::all`]).
    All,
    /// Load, run, free: one slot, no overlap ([`Plan::sequential`]).
    Sequential,
    /// Stream every unit that may stream, `prefetch` ahead ([`Plan::stream`]).
    Stream { prefetch: usize },
    /// Stream as little as `budget_bytes` allows ([`Plan::budget`]).
    Budget { budget_bytes: u64, prefetch: usize },
}

impl Policy {
    /// The name of this policy.
    pub fn kind(&self) -> PolicyKind {
        match self {
            Policy::All => PolicyKind::All,
            Policy::Sequential => PolicyKind::Sequential,
            Policy::Stream { .. } => PolicyKind::Stream,
            Policy::Budget { .. } => PolicyKind::Budget,
        }
    }

    /// The plan this policy makes for `units`; only a budget can fail.
    pub fn plan(&self, units: &[UnitSpec]) -> Result<Plan, MemoryError> {
        self.plan_with_scratch(units, 0)
    }

    /// The plan this policy makes for `units`, keeping `scratch_bytes` of room beside the resident
    /// units for work outside the passes ([`Plan::budget_with_scratch`]); only a budget can fail.
    pub fn plan_with_scratch(&self, units: &[UnitSpec], scratch_bytes: u64) -> Result<Plan, MemoryError> {
        match *self {
            Policy::All => Ok(Plan::all(units).with_scratch(scratch_bytes)),
            Policy::Sequential => Ok(Plan::sequential(units).with_scratch(scratch_bytes)),
            Policy::Stream { prefetch } => Ok(Plan::stream(units, prefetch).with_scratch(scratch_bytes)),
            Policy::Budget { budget_bytes, prefetch } => {
                Plan::budget_with_scratch(units, budget_bytes, prefetch, scratch_bytes)
            }
        }
    }

    /// The budget, for a [`Policy::Budget`]; the other policies have none.
    pub fn budget_bytes(&self) -> Option<u64> {
        match *self {
            Policy::Budget { budget_bytes, .. } => Some(budget_bytes),
            _ => None,
        }
    }

    /// The prefetch depth asked for: 0 for `all` and `sequential`.
    pub fn prefetch_depth(&self) -> usize {
        match *self {
            Policy::All | Policy::Sequential => 0,
            Policy::Stream { prefetch } | Policy::Budget { prefetch, .. } => prefetch,
        }
    }
}

impl fmt::Display for Policy {
    /// Writes the form [`Policy::from_str`] reads back: `all`, `sequential`, `stream:2`, `budget:8GiB:1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Policy::All | Policy::Sequential => f.write_str(self.kind().as_str()),
            Policy::Stream { prefetch } => write!(f, "stream:{prefetch}"),
            Policy::Budget { budget_bytes, prefetch } => {
                write!(f, "budget:{}:{prefetch}", format_bytes_parseable(budget_bytes))
            }
        }
    }
}

impl FromStr for Policy {
    type Err = MemoryError;

    /// Reads `all`, `sequential`, `stream[:DEPTH]` or `budget:SIZE[:DEPTH]`, where SIZE is
    /// anything [`parse_bytes`] reads and DEPTH defaults to [`DEFAULT_PREFETCH_DEPTH`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |problem: &str| MemoryError::InvalidPolicy { given: s.to_owned(), problem: problem.to_owned() };
        let mut parts = s.trim().split(':');
        let kind: PolicyKind = parts.next().unwrap_or_default().parse()?;
        let args: Vec<&str> = parts.collect();
        let depth = |arg: Option<&&str>| match arg {
            None => Ok(DEFAULT_PREFETCH_DEPTH),
            Some(depth) => depth.trim().parse().map_err(|_| invalid("the prefetch depth must be a whole number")),
        };
        match (kind, args.as_slice()) {
            (PolicyKind::All, []) => Ok(Policy::All),
            (PolicyKind::Sequential, []) => Ok(Policy::Sequential),
            (PolicyKind::Stream, [] | [_]) => Ok(Policy::Stream { prefetch: depth(args.first())? }),
            (PolicyKind::Budget, [size] | [size, _]) => {
                let budget_bytes = parse_bytes(size).map_err(|error| invalid(&error.to_string()))?;
                Ok(Policy::Budget { budget_bytes, prefetch: depth(args.get(1))? })
            }
            (PolicyKind::Budget, []) => Err(invalid("a budget needs a size, as in budget:8GiB")),
            _ => Err(invalid("too many settings")),
        }
    }
}
