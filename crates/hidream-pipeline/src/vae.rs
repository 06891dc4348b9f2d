//! The VAE decode stage: the Flux 16-channel `AutoencoderKL` decoder (HiDream-I1 ships the FLUX.1
//! VAE), from transformer-space latents to images in [-1, 1], with diffusers' tiling and slicing,
//! and diffusers' uint8 postprocess.
//!
//! Its memory model (`memory.rs`) predicts the decode's weights and heap peak from the config and
//! picks the decode options under a budget.
//!
//! It loads a diffusers `vae/` folder (`config.json` + `diffusion_pytorch_model.safetensors`, or a
//! pipeline root holding `vae/`) with diffusers' key names. Only the decoder's weights are read.
//!
//! ```no_run
//! # fn main() -> hidream_pipeline::Result<()> {
//! use candle_core::{DType, Device, Tensor};
//! use hidream_pipeline::vae::{DecodeOptions, VaeDecoder, postprocess};
//!
//! let vae = VaeDecoder::load(std::path::Path::new("HiDream-I1-Full/vae"), DType::BF16, &Device::Cpu)?;
//! let latents = Tensor::zeros((1, 16, 128, 128), DType::BF16, &Device::Cpu)?;
//! let options = DecodeOptions { tiling: Some(vae.config().default_tiling()), slicing: true, attention_chunk: None };
//! let images = vae.decode(&latents, &options)?; // [1, 3, 1024, 1024] in [-1, 1]
//! let pixels = postprocess(&images)?; // u8 [1, 1024, 1024, 3] on the CPU
//! # Ok(()) }
//! ```

mod decoder;
mod memory;
mod mid_block;
mod tiling;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2d, VarBuilder};
use serde::Deserialize;

use crate::{PipelineError, Result};
use decoder::Decoder;
use tiling::{TilePlan, opmath_dtype, tiled_decode};

pub use memory::{DecodeChoice, DecodeEstimate, LatentSize};
pub use tiling::Tiling;

/// The config file of a diffusers model folder.
const CONFIG_FILE: &str = "config.json";
/// The weights file of a diffusers model folder saved in one file.
const WEIGHTS_FILE: &str = "diffusion_pytorch_model.safetensors";
/// The weights index of a diffusers model folder saved in shards.
const INDEX_FILE: &str = "diffusion_pytorch_model.safetensors.index.json";
/// The VAE subfolder of a diffusers pipeline root.
const VAE_DIR: &str = "vae";

/// The decoder's part of diffusers' `AutoencoderKL` config (`vae/config.json`).
///
/// Defaults are `AutoencoderKL.__init__`'s (diffusers 0.42.1, `autoencoder_kl.py`), so a config
/// that omits a key means what it means to diffusers. Encoder-only keys are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "defaults::out_channels")]
    pub out_channels: usize,
    #[serde(default = "defaults::latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "defaults::block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "defaults::layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "defaults::norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "defaults::act_fn")]
    pub act_fn: String,
    #[serde(default = "defaults::up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "defaults::yes")]
    pub mid_block_add_attention: bool,
    #[serde(default = "defaults::yes")]
    pub use_post_quant_conv: bool,
    /// The image side the VAE was trained on; diffusers derives its default tile size from it.
    /// diffusers accepts an int or a list (and then uses the first element).
    #[serde(default = "defaults::sample_size", deserialize_with = "defaults::int_or_first")]
    pub sample_size: usize,
    /// The denoiser works on `vae_latents · scaling_factor`-like latents; see [`VaeDecoder::decode`].
    #[serde(default = "defaults::scaling_factor")]
    pub scaling_factor: f64,
    /// Flux's offset; `None` (as in Stable Diffusion VAEs) means 0.
    #[serde(default)]
    pub shift_factor: Option<f64>,
}

impl VaeConfig {
    /// The FLUX.1 VAE, which HiDream-I1 ships unchanged (black-forest-labs/FLUX.1-dev,
    /// `vae/config.json`; HiDream-ai/HiDream-I1-Full, `vae/config.json`).
    pub fn flux() -> Self {
        Self {
            out_channels: 3,
            latent_channels: 16,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            act_fn: "silu".into(),
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            mid_block_add_attention: true,
            use_post_quant_conv: false,
            sample_size: 1024,
            scaling_factor: 0.3611,
            shift_factor: Some(0.1159),
        }
    }

    /// Reads and validates a `config.json`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| PipelineError::Io { path: path.into(), source })?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|err| PipelineError::invalid(path.display().to_string(), format!("not a VAE config: {err}")))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that the config describes a decoder this module builds.
    pub fn validate(&self) -> Result<()> {
        let invalid = |problem: String| Err(PipelineError::invalid("vae config", problem));
        if self.block_out_channels.is_empty() {
            return invalid("block_out_channels is empty".into());
        }
        if self.norm_num_groups == 0 || self.block_out_channels.iter().any(|c| c % self.norm_num_groups != 0) {
            return invalid(format!(
                "norm_num_groups {} does not divide every block_out_channels {:?}",
                self.norm_num_groups, self.block_out_channels
            ));
        }
        if self.latent_channels == 0 || self.out_channels == 0 {
            return invalid("latent_channels and out_channels must be positive".into());
        }
        if self.up_block_types.len() != self.block_out_channels.len()
            || self.up_block_types.iter().any(|kind| kind != "UpDecoderBlock2D")
        {
            return invalid(format!(
                "up_block_types {:?}: only one UpDecoderBlock2D per block_out_channels entry is supported",
                self.up_block_types
            ));
        }
        if self.act_fn != "silu" {
            return invalid(format!("act_fn {:?}: only \"silu\" is supported", self.act_fn));
        }
        if !self.mid_block_add_attention {
            return invalid("mid_block_add_attention = false is not supported".into());
        }
        if !self.scaling_factor.is_finite() || self.scaling_factor == 0.0 {
            return invalid(format!("scaling_factor {} is not a finite non-zero number", self.scaling_factor));
        }
        if self.block_out_channels.len() > 16 {
            return invalid(format!("{} blocks is not a plausible VAE", self.block_out_channels.len()));
        }
        Ok(())
    }

    /// How many image pixels one latent pixel becomes: 2^(levels − 1), 8 for Flux (diffusers'
    /// `vae_scale_factor`).
    pub fn upscale(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// diffusers' tiling after `enable_tiling()`: image tiles of `sample_size`, latent tiles of
    /// `int(sample_size / upscale)` (128 for Flux), overlap 0.25.
    pub fn default_tiling(&self) -> Tiling {
        Tiling { tile_latent_size: self.sample_size / self.upscale(), overlap_factor: Tiling::DIFFUSERS_OVERLAP }
    }
}

/// How [`VaeDecoder::decode`] spends memory; the default decodes the whole batch at once.
///
/// [`DecodeEstimate::new`] predicts a decode's heap peak under these options from the config
/// alone, and [`DecodeOptions::for_budget`] picks them under a memory budget (chunks first, then
/// slicing, then tiling). For the Flux decoder in f32, batch 1, it predicts 5.9 GB of activations
/// for a 1024² image, set by the last up block's 128- and 256-channel maps at full resolution
/// (peak RSS measured earlier: 0.42 GiB for 256², 1.5 GiB for 512²). Slicing holds one image's
/// activations at a time; 256-pixel tiles (`tile_latent_size` 32) kept a 512² decode at 0.43 GiB,
/// for twice the time.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecodeOptions {
    /// Decode in overlapping tiles (diffusers' `enable_tiling()`). The result differs from an
    /// untiled decode, by design; see [`Tiling`].
    pub tiling: Option<Tiling>,
    /// Decode one image of the batch at a time (diffusers' `enable_slicing()`). On the CPU the
    /// result is bit-identical to a batched decode.
    pub slicing: bool,
    /// Evaluate the mid block's attention (over every latent position) in chunks of this many
    /// query positions, so that its f32 score matrix is `[chunk, positions]` instead of
    /// `[positions, positions]` (1 GiB at 1024², and the softmax holds three more of its size).
    /// Unlike tiling this computes the same function: the result is within a few f32 ulps of the
    /// unchunked decode, and on the CPU bit-identical at chunks of a few hundred queries or more
    /// (gemm rounds its small-matrix paths differently; see the golden test). `None` or 0:
    /// unchunked.
    pub attention_chunk: Option<usize>,
}

/// The `AutoencoderKL` decoder, loaded.
#[derive(Debug)]
pub struct VaeDecoder {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    dtype: DType,
}

impl VaeDecoder {
    /// Loads the decoder from a diffusers `vae/` folder, or from a pipeline root holding `vae/`,
    /// into `dtype` on `device`. The weights are memory-mapped and only `decoder.*` (and
    /// `post_quant_conv.*`, if the config has it) is read.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let dir = vae_dir(dir);
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.is_file() {
            return Err(PipelineError::MissingFile {
                path: config_path,
                hint:
                    "a diffusers AutoencoderKL folder (the `vae/` of the HiDream-I1 repository) holds its config.json"
                        .into(),
            });
        }
        let config = VaeConfig::read(&config_path)?;
        if !dir.join(WEIGHTS_FILE).is_file() && !dir.join(INDEX_FILE).is_file() {
            return Err(PipelineError::MissingFile {
                path: dir.join(WEIGHTS_FILE),
                hint: "the VAE weights belong beside its config.json".into(),
            });
        }
        let checkpoint = hidream_weights::Checkpoint::open(&dir)?;
        Self::new(config, checkpoint.var_builder(dtype, device))
    }

    /// Builds the decoder from `vb`, whose names are the checkpoint's (`decoder.conv_in.weight`, ...).
    ///
    /// bf16 is refused on the CPU: candle-core 0.11's CPU convolutions run a gemm that has no bf16
    /// kernel, so the first conv would fail. Use F32 there (F16 also runs).
    pub fn new(config: VaeConfig, vb: VarBuilder) -> Result<Self> {
        config.validate()?;
        let dtype = vb.dtype();
        if dtype == DType::BF16 && vb.device().is_cpu() {
            return Err(PipelineError::invalid(
                "vae dtype",
                "candle-core 0.11 has no bf16 convolution on the CPU; load the VAE in F32 (or F16) there",
            ));
        }
        let post_quant_conv = if config.use_post_quant_conv {
            let channels = config.latent_channels;
            Some(candle_nn::conv2d(channels, channels, 1, Default::default(), vb.pp("post_quant_conv"))?)
        } else {
            None
        };
        let decoder = Decoder::new(&config, vb.pp("decoder"))?;
        Ok(Self { config, post_quant_conv, decoder, dtype })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Decodes transformer-space latents `[B, latent_channels, h, w]` to images
    /// `[B, out_channels, h·upscale, w·upscale]` in (about) [-1, 1], in the decoder's dtype.
    ///
    /// It first undoes the denoiser's scaling as `HiDreamImagePipeline` does:
    /// `latents / scaling_factor + shift_factor`, each operation computed in f32 and rounded to the
    /// latents' dtype, as torch does. Then `vae.decode(...).sample`, with `options`.
    pub fn decode(&self, latents: &Tensor, options: &DecodeOptions) -> Result<Tensor> {
        let invalid = |problem: String| PipelineError::invalid("vae latents", problem);
        let &[batch, channels, height, width] = latents.dims() else {
            return Err(invalid(format!("shape {:?} is not [batch, channels, height, width]", latents.dims())));
        };
        if channels != self.config.latent_channels || batch == 0 || height == 0 || width == 0 {
            return Err(invalid(format!(
                "shape {:?}; expected [batch, {}, height, width], none of them 0",
                latents.dims(),
                self.config.latent_channels
            )));
        }
        let plan = match &options.tiling {
            Some(tiling) => {
                let plan = TilePlan::new(tiling, self.config.upscale(), height, width)?;
                // diffusers' `_decode` tiles only latents larger than one tile.
                (height > tiling.tile_latent_size || width > tiling.tile_latent_size).then_some(plan)
            }
            None => None,
        };
        let latents = self.to_vae_space(latents)?;
        if options.slicing && batch > 1 {
            let images = (0..batch)
                .map(|idx| self.decode_vae_space(&latents.narrow(0, idx, 1)?, plan.as_ref(), options.attention_chunk))
                .collect::<Result<Vec<_>>>()?;
            Ok(Tensor::cat(&images, 0)?)
        } else {
            self.decode_vae_space(&latents, plan.as_ref(), options.attention_chunk)
        }
    }

    /// `latents / scaling_factor + shift_factor` with torch's rounding, then cast to the decoder's dtype.
    fn to_vae_space(&self, latents: &Tensor) -> Result<Tensor> {
        let dtype = latents.dtype();
        let opmath = opmath_dtype(dtype);
        let scalar = |value: f64| Tensor::new(value as f32, latents.device())?.to_dtype(opmath);
        let scaled = latents.to_dtype(opmath)?.broadcast_div(&scalar(self.config.scaling_factor)?)?.to_dtype(dtype)?;
        let shift = self.config.shift_factor.unwrap_or(0.0);
        let shifted = scaled.to_dtype(opmath)?.broadcast_add(&scalar(shift)?)?.to_dtype(dtype)?;
        Ok(shifted.to_dtype(self.dtype)?)
    }

    /// diffusers' `_decode`: the VAE-space latents through `post_quant_conv` and the decoder,
    /// whole or in tiles.
    fn decode_vae_space(&self, latents: &Tensor, plan: Option<&TilePlan>, chunk: Option<usize>) -> Result<Tensor> {
        let decode = |latents: &Tensor| match &self.post_quant_conv {
            Some(conv) => self.decoder.forward(&conv.forward(latents)?, chunk),
            None => self.decoder.forward(latents, chunk),
        };
        Ok(match plan {
            Some(plan) => tiled_decode(latents, plan, decode)?,
            None => decode(latents)?,
        })
    }
}

/// diffusers' `VaeImageProcessor.postprocess(images, output_type="pil")` as pixels: images
/// `[B, C, H, W]` in [-1, 1] become u8 `[B, H, W, C]` on the CPU.
///
/// `(x · 0.5 + 0.5).clamp(0, 1)` is computed in the images' dtype (one rounding, as torch's two
/// operations give, since `· 0.5` is exact), then `· 255` in f32 and rounded half to even as
/// numpy's `round()` does, so the pixels equal diffusers' bit for bit given the same images.
pub fn postprocess(images: &Tensor) -> Result<Tensor> {
    let &[batch, channels, height, width] = images.dims() else {
        return Err(PipelineError::invalid("images", format!("shape {:?} is not [B, C, H, W]", images.dims())));
    };
    let unit = images.affine(0.5, 0.5)?.to_dtype(DType::F32)?.permute((0, 2, 3, 1))?;
    let values: Vec<f32> = unit.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
    // `as u8` saturates and maps NaN to 0; the clamp keeps every other value in range.
    let pixels: Vec<u8> = values.iter().map(|&v| (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8).collect();
    Ok(Tensor::from_vec(pixels, (batch, height, width, channels), &Device::Cpu)?)
}

/// `dir`, or its `vae/` subfolder when `dir` is a pipeline root.
fn vae_dir(dir: &Path) -> PathBuf {
    let nested = dir.join(VAE_DIR);
    if !dir.join(CONFIG_FILE).is_file() && nested.join(CONFIG_FILE).is_file() { nested } else { dir.to_owned() }
}

/// `AutoencoderKL.__init__`'s defaults.
mod defaults {
    use serde::{Deserialize, Deserializer};

    pub(super) fn out_channels() -> usize {
        3
    }
    pub(super) fn latent_channels() -> usize {
        4
    }
    pub(super) fn block_out_channels() -> Vec<usize> {
        vec![64]
    }
    pub(super) fn layers_per_block() -> usize {
        1
    }
    pub(super) fn norm_num_groups() -> usize {
        32
    }
    pub(super) fn act_fn() -> String {
        "silu".into()
    }
    pub(super) fn up_block_types() -> Vec<String> {
        vec!["UpDecoderBlock2D".into()]
    }
    pub(super) fn yes() -> bool {
        true
    }
    pub(super) fn sample_size() -> usize {
        32
    }
    pub(super) fn scaling_factor() -> f64 {
        0.18215
    }

    /// `sample_size` is an int, or a list whose first element diffusers uses.
    pub(super) fn int_or_first<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum IntOrList {
            Int(usize),
            List(Vec<usize>),
        }
        match IntOrList::deserialize(deserializer)? {
            IntOrList::Int(size) => Ok(size),
            IntOrList::List(sizes) => {
                sizes.first().copied().ok_or_else(|| serde::de::Error::custom("sample_size is an empty list"))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FLUX.1-dev's `vae/config.json`, verbatim.
    const FLUX_CONFIG: &str = r#"{
      "_class_name": "AutoencoderKL",
      "_diffusers_version": "0.30.0.dev0",
      "act_fn": "silu",
      "block_out_channels": [128, 256, 512, 512],
      "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
      "force_upcast": true,
      "in_channels": 3,
      "latent_channels": 16,
      "latents_mean": null,
      "latents_std": null,
      "layers_per_block": 2,
      "mid_block_add_attention": true,
      "norm_num_groups": 32,
      "out_channels": 3,
      "sample_size": 1024,
      "scaling_factor": 0.3611,
      "shift_factor": 0.1159,
      "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
      "use_post_quant_conv": false,
      "use_quant_conv": false
    }"#;

    fn parse(json: &str) -> VaeConfig {
        serde_json::from_str(json).expect("config parses")
    }

    #[test]
    fn flux_config_file_is_the_preset() {
        let config = parse(FLUX_CONFIG);
        assert_eq!(config, VaeConfig::flux());
        config.validate().expect("flux config is valid");
        assert_eq!(config.upscale(), 8);
        assert_eq!(config.default_tiling(), Tiling { tile_latent_size: 128, overlap_factor: 0.25 });
    }

    #[test]
    fn omitted_keys_take_diffusers_defaults() {
        let config = parse(r#"{"sample_size": [512, 512]}"#);
        assert_eq!(config.sample_size, 512);
        assert_eq!((config.latent_channels, config.block_out_channels.as_slice()), (4, [64].as_slice()));
        assert!(config.use_post_quant_conv && config.shift_factor.is_none());
    }

    #[test]
    fn unsupported_configs_are_refused() {
        type Edit = fn(&mut VaeConfig);
        let edits: [(&str, Edit); 6] = [
            ("groups", |c| c.norm_num_groups = 48),
            ("act_fn", |c| c.act_fn = "gelu".into()),
            ("up blocks", |c| c.up_block_types.truncate(3)),
            ("attention", |c| c.mid_block_add_attention = false),
            ("scaling", |c| c.scaling_factor = 0.0),
            ("empty", |c| c.block_out_channels.clear()),
        ];
        for (label, edit) in edits {
            let mut config = VaeConfig::flux();
            edit(&mut config);
            assert!(matches!(config.validate(), Err(PipelineError::Invalid { .. })), "{label} accepted");
        }
    }

    #[test]
    fn missing_folder_names_the_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = VaeDecoder::load(dir.path(), DType::F32, &Device::Cpu).expect_err("empty folder loaded");
        assert!(matches!(&err, PipelineError::MissingFile { path, .. } if path.ends_with(CONFIG_FILE)), "{err}");
        std::fs::write(dir.path().join(CONFIG_FILE), FLUX_CONFIG).expect("write config");
        let err = VaeDecoder::load(dir.path(), DType::F32, &Device::Cpu).expect_err("folder without weights loaded");
        assert!(matches!(&err, PipelineError::MissingFile { path, .. } if path.ends_with(WEIGHTS_FILE)), "{err}");
    }

    /// The parameter count from the config is the golden model's `decoder.*` tensors, element for
    /// element (that model has no post-quant conv).
    #[test]
    fn weight_params_count_the_checkpoint() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/vae/model");
        let config = VaeConfig::read(&dir.join(CONFIG_FILE)).expect("golden config");
        let tensors = candle_core::safetensors::load(dir.join(WEIGHTS_FILE), &Device::Cpu).expect("golden weights");
        let stored: usize = tensors
            .iter()
            .filter(|(name, _)| name.starts_with("decoder."))
            .map(|(_, tensor)| tensor.elem_count())
            .sum();
        assert_eq!(config.weight_params(), stored as u64);
        assert_eq!(config.weight_bytes(DType::F16), 2 * stored as u64);
    }

    /// Clamping, NaN and the layout; exact .5 ties (half to even) are in the golden test.
    #[test]
    fn postprocess_clamps_and_moves_channels_last() {
        let values = [-2.0f32, -1.0, 0.0, 1.0, 3.0, f32::NAN, 0.2, 0.4, -0.6, 0.8, 0.9, 0.95];
        let images = Tensor::from_vec(values.to_vec(), (1, 2, 2, 3), &Device::Cpu).unwrap();
        let pixels = postprocess(&images).unwrap();
        assert_eq!(pixels.dims(), [1, 2, 3, 2]);
        let pixels: Vec<u8> = pixels.flatten_all().unwrap().to_vec1().unwrap();
        // numpy on the same values (NaN casts to 0 there too); 0.0 becomes 127.5 and rounds to 128.
        assert_eq!(pixels, [0, 153, 0, 178, 128, 51, 255, 230, 255, 242, 0, 249]);
    }
}
