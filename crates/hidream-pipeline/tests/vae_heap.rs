//! The VAE decode's memory model against the heap the counting allocator measures: for tiny VAEs
//! at a few sizes, unchunked and chunked, tiled, sliced, the measured peak is at most the
//! estimate, and the estimate at most [`FACTOR`] × the measured peak. One test in its own binary,
//! so that no other test allocates in between.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Result, ensure};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use hidream_memory::CountingAllocator;
use hidream_pipeline::vae::{DecodeEstimate, DecodeOptions, LatentSize, Tiling, VaeConfig, VaeDecoder};

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// How far above the measured peak the estimate may be (it was at most 1.2× when measured).
const FACTOR: f64 = 1.25;

/// The golden test's tiny Flux-layout VAE (channels 16, 16, 32, 32), its weights from disk.
fn golden_vae() -> Result<VaeDecoder> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/vae/model");
    Ok(VaeDecoder::load(&dir, DType::F32, &Device::Cpu)?)
}

/// A second layout: three levels of 8 and 16 channels, one resnet fewer per block, a post-quant
/// conv; random weights. They are plain tensors, as a checkpoint's are: a `Var`'s results would
/// keep the graph of their inputs alive, which a loaded decoder never does.
fn other_vae() -> Result<VaeDecoder> {
    let config = VaeConfig {
        latent_channels: 4,
        block_out_channels: vec![8, 8, 16],
        layers_per_block: 1,
        norm_num_groups: 4,
        up_block_types: vec!["UpDecoderBlock2D".into(); 3],
        use_post_quant_conv: true,
        sample_size: 64,
        ..VaeConfig::flux()
    };
    let varmap = VarMap::new();
    VaeDecoder::new(config.clone(), VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("varmap poisoned"))?
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    Ok(VaeDecoder::new(config, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu))?)
}

/// gemm allocates an L2-sized packing slab per worker thread on its first use, kept for the
/// process's life; the estimate leaves it out, so a first decode allocates it before measuring.
fn warm_up(vae: &VaeDecoder) -> Result<()> {
    let latents = Tensor::zeros((1, vae.config().latent_channels, 8, 8), DType::F32, &Device::Cpu)?;
    vae.decode(&latents, &DecodeOptions::default())?;
    Ok(())
}

/// Decodes `[batch, C, height, width]` random latents with `options`; returns (measured, estimated).
fn check(vae: &VaeDecoder, latents: LatentSize, options: DecodeOptions) -> Result<(u64, DecodeEstimate)> {
    let config = vae.config();
    let shape = (latents.batch, config.latent_channels, latents.height, latents.width);
    let input = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?;
    let estimate = DecodeEstimate::new(config, latents, DType::F32, &options)?;
    CountingAllocator::reset_peak();
    let before = CountingAllocator::current_bytes();
    let images = vae.decode(&input, &options)?;
    let measured = CountingAllocator::peak_bytes() - before;
    drop(images);
    let ratio = estimate.activations as f64 / measured as f64;
    println!(
        "{shape:?} {options:?}: measured {measured}, estimated {} ({ratio:.3}x; scores {}, feature maps {})",
        estimate.activations, estimate.attention_scores, estimate.feature_maps
    );
    ensure!(measured <= estimate.activations, "{shape:?} {options:?}: measured {measured} > estimate {estimate:?}");
    ensure!(ratio <= FACTOR, "{shape:?} {options:?}: estimate {ratio:.3}x the measured {measured}");
    Ok((measured, estimate))
}

#[test]
fn decode_heap_is_within_the_estimate() -> Result<()> {
    let size = |batch, height, width| LatentSize { batch, height, width };
    let chunked = |chunk| DecodeOptions { attention_chunk: Some(chunk), ..DecodeOptions::default() };
    let tiled = DecodeOptions { tiling: Some(Tiling { tile_latent_size: 16, overlap_factor: 0.25 }), ..chunked(64) };
    let sliced = DecodeOptions { slicing: true, ..DecodeOptions::default() };

    let before = CountingAllocator::current_bytes();
    let vae = golden_vae()?;
    let loaded = CountingAllocator::current_bytes() - before;
    let weights = vae.config().weight_bytes(DType::F32);
    println!("golden VAE: loaded {loaded} heap bytes, weights {weights}");
    ensure!(loaded >= weights, "loading allocated {loaded} bytes, less than the weights' {weights}");
    warm_up(&vae)?;

    for (latents, options) in [
        (size(1, 32, 32), DecodeOptions::default()),
        (size(1, 64, 64), DecodeOptions::default()),
        (size(1, 64, 48), chunked(100)),
        (size(1, 64, 64), chunked(256)),
        (size(2, 32, 32), DecodeOptions::default()),
        (size(2, 32, 32), sliced),
        (size(1, 64, 64), tiled),
        (size(2, 40, 24), tiled),
    ] {
        check(&vae, latents, options)?;
    }
    let vae = other_vae()?;
    warm_up(&vae)?;
    for (latents, options) in
        [(size(1, 64, 64), DecodeOptions::default()), (size(1, 64, 64), chunked(512)), (size(3, 32, 32), sliced)]
    {
        check(&vae, latents, options)?;
    }
    Ok(())
}
