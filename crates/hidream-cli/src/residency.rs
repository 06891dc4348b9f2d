//! The flags shared by `forward`, `denoise` and `generate` (the model and its inputs, the memory
//! policy), the heap probe, and the JSON report.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use hidream_memory::{Budget, CountingAllocator, DEFAULT_PREFETCH_DEPTH, MemoryError, Policy, PolicyKind};
use hidream_model::AttentionConfig;
use hidream_pipeline::runner::{RunnerConfig, TransformerRunner};
use hidream_pipeline::{PipelineError, Precompute, UnitTable};
use hidream_weights::Checkpoint;
use serde_json::{Value, json};

use crate::parse;

/// The flags of a transformer run from a checkpoint and a file of inputs (`forward`, `denoise`).
#[derive(Debug, clap::Args)]
pub struct TransformerArgs {
    /// The transformer checkpoint: a diffusers `transformer/` folder, or a model folder holding one.
    #[arg(long)]
    pub model: PathBuf,
    /// Safetensors file with `hidden_states`, `timesteps`, `encoder_hidden_states_t5`,
    /// `encoder_hidden_states_llama3` and `pooled_embeds` (diffusers' argument names; `hidream
    /// synth --inputs` writes one). `denoise` starts from `hidden_states` and ignores `timesteps`.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Where to write the output under `sample` (f32): the forward's prediction, or the final
    /// latents of `denoise`. Written whole or not at all.
    #[arg(long)]
    pub out: PathBuf,
    /// Compute dtype; weights are converted to it as they load (default: f32 on the CPU, bf16 on
    /// CUDA).
    #[arg(long)]
    pub dtype: Option<hidream_config::DType>,
    #[command(flatten)]
    pub residency: ResidencyArgs,
}

#[derive(Debug, clap::Args)]
pub struct ResidencyArgs {
    /// Where to compute: `cpu`, `cuda` or `cuda:N`. Weights stream to a GPU over a copy stream from
    /// pinned staging buffers; a build without the `cuda` feature says how to get one.
    #[arg(long, default_value = "cpu")]
    pub device: hidream_device::DeviceSpec,
    /// Where weights live: `all` resident, `sequential` (load, run, free), `stream` (prefetch
    /// ahead), or `budget` (the planner's resident set plus streaming). Default: `budget` when
    /// --budget is given, else `all`.
    #[arg(long)]
    residency: Option<PolicyKind>,
    /// The device-tier budget for weights: bytes (`8GiB`, `512MiB`) or a share of the weight bytes
    /// in the compute dtype (`25%`).
    #[arg(long, allow_negative_numbers = true)]
    budget: Option<Budget>,
    /// Streamed units loaded ahead of the one computing (0: load, run, free, without overlap).
    #[arg(long, default_value_t = DEFAULT_PREFETCH_DEPTH, value_parser = parse::count, allow_negative_numbers = true)]
    prefetch: usize,
    /// Run the caption projections and adaLN modulation inside every step, as diffusers does,
    /// instead of once per prompt (same output; more bytes streamed per step).
    #[arg(long)]
    no_precompute: bool,
    /// Evaluate attention in chunks of this many queries (bounds the score matrix); at least 1.
    #[arg(long, value_parser = parse::positive, allow_negative_numbers = true)]
    attention_chunk: Option<usize>,
    /// Write a JSON report of memory and time here. Its `peak_device_bytes` figures are measured
    /// peaks of the device tier: on the CPU, the process's heap peak as the counting allocator
    /// measures it (weights, activations and everything else on the heap); on CUDA, the peak of
    /// the GPU memory pool, with the driver's figure beside it under `gpu`.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

impl TransformerArgs {
    /// The compute dtype: the flag's, else f32 on the CPU and bf16 on CUDA.
    pub fn compute_dtype(&self) -> hidream_config::DType {
        self.dtype.unwrap_or(if self.residency.device.is_cuda() {
            hidream_config::DType::BF16
        } else {
            hidream_config::DType::F32
        })
    }

    /// Checks the output paths (`--out`, `--report`) before any long work.
    pub fn check_outputs(&self) -> Result<()> {
        for path in [Some(&self.out), self.residency.report.as_ref()].into_iter().flatten() {
            hidream_weights::check_writable(path)?;
        }
        Ok(())
    }
}

impl ResidencyArgs {
    /// The runner configuration these flags ask for, for a model of `cfg` in `dtype`.
    pub fn runner_config(
        &self,
        cfg: &hidream_config::TransformerConfig,
        dtype: hidream_config::DType,
    ) -> Result<RunnerConfig> {
        let precompute = if self.no_precompute { Precompute::PerStep } else { Precompute::PerPrompt };
        let total = UnitTable::new(cfg, dtype, precompute).weight_bytes_total();
        let kind = self.residency.unwrap_or(if self.budget.is_some() { PolicyKind::Budget } else { PolicyKind::All });
        let policy = match (kind, self.budget) {
            (PolicyKind::Budget, Some(budget)) => {
                let budget_bytes = budget.resolve(total);
                if let Budget::FractionOfWeights(fraction) = budget {
                    eprintln!(
                        "note: --budget {}% is that share of the transformer's {} of weights in {dtype}: {}",
                        fraction * 100.0,
                        hidream_memory::format_bytes(total),
                        hidream_memory::format_bytes(budget_bytes),
                    );
                }
                Policy::Budget { budget_bytes, prefetch: self.prefetch }
            }
            (PolicyKind::Budget, None) => bail!("--residency budget needs --budget (e.g. 8GiB or 25%)"),
            (other, Some(_)) => bail!("--budget applies to --residency budget, not `{other}`"),
            (PolicyKind::All, None) => Policy::All,
            (PolicyKind::Sequential, None) => Policy::Sequential,
            (PolicyKind::Stream, None) => Policy::Stream { prefetch: self.prefetch },
        };
        Ok(RunnerConfig {
            policy,
            compute_dtype: dtype,
            precompute,
            attention: AttentionConfig { query_chunk: self.attention_chunk },
        })
    }

    /// Opens `--device`, once per run.
    pub fn open_device(&self) -> Result<candle_core::Device> {
        Ok(self.device.open()?)
    }

    /// Opens the runner on `device`, and on a budget below the minimum writes a report that says so.
    pub fn open_runner(
        &self,
        checkpoint: Checkpoint,
        device: &candle_core::Device,
        dtype: hidream_config::DType,
    ) -> Result<(TransformerRunner, RunnerConfig)> {
        let cfg = checkpoint.config()?;
        let config = self.runner_config(&cfg, dtype)?;
        match TransformerRunner::new(checkpoint, device, config) {
            Ok(runner) => Ok((runner, config)),
            Err(err) => {
                if let (Some(path), PipelineError::Memory(MemoryError::BudgetTooSmall { budget, minimum, .. })) =
                    (&self.report, &err)
                {
                    let report = json!({
                        "policy": config.policy.kind().as_str(),
                        "prefetch": self.prefetch,
                        "precompute": config.precompute.is_per_prompt(),
                        "budget_bytes": budget,
                        "minimum_budget_bytes": minimum,
                        "error": err.to_string(),
                    });
                    write_json(path, &report)?;
                }
                Err(err.into())
            }
        }
    }
}

/// Memory figures, measured: on the CPU the heap (the counting allocator), on CUDA the GPU memory
/// pool (the driver's high-water mark) with the driver's own figure beside it. Each gives the peak
/// and the largest growth within one forward (under `all`, that is the activation peak).
#[derive(Debug)]
pub struct HeapProbe {
    device: candle_core::Device,
    peak_before: u64,
    forward_start: u64,
    max_forward_delta: u64,
    gpu: Option<GpuFigures>,
}

/// The GPU side of a [`HeapProbe`].
#[derive(Debug, Default, Clone, Copy)]
struct GpuFigures {
    peak: u64,
    forward_start: u64,
    max_forward_delta: u64,
    max_driver_used: u64,
    total: u64,
}

impl HeapProbe {
    pub fn new(device: &candle_core::Device) -> Self {
        let gpu = hidream_device::device_memory(device).map(|memory| GpuFigures {
            peak: memory.pool_peak,
            max_driver_used: memory.driver_used,
            total: memory.total,
            ..GpuFigures::default()
        });
        HeapProbe { device: device.clone(), peak_before: 0, forward_start: 0, max_forward_delta: 0, gpu }
    }

    /// Call just before a forward starts.
    pub fn start(&mut self) {
        self.peak_before = self.peak_before.max(CountingAllocator::peak_bytes());
        CountingAllocator::reset_peak();
        self.forward_start = CountingAllocator::current_bytes();
        if let (Some(gpu), Some(memory)) = (&mut self.gpu, hidream_device::device_memory(&self.device)) {
            gpu.peak = gpu.peak.max(memory.pool_peak);
            gpu.max_driver_used = gpu.max_driver_used.max(memory.driver_used);
            gpu.forward_start = memory.pool_used;
            hidream_device::reset_memory_peak(&self.device);
        }
    }

    /// Call just after a forward ends. On CUDA it waits for the GPU, so that the figures (and the
    /// caller's timings) cover the forward's work.
    pub fn stop(&mut self) {
        let peak = CountingAllocator::peak_bytes();
        self.max_forward_delta = self.max_forward_delta.max(peak.saturating_sub(self.forward_start));
        let _ = self.device.synchronize();
        if let (Some(gpu), Some(memory)) = (&mut self.gpu, hidream_device::device_memory(&self.device)) {
            gpu.peak = gpu.peak.max(memory.pool_peak);
            gpu.max_driver_used = gpu.max_driver_used.max(memory.driver_used);
            gpu.max_forward_delta = gpu.max_forward_delta.max(memory.pool_peak.saturating_sub(gpu.forward_start));
        }
    }

    /// The measured peak of the device tier: the GPU pool's on CUDA, the heap's on the CPU.
    pub fn peak_device_bytes(&self) -> u64 {
        match self.gpu {
            Some(gpu) => gpu.peak,
            None => self.peak_heap_bytes(),
        }
    }

    pub fn peak_heap_bytes(&self) -> u64 {
        self.peak_before.max(CountingAllocator::peak_bytes())
    }

    /// The largest growth of the device tier within one forward.
    pub fn max_forward_delta(&self) -> u64 {
        match self.gpu {
            Some(gpu) => gpu.max_forward_delta,
            None => self.max_forward_delta,
        }
    }

    /// The GPU figures for a report (`null` on the CPU).
    pub fn gpu_json(&self) -> Value {
        match self.gpu {
            Some(gpu) => json!({
                "pool_peak_bytes": gpu.peak,
                "forward_pool_peak_delta_bytes": gpu.max_forward_delta,
                "driver_used_max_bytes": gpu.max_driver_used,
                "total_bytes": gpu.total,
            }),
            None => Value::Null,
        }
    }
}

/// The report keys every run shares.
pub fn report(runner: &TransformerRunner, config: &RunnerConfig, probe: &HeapProbe, seconds: &[f64]) -> Value {
    let plan = runner.plan();
    let table = runner.table();
    let stats = runner.stats();
    let total: f64 = seconds.iter().sum();
    let budget = runner.ledger().budget_bytes();
    json!({
        "policy": config.policy.kind().as_str(),
        "prefetch": plan.prefetch_depth(),
        "precompute": config.precompute.is_per_prompt(),
        "compute_dtype": config.compute_dtype.as_str(),
        "budget_bytes": budget,
        "minimum_budget_bytes": runner.minimum_budget(),
        "weight_bytes_total": table.weight_bytes_total(),
        "step_weight_bytes": table.step_bytes(),
        "resident_bytes": plan.resident_bytes(),
        "streamed_bytes_per_forward": plan.streamed_bytes_per_pass(),
        "peak_weight_bytes": runner.ledger().peak_bytes(),
        "device": config_device(runner),
        "peak_device_bytes": probe.peak_device_bytes(),
        "peak_heap_bytes": probe.peak_heap_bytes(),
        "forward_heap_peak_delta_bytes": probe.max_forward_delta(),
        "gpu": probe.gpu_json(),
        "units_streamed": stats.units_delivered,
        "bytes_streamed": stats.bytes_delivered,
        "stall_seconds": stats.stall_time.as_secs_f64(),
        "steps": seconds.len(),
        "seconds": total,
        "seconds_per_step": if seconds.is_empty() { 0.0 } else { total / seconds.len() as f64 },
        "step_seconds": seconds,
    })
}

fn config_device(runner: &TransformerRunner) -> String {
    match runner.device().location() {
        candle_core::DeviceLocation::Cpu => "cpu".to_owned(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}"),
    }
}

/// Writes a JSON report, whole or not at all.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    hidream_weights::write_atomic(path, |writer| writer.write_all(text.as_bytes()))
        .with_context(|| format!("writing the report {}", path.display()))
}

/// Compares `sample` with the `sample` tensor of a reference file: `max_abs_diff` and
/// `bit_identical`. A golden reference that also holds diffusers' own bf16 run (`sample_bf16`)
/// adds `reference_bf16_drift` (how far that run is from its f32 one) and `reference_scale`
/// (max(1, max |sample|)), from which the golden tests' bf16 bound is computed.
pub fn compare_to(path: &Path, sample: &candle_core::Tensor) -> Result<serde_json::Map<String, Value>> {
    let mut reference = hidream_weights::read_tensors(path, &candle_core::Device::Cpu)?;
    let expected = reference.remove("sample").with_context(|| format!("{} has no `sample`", path.display()))?;
    let sample = sample.to_device(&candle_core::Device::Cpu)?;
    let (max_diff, bit_identical) = max_abs_diff(&sample, &expected)?;
    let mut figures = serde_json::Map::new();
    figures.insert("max_abs_diff".into(), f64::from(max_diff).into());
    figures.insert("bit_identical".into(), bit_identical.into());
    if let Some(bf16) = reference.remove("sample_bf16") {
        let (drift, _) = max_abs_diff(&bf16.to_dtype(expected.dtype())?, &expected)?;
        let scale = expected.abs()?.flatten_all()?.max(0)?.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        figures.insert("reference_bf16_drift".into(), f64::from(drift).into());
        figures.insert("reference_scale".into(), f64::from(scale.max(1.0)).into());
    }
    Ok(figures)
}

/// Max |a − b| over two tensors of the same shape, and whether their bits are identical.
///
/// candle's `max` skips NaN, so the difference is taken element by element: an element that is
/// NaN on one side only makes it NaN (`null` in a JSON report); NaN on both sides, or equal
/// infinities, count as no difference. Bit identity needs one dtype and the same bits everywhere,
/// so it also tells `-0` from `+0` and NaN payloads apart (f64 is compared as f64; other dtypes
/// through their exact f32 widening, which for f16 NaNs keeps sign and payload but sets the quiet
/// bit).
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> Result<(f32, bool)> {
    use candle_core::DType;
    if a.dims() != b.dims() {
        bail!("cannot compare shapes {:?} and {:?}", a.dims(), b.dims());
    }
    let values =
        |t: &candle_core::Tensor| -> Result<Vec<f32>> { Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?) };
    let (a_values, b_values) = (values(a)?, values(b)?);
    let mut max = 0f32;
    for (x, y) in a_values.iter().zip(&b_values) {
        let diff = match (x.is_nan(), y.is_nan()) {
            (true, true) => 0.0,
            (false, false) if x == y => 0.0,
            (false, false) => (x - y).abs(),
            _ => f32::NAN,
        };
        if diff.is_nan() {
            max = f32::NAN;
            break;
        }
        max = max.max(diff);
    }
    let bit_identical = a.dtype() == b.dtype()
        && if a.dtype() == DType::F64 {
            let bits = |t: &candle_core::Tensor| -> Result<Vec<u64>> {
                Ok(t.flatten_all()?.to_vec1::<f64>()?.into_iter().map(f64::to_bits).collect())
            };
            bits(a)? == bits(b)?
        } else {
            a_values.iter().map(|v| v.to_bits()).eq(b_values.iter().map(|v| v.to_bits()))
        };
    Ok((max, bit_identical))
}
