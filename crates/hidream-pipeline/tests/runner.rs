//! The transformer under every memory policy: outputs bit-identical to the all-resident model,
//! budgets respected, a too-small budget refused with its exact minimum, the edge of the budget
//! accepted, and the runtime recovering from an error in the middle of a pass.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use hidream_config::TransformerConfig;
use hidream_memory::{MemoryError, Policy};
use hidream_model::{AttentionConfig, HiDreamModel, TransformerInputs};
use hidream_pipeline::denoise::{TextConditioning, denoise};
use hidream_pipeline::runner::{RunnerConfig, TransformerRunner};
use hidream_pipeline::{PipelineError, Precompute, UnitTable};
use hidream_schedulers::euler::{EulerSchedule, StepEvent};
use hidream_test_support::bits;
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

fn minimum_budget(cfg: &TransformerConfig, precompute: Precompute, prefetch: usize) -> u64 {
    hidream_pipeline::runner::minimum_budget(cfg, hidream_config::DType::F32, precompute, prefetch)
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
        let minimum = minimum_budget(&fixture.cfg, precompute, prefetch);
        policies.push(Policy::Budget { budget_bytes: minimum, prefetch });
        policies.push(Policy::Budget { budget_bytes: minimum + table.specs()[1].bytes, prefetch });
    }
    // The edge: exactly the bytes one step needs.
    policies.push(Policy::Budget { budget_bytes: table.step_bytes(), prefetch: 1 });
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
        if let Some(budget) = runner.ledger().budget_bytes() {
            let peak = runner.ledger().peak_bytes();
            assert!(peak <= budget, "{policy}: peak {peak} > budget");
        }
        // Every load's bytes were checked against its unit's planned size by the runtime (a
        // mismatch is an error); here the figures of a whole forward agree with the table too.
        let streamed: u64 = runner.plan().streamed().iter().map(|&idx| runner.table().specs()[idx].bytes).sum();
        assert_eq!(runner.stats().bytes_delivered, 2 * streamed, "{policy}");
        assert_eq!(runner.stats().units_loaded, runner.stats().units_delivered, "{policy}: a load was wasted");
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
            if let Some(budget) = runner.ledger().budget_bytes() {
                assert!(runner.ledger().peak_bytes() <= budget, "{policy} {precompute:?}: over budget");
            }
            // Every streamed unit was delivered once per step, and nothing loaded for a fourth.
            let streamed = runner.plan().streamed().len() as u64;
            assert_eq!(runner.stats().units_delivered, 3 * streamed, "{policy} {precompute:?}");
            assert_eq!(runner.stats().units_loaded, 3 * streamed, "{policy} {precompute:?}: a load was wasted");
        }
    }
    Ok(())
}

/// A budget one byte under the minimum is refused with the exact minimum; the minimum runs.
#[test]
fn budget_below_the_minimum_is_a_typed_error() -> Result<()> {
    let fixture = fixture()?;
    for precompute in [Precompute::PerStep, Precompute::PerPrompt] {
        let minimum = minimum_budget(&fixture.cfg, precompute, 1);
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

/// A budget of exactly the bytes of one step works, with the precomputation too, whose layers
/// need room of their own beside the resident units.
#[test]
fn a_budget_of_exactly_the_step_bytes_runs() -> Result<()> {
    let fixture = fixture()?;
    let schedule = EulerSchedule::linear(2)?;
    for precompute in [Precompute::PerStep, Precompute::PerPrompt] {
        let table = UnitTable::new(&fixture.cfg, hidream_config::DType::F32, precompute);
        let budget_bytes = table.step_bytes();
        let mut runner = runner(&fixture, Policy::Budget { budget_bytes, prefetch: 1 }, precompute)?;
        denoise(&mut runner, &fixture.inputs.hidden_states, &text(&fixture.inputs), &schedule, |_| {})?;
        assert!(runner.ledger().peak_bytes() <= budget_bytes, "{precompute:?}");
    }
    Ok(())
}

/// A prefetch deeper than a pass is clamped: no duplicate loads, and the ledger stays true.
#[test]
fn a_prefetch_deeper_than_the_pass_is_clamped() -> Result<()> {
    let fixture = fixture()?;
    let mut runner = runner(&fixture, Policy::Stream { prefetch: 100_000 }, Precompute::PerStep)?;
    let n_streamed = runner.plan().streamed().len();
    assert_eq!(runner.plan().prefetch_depth(), n_streamed - 1);
    assert_eq!(runner.plan().requested_prefetch_depth(), Some(100_000));
    runner.forward(&fixture.inputs)?;
    let slot_bytes = runner.plan().slot_bytes();
    assert_eq!(runner.ledger().peak_bytes(), runner.plan().resident_bytes() + n_streamed as u64 * slot_bytes);
    assert_eq!(runner.stats().units_loaded, n_streamed as u64);
    Ok(())
}

/// A forward that fails in the middle of a pass (at block k, after k blocks were streamed)
/// leaves the runner working: the next forward starts a fresh pass and is bit-identical to a
/// fresh runner's.
#[test]
fn a_forward_that_fails_mid_pass_leaves_the_runner_working() -> Result<()> {
    let fixture = fixture()?;
    let text = text(&fixture.inputs);
    let batch = fixture.inputs.hidden_states.dim(0)?;
    let timesteps = vec![Tensor::full(500f32, batch, &Device::Cpu)?];
    let prepare = |runner: &mut TransformerRunner| {
        runner.prepare(
            &text.encoder_hidden_states_t5,
            &text.encoder_hidden_states_llama3,
            &text.pooled_embeds,
            &timesteps,
        )
    };
    let hidden = &fixture.inputs.hidden_states;
    let mut fresh = runner(&fixture, Policy::Stream { prefetch: 2 }, Precompute::PerPrompt)?;
    let prepared = prepare(&mut fresh)?;
    let expected = bits(&fresh.forward_prepared(&prepared, 0, hidden)?)?;
    for fail_at_block in [0, 1, fixture.cfg.num_layers] {
        for policy in [Policy::Sequential, Policy::Stream { prefetch: 2 }] {
            let mut runner = runner(&fixture, policy, Precompute::PerPrompt)?;
            let prepared = prepare(&mut runner)?;
            // The caller's error: a prepared state that lacks the modulation of block k onwards.
            let mut broken = prepared.clone();
            for step in &mut broken.modulation {
                let n_double = fail_at_block.min(step.double.len());
                step.double.truncate(n_double);
                step.single.truncate(fail_at_block - n_double);
            }
            assert!(runner.forward_prepared(&broken, 0, hidden).is_err(), "{policy}: block {fail_at_block}");
            // Another caller's error: a batch that does not match the prepared state.
            assert!(runner.forward_prepared(&prepared, 0, &hidden.narrow(0, 0, 1)?).is_err(), "{policy}");
            for repeat in 0..2 {
                let out = bits(&runner.forward_prepared(&prepared, 0, hidden)?)?;
                assert!(out == expected, "{policy}: failed at block {fail_at_block}, forward {repeat} differs");
            }
        }
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
