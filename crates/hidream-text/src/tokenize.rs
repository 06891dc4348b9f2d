//! Prompt tokenization as transformers' fast tokenizers do it for the pipeline:
//! `tokenizer(prompts, padding="max_length", max_length=n, truncation=True)`.
//!
//! The model is the folder's `tokenizer.json` (the `tokenizers` crate is the library behind
//! transformers' fast tokenizers); `tokenizer_config.json` (or `special_tokens_map.json`) supplies
//! what transformers keeps outside it: the pad and eos tokens, `model_max_length` and the padding
//! and truncation sides.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;
use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, PostProcessor, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use crate::{Result, TextError};

/// The token the pipeline pads with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadWith {
    /// The tokenizer's `pad_token`, or this default when its config names none (the default of
    /// the transformers class: `<|endoftext|>` for CLIPTokenizer, `<pad>` for T5Tokenizer).
    PadToken { default: &'static str },
    /// The tokenizer's `eos_token`: `HiDreamImagePipeline.__init__` sets
    /// `tokenizer_4.pad_token = tokenizer_4.eos_token`.
    EosToken,
}

/// The length the pipeline truncates and pads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// Exactly this many tokens: the CLIPs get `min(max_sequence_length, 218)` whatever the
    /// tokenizer's `model_max_length`.
    Fixed(usize),
    /// `min(n, model_max_length)`: T5 and Llama.
    AtMostModelMax(usize),
}

/// A tokenizer that truncates and pads every prompt to the same length.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    /// The same tokenizer without truncation or padding, to count what truncation drops.
    untruncated: Tokenizer,
    file: PathBuf,
    max_length: usize,
    pad_id: u32,
    eos_id: Option<u32>,
}

impl std::fmt::Debug for PromptTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PromptTokenizer")
            .field("file", &self.file)
            .field("max_length", &self.max_length)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

/// Token ids and attention masks of a batch of prompts, all `len` long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    ids: Vec<Vec<u32>>,
    mask: Vec<Vec<u32>>,
    dropped: Vec<usize>,
}

impl Tokens {
    /// One row of ids per prompt.
    pub fn ids(&self) -> &[Vec<u32>] {
        &self.ids
    }

    /// One row of 0/1 per prompt: 1 for a token of the prompt (special tokens included), 0 for
    /// padding.
    pub fn mask(&self) -> &[Vec<u32>] {
        &self.mask
    }

    /// How many tokens truncation cut off each prompt: 0 for a prompt that fits.
    pub fn dropped(&self) -> &[usize] {
        &self.dropped
    }

    /// The number of prompts.
    pub fn n_prompts(&self) -> usize {
        self.ids.len()
    }

    /// The padded length.
    pub fn len(&self) -> usize {
        self.ids.first().map_or(0, Vec::len)
    }

    /// Whether there are no tokens at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The ids as a `[B, T]` u32 tensor.
    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        rows_tensor(&self.ids, device)
    }

    /// The mask as a `[B, T]` u32 tensor.
    pub fn mask_tensor(&self, device: &Device) -> Result<Tensor> {
        rows_tensor(&self.mask, device)
    }
}

fn rows_tensor(rows: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let width = rows.first().map_or(0, Vec::len);
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), width), device)?)
}

impl PromptTokenizer {
    /// Loads `dir/tokenizer.json` and its config, set to truncate and pad to `length`.
    pub fn load(dir: &Path, pad: PadWith, length: Length) -> Result<PromptTokenizer> {
        let file = dir.join("tokenizer.json");
        if !file.is_file() {
            return Err(TextError::MissingFile {
                path: file,
                hint: format!(
                    "the text stack needs fast tokenizers; transformers writes `tokenizer.json` with \
                     `AutoTokenizer.from_pretrained(\"{0}\").save_pretrained(\"{0}\")`",
                    dir.display()
                ),
            });
        }
        let mut tokenizer = Tokenizer::from_file(&file).map_err(|err| invalid_file(&file, err.to_string()))?;
        let config = TokenizerConfig::read(dir)?;
        let pad_token = match pad {
            PadWith::PadToken { default } => config.pad_token.clone().unwrap_or_else(|| default.to_owned()),
            PadWith::EosToken => config.eos_token.clone().ok_or_else(|| {
                invalid_file(&dir.join("tokenizer_config.json"), "no `eos_token` to pad with".to_owned())
            })?,
        };
        let pad_id = tokenizer
            .token_to_id(&pad_token)
            .ok_or_else(|| invalid_file(&file, format!("the pad token `{pad_token}` is not in the vocabulary")))?;
        let eos_id = config.eos_token.as_deref().and_then(|eos| tokenizer.token_to_id(eos));
        let max_length = match length {
            Length::Fixed(n) => n,
            Length::AtMostModelMax(n) => n.min(config.model_max_length),
        };
        // The special tokens the post-processor adds count towards the length.
        let n_special = tokenizer.get_post_processor().map_or(0, |processor| processor.added_tokens(false));
        if max_length <= n_special {
            return Err(invalid_file(&file, format!("{max_length} tokens leave no room for a prompt")));
        }
        let mut untruncated = tokenizer.clone();
        untruncated
            .with_truncation(None)
            .map_err(|err| invalid_file(&file, format!("turning truncation off: {err}")))?
            .with_padding(None);
        let truncation = TruncationParams {
            direction: if config.truncation_left { TruncationDirection::Left } else { TruncationDirection::Right },
            max_length,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        };
        tokenizer
            .with_truncation(Some(truncation))
            .map_err(|err| invalid_file(&file, format!("truncation to {max_length} tokens: {err}")))?;
        tokenizer.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: if config.padding_left { PaddingDirection::Left } else { PaddingDirection::Right },
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(PromptTokenizer { tokenizer, untruncated, file, max_length, pad_id, eos_id })
    }

    /// The length every prompt is truncated and padded to.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The id of the config's `eos_token`, if it names one in the vocabulary.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Tokenizes with the special tokens, truncates and pads to [`PromptTokenizer::max_length`],
    /// and counts what truncation dropped ([`Tokens::dropped`]).
    pub fn encode(&self, prompts: &[&str]) -> Result<Tokens> {
        let tokenize = |tokenizer: &Tokenizer| {
            tokenizer
                .encode_batch(prompts.to_vec(), true)
                .map_err(|err| invalid_file(&self.file, format!("tokenizing the prompt: {err}")))
        };
        let encodings = tokenize(&self.tokenizer)?;
        let ids = encodings.iter().map(|encoding| encoding.get_ids().to_vec()).collect();
        let mask = encodings.iter().map(|encoding| encoding.get_attention_mask().to_vec()).collect();
        // Truncation keeps the special tokens and cuts the prompt's: what a prompt loses is its
        // full length beyond the limit.
        let dropped =
            tokenize(&self.untruncated)?.iter().map(|full| full.len().saturating_sub(self.max_length)).collect();
        Ok(Tokens { ids, mask, dropped })
    }
}

/// What transformers reads from `tokenizer_config.json` and `special_tokens_map.json`.
struct TokenizerConfig {
    pad_token: Option<String>,
    eos_token: Option<String>,
    model_max_length: usize,
    padding_left: bool,
    truncation_left: bool,
}

impl TokenizerConfig {
    fn read(dir: &Path) -> Result<TokenizerConfig> {
        let config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
        let special = read_json_if_present(&dir.join("special_tokens_map.json"))?;
        let token = |key: &str| token_content(config.get(key)).or_else(|| token_content(special.get(key)));
        // `model_max_length` may be written as 1e30 (a float) or as a huge integer.
        let model_max_length = match config.get("model_max_length").and_then(Value::as_f64) {
            Some(value) if value >= 0.0 && value < usize::MAX as f64 => value as usize,
            // Unset: transformers' `VERY_LARGE_INTEGER`.
            _ => usize::MAX,
        };
        let side = |key: &str| config.get(key).and_then(Value::as_str) == Some("left");
        Ok(TokenizerConfig {
            pad_token: token("pad_token"),
            eos_token: token("eos_token"),
            model_max_length,
            padding_left: side("padding_side"),
            truncation_left: side("truncation_side"),
        })
    }
}

/// A special token is written either as its text or as an `AddedToken` object with `content`.
fn token_content(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) => Some(text.clone()),
        Value::Object(object) => object.get("content").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

fn read_json_if_present(path: &Path) -> Result<Value> {
    if !path.is_file() {
        return Ok(Value::Null);
    }
    let text = std::fs::read_to_string(path).map_err(|source| TextError::Io { path: path.to_owned(), source })?;
    serde_json::from_str(&text).map_err(|err| invalid_file(path, err.to_string()))
}

fn invalid_file(path: &Path, problem: String) -> TextError {
    TextError::Invalid { what: path.display().to_string(), problem }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tokenizers::models::wordlevel::WordLevel;
    use tokenizers::pre_tokenizers::whitespace::Whitespace;
    use tokenizers::processors::template::TemplateProcessing;
    use tokenizers::{AddedToken, Tokenizer};

    use super::{Length, PadWith, PromptTokenizer, TokenizerConfig};

    /// A word-level tokenizer with T5's shape: `<pad>` 0, `</s>` 1 appended to every prompt, the
    /// words `w0`… from id 2, and `model_max_length` 8.
    fn tiny_tokenizer(dir: &std::path::Path) -> anyhow::Result<()> {
        let mut vocab: HashMap<String, u32> =
            HashMap::from([("<pad>".into(), 0), ("</s>".into(), 1), ("<unk>".into(), 2)]);
        vocab.extend((0..20).map(|word_idx| (format!("w{word_idx}"), 3 + word_idx)));
        let model = WordLevel::builder()
            .vocab(vocab.into_iter().collect())
            .unk_token("<unk>".into())
            .build()
            .map_err(anyhow::Error::msg)?;
        let mut tokenizer = Tokenizer::new(model);
        tokenizer.with_pre_tokenizer(Some(Whitespace {}));
        let template = TemplateProcessing::builder()
            .try_single("$A </s>")
            .map_err(anyhow::Error::msg)?
            .special_tokens(vec![("</s>", 1)])
            .build()?;
        tokenizer.with_post_processor(Some(template));
        tokenizer
            .add_special_tokens(vec![AddedToken::from("<pad>", true), AddedToken::from("</s>", true)])
            .map_err(anyhow::Error::msg)?;
        tokenizer.save(dir.join("tokenizer.json"), false).map_err(anyhow::Error::msg)?;
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"pad_token": "<pad>", "eos_token": "</s>", "model_max_length": 8}"#,
        )?;
        Ok(())
    }

    /// A prompt past the limit keeps its first words and the closing `</s>`, as transformers'
    /// `truncation=True` does, and the tokens says how many were cut.
    #[test]
    fn truncation_drops_the_tail_and_counts_it() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        tiny_tokenizer(dir.path())?;
        let tokenizer =
            PromptTokenizer::load(dir.path(), PadWith::PadToken { default: "<pad>" }, Length::AtMostModelMax(128))?;
        assert_eq!(tokenizer.max_length(), 8);
        let words = |n: u32| (0..n).map(|word_idx| format!("w{word_idx}")).collect::<Vec<_>>().join(" ");
        let (long, exact, short) = (words(11), words(7), words(2));
        let tokens = tokenizer.encode(&[&long, &exact, &short])?;
        assert_eq!(tokens.dropped(), &[4, 0, 0]);
        assert_eq!(tokens.ids()[0], vec![3, 4, 5, 6, 7, 8, 9, 1]);
        assert_eq!(tokens.ids()[1], vec![3, 4, 5, 6, 7, 8, 9, 1]);
        assert_eq!(tokens.ids()[2], vec![3, 4, 1, 0, 0, 0, 0, 0]);
        assert_eq!(tokens.mask()[2], vec![1, 1, 1, 0, 0, 0, 0, 0]);
        Ok(())
    }

    /// transformers 4 writes special tokens as `AddedToken` objects, may keep them in
    /// `special_tokens_map.json` only, and writes an unset `model_max_length` as 1e30.
    #[test]
    fn reads_both_config_layouts() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text);
        write(
            "tokenizer_config.json",
            r#"{"eos_token": {"content": "</s>", "lstrip": false}, "model_max_length": 1e30, "padding_side": "left"}"#,
        )?;
        write("special_tokens_map.json", r#"{"pad_token": "<pad>", "eos_token": "<ignored>"}"#)?;
        let config = TokenizerConfig::read(dir.path())?;
        assert_eq!(config.eos_token.as_deref(), Some("</s>"));
        assert_eq!(config.pad_token.as_deref(), Some("<pad>"));
        assert_eq!(config.model_max_length, usize::MAX);
        assert!(config.padding_left && !config.truncation_left);

        write("tokenizer_config.json", r#"{"model_max_length": 77}"#)?;
        let config = TokenizerConfig::read(dir.path())?;
        assert_eq!(config.model_max_length, 77);
        assert!(!config.padding_left);
        Ok(())
    }
}
