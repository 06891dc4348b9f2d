//! The one error type of hidream-schedulers.

use std::path::PathBuf;

/// What can go wrong building or stepping a sampler.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchedulerError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// A scheduler config file could not be read.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A config, a schedule or a tensor has the wrong shape or value.
    #[error("{what}: {problem}")]
    Invalid { what: String, problem: String },
}

/// Result alias of this crate.
pub type Result<T, E = SchedulerError> = std::result::Result<T, E>;

impl SchedulerError {
    pub(crate) fn invalid(what: impl Into<String>, problem: impl Into<String>) -> Self {
        SchedulerError::Invalid { what: what.into(), problem: problem.into() }
    }
}
