//! The one error type of hidream-pipeline.

use std::path::PathBuf;

/// Everything that can go wrong between a checkpoint folder and an image.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] hidream_config::ConfigError),
    #[error(transparent)]
    Weights(#[from] hidream_weights::WeightsError),
    #[error(transparent)]
    Memory(#[from] hidream_memory::MemoryError),
    #[error(transparent)]
    Model(#[from] hidream_model::ModelError),
    #[error(transparent)]
    Scheduler(#[from] hidream_schedulers::SchedulerError),
    #[error(transparent)]
    Text(#[from] hidream_text::TextError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The residency runtime failed (out of order, a size mismatch, a stopped worker).
    #[error("streaming: {0}")]
    Residency(#[from] hidream_memory::ResidencyError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// A required file is missing from a model folder.
    #[error("missing {path}: {hint}")]
    MissingFile { path: PathBuf, hint: String },
    /// Not even the VAE decode that holds the least (tiled, sliced, its attention in chunks) fits
    /// the budget.
    #[error(
        "the VAE decode needs at least {} (its weights and a tiled, sliced decode with chunked attention), \
         but the budget is {}; raise --budget or generate a smaller image",
        hidream_memory::format_bytes(*minimum),
        hidream_memory::format_bytes(*budget)
    )]
    VaeBudgetTooSmall { budget: u64, minimum: u64 },
    /// A tensor or setting has the wrong shape or value.
    #[error("{what}: {problem}")]
    Invalid { what: String, problem: String },

    /// A stage of `generate` that cannot run, found when the pipeline is planned, before any long
    /// work: the error names the stage.
    #[error("the {stage} stage cannot run: {source}")]
    InStage { stage: String, source: Box<PipelineError> },
}

/// Result alias of this crate.
pub type Result<T, E = PipelineError> = std::result::Result<T, E>;

impl PipelineError {
    pub(crate) fn invalid(what: impl Into<String>, problem: impl Into<String>) -> Self {
        PipelineError::Invalid { what: what.into(), problem: problem.into() }
    }

    /// This error, as the one that stops `stage`.
    pub(crate) fn in_stage(self, stage: crate::generate::Stage) -> Self {
        PipelineError::InStage { stage: stage.describe().to_owned(), source: Box::new(self) }
    }
}
