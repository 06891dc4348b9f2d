//! End-to-end golden test of `generate` against diffusers' `HiDreamImagePipeline` with the
//! official samplers, on the tiny pipeline that `generate.py` beside this file built (its text
//! encoders and VAE are the fixtures of `tests/golden/text` and `tests/golden/vae`, linked).
//!
//! Every stage is compared: the latents after each step, the final latents, the decoded image and
//! the u8 pixels. Tolerances (f32):
//! - latents: max |rust − diffusers| ≤ 1e-4 × max(1, max |expected|) after every step;
//! - decoded image: the same bound;
//! - pixels: equal, except where the decoded value sits within float noise of a rounding boundary
//!   (at most 1 level apart, on at most 0.5% of the pixels).
//!
//! The same run under the pipeline's tightest exact budget (the largest of its stages' exact
//! minimums) must give bit-identical latents and image.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use candle_core::{Device, Tensor};
use hidream_memory::Policy;
use hidream_model::AttentionConfig;
use hidream_pipeline::Precompute;
use hidream_pipeline::generate::{
    Event, GenerateRequest, GenerateSettings, Generated, ModelFolder, generate, plan_stages,
};
use hidream_pipeline::runner::RunnerConfig;
use hidream_pipeline::vae::DecodeOptions;
use hidream_test_support::{ensure_bit_identical, ensure_close, scale};

const TOLERANCE: f32 = 1e-4;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/pipeline")
}

fn read(case: &str, file: &str) -> Result<std::collections::HashMap<String, Tensor>> {
    Ok(hidream_weights::read_tensors(&golden_dir().join("cases").join(case).join(file), &Device::Cpu)?)
}

struct Run {
    generated: Generated,
    steps: Vec<Tensor>,
}

/// The case's request and settings under `policy`.
fn setup(case: &str, policy: Policy) -> Result<(ModelFolder, GenerateRequest, GenerateSettings, serde_json::Value)> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join("cases").join(case).join("case.json"))?)?;
    let size = |key: &str| -> Option<(usize, usize)> {
        Some((meta[key]["width"].as_u64()? as usize, meta[key]["height"].as_u64()? as usize))
    };
    let mut latents = read(case, "latents.safetensors")?;
    let step_noise = match read(case, "noise.safetensors") {
        Ok(mut noise) => Some(noise.remove("noise").context("noise")?),
        Err(_) => None,
    };
    let request = GenerateRequest {
        prompt: meta["prompt"].as_str().context("prompt")?.to_owned(),
        negative_prompt: meta["negative_prompt"].as_str().map(str::to_owned),
        variant: meta["variant"].as_str().context("variant")?.parse()?,
        size: size("requested_size"),
        steps: meta["steps"].as_u64().map(|s| s as usize),
        guidance: meta["guidance_scale"].as_f64(),
        seed: 0,
        latents: Some(latents.remove("initial").context("initial latents")?),
        step_noise,
    };
    let settings = GenerateSettings {
        transformer: RunnerConfig {
            policy,
            compute_dtype: hidream_config::DType::F32,
            precompute: Precompute::PerPrompt,
            attention: AttentionConfig::default(),
        },
        text_dtype: hidream_config::DType::F32,
        vae_dtype: hidream_config::DType::F32,
        vae: DecodeOptions::default(),
        default_sample_size: meta["default_sample_size"].as_u64().context("default_sample_size")? as usize,
    };
    let folder = ModelFolder { root: golden_dir().join("model"), llama: golden_dir().join("llama") };
    Ok((folder, request, settings, meta))
}

fn run(case: &str, policy: Policy) -> Result<Run> {
    let (folder, request, settings, meta) = setup(case, policy)?;
    let size = |key: &str| -> Option<(usize, usize)> {
        Some((meta[key]["width"].as_u64()? as usize, meta[key]["height"].as_u64()? as usize))
    };
    let mut steps = Vec::new();
    let mut observe = |event: Event<'_>| {
        if let Event::StepFinished { latents, .. } = event {
            steps.push(latents.clone());
        }
    };
    let generated = generate(&folder, &request, &settings, &Device::Cpu, &mut observe)?;
    assert_eq!(Some(generated.size), size("size"), "{case}: rescaled size");
    Ok(Run { generated, steps })
}

/// Asserts max |actual − expected| ≤ `TOLERANCE` × max(1, max |expected|), printing the worst element.
fn compare(label: &str, actual: &Tensor, expected: &Tensor) -> Result<()> {
    assert_eq!(actual.dims(), expected.dims(), "{label}: shape");
    ensure_close(&format!("{label}: rust vs diffusers"), actual, expected, TOLERANCE * scale(expected)?).map(drop)
}

fn check(case: &str) -> Result<()> {
    let Run { generated, steps } = run(case, Policy::All)?;
    let latents = read(case, "latents.safetensors")?;
    for (step_idx, actual) in steps.iter().enumerate() {
        let expected = latents.get(&format!("step.{step_idx}")).ok_or_else(|| anyhow!("no step.{step_idx}"))?;
        compare(&format!("{case} latents after step {step_idx}"), actual, expected)?;
    }
    compare(&format!("{case} final latents"), &generated.latents, &latents["final"])?;

    let image = read(case, "image.safetensors")?;
    compare(&format!("{case} decoded image"), &generated.images, &image["decoded"])?;
    let pixels: Vec<u8> = generated.pixels.flatten_all()?.to_vec1()?;
    let expected: Vec<u8> = image["uint8"].flatten_all()?.to_vec1()?;
    assert_eq!(generated.pixels.dims(), image["uint8"].dims(), "{case}: image shape");
    let differing = pixels.iter().zip(&expected).filter(|(a, e)| a != e).count();
    let worst = pixels.iter().zip(&expected).map(|(a, e)| a.abs_diff(*e)).max().unwrap_or(0);
    println!("{case}: {differing} of {} pixel values differ, by at most {worst}", pixels.len());
    assert!(worst <= 1 && differing * 200 <= pixels.len(), "{case}: pixels differ too much");

    // The same run under the pipeline's tightest exact budget, the largest of the stages' exact
    // minimums (each stage's plan at prefetch depth 1, from the headers alone), is bit-identical,
    // latents and image: the binding stage runs at its minimum, and every stage under one budget.
    let (folder, request, settings, _) = setup(case, Policy::Budget { budget_bytes: u64::MAX, prefetch: 1 })?;
    let stages = plan_stages(&folder, &request, &settings)?;
    let minimum = stages.iter().map(|stage| stage.exact_minimum_budget).max().context("no stage")?;
    let binding: Vec<&str> =
        stages.iter().filter(|stage| stage.exact_minimum_budget == minimum).map(|stage| stage.stage.as_str()).collect();
    println!("{case}: every stage under {minimum} bytes, the minimum of {binding:?}");
    let streamed = run(case, Policy::Budget { budget_bytes: minimum, prefetch: 1 })?;
    ensure_bit_identical(
        &format!("{case}: under the budget vs resident latents"),
        &streamed.generated.latents,
        &generated.latents,
    )?;
    ensure_bit_identical(
        &format!("{case}: under the budget vs resident image"),
        &streamed.generated.images,
        &generated.images,
    )?;
    // And with every layer of every stage streamed (text encoders and transformer), the same.
    let streamed = run(case, Policy::Stream { prefetch: 1 })?;
    ensure_bit_identical(
        &format!("{case}: streamed vs resident latents"),
        &streamed.generated.latents,
        &generated.latents,
    )?;
    ensure_bit_identical(
        &format!("{case}: streamed vs resident image"),
        &streamed.generated.images,
        &generated.images,
    )?;
    Ok(())
}

#[test]
fn full_unipc_with_guidance() -> Result<()> {
    check("full")
}

#[test]
fn dev_flash_euler() -> Result<()> {
    check("dev")
}

#[test]
fn fast_flash_euler_non_square_rescaled() -> Result<()> {
    check("fast")
}
