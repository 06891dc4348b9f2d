//! `hidream synth`: synthetic checkpoints and inputs, for tests and benchmarks without downloads.

use std::path::PathBuf;

use anyhow::{Result, bail};
use hidream_config::{SizeModel, TransformerConfig};
use hidream_weights::{InputSpec, SynthOptions};

#[derive(Debug, clap::Args)]
pub struct SynthArgs {
    /// `tiny` (tests), `small` (benchmarks) or `full` (the real architecture, 34 GB in bf16).
    #[arg(long, default_value = "small")]
    preset: String,
    /// Keep only D double and S single blocks of the preset (`--layers 4,4`): a full-width slice.
    #[arg(long, value_parser = parse_layers)]
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
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The most bytes in one shard (e.g. 2GiB); larger checkpoints are sharded with an index.
    #[arg(long, default_value = "5GB", value_parser = parse_size)]
    max_shard_size: u64,
    /// Inputs: batch size.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Inputs: latent size HxW in latent pixels (the image is 8x larger).
    #[arg(long, default_value = "32x32")]
    latent: String,
    /// Inputs: T5 tokens.
    #[arg(long, default_value_t = 128)]
    t5_tokens: usize,
    /// Inputs: Llama tokens.
    #[arg(long, default_value_t = 128)]
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
        println!(
            "wrote {} preset ({:.3}B parameters, {} tensors, {} bytes in {}) to {} in {} file(s)",
            args.preset,
            sizes.total_params() as f64 / 1e9,
            summary.n_tensors,
            summary.total_bytes,
            args.dtype,
            dir.display(),
            summary.shards.len()
        );
    }
    if let Some(path) = &args.inputs {
        let (height, width) = parse_latent(&args.latent)?;
        let spec = InputSpec {
            batch: args.batch,
            height,
            width,
            t5_tokens: args.t5_tokens,
            llama_tokens: args.llama_tokens,
            seed: args.seed,
        };
        let inputs = hidream_weights::synthetic_inputs(&config, &spec)?;
        hidream_weights::write_tensors(path, &inputs)?;
        println!("wrote inputs (batch {}, latent {height}x{width}) to {}", args.batch, path.display());
    }
    Ok(())
}

fn parse_latent(text: &str) -> Result<(usize, usize)> {
    let parsed = text.split_once(['x', 'X']).and_then(|(h, w)| Some((h.trim().parse().ok()?, w.trim().parse().ok()?)));
    match parsed {
        Some((height, width)) if height > 0 && width > 0 => Ok((height, width)),
        _ => bail!("--latent must be HxW in latent pixels, like 32x32; got `{text}`"),
    }
}

fn parse_layers(text: &str) -> Result<(usize, usize), String> {
    text.split_once(',')
        .and_then(|(double, single)| Some((double.trim().parse().ok()?, single.trim().parse().ok()?)))
        .ok_or_else(|| format!("expected D,S (double and single block counts), like 4,4; got `{text}`"))
}

fn parse_size(text: &str) -> Result<u64, String> {
    hidream_memory::parse_bytes(text).map_err(|err| err.to_string())
}
