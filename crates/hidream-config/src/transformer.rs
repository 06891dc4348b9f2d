//! `TransformerConfig`: diffusers' `HiDreamImageTransformer2DModel` config, its presets and rules.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::invalid;
use crate::{ConfigError, Result};

/// The config of `HiDreamImageTransformer2DModel`, field for field as in diffusers'
/// `transformer/config.json`. Unknown keys (`_class_name`, `_diffusers_version`, ...) are ignored.
/// Missing keys take diffusers' constructor defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransformerConfig {
    pub patch_size: usize,
    #[serde(default = "defaults::in_channels")]
    pub in_channels: usize,
    /// `None` means "same as `in_channels`", as in diffusers.
    #[serde(default)]
    pub out_channels: Option<usize>,
    #[serde(default = "defaults::num_layers")]
    pub num_layers: usize,
    #[serde(default = "defaults::num_single_layers")]
    pub num_single_layers: usize,
    #[serde(default = "defaults::attention_head_dim")]
    pub attention_head_dim: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// `[t5_channels, llama_channels]`, in diffusers' order.
    pub caption_channels: Vec<usize>,
    #[serde(default = "defaults::text_emb_dim")]
    pub text_emb_dim: usize,
    #[serde(default = "defaults::num_routed_experts")]
    pub num_routed_experts: usize,
    #[serde(default = "defaults::num_activated_experts")]
    pub num_activated_experts: usize,
    #[serde(default = "defaults::axes_dims_rope")]
    pub axes_dims_rope: Vec<usize>,
    #[serde(default = "defaults::max_resolution")]
    pub max_resolution: Vec<usize>,
    /// For each of the `num_layers + num_single_layers` blocks, the Llama hidden state it reads.
    pub llama_layers: Vec<usize>,
    /// Only changes training-mode behaviour in diffusers; kept so configs round-trip.
    #[serde(default)]
    pub force_inference_output: bool,
}

/// diffusers' constructor defaults (`transformer_hidream_image.py`, `__init__`).
mod defaults {
    pub fn in_channels() -> usize {
        64
    }
    pub fn num_layers() -> usize {
        16
    }
    pub fn num_single_layers() -> usize {
        32
    }
    pub fn attention_head_dim() -> usize {
        128
    }
    pub fn num_attention_heads() -> usize {
        20
    }
    pub fn text_emb_dim() -> usize {
        2048
    }
    pub fn num_routed_experts() -> usize {
        4
    }
    pub fn num_activated_experts() -> usize {
        2
    }
    pub fn axes_dims_rope() -> Vec<usize> {
        vec![32, 32]
    }
    pub fn max_resolution() -> Vec<usize> {
        vec![128, 128]
    }
}

impl TransformerConfig {
    /// The real HiDream-I1 transformer (Full, Dev and Fast share it), as in
    /// `HiDream-ai/HiDream-I1-Full/transformer/config.json`.
    pub fn full() -> Self {
        let mut llama_layers: Vec<usize> = (0..32).collect();
        llama_layers.extend(std::iter::repeat_n(31, 16));
        TransformerConfig {
            patch_size: 2,
            in_channels: 16,
            out_channels: Some(16),
            num_layers: 16,
            num_single_layers: 32,
            attention_head_dim: 128,
            num_attention_heads: 20,
            caption_channels: vec![4096, 4096],
            text_emb_dim: 2048,
            num_routed_experts: 4,
            num_activated_experts: 2,
            axes_dims_rope: vec![64, 32, 32],
            max_resolution: vec![128, 128],
            llama_layers,
            force_inference_output: false,
        }
    }

    /// A benchmark model: the real text and RoPE widths with 8 heads of 128 and 4 + 4 blocks.
    pub fn small() -> Self {
        TransformerConfig {
            num_layers: 4,
            num_single_layers: 4,
            num_attention_heads: 8,
            llama_layers: (24..32).rev().collect(),
            ..Self::full()
        }
    }

    /// A test model, small enough for golden fixtures. The T5 and Llama widths differ on purpose
    /// so that a swapped caption projection cannot go unnoticed, and `llama_layers` repeats.
    pub fn tiny() -> Self {
        TransformerConfig {
            patch_size: 2,
            in_channels: 4,
            out_channels: Some(4),
            num_layers: 2,
            num_single_layers: 2,
            attention_head_dim: 16,
            num_attention_heads: 2,
            caption_channels: vec![32, 24],
            text_emb_dim: 16,
            num_routed_experts: 4,
            num_activated_experts: 2,
            axes_dims_rope: vec![4, 6, 6],
            max_resolution: vec![16, 16],
            llama_layers: vec![2, 0, 2, 2],
            force_inference_output: false,
        }
    }

    /// A preset by name: `tiny`, `small` or `full`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "small" => Ok(Self::small()),
            "full" | "dev" | "fast" => Ok(Self::full()),
            _ => {
                Err(ConfigError::UnknownName { what: "preset", given: name.to_owned(), expected: "tiny, small, full" })
            }
        }
    }

    /// A slice of this architecture with `num_layers` double and `num_single_layers` single blocks
    /// (at most as many as it has), keeping every width and each kept block's Llama layer: a
    /// full-width model that fits a benchmark. The slice is validated: it needs at least one block.
    pub fn with_layers(&self, num_layers: usize, num_single_layers: usize) -> Result<Self> {
        if num_layers > self.num_layers || num_single_layers > self.num_single_layers {
            return Err(invalid(
                "layers",
                format!(
                    "a slice can keep at most {} double and {} single blocks, got {num_layers} and {num_single_layers}",
                    self.num_layers, self.num_single_layers
                ),
            ));
        }
        // A valid config has one Llama layer per block, so the slices below are in range.
        self.validate()?;
        let double = &self.llama_layers[..num_layers];
        let single = &self.llama_layers[self.num_layers..self.num_layers + num_single_layers];
        let slice = TransformerConfig {
            num_layers,
            num_single_layers,
            llama_layers: double.iter().chain(single).copied().collect(),
            ..self.clone()
        };
        slice.validate()?;
        Ok(slice)
    }

    /// Reads and validates a diffusers `config.json`.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_owned(), source })?;
        let config: Self =
            serde_json::from_str(&text).map_err(|source| ConfigError::Parse { path: path.to_owned(), source })?;
        config.validate()?;
        Ok(config)
    }

    /// The JSON that diffusers' `from_pretrained` reads, with the class name it expects.
    pub fn to_diffusers_json(&self) -> String {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(map) = value.as_object_mut() {
            map.insert("_class_name".into(), "HiDreamImageTransformer2DModel".into());
            map.insert("out_channels".into(), self.out_channels().into());
        }
        serde_json::to_string_pretty(&value).unwrap_or_default()
    }

    /// Checks every rule the architecture relies on.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("patch_size", self.patch_size),
            ("in_channels", self.in_channels),
            ("attention_head_dim", self.attention_head_dim),
            ("num_attention_heads", self.num_attention_heads),
            ("text_emb_dim", self.text_emb_dim),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(field, "must be at least 1"));
            }
        }
        if self.out_channels == Some(0) {
            return Err(invalid("out_channels", "must be at least 1"));
        }
        if self.caption_channels.len() != 2 || self.caption_channels.contains(&0) {
            return Err(invalid(
                "caption_channels",
                format!("must be two positive widths [t5, llama], got {:?}", self.caption_channels),
            ));
        }
        if self.num_routed_experts == 0 {
            return Err(invalid("num_routed_experts", "must be at least 1 (zero experts is not a HiDream model)"));
        }
        if self.num_activated_experts == 0 || self.num_activated_experts > self.num_routed_experts {
            return Err(invalid(
                "num_activated_experts",
                format!(
                    "(top-k) must be between 1 and num_routed_experts = {}, got {}",
                    self.num_routed_experts, self.num_activated_experts
                ),
            ));
        }
        if self.axes_dims_rope.len() != 3 {
            return Err(invalid(
                "axes_dims_rope",
                format!("must have 3 axes (frame, row, column), got {:?}", self.axes_dims_rope),
            ));
        }
        if let Some(odd) = self.axes_dims_rope.iter().find(|d| **d == 0 || **d % 2 == 1) {
            return Err(invalid("axes_dims_rope", format!("every axis must be even and positive, got {odd}")));
        }
        let rope_sum: usize = self.axes_dims_rope.iter().sum();
        if rope_sum != self.attention_head_dim {
            return Err(invalid(
                "axes_dims_rope",
                format!(
                    "must sum to attention_head_dim = {}, got {:?} (sum {rope_sum})",
                    self.attention_head_dim, self.axes_dims_rope
                ),
            ));
        }
        if self.max_resolution.len() != 2 || self.max_resolution.iter().any(|r| *r == 0 || r % self.patch_size != 0) {
            return Err(invalid(
                "max_resolution",
                format!(
                    "must be [height, width] in latent pixels, positive multiples of patch_size = {}, got {:?}",
                    self.patch_size, self.max_resolution
                ),
            ));
        }
        let n_blocks = self.n_blocks();
        if n_blocks == 0 {
            // The forward starts the text stream from the last block's Llama projection (diffusers'
            // `encoder_hidden_states[-2]`), so a model needs at least one block of either kind.
            return Err(invalid(
                "num_layers",
                "plus num_single_layers must be at least 1: a HiDream transformer without blocks has no \
                 text stream to start from; keep at least one double or single block (num_layers or \
                 num_single_layers of 1 or more in config.json; `--layers 1,0` for `hidream synth`)",
            ));
        }
        if self.llama_layers.len() != n_blocks {
            return Err(invalid(
                "llama_layers",
                format!(
                    "must name one Llama layer per block: num_layers + num_single_layers = {n_blocks}, got {}",
                    self.llama_layers.len()
                ),
            ));
        }
        Ok(())
    }

    /// Channels of the predicted sample.
    pub fn out_channels(&self) -> usize {
        self.out_channels.unwrap_or(self.in_channels)
    }

    /// The transformer width, `heads × head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Double plus single blocks.
    pub fn n_blocks(&self) -> usize {
        self.num_layers + self.num_single_layers
    }

    /// The padded image sequence of the non-square path: `max_resolution² / patch²`.
    pub fn max_seq(&self) -> usize {
        self.max_resolution.iter().product::<usize>() / (self.patch_size * self.patch_size)
    }

    /// The number of Llama hidden states a forward needs (`max(llama_layers) + 1`).
    pub fn n_llama_layers_needed(&self) -> usize {
        self.llama_layers.iter().max().map_or(0, |m| m + 1)
    }

    /// The T5 width (`caption_channels[0]`).
    pub fn t5_channels(&self) -> usize {
        self.caption_channels[0]
    }

    /// The Llama width (`caption_channels[1]`).
    pub fn llama_channels(&self) -> usize {
        self.caption_channels[1]
    }

    /// The input width of caption projection `idx`: the Llama width for the one of each block,
    /// the T5 width for the last (`caption_channels` is `[t5, llama]`, projections run the other way).
    pub fn caption_input_channels(&self, idx: usize) -> usize {
        if idx < self.n_blocks() { self.llama_channels() } else { self.t5_channels() }
    }

    /// Hidden width of a routed expert (and of the dense text feed-forward): diffusers'
    /// `HiDreamImageFeedForwardSwiGLU(dim, 4 * dim)`.
    pub fn expert_hidden_dim(&self) -> usize {
        swiglu_hidden(4 * self.inner_dim())
    }

    /// Hidden width of the shared expert: `HiDreamImageFeedForwardSwiGLU(dim, 4 * dim // 2)`.
    pub fn shared_expert_hidden_dim(&self) -> usize {
        swiglu_hidden(4 * self.inner_dim() / 2)
    }
}

/// `int(2 * hidden / 3)` rounded up to a multiple of 256, as `HiDreamImageFeedForwardSwiGLU` does.
fn swiglu_hidden(hidden_dim: usize) -> usize {
    const MULTIPLE_OF: usize = 256;
    let hidden = 2 * hidden_dim / 3;
    MULTIPLE_OF * hidden.div_ceil(MULTIPLE_OF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for config in [TransformerConfig::full(), TransformerConfig::small(), TransformerConfig::tiny()] {
            config.validate().unwrap();
        }
    }

    #[test]
    fn full_matches_the_published_widths() {
        let config = TransformerConfig::full();
        assert_eq!(config.inner_dim(), 2560);
        assert_eq!(config.expert_hidden_dim(), 6912);
        assert_eq!(config.shared_expert_hidden_dim(), 3584);
        assert_eq!(config.max_seq(), 4096);
        assert_eq!(config.llama_layers.len(), 48);
        assert_eq!(config.llama_layers[31], 31);
        assert_eq!(&config.llama_layers[32..], &[31; 16]);
    }

    #[test]
    fn slices_keep_widths_and_llama_layers() {
        let slice = TransformerConfig::full().with_layers(2, 3).unwrap();
        slice.validate().unwrap();
        assert_eq!((slice.num_layers, slice.num_single_layers, slice.inner_dim()), (2, 3, 2560));
        assert_eq!(slice.llama_layers, vec![0, 1, 16, 17, 18]);
        assert!(TransformerConfig::small().with_layers(5, 0).is_err());
        // One block of either kind is a model; no block at all is a typed error, not a panic later.
        for (double, single) in [(1, 0), (0, 1)] {
            TransformerConfig::tiny().with_layers(double, single).unwrap();
        }
        match TransformerConfig::tiny().with_layers(0, 0) {
            Err(ConfigError::Invalid { field: "num_layers", problem }) => {
                assert!(problem.contains("at least one double or single block"), "{problem}");
            }
            other => panic!("expected an error on num_layers, got {other:?}"),
        }
    }

    #[test]
    fn parses_the_published_config_json() {
        let json = r#"{
          "_class_name": "HiDreamImageTransformer2DModel",
          "_diffusers_version": "0.32.1",
          "attention_head_dim": 128, "axes_dims_rope": [64, 32, 32], "caption_channels": [4096, 4096],
          "in_channels": 16, "max_resolution": [128, 128], "num_activated_experts": 2,
          "num_attention_heads": 20, "num_layers": 16, "num_routed_experts": 4, "num_single_layers": 32,
          "out_channels": 16, "patch_size": 2, "text_emb_dim": 2048,
          "llama_layers": [0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,
                           31,31,31,31,31,31,31,31,31,31,31,31,31,31,31,31]
        }"#;
        let config: TransformerConfig = serde_json::from_str(json).unwrap();
        config.validate().unwrap();
        assert_eq!(config, TransformerConfig::full());
        let round_trip: TransformerConfig = serde_json::from_str(&config.to_diffusers_json()).unwrap();
        assert_eq!(round_trip, config);
    }

    /// Each case breaks one rule and must name the field it broke.
    #[test]
    fn validation_names_the_broken_field() {
        fn check(field: &str, edit: impl FnOnce(&mut TransformerConfig)) {
            let mut config = TransformerConfig::tiny();
            edit(&mut config);
            match config.validate() {
                Err(ConfigError::Invalid { field: got, .. }) => assert_eq!(got, field),
                other => panic!("expected an error on {field}, got {other:?}"),
            }
        }
        check("axes_dims_rope", |c| c.axes_dims_rope = vec![4, 6, 8]);
        check("axes_dims_rope", |c| c.axes_dims_rope = vec![8, 8]);
        check("axes_dims_rope", |c| c.axes_dims_rope = vec![3, 7, 6]);
        check("llama_layers", |c| c.llama_layers.push(0));
        check("num_routed_experts", |c| c.num_routed_experts = 0);
        check("num_activated_experts", |c| c.num_activated_experts = 5);
        check("num_activated_experts", |c| c.num_activated_experts = 0);
        check("caption_channels", |c| c.caption_channels = vec![32]);
        check("max_resolution", |c| c.max_resolution = vec![15, 16]);
        check("patch_size", |c| c.patch_size = 0);
        check("out_channels", |c| c.out_channels = Some(0));
        check("num_layers", |c| {
            (c.num_layers, c.num_single_layers) = (0, 0);
            c.llama_layers.clear();
        });
    }

    #[test]
    fn missing_required_keys_are_parse_errors() {
        let dir = std::env::temp_dir().join(format!("hidream-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, r#"{"in_channels": 16}"#).unwrap();
        let err = TransformerConfig::from_json_file(&path).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err}");
        assert!(err.to_string().contains("patch_size"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
