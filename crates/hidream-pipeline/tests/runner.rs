//! The transformer under every memory policy: outputs bit-identical to the all-resident model,
//! budgets respected, and a too-small budget refused with its exact minimum.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use hidream_config::TransformerConfig;
use hidream_memory::{MemoryError, Plan, Policy};
use hidream_model::{AttentionConfig, HiDreamModel, TransformerInputs};
use hidream_pipeline::denoise::{TextConditioning, denoise};
use hidream_pipeline::runner::{RunnerConfig, TransformerRunner};
use hidream_pipeline::{PipelineError, Precompute, UnitTable};
use hidream_schedulers::euler::{EulerSchedule, StepEvent};
use hidream_weights::{Checkpoint, InputSpec, SynthOptions};

struct Fixture {
    _dir: tempfile::TempDir,
    checkpoint: Checkpoint,
    cfg: TransformerConfig,
    inputs: TransformerInputs,
}

/// The tiny preset stored in bf16 (so loading converts), with non-square batch-2 inputs.
fn fixture() -> Result<Fixture> {
    let dir = tempfile::tempdir()?;
    let cfg = TransformerConfig::tiny();
    let options = SynthOptions { seed: 11, dtype: hidream_config::DType::BF16, max_shard_bytes: 200_000 };
    hidream_weights::write_synthetic(dir.path(), &cfg, &options)?;
    let spec = InputSpec { batch: 2, height: 8, width: 12, t5_tokens: 5, llama_tokens: 7, seed: 2 };
    let mut tensors: HashMap<String, Tensor> = hidream_weights::synthetic_inputs(&cfg, &spec)?;
    let inputs = TransformerInputs::from_tensors(&mut tensors, "")?;
    Ok(Fixture { checkpoint: Checkpoint::open(dir.path())?, _dir: dir, cfg, inputs })
}

fn runner(fixture: &Fixture, policy: Policy, precompute: Precompute) -> Result<TransformerRunner, PipelineError> {
    let config = RunnerConfig {
        policy,
        compute_dtype: hidream_config::DType::F32,
        precompute,
        attention: AttentionConfig::default(),
    };
    TransformerRunner::new(fixture.checkpoint.clone(), &Device::Cpu, config)
}

fn bits(tensor: &Tensor) -> Result<Vec<u32>> {
    Ok(tensor.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
}

fn text(inputs: &TransformerInputs) -> TextConditioning {
    TextConditioning {
        encoder_hidden_states_t5: inputs.encoder_hidden_states_t5.clone(),
        encoder_hidden_states_llama3: inputs.encoder_hidden_states_llama3.clone(),
        pooled_embeds: inputs.pooled_embeds.clone(),
    }
}

/// Every policy the benchmark runs, at budgets from the exact minimum up.
fn policies(fixture: &Fixture, precompute: Precompute) -> Vec<Policy> {
    let table = UnitTable::new(&fixture.cfg, hidream_config::DType::F32, precompute);
    let total = table.weight_bytes_total();
    let mut policies = vec![
        Policy::All,
        Policy::Sequential,
        Policy::Stream { prefetch: 1 },
        Policy::Stream { prefetch: 2 },
        Policy::Budget { budget_bytes: total, prefetch: 1 },
    ];
    for prefetch in [0, 1, 2] {
        let minimum = Plan::minimum_budget(table.specs(), prefetch);
        policies.push(Policy::Budget { budget_bytes: minimum, prefetch });
        policies.push(Policy::Budget { budget_bytes: minimum + table.specs()[1].bytes, prefetch });
    }
    policies
}

/// One forward under every policy equals the all-resident `HiDreamModel`, bit for bit.
#[test]
fn single_forward_is_bit_identical_under_every_policy() -> Result<()> {
    let fixture = fixture()?;
    let vb = fixture.checkpoint.var_builder(DType::F32, &Device::Cpu);
    let reference = bits(&HiDreamModel::new(&fixture.cfg, &vb)?.forward(&fixture.inputs)?)?;
    for policy in policies(&fixture, Precompute::PerStep) {
        let mut runner = runner(&fixture, policy, Precompute::PerStep)?;
        for repeat in 0..2 {
            let out = runner.forward(&fixture.inputs)?;
            assert!(bits(&out)? == reference, "{policy} (forward {repeat}) differs from the resident model");
        }
        if let Some(budget) = runner.pool().budget_bytes() {
            assert!(runner.pool().peak_bytes() <= budget, "{policy}: peak {} > budget", runner.pool().peak_bytes());
        }
        assert_eq!(runner.pool().peak_bytes(), runner.plan().peak_weight_bytes(), "{policy}");
    }
    Ok(())
}

/// A three-step Euler run under every policy, with and without the per-prompt precomputation,
/// equals the all-resident per-step run bit for bit.
#[test]
fn denoising_is_bit_identical_under_every_policy_and_precomputation() -> Result<()> {
    let fixture = fixture()?;
    let schedule = EulerSchedule::linear(3)?;
    let text = text(&fixture.inputs);
    let noise = &fixture.inputs.hidden_states;
    let mut reference_runner = runner(&fixture, Policy::All, Precompute::PerStep)?;
    let (reference, _) = denoise(&mut reference_runner, noise, &text, &schedule, |_| {})?;
    let reference = bits(&reference)?;
    for precompute in [Precompute::PerStep, Precompute::PerPrompt] {
        for policy in policies(&fixture, precompute) {
            let mut runner = runner(&fixture, policy, precompute)?;
            let mut steps = 0;
            let (out, timings) = denoise(&mut runner, noise, &text, &schedule, |event| {
                if let StepEvent::Done(..) = event {
                    steps += 1
                }
            })?;
            assert_eq!(steps, 3);
            assert!(bits(&out)? == reference, "{policy} {precompute:?} differs from the all-resident run");
            if precompute == Precompute::PerPrompt {
                assert!(timings.prepared_bytes > 0);
            }
            if let Some(budget) = runner.pool().budget_bytes() {
                assert!(runner.pool().peak_bytes() <= budget, "{policy} {precompute:?}: over budget");
            }
            // Every streamed unit was delivered once per step.
            let streamed = runner.plan().streamed().len() as u64;
            assert_eq!(runner.stats().units_delivered, 3 * streamed, "{policy} {precompute:?}");
        }
    }
    Ok(())
}

/// A budget one byte under the minimum is refused with the exact minimum; the minimum runs.
#[test]
fn budget_below_the_minimum_is_a_typed_error() -> Result<()> {
    let fixture = fixture()?;
    for precompute in [Precompute::PerStep, Precompute::PerPrompt] {
        let table = UnitTable::new(&fixture.cfg, hidream_config::DType::F32, precompute);
        let minimum = Plan::minimum_budget(table.specs(), 1);
        match runner(&fixture, Policy::Budget { budget_bytes: minimum - 1, prefetch: 1 }, precompute) {
            Err(PipelineError::Memory(MemoryError::BudgetTooSmall { minimum: reported, .. })) => {
                assert_eq!(reported, minimum)
            }
            other => panic!("expected BudgetTooSmall, got {other:?}"),
        }
        runner(&fixture, Policy::Budget { budget_bytes: minimum, prefetch: 1 }, precompute)?;
    }
    Ok(())
}

/// A per-prompt runner refuses the per-step forward instead of running without modulation.
#[test]
fn per_prompt_runner_needs_prepare() -> Result<()> {
    let fixture = fixture()?;
    let mut runner = runner(&fixture, Policy::Stream { prefetch: 1 }, Precompute::PerPrompt)?;
    assert!(matches!(runner.forward(&fixture.inputs), Err(PipelineError::Invalid { .. })));
    Ok(())
}
