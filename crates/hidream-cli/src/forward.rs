//! `hidream forward`: one transformer forward from a safetensors file of inputs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use hidream_config::SizeModel;
use hidream_model::{AttentionConfig, HiDreamModel, TransformerInputs};
use hidream_weights::Checkpoint;

#[derive(Debug, clap::Args)]
pub struct ForwardArgs {
    /// The transformer checkpoint: a diffusers `transformer/` folder, or a model folder holding one.
    #[arg(long)]
    model: PathBuf,
    /// Safetensors file with `hidden_states`, `timesteps`, `encoder_hidden_states_t5`,
    /// `encoder_hidden_states_llama3` and `pooled_embeds`.
    #[arg(long)]
    inputs: PathBuf,
    /// Where to write `sample` (f32).
    #[arg(long)]
    out: PathBuf,
    /// Compute dtype; weights are converted to it as they load.
    #[arg(long, default_value = "f32")]
    dtype: hidream_config::DType,
    /// Evaluate attention in chunks of this many queries (bounds the score matrix).
    #[arg(long)]
    attention_chunk: Option<usize>,
    /// Run the forward this many times after one warm-up run, and report each time (benchmarks).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Write a JSON report (timings, shapes) here.
    #[arg(long)]
    report: Option<PathBuf>,
}

/// The input names, in diffusers' forward order.
const INPUT_NAMES: [&str; 5] =
    ["hidden_states", "timesteps", "encoder_hidden_states_t5", "encoder_hidden_states_llama3", "pooled_embeds"];

pub fn run(args: &ForwardArgs) -> Result<()> {
    let device = Device::Cpu;
    let dtype = candle_dtype(args.dtype);
    let started = Instant::now();
    let checkpoint = Checkpoint::open(&args.model)?;
    let cfg = checkpoint.config()?;
    checkpoint.validate(&SizeModel::new(&cfg))?;
    let inputs = read_inputs(&args.inputs, &device)?;
    let mut model = HiDreamModel::new(&cfg, &checkpoint.var_builder(dtype, &device))?;
    model.transformer_mut().set_attention(AttentionConfig { query_chunk: args.attention_chunk });
    let loaded = started.elapsed();

    if args.repeat == 0 {
        bail!("--repeat must be at least 1");
    }
    let warm_up = usize::from(args.repeat > 1);
    let mut seconds = Vec::with_capacity(args.repeat);
    let mut sample = None;
    for _ in 0..args.repeat + warm_up {
        let forward_started = Instant::now();
        sample = Some(model.forward(&inputs)?.to_dtype(DType::F32)?);
        seconds.push(forward_started.elapsed().as_secs_f64());
    }
    let seconds = seconds.split_off(warm_up);
    let sample = sample.context("no forward ran")?;
    let dims = sample.dims().to_vec();
    hidream_weights::write_tensors(&args.out, &HashMap::from([("sample".to_owned(), sample)]))?;
    let median = median(&seconds);
    println!(
        "sample {dims:?} {} -> {} (load {:.3} s, forward {median:.3} s{})",
        args.dtype,
        args.out.display(),
        loaded.as_secs_f64(),
        if seconds.len() > 1 { format!(", median of {}", seconds.len()) } else { String::new() }
    );
    if let Some(path) = &args.report {
        let report = serde_json::json!({
            "dtype": args.dtype.as_str(),
            "shape": dims,
            "load_seconds": loaded.as_secs_f64(),
            "seconds": seconds,
            "median_seconds": median,
        });
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing report {}", path.display()))?;
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Reads the five forward inputs, as f32, naming any that is missing.
fn read_inputs(path: &std::path::Path, device: &Device) -> Result<TransformerInputs> {
    let mut tensors = hidream_weights::read_tensors(path, device)?;
    let mut take = |name: &str| -> Result<Tensor> {
        let Some(tensor) = tensors.remove(name) else {
            bail!("{} has no tensor `{name}`; a forward needs {}", path.display(), INPUT_NAMES.join(", "));
        };
        tensor.to_dtype(DType::F32).with_context(|| format!("converting `{name}` to f32"))
    };
    Ok(TransformerInputs {
        hidden_states: take(INPUT_NAMES[0])?,
        timesteps: take(INPUT_NAMES[1])?,
        encoder_hidden_states_t5: take(INPUT_NAMES[2])?,
        encoder_hidden_states_llama3: take(INPUT_NAMES[3])?,
        pooled_embeds: take(INPUT_NAMES[4])?,
    })
}

/// The candle dtype of a config dtype.
pub fn candle_dtype(dtype: hidream_config::DType) -> DType {
    match dtype {
        hidream_config::DType::F32 => DType::F32,
        hidream_config::DType::F16 => DType::F16,
        hidream_config::DType::BF16 => DType::BF16,
    }
}
