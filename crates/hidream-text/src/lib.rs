//! The four text encoders of HiDream-I1 and their tokenizers, exact against diffusers'
//! `HiDreamImagePipeline.encode_prompt`:
//!
//! - [`clip::ClipTextEncoder`]: CLIP-L (`text_encoder/`, `tokenizer/`) and CLIP-G
//!   (`text_encoder_2/`, `tokenizer_2/`), projected pooled embeddings, concatenated
//!   `[CLIP-L | CLIP-G]` into the pooled embeds `[B, 768 + 1280]`; [`clip::ClipStem`] runs it one
//!   layer at a time for a streaming caller.
//! - [`t5::T5TextEncoder`]: the T5-XXL encoder (`text_encoder_3/`, `tokenizer_3/`), last hidden
//!   state `[B, 128, 4096]`.
//! - [`llama::LlamaTextEncoder`]: Llama-3.1-8B-Instruct, every layer's hidden state
//!   `[32, B, 128, 4096]`; [`llama::LlamaStem`] runs it one layer at a time for a streaming caller.
//!
//! Each encoder is loaded with `load(dirs, dtype, device)` and encodes with `encode(prompts)`;
//! [`encode_prompts_under`] runs the four in turn under a memory policy, each freed before the next
//! is loaded, and returns with the embeddings what each stage measured ([`TextStageReport`]) and
//! which prompts were truncated ([`Truncation`]). Prompts are
//! tokenized with the `tokenizers` crate from each folder's `tokenizer.json`, truncated and padded
//! to [`MAX_SEQUENCE_LENGTH`] tokens as the pipeline does. The negative prompt is the caller's
//! business (diffusers encodes `""`).
//!
//! Each encoder is a stage under the pipeline's memory policy: its stem stays resident and its
//! layers are placed by the policy, the stem counting against the same budget.
//! [`text_stage_plans`] plans every stage from `config.json` and the safetensors headers, before
//! anything large is loaded.
//!
//! Weights are read through `hidream_weights::Checkpoint`: a folder with one `*.safetensors` file,
//! or transformers' `model.safetensors.index.json` with its shards. [`resolve_folder`] finds a
//! model folder in the local Hugging Face Hub cache.
//!
//! This is the only crate of the workspace that knows tokenizers and the Hub cache (the
//! `tokenizers` and `hf-hub` crates). It must NOT know the transformer (hidream-model), the
//! pipeline, the samplers or the command line. All four encoders stream by layer through
//! hidream-memory's residency runtime ([`streamed`]), with no HiDream transformer types involved.
#![forbid(unsafe_code)]

pub mod clip;
mod error;
mod hub;
pub mod llama;
mod stage;
pub mod streamed;
pub mod t5;
mod tokenize;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use hidream_weights::Checkpoint;
use serde::de::DeserializeOwned;

pub use clip::ClipTextEncoder;
pub use error::{Result, TextError};
pub use hub::resolve_folder;
pub use llama::{LlamaLayer, LlamaPass, LlamaStem, LlamaTextEncoder};
pub use stage::{TextEncoderKind, TextStagePlan, TextStageReport, Truncation, text_stage_plan, text_stage_plans};
pub use t5::T5TextEncoder;
pub use tokenize::{Length, PadWith, PromptTokenizer, Tokens};

/// The pipeline's `max_sequence_length` (diffusers' default): T5 and Llama get
/// `min(128, model_max_length)` tokens, the CLIPs `min(128, 218)`.
pub const MAX_SEQUENCE_LENGTH: usize = 128;

/// Where the text encoders and tokenizers live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextEncoderPaths {
    pub clip_l: PathBuf,
    pub clip_l_tokenizer: PathBuf,
    pub clip_g: PathBuf,
    pub clip_g_tokenizer: PathBuf,
    pub t5: PathBuf,
    pub t5_tokenizer: PathBuf,
    /// A `LlamaForCausalLM` folder holding its tokenizer too.
    pub llama: PathBuf,
}

impl TextEncoderPaths {
    /// The Hugging Face layout of HiDream-I1: `text_encoder{,_2,_3}/` and `tokenizer{,_2,_3}/`
    /// under `model_root`, and Llama (not part of the HiDream repositories) in `llama_dir`.
    pub fn hub_layout(model_root: &Path, llama_dir: &Path) -> TextEncoderPaths {
        TextEncoderPaths {
            clip_l: model_root.join("text_encoder"),
            clip_l_tokenizer: model_root.join("tokenizer"),
            clip_g: model_root.join("text_encoder_2"),
            clip_g_tokenizer: model_root.join("tokenizer_2"),
            t5: model_root.join("text_encoder_3"),
            t5_tokenizer: model_root.join("tokenizer_3"),
            llama: llama_dir.to_owned(),
        }
    }
}

/// What the transformer takes from the text stack, for a batch of prompts, and what each stage
/// measured.
#[derive(Debug, Clone)]
pub struct PromptEmbeds {
    /// `[B, 768 + 1280]`: CLIP-L then CLIP-G `text_embeds`.
    pub pooled: Tensor,
    /// `[B, 128, 4096]`: T5's last hidden state.
    pub t5: Tensor,
    /// `[32, B, 128, 4096]`: every Llama layer's hidden state.
    pub llama: Tensor,
    /// Each prompt an encoder truncated, and by how much, in the stages' order.
    pub truncations: Vec<Truncation>,
    /// One report per stage, in the order they ran (CLIP-L, CLIP-G, T5, Llama).
    pub stages: Vec<TextStageReport>,
}

/// Encodes `prompts` with the four encoders in turn, each loaded, used and freed before the next
/// (CLIP-L, CLIP-G, T5, Llama: diffusers' offload order), all in `dtype` on `device`, with every
/// layer resident.
pub fn encode_prompts(
    paths: &TextEncoderPaths,
    prompts: &[&str],
    dtype: DType,
    device: &Device,
) -> Result<PromptEmbeds> {
    encode_prompts_under(paths, prompts, dtype, device, hidream_memory::Policy::All)
}

/// [`encode_prompts`] with each encoder's layers placed by `policy` (streamed through the
/// residency runtime under a budget, beside its resident stem); the result is bit-identical
/// whatever the policy. Every stage is planned from the headers first ([`text_stage_plans`]), so a
/// budget too small for any of them fails before anything large is loaded.
pub fn encode_prompts_under(
    paths: &TextEncoderPaths,
    prompts: &[&str],
    dtype: DType,
    device: &Device,
    policy: hidream_memory::Policy,
) -> Result<PromptEmbeds> {
    let plans = text_stage_plans(paths, dtype, policy)?;
    let mut outputs = Vec::with_capacity(plans.len());
    let mut truncations = Vec::new();
    let mut stages = Vec::with_capacity(plans.len());
    for plan in plans {
        let started = Instant::now();
        let encoded = match plan.encoder {
            TextEncoderKind::ClipL => {
                streamed::encode_clip_streamed(&paths.clip_l, &paths.clip_l_tokenizer, prompts, policy, dtype, device)?
            }
            TextEncoderKind::ClipG => {
                streamed::encode_clip_streamed(&paths.clip_g, &paths.clip_g_tokenizer, prompts, policy, dtype, device)?
            }
            TextEncoderKind::T5 => {
                streamed::encode_t5_streamed(&paths.t5, &paths.t5_tokenizer, prompts, policy, dtype, device)?
            }
            TextEncoderKind::Llama => streamed::encode_llama_streamed(&paths.llama, prompts, policy, dtype, device)?,
        };
        truncations.extend(Truncation::of(plan.encoder, &encoded.tokens));
        outputs.push(encoded.hidden_states);
        stages.push(TextStageReport {
            plan,
            peak_weight_bytes: encoded.peak_weight_bytes,
            stats: encoded.stats,
            seconds: started.elapsed().as_secs_f64(),
        });
    }
    let [clip_l, clip_g, t5, llama] = <[Tensor; 4]>::try_from(outputs)
        .map_err(|outputs| TextError::invalid("text stages", format!("{} outputs, not 4", outputs.len())))?;
    let pooled = Tensor::cat(&[clip_l, clip_g], 1)?;
    Ok(PromptEmbeds { pooled, t5, llama, truncations, stages })
}

/// transformers' shard index.
const TRANSFORMERS_INDEX: &str = "model.safetensors.index.json";

/// Opens the weights of a transformers model folder: `model.safetensors.index.json` with its
/// shards, or the folder's one `*.safetensors` file.
pub(crate) fn open_weights(dir: &Path) -> Result<Checkpoint> {
    let index = dir.join(TRANSFORMERS_INDEX);
    if index.is_file() {
        return Ok(Checkpoint::open(&index)?);
    }
    let has_safetensors = std::fs::read_dir(dir)
        .map_err(|source| TextError::Io { path: dir.to_owned(), source })?
        .filter_map(std::result::Result::ok)
        .any(|entry| entry.path().extension().is_some_and(|ext| ext == "safetensors"));
    if !has_safetensors {
        return Err(TextError::MissingFile {
            path: dir.join("model.safetensors"),
            hint: format!(
                "download the model's safetensors weights (and `{TRANSFORMERS_INDEX}` if sharded) into {}",
                dir.display()
            ),
        });
    }
    Ok(Checkpoint::open(dir)?)
}

/// Reads `dir/config.json`.
pub(crate) fn read_config<T: DeserializeOwned>(dir: &Path) -> Result<T> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(TextError::MissingFile {
            path,
            hint: "download the model folder with its `config.json` (transformers' `save_pretrained` writes it)".into(),
        });
    }
    let text = std::fs::read_to_string(&path).map_err(|source| TextError::Io { path: path.clone(), source })?;
    serde_json::from_str(&text).map_err(|err| TextError::invalid(path.display().to_string(), err.to_string()))
}
