//! `HiDreamAttention` with q/k RMSNorm, 3-axis RoPE and optional query chunking.
//!
//! Double-stream blocks project image and text tokens with separate weights (`to_q` and `to_q_t`,
//! ...), attend over their concatenation, and split the result again. Single-stream blocks use one
//! set of projections over the joint sequence.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{Linear, RmsNorm, to_f32};

/// How attention is evaluated. Every setting gives the same result up to float rounding.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AttentionConfig {
    /// Process queries in chunks of this many tokens, so that the score matrix held at once is
    /// `[B, heads, chunk, tokens]` instead of `[B, heads, tokens, tokens]`. `None` = one chunk.
    pub query_chunk: Option<usize>,
}

/// What every attention call of one forward shares: the RoPE table, the key mask and the config.
#[derive(Debug, Clone)]
pub struct AttentionContext {
    /// `[n_tokens, head_dim / 2]` in f32, for the joint sequence (image tokens, then text).
    pub cos: Tensor,
    pub sin: Tensor,
    /// `[B, n_tokens]` (or shorter) multiplier of the keys; `None` on the square path.
    pub key_mask: Option<Tensor>,
    pub config: AttentionConfig,
}

/// One set of projections: `to_q`, `to_k`, `to_v`, `to_out` and the q/k RMSNorms.
#[derive(Debug, Clone)]
struct Projections {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
}

impl Projections {
    /// Loads the projections whose keys end in `suffix` (`""` or `"_t"`).
    fn new(dim: usize, suffix: &str, vb: &VarBuilder) -> candle_core::Result<Self> {
        const EPS: f32 = 1e-5;
        Ok(Self {
            to_q: Linear::new(dim, dim, vb.pp(format!("to_q{suffix}")))?,
            to_k: Linear::new(dim, dim, vb.pp(format!("to_k{suffix}")))?,
            to_v: Linear::new(dim, dim, vb.pp(format!("to_v{suffix}")))?,
            to_out: Linear::new(dim, dim, vb.pp(format!("to_out{suffix}")))?,
            q_norm: RmsNorm::new(dim, EPS, vb.pp(format!("q_rms_norm{suffix}")))?,
            k_norm: RmsNorm::new(dim, EPS, vb.pp(format!("k_rms_norm{suffix}")))?,
        })
    }

    /// Queries, keys and values as `[B, N, heads, head_dim]`.
    fn qkv(&self, xs: &Tensor, heads: usize) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let (batch, n_tokens, dim) = xs.dims3()?;
        let shape = (batch, n_tokens, heads, dim / heads);
        let query = self.q_norm.forward(&self.to_q.forward(xs)?)?.reshape(shape)?;
        let key = self.k_norm.forward(&self.to_k.forward(xs)?)?.reshape(shape)?;
        let value = self.to_v.forward(xs)?.reshape(shape)?;
        Ok((query, key, value))
    }
}

/// diffusers' `HiDreamAttention` with `HiDreamAttnProcessor`.
#[derive(Debug, Clone)]
pub struct HiDreamAttention {
    image: Projections,
    text: Option<Projections>,
    heads: usize,
}

impl HiDreamAttention {
    /// `single` selects the single-stream form, without the `*_t` text projections.
    pub fn new(dim: usize, heads: usize, single: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let image = Projections::new(dim, "", &vb)?;
        let text = if single { None } else { Some(Projections::new(dim, "_t", &vb)?) };
        Ok(Self { image, text, heads })
    }

    /// Single-stream attention over the joint sequence `xs` (`[B, N, dim]`).
    pub fn forward_single(&self, xs: &Tensor, ctx: &AttentionContext) -> candle_core::Result<Tensor> {
        let (query, key, value) = self.image.qkv(xs, self.heads)?;
        let key = mask_keys(&key, ctx.key_mask.as_ref())?;
        let out = self.attend(&query, &key, &value, ctx)?;
        self.image.to_out.forward(&out)
    }

    /// Double-stream attention: image tokens `[B, N_img, dim]` and text tokens `[B, N_txt, dim]`
    /// attend jointly; returns the two outputs separately.
    pub fn forward_double(
        &self,
        image: &Tensor,
        text: &Tensor,
        ctx: &AttentionContext,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let text_projections =
            self.text.as_ref().ok_or_else(|| candle_core::Error::Msg("single-stream attention given text".into()))?;
        let (query_i, key_i, value_i) = self.image.qkv(image, self.heads)?;
        let key_i = mask_keys(&key_i, ctx.key_mask.as_ref())?;
        let (query_t, key_t, value_t) = text_projections.qkv(text, self.heads)?;
        let n_image = query_i.dim(1)?;
        let n_text = query_t.dim(1)?;
        let query = Tensor::cat(&[&query_i, &query_t], 1)?;
        let key = Tensor::cat(&[&key_i, &key_t], 1)?;
        let value = Tensor::cat(&[&value_i, &value_t], 1)?;
        let out = self.attend(&query, &key, &value, ctx)?;
        let out_i = self.image.to_out.forward(&out.narrow(1, 0, n_image)?)?;
        let out_t = text_projections.to_out.forward(&out.narrow(1, n_image, n_text)?)?;
        Ok((out_i, out_t))
    }

    /// RoPE on queries and keys, then scaled dot-product attention; `[B, N, dim]` out.
    fn attend(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        ctx: &AttentionContext,
    ) -> candle_core::Result<Tensor> {
        let (batch, n_tokens, heads, head_dim) = query.dims4()?;
        let dtype = query.dtype();
        let cos = ctx.cos.narrow(0, 0, n_tokens)?;
        let sin = ctx.sin.narrow(0, 0, n_tokens)?;
        // [B, N, H, Dh] -> [B, H, N, Dh]; RoPE runs in f32 as in diffusers' `apply_rope`.
        let rotate = |xs: &Tensor| -> candle_core::Result<Tensor> {
            let xs = to_f32(&xs.transpose(1, 2)?.contiguous()?)?;
            candle_nn::rotary_emb::rope_i(&xs, &cos, &sin)?.to_dtype(dtype)
        };
        let query = rotate(query)?;
        let key = rotate(key)?;
        let value = value.transpose(1, 2)?.contiguous()?;
        let out = scaled_dot_product_attention(&query, &key, &value, ctx.config)?;
        out.transpose(1, 2)?.reshape((batch, n_tokens, heads * head_dim))
    }
}

/// Multiplies keys `[B, N, H, Dh]` by a `[B, >=N]` mask, as diffusers does on the non-square path.
fn mask_keys(key: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match mask {
        None => Ok(key.clone()),
        Some(mask) => {
            let (batch, n_tokens, _, _) = key.dims4()?;
            let mask = mask.narrow(1, 0, n_tokens)?.reshape((batch, n_tokens, 1, 1))?.to_dtype(key.dtype())?;
            key.broadcast_mul(&mask)
        }
    }
}

/// `softmax(q kᵀ / √d) v` over `[B, H, N, Dh]` contiguous operands, optionally by query chunks.
pub fn scaled_dot_product_attention(
    query: &Tensor,
    key: &Tensor,
    value: &Tensor,
    config: AttentionConfig,
) -> candle_core::Result<Tensor> {
    let (_, _, n_queries, head_dim) = query.dims4()?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let key_t = key.t()?;
    let attend = |query: &Tensor| -> candle_core::Result<Tensor> {
        let scores = (query.matmul(&key_t)? * scale)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        weights.matmul(value)
    };
    match config.query_chunk {
        Some(chunk) if chunk > 0 && chunk < n_queries => {
            let mut outs = Vec::with_capacity(n_queries.div_ceil(chunk));
            for start in (0..n_queries).step_by(chunk) {
                let len = chunk.min(n_queries - start);
                outs.push(attend(&query.narrow(2, start, len)?.contiguous()?)?);
            }
            Tensor::cat(&outs, 2)
        }
        _ => attend(query),
    }
}
