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
    /// A text stage's stem and layers do not fit the memory budget.
    #[error(
        "the {encoder} text encoder ({}) does not fit the memory budget of {}: with prefetch depth \
         {prefetch_depth} it needs at least {} (its stem of {} stays resident beside its layers); raise the \
         budget to at least that{}",
        folder.display(),
        exact(*budget),
        exact(*minimum),
        exact(*stem_bytes),
        lower_depth(*prefetch_depth, *minimum, *minimum_sequential)
    )]
    StageBudgetTooSmall {
        /// `CLIP-L`, `CLIP-G`, `T5` or `Llama` (or `CLIP` where the caller did not say which).
        encoder: String,
        folder: PathBuf,
        budget: u64,
        /// The smallest budget that works at `prefetch_depth`: one byte less fails.
        minimum: u64,
        stem_bytes: u64,
        prefetch_depth: usize,
        /// The smallest budget at prefetch depth 0 (load, run, free).
        minimum_sequential: u64,
    },
    /// A config, a tokenizer or a tensor has the wrong shape or value.
    #[error("{what}: {problem}")]
    Invalid { what: String, problem: String },
}

/// Result alias of this crate.
pub type Result<T, E = TextError> = std::result::Result<T, E>;

fn exact(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", hidream_memory::format_bytes(bytes))
}

fn lower_depth(prefetch_depth: usize, minimum: u64, minimum_sequential: u64) -> String {
    if prefetch_depth > 0 && minimum_sequential < minimum {
        format!(", or lower the prefetch depth (depth 0, no overlap, needs {})", exact(minimum_sequential))
    } else {
        String::new()
    }
}

impl TextError {
    pub(crate) fn invalid(what: impl Into<String>, problem: impl Into<String>) -> Self {
        TextError::Invalid { what: what.into(), problem: problem.into() }
    }
}
