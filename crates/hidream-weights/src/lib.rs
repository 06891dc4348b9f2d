//! The hidream-weights crate (in progress).
