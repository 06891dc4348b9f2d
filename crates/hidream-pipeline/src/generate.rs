//! Text to image, in the order diffusers' `HiDreamImagePipeline` runs it, one stage at a time.
//!
//! 1. **Size**: the requested size is rescaled to about `default_sample_size · vae_scale_factor`
//!    squared in area, in multiples of `2 · vae_scale_factor`, as diffusers does (silently there;
//!    here a [`Event::Notice`] says so).
//! 2. **Text**: CLIP-L, CLIP-G, T5 and Llama, each loaded, used and freed in turn; with guidance
//!    the negative prompt (default `""`) is encoded too and batched first, as `[uncond, cond]`.
//! 3. **Latents**: the caller's initial noise, or seeded standard normal noise.
//! 4. **Denoising**: the variant's official sampler; `noise_pred = -transformer(..)`, then
//!    `uncond + g · (cond − uncond)`; both halves go through each block per load. The transformer
//!    runs under the caller's memory policy with the per-prompt precomputation.
//! 5. **VAE**: `latents / scaling_factor + shift_factor`, decoded, then diffusers' postprocessing
//!    to u8 pixels. The decode's options are the caller's where set; the rest are chosen to fit the
//!    run's budget (attention chunks, then slicing, then tiling, which a notice announces).
//!
//! The stages run in sequence and each frees what it loaded before the next starts, so the peak is
//! that of the largest stage, not the sum.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use hidream_config::{TransformerConfig, Variant};
use hidream_memory::Plan;
use hidream_schedulers::Scheduler;
use hidream_text::{TextEncoderPaths, TextStageReport, encode_prompts_under, resolve_folder};
use hidream_weights::Checkpoint;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use crate::runner::{RunnerConfig, TransformerRunner, candle_dtype};
use crate::sampling::{pipeline_shift_for_transformer, scheduler_config_for_variant};
use crate::vae::{DecodeEstimate, DecodeOptions, LatentSize, VaeConfig, VaeDecoder, postprocess};
use crate::{PipelineError, Result};

/// A HiDream-I1 model folder in the Hugging Face layout, plus the Llama folder it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFolder {
    pub root: PathBuf,
    pub llama: PathBuf,
}

/// Files a complete model folder has, relative to its root (weights are checked separately).
const REQUIRED_CONFIGS: [&str; 5] = [
    "transformer/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "text_encoder_3/config.json",
];
const REQUIRED_TOKENIZERS: [&str; 3] =
    ["tokenizer/tokenizer.json", "tokenizer_2/tokenizer.json", "tokenizer_3/tokenizer.json"];
const WEIGHT_FOLDERS: [&str; 5] = ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"];

impl ModelFolder {
    /// `model` is a local folder or a Hugging Face repo id (`HiDream-ai/HiDream-I1-Dev`) found in
    /// the local Hub cache (`$HF_HOME`, offline); `llama` likewise.
    pub fn resolve(model: &str, llama: &str) -> Result<Self> {
        Ok(Self { root: resolve_folder(model, "model_index.json")?, llama: resolve_folder(llama, "config.json")? })
    }

    /// Checks that every file the stages need is present, before any long work starts.
    pub fn validate(&self) -> Result<()> {
        let hint = |what: &str| {
            format!(
                "the model folder {} is incomplete ({what}); download the whole repository, e.g. \
                 `huggingface-cli download HiDream-ai/HiDream-I1-Dev --local-dir {}`",
                self.root.display(),
                self.root.display()
            )
        };
        for file in REQUIRED_CONFIGS {
            let path = self.root.join(file);
            if !path.is_file() {
                return Err(PipelineError::MissingFile { path, hint: hint(file) });
            }
        }
        for file in REQUIRED_TOKENIZERS {
            let path = self.root.join(file);
            if !path.is_file() {
                let dir = path.parent().unwrap_or(&self.root).display().to_string();
                let hint = format!(
                    "the text stack reads fast tokenizers (`tokenizer.json`); if the folder has only the slow \
                     tokenizer files, write it once with transformers: \
                     `AutoTokenizer.from_pretrained(\"{dir}\").save_pretrained(\"{dir}\")`"
                );
                return Err(PipelineError::MissingFile { path, hint });
            }
        }
        for folder in WEIGHT_FOLDERS {
            let dir = self.root.join(folder);
            if !has_safetensors(&dir) {
                return Err(PipelineError::MissingFile { path: dir, hint: hint("no *.safetensors weights") });
            }
        }
        for file in ["config.json", "tokenizer.json"] {
            let path = self.llama.join(file);
            if !path.is_file() {
                let hint = format!(
                    "--llama must be a Llama-3.1-8B-Instruct folder in the transformers layout, e.g. \
                     `huggingface-cli download meta-llama/Llama-3.1-8B-Instruct --local-dir {}`",
                    self.llama.display()
                );
                return Err(PipelineError::MissingFile { path, hint });
            }
        }
        if !has_safetensors(&self.llama) {
            return Err(PipelineError::MissingFile {
                path: self.llama.join("model.safetensors.index.json"),
                hint: "the Llama folder has no *.safetensors weights".into(),
            });
        }
        Ok(())
    }

    pub fn transformer(&self) -> PathBuf {
        self.root.join("transformer")
    }

    pub fn vae(&self) -> PathBuf {
        self.root.join("vae")
    }

    pub fn text_encoders(&self) -> TextEncoderPaths {
        TextEncoderPaths::hub_layout(&self.root, &self.llama)
    }
}

fn has_safetensors(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries.filter_map(std::result::Result::ok).any(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
    })
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    /// `None` means `""` when guidance is on (diffusers' default).
    pub negative_prompt: Option<String>,
    pub variant: Variant,
    /// Requested `(width, height)` in pixels; `None` is the default size (1024×1024).
    pub size: Option<(usize, usize)>,
    /// `None` is the variant's default (Full 50, Dev 28, Fast 16).
    pub steps: Option<usize>,
    /// `None` is the variant's default (Full 5.0, Dev and Fast 0).
    pub guidance: Option<f64>,
    /// Seeds the initial latents and the flash sampler's noise when they are not given.
    pub seed: u64,
    /// Initial noise `[1, 16, H/8, W/8]` (reproduction runs).
    pub latents: Option<Tensor>,
    /// The flash sampler's per-step noise `[steps, 1, 16, H/8, W/8]` (reproduction runs).
    pub step_noise: Option<Tensor>,
}

/// How to run it.
#[derive(Debug, Clone, Copy)]
pub struct GenerateSettings {
    pub transformer: RunnerConfig,
    /// The text encoders' compute dtype.
    pub text_dtype: hidream_config::DType,
    pub vae_dtype: hidream_config::DType,
    pub vae: DecodeOptions,
    /// diffusers' `pipe.default_sample_size` (128; tests use less).
    pub default_sample_size: usize,
}

/// The stages, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Text,
    Denoise,
    Vae,
}

impl Stage {
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Text => "text encoders",
            Stage::Denoise => "denoising",
            Stage::Vae => "vae decode",
        }
    }

    /// The stage and what runs in it, for messages.
    pub fn describe(self) -> &'static str {
        match self {
            Stage::Text => "text encoders (CLIP-L, CLIP-G, T5, Llama)",
            Stage::Denoise => "denoising (the transformer)",
            Stage::Vae => "vae decode",
        }
    }
}

/// What [`generate`] tells its observer.
#[derive(Debug, Clone)]
pub enum Event<'a> {
    Notice(String),
    StageStarted(Stage),
    StageFinished(Stage, f64),
    StepStarted {
        step_idx: usize,
        n_steps: usize,
    },
    /// `latents` are the sampler's output of this step.
    StepFinished {
        step_idx: usize,
        n_steps: usize,
        seconds: f64,
        latents: &'a Tensor,
    },
}

/// The result.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The decoded images `[1, 3, H, W]` in [-1, 1].
    pub images: Tensor,
    /// u8 `[1, H, W, 3]`.
    pub pixels: Tensor,
    /// The final latents before the VAE, f32 `[1, 16, H/8, W/8]`.
    pub latents: Tensor,
    /// `(width, height)` in pixels after rescaling.
    pub size: (usize, usize),
    pub steps: usize,
    pub guidance: f64,
    /// The transformer's residency plan, as a sentence.
    pub plan: String,
    /// What each text stage planned and measured (CLIP-L, CLIP-G, T5, Llama).
    pub text_stages: Vec<TextStageReport>,
    /// What the transformer's stage held and streamed.
    pub transformer: TransformerStageReport,
    /// The VAE decode: its weights and predicted peak, and the options it ran with.
    pub vae: VaeStageReport,
}

/// The denoising stage's weights, measured by its ledger and loader.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct TransformerStageReport {
    /// The weights loaded once: the resident units.
    pub resident_bytes: u64,
    /// The ledger's peak of weight bytes (resident units, slots, the precomputation's layers).
    pub peak_weight_bytes: u64,
    /// Bytes loaded into slots over the whole stage (every step, and the precomputation's layers).
    pub bytes_streamed: u64,
    /// Time the steps waited on loads.
    pub stall_seconds: f64,
}

/// The VAE stage as planned.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct VaeStageReport {
    pub weight_bytes: u64,
    /// [`DecodeEstimate::total`] of the options it ran with.
    pub predicted_peak_bytes: u64,
    pub tiled: bool,
    pub attention_chunk: Option<usize>,
    pub sliced: bool,
}

/// diffusers' rescaling of a requested size (kept here for callers of this module).
pub use crate::planning::pipeline_size;

/// One stage of [`generate`] as planned before anything loads, from the configs and the
/// safetensors headers alone ([`plan_stages`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct StagePlan {
    /// `CLIP-L`, `CLIP-G`, `T5`, `Llama`, `transformer` or `VAE decode`.
    pub stage: String,
    /// Every weight the stage loads, in its compute dtype.
    pub weight_bytes: u64,
    /// The smallest budget the stage runs under, at the run's prefetch depth. For the VAE, with
    /// tiling where it must (which changes the image).
    pub minimum_budget: u64,
    /// The smallest budget under which the stage computes exactly what the all-resident run does:
    /// `minimum_budget`, except for the VAE, whose is that of the smallest untiled decode.
    pub exact_minimum_budget: u64,
    /// Under the run's policy: the most weight bytes on the device at once (the VAE: its weights
    /// and its activation estimate), or `None` where the stage does not fit.
    pub predicted_peak_bytes: Option<u64>,
    /// Under the run's policy: bytes streamed per pass over the stage's layers (per step for the
    /// transformer).
    pub streamed_bytes: u64,
    /// Why the stage cannot run under the run's policy, if it cannot.
    pub error: Option<String>,
}

/// Plans every stage of [`generate`] for `request` under `settings`, reading only configs and
/// headers: what `hidream plan --llama` prints, and the checks `generate` makes first.
pub fn plan_stages(
    folder: &ModelFolder,
    request: &GenerateRequest,
    settings: &GenerateSettings,
) -> Result<Vec<StagePlan>> {
    folder.validate()?;
    let policy = settings.transformer.policy;
    let prefetch = policy.prefetch_depth();
    let unbounded = hidream_memory::Policy::Budget { budget_bytes: u64::MAX, prefetch };
    let text_dtype = candle_dtype(settings.text_dtype);
    let paths = folder.text_encoders();
    let mut stages = Vec::new();
    for encoder in hidream_text::TextEncoderKind::ALL {
        let sized = hidream_text::text_stage_plan(encoder, &paths, text_dtype, unbounded)?;
        let under_policy = sized.with_policy(policy);
        stages.push(StagePlan {
            stage: encoder.name().to_owned(),
            weight_bytes: sized.weight_bytes(),
            minimum_budget: sized.minimum_budget,
            exact_minimum_budget: sized.minimum_budget,
            predicted_peak_bytes: under_policy.as_ref().ok().map(hidream_text::TextStagePlan::peak_weight_bytes),
            streamed_bytes: under_policy.as_ref().map_or(0, |plan| plan.plan.streamed_bytes_per_pass()),
            error: under_policy.err().map(|err| err.to_string()),
        });
    }

    let checkpoint = Checkpoint::open(&folder.transformer())?;
    let cfg: TransformerConfig = checkpoint.config()?;
    let runner = settings.transformer;
    let table = crate::UnitTable::new(&cfg, runner.compute_dtype, runner.precompute);
    let minimum = crate::runner::minimum_budget(&cfg, runner.compute_dtype, runner.precompute, prefetch);
    let plan = crate::runner::plan_transformer(&cfg, &runner);
    stages.push(StagePlan {
        stage: "transformer".to_owned(),
        weight_bytes: table.weight_bytes_total(),
        minimum_budget: minimum,
        exact_minimum_budget: minimum,
        predicted_peak_bytes: plan.as_ref().ok().map(Plan::peak_weight_bytes),
        streamed_bytes: plan.as_ref().map_or(0, Plan::streamed_bytes_per_pass),
        error: plan.err().map(|err| err.to_string()),
    });

    let vae_config = VaeConfig::read(&folder.vae().join("config.json"))?;
    let vae_scale_factor = vae_config.upscale();
    let (width, height) = pipeline_size(request.size, vae_scale_factor, settings.default_sample_size)?;
    let latents = LatentSize { batch: 1, height: height / vae_scale_factor, width: width / vae_scale_factor };
    let vae_dtype = candle_dtype(settings.vae_dtype);
    let (minimum, exact_minimum) = vae_minimums(&vae_config, latents, vae_dtype, &settings.vae)?;
    let budget = policy.budget_bytes().unwrap_or(u64::MAX);
    let choice = DecodeOptions::for_budget(&vae_config, latents, vae_dtype, budget, &settings.vae);
    stages.push(StagePlan {
        stage: "VAE decode".to_owned(),
        weight_bytes: vae_config.weight_bytes(vae_dtype),
        minimum_budget: minimum,
        exact_minimum_budget: exact_minimum,
        predicted_peak_bytes: choice.as_ref().ok().map(|choice| choice.estimate.total()),
        streamed_bytes: 0,
        error: choice.err().map(|err| err.to_string()),
    });
    Ok(stages)
}

/// The smallest budget of the VAE decode with tiling where it must, and without.
fn vae_minimums(config: &VaeConfig, latents: LatentSize, dtype: DType, forced: &DecodeOptions) -> Result<(u64, u64)> {
    let minimum = match DecodeOptions::for_budget(config, latents, dtype, 0, forced) {
        Err(PipelineError::VaeBudgetTooSmall { minimum, .. }) => minimum,
        Err(other) => return Err(other),
        Ok(choice) => choice.estimate.total(),
    };
    let exact = DecodeOptions::for_budget(config, latents, dtype, minimum, forced)?.tiled_to_fit.unwrap_or(minimum);
    Ok((minimum, exact))
}

/// Runs the whole pipeline.
pub fn generate(
    folder: &ModelFolder,
    request: &GenerateRequest,
    settings: &GenerateSettings,
    device: &Device,
    observe: &mut dyn FnMut(Event<'_>),
) -> Result<Generated> {
    folder.validate()?;
    let defaults = request.variant.defaults();
    let steps = request.steps.unwrap_or(defaults.steps);
    let guidance = request.guidance.unwrap_or(defaults.guidance_scale);
    let cfg_on = guidance > 1.0;
    let transformer_checkpoint = Checkpoint::open(&folder.transformer())?;
    let transformer_cfg: TransformerConfig = transformer_checkpoint.config()?;
    let vae_config = VaeConfig::read(&folder.vae().join("config.json"))?;

    // 1. Size.
    let vae_scale_factor = vae_config.upscale();
    let (width, height) = pipeline_size(request.size, vae_scale_factor, settings.default_sample_size)?;
    if let Some(requested) = request.size
        && requested != (width, height)
    {
        observe(Event::Notice(format!(
            "size {}x{} rescaled to {width}x{height} (HiDream generates about {side}x{side} pixels in area, \
             in multiples of {}; diffusers does this silently)",
            requested.0,
            requested.1,
            vae_scale_factor * 2,
            side = settings.default_sample_size * vae_scale_factor,
        )));
    }
    let latent_shape = (1, transformer_cfg.in_channels, height / vae_scale_factor, width / vae_scale_factor);
    // The transformer's plan now, from its config: a budget it cannot run under is refused before
    // the text encoders load.
    crate::runner::plan_transformer(&transformer_cfg, &settings.transformer)
        .map_err(|err| err.in_stage(Stage::Denoise))?;
    // So are the VAE's decode options, for the latents' size.
    let decoded = LatentSize { batch: latent_shape.0, height: latent_shape.2, width: latent_shape.3 };
    let (vae_options, vae_estimate) =
        vae_options_for(&vae_config, decoded, settings, device, observe).map_err(|err| err.in_stage(Stage::Vae))?;

    // 2. Text.
    observe(Event::StageStarted(Stage::Text));
    let started = Instant::now();
    let negative = request.negative_prompt.clone().unwrap_or_default();
    let prompts: Vec<&str> =
        if cfg_on { vec![negative.as_str(), request.prompt.as_str()] } else { vec![&request.prompt] };
    let text_dtype = candle_dtype(settings.text_dtype);
    let embeds =
        encode_prompts_under(&folder.text_encoders(), &prompts, text_dtype, device, settings.transformer.policy)?;
    for truncation in &embeds.truncations {
        // With guidance the batch is [negative, prompt].
        let which = if cfg_on && truncation.prompt_idx == 0 { "negative prompt" } else { "prompt" };
        observe(Event::Notice(format!(
            "{which} truncated to {} tokens for {} ({} tokens dropped), as diffusers truncates it",
            truncation.kept_tokens, truncation.encoder, truncation.dropped_tokens
        )));
    }
    observe(Event::StageFinished(Stage::Text, started.elapsed().as_secs_f64()));

    // 3. Latents.
    let latents = match &request.latents {
        Some(latents) => {
            check_shape("--latents", latents, &[latent_shape.0, latent_shape.1, latent_shape.2, latent_shape.3])?;
            latents.to_dtype(DType::F32)?.to_device(device)?
        }
        None => {
            standard_normal(&[latent_shape.0, latent_shape.1, latent_shape.2, latent_shape.3], request.seed, device)?
        }
    };

    // 4. Denoising.
    observe(Event::StageStarted(Stage::Denoise));
    let started = Instant::now();
    let scheduler_config = scheduler_config_for_variant(request.variant);
    let mut scheduler = Scheduler::new(scheduler_config, pipeline_shift_for_transformer(&transformer_cfg)?)?;
    let timesteps: Vec<f32> = scheduler.set_timesteps(steps)?.timesteps().to_vec();
    if let Some(noise) = &request.step_noise {
        check_shape("--step-noise", noise, &[steps, latent_shape.0, latent_shape.1, latent_shape.2, latent_shape.3])?;
    }
    let mut runner = TransformerRunner::new(transformer_checkpoint, device, settings.transformer)?;
    let plan = runner.plan().to_string();
    if let Some(requested) = runner.plan().requested_prefetch_depth() {
        observe(Event::Notice(format!(
            "--prefetch {requested} is deeper than a step's {} streamed blocks; loading {} ahead",
            runner.plan().streamed().len(),
            runner.plan().prefetch_depth()
        )));
    }
    let batch = if cfg_on { 2 } else { 1 };
    let step_timesteps =
        timesteps.iter().map(|&t| Tensor::full(t, batch, device)).collect::<candle_core::Result<Vec<_>>>()?;
    let prepared = if settings.transformer.precompute.is_per_prompt() {
        Some(runner.prepare(&embeds.t5, &embeds.llama, &embeds.pooled, &step_timesteps)?)
    } else {
        None
    };
    runner.expect_steps((0..steps).filter(|&step_idx| scheduler.uses_model_output(step_idx)).count());
    let mut latents = latents;
    let mut noise_rng = StdRng::seed_from_u64(request.seed.wrapping_add(1));
    for (step_idx, step_timestep) in step_timesteps.iter().enumerate() {
        observe(Event::StepStarted { step_idx, n_steps: steps });
        let step_started = Instant::now();
        let noise_pred = if scheduler.uses_model_output(step_idx) {
            let input = if cfg_on { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
            let output = match &prepared {
                Some(prepared) => runner.forward_prepared(prepared, step_idx, &input)?,
                None => runner.forward(&hidream_model::TransformerInputs {
                    hidden_states: input,
                    timesteps: step_timestep.clone(),
                    encoder_hidden_states_t5: embeds.t5.clone(),
                    encoder_hidden_states_llama3: embeds.llama.clone(),
                    pooled_embeds: embeds.pooled.clone(),
                })?,
            };
            let noise_pred = output.to_dtype(DType::F32)?.neg()?;
            if cfg_on {
                let uncond = noise_pred.narrow(0, 0, 1)?;
                let cond = noise_pred.narrow(0, 1, 1)?;
                (&uncond + ((&cond - &uncond)? * guidance)?)?
            } else {
                noise_pred
            }
        } else {
            // The flash sampler's last step returns its input: the transformer call is skipped.
            latents.zeros_like()?
        };
        let noise = if scheduler.needs_noise(step_idx) {
            Some(match &request.step_noise {
                Some(noise) => noise.get(step_idx)?.to_dtype(DType::F32)?.to_device(device)?,
                None => standard_normal_from(latents.dims(), &mut noise_rng, device)?,
            })
        } else {
            None
        };
        latents = scheduler.step(&noise_pred, step_idx, &latents, noise.as_ref())?;
        let seconds = step_started.elapsed().as_secs_f64();
        observe(Event::StepFinished { step_idx, n_steps: steps, seconds, latents: &latents });
    }
    drop(prepared);
    let mut stats = runner.stats();
    stats.add(&runner.prepare_stats());
    let transformer = TransformerStageReport {
        resident_bytes: runner.plan().resident_bytes(),
        peak_weight_bytes: runner.ledger().peak_bytes(),
        bytes_streamed: stats.bytes_loaded,
        stall_seconds: stats.stall_time.as_secs_f64(),
    };
    drop(runner);
    observe(Event::StageFinished(Stage::Denoise, started.elapsed().as_secs_f64()));

    // 5. VAE.
    observe(Event::StageStarted(Stage::Vae));
    let started = Instant::now();
    let vae_dtype = candle_dtype(settings.vae_dtype);
    let vae = VaeDecoder::load(&folder.vae(), vae_dtype, device)?;
    let images = vae.decode(&latents, &vae_options)?;
    let vae_report = VaeStageReport {
        weight_bytes: vae_config.weight_bytes(vae_dtype),
        predicted_peak_bytes: vae_estimate.total(),
        tiled: vae_options.tiling.is_some(),
        attention_chunk: vae_options.attention_chunk,
        sliced: vae_options.slicing,
    };
    let pixels = postprocess(&images)?;
    observe(Event::StageFinished(Stage::Vae, started.elapsed().as_secs_f64()));
    let text_stages = embeds.stages;
    Ok(Generated {
        images,
        pixels,
        latents,
        size: (width, height),
        steps,
        guidance,
        plan,
        text_stages,
        transformer,
        vae: vae_report,
    })
}

/// The VAE's decode options: `settings.vae` as forced, the rest chosen by
/// [`DecodeOptions::for_budget`] under the run's budget (the whole of it: the stages run one after
/// another and each frees its weights), or on a GPU without one, its free memory. On the CPU
/// without a budget, `settings.vae` as is. A notice says when tiling was chosen to fit. Returns the
/// options with their memory estimate.
fn vae_options_for(
    config: &VaeConfig,
    latents: LatentSize,
    settings: &GenerateSettings,
    device: &Device,
    observe: &mut dyn FnMut(Event<'_>),
) -> Result<(DecodeOptions, DecodeEstimate)> {
    let dtype = candle_dtype(settings.vae_dtype);
    let budget = match settings.transformer.policy {
        hidream_memory::Policy::Budget { budget_bytes, .. } => Some(budget_bytes),
        _ => hidream_device::device_memory(device).map(|memory| memory.total.saturating_sub(memory.driver_used)),
    };
    let Some(budget) = budget else {
        return Ok((settings.vae, DecodeEstimate::new(config, latents, dtype, &settings.vae)?));
    };
    let choice = DecodeOptions::for_budget(config, latents, dtype, budget, &settings.vae)?;
    if let Some(notice) = choice.notice(budget) {
        observe(Event::Notice(notice));
    }
    Ok((choice.options, choice.estimate))
}

fn check_shape(what: &str, tensor: &Tensor, expected: &[usize]) -> Result<()> {
    let dims = tensor.dims();
    if dims == expected {
        return Ok(());
    }
    // A latent of the transposed size is a size given as height × width.
    let mut transposed = expected.to_vec();
    if let [.., height, width] = transposed.as_mut_slice() {
        std::mem::swap(height, width);
    }
    let hint = if dims == transposed {
        " (its height and width are swapped: sizes are WIDTHxHEIGHT, and latents are [.., H/8, W/8])"
    } else {
        ""
    };
    Err(PipelineError::invalid(what, format!("has shape {dims:?}, but this size and model need {expected:?}{hint}")))
}

fn standard_normal(shape: &[usize], seed: u64, device: &Device) -> Result<Tensor> {
    standard_normal_from(shape, &mut StdRng::seed_from_u64(seed), device)
}

fn standard_normal_from(shape: &[usize], rng: &mut StdRng, device: &Device) -> Result<Tensor> {
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(values, shape, device)?)
}
