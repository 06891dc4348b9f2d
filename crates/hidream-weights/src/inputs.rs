//! Synthetic forward inputs (with the `synth` feature), and plain safetensors files of named
//! tensors (inputs, outputs and golden fixtures).

use std::collections::HashMap;
use std::path::Path;
#[cfg(feature = "synth")]
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
#[cfg(feature = "synth")]
use hidream_config::TransformerConfig;
#[cfg(feature = "synth")]
use rand::Rng;
#[cfg(feature = "synth")]
use rand::rngs::StdRng;
#[cfg(feature = "synth")]
use rand_distr::StandardNormal;
use safetensors::tensor::View;

#[cfg(feature = "synth")]
use crate::synth::named_rng;
use crate::{Checkpoint, Result, WeightsError, write_atomic};

/// The sizes and seed of a synthetic transformer input.
#[cfg(feature = "synth")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputSpec {
    pub batch: usize,
    /// Latent height, in latent pixels; a multiple of the patch size.
    pub height: usize,
    /// Latent width, in latent pixels; a multiple of the patch size.
    pub width: usize,
    pub t5_tokens: usize,
    pub llama_tokens: usize,
    pub seed: u64,
}

/// Random f32 CPU inputs of a transformer forward, under diffusers' argument names:
/// - `hidden_states` `[B, in_channels, H, W]`, N(0, 1);
/// - `timesteps` `[B]`, uniform in [0, 1000);
/// - `encoder_hidden_states_t5` `[B, S_t5, C_t5]`, N(0, 1);
/// - `encoder_hidden_states_llama3` `[n_llama_layers_needed, B, S_llama, C_llama]`, N(0, 1);
/// - `pooled_embeds` `[B, text_emb_dim]`, N(0, 1).
///
/// Each input draws from its own stream of `spec.seed`, so it depends only on its own sizes.
#[cfg(feature = "synth")]
pub fn synthetic_inputs(config: &TransformerConfig, spec: &InputSpec) -> Result<HashMap<String, Tensor>> {
    config.validate()?;
    let sizes = [
        ("batch", spec.batch),
        ("height", spec.height),
        ("width", spec.width),
        ("t5_tokens", spec.t5_tokens),
        ("llama_tokens", spec.llama_tokens),
    ];
    for (what, size) in sizes {
        if size == 0 {
            return Err(WeightsError::InvalidOption { what, problem: "must be positive".into() });
        }
    }
    for (what, size) in [("height", spec.height), ("width", spec.width)] {
        if size % config.patch_size != 0 {
            let problem = format!("{size} is not a multiple of the patch size {}", config.patch_size);
            return Err(WeightsError::InvalidOption { what, problem });
        }
    }
    let batch = spec.batch;
    let normal = |rng: &mut StdRng| rng.sample::<f32, _>(StandardNormal);
    let inputs = [
        draw(spec.seed, "hidden_states", &[batch, config.in_channels, spec.height, spec.width], normal)?,
        draw(spec.seed, "timesteps", &[batch], |rng| rng.random_range(0.0..1000.0))?,
        draw(spec.seed, "encoder_hidden_states_t5", &[batch, spec.t5_tokens, config.t5_channels()], normal)?,
        draw(
            spec.seed,
            "encoder_hidden_states_llama3",
            &[config.n_llama_layers_needed(), batch, spec.llama_tokens, config.llama_channels()],
            normal,
        )?,
        draw(spec.seed, "pooled_embeds", &[batch, config.text_emb_dim], normal)?,
    ];
    Ok(inputs.into_iter().collect())
}

/// Writes named tensors (any device; F32, F16, BF16 or F64) to one safetensors file. The file
/// appears whole or not at all ([`write_atomic`]): a failed write leaves no stray file and an
/// existing file as it was.
pub fn write_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, tensor)| Ok((name.clone(), HostTensor::new(path, name, tensor)?)))
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::serialize(views, None)
        .map_err(|source| WeightsError::Safetensors { file: path.to_owned(), source })?;
    write_atomic(path, |writer| writer.write_all(&bytes))
}

/// Reads every tensor of one safetensors file onto `device`, each in the dtype it is stored in
/// (floats, and the integer dtypes u8, u32 and i64 of token ids and pixels).
/// A malformed file is a typed error, as for [`Checkpoint::open`].
pub fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let file = Checkpoint::open_file(path)?;
    file.tensor_names().map(|name| Ok((name.to_owned(), file.load_as_stored(name, device)?))).collect()
}

/// One named tensor of `n_elements = shape.product()` values drawn from `sample`.
#[cfg(feature = "synth")]
fn draw(seed: u64, name: &str, shape: &[usize], sample: impl Fn(&mut StdRng) -> f32) -> Result<(String, Tensor)> {
    let n_elements = shape.iter().try_fold(1usize, |acc, dim| acc.checked_mul(*dim)).ok_or_else(|| {
        WeightsError::InvalidOption { what: "input size", problem: format!("{name} {shape:?} is too large") }
    })?;
    let mut rng = named_rng(seed, name);
    // A size the machine cannot hold is an error here rather than an abort in the allocator.
    let mut values: Vec<f32> = Vec::new();
    values.try_reserve_exact(n_elements).map_err(|_| WeightsError::InvalidOption {
        what: "input size",
        problem: format!(
            "{name} {shape:?} needs {} bytes of f32, more than this machine can allocate; ask for fewer tokens, \
             a smaller latent or a smaller batch",
            n_elements.saturating_mul(4)
        ),
    })?;
    values.extend((0..n_elements).map(|_| sample(&mut rng)));
    let tensor = Tensor::from_vec(values, shape, &Device::Cpu).map_err(|source| WeightsError::Candle {
        file: PathBuf::from("(synthetic inputs)"),
        tensor: name.to_owned(),
        source: Box::new(source),
    })?;
    Ok((name.to_owned(), tensor))
}

/// A tensor copied to host memory as little-endian bytes, ready to serialize.
struct HostTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl HostTensor {
    fn new(file: &Path, name: &str, tensor: &Tensor) -> Result<Self> {
        let candle_error =
            |source| WeightsError::Candle { file: file.to_owned(), tensor: name.to_owned(), source: Box::new(source) };
        let flat = tensor.flatten_all().map_err(candle_error)?;
        let bytes = match tensor.dtype() {
            DType::F32 => flat.to_vec1::<f32>().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            DType::F16 => flat.to_vec1::<half::f16>().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            DType::BF16 => flat.to_vec1::<half::bf16>().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            DType::F64 => flat.to_vec1::<f64>().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            DType::U8 => flat.to_vec1::<u8>(),
            DType::U32 => flat.to_vec1::<u32>().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            DType::I64 => flat.to_vec1::<i64>().map(|v| v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            other => {
                let dtype = other.into();
                return Err(WeightsError::UnsupportedDtype { file: file.to_owned(), tensor: name.to_owned(), dtype });
            }
        }
        .map_err(candle_error)?;
        Ok(HostTensor { dtype: tensor.dtype().into(), shape: tensor.dims().to_vec(), bytes })
    }
}

impl View for HostTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.bytes)
    }

    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}
