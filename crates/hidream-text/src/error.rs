//! The one error type of hidream-text.

use std::path::PathBuf;

/// What can go wrong loading a text encoder or its tokenizer, or encoding a prompt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TextError {
    #[error(transparent)]
    Weights(#[from] hidream_weights::WeightsError),
    #[error(transparent)]
    Memory(#[from] hidream_memory::MemoryError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The residency runtime failed (out of order, a size mismatch, a stopped worker).
    #[error("streaming: {0}")]
    Residency(#[from] hidream_memory::ResidencyError),
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A required file is missing from a model folder.
    #[error("missing {path}: {hint}")]
    MissingFile { path: PathBuf, hint: String },
    /// A config, a tokenizer or a tensor has the wrong shape or value.
    #[error("{what}: {problem}")]
    Invalid { what: String, problem: String },
}

/// Result alias of this crate.
pub type Result<T, E = TextError> = std::result::Result<T, E>;

impl TextError {
    pub(crate) fn invalid(what: impl Into<String>, problem: impl Into<String>) -> Self {
        TextError::Invalid { what: what.into(), problem: problem.into() }
    }
}
