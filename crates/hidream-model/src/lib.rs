//! The hidream-model crate (in progress).
