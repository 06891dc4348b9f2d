//! `hidream plan`: what fits on a GPU and how fast it can run, from the config alone.
//!
//! For both ways of running prompt-only work (inside every step, or once per prompt) it prints the
//! residency plan that `hidream-memory` makes from the pipeline's unit table, the smallest budget
//! that works, the estimated activation peak and a lower bound on the time per step:
//! `max(FLOPs / compute rate, streamed bytes / host-to-device bandwidth)`. Nothing is downloaded
//! and no weight is read; a folder holding only `config.json` is enough.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use hidream_config::{ActivationTerms, DType, TransformerConfig, Unit, UnitKind, Variant, Workload};
use hidream_memory::{Budget, MemoryError, Plan, Policy, format_bytes};
use hidream_pipeline::{Precompute, UnitTable};
use serde_json::{Value, json};

/// Pixels per latent pixel of the Flux VAE.
const VAE_SCALE_FACTOR: usize = 8;

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
    #[arg(long)]
    budget: Option<Budget>,
    /// Image size HxW in pixels (the latent is 8x smaller).
    #[arg(long, default_value = "1024x1024", value_parser = parse_image_size)]
    size: (usize, usize),
    /// The variant, which sets the steps and guidance: full (50 steps, CFG), dev (28) or fast (16).
    #[arg(long, default_value = "full")]
    variant: Variant,
    /// Streamed units that load ahead of the one computing.
    #[arg(long, default_value_t = hidream_memory::DEFAULT_PREFETCH_DEPTH)]
    prefetch: usize,
    /// Compute dtype of weights and activations.
    #[arg(long, default_value = "bf16")]
    dtype: DType,
    /// Assumed host-to-device bandwidth (default: an H100 over PCIe Gen5, pinned).
    #[arg(long, default_value = "55GB/s", value_parser = parse_bandwidth)]
    bandwidth: u64,
    /// Assumed sustained compute rate in TFLOP/s (default: an H100 at realistic bf16 utilisation).
    #[arg(long, default_value_t = 700.0)]
    tflops: f64,
    /// Evaluate attention in chunks of this many queries (bounds the score matrix).
    #[arg(long)]
    attention_chunk: Option<usize>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &PlanArgs) -> Result<()> {
    let report = Report::new(args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        report.print();
    }
    if report.settings.iter().all(|setting| setting.plan.is_err()) {
        bail!("{}", report.too_small());
    }
    Ok(())
}

/// Everything `hidream plan` reports.
struct Report {
    source: String,
    cfg: TransformerConfig,
    size: (usize, usize),
    variant: Variant,
    steps: usize,
    guidance_scale: f64,
    workload: Workload,
    flops: hidream_config::ForwardFlops,
    activations: hidream_config::ActivationPeak,
    prepared: hidream_config::PreparedState,
    weight_bytes: u64,
    budget: Option<(Budget, u64)>,
    prefetch: usize,
    bandwidth: u64,
    flops_per_second: f64,
    settings: [Setting; 2],
}

/// The plan and times of one [`Precompute`] setting.
struct Setting {
    table: UnitTable,
    plan: Result<Plan, MemoryError>,
    minimum_budget: u64,
    /// FLOPs of one step's forward.
    step_flops: u64,
    /// Prompt-only work done before the steps: FLOPs, and weight bytes loaded once.
    once_flops: u64,
    once_bytes: u64,
}

impl Report {
    fn new(args: &PlanArgs) -> Result<Self> {
        let (cfg, source) = load_config(args.model.as_deref(), &args.preset)?;
        let (height, width) = args.size;
        let scale = VAE_SCALE_FACTOR * cfg.patch_size;
        if !height.is_multiple_of(scale) || !width.is_multiple_of(scale) {
            bail!(
                "--size {height}x{width}: height and width must be multiples of {scale} pixels \
                 (VAE factor {VAE_SCALE_FACTOR} × patch size {})",
                cfg.patch_size
            );
        }
        let (latent_height, latent_width) = (height / VAE_SCALE_FACTOR, width / VAE_SCALE_FACTOR);
        let image_tokens = hidream_config::image_tokens(&cfg, latent_height, latent_width).with_context(|| {
            if height == width {
                return format!("--size {height}x{width} is too large");
            }
            format!(
                "--size {height}x{width} is not square and has {} patches; non-square images are padded to \
                 max_seq = {} patches (max_resolution {:?}), so they must have at most that many",
                (latent_height / cfg.patch_size).saturating_mul(latent_width / cfg.patch_size),
                cfg.max_seq(),
                cfg.max_resolution,
            )
        })?;
        if args.attention_chunk == Some(0) {
            bail!("--attention-chunk must be at least 1");
        }
        if !(args.tflops.is_finite() && args.tflops > 0.0) {
            bail!("--tflops must be a positive number, got {}", args.tflops);
        }
        let defaults = args.variant.defaults();
        // diffusers' `do_classifier_free_guidance`: both halves go through one forward.
        let batch = if defaults.guidance_scale > 1.0 { 2 } else { 1 };
        let workload = Workload {
            batch,
            image_tokens,
            t5_tokens: hidream_config::MAX_SEQUENCE_LENGTH,
            llama_tokens: hidream_config::MAX_SEQUENCE_LENGTH,
            attention_chunk: args.attention_chunk,
            dtype: args.dtype,
        };
        let flops = workload.flops(&cfg);
        let tables = [Precompute::PerStep, Precompute::PerPrompt].map(|p| UnitTable::new(&cfg, args.dtype, p));
        let weight_bytes = tables[0].weight_bytes_total();
        let budget = args.budget.map(|budget| (budget, budget.resolve(weight_bytes)));
        let policy = match budget {
            Some((_, budget_bytes)) => Policy::Budget { budget_bytes, prefetch: args.prefetch },
            None => Policy::All,
        };
        let saved_bytes = tables[0].step_bytes().saturating_sub(tables[1].step_bytes());
        let settings = tables.map(|table| {
            let per_prompt = table.precompute().is_per_prompt();
            Setting {
                plan: policy.plan(table.specs()),
                minimum_budget: Plan::minimum_budget(table.specs(), args.prefetch),
                step_flops: if per_prompt { flops.without_prompt_work() } else { flops.total() },
                once_flops: if per_prompt {
                    flops.caption_projections.saturating_add(flops.modulation.saturating_mul(defaults.steps as u64))
                } else {
                    0
                },
                once_bytes: if per_prompt { saved_bytes } else { 0 },
                table,
            }
        });
        Ok(Report {
            source,
            size: args.size,
            variant: args.variant,
            steps: defaults.steps,
            guidance_scale: defaults.guidance_scale,
            activations: workload.activations(&cfg),
            prepared: workload.prepared_state(&cfg, defaults.steps),
            flops,
            workload,
            cfg,
            weight_bytes,
            budget,
            prefetch: args.prefetch,
            bandwidth: args.bandwidth,
            flops_per_second: args.tflops * 1e12,
            settings,
        })
    }

    /// Why no setting fits, with the smallest budgets that would.
    fn too_small(&self) -> String {
        let [per_step, per_prompt] = &self.settings;
        let budget = self.budget.map_or(0, |(_, bytes)| bytes);
        let mut message = format!(
            "memory budget {} fits neither setting: at prefetch depth {} the smallest budget that works is {} with \
             per-prompt precomputation and {} without",
            exact(budget),
            self.prefetch,
            exact(per_prompt.minimum_budget),
            exact(per_step.minimum_budget),
        );
        let sequential = Plan::minimum_budget(per_prompt.table.specs(), 0);
        if self.prefetch > 0 && sequential < per_prompt.minimum_budget {
            message.push_str(&format!(" (prefetch depth 0, without overlap, needs {})", exact(sequential)));
        }
        message
    }

    fn compute_seconds(&self, flops: u64) -> f64 {
        flops as f64 / self.flops_per_second
    }

    fn stream_seconds(&self, bytes: u64) -> f64 {
        bytes as f64 / self.bandwidth as f64
    }

    /// The lower bound of one step and of the whole run, or `None` when no plan fits.
    fn times(&self, setting: &Setting) -> Option<Times> {
        let plan = setting.plan.as_ref().ok()?;
        let compute = self.compute_seconds(setting.step_flops);
        let stream = self.stream_seconds(plan.streamed_bytes_per_pass());
        let once = self.compute_seconds(setting.once_flops).max(self.stream_seconds(setting.once_bytes));
        let step = compute.max(stream);
        Some(Times { compute, stream, step, once, total: once + step * self.steps as f64 })
    }

    /// Device bytes of one setting: peak weights, activations and the text (and, precomputed,
    /// the modulation of every step).
    fn device_estimate(&self, setting: &Setting) -> Option<(u64, u64)> {
        let plan = setting.plan.as_ref().ok()?;
        let state = match setting.table.precompute() {
            Precompute::PerStep => self.prepared.text_tokens,
            Precompute::PerPrompt => self.prepared.total(),
        };
        Some((state, plan.peak_weight_bytes().saturating_add(self.activations.bytes()).saturating_add(state)))
    }

    fn print(&self) {
        let cfg = &self.cfg;
        let workload = &self.workload;
        let (height, width) = self.size;
        println!("hidream plan: {}, {} weights in {}", self.source, format_bytes(self.weight_bytes), workload.dtype);
        println!(
            "variant {}: {} steps, guidance {}{}",
            self.variant,
            self.steps,
            self.guidance_scale,
            if workload.batch == 2 { " (CFG: batch 2 per forward)" } else { " (no CFG: batch 1 per forward)" },
        );
        println!(
            "image {height}x{width} px: latent {}x{}, {} image tokens{} + {} text tokens ({} T5 + {} + {} Llama) = {} per block",
            height / VAE_SCALE_FACTOR,
            width / VAE_SCALE_FACTOR,
            workload.image_tokens,
            if height == width { "" } else { " (padded to max_seq)" },
            workload.text_tokens(),
            workload.t5_tokens,
            workload.llama_tokens,
            workload.llama_tokens,
            workload.joint_tokens(),
        );
        if let Some((rescaled_height, rescaled_width)) = diffusers_rescaled(height, width) {
            println!(
                "note: diffusers' HiDreamImagePipeline rescales every size to about 1024² pixels \
                 ({height}x{width} -> {rescaled_height}x{rescaled_width}); this plan uses the size as given"
            );
        }
        match self.budget {
            Some((budget, bytes)) => {
                let share = match budget {
                    Budget::FractionOfWeights(fraction) => format!("{}% of the weights = ", fraction * 100.0),
                    Budget::Bytes(_) => String::new(),
                };
                println!(
                    "budget {share}{} ({bytes} bytes) for weights, prefetch depth {}",
                    format_bytes(bytes),
                    self.prefetch
                );
            }
            None => println!("budget: none given, every weight resident (policy `all`)"),
        }

        for setting in &self.settings {
            println!();
            self.print_setting(setting);
        }

        println!();
        let saved = self.settings[0].table.step_bytes().saturating_sub(self.settings[1].table.step_bytes());
        println!(
            "precomputation saves {} of weights per step ({:.1}%): the caption projections and the adaLN modulation \
             run once per prompt",
            format_bytes(saved),
            percent(saved, self.settings[0].table.step_bytes()),
        );
        let dim = cfg.inner_dim();
        let b = workload.batch;
        println!(
            "  and keep {} on the device: modulation [{b}, 12·{dim}] per double block and [{b}, 6·{dim}] per single \
             block, {} per step × {} steps = {}; projected text [{b}, {}, {dim}] per block and [{b}, {}, {dim}] of \
             T5 = {} (a forward holds the text either way)",
            format_bytes(self.prepared.total()),
            format_bytes(self.prepared.modulation_per_step),
            self.steps,
            format_bytes(self.prepared.modulation_all_steps),
            workload.llama_tokens,
            workload.t5_tokens,
            format_bytes(self.prepared.text_tokens),
        );

        println!();
        self.print_activations();

        println!();
        let flops = &self.flops;
        println!(
            "FLOPs per forward (batch {b}): {} = MoE routed {}, MoE shared {}, q/k/v/out {}, attention {}, \
             text feed-forward {}, caption projections {}, modulation {}, embedders and gates {}",
            format_flops(flops.total()),
            format_flops(flops.moe_routed),
            format_flops(flops.moe_shared),
            format_flops(flops.attention_projections),
            format_flops(flops.attention),
            format_flops(flops.text_feed_forward),
            format_flops(flops.caption_projections),
            format_flops(flops.modulation),
            format_flops(flops.embedders.saturating_add(flops.moe_gate)),
        );
        println!(
            "times are lower bounds, max(compute, streaming), under assumptions you can set: {:.0} TFLOP/s sustained \
             (--tflops) and {}/s host to device (--bandwidth)",
            self.flops_per_second / 1e12,
            format_decimal_bytes(self.bandwidth),
        );
    }

    fn print_setting(&self, setting: &Setting) {
        let table = &setting.table;
        match table.precompute() {
            Precompute::PerStep => {
                println!("per step (caption projections and adaLN modulation in every step, as diffusers does):")
            }
            Precompute::PerPrompt => println!("per prompt (caption projections and adaLN modulation precomputed):"),
        }
        println!("  step weights     {} in {} units", format_bytes(table.step_bytes()), table.units().len());
        println!(
            "  minimum budget   {} ({:.1}% of the weights) at prefetch depth {}",
            format_bytes(setting.minimum_budget),
            percent(setting.minimum_budget, self.weight_bytes),
            self.prefetch
        );
        let plan = match &setting.plan {
            Ok(plan) => plan,
            Err(err) => {
                println!("  does not fit     {err}");
                return;
            }
        };
        println!(
            "  resident         {} ({})",
            summarise(table.units(), plan.resident()),
            format_bytes(plan.resident_bytes())
        );
        if plan.streamed().is_empty() {
            println!("  streamed         nothing");
        } else {
            println!(
                "  streamed         {} per step: {}, through {} slots of {}",
                format_bytes(plan.streamed_bytes_per_pass()),
                summarise(table.units(), plan.streamed()),
                plan.n_slots(),
                format_bytes(plan.slot_bytes())
            );
        }
        println!("  peak weights     {}", format_bytes(plan.peak_weight_bytes()));
        if let Some(times) = self.times(setting) {
            println!(
                "  per step         {} = {:.3} s compute, {:.3} s streaming: {} binds, {:.3} s",
                format_flops(setting.step_flops),
                times.compute,
                times.stream,
                if times.stream > times.compute { "streaming" } else { "compute" },
                times.step,
            );
            let once =
                if setting.once_flops > 0 { format!(" + {:.3} s once per prompt", times.once) } else { String::new() };
            println!("  {:<16} {:.1} s{once}", format!("{} steps", self.steps), times.total);
        }
        if let Some((state, total)) = self.device_estimate(setting) {
            println!(
                "  device estimate  {} = {} weights + {} activations (estimate) + {} text{}",
                format_bytes(total),
                format_bytes(plan.peak_weight_bytes()),
                format_bytes(self.activations.bytes()),
                format_bytes(state),
                if table.precompute().is_per_prompt() { " and modulation" } else { "" },
            );
        }
    }

    fn print_activations(&self) {
        let terms = self.activations.binding();
        let workload = &self.workload;
        let phase = if terms.attention_binds() { "attention" } else { "feed-forward" };
        println!(
            "activation peak (an estimate, not a measurement; weights excluded): {} in the {}-stream blocks' {phase}, \
             B = {}, N = {}, dim = {}, heads = {}",
            format_bytes(self.activations.bytes()),
            terms.kind.as_str(),
            workload.batch,
            workload.joint_tokens(),
            self.cfg.inner_dim(),
            self.cfg.num_attention_heads,
        );
        for (name, bytes) in activation_terms(terms) {
            println!("  {name:<68} {:>11}", format_bytes(bytes));
        }
        if workload.attention_chunk.is_none() && terms.attention_binds() {
            println!("  (--attention-chunk 1024 bounds the score matrix to 1024 query rows)");
        }
    }

    fn to_json(&self) -> Value {
        let workload = &self.workload;
        let (height, width) = self.size;
        let setting_json = |setting: &Setting| {
            let table = &setting.table;
            let plan = setting.plan.as_ref().ok().map(|plan| {
                json!({
                    "resident": summarise(table.units(), plan.resident()),
                    "resident_units": plan.resident().iter().map(|&idx| table.units()[idx].to_string()).collect::<Vec<_>>(),
                    "resident_bytes": plan.resident_bytes(),
                    "streamed": summarise(table.units(), plan.streamed()),
                    "streamed_bytes_per_step": plan.streamed_bytes_per_pass(),
                    "n_slots": plan.n_slots(),
                    "slot_bytes": plan.slot_bytes(),
                    "peak_weight_bytes": plan.peak_weight_bytes(),
                })
            });
            let times = self.times(setting).map(|times| {
                json!({
                    "compute_s_per_step": times.compute,
                    "stream_s_per_step": times.stream,
                    "bound": if times.stream > times.compute { "streaming" } else { "compute" },
                    "s_per_step": times.step,
                    "once_per_prompt_s": times.once,
                    "total_s": times.total,
                })
            });
            let device =
                self.device_estimate(setting).map(|(state, total)| json!({"state_bytes": state, "total_bytes": total}));
            json!({
                "step_bytes": table.step_bytes(),
                "n_units": table.units().len(),
                "minimum_budget": setting.minimum_budget,
                "minimum_budget_percent": percent(setting.minimum_budget, self.weight_bytes),
                "plan": plan,
                "error": setting.plan.as_ref().err().map(ToString::to_string),
                "flops_per_step": setting.step_flops,
                "flops_once_per_prompt": setting.once_flops,
                "bytes_once_per_prompt": setting.once_bytes,
                "time": times,
                "device_estimate": device,
            })
        };
        let terms = self.activations.binding();
        json!({
            "config": {
                "source": self.source,
                "dtype": workload.dtype.as_str(),
                "weight_bytes": self.weight_bytes,
                "params": hidream_config::SizeModel::new(&self.cfg).total_params(),
            },
            "variant": {
                "name": self.variant.as_str(),
                "steps": self.steps,
                "guidance_scale": self.guidance_scale,
                "batch": workload.batch,
            },
            "size": {
                "height": height,
                "width": width,
                "latent_height": height / VAE_SCALE_FACTOR,
                "latent_width": width / VAE_SCALE_FACTOR,
                "image_tokens": workload.image_tokens,
                "padded": height != width,
                "text_tokens": workload.text_tokens(),
                "joint_tokens": workload.joint_tokens(),
                "diffusers_rescaled": diffusers_rescaled(height, width),
            },
            "budget": self.budget.map(|(budget, bytes)| json!({"given": budget.to_string(), "bytes": bytes})),
            "prefetch": self.prefetch,
            "assumptions": {"bandwidth_bytes_per_s": self.bandwidth, "tflops": self.flops_per_second / 1e12},
            "attention_chunk": workload.attention_chunk,
            "flops_per_forward": serde_json::to_value(self.flops).unwrap_or_default(),
            "flops_per_forward_total": self.flops.total(),
            "activations": {
                "estimate": true,
                "peak_bytes": self.activations.bytes(),
                "block": terms.kind.as_str(),
                "phase": if terms.attention_binds() { "attention" } else { "feed_forward" },
                "terms": serde_json::to_value(terms).unwrap_or_default(),
                "double": serde_json::to_value(self.activations.double).unwrap_or_default(),
                "single": serde_json::to_value(self.activations.single).unwrap_or_default(),
            },
            "precompute": {
                "saved_bytes_per_step": self.settings[1].once_bytes,
                "prepared_state": serde_json::to_value(self.prepared).unwrap_or_default(),
                "prepared_state_bytes": self.prepared.total(),
            },
            "settings": {
                "per_step": setting_json(&self.settings[0]),
                "per_prompt": setting_json(&self.settings[1]),
            },
        })
    }
}

/// The lower bound on time, in seconds.
struct Times {
    compute: f64,
    stream: f64,
    step: f64,
    once: f64,
    total: f64,
}

/// The config of `--model DIR` (its `config.json` or `transformer/config.json`) or of a preset,
/// with a description of where it came from.
fn load_config(model: Option<&Path>, preset: &str) -> Result<(TransformerConfig, String)> {
    let Some(dir) = model else {
        return Ok((TransformerConfig::preset(preset)?, format!("preset {preset}")));
    };
    let candidates = if dir.is_file() {
        vec![dir.to_path_buf()]
    } else {
        vec![dir.join("config.json"), dir.join("transformer").join("config.json")]
    };
    let path = candidates.iter().find(|path| path.is_file()).with_context(|| {
        format!("no transformer config in {}: expected config.json or transformer/config.json", dir.display())
    })?;
    let cfg = TransformerConfig::from_json_file(path)?;
    Ok((cfg, path.display().to_string()))
}

/// `HxW` in pixels.
fn parse_image_size(text: &str) -> Result<(usize, usize), String> {
    let parsed = text.split_once(['x', 'X']).and_then(|(h, w)| Some((h.trim().parse().ok()?, w.trim().parse().ok()?)));
    match parsed {
        Some((height, width)) if height > 0 && width > 0 => Ok((height, width)),
        _ => Err(format!("expected HxW in pixels, like 1024x1024; got `{text}`")),
    }
}

/// A byte size per second: `55GB/s`, `25GiB/s` or a plain size.
fn parse_bandwidth(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let size = trimmed.strip_suffix("/s").or_else(|| trimmed.strip_suffix("/S")).unwrap_or(trimmed);
    match hidream_memory::parse_bytes(size) {
        Ok(0) => Err("the bandwidth must be more than 0 bytes per second".to_owned()),
        Ok(bytes) => Ok(bytes),
        Err(err) => Err(err.to_string()),
    }
}

/// The size diffusers' `HiDreamImagePipeline` would generate for `height × width`, if it differs:
/// it scales every request to about `1024²` pixels, rounded down to multiples of 16.
fn diffusers_rescaled(height: usize, width: usize) -> Option<(usize, usize)> {
    const SIDE: f64 = 1024.0;
    const DIVISION: f64 = 16.0;
    let scale = (SIDE * SIDE / (height as f64 * width as f64)).sqrt();
    let rescale = |side: usize| ((side as f64 * scale / DIVISION).floor() * DIVISION) as usize;
    let rescaled = (rescale(height), rescale(width));
    (rescaled != (height, width)).then_some(rescaled)
}

/// `embedders + 49 caption projections [0-48] + 12 double blocks [0-11]`.
fn summarise(units: &[Unit], indices: &[usize]) -> String {
    let kinds = [
        (UnitKind::Embedders, "embedders", "embedders"),
        (UnitKind::CaptionProjection, "caption projection", "caption projections"),
        (UnitKind::DoubleBlock, "double block", "double blocks"),
        (UnitKind::SingleBlock, "single block", "single blocks"),
    ];
    let parts: Vec<String> = kinds
        .iter()
        .filter_map(|&(kind, one, many)| {
            let idxs: Vec<usize> = indices
                .iter()
                .filter_map(|&idx| units.get(idx).filter(|unit| unit.kind() == kind))
                .map(|unit| match *unit {
                    Unit::Embedders => 0,
                    Unit::CaptionProjection(idx) | Unit::DoubleBlock(idx) | Unit::SingleBlock(idx) => idx,
                })
                .collect();
            match (kind, idxs.len()) {
                (_, 0) => None,
                (UnitKind::Embedders, _) => Some(one.to_owned()),
                (_, 1) => Some(format!("{one} {}", idxs[0])),
                (_, n) => Some(format!("{n} {many} [{}]", ranges(&idxs))),
            }
        })
        .collect();
    if parts.is_empty() { "nothing".to_owned() } else { parts.join(" + ") }
}

/// Ascending indices as ranges: `0-11, 14, 16-17`.
fn ranges(idxs: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut start = 0;
    for position in 1..=idxs.len() {
        if position == idxs.len() || idxs[position] != idxs[position - 1] + 1 {
            let (first, last) = (idxs[start], idxs[position - 1]);
            parts.push(if first == last { first.to_string() } else { format!("{first}-{last}") });
            start = position;
        }
    }
    parts.join(", ")
}

/// Each term of the activation estimate with what it counts.
fn activation_terms(terms: &ActivationTerms) -> [(&'static str, u64); 6] {
    let projections = match terms.kind {
        hidream_config::BlockKind::Double => "q, k, v, out and their copies: 10 × [B, N, dim]",
        hidream_config::BlockKind::Single => "q, k, v, out and their copies: 7 × [B, N, dim]",
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

/// `1.50 GiB (1610612736 bytes)`.
fn exact(bytes: u64) -> String {
    format!("{} ({bytes} bytes)", format_bytes(bytes))
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 { 0.0 } else { 100.0 * part as f64 / whole as f64 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_compress_runs() {
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0-2, 5, 7-8");
        assert_eq!(ranges(&[3]), "3");
        assert_eq!(ranges(&[]), "");
    }

    #[test]
    fn diffusers_keeps_1024_squared_and_rescales_the_rest() {
        assert_eq!(diffusers_rescaled(1024, 1024), None);
        assert_eq!(diffusers_rescaled(768, 1360), None);
        assert_eq!(diffusers_rescaled(512, 512), Some((1024, 1024)));
        assert_eq!(diffusers_rescaled(2048, 2048), Some((1024, 1024)));
    }

    #[test]
    fn bandwidths_parse_with_or_without_per_second() {
        assert_eq!(parse_bandwidth("55GB/s"), Ok(55_000_000_000));
        assert_eq!(parse_bandwidth("1GiB"), Ok(1 << 30));
        assert!(parse_bandwidth("0GB/s").is_err());
        assert!(parse_bandwidth("fast").is_err());
    }
}
