//! The one error type of hidream-config.

use std::path::PathBuf;

/// Everything that can be wrong with a configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// A config value breaks a rule of the architecture.
    #[error("invalid transformer config: {field} {problem}")]
    Invalid { field: &'static str, problem: String },
    /// The config file could not be read.
    #[error("cannot read config {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The config file is not valid JSON for a HiDream transformer.
    #[error("cannot parse config {path}: {source} (expected diffusers' HiDreamImageTransformer2DModel config.json)")]
    Parse { path: PathBuf, source: serde_json::Error },
    /// A name (dtype, variant, preset) that is not one of the known ones.
    #[error("unknown {what} `{given}`; expected one of: {expected}")]
    UnknownName { what: &'static str, given: String, expected: &'static str },
}

/// Result alias of this crate.
pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

pub(crate) fn invalid(field: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field, problem: problem.into() }
}
