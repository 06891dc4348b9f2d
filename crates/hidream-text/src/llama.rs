//! Llama-3.1-8B-Instruct as a text encoder: every layer's hidden state, as
//! `HiDreamImagePipeline._get_llama3_prompt_embeds` takes them from `LlamaForCausalLM(...,
//! output_hidden_states=True).hidden_states[1:]`, stacked to `[n_layers, B, T, hidden]`.
//!
//! - `T = min(max_sequence_length, model_max_length)` = 128 tokens: `<|begin_of_text|>`, the
//!   prompt, then the eos token (`<|eot_id|>`) as padding, with the padding mask.
//! - The mask is causal plus padding: key `k` is visible to query `q` when `k <= q` and `k` is not
//!   padding. With right padding the prompt's tokens never see the padding anyway; the padded
//!   positions see the prompt but not each other (nor themselves). Positions are `0..T` whatever the
//!   padding.
//! - The last entry is transformers' `last_hidden_state`: the final RMSNorm of the last layer's
//!   output (`capture_outputs(tie_last_hidden_states=True)` replaces the raw one). The others are
//!   raw layer outputs.
//!
//! candle-transformers' `llama::Llama` returns only the last token's logits, keeps `Block` private
//! and knows no padding mask, so the decoder layer is written here ([`LlamaLayer`]); it reuses
//! candle-transformers' `utils::repeat_kv` and candle-nn's `rope` and `RmsNorm`.
//!
//! A pass runs one layer at a time, so a caller can stream the layers:
//! ```ignore
//! let stem = LlamaStem::load(dir, dtype, &device)?;
//! let mut pass = stem.begin(&prompts)?;
//! for layer_idx in 0..stem.config().num_hidden_layers {
//!     let layer = stem.load_layer(layer_idx)?; // or LlamaLayer::new(cfg, layer_idx, unit_vb)
//!     stem.run_layer(&mut pass, &layer)?;
//! }
//! let hidden_states = stem.finish(pass)?; // [n_layers, B, T, hidden]
//! ```

use std::f32::consts::PI;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, RmsNorm, VarBuilder};
use hidream_weights::Checkpoint;
use serde::Deserialize;

use super::tokenize::{Length, PadWith, PromptTokenizer, Tokens};
use super::{MAX_SEQUENCE_LENGTH, open_weights, read_config};
use crate::{Result, TextError};

/// The token embedding table's key.
const EMBED_TOKENS: &str = "model.embed_tokens.weight";
/// The stem's tensors, as [`LlamaStem::load`] loads them: the final norm. Neither the embedding
/// table (a pass reads its rows) nor `lm_head` (the encoder has no logits) is loaded.
pub(crate) const STEM_TENSORS: [&str; 1] = ["model.norm.weight"];

/// The fields of transformers' `LlamaConfig` the encoder uses, in both the transformers 4 layout
/// (`rope_theta`, `rope_scaling`) and the transformers 5 one (`rope_parameters`).
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f32>,
    #[serde(default)]
    pub rope_scaling: Option<RopeParameters>,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

/// `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    #[serde(default)]
    pub rope_theta: Option<f32>,
    #[serde(default)]
    pub factor: Option<f32>,
    #[serde(default)]
    pub low_freq_factor: Option<f32>,
    #[serde(default)]
    pub high_freq_factor: Option<f32>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn default_hidden_act() -> String {
    "silu".to_owned()
}

impl LlamaConfig {
    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    /// The RoPE inverse frequencies `[head_dim / 2]`, in f32 as transformers computes them
    /// (`_compute_default_rope_parameters`, then `_compute_llama3_parameters` for `llama3`).
    pub fn inv_freq(&self) -> std::result::Result<Vec<f32>, String> {
        let params = self.rope_parameters.as_ref().or(self.rope_scaling.as_ref());
        let theta = params.and_then(|params| params.rope_theta).or(self.rope_theta).unwrap_or(10_000.0);
        let dim = self.head_dim();
        let inv_freq: Vec<f32> = (0..dim).step_by(2).map(|idx| 1.0 / theta.powf(idx as f32 / dim as f32)).collect();
        let rope_type = params.and_then(|params| params.rope_type.as_deref()).unwrap_or("default");
        match (rope_type, params) {
            ("default", _) => Ok(inv_freq),
            ("llama3", Some(params)) => llama3_inv_freq(&inv_freq, params),
            (other, _) => Err(format!("rope type `{other}` is not supported (only default and llama3)")),
        }
    }
}

/// Llama 3's frequency-dependent RoPE scaling, in transformers' order of f32 operations.
fn llama3_inv_freq(inv_freq: &[f32], params: &RopeParameters) -> std::result::Result<Vec<f32>, String> {
    let missing = |field: &str| format!("llama3 rope parameters lack `{field}`");
    let factor = params.factor.ok_or_else(|| missing("factor"))?;
    let low = params.low_freq_factor.ok_or_else(|| missing("low_freq_factor"))?;
    let high = params.high_freq_factor.ok_or_else(|| missing("high_freq_factor"))?;
    let old_context =
        params.original_max_position_embeddings.ok_or_else(|| missing("original_max_position_embeddings"))? as f32;
    let low_freq_wavelen = old_context / low;
    let high_freq_wavelen = old_context / high;
    Ok(inv_freq
        .iter()
        .map(|&freq| {
            let wavelen = 2.0 * PI / freq;
            let scaled = if wavelen > low_freq_wavelen { freq / factor } else { freq };
            // `~(wavelen < high) * ~(wavelen > low)`.
            let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
            if is_medium {
                let smooth = (old_context / wavelen - low) / (high - low);
                (1.0 - smooth) * scaled / factor + smooth * scaled
            } else {
                scaled
            }
        })
        .collect())
}

/// The resident part of the encoder: config, tokenizer, final norm, RoPE frequencies and the
/// opened checkpoint. Layers are loaded separately, and the token embedding table never is: a
/// pass reads only its tokens' rows from the checkpoint.
#[derive(Debug)]
pub struct LlamaStem {
    config: LlamaConfig,
    tokenizer: PromptTokenizer,
    checkpoint: Checkpoint,
    norm: RmsNorm,
    inv_freq: Vec<f32>,
    dtype: DType,
    device: Device,
}

/// One prompt batch on its way through the layers.
#[derive(Debug)]
pub struct LlamaPass {
    tokens: Tokens,
    hidden: Tensor,
    /// Additive `[B, 1, T, T]` f32 mask: 0 where visible, the most negative f32 elsewhere.
    mask: Tensor,
    cos: Tensor,
    sin: Tensor,
    /// The output of every layer run so far.
    states: Vec<Tensor>,
}

impl LlamaPass {
    pub fn tokens(&self) -> &Tokens {
        &self.tokens
    }

    /// The index of the next layer to run.
    pub fn next_layer(&self) -> usize {
        self.states.len()
    }
}

impl LlamaStem {
    /// Opens a `LlamaForCausalLM` folder in the Hugging Face layout (`config.json`,
    /// `model.safetensors` or `model.safetensors.index.json` with its shards, `tokenizer.json`,
    /// `tokenizer_config.json`) and loads everything but the layers.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<LlamaStem> {
        let config: LlamaConfig = read_config(dir)?;
        let config_file = || dir.join("config.json").display().to_string();
        if config.hidden_act != "silu" || config.attention_bias || config.mlp_bias {
            return Err(TextError::invalid(
                config_file(),
                "only Llama with silu, no attention bias and no mlp bias is supported",
            ));
        }
        let inv_freq = config.inv_freq().map_err(|problem| TextError::invalid(config_file(), problem))?;
        let tokenizer = PromptTokenizer::load(dir, PadWith::EosToken, Length::AtMostModelMax(MAX_SEQUENCE_LENGTH))?;
        let checkpoint = open_weights(dir)?;
        let vb = checkpoint.var_builder(dtype, device);
        // The embedding table (1 GB in bf16 for Llama-3.1-8B) is not loaded: each pass reads only
        // its tokens' rows. Its shape is checked now, before any long work.
        let expected = [config.vocab_size, config.hidden_size];
        let info = checkpoint.require_tensor(EMBED_TOKENS)?;
        if info.shape != expected {
            return Err(hidream_weights::WeightsError::ShapeMismatch {
                file: info.file,
                tensor: EMBED_TOKENS.to_owned(),
                expected: expected.to_vec(),
                actual: info.shape,
            }
            .into());
        }
        let norm = candle_nn::rms_norm(config.hidden_size, config.rms_norm_eps, vb.pp("model.norm"))?;
        Ok(LlamaStem { config, tokenizer, checkpoint, norm, inv_freq, dtype, device: device.clone() })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    /// The opened weights, for a caller that loads layers itself (see [`LlamaLayer::prefix`]).
    pub fn checkpoint(&self) -> &Checkpoint {
        &self.checkpoint
    }

    /// The bytes of the stem's weights as loaded: what stays on the device while layers stream.
    pub fn resident_bytes(&self) -> u64 {
        crate::stage::loaded_bytes(self.norm.weight())
    }

    /// Loads layer `layer_idx` from the checkpoint in the stem's dtype and device.
    pub fn load_layer(&self, layer_idx: usize) -> Result<LlamaLayer> {
        LlamaLayer::new(&self.config, layer_idx, self.checkpoint.var_builder(self.dtype, &self.device))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Tokenizes and embeds the prompts.
    pub fn begin(&self, prompts: &[&str]) -> Result<LlamaPass> {
        let tokens = self.tokenizer.encode(prompts)?;
        self.begin_tokens(tokens)
    }

    /// Embeds tokenized prompts and builds their mask and rotary tables.
    pub fn begin_tokens(&self, tokens: Tokens) -> Result<LlamaPass> {
        let (batch, seq_len) = (tokens.n_prompts(), tokens.len());
        // The rows of the prompts' tokens, as `Embedding::forward` would pick them from the table.
        let ids: Vec<u32> = tokens.ids().iter().flatten().copied().collect();
        let hidden = self.checkpoint.load_rows(EMBED_TOKENS, &ids, self.dtype, &self.device)?.reshape((
            batch,
            seq_len,
            self.config.hidden_size,
        ))?;
        let mut mask = Vec::with_capacity(batch * seq_len * seq_len);
        for row in tokens.mask() {
            for query in 0..seq_len {
                mask.extend((0..seq_len).map(|key| if key <= query && row[key] != 0 { 0.0 } else { f32::MIN }));
            }
        }
        let mask = Tensor::from_vec(mask, (batch, 1, seq_len, seq_len), &self.device)?;
        // `freqs = position * inv_freq` in f32, then cos and sin, cast to the compute dtype.
        let half = self.inv_freq.len();
        let freqs: Vec<f32> =
            (0..seq_len).flat_map(|pos| self.inv_freq.iter().map(move |&freq| pos as f32 * freq)).collect();
        let freqs = Tensor::from_vec(freqs, (seq_len, half), &self.device)?;
        let cos = freqs.cos()?.to_dtype(self.dtype)?;
        let sin = freqs.sin()?.to_dtype(self.dtype)?;
        Ok(LlamaPass { tokens, hidden, mask, cos, sin, states: Vec::new() })
    }

    /// Runs the next layer of the pass; layers must come in order.
    pub fn run_layer(&self, pass: &mut LlamaPass, layer: &LlamaLayer) -> Result<()> {
        if layer.layer_idx != pass.next_layer() {
            return Err(TextError::invalid(
                "Llama pass",
                format!("layer {} given where layer {} comes next", layer.layer_idx, pass.next_layer()),
            ));
        }
        let hidden = layer.forward(&pass.hidden, &pass.mask, &pass.cos, &pass.sin)?;
        pass.states.push(hidden.clone());
        pass.hidden = hidden;
        Ok(())
    }

    /// Every layer's hidden state, `[n_layers, B, T, hidden]`, the last one after the final norm.
    pub fn finish(&self, pass: LlamaPass) -> Result<Tensor> {
        let mut states = pass.states;
        if states.len() != self.config.num_hidden_layers {
            return Err(TextError::invalid(
                "Llama pass",
                format!("finished after {} of {} layers", states.len(), self.config.num_hidden_layers),
            ));
        }
        if let Some(last) = states.last_mut() {
            *last = self.norm.forward(last)?;
        }
        Ok(Tensor::stack(&states, 0)?)
    }
}

/// The Llama encoder with every layer resident.
#[derive(Debug)]
pub struct LlamaTextEncoder {
    stem: LlamaStem,
    layers: Vec<LlamaLayer>,
}

impl LlamaTextEncoder {
    /// Loads the stem and every layer (see [`LlamaStem::load`] for the folder layout).
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<LlamaTextEncoder> {
        let stem = LlamaStem::load(dir, dtype, device)?;
        let layers = (0..stem.config.num_hidden_layers)
            .map(|layer_idx| stem.load_layer(layer_idx))
            .collect::<Result<Vec<_>>>()?;
        Ok(LlamaTextEncoder { stem, layers })
    }

    pub fn stem(&self) -> &LlamaStem {
        &self.stem
    }

    /// Every layer's hidden state of each prompt: `[n_layers, B, 128, hidden]`.
    pub fn encode(&self, prompts: &[&str]) -> Result<Tensor> {
        let tokens = self.stem.tokenizer.encode(prompts)?;
        self.forward(tokens)
    }

    /// Every layer's hidden state of tokenized prompts.
    pub fn forward(&self, tokens: Tokens) -> Result<Tensor> {
        let mut pass = self.stem.begin_tokens(tokens)?;
        for layer in &self.layers {
            self.stem.run_layer(&mut pass, layer)?;
        }
        self.stem.finish(pass)
    }
}

/// One decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`. Keys under
/// `model.layers.{layer_idx}.`.
#[derive(Debug)]
pub struct LlamaLayer {
    layer_idx: usize,
    input_layernorm: RmsNorm,
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

impl LlamaLayer {
    /// The prefix of every tensor of layer `layer_idx`, for `Checkpoint::load_prefixes`.
    pub fn prefix(layer_idx: usize) -> String {
        format!("model.layers.{layer_idx}.")
    }

    /// Builds layer `layer_idx` from a `VarBuilder` over full checkpoint keys (a checkpoint's, or
    /// one over the tensors of [`LlamaLayer::prefix`] only).
    pub fn new(config: &LlamaConfig, layer_idx: usize, vb: VarBuilder) -> Result<LlamaLayer> {
        let vb = vb.pp(format!("model.layers.{layer_idx}"));
        let (hidden, inner, head_dim) = (config.hidden_size, config.intermediate_size, config.head_dim());
        let (n_heads, n_kv_heads) = (config.num_attention_heads, config.num_key_value_heads());
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(LlamaLayer {
            layer_idx,
            input_layernorm: candle_nn::rms_norm(hidden, config.rms_norm_eps, vb.pp("input_layernorm"))?,
            q_proj: candle_nn::linear_no_bias(hidden, n_heads * head_dim, attn.pp("q_proj"))?,
            k_proj: candle_nn::linear_no_bias(hidden, n_kv_heads * head_dim, attn.pp("k_proj"))?,
            v_proj: candle_nn::linear_no_bias(hidden, n_kv_heads * head_dim, attn.pp("v_proj"))?,
            o_proj: candle_nn::linear_no_bias(n_heads * head_dim, hidden, attn.pp("o_proj"))?,
            post_attention_layernorm: candle_nn::rms_norm(
                hidden,
                config.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            gate_proj: candle_nn::linear_no_bias(hidden, inner, mlp.pp("gate_proj"))?,
            up_proj: candle_nn::linear_no_bias(hidden, inner, mlp.pp("up_proj"))?,
            down_proj: candle_nn::linear_no_bias(inner, hidden, mlp.pp("down_proj"))?,
            n_heads,
            n_kv_heads,
            head_dim,
        })
    }

    pub fn layer_idx(&self) -> usize {
        self.layer_idx
    }

    fn forward(&self, xs: &Tensor, mask: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let attended = self.attention(&self.input_layernorm.forward(xs)?, mask, cos, sin)?;
        let xs = (xs + attended)?;
        let normed = self.post_attention_layernorm.forward(&xs)?;
        let gated = (candle_nn::ops::silu(&self.gate_proj.forward(&normed)?)? * self.up_proj.forward(&normed)?)?;
        Ok((xs + self.down_proj.forward(&gated)?)?)
    }

    /// Rotary attention with grouped keys and values; scores and softmax in f32.
    fn attention(&self, xs: &Tensor, mask: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let (batch, seq_len, _) = xs.dims3()?;
        let heads = |proj: &Linear, n_heads: usize| -> candle_core::Result<Tensor> {
            proj.forward(xs)?.reshape((batch, seq_len, n_heads, self.head_dim))?.transpose(1, 2)?.contiguous()
        };
        let q = candle_nn::rotary_emb::rope(&heads(&self.q_proj, self.n_heads)?, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&heads(&self.k_proj, self.n_kv_heads)?, cos, sin)?;
        let v = heads(&self.v_proj, self.n_kv_heads)?;
        let n_rep = self.n_heads / self.n_kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, n_rep)?.contiguous()?.to_dtype(DType::F32)?;
        let v = candle_transformers::utils::repeat_kv(v, n_rep)?.contiguous()?.to_dtype(DType::F32)?;
        let q = q.to_dtype(DType::F32)?;
        let scores = (q.matmul(&k.t()?)? * (self.head_dim as f64).powf(-0.5))?.broadcast_add(mask)?;
        let weights = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = weights.matmul(&v)?.to_dtype(xs.dtype())?.transpose(1, 2)?.reshape((
            batch,
            seq_len,
            self.n_heads * self.head_dim,
        ))?;
        Ok(self.o_proj.forward(&out)?)
    }
}
