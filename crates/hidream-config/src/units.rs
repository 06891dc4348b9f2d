//! The size model: every tensor of the checkpoint, grouped into loadable units.
//!
//! A *unit* is what the memory planner loads or frees as one piece: the embedders with the final
//! layer, the 49 caption projections, and each double- and single-stream block. The tensor list
//! here is the single source of truth for the checkpoint layout: the synthetic writer writes it,
//! and tests check that diffusers' own checkpoints match it name for name and shape for shape.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{DType, TransformerConfig};

/// One loadable unit of the transformer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Unit {
    /// `t_embedder`, `p_embedder`, `x_embedder` and `final_layer`: small and needed every step.
    Embedders,
    /// Caption projection `i` of `num_layers + num_single_layers + 1` (one per block for the Llama
    /// state it reads, then T5).
    CaptionProjection(usize),
    /// `double_stream_blocks.{i}`.
    DoubleBlock(usize),
    /// `single_stream_blocks.{i}`.
    SingleBlock(usize),
}

/// The kind of a unit, without its index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UnitKind {
    Embedders,
    CaptionProjection,
    DoubleBlock,
    SingleBlock,
}

impl Unit {
    /// The checkpoint key prefixes of every tensor in this unit, each ending in `.`.
    pub fn prefixes(self) -> Vec<String> {
        match self {
            Unit::Embedders => ["t_embedder.", "p_embedder.", "x_embedder.", "final_layer."].map(String::from).to_vec(),
            Unit::CaptionProjection(idx) => vec![format!("caption_projection.{idx}.")],
            Unit::DoubleBlock(block_idx) => vec![format!("double_stream_blocks.{block_idx}.")],
            Unit::SingleBlock(block_idx) => vec![format!("single_stream_blocks.{block_idx}.")],
        }
    }

    /// The kind of this unit.
    pub fn kind(self) -> UnitKind {
        match self {
            Unit::Embedders => UnitKind::Embedders,
            Unit::CaptionProjection(_) => UnitKind::CaptionProjection,
            Unit::DoubleBlock(_) => UnitKind::DoubleBlock,
            Unit::SingleBlock(_) => UnitKind::SingleBlock,
        }
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Unit::Embedders => f.write_str("embedders+final_layer"),
            Unit::CaptionProjection(idx) => write!(f, "caption_projection.{idx}"),
            Unit::DoubleBlock(block_idx) => write!(f, "double_stream_blocks.{block_idx}"),
            Unit::SingleBlock(block_idx) => write!(f, "single_stream_blocks.{block_idx}"),
        }
    }
}

/// How diffusers initialises a tensor, so that synthetic checkpoints have realistic scales.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Init {
    /// `nn.Linear` weight or bias: uniform in ±1/√fan_in.
    Uniform { bound: f64 },
    /// `nn.RMSNorm` weight.
    Ones,
    /// `MoEGate.weight`: `randn / √dim`.
    Normal { std: f64 },
}

/// A tensor of the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// The full checkpoint key, e.g. `double_stream_blocks.3.block.attn1.to_q.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// True for the adaLN modulation weights, which depend only on (timestep, pooled text) and so
    /// can be applied once per schedule instead of once per step.
    pub is_modulation: bool,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// Parameter counts of one unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct UnitSize {
    /// All parameters of the unit.
    pub params: usize,
    /// The part of `params` in adaLN modulation layers.
    pub modulation_params: usize,
}

impl UnitSize {
    /// Bytes of the whole unit in `dtype`.
    pub fn bytes(&self, dtype: DType) -> u64 {
        (self.params * dtype.size_in_bytes()) as u64
    }

    /// Bytes of the unit without its modulation weights, in `dtype`.
    pub fn bytes_without_modulation(&self, dtype: DType) -> u64 {
        ((self.params - self.modulation_params) * dtype.size_in_bytes()) as u64
    }
}

/// Every unit of a transformer config with its tensors, in forward order.
#[derive(Debug, Clone)]
pub struct SizeModel {
    units: Vec<(Unit, Vec<TensorSpec>)>,
}

impl SizeModel {
    /// Builds the tensor list of `config`. The config should be valid (see
    /// [`TransformerConfig::validate`]).
    pub fn new(config: &TransformerConfig) -> Self {
        let builder = SpecBuilder { config };
        let mut units = vec![(Unit::Embedders, builder.embedders())];
        for idx in 0..=config.n_blocks() {
            units.push((Unit::CaptionProjection(idx), builder.caption(idx)));
        }
        for block_idx in 0..config.num_layers {
            units.push((Unit::DoubleBlock(block_idx), builder.block(Unit::DoubleBlock(block_idx))));
        }
        for block_idx in 0..config.num_single_layers {
            units.push((Unit::SingleBlock(block_idx), builder.block(Unit::SingleBlock(block_idx))));
        }
        SizeModel { units }
    }

    /// The units in forward order: embedders, caption projections, double blocks, single blocks.
    /// Caption projection `i` reads the Llama state of block `i` (the last one reads T5).
    pub fn units(&self) -> impl Iterator<Item = Unit> + '_ {
        self.units.iter().map(|(unit, _)| *unit)
    }

    /// The tensors of one unit (empty for a unit the config does not have).
    pub fn tensors(&self, unit: Unit) -> &[TensorSpec] {
        self.units.iter().find(|(u, _)| *u == unit).map_or(&[], |(_, specs)| specs.as_slice())
    }

    /// Every tensor of the checkpoint.
    pub fn all_tensors(&self) -> impl Iterator<Item = &TensorSpec> + '_ {
        self.units.iter().flat_map(|(_, specs)| specs.iter())
    }

    /// The parameter counts of one unit.
    pub fn unit_size(&self, unit: Unit) -> UnitSize {
        let specs = self.tensors(unit);
        UnitSize {
            params: specs.iter().map(TensorSpec::numel).sum(),
            modulation_params: specs.iter().filter(|s| s.is_modulation).map(TensorSpec::numel).sum(),
        }
    }

    /// Total parameters of the transformer.
    pub fn total_params(&self) -> usize {
        self.all_tensors().map(TensorSpec::numel).sum()
    }

    /// Total bytes of the transformer in `dtype`.
    pub fn total_bytes(&self, dtype: DType) -> u64 {
        (self.total_params() * dtype.size_in_bytes()) as u64
    }
}

struct SpecBuilder<'a> {
    config: &'a TransformerConfig,
}

impl SpecBuilder<'_> {
    fn linear(&self, out: &mut Vec<TensorSpec>, name: &str, in_dim: usize, out_dim: usize, bias: bool) {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let init = Init::Uniform { bound };
        out.push(TensorSpec {
            name: format!("{name}.weight"),
            shape: vec![out_dim, in_dim],
            init,
            is_modulation: false,
        });
        if bias {
            out.push(TensorSpec { name: format!("{name}.bias"), shape: vec![out_dim], init, is_modulation: false });
        }
    }

    /// diffusers' `TimestepEmbedding`: `linear_1`, SiLU, `linear_2`.
    fn timestep_embedding(&self, out: &mut Vec<TensorSpec>, name: &str, in_dim: usize) {
        let dim = self.config.inner_dim();
        self.linear(out, &format!("{name}.linear_1"), in_dim, dim, true);
        self.linear(out, &format!("{name}.linear_2"), dim, dim, true);
    }

    fn modulation(&self, out: &mut Vec<TensorSpec>, name: &str, n_chunks: usize) {
        let dim = self.config.inner_dim();
        let start = out.len();
        self.linear(out, &format!("{name}.adaLN_modulation.1"), dim, n_chunks * dim, true);
        for spec in &mut out[start..] {
            spec.is_modulation = true;
        }
    }

    fn embedders(&self) -> Vec<TensorSpec> {
        let config = self.config;
        let dim = config.inner_dim();
        let patch_area = config.patch_size * config.patch_size;
        let mut out = Vec::new();
        self.timestep_embedding(&mut out, "t_embedder.timestep_embedder", 256);
        self.timestep_embedding(&mut out, "p_embedder.pooled_embedder", config.text_emb_dim);
        self.linear(&mut out, "x_embedder.proj", patch_area * config.in_channels, dim, true);
        self.linear(&mut out, "final_layer.linear", dim, patch_area * config.out_channels(), true);
        self.modulation(&mut out, "final_layer", 2);
        out
    }

    fn caption(&self, idx: usize) -> Vec<TensorSpec> {
        let config = self.config;
        let mut out = Vec::new();
        let in_dim = config.caption_input_channels(idx);
        self.linear(&mut out, &format!("caption_projection.{idx}.linear"), in_dim, config.inner_dim(), false);
        out
    }

    fn swiglu(&self, out: &mut Vec<TensorSpec>, name: &str, hidden: usize) {
        let dim = self.config.inner_dim();
        self.linear(out, &format!("{name}.w1"), dim, hidden, false);
        self.linear(out, &format!("{name}.w2"), hidden, dim, false);
        self.linear(out, &format!("{name}.w3"), dim, hidden, false);
    }

    fn attention(&self, out: &mut Vec<TensorSpec>, name: &str, with_text: bool) {
        let dim = self.config.inner_dim();
        let suffixes: &[&str] = if with_text { &["", "_t"] } else { &[""] };
        for suffix in suffixes {
            for proj in ["to_q", "to_k", "to_v", "to_out"] {
                self.linear(out, &format!("{name}.{proj}{suffix}"), dim, dim, true);
            }
            for norm in ["q_rms_norm", "k_rms_norm"] {
                let spec_name = format!("{name}.{norm}{suffix}.weight");
                out.push(TensorSpec { name: spec_name, shape: vec![dim], init: Init::Ones, is_modulation: false });
            }
        }
    }

    fn moe(&self, out: &mut Vec<TensorSpec>, name: &str) {
        let config = self.config;
        let dim = config.inner_dim();
        self.swiglu(out, &format!("{name}.shared_experts"), config.shared_expert_hidden_dim());
        for expert_idx in 0..config.num_routed_experts {
            self.swiglu(out, &format!("{name}.experts.{expert_idx}"), config.expert_hidden_dim());
        }
        out.push(TensorSpec {
            name: format!("{name}.gate.weight"),
            shape: vec![config.num_routed_experts, dim],
            init: Init::Normal { std: 1.0 / (dim as f64).sqrt() },
            is_modulation: false,
        });
    }

    fn block(&self, unit: Unit) -> Vec<TensorSpec> {
        let (prefix, double) = match unit {
            Unit::DoubleBlock(block_idx) => (format!("double_stream_blocks.{block_idx}.block"), true),
            Unit::SingleBlock(block_idx) => (format!("single_stream_blocks.{block_idx}.block"), false),
            Unit::Embedders | Unit::CaptionProjection(_) => return Vec::new(),
        };
        let mut out = Vec::new();
        self.modulation(&mut out, &prefix, if double { 12 } else { 6 });
        self.attention(&mut out, &format!("{prefix}.attn1"), double);
        self.moe(&mut out, &format!("{prefix}.ff_i"));
        if double {
            self.swiglu(&mut out, &format!("{prefix}.ff_t"), self.config.expert_hidden_dim());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published parameter counts of HiDream-I1 (DESIGN.md): 17.106B in total, 424.1M per
    /// double block and 305.4M per single block.
    #[test]
    fn full_model_matches_the_published_sizes() {
        let sizes = SizeModel::new(&TransformerConfig::full());
        let double = sizes.unit_size(Unit::DoubleBlock(0)).params;
        let single = sizes.unit_size(Unit::SingleBlock(31)).params;
        assert_eq!((double as f64 / 1e5).round(), 4241.0, "double block params {double}");
        assert_eq!((single as f64 / 1e5).round(), 3054.0, "single block params {single}");
        let total = sizes.total_params();
        assert_eq!((total as f64 / 1e6).round(), 17106.0, "total params {total}");
        // 49 projections of 4096 -> 2560, no bias.
        let captions: usize = (0..49).map(|idx| sizes.unit_size(Unit::CaptionProjection(idx)).params).sum();
        assert_eq!(captions, 49 * 4096 * 2560);
        assert_eq!(sizes.unit_size(Unit::DoubleBlock(0)).bytes(DType::BF16), double as u64 * 2);
        // 809 MiB and 583 MiB in bf16.
        assert_eq!(sizes.unit_size(Unit::DoubleBlock(0)).bytes(DType::BF16) >> 20, 808);
        assert_eq!(sizes.unit_size(Unit::SingleBlock(0)).bytes(DType::BF16) >> 20, 582);
        assert_eq!(sizes.units().count(), 1 + 49 + 16 + 32);
    }

    #[test]
    fn modulation_share_of_the_full_model() {
        let sizes = SizeModel::new(&TransformerConfig::full());
        let modulation: usize = sizes.units().map(|u| sizes.unit_size(u).modulation_params).sum();
        // 16 × 12 + 32 × 6 + 2 chunks of 2560 × 2560 weights plus biases.
        let dim = 2560;
        assert_eq!(modulation, (16 * 12 + 32 * 6 + 2) * (dim * dim + dim));
    }

    #[test]
    fn every_tensor_name_is_unique_and_under_its_unit_prefix() {
        let sizes = SizeModel::new(&TransformerConfig::tiny());
        let mut seen = std::collections::HashSet::new();
        for unit in sizes.units() {
            let prefixes = unit.prefixes();
            for spec in sizes.tensors(unit) {
                assert!(prefixes.iter().any(|p| spec.name.starts_with(p)), "{} outside {unit}", spec.name);
                assert!(seen.insert(spec.name.clone()), "duplicate {}", spec.name);
            }
        }
    }
}
