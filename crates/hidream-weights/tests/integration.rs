//! Integration tests of hidream-weights, through the public API only, on files in temporary
//! folders: broken files and their typed errors, synthetic checkpoints and inputs, and a fuzzer.

mod integration {
    mod broken;
    mod fuzz;
    mod read_into;
    mod read_stored;
    mod shard_changed;
    mod synth;
    mod unit_buffer;
    mod util;
}
