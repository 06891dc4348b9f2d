//! The ledger's figures against the heap the counting allocator measures: the planned weight
//! bytes are really allocated (the slot and resident buffers exist), and streaming really holds
//! less than keeping everything resident. One test in its own binary, so that no other test's
//! allocations run in between.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{Device, Tensor};
use hidream_config::TransformerConfig;
use hidream_memory::{CountingAllocator, Policy};
use hidream_model::{AttentionConfig, TransformerInputs};
use hidream_pipeline::Precompute;
use hidream_pipeline::denoise::{TextConditioning, denoise};
use hidream_pipeline::runner::{RunnerConfig, TransformerRunner};
use hidream_schedulers::euler::EulerSchedule;
use hidream_weights::{Checkpoint, InputSpec, SynthOptions};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// The heap peak above the level before the runner existed, and the ledger's peak.
fn measure(checkpoint: &Checkpoint, inputs: &TransformerInputs, policy: Policy) -> Result<(u64, u64)> {
    let config = RunnerConfig {
        policy,
        compute_dtype: hidream_config::DType::F32,
        precompute: Precompute::PerPrompt,
        attention: AttentionConfig::default(),
    };
    let text = TextConditioning {
        encoder_hidden_states_t5: inputs.encoder_hidden_states_t5.clone(),
        encoder_hidden_states_llama3: inputs.encoder_hidden_states_llama3.clone(),
        pooled_embeds: inputs.pooled_embeds.clone(),
    };
    let schedule = EulerSchedule::linear(2)?;
    CountingAllocator::reset_peak();
    let before = CountingAllocator::current_bytes();
    let mut runner = TransformerRunner::new(checkpoint.clone(), &Device::Cpu, config)?;
    denoise(&mut runner, &inputs.hidden_states, &text, &schedule, |_| {})?;
    let heap = CountingAllocator::peak_bytes() - before;
    Ok((heap, runner.ledger().peak_bytes()))
}

#[test]
fn the_ledger_matches_the_measured_heap() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cfg = TransformerConfig::tiny();
    let options = SynthOptions { seed: 3, dtype: hidream_config::DType::BF16, max_shard_bytes: 1 << 30 };
    hidream_weights::write_synthetic(dir.path(), &cfg, &options)?;
    let spec = InputSpec { batch: 1, height: 8, width: 8, t5_tokens: 4, llama_tokens: 4, seed: 1 };
    let mut tensors: HashMap<String, Tensor> = hidream_weights::synthetic_inputs(&cfg, &spec)?;
    let inputs = TransformerInputs::from_tensors(&mut tensors, "")?;
    let checkpoint = Checkpoint::open(dir.path())?;

    let (heap_all, ledger_all) = measure(&checkpoint, &inputs, Policy::All)?;
    let (heap_sequential, ledger_sequential) = measure(&checkpoint, &inputs, Policy::Sequential)?;
    assert!(heap_all >= ledger_all, "all: heap {heap_all} below the ledger's {ledger_all}");
    assert!(heap_sequential >= ledger_sequential, "sequential: heap {heap_sequential} < ledger {ledger_sequential}");
    assert!(ledger_sequential < ledger_all);
    assert!(
        heap_sequential < heap_all,
        "streaming holds no less: sequential {heap_sequential} vs all {heap_all} bytes of heap"
    );
    Ok(())
}
