//! The one error type of hidream-model.

/// What can go wrong when building or running the transformer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A candle operation failed (for weights, this wraps the loader's own typed error).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// An input tensor does not have the shape the config implies.
    #[error("input `{name}` has shape {actual:?}, expected {expected}")]
    InputShape { name: &'static str, expected: String, actual: Vec<usize> },
    /// A forward input is missing.
    #[error(
        "no input `{name}`; a forward needs hidden_states, timesteps, encoder_hidden_states_t5, encoder_hidden_states_llama3 and pooled_embeds"
    )]
    MissingInput { name: &'static str },
    /// The latent is larger than the model's `max_resolution` allows.
    #[error("latent {height}x{width} has {patches} patches, more than max_seq = {max_seq} of this model")]
    LatentTooLarge { height: usize, width: usize, patches: usize, max_seq: usize },
}

/// Result alias of this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
