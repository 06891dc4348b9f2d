//! The T5-XXL encoder: transformers' `T5EncoderModel` last hidden state, as
//! `HiDreamImagePipeline._get_t5_prompt_embeds` calls it: `min(max_sequence_length,
//! model_max_length)` tokens, padded with `<pad>`, WITH the padding mask.
//!
//! candle-transformers' `t5::T5EncoderModel` takes no attention mask and keeps its layers private,
//! so the encoder stack is written here on its `t5::Config` (the `config.json` parser, including
//! `feed_forward_proj` such as `gated-gelu`). The mask only hides padded keys; the padded positions
//! are still computed as queries, and the pipeline keeps all of them, so it changes every output
//! row's neighbours and the padded rows themselves.

use std::path::Path;

use candle_core::{D, DType, Device, Module, Tensor};
use candle_nn::{Activation, Embedding, Linear, VarBuilder};
use candle_transformers::models::t5::Config as T5Config;

use hidream_weights::Checkpoint;

use super::tokenize::{Length, PadWith, PromptTokenizer, Tokens};
use super::{MAX_SEQUENCE_LENGTH, open_weights, read_config};
use crate::{Result, TextError};

/// The resident part of the T5 encoder: config, tokenizer, token embedding, the shared relative
/// position bias, the final norm and the opened checkpoint. Blocks are loaded separately, so that
/// a caller can stream them ([`crate::streamed`]).
#[derive(Debug)]
pub struct T5Stem {
    config: T5Config,
    tokenizer: PromptTokenizer,
    checkpoint: Checkpoint,
    embed_tokens: Embedding,
    /// The relative position bias table of block 0, shared by every block.
    relative_attention_bias: Embedding,
    final_layer_norm: T5LayerNorm,
    dtype: DType,
    device: Device,
}

/// One prompt batch on its way through the blocks.
#[derive(Debug)]
pub struct T5Pass {
    hidden: Tensor,
    /// Position bias plus padding mask, `[B, H, T, T]` f32.
    bias: Tensor,
    next_block: usize,
}

impl T5Pass {
    /// The index of the next block to run.
    pub fn next_block(&self) -> usize {
        self.next_block
    }
}

impl T5Stem {
    /// Opens a `T5EncoderModel` folder (`config.json`, `model.safetensors` or its index) and its
    /// tokenizer folder, e.g. `text_encoder_3/` and `tokenizer_3/` of HiDream-I1, and loads
    /// everything but the blocks.
    pub fn load(encoder_dir: &Path, tokenizer_dir: &Path, dtype: DType, device: &Device) -> Result<T5Stem> {
        let config: T5Config = read_config(encoder_dir)?;
        let tokenizer = PromptTokenizer::load(
            tokenizer_dir,
            PadWith::PadToken { default: "<pad>" },
            Length::AtMostModelMax(MAX_SEQUENCE_LENGTH),
        )?;
        let checkpoint = open_weights(encoder_dir)?;
        let vb = checkpoint.var_builder(dtype, device);
        let embed_vb = vb.pp(embedding_prefix(&checkpoint));
        let embed_tokens = candle_nn::embedding(config.vocab_size, config.d_model, embed_vb)?;
        let encoder = vb.pp("encoder");
        let relative_attention_bias = candle_nn::embedding(
            config.relative_attention_num_buckets,
            config.num_heads,
            encoder.pp("block.0.layer.0.SelfAttention.relative_attention_bias"),
        )?;
        let final_layer_norm = T5LayerNorm::new(&config, encoder.pp("final_layer_norm"))?;
        Ok(T5Stem {
            config,
            tokenizer,
            checkpoint,
            embed_tokens,
            relative_attention_bias,
            final_layer_norm,
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.config
    }

    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    /// The opened weights, for a caller that loads blocks itself (see [`T5Block::prefix`]).
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The bytes of the stem's weights as loaded: what stays on the device while blocks stream.
    pub fn resident_bytes(&self) -> u64 {
        [self.embed_tokens.embeddings(), self.relative_attention_bias.embeddings(), &self.final_layer_norm.weight]
            .into_iter()
            .map(crate::stage::loaded_bytes)
            .sum()
    }

    /// Loads block `block_idx` from the checkpoint.
    pub fn load_block(&self, block_idx: usize) -> Result<T5Block> {
        T5Block::new(&self.config, block_idx, self.checkpoint.var_builder(self.dtype, &self.device))
    }

    /// Embeds tokenized prompts and builds their position bias with the padding mask.
    pub fn begin(&self, tokens: &Tokens) -> Result<T5Pass> {
        let ids = tokens.ids_tensor(&self.device)?;
        let (batch, seq_len) = ids.dims2()?;
        // Position bias `[1, H, T, T]` plus the padding mask `[B, 1, 1, T]`, in f32: one additive
        // term per score. The mask value is transformers' (the most negative f32), not -inf.
        let bias = self.position_bias(seq_len)?;
        let mask: Vec<f32> =
            tokens.mask().iter().flatten().map(|&keep| if keep == 0 { f32::MIN } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (batch, 1, 1, seq_len), &self.device)?;
        let bias = bias.broadcast_add(&mask)?;
        let hidden = self.embed_tokens.forward(&ids)?;
        Ok(T5Pass { hidden, bias, next_block: 0 })
    }

    /// Runs the next block of the pass; blocks must come in order.
    pub fn run_block(&self, pass: &mut T5Pass, block: &T5Block) -> Result<()> {
        if block.block_idx != pass.next_block {
            return Err(TextError::invalid(
                "T5 pass",
                format!("block {} given where block {} comes next", block.block_idx, pass.next_block),
            ));
        }
        pass.hidden = block.forward(&pass.hidden, &pass.bias)?;
        pass.next_block += 1;
        Ok(())
    }

    /// The last hidden state, `[B, T, d_model]`: the final norm of the last block's output.
    pub fn finish(&self, pass: T5Pass) -> Result<Tensor> {
        if pass.next_block != self.config.num_layers {
            return Err(TextError::invalid(
                "T5 pass",
                format!("finished after {} of {} blocks", pass.next_block, self.config.num_layers),
            ));
        }
        self.final_layer_norm.forward(&pass.hidden)
    }

    /// transformers' `T5Attention.compute_bias` for a bidirectional encoder: `[1, H, T, T]` f32.
    fn position_bias(&self, seq_len: usize) -> Result<Tensor> {
        let buckets: Vec<u32> = (0..seq_len)
            .flat_map(|query| {
                (0..seq_len).map(move |key| {
                    relative_position_bucket(
                        key as i64 - query as i64,
                        self.config.relative_attention_num_buckets,
                        self.config.relative_attention_max_distance,
                    )
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, (seq_len, seq_len), &self.device)?;
        let bias = self.relative_attention_bias.forward(&buckets)?.to_dtype(DType::F32)?;
        Ok(bias.permute((2, 0, 1))?.unsqueeze(0)?.contiguous()?)
    }
}

/// The token embedding: `shared` (the encoder-decoder's table) or, without it,
/// `encoder.embed_tokens`.
fn embedding_prefix(checkpoint: &Checkpoint) -> &'static str {
    if checkpoint.tensor_info("shared.weight").is_some() { "shared" } else { "encoder.embed_tokens" }
}

/// The stem's tensors, as [`T5Stem::load`] loads them.
pub(crate) fn stem_tensors(checkpoint: &Checkpoint) -> Vec<String> {
    vec![
        format!("{}.weight", embedding_prefix(checkpoint)),
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight".to_owned(),
        "encoder.final_layer_norm.weight".to_owned(),
    ]
}

/// The T5 encoder with every block resident.
#[derive(Debug)]
pub struct T5TextEncoder {
    stem: T5Stem,
    blocks: Vec<T5Block>,
}

impl T5TextEncoder {
    /// Loads the stem and every block (see [`T5Stem::load`] for the folder layout).
    pub fn load(encoder_dir: &Path, tokenizer_dir: &Path, dtype: DType, device: &Device) -> Result<T5TextEncoder> {
        let stem = T5Stem::load(encoder_dir, tokenizer_dir, dtype, device)?;
        let blocks =
            (0..stem.config.num_layers).map(|block_idx| stem.load_block(block_idx)).collect::<Result<Vec<_>>>()?;
        Ok(T5TextEncoder { stem, blocks })
    }

    pub fn config(&self) -> &T5Config {
        self.stem.config()
    }

    pub fn tokenizer(&self) -> &PromptTokenizer {
        self.stem.tokenizer()
    }

    pub fn stem(&self) -> &T5Stem {
        &self.stem
    }

    /// The last hidden state of each prompt: `[B, 128, d_model]`.
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor> {
        let tokens = self.stem.tokenizer.encode(prompts)?;
        self.forward(&tokens)
    }

    /// The last hidden state of tokenized prompts, with their padding mask.
    pub fn forward(&self, tokens: &Tokens) -> Result<Tensor> {
        let mut pass = self.stem.begin(tokens)?;
        for block in &self.blocks {
            self.stem.run_block(&mut pass, block)?;
        }
        self.stem.finish(pass)
    }
}

/// transformers' `T5Attention._relative_position_bucket(bidirectional=True)`, with its float32
/// arithmetic: half the buckets for keys after the query, exact distances below `max_exact`, then
/// logarithmic bins up to `max_distance`.
fn relative_position_bucket(relative_position: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let num_buckets = num_buckets / 2;
    let mut bucket = if relative_position > 0 { num_buckets } else { 0 };
    let distance = relative_position.unsigned_abs() as usize;
    let max_exact = num_buckets / 2;
    if distance < max_exact {
        bucket += distance;
    } else {
        let log_ratio = (distance as f32 / max_exact as f32).ln();
        // `math.log(max_distance / max_exact)` is a Python float, rounded to f32 by torch.
        let log_range = (max_distance as f64 / max_exact as f64).ln() as f32;
        let large = max_exact + (log_ratio / log_range * (num_buckets - max_exact) as f32) as usize;
        bucket += large.min(num_buckets - 1);
    }
    bucket as u32
}

/// T5's RMS norm without mean subtraction or bias, computed in f32 as transformers does.
#[derive(Debug)]
struct T5LayerNorm {
    weight: Tensor,
    eps: f64,
}

impl T5LayerNorm {
    fn new(config: &T5Config, vb: VarBuilder) -> Result<T5LayerNorm> {
        Ok(T5LayerNorm { weight: vb.get(config.d_model, "weight")?, eps: config.layer_norm_epsilon })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs32 = xs.to_dtype(DType::F32)?;
        let variance = xs32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xs32.broadcast_mul(&(variance + self.eps)?.sqrt()?.recip()?)?;
        Ok(normed.to_dtype(self.weight.dtype())?.broadcast_mul(&self.weight)?)
    }
}

/// One encoder block: self-attention and feed-forward, each pre-normed with a residual.
#[derive(Debug)]
pub struct T5Block {
    block_idx: usize,
    attention_norm: T5LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    n_heads: usize,
    d_kv: usize,
    ff_norm: T5LayerNorm,
    ff: T5FeedForward,
}

impl T5Block {
    /// The checkpoint key prefix of block `block_idx`'s tensors.
    pub fn prefix(block_idx: usize) -> String {
        format!("encoder.block.{block_idx}.")
    }

    /// Builds block `block_idx` from a `VarBuilder` over full checkpoint keys.
    pub fn new(config: &T5Config, block_idx: usize, vb: VarBuilder) -> Result<T5Block> {
        let vb = vb.pp(format!("encoder.block.{block_idx}"));
        let attention = vb.pp("layer.0");
        let attn = attention.pp("SelfAttention");
        let inner = config.num_heads * config.d_kv;
        let ff = vb.pp("layer.1");
        Ok(T5Block {
            block_idx,
            attention_norm: T5LayerNorm::new(config, attention.pp("layer_norm"))?,
            q: candle_nn::linear_no_bias(config.d_model, inner, attn.pp("q"))?,
            k: candle_nn::linear_no_bias(config.d_model, inner, attn.pp("k"))?,
            v: candle_nn::linear_no_bias(config.d_model, inner, attn.pp("v"))?,
            o: candle_nn::linear_no_bias(inner, config.d_model, attn.pp("o"))?,
            n_heads: config.num_heads,
            d_kv: config.d_kv,
            ff_norm: T5LayerNorm::new(config, ff.pp("layer_norm"))?,
            ff: T5FeedForward::new(config, ff.pp("DenseReluDense"))?,
        })
    }

    fn forward(&self, hidden: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let attended = self.attention(&self.attention_norm.forward(hidden)?, bias)?;
        let hidden = (hidden + attended)?;
        let fed = self.ff.forward(&self.ff_norm.forward(&hidden)?)?;
        Ok((hidden + fed)?)
    }

    /// Unscaled softmax attention (T5 folds the scale into its weights), in f32.
    fn attention(&self, xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (batch, seq_len, _) = xs.dims3()?;
        let heads = |proj: &Linear| -> candle_core::Result<Tensor> {
            proj.forward(xs)?
                .reshape((batch, seq_len, self.n_heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()?
                .to_dtype(DType::F32)
        };
        let (q, k, v) = (heads(&self.q)?, heads(&self.k)?, heads(&self.v)?);
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = weights.matmul(&v)?.to_dtype(xs.dtype())?.transpose(1, 2)?.reshape((
            batch,
            seq_len,
            self.n_heads * self.d_kv,
        ))?;
        Ok(self.o.forward(&out)?)
    }
}

/// `T5DenseGatedActDense` (`wo(act(wi_0 x) * wi_1 x)`) or `T5DenseActDense` (`wo(relu(wi x))`).
#[derive(Debug)]
enum T5FeedForward {
    Gated { wi_0: Linear, wi_1: Linear, wo: Linear, activation: Activation },
    Plain { wi: Linear, wo: Linear },
}

impl T5FeedForward {
    fn new(config: &T5Config, vb: VarBuilder) -> Result<T5FeedForward> {
        let (model, ff) = (config.d_model, config.d_ff);
        Ok(if config.feed_forward_proj.gated {
            T5FeedForward::Gated {
                wi_0: candle_nn::linear_no_bias(model, ff, vb.pp("wi_0"))?,
                wi_1: candle_nn::linear_no_bias(model, ff, vb.pp("wi_1"))?,
                wo: candle_nn::linear_no_bias(ff, model, vb.pp("wo"))?,
                activation: config.feed_forward_proj.activation,
            }
        } else {
            T5FeedForward::Plain {
                wi: candle_nn::linear_no_bias(model, ff, vb.pp("wi"))?,
                wo: candle_nn::linear_no_bias(ff, model, vb.pp("wo"))?,
            }
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self {
            T5FeedForward::Gated { wi_0, wi_1, wo, activation } => {
                wo.forward(&(activation.forward(&wi_0.forward(xs)?)? * wi_1.forward(xs)?)?)?
            }
            T5FeedForward::Plain { wi, wo } => wo.forward(&wi.forward(xs)?.relu()?)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::relative_position_bucket;

    #[test]
    fn buckets_match_transformers() {
        // transformers' `T5Attention._relative_position_bucket(torch.arange(-127, 128), True, 32, 128)`
        // (T5-XXL's settings), run-length encoded as (bucket, count).
        let runs = [
            (15, 37),
            (14, 27),
            (13, 18),
            (12, 14),
            (11, 9),
            (10, 7),
            (9, 4),
            (8, 4),
            (7, 1),
            (6, 1),
            (5, 1),
            (4, 1),
            (3, 1),
            (2, 1),
            (1, 1),
            (0, 1),
            (17, 1),
            (18, 1),
            (19, 1),
            (20, 1),
            (21, 1),
            (22, 1),
            (23, 1),
            (24, 4),
            (25, 4),
            (26, 7),
            (27, 9),
            (28, 14),
            (29, 18),
            (30, 27),
            (31, 37),
        ];
        let expected: Vec<u32> = runs.iter().flat_map(|&(bucket, count)| std::iter::repeat_n(bucket, count)).collect();
        let actual: Vec<u32> = (-127..=127).map(|rel| relative_position_bucket(rel, 32, 128)).collect();
        assert_eq!(actual, expected);
    }
}
