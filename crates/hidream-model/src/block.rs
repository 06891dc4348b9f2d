//! The double-stream and single-stream transformer blocks.
//!
//! Checkpoint keys sit under `double_stream_blocks.{i}.block.` and `single_stream_blocks.{i}.block.`
//! (diffusers wraps each block in a `HiDreamBlock` whose only field is `block`).
//!
//! The adaLN modulation depends only on `temb`, so it is a separate method: a caller can compute
//! it per block once per timestep ([`DoubleStreamBlock::modulation`]) and run the block without it.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;
use hidream_config::TransformerConfig;

use crate::attention::{AttentionContext, HiDreamAttention};
use crate::modulation::{BlockModulation, missing_modulation};
use crate::moe::{FeedForwardSwiGlu, MoeFeedForward};
use crate::nn::{LayerNormNoAffine, chunk_modulation, modulate};

const NORM_EPS: f32 = 1e-6;

/// `HiDreamImageTransformerBlock`: separate image and text streams that attend jointly.
#[derive(Debug, Clone)]
pub struct DoubleStreamBlock {
    modulation: Option<BlockModulation>,
    norm1_i: LayerNormNoAffine,
    norm1_t: LayerNormNoAffine,
    attn1: HiDreamAttention,
    norm3_i: LayerNormNoAffine,
    ff_i: MoeFeedForward,
    norm3_t: LayerNormNoAffine,
    ff_t: FeedForwardSwiGlu,
}

impl DoubleStreamBlock {
    /// Number of `[B, dim]` modulation vectors.
    pub const N_MODULATION: usize = 12;

    /// `vb` points at `double_stream_blocks.{i}.block`. If the view has no
    /// `adaLN_modulation.1.weight`, the block needs precomputed modulation.
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.inner_dim();
        Ok(Self {
            modulation: BlockModulation::optional(dim, Self::N_MODULATION, &vb)?,
            norm1_i: LayerNormNoAffine::new(dim, NORM_EPS, &vb)?,
            norm1_t: LayerNormNoAffine::new(dim, NORM_EPS, &vb)?,
            attn1: HiDreamAttention::new(dim, cfg.num_attention_heads, false, vb.pp("attn1"))?,
            norm3_i: LayerNormNoAffine::new(dim, NORM_EPS, &vb)?,
            ff_i: MoeFeedForward::new(cfg, vb.pp("ff_i"))?,
            norm3_t: LayerNormNoAffine::new(dim, NORM_EPS, &vb)?,
            ff_t: FeedForwardSwiGlu::new(dim, cfg.expert_hidden_dim(), vb.pp("ff_t"))?,
        })
    }

    /// The `[B, 12 * dim]` modulation vectors for `temb`.
    pub fn modulation(&self, temb: &Tensor) -> candle_core::Result<Tensor> {
        self.modulation.as_ref().ok_or_else(missing_modulation)?.forward(temb)
    }

    /// Runs the block; `modulation` is [`Self::modulation`] of this step's `temb`.
    /// Returns the new image tokens and the new text tokens (all of `text`).
    pub fn forward(
        &self,
        image: &Tensor,
        text: &Tensor,
        modulation: &Tensor,
        ctx: &AttentionContext,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let [
            shift_msa_i,
            scale_msa_i,
            gate_msa_i,
            shift_mlp_i,
            scale_mlp_i,
            gate_mlp_i,
            shift_msa_t,
            scale_msa_t,
            gate_msa_t,
            shift_mlp_t,
            scale_mlp_t,
            gate_mlp_t,
        ] = &chunk_modulation::<{ Self::N_MODULATION }>(modulation)?;
        let norm_image = modulate(&self.norm1_i.forward(image)?, shift_msa_i, scale_msa_i)?;
        let norm_text = modulate(&self.norm1_t.forward(text)?, shift_msa_t, scale_msa_t)?;
        let (attn_image, attn_text) = self.attn1.forward_double(&norm_image, &norm_text, ctx)?;
        let image = (attn_image.broadcast_mul(gate_msa_i)? + image)?;
        let text = (attn_text.broadcast_mul(gate_msa_t)? + text)?;

        let norm_image = modulate(&self.norm3_i.forward(&image)?, shift_mlp_i, scale_mlp_i)?;
        let norm_text = modulate(&self.norm3_t.forward(&text)?, shift_mlp_t, scale_mlp_t)?;
        let ff_image = self.ff_i.forward(&norm_image)?.broadcast_mul(gate_mlp_i)?;
        let ff_text = self.ff_t.forward(&norm_text)?.broadcast_mul(gate_mlp_t)?;
        Ok(((ff_image + image)?, (ff_text + text)?))
    }
}

/// `HiDreamImageSingleTransformerBlock`: one stream over image and text tokens together.
#[derive(Debug, Clone)]
pub struct SingleStreamBlock {
    modulation: Option<BlockModulation>,
    norm1_i: LayerNormNoAffine,
    attn1: HiDreamAttention,
    norm3_i: LayerNormNoAffine,
    ff_i: MoeFeedForward,
}

impl SingleStreamBlock {
    /// Number of `[B, dim]` modulation vectors.
    pub const N_MODULATION: usize = 6;

    /// `vb` points at `single_stream_blocks.{i}.block`.
    pub fn new(cfg: &TransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.inner_dim();
        Ok(Self {
            modulation: BlockModulation::optional(dim, Self::N_MODULATION, &vb)?,
            norm1_i: LayerNormNoAffine::new(dim, NORM_EPS, &vb)?,
            attn1: HiDreamAttention::new(dim, cfg.num_attention_heads, true, vb.pp("attn1"))?,
            norm3_i: LayerNormNoAffine::new(dim, NORM_EPS, &vb)?,
            ff_i: MoeFeedForward::new(cfg, vb.pp("ff_i"))?,
        })
    }

    /// The `[B, 6 * dim]` modulation vectors for `temb`.
    pub fn modulation(&self, temb: &Tensor) -> candle_core::Result<Tensor> {
        self.modulation.as_ref().ok_or_else(missing_modulation)?.forward(temb)
    }

    /// Runs the block over the joint sequence `xs`.
    pub fn forward(&self, xs: &Tensor, modulation: &Tensor, ctx: &AttentionContext) -> candle_core::Result<Tensor> {
        let [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp] =
            &chunk_modulation::<{ Self::N_MODULATION }>(modulation)?;
        let norm = modulate(&self.norm1_i.forward(xs)?, shift_msa, scale_msa)?;
        let attn = self.attn1.forward_single(&norm, ctx)?;
        let xs = (attn.broadcast_mul(gate_msa)? + xs)?;
        let norm = modulate(&self.norm3_i.forward(&xs)?, shift_mlp, scale_mlp)?;
        let ff = self.ff_i.forward(&norm)?.broadcast_mul(gate_mlp)?;
        ff + xs
    }
}
