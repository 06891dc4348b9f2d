//! `hidream generate`: text to image with the whole HiDream-I1 pipeline, under a memory budget.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use hidream_config::Variant;
use hidream_memory::CountingAllocator;
use hidream_pipeline::generate::{Event, GenerateRequest, GenerateSettings, ModelFolder, generate};
use hidream_pipeline::planning::ImageSize;
use hidream_pipeline::vae::DecodeOptions;
use image::codecs::png::PngEncoder;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;

use crate::parse;
use crate::residency::{ResidencyArgs, write_json};

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    /// A HiDream-I1 folder in the Hugging Face layout (transformer/, vae/, text_encoder*/,
    /// tokenizer*/, scheduler/), or a repo id such as HiDream-ai/HiDream-I1-Dev in the local Hub cache.
    #[arg(long, value_parser = parse::non_empty)]
    model: String,
    /// A Llama-3.1-8B-Instruct folder (transformers layout), or a repo id in the local Hub cache.
    #[arg(long, value_parser = parse::non_empty)]
    llama: String,
    #[arg(long)]
    prompt: String,
    /// Used when guidance is on; defaults to "".
    #[arg(long)]
    negative_prompt: Option<String>,
    #[arg(long, default_value = "dev")]
    variant: Variant,
    /// Requested size WIDTHxHEIGHT in pixels, width first as in diffusers (1360x768 is
    /// landscape); HiDream rescales it to about 1024² in area (a notice says so).
    #[arg(long, value_parser = parse::image_size, allow_hyphen_values = true)]
    size: Option<ImageSize>,
    /// Denoising steps, 1 to 1000 (default: Full 50, Dev 28, Fast 16).
    #[arg(long, value_parser = parse::steps, allow_negative_numbers = true)]
    steps: Option<usize>,
    /// Classifier-free guidance scale, at least 0; above 1 turns guidance on (default: Full 5.0,
    /// Dev and Fast 0 = off).
    #[arg(long, value_parser = parse::non_negative, allow_negative_numbers = true)]
    guidance: Option<f64>,
    /// Seeds the initial latents and the sampler's noise (0 to 2^64 − 1).
    #[arg(long, default_value_t = 0, value_parser = parse::seed, allow_negative_numbers = true)]
    seed: u64,
    /// Compute dtype of every stage.
    #[arg(long, default_value = "bf16")]
    dtype: hidream_config::DType,
    /// Decode the VAE in overlapping tiles (less memory; blended seams). Without it, tiling is
    /// chosen only when no untiled decode fits --budget (a note says so).
    #[arg(long)]
    vae_tiling: bool,
    /// Evaluate the VAE mid block's attention over every latent position in chunks of this many
    /// query positions (the same function, within f32 rounding; bounds its score matrix, 1 GiB
    /// at 1024² unchunked); at least 1. Without it, a chunk is chosen to fit --budget.
    #[arg(long, value_parser = crate::parse::positive, allow_negative_numbers = true)]
    vae_attention_chunk: Option<usize>,
    /// The PNG to write (whole or not at all).
    #[arg(long, default_value = "image.png")]
    out: PathBuf,
    /// Initial noise under `latents`, shaped [1, 16, H/8, W/8] (to reproduce a Python run).
    #[arg(long)]
    latents: Option<PathBuf>,
    /// The flash sampler's per-step noise under `noise`, shaped [steps, 1, 16, H/8, W/8].
    #[arg(long)]
    step_noise: Option<PathBuf>,
    /// Save the final latents (before the VAE) under `latents` (whole or not at all).
    #[arg(long)]
    output_latents: Option<PathBuf>,
    /// diffusers' `default_sample_size` (the generated area is about (this × 8)²).
    #[arg(long, default_value_t = 128, hide = true, value_parser = parse::sample_size, allow_negative_numbers = true)]
    default_sample_size: usize,
    #[command(flatten)]
    residency: ResidencyArgs,
}

pub fn run(args: &GenerateArgs) -> Result<()> {
    if args.out.extension().is_none_or(|ext| !ext.eq_ignore_ascii_case("png")) {
        bail!("--out must be a .png file, got {}", args.out.display());
    }
    // Every output path is checked before the long work starts.
    for path in [Some(&args.out), args.output_latents.as_ref(), args.residency.report.as_ref()].into_iter().flatten() {
        hidream_weights::check_writable(path)?;
    }
    let device = args.residency.open_device()?;
    let folder = ModelFolder::resolve(&args.model, &args.llama)?;
    folder.validate()?;
    let cfg = hidream_weights::Checkpoint::open(&folder.transformer())?.config()?;
    let request = GenerateRequest {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        variant: args.variant,
        size: args.size.map(|size| (size.width, size.height)),
        steps: args.steps,
        guidance: args.guidance,
        seed: args.seed,
        latents: read_tensor(args.latents.as_deref(), "latents")?,
        step_noise: read_tensor(args.step_noise.as_deref(), "noise")?,
    };
    let settings = GenerateSettings {
        transformer: args.residency.runner_config(&cfg, args.dtype)?,
        text_dtype: args.dtype,
        // candle has no bf16 or f16 convolution on the CPU: the VAE decodes in f32 there.
        vae_dtype: if device.is_cpu() { hidream_config::DType::F32 } else { args.dtype },
        vae: DecodeOptions {
            tiling: args.vae_tiling.then(|| hidream_pipeline::vae::VaeConfig::flux().default_tiling()),
            slicing: false,
            attention_chunk: args.vae_attention_chunk,
        },
        default_sample_size: args.default_sample_size,
    };

    let mut stages = Vec::new();
    let mut progress: Option<ProgressBar> = None;
    let mut observe = |event: Event| match event {
        Event::Notice(message) => eprintln!("note: {message}"),
        Event::StageStarted(stage) => {
            CountingAllocator::reset_peak();
            hidream_device::reset_memory_peak(&device);
            let bar = ProgressBar::new_spinner().with_message(stage.as_str().to_owned());
            bar.enable_steady_tick(Duration::from_millis(120));
            progress = Some(bar);
        }
        Event::StepStarted { step_idx: 0, n_steps } => {
            if let Some(bar) = progress.take() {
                bar.finish_and_clear();
            }
            let bar = ProgressBar::new(n_steps as u64).with_style(
                ProgressStyle::with_template("denoising [{bar:30}] {pos}/{len} steps, {elapsed}, eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            progress = Some(bar);
        }
        Event::StepFinished { .. } => {
            if let Some(bar) = &progress {
                bar.inc(1);
            }
        }
        Event::StageFinished(stage, seconds) => {
            if let Some(bar) = progress.take() {
                bar.finish_and_clear();
            }
            // The measured peak of the device tier: the GPU pool's on CUDA, the heap's on the CPU.
            let heap = CountingAllocator::peak_bytes();
            let gpu = hidream_device::device_memory(&device);
            let peak = gpu.map_or(heap, |memory| memory.pool_peak);
            eprintln!("{}: {seconds:.2} s, peak {}", stage.as_str(), hidream_memory::format_bytes(peak));
            stages.push(json!({
                "stage": stage.as_str(),
                "seconds": seconds,
                "peak_device_bytes": peak,
                "peak_heap_bytes": heap,
                "gpu": gpu,
            }));
        }
        Event::StepStarted { .. } => {}
    };
    let generated = generate(&folder, &request, &settings, &device, &mut observe)?;

    write_png(&args.out, &generated.pixels)?;
    if let Some(path) = &args.output_latents {
        hidream_weights::write_tensors(path, &HashMap::from([("latents".to_owned(), generated.latents.clone())]))?;
    }
    let (width, height) = generated.size;
    outln!(
        "{width}x{height} image -> {} ({} steps, guidance {}, {})",
        args.out.display(),
        generated.steps,
        generated.guidance,
        generated.plan
    )?;
    if let Some(path) = &args.residency.report {
        let report = json!({
            "variant": args.variant.as_str(),
            "size": [width, height],
            "steps": generated.steps,
            "guidance": generated.guidance,
            "dtype": args.dtype.as_str(),
            "device": args.residency.device.to_string(),
            "transformer_plan": generated.plan,
            "stages": stages,
            "transformer_stage": generated.transformer,
            "vae_stage": generated.vae,
            "peak_device_bytes": stages.iter().filter_map(|stage| stage["peak_device_bytes"].as_u64()).max(),
            "text_stages": generated.text_stages.iter().map(|stage| json!({
                "encoder": stage.plan.encoder.name(),
                "stem_bytes": stage.plan.stem_bytes,
                "layer_bytes": stage.plan.layers.iter().map(|layer| layer.bytes).sum::<u64>(),
                "plan": stage.plan.plan.to_string(),
                "minimum_budget": stage.plan.minimum_budget,
                "planned_peak_weight_bytes": stage.plan.peak_weight_bytes(),
                "peak_weight_bytes": stage.peak_weight_bytes,
                "bytes_streamed": stage.stats.bytes_loaded,
                "seconds": stage.seconds,
            })).collect::<Vec<_>>(),
        });
        write_json(path, &report)?;
    }
    Ok(())
}

fn read_tensor(path: Option<&Path>, key: &str) -> Result<Option<Tensor>> {
    let Some(path) = path else { return Ok(None) };
    let mut tensors = hidream_weights::read_tensors(path, &Device::Cpu)?;
    let tensor = tensors.remove(key).with_context(|| format!("{} has no tensor `{key}`", path.display()))?;
    Ok(Some(tensor.to_dtype(DType::F32)?))
}

/// Writes the first image of u8 `[B, H, W, 3]` pixels as a PNG, whole or not at all.
fn write_png(path: &Path, pixels: &Tensor) -> Result<()> {
    let (_, height, width, _) = pixels.dims4()?;
    let data: Vec<u8> = pixels.get(0)?.flatten_all()?.to_vec1()?;
    let (width, height) = (u32::try_from(width)?, u32::try_from(height)?);
    let image = image::RgbImage::from_raw(width, height, data).context("pixel buffer size")?;
    hidream_weights::write_atomic(path, |writer| {
        image.write_with_encoder(PngEncoder::new(writer)).map_err(std::io::Error::other)
    })
    .with_context(|| format!("writing the image {}", path.display()))
}
