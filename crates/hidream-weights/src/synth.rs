//! Synthetic checkpoints: every tensor of the size model, drawn as diffusers initialises it, and
//! written in diffusers' layout one tensor at a time, so that even the 34 GB preset streams.
//!
//! The output folder holds `config.json`, and either `diffusion_pytorch_model.safetensors` (when
//! everything fits in one shard, as diffusers' `save_pretrained` does) or the shards
//! `diffusion_pytorch_model-0000i-of-0000N.safetensors` with their
//! `diffusion_pytorch_model.safetensors.index.json`. diffusers' `from_pretrained` loads both.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use hidream_config::{DType, Init, SizeModel, TensorSpec, TransformerConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Normal, Uniform};
use safetensors::tensor::View;

use crate::checkpoint::{CONFIG_FILE, INDEX_FILE, SINGLE_FILE};
use crate::error::io_error;
use crate::{Result, WeightsError};

/// The key added to a synthetic checkpoint's `config.json`. diffusers ignores keys that start
/// with `_`; this crate uses it to recognise a folder it may overwrite.
const SYNTHETIC_MARKER: &str = "_hidream_rs_synthetic";

/// How to write a synthetic checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynthOptions {
    /// The seed of every value; each tensor draws from its own stream, derived from the seed and
    /// the tensor's name, so values do not depend on the shard layout.
    pub seed: u64,
    /// The storage dtype; values are drawn in f32 and rounded to it.
    pub dtype: DType,
    /// The most bytes of tensor data in one shard; a tensor larger than this gets a shard of its
    /// own. Must be positive.
    pub max_shard_bytes: u64,
}

impl Default for SynthOptions {
    /// Seed 0, bf16, and 5 GB shards, like the published HiDream-I1 transformer.
    fn default() -> Self {
        SynthOptions { seed: 0, dtype: DType::BF16, max_shard_bytes: 5_000_000_000 }
    }
}

/// What [`write_synthetic`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SynthSummary {
    /// The checkpoint folder.
    pub dir: PathBuf,
    /// The safetensors files, in order, under `dir`.
    pub shards: Vec<PathBuf>,
    pub n_tensors: usize,
    /// Bytes of tensor data, without headers (the index's `total_size`).
    pub total_bytes: u64,
}

/// Writes a synthetic checkpoint of `config` into the folder `dir`.
///
/// Nothing is half-written: the files go to a sibling folder `<dir>.partial-<pid>` that is renamed
/// into place at the end. `dir` may be missing, empty, or a previous synthetic checkpoint (its
/// `config.json` carries a `_hidream_rs_synthetic` key), which is replaced. Any other existing
/// `dir` is refused with [`WeightsError::WouldOverwrite`].
pub fn write_synthetic(dir: &Path, config: &TransformerConfig, options: &SynthOptions) -> Result<SynthSummary> {
    config.validate()?;
    if options.max_shard_bytes == 0 {
        return Err(WeightsError::InvalidOption { what: "max_shard_bytes", problem: "must be positive".into() });
    }
    check_target(dir)?;
    let partial = sibling(dir, "partial")?;
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(io_error(&partial))?;
    }
    std::fs::create_dir_all(&partial).map_err(io_error(&partial))?;
    let written = write_into(&partial, config, options).and_then(|summary| {
        replace_dir(dir, &partial)?;
        Ok(summary)
    });
    let summary = match written {
        Ok(summary) => summary,
        Err(err) => {
            // Best effort: the error that matters is the one that stopped the writing.
            let _ = std::fs::remove_dir_all(&partial);
            return Err(err);
        }
    };
    let shards = summary.shards.iter().map(|name| dir.join(name)).collect();
    Ok(SynthSummary { dir: dir.to_owned(), shards, ..summary })
}

/// Writes every file into `dir`; the summary's shards are bare file names.
fn write_into(dir: &Path, config: &TransformerConfig, options: &SynthOptions) -> Result<SynthSummary> {
    write_config(&dir.join(CONFIG_FILE), config, options)?;
    let sizes = SizeModel::new(config);
    let specs: Vec<&TensorSpec> = sizes.all_tensors().collect();
    let element_bytes = options.dtype.size_in_bytes() as u64;
    let shards = plan_shards(&specs, element_bytes, options.max_shard_bytes);
    let n_shards = shards.len();
    let names: Vec<String> = if n_shards == 1 {
        vec![SINGLE_FILE.to_owned()]
    } else {
        (1..=n_shards).map(|idx| format!("diffusion_pytorch_model-{idx:05}-of-{n_shards:05}.safetensors")).collect()
    };

    let mut weight_map = BTreeMap::new();
    for (shard, name) in shards.iter().zip(&names) {
        let path = dir.join(name);
        let tensors = shard
            .iter()
            .map(|spec| Ok((spec.name.clone(), SynthTensor::new(spec, options)?)))
            .collect::<Result<Vec<_>>>()?;
        let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        // Not through `write_atomic`: a shard streams tensors drawn on demand, which only
        // safetensors' own file writer does; it is atomic in the same way (a `NamedTempFile` in
        // the shard's folder, persisted once written).
        safetensors::serialize_to_file(tensors, Some(metadata), &path)
            .map_err(|source| WeightsError::Safetensors { file: path.clone(), source })?;
        weight_map.extend(shard.iter().map(|spec| (spec.name.clone(), name.clone())));
    }

    let total_bytes = specs.iter().map(|spec| spec.numel() as u64 * element_bytes).sum();
    if n_shards > 1 {
        let index = serde_json::json!({ "metadata": { "total_size": total_bytes }, "weight_map": weight_map });
        write_json(&dir.join(INDEX_FILE), &index)?;
    }
    Ok(SynthSummary {
        dir: dir.to_owned(),
        shards: names.into_iter().map(PathBuf::from).collect(),
        n_tensors: specs.len(),
        total_bytes,
    })
}

/// Splits the tensors, in order, into shards of at most `max_bytes` (a larger tensor goes alone).
fn plan_shards<'a>(specs: &[&'a TensorSpec], element_bytes: u64, max_bytes: u64) -> Vec<Vec<&'a TensorSpec>> {
    let mut shards: Vec<Vec<&TensorSpec>> = vec![Vec::new()];
    let mut shard_bytes = 0u64;
    for spec in specs {
        let bytes = spec.numel() as u64 * element_bytes;
        if shard_bytes.saturating_add(bytes) > max_bytes && shard_bytes > 0 {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += bytes;
        if let Some(shard) = shards.last_mut() {
            shard.push(spec);
        }
    }
    shards
}

/// diffusers' `config.json` of `config`, with our marker and how the values were drawn.
fn write_config(path: &Path, config: &TransformerConfig, options: &SynthOptions) -> Result<()> {
    let mut value: serde_json::Value = serde_json::from_str(&config.to_diffusers_json())
        .map_err(|err| WeightsError::InvalidOption { what: "config", problem: err.to_string() })?;
    if let Some(map) = value.as_object_mut() {
        let marker = serde_json::json!({ "seed": options.seed, "dtype": options.dtype.as_str() });
        map.insert(SYNTHETIC_MARKER.to_owned(), marker);
    }
    write_json(path, &value)
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|err| WeightsError::InvalidOption { what: "json", problem: err.to_string() })?;
    crate::write_atomic(path, |writer| writeln!(writer, "{text}"))
}

/// Refuses a `dir` that exists and is neither empty nor a synthetic checkpoint.
fn check_target(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    if !dir.is_dir() {
        return Err(WeightsError::WouldOverwrite { dir: dir.to_owned() });
    }
    let is_empty = std::fs::read_dir(dir).map_err(io_error(dir))?.next().is_none();
    if is_empty || is_synthetic(dir) { Ok(()) } else { Err(WeightsError::WouldOverwrite { dir: dir.to_owned() }) }
}

fn is_synthetic(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(CONFIG_FILE)) else { return false };
    serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|value| value.get(SYNTHETIC_MARKER).is_some())
}

/// Moves the finished `partial` folder to `dir`, replacing an existing `dir`.
fn replace_dir(dir: &Path, partial: &Path) -> Result<()> {
    if !dir.exists() {
        return std::fs::rename(partial, dir).map_err(io_error(dir));
    }
    let old = sibling(dir, "old")?;
    std::fs::rename(dir, &old).map_err(io_error(dir))?;
    if let Err(err) = std::fs::rename(partial, dir) {
        let _ = std::fs::rename(&old, dir);
        return Err(io_error(dir)(err));
    }
    std::fs::remove_dir_all(&old).map_err(io_error(&old))
}

/// `<dir>.<tag>-<pid>`, beside `dir`.
fn sibling(dir: &Path, tag: &str) -> Result<PathBuf> {
    let name = dir.file_name().ok_or_else(|| WeightsError::InvalidOption {
        what: "output folder",
        problem: format!("{} does not end in a folder name", dir.display()),
    })?;
    Ok(dir.with_file_name(format!("{}.{tag}-{}", name.to_string_lossy(), std::process::id())))
}

/// A random-number stream of its own for every `name` (a tensor or an input), so that what is
/// drawn for one name depends neither on the others nor on the order of drawing. The stream is a
/// `StdRng` seeded with FNV-1a of `seed` and `name`; `StdRng` is stable within a `rand` version.
pub(crate) fn named_rng(seed: u64, name: &str) -> StdRng {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = seed.to_le_bytes().into_iter().chain(name.bytes());
    let hash = bytes.fold(FNV_OFFSET, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME));
    StdRng::seed_from_u64(hash)
}

/// A tensor whose bytes are drawn only when the serializer asks for them.
struct SynthTensor {
    shape: Vec<usize>,
    dtype: DType,
    values: Values,
    rng: StdRng,
}

enum Values {
    Uniform(Uniform<f32>),
    Normal(Normal<f32>),
    Ones,
}

impl SynthTensor {
    fn new(spec: &TensorSpec, options: &SynthOptions) -> Result<Self> {
        let invalid = |problem: String| WeightsError::InvalidOption { what: "tensor init", problem };
        let values = match spec.init {
            Init::Uniform { bound } => Values::Uniform(
                Uniform::new_inclusive(-bound as f32, bound as f32)
                    .map_err(|err| invalid(format!("{}: U(±{bound}): {err}", spec.name)))?,
            ),
            Init::Normal { std } => Values::Normal(
                Normal::new(0.0, std as f32).map_err(|err| invalid(format!("{}: N(0, {std}): {err}", spec.name)))?,
            ),
            Init::Ones => Values::Ones,
        };
        let rng = named_rng(options.seed, &spec.name);
        Ok(SynthTensor { shape: spec.shape.clone(), dtype: options.dtype, values, rng })
    }

    fn next_value(&self, rng: &mut StdRng) -> f32 {
        match &self.values {
            Values::Uniform(uniform) => uniform.sample(rng),
            Values::Normal(normal) => normal.sample(rng),
            Values::Ones => 1.0,
        }
    }
}

impl View for SynthTensor {
    fn dtype(&self) -> safetensors::Dtype {
        match self.dtype {
            DType::F32 => safetensors::Dtype::F32,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let n_elements: usize = self.shape.iter().product();
        let mut rng = self.rng.clone();
        let mut bytes = Vec::with_capacity(self.data_len());
        for _ in 0..n_elements {
            let value = self.next_value(&mut rng);
            match self.dtype {
                DType::F32 => bytes.extend_from_slice(&value.to_le_bytes()),
                DType::F16 => bytes.extend_from_slice(&half::f16::from_f32(value).to_le_bytes()),
                DType::BF16 => bytes.extend_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
            }
        }
        Cow::Owned(bytes)
    }

    fn data_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size_in_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_respect_the_limit_and_keep_the_order() {
        let spec = |name: &str, numel: usize| TensorSpec {
            name: name.into(),
            shape: vec![numel],
            init: Init::Ones,
            is_modulation: false,
        };
        let specs = [spec("a", 3), spec("b", 3), spec("c", 10), spec("d", 1), spec("e", 4)];
        let refs: Vec<&TensorSpec> = specs.iter().collect();
        let check = |max_bytes: u64, expected: &[&[&str]]| {
            let shards = plan_shards(&refs, 1, max_bytes);
            let names: Vec<Vec<&str>> = shards.iter().map(|s| s.iter().map(|t| t.name.as_str()).collect()).collect();
            assert_eq!(names, expected, "max_bytes {max_bytes}");
        };
        check(6, &[&["a", "b"], &["c"], &["d", "e"]]);
        check(100, &[&["a", "b", "c", "d", "e"]]);
        check(1, &[&["a"], &["b"], &["c"], &["d"], &["e"]]);
    }

    #[test]
    fn named_streams_are_independent_of_each_other() {
        use rand::Rng;
        let draw = |seed, name| named_rng(seed, name).random::<u64>();
        assert_eq!(draw(1, "a"), draw(1, "a"));
        assert_ne!(draw(1, "a"), draw(2, "a"));
        assert_ne!(draw(1, "a"), draw(1, "b"));
    }
}
