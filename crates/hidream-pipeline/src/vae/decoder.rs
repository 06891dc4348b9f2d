//! The `AutoencoderKL` decoder network, assembled from candle-transformers' Stable Diffusion blocks.
//!
//! candle-transformers has this exact network as `stable_diffusion::vae::Decoder`, but it is private:
//! its only door is `AutoEncoderKL::new`, which also builds (and loads the weights of) the encoder,
//! about 34M parameters that decoding never uses. This file rebuilds the decoder from the public
//! blocks that the private one uses (`UpDecoderBlock2D`, and the resnets of `UNetMidBlock2D`, whose
//! attention is ours so that it can run in query chunks: see `mid_block.rs`) with the same
//! settings, so only `decoder.*` (and `post_quant_conv.*` where the config has it) is loaded.

use candle_core::{Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, VarBuilder};
use candle_transformers::models::stable_diffusion::unet_2d_blocks::{UpDecoderBlock2D, UpDecoderBlock2DConfig};

use super::VaeConfig;
use super::mid_block::MidBlock;

/// diffusers hard-codes this epsilon for every GroupNorm of the decoder (`vae.py`, `Decoder`).
const NORM_EPS: f64 = 1e-6;

/// diffusers' `vae.py::Decoder` with `norm_type="group"`: `conv_in`, the mid block (resnet,
/// single-head attention, resnet), the up blocks (`layers_per_block + 1` resnets each, nearest 2×
/// upsampling and a conv on all but the last), then GroupNorm, SiLU and `conv_out`.
#[derive(Debug)]
pub(super) struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock2D>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    /// `vb` points at the `decoder` prefix of the checkpoint.
    pub(super) fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let (Some(&first_channels), Some(&last_channels)) = (channels.first(), channels.last()) else {
            candle_core::bail!("vae: block_out_channels is empty");
        };
        let same_size = Conv2dConfig { padding: 1, ..Default::default() };
        let conv_in = candle_nn::conv2d(cfg.latent_channels, last_channels, 3, same_size, vb.pp("conv_in"))?;
        // One head over all channels: diffusers passes attention_head_dim = block_out_channels[-1].
        let mid_block = MidBlock::new(vb.pp("mid_block"), last_channels, cfg.norm_num_groups, NORM_EPS)?;

        let reversed: Vec<usize> = channels.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(reversed.len());
        for (block_idx, &out_channels) in reversed.iter().enumerate() {
            let in_channels = reversed[block_idx.saturating_sub(1)];
            let block_cfg = UpDecoderBlock2DConfig {
                num_layers: cfg.layers_per_block + 1,
                resnet_eps: NORM_EPS,
                resnet_groups: cfg.norm_num_groups,
                output_scale_factor: 1.0,
                add_upsample: block_idx + 1 < reversed.len(),
            };
            let vb_block = vb.pp("up_blocks").pp(block_idx.to_string());
            up_blocks.push(UpDecoderBlock2D::new(vb_block, in_channels, out_channels, block_cfg)?);
        }

        let conv_norm_out =
            candle_nn::group_norm(cfg.norm_num_groups, first_channels, NORM_EPS, vb.pp("conv_norm_out"))?;
        let conv_out = candle_nn::conv2d(first_channels, cfg.out_channels, 3, same_size, vb.pp("conv_out"))?;
        Ok(Self { conv_in, mid_block, up_blocks, conv_norm_out, conv_out })
    }
}

impl Decoder {
    /// The decoder on `[B, latent_channels, h, w]`, with the mid block's attention in chunks of
    /// `attention_chunk` latent positions (see [`MidBlock`]).
    pub(super) fn forward(&self, latents: &Tensor, attention_chunk: Option<usize>) -> Result<Tensor> {
        let mut xs = self.mid_block_per_image(&latents.apply(&self.conv_in)?, attention_chunk)?;
        for up_block in &self.up_blocks {
            xs = xs.apply(up_block)?;
        }
        candle_nn::ops::silu(&xs.apply(&self.conv_norm_out)?)?.apply(&self.conv_out)
    }

    /// The mid block, one image at a time.
    ///
    /// Its attention feeds a transposed `[B, HW, C]` view to the q/k/v `Linear`s, and candle-core
    /// 0.11.1's CPU matmul folds the batch of such a view into one gemm as if its rows were
    /// adjacent, so every image after the first is computed from the wrong rows (upstream fix
    /// pending: huggingface/candle#3758). Attention never mixes images, so this changes nothing but
    /// the bug; it also bounds the attention matrix to one image's.
    fn mid_block_per_image(&self, xs: &Tensor, attention_chunk: Option<usize>) -> Result<Tensor> {
        let batch = xs.dim(0)?;
        if batch == 1 {
            return self.mid_block.forward(xs, attention_chunk);
        }
        let images = (0..batch)
            .map(|idx| self.mid_block.forward(&xs.narrow(0, idx, 1)?, attention_chunk))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&images, 0)
    }
}
