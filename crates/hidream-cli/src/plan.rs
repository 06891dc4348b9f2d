//! `hidream plan`: what fits on a GPU and how fast it can run, from the config alone.
//!
//! The flags become a [`PlanRequest`]; `hidream_pipeline::planning` computes the [`PlanReport`];
//! this file prints it, as text or as JSON. Nothing is downloaded and no weight is read; a folder
//! holding only `config.json` is enough.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use hidream_config::{ActivationTerms, BlockKind, DType, Variant};
use hidream_memory::{Budget, format_bytes};
use hidream_pipeline::Precompute;
use hidream_pipeline::planning::{
    Bound, ConfigSource, DeviceAssumptions, ImageSize, Phase, PlanReport, PlanRequest, SettingReport, percent,
};

use hidream_memory::Policy;
use hidream_model::AttentionConfig;
use hidream_pipeline::generate::{GenerateRequest, GenerateSettings, ModelFolder, StagePlan};
use hidream_pipeline::runner::RunnerConfig;
use hidream_pipeline::vae::DecodeOptions;

use crate::parse;

#[derive(Debug, clap::Args)]
pub struct PlanArgs {
    /// A model folder holding `config.json` or `transformer/config.json` (only the config is read).
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// A named config instead of --model: `full` (the real model), `small` or `tiny`.
    #[arg(long, default_value = "full")]
    preset: String,
    /// GPU memory for weights: bytes (8GiB, 512MiB, 1.5GB) or a share of the weights in --dtype
    /// (25%). Without it, every weight stays resident.
    #[arg(long, allow_negative_numbers = true)]
    budget: Option<Budget>,
    /// Image size WIDTHxHEIGHT in pixels, width first as in diffusers and `generate --size`
    /// (1360x768 is landscape); both multiples of 16. The latent is 8 times smaller.
    #[arg(long, default_value = "1024x1024", value_parser = parse::image_size, allow_hyphen_values = true)]
    size: ImageSize,
    /// The variant, which sets the steps and guidance: full (50 steps, CFG), dev (28) or fast (16).
    #[arg(long, default_value = "full")]
    variant: Variant,
    /// Streamed units that load ahead of the one computing.
    #[arg(long, default_value_t = hidream_memory::DEFAULT_PREFETCH_DEPTH, value_parser = parse::count, allow_negative_numbers = true)]
    prefetch: usize,
    /// Compute dtype of weights and activations.
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Assumed host-to-device bandwidth, e.g. 55GB/s (default: an H100 over PCIe Gen5, pinned).
    #[arg(long, value_parser = parse::bandwidth, allow_negative_numbers = true)]
    bandwidth: Option<u64>,
    /// Assumed sustained compute rate in TFLOP/s (default: an H100 at realistic bf16 utilisation, 700).
    #[arg(long, value_parser = parse::positive_number, allow_negative_numbers = true)]
    tflops: Option<f64>,
    /// Evaluate attention in chunks of this many queries (bounds the score matrix); at least 1.
    #[arg(long, value_parser = parse::positive, allow_negative_numbers = true)]
    attention_chunk: Option<usize>,
    /// With --model a pipeline folder: also plan every stage of `generate` (the text encoders, the
    /// transformer, the VAE) under the budget, from this Llama folder's and the model's headers.
    #[arg(long, requires = "model")]
    llama: Option<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &PlanArgs) -> Result<()> {
    let source = match &args.model {
        Some(dir) => ConfigSource::Folder(dir),
        None => ConfigSource::Preset(&args.preset),
    };
    let (cfg, source) = source.load()?;
    let preset = DeviceAssumptions::H100_PCIE5;
    let request = PlanRequest {
        size: args.size,
        variant: args.variant,
        budget: args.budget,
        prefetch: args.prefetch,
        dtype: args.dtype,
        attention_chunk: args.attention_chunk,
        device: DeviceAssumptions {
            bandwidth_bytes_per_s: args.bandwidth.unwrap_or(preset.bandwidth_bytes_per_s),
            tflops: args.tflops.unwrap_or(preset.tflops),
        },
    };
    let report = PlanReport::new(&cfg, &source, &request)?;
    let stages = match (&args.llama, &args.model) {
        (Some(llama), Some(model)) => Some(plan_stages(args, model, llama, &report)?),
        _ => None,
    };
    let text = if args.json {
        let mut value = serde_json::to_value(&report)?;
        if let Some(stages) = &stages {
            value["stages"] = serde_json::to_value(stages)?;
        }
        serde_json::to_string_pretty(&value)? + "\n"
    } else {
        let mut text = String::new();
        render(&report, &mut text)?;
        if let Some(stages) = &stages {
            render_stages(stages, &mut text)?;
        }
        text
    };
    crate::print_stdout(&text)?;
    if let Some(stage) = stages.iter().flatten().find(|stage| stage.error.is_some()) {
        anyhow::bail!("the {} stage cannot run: {}", stage.stage, stage.error.as_deref().unwrap_or_default());
    }
    Ok(report.check_fits()?)
}

/// Every stage of `generate` for a pipeline folder, under the report's budget and the flags.
fn plan_stages(args: &PlanArgs, model: &Path, llama: &Path, report: &PlanReport) -> Result<Vec<StagePlan>> {
    let folder = ModelFolder { root: model.to_owned(), llama: llama.to_owned() };
    let policy = match &report.budget {
        Some(budget) => Policy::Budget { budget_bytes: budget.bytes, prefetch: args.prefetch },
        None => Policy::All,
    };
    let request = GenerateRequest {
        prompt: String::new(),
        negative_prompt: None,
        variant: args.variant,
        size: Some((args.size.width, args.size.height)),
        steps: None,
        guidance: None,
        seed: 0,
        latents: None,
        step_noise: None,
    };
    let settings = GenerateSettings {
        transformer: RunnerConfig {
            policy,
            compute_dtype: args.dtype,
            precompute: Precompute::PerPrompt,
            attention: AttentionConfig { query_chunk: args.attention_chunk },
        },
        text_dtype: args.dtype,
        vae_dtype: args.dtype,
        vae: DecodeOptions::default(),
        default_sample_size: 128,
    };
    Ok(hidream_pipeline::generate::plan_stages(&folder, &request, &settings)?)
}

fn render_stages(stages: &[StagePlan], out: &mut String) -> std::fmt::Result {
    writeln!(out)?;
    writeln!(out, "stages of `generate`, one after another under the same budget (weights in their compute dtype):")?;
    writeln!(
        out,
        "  {:<12} {:>12} {:>12} {:>14} {:>14} {:>16}",
        "stage", "weights", "minimum", "exact minimum", "peak", "streamed/pass"
    )?;
    for stage in stages {
        let peak = stage.predicted_peak_bytes.map_or_else(|| "does not fit".to_owned(), format_bytes);
        writeln!(
            out,
            "  {:<12} {:>12} {:>12} {:>14} {:>14} {:>16}",
            stage.stage,
            format_bytes(stage.weight_bytes),
            format_bytes(stage.minimum_budget),
            format_bytes(stage.exact_minimum_budget),
            peak,
            format_bytes(stage.streamed_bytes),
        )?;
    }
    let largest = stages.iter().filter_map(|stage| stage.predicted_peak_bytes).max().unwrap_or(0);
    let exact = stages.iter().map(|stage| stage.exact_minimum_budget).max().unwrap_or(0);
    writeln!(
        out,
        "  the run's peak is its largest stage's: {}; the smallest budget with every stage exact: {}",
        format_bytes(largest),
        format_bytes(exact)
    )?;
    writeln!(out, "  (VAE: its weights plus the decode's activation estimate; the others: weights only)")
}

fn render(report: &PlanReport, out: &mut String) -> std::fmt::Result {
    let workload = &report.workload;
    let size = &report.size;
    writeln!(
        out,
        "hidream plan: {}, {} weights in {}",
        report.config.source,
        format_bytes(report.config.weight_bytes),
        report.config.dtype
    )?;
    writeln!(
        out,
        "variant {}: {} steps, guidance {}{}",
        report.variant.name,
        report.variant.steps,
        report.variant.guidance_scale,
        if report.variant.batch == 2 { " (CFG: batch 2 per forward)" } else { " (no CFG: batch 1 per forward)" },
    )?;
    writeln!(
        out,
        "image {}x{} px (width x height): latent {}x{}, {} image tokens{} + {} text tokens ({} T5 + {} + {} Llama) = {} \
         per block",
        size.width,
        size.height,
        size.latent_width,
        size.latent_height,
        size.image_tokens,
        if size.padded { " (padded to max_seq)" } else { "" },
        size.text_tokens,
        workload.t5_tokens,
        workload.llama_tokens,
        workload.llama_tokens,
        size.joint_tokens,
    )?;
    if let Some(rescaled) = size.diffusers_rescaled {
        writeln!(
            out,
            "note: diffusers' HiDreamImagePipeline rescales every size to about 1024² pixels ({}x{} -> {rescaled}); \
             this plan uses the size as given",
            size.width, size.height,
        )?;
    }
    match &report.budget {
        Some(budget) => {
            let share = match budget.given {
                Budget::FractionOfWeights(fraction) => format!("{}% of the weights = ", fraction * 100.0),
                Budget::Bytes(_) => String::new(),
            };
            writeln!(
                out,
                "budget {share}{} ({} bytes) for weights, prefetch depth {}",
                format_bytes(budget.bytes),
                budget.bytes,
                report.prefetch
            )?;
        }
        None => writeln!(out, "budget: none given, every weight resident (policy `all`)")?,
    }

    for setting in report.settings.both() {
        writeln!(out)?;
        render_setting(report, setting, out)?;
    }

    writeln!(out)?;
    let per_step = &report.settings.per_step;
    let saved = report.precompute.saved_bytes_per_step;
    writeln!(
        out,
        "precomputation saves {} of weights per step ({:.1}%): the caption projections and the adaLN modulation \
         run once per prompt",
        format_bytes(saved),
        percent(saved, per_step.step_bytes),
    )?;
    let dim = report.config.inner_dim;
    let b = workload.batch;
    let prepared = &report.precompute.prepared_state;
    writeln!(
        out,
        "  and keep {} on the device: modulation [{b}, 12·{dim}] per double block and [{b}, 6·{dim}] per single \
         block, {} per step × {} steps = {}; projected text [{b}, {}, {dim}] per block and [{b}, {}, {dim}] of \
         T5 = {} (a forward holds the text either way)",
        format_bytes(report.precompute.prepared_state_bytes),
        format_bytes(prepared.modulation_per_step),
        report.variant.steps,
        format_bytes(prepared.modulation_all_steps),
        workload.llama_tokens,
        workload.t5_tokens,
        format_bytes(prepared.text_tokens),
    )?;

    writeln!(out)?;
    render_activations(report, out)?;

    writeln!(out)?;
    let flops = &report.flops_per_forward;
    writeln!(
        out,
        "FLOPs per forward (batch {b}): {} = MoE routed {}, MoE shared {}, q/k/v/out {}, attention {}, \
         text feed-forward {}, caption projections {}, modulation {}, embedders and gates {}",
        format_flops(report.flops_per_forward_total),
        format_flops(flops.moe_routed),
        format_flops(flops.moe_shared),
        format_flops(flops.attention_projections),
        format_flops(flops.attention),
        format_flops(flops.text_feed_forward),
        format_flops(flops.caption_projections),
        format_flops(flops.modulation),
        format_flops(flops.embedders.saturating_add(flops.moe_gate)),
    )?;
    writeln!(
        out,
        "times are lower bounds, max(compute, streaming), under assumptions you can set: {:.0} TFLOP/s sustained \
         (--tflops) and {}/s host to device (--bandwidth)",
        report.assumptions.tflops,
        format_decimal_bytes(report.assumptions.bandwidth_bytes_per_s),
    )?;
    Ok(())
}

fn render_setting(report: &PlanReport, setting: &SettingReport, out: &mut String) -> std::fmt::Result {
    match setting.precompute {
        Precompute::PerStep => {
            writeln!(out, "per step (caption projections and adaLN modulation in every step, as diffusers does):")?
        }
        Precompute::PerPrompt => writeln!(out, "per prompt (caption projections and adaLN modulation precomputed):")?,
    }
    writeln!(out, "  step weights     {} in {} units", format_bytes(setting.step_bytes), setting.n_units)?;
    writeln!(
        out,
        "  minimum budget   {} ({:.1}% of the weights) at prefetch depth {}",
        format_bytes(setting.minimum_budget),
        setting.minimum_budget_percent,
        report.prefetch
    )?;
    let Some(plan) = &setting.plan else {
        if let Some(err) = &setting.error {
            writeln!(out, "  does not fit     {err}")?;
        }
        return Ok(());
    };
    writeln!(out, "  resident         {} ({})", plan.resident, format_bytes(plan.resident_bytes))?;
    if plan.streamed_bytes_per_step == 0 {
        writeln!(out, "  streamed         nothing")?;
    } else {
        writeln!(
            out,
            "  streamed         {} per step: {}, through {} slots of {}",
            format_bytes(plan.streamed_bytes_per_step),
            plan.streamed,
            plan.n_slots,
            format_bytes(plan.slot_bytes)
        )?;
    }
    writeln!(out, "  peak weights     {}", format_bytes(plan.peak_weight_bytes))?;
    if let Some(times) = &setting.time {
        writeln!(
            out,
            "  per step         {} = {:.3} s compute, {:.3} s streaming: {} binds, {:.3} s",
            format_flops(setting.flops_per_step),
            times.compute_s_per_step,
            times.stream_s_per_step,
            match times.bound {
                Bound::Streaming => "streaming",
                Bound::Compute => "compute",
            },
            times.s_per_step,
        )?;
        let once = if setting.flops_once_per_prompt > 0 {
            format!(" + {:.3} s once per prompt", times.once_per_prompt_s)
        } else {
            String::new()
        };
        writeln!(out, "  {:<16} {:.1} s{once}", format!("{} steps", report.variant.steps), times.total_s)?;
    }
    if let Some(device) = &setting.device_estimate {
        writeln!(
            out,
            "  device estimate  {} = {} weights + {} activations (estimate) + {} text{}",
            format_bytes(device.total_bytes),
            format_bytes(plan.peak_weight_bytes),
            format_bytes(report.activations.peak_bytes),
            format_bytes(device.state_bytes),
            if setting.precompute.is_per_prompt() { " and modulation" } else { "" },
        )?;
    }
    Ok(())
}

fn render_activations(report: &PlanReport, out: &mut String) -> std::fmt::Result {
    let activations = &report.activations;
    let phase = match activations.phase {
        Phase::Attention => "attention",
        Phase::FeedForward => "feed-forward",
    };
    writeln!(
        out,
        "activation peak (an estimate, not a measurement; weights excluded): {} in the {}-stream blocks' {phase}, \
         B = {}, N = {}, dim = {}, heads = {}",
        format_bytes(activations.peak_bytes),
        activations.block,
        report.variant.batch,
        report.size.joint_tokens,
        report.config.inner_dim,
        report.config.num_attention_heads,
    )?;
    for (name, bytes) in activation_terms(&activations.terms) {
        writeln!(out, "  {name:<68} {:>11}", format_bytes(bytes))?;
    }
    if report.attention_chunk.is_none() && activations.phase == Phase::Attention {
        writeln!(out, "  (--attention-chunk 1024 bounds the score matrix to 1024 query rows)")?;
    }
    Ok(())
}

/// Each term of the activation estimate with what it counts.
fn activation_terms(terms: &ActivationTerms) -> [(&'static str, u64); 6] {
    let projections = match terms.kind {
        BlockKind::Double => "q, k, v, out and their copies: 10 × [B, N, dim]",
        BlockKind::Single => "q, k, v, out and their copies: 7 × [B, N, dim]",
    };
    [
        ("residual streams and normalised copy: 3 × [B, N, dim]", terms.streams),
        (projections, terms.projections),
        ("RoPE's f32 copies of q or k, before the scores: 2 × [B, N, dim] f32", terms.rope_f32),
        ("score matrix and its softmax: 2 × [B, heads, chunk or N, N]", terms.scores),
        ("MoE hidden, one expert taking every token: 3 × [B·tokens, hidden]", terms.moe_hidden),
        ("MoE input, output and sum: 3 × [B·tokens, dim]", terms.moe_io),
    ]
}

/// `77.78 TFLOP`.
fn format_flops(flops: u64) -> String {
    const UNITS: [(&str, f64); 4] = [("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)];
    let flops = flops as f64;
    UNITS
        .iter()
        .find(|(_, scale)| flops >= *scale)
        .map_or_else(|| format!("{flops} FLOP"), |(unit, scale)| format!("{:.2} {unit}", flops / scale))
}

/// `55.00 GB` (decimal units, as bandwidths are quoted).
fn format_decimal_bytes(bytes: u64) -> String {
    const UNITS: [(&str, f64); 3] = [("TB", 1e12), ("GB", 1e9), ("MB", 1e6)];
    let bytes = bytes as f64;
    UNITS
        .iter()
        .find(|(_, scale)| bytes >= *scale)
        .map_or_else(|| format!("{bytes} B"), |(unit, scale)| format!("{:.2} {unit}", bytes / scale))
}
