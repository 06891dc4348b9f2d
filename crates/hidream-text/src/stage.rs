//! The text stages of the pipeline under one memory policy, planned from the checkpoint headers
//! before anything large is loaded, what each one measured when it ran, and which prompts it
//! truncated ([`Truncation`]).
//!
//! A stage is one encoder: its stem (embeddings, norms, projection) stays resident while its
//! layers are placed by the policy, resident or streamed through slots (see [`crate::streamed`]).
//! The stem counts against the same budget as the layers: a stage needs its stem's bytes plus what
//! hidream-memory's planner needs for the layers, and [`text_stage_plans`] says so, or fails with
//! [`TextError::StageBudgetTooSmall`], from `config.json` and the safetensors headers alone.

use std::fmt;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use hidream_memory::{MemoryError, Plan, Policy, PrefetchStats, UnitSpec};
use hidream_weights::Checkpoint;

use crate::clip::{self, ClipConfig, ClipLayer};
use crate::llama::{self, LlamaConfig, LlamaLayer};
use crate::t5::{self, T5Block};
use crate::{Result, TextEncoderPaths, TextError, open_weights, read_config, streamed};

/// The four text encoders of HiDream-I1, in the order the pipeline runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TextEncoderKind {
    ClipL,
    ClipG,
    T5,
    Llama,
}

impl TextEncoderKind {
    /// Every encoder, in the pipeline's order (diffusers' offload order).
    pub const ALL: [TextEncoderKind; 4] =
        [TextEncoderKind::ClipL, TextEncoderKind::ClipG, TextEncoderKind::T5, TextEncoderKind::Llama];

    /// The name in messages and reports: `CLIP-L`, `CLIP-G`, `T5`, `Llama`.
    pub fn name(self) -> &'static str {
        match self {
            TextEncoderKind::ClipL => "CLIP-L",
            TextEncoderKind::ClipG => "CLIP-G",
            TextEncoderKind::T5 => "T5",
            TextEncoderKind::Llama => "Llama",
        }
    }

    /// The folder of its weights and config.
    pub fn folder(self, paths: &TextEncoderPaths) -> &Path {
        match self {
            TextEncoderKind::ClipL => &paths.clip_l,
            TextEncoderKind::ClipG => &paths.clip_g,
            TextEncoderKind::T5 => &paths.t5,
            TextEncoderKind::Llama => &paths.llama,
        }
    }
}

impl fmt::Display for TextEncoderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What one text stage will hold on the device, planned before anything is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextStagePlan {
    pub encoder: TextEncoderKind,
    /// The folder its weights are read from.
    pub folder: PathBuf,
    /// The weights that stay resident for the whole stage (the stem), in the compute dtype. For
    /// Llama that is the final norm alone: `lm_head` is never loaded, and neither is the embedding
    /// table, of which a pass reads only its prompts' rows (`B × 128 × hidden_size` elements, 1 MiB
    /// per prompt in bf16 for Llama-3.1-8B: the first hidden state, an activation, not counted).
    pub stem_bytes: u64,
    /// Each layer's bytes in the compute dtype, in execution order.
    pub layers: Vec<UnitSpec>,
    /// Where the layers go under the policy, in what the budget leaves beside the stem.
    pub plan: Plan,
    /// The smallest budget with which the stage runs at the policy's prefetch depth: the stem
    /// plus the planner's minimum for the layers.
    pub minimum_budget: u64,
}

impl TextStagePlan {
    /// The most weight bytes on the device at once: the stem plus the layers' plan.
    pub fn peak_weight_bytes(&self) -> u64 {
        self.stem_bytes.saturating_add(self.plan.peak_weight_bytes())
    }

    /// The same stage under `policy`, from the layers and stem already read: no file is opened
    /// again. Fails as [`text_stage_plan`] does for a budget below the stage's minimum.
    pub fn with_policy(&self, policy: Policy) -> Result<TextStagePlan> {
        let (plan, minimum_budget) =
            plan_layers(self.encoder.name(), &self.folder, self.stem_bytes, &self.layers, policy)?;
        Ok(TextStagePlan { plan, minimum_budget, ..self.clone() })
    }

    /// Every weight the stage loads: the stem and every layer once.
    pub fn weight_bytes(&self) -> u64 {
        self.layers.iter().fold(self.stem_bytes, |sum, layer| sum.saturating_add(layer.bytes))
    }
}

/// What a text stage measured when it ran.
#[derive(Debug, Clone)]
pub struct TextStageReport {
    /// The plan it ran under.
    pub plan: TextStagePlan,
    /// The ledger's peak: the stem plus the layers resident or in slots at once.
    pub peak_weight_bytes: u64,
    /// The streamed layers' loads (`bytes_loaded` is the bytes streamed).
    pub stats: PrefetchStats,
    /// Wall time of the stage, loading included.
    pub seconds: f64,
}

/// A prompt longer than an encoder takes, cut as diffusers cuts it (the tokenizer's truncation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncation {
    pub encoder: TextEncoderKind,
    /// The prompt's index in the batch.
    pub prompt_idx: usize,
    /// The tokens the encoder sees, special tokens included.
    pub kept_tokens: usize,
    /// The tokens cut off the end.
    pub dropped_tokens: usize,
}

impl Truncation {
    /// The truncations of one encoder's tokenized batch.
    pub fn of(encoder: TextEncoderKind, tokens: &crate::Tokens) -> impl Iterator<Item = Truncation> + '_ {
        tokens.dropped().iter().enumerate().filter(|&(_, &dropped)| dropped > 0).map(move |(prompt_idx, &dropped)| {
            Truncation { encoder, prompt_idx, kept_tokens: tokens.len(), dropped_tokens: dropped }
        })
    }
}

impl fmt::Display for Truncation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "prompt {} truncated to {} tokens for {} ({} tokens dropped)",
            self.prompt_idx, self.kept_tokens, self.encoder, self.dropped_tokens
        )
    }
}

/// Plans every text stage, in the pipeline's order, from each folder's `config.json` and
/// safetensors headers: no weight is read and no tokenizer is loaded. Fails with
/// [`TextError::StageBudgetTooSmall`] for the first stage that the policy's budget cannot hold.
pub fn text_stage_plans(paths: &TextEncoderPaths, dtype: DType, policy: Policy) -> Result<Vec<TextStagePlan>> {
    TextEncoderKind::ALL.into_iter().map(|encoder| text_stage_plan(encoder, paths, dtype, policy)).collect()
}

/// Plans one text stage (see [`text_stage_plans`]).
pub fn text_stage_plan(
    encoder: TextEncoderKind,
    paths: &TextEncoderPaths,
    dtype: DType,
    policy: Policy,
) -> Result<TextStagePlan> {
    let folder = encoder.folder(paths);
    let checkpoint = open_weights(folder)?;
    let (n_layers, prefix, stem): (usize, fn(usize) -> String, Vec<String>) = match encoder {
        TextEncoderKind::ClipL | TextEncoderKind::ClipG => {
            let config: ClipConfig = read_config(folder)?;
            (config.num_hidden_layers, ClipLayer::prefix, clip::STEM_TENSORS.map(str::to_owned).to_vec())
        }
        TextEncoderKind::T5 => {
            let config: candle_transformers::models::t5::Config = read_config(folder)?;
            (config.num_layers, T5Block::prefix, t5::stem_tensors(&checkpoint))
        }
        TextEncoderKind::Llama => {
            let config: LlamaConfig = read_config(folder)?;
            (config.num_hidden_layers, LlamaLayer::prefix, llama::STEM_TENSORS.map(str::to_owned).to_vec())
        }
    };
    let stem_bytes = stored_bytes(&checkpoint, &stem, dtype)?;
    let (_, layers) = streamed::layout(&checkpoint, n_layers, prefix, dtype)?;
    let (plan, minimum_budget) = plan_layers(encoder.name(), folder, stem_bytes, &layers, policy)?;
    Ok(TextStagePlan { encoder, folder: folder.to_owned(), stem_bytes, layers, plan, minimum_budget })
}

/// The layers' plan under `policy` beside a resident stem of `stem_bytes`, and the stage's
/// smallest budget; a budget below it is [`TextError::StageBudgetTooSmall`].
pub(crate) fn plan_layers(
    encoder: &str,
    folder: &Path,
    stem_bytes: u64,
    layers: &[UnitSpec],
    policy: Policy,
) -> Result<(Plan, u64)> {
    let prefetch_depth = policy.prefetch_depth();
    let minimum_at = |depth: usize| stem_bytes.saturating_add(Plan::minimum_budget(layers, depth));
    let minimum_budget = minimum_at(prefetch_depth);
    let too_small = |budget: u64| TextError::StageBudgetTooSmall {
        encoder: encoder.to_owned(),
        folder: folder.to_owned(),
        budget,
        minimum: minimum_budget,
        stem_bytes,
        prefetch_depth,
        minimum_sequential: minimum_at(0),
    };
    let layer_policy = match policy {
        Policy::Budget { budget_bytes, prefetch } => {
            let room = budget_bytes.checked_sub(stem_bytes).ok_or_else(|| too_small(budget_bytes))?;
            Policy::Budget { budget_bytes: room, prefetch }
        }
        other => other,
    };
    let plan = layer_policy.plan(layers).map_err(|err| match (err, policy.budget_bytes()) {
        (MemoryError::BudgetTooSmall { .. }, Some(budget)) => too_small(budget),
        (other, _) => TextError::Memory(other),
    })?;
    Ok((plan, minimum_budget))
}

/// The bytes of the named tensors in `dtype`, from the checkpoint's headers.
fn stored_bytes(checkpoint: &Checkpoint, names: &[String], dtype: DType) -> Result<u64> {
    let mut elements = 0usize;
    for name in names {
        elements += checkpoint.require_tensor(name)?.shape.iter().product::<usize>();
    }
    Ok((elements * dtype.size_in_bytes()) as u64)
}

/// The bytes a loaded tensor holds.
pub(crate) fn loaded_bytes(tensor: &Tensor) -> u64 {
    (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64
}
