//! `hidream synth`: synthetic checkpoints and inputs, for tests and benchmarks without downloads.

use std::path::PathBuf;

use anyhow::{Result, bail};
use hidream_config::{SizeModel, TransformerConfig};
use hidream_pipeline::planning::ImageSize;
use hidream_weights::{InputSpec, SynthOptions};

use crate::parse;

#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// `tiny` (tests), `small` (benchmarks) or `full` (the real architecture, 34 GB in bf16).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Keep only D double and S single blocks of the preset (`--layers 4,4`): a full-width slice.
    #[arg(long, value_parser = parse::layers, allow_hyphen_values = true)]
    layers: Option<(usize, usize)>,
    /// Write a checkpoint (config.json + safetensors, diffusers layout) into this folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write random forward inputs to this safetensors file.
    #[arg(long)]
    inputs: Option<PathBuf>,
    /// Storage dtype of the weights.
    #[arg(long, default_value = "bf16")]
    dtype: hidream_config::DType,
    /// Seeds every weight and input (0 to 2^64 − 1).
    #[arg(long, default_value_t = 0, value_parser = parse::seed, allow_negative_numbers = true)]
    seed: u64,
    /// The most bytes in one shard (e.g. 2GiB); larger checkpoints are sharded with an index.
    #[arg(long, default_value = "5GB", value_parser = parse::bytes, allow_negative_numbers = true)]
    max_shard_size: u64,
    /// Inputs: batch size.
    #[arg(long, default_value_t = 1, value_parser = parse::positive, allow_negative_numbers = true)]
    batch: usize,
    /// Inputs: latent size WIDTHxHEIGHT in latent pixels, width first as `generate --size` (the
    /// image is 8 times larger; `hidden_states` is [B, C, HEIGHT, WIDTH]); multiples of the patch size.
    #[arg(long, default_value = "32x32", value_parser = parse::latent_size, allow_hyphen_values = true)]
    latent: ImageSize,
    /// Inputs: T5 tokens.
    #[arg(long, default_value_t = 128, value_parser = parse::positive, allow_negative_numbers = true)]
    t5_tokens: usize,
    /// Inputs: Llama tokens.
    #[arg(long, default_value_t = 128, value_parser = parse::positive, allow_negative_numbers = true)]
    llama_tokens: usize,
}

pub fn run(args: &SynthArgs) -> Result<()> {
    if args.out.is_none() && args.inputs.is_none() {
        bail!("nothing to write: pass --out DIR for a checkpoint and/or --inputs FILE for inputs");
    }
    let mut config = TransformerConfig::preset(&args.preset)?;
    if let Some((num_layers, num_single_layers)) = args.layers {
        config = config.with_layers(num_layers, num_single_layers)?;
    }
    if let Some(dir) = &args.out {
        let sizes = SizeModel::new(&config);
        let options = SynthOptions { seed: args.seed, dtype: args.dtype, max_shard_bytes: args.max_shard_size };
        let summary = hidream_weights::write_synthetic(dir, &config, &options)?;
        outln!(
            "wrote {} preset ({:.3}B parameters, {} tensors, {} bytes in {}) to {} in {} file(s)",
            args.preset,
            sizes.total_params() as f64 / 1e9,
            summary.n_tensors,
            summary.total_bytes,
            args.dtype,
            dir.display(),
            summary.shards.len()
        )?;
    }
    if let Some(path) = &args.inputs {
        let spec = InputSpec {
            batch: args.batch,
            height: args.latent.height,
            width: args.latent.width,
            t5_tokens: args.t5_tokens,
            llama_tokens: args.llama_tokens,
            seed: args.seed,
        };
        let inputs = hidream_weights::synthetic_inputs(&config, &spec)?;
        hidream_weights::write_tensors(path, &inputs)?;
        outln!("wrote inputs (batch {}, latent {} (width x height)) to {}", args.batch, args.latent, path.display())?;
    }
    Ok(())
}
