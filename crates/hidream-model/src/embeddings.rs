//! Embedders: timestep and pooled-text embeddings, the patch embedding and the 3-axis RoPE table.

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::nn::Linear;

/// diffusers' `TimestepEmbedding`: `linear_1`, SiLU, `linear_2`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(in_dim: usize, dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            linear_1: Linear::new(in_dim, dim, vb.pp("linear_1"))?,
            linear_2: Linear::new(dim, dim, vb.pp("linear_2"))?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)
    }
}

/// The sinusoidal projection of diffusers' `Timesteps(256, flip_sin_to_cos=True,
/// downscale_freq_shift=0)` (`get_timestep_embedding`), computed in f32 as torch does.
///
/// Returns `[B, n_channels]`: the cosines first, then the sines.
pub fn timestep_frequencies(timesteps: &Tensor, n_channels: usize) -> candle_core::Result<Tensor> {
    const MAX_PERIOD: f64 = 10000.0;
    let half_dim = n_channels / 2;
    let log_period = -(MAX_PERIOD.ln() as f32);
    let freqs: Vec<f32> = (0..half_dim).map(|i| (log_period * i as f32 / half_dim as f32).exp()).collect();
    let freqs = Tensor::from_vec(freqs, (1, half_dim), timesteps.device())?;
    let args = timesteps.to_dtype(candle_core::DType::F32)?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], 1)
}

/// `t_embedder`: sinusoidal frequencies then a `TimestepEmbedding`.
#[derive(Debug, Clone)]
pub struct TimestepEmbed {
    timestep_embedder: TimestepEmbedding,
}

impl TimestepEmbed {
    /// Width of the sinusoidal projection (`frequency_embedding_size`).
    pub const N_FREQUENCIES: usize = 256;

    pub fn new(dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { timestep_embedder: TimestepEmbedding::new(Self::N_FREQUENCIES, dim, vb.pp("timestep_embedder"))? })
    }

    /// `timesteps` is `[B]`; the sinusoid is cast to the weights' dtype, as diffusers does.
    pub fn forward(&self, timesteps: &Tensor, dtype: candle_core::DType) -> candle_core::Result<Tensor> {
        let frequencies = timestep_frequencies(timesteps, Self::N_FREQUENCIES)?.to_dtype(dtype)?;
        self.timestep_embedder.forward(&frequencies)
    }
}

/// `x_embedder`: a linear projection of each flattened `p × p × C` patch.
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    proj: Linear,
}

impl PatchEmbed {
    pub fn new(patch_features: usize, dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { proj: Linear::new(patch_features, dim, vb.pp("proj"))? })
    }
}

impl Module for PatchEmbed {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        self.proj.forward(xs)
    }
}

/// The 3-axis RoPE table for `positions` (`[n_tokens][3]`), as diffusers' `HiDreamImageEmbedND`
/// with theta 10000: per axis, angles `pos / theta^(2i/dim)` computed in f64 and rounded to f32.
///
/// Returns `(cos, sin)`, each `[n_tokens, head_dim / 2]` in f32, axes concatenated in order; they
/// rotate interleaved pairs `(x[2i], x[2i+1])`, which is what `apply_rope` does in diffusers.
pub fn rope_table(
    positions: &[[f32; 3]],
    axes_dims: &[usize],
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    const THETA: f64 = 10000.0;
    let half_dim: usize = axes_dims.iter().sum::<usize>() / 2;
    let mut cos = Vec::with_capacity(positions.len() * half_dim);
    let mut sin = Vec::with_capacity(positions.len() * half_dim);
    for position in positions {
        for (axis, &axis_dim) in axes_dims.iter().enumerate() {
            let pos = f64::from(position[axis]);
            for i in (0..axis_dim).step_by(2) {
                let omega = 1.0 / THETA.powf(i as f64 / axis_dim as f64);
                let angle = pos * omega;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let n_tokens = positions.len();
    Ok((Tensor::from_vec(cos, (n_tokens, half_dim), device)?, Tensor::from_vec(sin, (n_tokens, half_dim), device)?))
}
