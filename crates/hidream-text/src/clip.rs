//! CLIP-L and CLIP-G: transformers' `CLIPTextModelWithProjection`, `text_embeds` only, as
//! `HiDreamImagePipeline._get_clip_prompt_embeds` calls it.
//!
//! - 128 tokens (`min(max_sequence_length, 218)`), padded with the tokenizer's pad token, and no
//!   attention mask: the only mask is the causal one.
//! - Pooling picks the final-layer-normed hidden state of one token per prompt. Which one depends
//!   on the config: `eos_token_id == 2` (configs saved before transformers PR #24773) means the
//!   largest token id (`input_ids.argmax(-1)`, the first on ties); otherwise the first occurrence of
//!   `eos_token_id`.
//! - `text_embeds = text_projection(pooled)`, a linear map without bias.
//!
//! The encoder is a [`ClipStem`] (tokenizer, embeddings, final layer norm, projection) and its
//! [`ClipLayer`]s, run one at a time so that a caller can stream them ([`crate::streamed`]);
//! [`ClipTextEncoder`] keeps them all resident. With the activation `quick_gelu` (CLIP-L) a layer
//! is candle-transformers' `clip::text_model::ClipEncoder` holding that one layer, and the stem
//! computes what its `ClipTextTransformer` does around the layers, so the result is that model's
//! bit for bit. candle-transformers knows no other activation, so for the others (CLIP-G uses
//! exact `gelu`) the layer is `OwnLayer` below, with the same structure and keys.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{Activation, Embedding, LayerNorm, Linear, VarBuilder};
use candle_transformers::models::clip::EncoderConfig;
use candle_transformers::models::clip::text_model::{
    Activation as CandleActivation, ClipEncoder, ClipTextConfig as CandleClipConfig,
};
use hidream_weights::Checkpoint;
use serde::Deserialize;

use super::tokenize::{Length, PadWith, PromptTokenizer, Tokens};
use super::{MAX_SEQUENCE_LENGTH, open_weights, read_config};
use crate::{Result, TextError};

/// The CLIP token limit `_get_clip_prompt_embeds` applies instead of the tokenizer's.
const CLIP_TOKEN_LIMIT: usize = 218;
/// The stem's tensors, as [`ClipStem::load`] loads them.
pub(crate) const STEM_TENSORS: [&str; 5] = [
    "text_model.embeddings.token_embedding.weight",
    "text_model.embeddings.position_embedding.weight",
    "text_model.final_layer_norm.weight",
    "text_model.final_layer_norm.bias",
    "text_projection.weight",
];
/// The tokens every prompt is truncated and padded to.
pub(crate) const CLIP_TOKEN_COUNT: usize =
    if MAX_SEQUENCE_LENGTH < CLIP_TOKEN_LIMIT { MAX_SEQUENCE_LENGTH } else { CLIP_TOKEN_LIMIT };
/// transformers' marker of the legacy pooling (`CLIPTextTransformer.forward`).
const LEGACY_EOS_TOKEN_ID: u32 = 2;

/// The fields of transformers' `CLIPTextConfig` that the text model uses.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// transformers' default is 2, the legacy marker.
    #[serde(default = "default_eos_token_id")]
    pub eos_token_id: u32,
}

fn default_hidden_act() -> String {
    "quick_gelu".to_owned()
}

fn default_layer_norm_eps() -> f64 {
    1e-5
}

fn default_eos_token_id() -> u32 {
    LEGACY_EOS_TOKEN_ID
}

/// The resident part of a CLIP text encoder: config, tokenizer, token and position embeddings,
/// the final layer norm, the projection head and the opened checkpoint. The encoder layers are
/// loaded separately, so that a caller can stream them ([`crate::streamed`]).
#[derive(Debug)]
pub struct ClipStem {
    config: ClipConfig,
    tokenizer: PromptTokenizer,
    checkpoint: Checkpoint,
    token_embedding: Embedding,
    position_embedding: Embedding,
    final_layer_norm: LayerNorm,
    text_projection: Linear,
    layer_kind: LayerKind,
    dtype: DType,
    device: Device,
}

/// Which implementation the encoder layers use.
#[derive(Debug, Clone, Copy)]
enum LayerKind {
    /// candle-transformers' `ClipEncoder` layer: `quick_gelu` and layer norm eps 1e-5 only.
    Candle,
    /// [`OwnLayer`] with another activation.
    Own(Activation),
}

/// One prompt batch on its way through the layers.
#[derive(Debug)]
pub struct ClipPass {
    tokens: Tokens,
    hidden: Tensor,
    /// The additive causal mask `[T, T]`, f32.
    mask: Tensor,
    next_layer: usize,
}

impl ClipPass {
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// The index of the next layer to run.
    pub fn next_layer(&self) -> usize {
        self.next_layer
    }
}

impl ClipStem {
    /// Opens a `CLIPTextModelWithProjection` folder (`config.json` and `model.safetensors`) and
    /// its tokenizer folder (`tokenizer.json`), e.g. `text_encoder/` and `tokenizer/` of
    /// HiDream-I1, and loads everything but the encoder layers.
    pub fn load(encoder_dir: &Path, tokenizer_dir: &Path, dtype: DType, device: &Device) -> Result<ClipStem> {
        let config: ClipConfig = read_config(encoder_dir)?;
        let tokenizer = PromptTokenizer::load(
            tokenizer_dir,
            PadWith::PadToken { default: "<|endoftext|>" },
            Length::Fixed(CLIP_TOKEN_COUNT),
        )?;
        if tokenizer.max_length() > config.max_position_embeddings {
            return Err(TextError::invalid(
                encoder_dir.join("config.json").display().to_string(),
                format!(
                    "max_position_embeddings {} is less than the {} tokens the pipeline feeds",
                    config.max_position_embeddings,
                    tokenizer.max_length()
                ),
            ));
        }
        let layer_kind = if config.hidden_act == "quick_gelu" && config.layer_norm_eps == 1e-5 {
            LayerKind::Candle
        } else {
            LayerKind::Own(activation(&config, encoder_dir)?)
        };
        let checkpoint = open_weights(encoder_dir)?;
        let vb = checkpoint.var_builder(dtype, device);
        let embeddings = vb.pp("text_model.embeddings");
        let token_embedding =
            candle_nn::embedding(config.vocab_size, config.hidden_size, embeddings.pp("token_embedding"))?;
        let position_embedding = candle_nn::embedding(
            config.max_position_embeddings,
            config.hidden_size,
            embeddings.pp("position_embedding"),
        )?;
        let final_layer_norm =
            candle_nn::layer_norm(config.hidden_size, config.layer_norm_eps, vb.pp("text_model.final_layer_norm"))?;
        let text_projection =
            candle_nn::linear_no_bias(config.hidden_size, config.projection_dim, vb.pp("text_projection"))?;
        Ok(ClipStem {
            config,
            tokenizer,
            checkpoint,
            token_embedding,
            position_embedding,
            final_layer_norm,
            text_projection,
            layer_kind,
            dtype,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    /// The opened weights, for a caller that loads layers itself (see [`ClipLayer::prefix`]).
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The bytes of the stem's weights as loaded: what stays on the device while layers stream.
    pub fn resident_bytes(&self) -> u64 {
        let bias = self.final_layer_norm.bias().into_iter();
        [
            self.token_embedding.embeddings(),
            self.position_embedding.embeddings(),
            self.final_layer_norm.weight(),
            self.text_projection.weight(),
        ]
        .into_iter()
        .chain(bias)
        .map(crate::stage::loaded_bytes)
        .sum()
    }

    /// Builds layer `layer_idx` from a `VarBuilder` over full checkpoint keys (a checkpoint's, or
    /// one over the tensors of [`ClipLayer::prefix`] only).
    pub fn build_layer(&self, layer_idx: usize, vb: VarBuilder<'static>) -> Result<ClipLayer> {
        let body = match self.layer_kind {
            LayerKind::Candle => {
                // candle-transformers' encoder builds layers `0..n` under `layers.`: one layer,
                // its keys renamed from index 0 to `layer_idx`.
                let (from, to) = (ClipLayer::prefix(0), ClipLayer::prefix(layer_idx));
                let vb = vb.rename_f(move |name| name.replacen(&from, &to, 1));
                let one_layer = CandleClipConfig { num_hidden_layers: 1, ..candle_config(&self.config) };
                LayerBody::Candle(ClipEncoder::new(vb.pp("text_model.encoder"), &EncoderConfig::Text(one_layer))?)
            }
            LayerKind::Own(activation) => LayerBody::Own(OwnLayer::new(
                &self.config,
                activation,
                vb.pp(format!("text_model.encoder.layers.{layer_idx}")),
            )?),
        };
        Ok(ClipLayer { layer_idx, body })
    }

    /// Loads layer `layer_idx` from the checkpoint.
    pub fn load_layer(&self, layer_idx: usize) -> Result<ClipLayer> {
        self.build_layer(layer_idx, self.checkpoint.var_builder(self.dtype, &self.device))
    }

    /// Embeds tokenized prompts (token plus position embeddings) and builds the causal mask.
    pub fn begin(&self, tokens: Tokens) -> Result<ClipPass> {
        let ids = tokens.ids_tensor(&self.device)?;
        let (_, seq_len) = ids.dims2()?;
        // As candle-transformers' `ClipTextEmbeddings`: positions `[1, T]`, broadcast over the batch.
        let positions = Tensor::arange(0u32, seq_len as u32, &self.device)?.unsqueeze(0)?;
        let hidden =
            self.token_embedding.forward(&ids)?.broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(seq_len, &self.device)?;
        Ok(ClipPass { tokens, hidden, mask, next_layer: 0 })
    }

    /// Runs the next layer of the pass; layers must come in order.
    pub fn run_layer(&self, pass: &mut ClipPass, layer: &ClipLayer) -> Result<()> {
        if layer.layer_idx != pass.next_layer {
            return Err(TextError::invalid(
                "CLIP pass",
                format!("layer {} given where layer {} comes next", layer.layer_idx, pass.next_layer),
            ));
        }
        pass.hidden = match &layer.body {
            LayerBody::Candle(encoder) => encoder.forward(&pass.hidden, Some(&pass.mask))?,
            LayerBody::Own(own) => own.forward(&pass.hidden, &pass.mask)?,
        };
        pass.next_layer += 1;
        Ok(())
    }

    /// `text_embeds` `[B, projection_dim]`: the final layer norm, pooled, then projected.
    pub fn finish(&self, pass: ClipPass) -> Result<Tensor> {
        if pass.next_layer != self.config.num_hidden_layers {
            return Err(TextError::invalid(
                "CLIP pass",
                format!("finished after {} of {} layers", pass.next_layer, self.config.num_hidden_layers),
            ));
        }
        let hidden = self.final_layer_norm.forward(&pass.hidden)?;
        let pooled = pass
            .tokens
            .ids()
            .iter()
            .enumerate()
            .map(|(batch_idx, row)| hidden.i((batch_idx, pooled_position(self.config.eos_token_id, row))))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let pooled = Tensor::stack(&pooled, 0)?;
        Ok(self.text_projection.forward(&pooled)?)
    }
}

/// A CLIP text encoder with its projection head and tokenizer, every layer resident.
#[derive(Debug)]
pub struct ClipTextEncoder {
    stem: ClipStem,
    layers: Vec<ClipLayer>,
}

impl ClipTextEncoder {
    /// Loads the stem and every layer (see [`ClipStem::load`] for the folder layout).
    pub fn load(encoder_dir: &Path, tokenizer_dir: &Path, dtype: DType, device: &Device) -> Result<ClipTextEncoder> {
        let stem = ClipStem::load(encoder_dir, tokenizer_dir, dtype, device)?;
        let layers = (0..stem.config.num_hidden_layers)
            .map(|layer_idx| stem.load_layer(layer_idx))
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipTextEncoder { stem, layers })
    }

    pub fn config(&self) -> &ClipConfig {
        self.stem.config()
    }

    pub fn tokenizer(&self) -> &PromptTokenizer {
        self.stem.tokenizer()
    }

    pub fn stem(&self) -> &ClipStem {
        &self.stem
    }

    /// `text_embeds` of each prompt: `[B, projection_dim]`.
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor> {
        let tokens = self.stem.tokenizer.encode(prompts)?;
        self.forward(&tokens)
    }

    /// `text_embeds` of tokenized prompts.
    pub fn forward(&self, tokens: &Tokens) -> Result<Tensor> {
        let mut pass = self.stem.begin(tokens.clone())?;
        for layer in &self.layers {
            self.stem.run_layer(&mut pass, layer)?;
        }
        self.stem.finish(pass)
    }
}

/// One encoder layer. Keys under `text_model.encoder.layers.{layer_idx}.`.
#[derive(Debug)]
pub struct ClipLayer {
    layer_idx: usize,
    body: LayerBody,
}

#[derive(Debug)]
enum LayerBody {
    /// candle-transformers' encoder holding this one layer.
    Candle(ClipEncoder),
    Own(OwnLayer),
}

impl ClipLayer {
    /// The checkpoint key prefix of layer `layer_idx`'s tensors.
    pub fn prefix(layer_idx: usize) -> String {
        format!("text_model.encoder.layers.{layer_idx}.")
    }

    pub fn layer_idx(&self) -> usize {
        self.layer_idx
    }
}

/// The token whose hidden state is pooled, as transformers picks it.
fn pooled_position(eos_token_id: u32, ids: &[u32]) -> usize {
    if eos_token_id == LEGACY_EOS_TOKEN_ID {
        // `input_ids.argmax(-1)`: the first of equal maxima.
        let max = ids.iter().copied().max().unwrap_or(0);
        ids.iter().position(|&id| id == max).unwrap_or(0)
    } else {
        // `(input_ids == eos_token_id).int().argmax(-1)`: 0 when the eos is absent.
        ids.iter().position(|&id| id == eos_token_id).unwrap_or(0)
    }
}

fn candle_config(config: &ClipConfig) -> CandleClipConfig {
    CandleClipConfig {
        vocab_size: config.vocab_size,
        embed_dim: config.hidden_size,
        activation: CandleActivation::QuickGelu,
        intermediate_size: config.intermediate_size,
        max_position_embeddings: config.max_position_embeddings,
        pad_with: None,
        num_hidden_layers: config.num_hidden_layers,
        num_attention_heads: config.num_attention_heads,
        projection_dim: config.projection_dim,
    }
}

fn activation(config: &ClipConfig, dir: &Path) -> Result<Activation> {
    if config.hidden_act == "quick_gelu" {
        // Only reached with a layer norm eps other than candle-transformers' fixed 1e-5.
        return Err(TextError::invalid(
            dir.join("config.json").display().to_string(),
            format!("quick_gelu with layer_norm_eps {} is not supported", config.layer_norm_eps),
        ));
    }
    serde_json::from_value(serde_json::Value::String(config.hidden_act.clone())).map_err(|_| {
        TextError::invalid(
            dir.join("config.json").display().to_string(),
            format!("unsupported hidden_act `{}`", config.hidden_act),
        )
    })
}

/// One pre-norm CLIP encoder layer for activations that candle-transformers' CLIP lacks: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug)]
struct OwnLayer {
    layer_norm1: LayerNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
    n_heads: usize,
}

impl OwnLayer {
    fn new(config: &ClipConfig, activation: Activation, vb: VarBuilder) -> Result<OwnLayer> {
        let (hidden, inner) = (config.hidden_size, config.intermediate_size);
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(OwnLayer {
            layer_norm1: candle_nn::layer_norm(hidden, config.layer_norm_eps, vb.pp("layer_norm1"))?,
            q_proj: candle_nn::linear(hidden, hidden, attn.pp("q_proj"))?,
            k_proj: candle_nn::linear(hidden, hidden, attn.pp("k_proj"))?,
            v_proj: candle_nn::linear(hidden, hidden, attn.pp("v_proj"))?,
            out_proj: candle_nn::linear(hidden, hidden, attn.pp("out_proj"))?,
            layer_norm2: candle_nn::layer_norm(hidden, config.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(hidden, inner, mlp.pp("fc1"))?,
            fc2: candle_nn::linear(inner, hidden, mlp.pp("fc2"))?,
            activation,
            n_heads: config.num_attention_heads,
        })
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let normed = self.layer_norm1.forward(xs)?;
        let xs = (xs + self.attention(&normed, mask)?)?;
        let normed = self.layer_norm2.forward(&xs)?;
        let mlp = self.fc2.forward(&self.activation.forward(&self.fc1.forward(&normed)?)?)?;
        Ok((xs + mlp)?)
    }

    /// Softmax attention in f32 with an additive `[T, T]` mask.
    fn attention(&self, xs: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (batch, seq_len, hidden) = xs.dims3()?;
        let head_dim = hidden / self.n_heads;
        let heads = |proj: &Linear| -> candle_core::Result<Tensor> {
            proj.forward(xs)?
                .reshape((batch, seq_len, self.n_heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()?
                .to_dtype(DType::F32)
        };
        let (q, k, v) = (heads(&self.q_proj)?, heads(&self.k_proj)?, heads(&self.v_proj)?);
        let scores = (q.matmul(&k.t()?)? * (head_dim as f64).powf(-0.5))?.broadcast_add(mask)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = weights.matmul(&v)?.to_dtype(xs.dtype())?.transpose(1, 2)?.reshape((batch, seq_len, hidden))?;
        Ok(self.out_proj.forward(&out)?)
    }
}

/// `[T, T]` f32: 0 on and below the diagonal, the most negative f32 above (transformers' value).
fn causal_mask(seq_len: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> =
        (0..seq_len).flat_map(|query| (0..seq_len).map(move |key| if key > query { f32::MIN } else { 0.0 })).collect();
    Tensor::from_vec(mask, (seq_len, seq_len), device)
}

#[cfg(test)]
mod tests {
    use super::pooled_position;

    #[test]
    fn pooling_follows_transformers() {
        // Legacy (eos_token_id 2): the first largest id, whatever the eos.
        assert_eq!(pooled_position(2, &[7, 3, 9, 9, 9]), 2);
        assert_eq!(pooled_position(2, &[7, 3, 9, 4, 1]), 2);
        // Otherwise the first eos, and 0 when there is none.
        assert_eq!(pooled_position(1, &[0, 5, 6, 1, 2, 2]), 3);
        assert_eq!(pooled_position(1, &[0, 5, 6]), 0);
    }
}
