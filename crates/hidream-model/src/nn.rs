//! Small layers shared by the model: a `Linear` over flattened leading dims and the norms.

use candle_core::{D, DType, Module, Tensor};
use candle_nn::VarBuilder;

/// `nn.Linear`, applied to any `[.., in]` input as one 2-D matmul.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// A linear layer with a bias (`nn.Linear(in, out)`).
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { inner: candle_nn::linear(in_dim, out_dim, vb)? })
    }

    /// A linear layer without a bias (`nn.Linear(in, out, bias=False)`).
    pub fn no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { inner: candle_nn::linear_no_bias(in_dim, out_dim, vb)? })
    }

    /// The dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.inner.weight().dtype()
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dims = xs.dims();
        match dims.len() {
            0..=2 => self.inner.forward(xs),
            _ => {
                let (leading, in_dim) = dims.split_at(dims.len() - 1);
                let rows: usize = leading.iter().product();
                let flat = xs.reshape((rows, in_dim[0]))?;
                let out = self.inner.forward(&flat)?;
                let mut out_dims = leading.to_vec();
                out_dims.push(out.dim(1)?);
                out.reshape(out_dims)
            }
        }
    }
}

/// `nn.LayerNorm(dim, elementwise_affine=False, eps)` over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNormNoAffine {
    ones: Tensor,
    zeros: Tensor,
    eps: f32,
}

impl LayerNormNoAffine {
    pub fn new(dim: usize, eps: f32, vb: &VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            ones: Tensor::ones(dim, vb.dtype(), vb.device())?,
            zeros: Tensor::zeros(dim, vb.dtype(), vb.device())?,
            eps,
        })
    }
}

impl Module for LayerNormNoAffine {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(&xs.contiguous()?, &self.ones, &self.zeros, self.eps)
    }
}

/// `nn.RMSNorm(dim, eps)` with its learned weight, over the last dimension.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn new(dim: usize, eps: f32, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, eps })
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&xs.contiguous()?, &self.weight, self.eps)
    }
}

/// `x * (1 + scale) + shift`, with `scale` and `shift` broadcast over the sequence.
pub fn modulate(xs: &Tensor, shift: &Tensor, scale: &Tensor) -> candle_core::Result<Tensor> {
    xs.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// Splits `[B, N * dim]` modulation vectors into `N` tensors of `[B, 1, dim]`.
pub fn chunk_modulation<const N: usize>(modulation: &Tensor) -> candle_core::Result<[Tensor; N]> {
    let width = modulation.dim(D::Minus1)?;
    if width % N != 0 {
        candle_core::bail!("modulation width {width} is not a multiple of {N} chunks");
    }
    let modulation = modulation.unsqueeze(1)?;
    let chunk = width / N;
    let chunks =
        (0..N).map(|idx| modulation.narrow(D::Minus1, idx * chunk, chunk)).collect::<candle_core::Result<Vec<_>>>()?;
    chunks.try_into().map_err(|_| candle_core::Error::Msg("modulation chunk count".into()))
}

/// Upcasts to f32 when needed (rope and softmax run in f32, as in diffusers).
pub fn to_f32(xs: &Tensor) -> candle_core::Result<Tensor> {
    if xs.dtype() == DType::F32 { Ok(xs.clone()) } else { xs.to_dtype(DType::F32) }
}
