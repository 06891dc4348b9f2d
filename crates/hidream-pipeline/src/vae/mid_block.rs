//! The decoder's mid block: a resnet, single-head attention over every latent position, a resnet.
//!
//! This is candle-transformers' `UNetMidBlock2D` with one attention layer (its resnets are
//! candle-transformers' `ResnetBlock2D`), but the attention can run in query chunks. The
//! attention mixes every latent position with every other, so unchunked it holds a
//! `[positions, positions]` f32 score matrix: 16384² (1 GiB) for a 1024² image. In chunks of `q`
//! queries it holds `[q, positions]` at a time. Every query's softmax row is the same function of
//! the same keys either way, so chunking changes nothing but the order of the matmul's inner
//! loops (within a few f32 ulps; the unchunked path is candle-transformers' own, operation for
//! operation).

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{GroupNorm, Linear, VarBuilder};
use candle_transformers::models::stable_diffusion::resnet::{ResnetBlock2D, ResnetBlock2DConfig};

/// diffusers' `UNetMidBlock2D` of the VAE decoder: `resnets.0`, `attentions.0`, `resnets.1`.
#[derive(Debug)]
pub(super) struct MidBlock {
    resnet_in: ResnetBlock2D,
    attention: MidAttention,
    resnet_out: ResnetBlock2D,
}

impl MidBlock {
    /// `vb` points at `mid_block`; `groups` and `eps` are the decoder's GroupNorm settings.
    pub(super) fn new(vb: VarBuilder, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        let resnet_cfg =
            ResnetBlock2DConfig { eps, groups, output_scale_factor: 1.0, temb_channels: None, ..Default::default() };
        Ok(Self {
            resnet_in: ResnetBlock2D::new(vb.pp("resnets").pp("0"), channels, resnet_cfg)?,
            attention: MidAttention::new(vb.pp("attentions").pp("0"), channels, groups, eps)?,
            resnet_out: ResnetBlock2D::new(vb.pp("resnets").pp("1"), channels, resnet_cfg)?,
        })
    }

    /// The block on `[1, C, H, W]`, with the attention in chunks of `query_chunk` positions.
    pub(super) fn forward(&self, xs: &Tensor, query_chunk: Option<usize>) -> Result<Tensor> {
        let xs = self.resnet_in.forward(xs, None)?;
        let xs = self.attention.forward(&xs, query_chunk)?;
        self.resnet_out.forward(&xs, None)
    }
}

/// A `[C, C]` projection, stored as a linear weight or, as some checkpoints store it, a 1×1
/// convolution's `[C, C, 1, 1]` (candle-transformers' `get_qkv_linear` accepts both too).
fn projection(channels: usize, vb: VarBuilder) -> Result<Linear> {
    match vb.get((channels, channels), "weight") {
        Ok(_) => candle_nn::linear(channels, channels, vb),
        Err(_) => {
            let weight = vb.get((channels, channels, 1, 1), "weight")?.reshape((channels, channels))?;
            Ok(Linear::new(weight, Some(vb.get(channels, "bias")?)))
        }
    }
}

/// One head over all channels, as candle-transformers' `AttentionBlock` computes it.
#[derive(Debug)]
struct MidAttention {
    group_norm: GroupNorm,
    query: Linear,
    key: Linear,
    value: Linear,
    proj_attn: Linear,
    channels: usize,
}

impl MidAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize, eps: f64) -> Result<Self> {
        // diffusers' current names, or the old ones that candle-transformers also accepts.
        let (q, k, v, out) = if vb.contains_tensor("to_q.weight") {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        Ok(Self {
            group_norm: candle_nn::group_norm(groups, channels, eps, vb.pp("group_norm"))?,
            query: projection(channels, vb.pp(q))?,
            key: projection(channels, vb.pp(k))?,
            value: projection(channels, vb.pp(v))?,
            proj_attn: projection(channels, vb.pp(out))?,
            channels,
        })
    }

    fn forward(&self, xs: &Tensor, query_chunk: Option<usize>) -> Result<Tensor> {
        let in_dtype = xs.dtype();
        let residual = xs;
        let (batch, channels, height, width) = xs.dims4()?;
        let positions = height * width;
        let normed = self.group_norm.forward(xs)?.reshape((batch, channels, positions))?.transpose(1, 2)?;
        // `[B, 1, HW, C]` in f32, as `AttentionBlock::transpose_for_scores` gives them.
        let heads = |proj: &Linear| -> Result<Tensor> {
            proj.forward(&normed)?.reshape((batch, positions, 1, channels))?.transpose(1, 2)?.to_dtype(DType::F32)
        };
        let (query, key, value) = (heads(&self.query)?, heads(&self.key)?, heads(&self.value)?);
        // The scale is applied to both sides, hence the fourth root (diffusers' old attention).
        let scale = f64::powf(self.channels as f64, -0.25);
        let key_t = (key.t()? * scale)?;
        let attend = |query: &Tensor| -> Result<Tensor> {
            let scores = (query * scale)?.matmul(&key_t)?;
            candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&value)
        };
        let attended = match query_chunk {
            Some(chunk) if chunk > 0 && chunk < positions => {
                let chunks = (0..positions)
                    .step_by(chunk)
                    .map(|start| attend(&query.narrow(2, start, chunk.min(positions - start))?))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::cat(&chunks, 2)?
            }
            _ => attend(&query)?,
        };
        let out = attended.to_dtype(in_dtype)?.transpose(1, 2)?.contiguous()?.flatten_from(D::Minus2)?;
        let out = self.proj_attn.forward(&out)?.t()?.reshape((batch, channels, height, width))?;
        out + residual
    }
}
