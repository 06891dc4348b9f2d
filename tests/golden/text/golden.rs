//! Golden tests of the text stack against diffusers' `HiDreamImagePipeline.encode_prompt`.
//!
//! `generate.py` beside this file made the tiny models and tokenizers under `model/` and `llama/`
//! and the expected outputs (`expected.safetensors`, prompts in `expected.json`) with diffusers
//! 0.42.1, transformers 5.24.0 and torch 2.15 (CPU, f32); CI only reads them.
//!
//! - Token ids and attention masks must be identical.
//! - Embeddings (f32): max |rust − diffusers| ≤ 1e-4 × max(1, max |expected|). Measured: CLIP-L
//!   4.8e-7, CLIP-G 8.3e-7, T5 5.4e-6, Llama 2.3e-6.
//! - bf16 weights and compute, against the f32 reference: ≤ max(2 × d, 2e-2 × max(1, max
//!   |expected|)), where d is how far diffusers' own bf16 run drifts from its f32 run (pooled 2.2e-2,
//!   T5 1.7e-1, Llama 7.8e-2; ours: 2.2e-2, 1.3e-1, 7.7e-2).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, ensure};
use candle_core::{DType, Device, Tensor};
use hidream_memory::Policy;
use hidream_test_support::{ensure_bit_identical, ensure_close, max_abs, scale};
use hidream_text::TextError;
use hidream_text::{
    ClipTextEncoder, LlamaLayer, LlamaStem, LlamaTextEncoder, T5TextEncoder, TextEncoderKind, TextEncoderPaths, Tokens,
    encode_prompts, text_stage_plan, text_stage_plans,
};

const TOLERANCE: f32 = 1e-4;
/// The smallest bf16 bound, relative to max(1, max |expected|).
const BF16_FLOOR: f32 = 2e-2;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/golden/text")
}

fn paths() -> TextEncoderPaths {
    TextEncoderPaths::hub_layout(&golden_dir().join("model"), &golden_dir().join("llama"))
}

/// The fixture: the prompts and every expected tensor.
struct Golden {
    prompts: Vec<String>,
    tensors: HashMap<String, Tensor>,
}

impl Golden {
    fn load() -> Result<Golden> {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(golden_dir().join("expected.json"))?)?;
        let prompts = meta["prompts"]
            .as_array()
            .ok_or_else(|| anyhow!("expected.json has no prompts"))?
            .iter()
            .map(|prompt| prompt.as_str().map(str::to_owned).ok_or_else(|| anyhow!("a prompt is not a string")))
            .collect::<Result<Vec<_>>>()?;
        let tensors = candle_core::safetensors::load(golden_dir().join("expected.safetensors"), &Device::Cpu)?;
        Ok(Golden { prompts, tensors })
    }

    fn prompts(&self) -> Vec<&str> {
        self.prompts.iter().map(String::as_str).collect()
    }

    fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.tensors.get(name).with_context(|| format!("expected.safetensors has no `{name}`"))
    }

    fn rows(&self, name: &str) -> Result<Vec<Vec<u32>>> {
        let rows = self.tensor(name)?.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        Ok(rows.into_iter().map(|row| row.into_iter().map(|id| id as u32).collect()).collect())
    }
}

/// Token ids (and, for the encoders that use it, the mask) must equal the pipeline's.
fn check_tokens(golden: &Golden, key: &str, tokens: &Tokens, with_mask: bool) -> Result<()> {
    let expected_ids = golden.rows(&format!("{key}.ids"))?;
    for (prompt_idx, (actual, expected)) in tokens.ids().iter().zip(&expected_ids).enumerate() {
        ensure!(
            actual == expected,
            "{key}: ids of prompt {prompt_idx} differ:\n  rust {actual:?}\n  diffusers {expected:?}"
        );
    }
    ensure!(tokens.n_prompts() == expected_ids.len(), "{key}: {} prompts tokenized", tokens.n_prompts());
    if with_mask {
        ensure!(tokens.mask() == golden.rows(&format!("{key}.mask"))?.as_slice(), "{key}: attention masks differ");
    }
    Ok(())
}

/// Compares embeddings within `TOLERANCE × max(1, max |expected|)` and prints the worst element.
fn check_close(what: &str, actual: &Tensor, expected: &Tensor) -> Result<()> {
    ensure_close(&format!("{what}: rust vs diffusers"), actual, expected, TOLERANCE * scale(expected)?).map(drop)
}

fn check_clip(key: &str, encoder_dir: &Path, tokenizer_dir: &Path) -> Result<()> {
    let golden = Golden::load()?;
    let encoder = ClipTextEncoder::load(encoder_dir, tokenizer_dir, DType::F32, &Device::Cpu)?;
    let tokens = encoder.tokenizer().encode(&golden.prompts())?;
    check_tokens(&golden, key, &tokens, false)?;
    check_close(key, &encoder.forward(&tokens)?, golden.tensor(&format!("{key}.text_embeds"))?)
}

#[test]
fn clip_l_quick_gelu_legacy_pooling() -> Result<()> {
    let paths = paths();
    check_clip("clip_l", &paths.clip_l, &paths.clip_l_tokenizer)
}

#[test]
fn clip_g_gelu_first_eos_pooling() -> Result<()> {
    let paths = paths();
    check_clip("clip_g", &paths.clip_g, &paths.clip_g_tokenizer)
}

#[test]
fn t5_with_padding_mask() -> Result<()> {
    let golden = Golden::load()?;
    let paths = paths();
    let encoder = T5TextEncoder::load(&paths.t5, &paths.t5_tokenizer, DType::F32, &Device::Cpu)?;
    let tokens = encoder.tokenizer().encode(&golden.prompts())?;
    check_tokens(&golden, "t5", &tokens, true)?;
    check_close("t5", &encoder.forward(&tokens)?, golden.tensor("t5")?)
}

#[test]
fn llama_all_hidden_states() -> Result<()> {
    let golden = Golden::load()?;
    let encoder = LlamaTextEncoder::load(&paths().llama, DType::F32, &Device::Cpu)?;
    let tokens = encoder.stem().tokenizer().encode(&golden.prompts())?;
    check_tokens(&golden, "llama", &tokens, true)?;
    check_close("llama", &encoder.forward(tokens)?, golden.tensor("llama")?)
}

/// A streaming caller loads each layer from its own tensors (as hidream-memory's scheduler hands
/// them over) and gets the resident result bit for bit.
#[test]
fn llama_layer_by_layer_equals_resident() -> Result<()> {
    let golden = Golden::load()?;
    let device = Device::Cpu;
    let dir = paths().llama;
    let resident = LlamaTextEncoder::load(&dir, DType::F32, &device)?.encode(&golden.prompts())?;

    let stem = LlamaStem::load(&dir, DType::F32, &device)?;
    let mut pass = stem.begin(&golden.prompts())?;
    for layer_idx in 0..stem.config().num_hidden_layers {
        let tensors = stem.checkpoint().load_prefixes(&[LlamaLayer::prefix(layer_idx)], DType::F32, &device)?;
        let vb = hidream_weights::unit_var_builder(tensors, DType::F32, &device);
        let layer = LlamaLayer::new(stem.config(), layer_idx, vb)?;
        stem.run_layer(&mut pass, &layer)?;
    }
    let streamed = stem.finish(pass)?;
    ensure_bit_identical("layer by layer vs resident", &streamed, &resident)?;

    // Layers out of order, or too few, are errors rather than wrong embeddings.
    let mut pass = stem.begin(&golden.prompts())?;
    let wrong = stem.load_layer(1)?;
    ensure!(matches!(stem.run_layer(&mut pass, &wrong), Err(TextError::Invalid { .. })));
    ensure!(matches!(stem.finish(pass), Err(TextError::Invalid { .. })));
    Ok(())
}

/// The whole text stage: pooled = [CLIP-L | CLIP-G], T5, Llama, as `encode_prompt` returns them.
#[test]
fn encode_prompts_matches_encode_prompt() -> Result<()> {
    let golden = Golden::load()?;
    let embeds = encode_prompts(&paths(), &golden.prompts(), DType::F32, &Device::Cpu)?;
    check_close("pooled", &embeds.pooled, golden.tensor("pooled")?)?;
    check_close("t5", &embeds.t5, golden.tensor("t5")?)?;
    check_close("llama", &embeds.llama, golden.tensor("llama")?)
}

/// A folder without `tokenizer.json` (a slow tokenizer) says how to make one.
#[test]
fn missing_tokenizer_json_is_reported() -> Result<()> {
    let empty = tempfile::tempdir()?;
    let paths = paths();
    let err = ClipTextEncoder::load(&paths.clip_l, empty.path(), DType::F32, &Device::Cpu)
        .err()
        .ok_or_else(|| anyhow!("loading without tokenizer.json succeeded"))?;
    match err {
        TextError::MissingFile { path, hint } => {
            ensure!(path.ends_with("tokenizer.json"), "{path:?}");
            ensure!(hint.contains("save_pretrained"), "{hint}");
        }
        other => return Err(anyhow!("unexpected error: {other}")),
    }
    let err = LlamaTextEncoder::load(empty.path(), DType::F32, &Device::Cpu)
        .err()
        .ok_or_else(|| anyhow!("loading an empty folder succeeded"))?;
    ensure!(matches!(err, TextError::MissingFile { ref path, .. } if path.ends_with("config.json")), "{err}");
    Ok(())
}

/// bf16 weights and compute, against the f32 reference: within twice the drift of diffusers' own
/// bf16 run (`*_bf16`), or 2e-2 × max(1, max |expected|) if that is larger.
#[test]
fn bf16_drifts_no_more_than_diffusers() -> Result<()> {
    let golden = Golden::load()?;
    let embeds = encode_prompts(&paths(), &golden.prompts(), DType::BF16, &Device::Cpu)?;
    for (name, actual) in [("pooled", &embeds.pooled), ("t5", &embeds.t5), ("llama", &embeds.llama)] {
        let expected = golden.tensor(name)?;
        let drift = max_abs(&(golden.tensor(&format!("{name}_bf16"))? - expected)?)?;
        let bound = (2.0 * drift).max(BF16_FLOOR * scale(expected)?);
        let label = format!("{name} (bf16; diffusers' bf16 drift {drift:.3e}): rust vs diffusers");
        ensure_close(&label, actual, expected, bound)?;
    }
    Ok(())
}

/// Streamed encodes under every policy down to the smallest budget give the all-resident output
/// bit for bit, stay within the budget, load each streamed layer exactly once, and hold what the
/// header-only plan of the stage says: the same placement and the same peak of weight bytes.
fn check_streamed(
    encoder: TextEncoderKind,
    resident: &Tensor,
    encode: impl Fn(Policy) -> Result<hidream_text::streamed::StreamedEncode>,
) -> Result<()> {
    let paths = paths();
    let plan_for = |policy: Policy| text_stage_plan(encoder, &paths, DType::F32, policy);
    let minimum = plan_for(Policy::Stream { prefetch: 1 })?.minimum_budget;
    let minimum_sequential = plan_for(Policy::Sequential)?.minimum_budget;
    let first_layer = plan_for(Policy::All)?.layers[0].bytes;
    for policy in [
        Policy::All,
        Policy::Sequential,
        Policy::Stream { prefetch: 2 },
        Policy::Budget { budget_bytes: minimum, prefetch: 1 },
        Policy::Budget { budget_bytes: minimum + first_layer, prefetch: 1 },
        Policy::Budget { budget_bytes: minimum_sequential, prefetch: 0 },
    ] {
        let stage = plan_for(policy)?;
        let streamed = encode(policy)?;
        ensure_bit_identical(&format!("{encoder} {policy}: streamed vs resident"), &streamed.hidden_states, resident)?;
        ensure!(streamed.plan == stage.plan, "{encoder} {policy}: the run's plan is not the header-only plan");
        ensure!(
            streamed.peak_weight_bytes == stage.peak_weight_bytes(),
            "{encoder} {policy}: the ledger's peak is {} bytes, the plan said {}",
            streamed.peak_weight_bytes,
            stage.peak_weight_bytes()
        );
        if let Policy::Budget { budget_bytes, .. } = policy {
            ensure!(streamed.peak_weight_bytes <= budget_bytes, "{encoder} {policy}: over budget");
        }
        let n_streamed = streamed.plan.streamed().len() as u64;
        if matches!(policy, Policy::Sequential | Policy::Budget { prefetch: 0, .. }) {
            ensure!(n_streamed > 0, "{encoder} {policy}: nothing streamed");
        }
        ensure!(streamed.stats.units_loaded == n_streamed, "{encoder} {policy}: a layer loaded twice or for nothing");
        ensure!(streamed.stats.units_delivered == n_streamed, "{encoder} {policy}");
        ensure!(
            streamed.stats.bytes_loaded == stage.plan.streamed_bytes_per_pass(),
            "{encoder} {policy}: bytes streamed"
        );
    }
    Ok(())
}

/// Llama's layers streamed through the residency runtime.
#[test]
fn llama_streamed_under_any_policy_is_bit_identical() -> Result<()> {
    use hidream_text::streamed::encode_llama_streamed;
    let golden = Golden::load()?;
    let prompts = golden.prompts();
    let llama_dir = paths().llama;
    let resident = LlamaTextEncoder::load(&llama_dir, DType::F32, &Device::Cpu)?.encode(&prompts)?;
    check_streamed(TextEncoderKind::Llama, &resident, |policy| {
        Ok(encode_llama_streamed(&llama_dir, &prompts, policy, DType::F32, &Device::Cpu)?)
    })
}

/// T5's blocks streamed through the same runtime.
#[test]
fn t5_streamed_under_any_policy_is_bit_identical() -> Result<()> {
    use hidream_text::streamed::encode_t5_streamed;
    let golden = Golden::load()?;
    let prompts = golden.prompts();
    let paths = paths();
    let resident = T5TextEncoder::load(&paths.t5, &paths.t5_tokenizer, DType::F32, &Device::Cpu)?.encode(&prompts)?;
    check_streamed(TextEncoderKind::T5, &resident, |policy| {
        Ok(encode_t5_streamed(&paths.t5, &paths.t5_tokenizer, &prompts, policy, DType::F32, &Device::Cpu)?)
    })
}

/// CLIP-L's and CLIP-G's encoder layers streamed through the same runtime.
#[test]
fn clip_streamed_under_any_policy_is_bit_identical() -> Result<()> {
    use hidream_text::streamed::encode_clip_streamed;
    let golden = Golden::load()?;
    let prompts = golden.prompts();
    let paths = paths();
    for (encoder, encoder_dir, tokenizer_dir) in [
        (TextEncoderKind::ClipL, &paths.clip_l, &paths.clip_l_tokenizer),
        (TextEncoderKind::ClipG, &paths.clip_g, &paths.clip_g_tokenizer),
    ] {
        let resident = ClipTextEncoder::load(encoder_dir, tokenizer_dir, DType::F32, &Device::Cpu)?.encode(&prompts)?;
        check_streamed(encoder, &resident, |policy| {
            Ok(encode_clip_streamed(encoder_dir, tokenizer_dir, &prompts, policy, DType::F32, &Device::Cpu)?)
        })?;
    }
    Ok(())
}

/// The header-only plan of each stage counts what its stem loads and what its layers stream, in
/// the compute dtype.
#[test]
fn stage_plans_count_what_the_stems_load() -> Result<()> {
    use hidream_text::clip::ClipStem;
    use hidream_text::streamed::layer_specs;
    use hidream_text::t5::T5Stem;
    let paths = paths();
    let device = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        let plans = text_stage_plans(&paths, dtype, Policy::All)?;
        let kinds: Vec<TextEncoderKind> = plans.iter().map(|plan| plan.encoder).collect();
        ensure!(kinds == TextEncoderKind::ALL, "{kinds:?}");
        for plan in &plans {
            let (stem_bytes, specs) = match plan.encoder {
                TextEncoderKind::ClipL => {
                    let stem = ClipStem::load(&paths.clip_l, &paths.clip_l_tokenizer, dtype, &device)?;
                    (stem.resident_bytes(), layer_specs(&stem)?)
                }
                TextEncoderKind::ClipG => {
                    let stem = ClipStem::load(&paths.clip_g, &paths.clip_g_tokenizer, dtype, &device)?;
                    (stem.resident_bytes(), layer_specs(&stem)?)
                }
                TextEncoderKind::T5 => {
                    let stem = T5Stem::load(&paths.t5, &paths.t5_tokenizer, dtype, &device)?;
                    (stem.resident_bytes(), layer_specs(&stem)?)
                }
                TextEncoderKind::Llama => {
                    let stem = LlamaStem::load(&paths.llama, dtype, &device)?;
                    (stem.resident_bytes(), layer_specs(&stem)?)
                }
            };
            let label = format!("{} in {dtype:?}", plan.encoder);
            ensure!(
                plan.stem_bytes == stem_bytes,
                "{label}: planned stem {} bytes, loaded {stem_bytes}",
                plan.stem_bytes
            );
            ensure!(plan.layers == specs, "{label}: planned layers {:?}, the stem's {specs:?}", plan.layers);
            ensure!(plan.peak_weight_bytes() == plan.weight_bytes(), "{label}: policy all keeps every weight");
        }
    }
    Ok(())
}

/// A budget one byte below a stage's minimum fails before anything loads, naming the encoder,
/// its minimum and the budget; the streamed encode refuses it the same way.
#[test]
fn budget_below_a_stage_minimum_is_a_typed_error() -> Result<()> {
    use hidream_text::streamed::{encode_clip_streamed, encode_llama_streamed, encode_t5_streamed};
    let paths = paths();
    let prompts = ["a cat"];
    let device = Device::Cpu;
    for encoder in TextEncoderKind::ALL {
        for prefetch in [0, 1] {
            let minimum = text_stage_plan(encoder, &paths, DType::F32, Policy::Stream { prefetch })?.minimum_budget;
            let policy = Policy::Budget { budget_bytes: minimum - 1, prefetch };
            let check = |err: Option<TextError>, name: &str| -> Result<()> {
                match err {
                    Some(TextError::StageBudgetTooSmall { encoder: named, minimum: said, budget, .. }) => {
                        ensure!(named == name && said == minimum && budget == minimum - 1, "{named} {said} {budget}");
                        Ok(())
                    }
                    Some(other) => Err(anyhow!("{encoder} {policy}: unexpected error {other}")),
                    None => Err(anyhow!("{encoder} {policy}: a budget below the minimum ran")),
                }
            };
            let err = text_stage_plan(encoder, &paths, DType::F32, policy).err();
            if let Some(err) = &err {
                let message = err.to_string();
                ensure!(message.contains(encoder.name()) && message.contains(&minimum.to_string()), "{message}");
            }
            check(err, encoder.name())?;
            // Planning every stage fails at the first that does not fit, whichever that is.
            match text_stage_plans(&paths, DType::F32, policy) {
                Err(TextError::StageBudgetTooSmall { minimum: first, budget, .. }) => {
                    ensure!(first > budget, "{encoder} {policy}: {first} ≤ {budget}")
                }
                other => return Err(anyhow!("{encoder} {policy}: planning every stage gave {other:?}")),
            }
            let streamed = match encoder {
                TextEncoderKind::ClipL => {
                    encode_clip_streamed(&paths.clip_l, &paths.clip_l_tokenizer, &prompts, policy, DType::F32, &device)
                }
                TextEncoderKind::ClipG => {
                    encode_clip_streamed(&paths.clip_g, &paths.clip_g_tokenizer, &prompts, policy, DType::F32, &device)
                }
                TextEncoderKind::T5 => {
                    encode_t5_streamed(&paths.t5, &paths.t5_tokenizer, &prompts, policy, DType::F32, &device)
                }
                TextEncoderKind::Llama => encode_llama_streamed(&paths.llama, &prompts, policy, DType::F32, &device),
            };
            let label = if encoder == TextEncoderKind::T5 || encoder == TextEncoderKind::Llama {
                encoder.name()
            } else {
                "CLIP"
            };
            check(streamed.err(), label)?;
        }
    }
    Ok(())
}

/// Llama's `lm_head` is never read: without it in the checkpoint the plan and the encode are the
/// same, and the plan counts neither it nor the embedding table.
#[test]
fn llama_never_loads_lm_head() -> Result<()> {
    use hidream_text::streamed::encode_llama_streamed;
    let golden = Golden::load()?;
    let prompts = golden.prompts();
    let source = paths().llama;
    let dir = tempfile::tempdir()?;
    for file in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(source.join(file), dir.path().join(file))?;
    }
    let checkpoint = hidream_weights::Checkpoint::open(&source.join("model.safetensors.index.json"))?;
    let names: Vec<String> = checkpoint.tensor_names().map(str::to_owned).collect();
    ensure!(names.iter().any(|name| name == "lm_head.weight"), "the fixture has no lm_head to leave out");
    let mut tensors = HashMap::new();
    let mut all_elements = 0usize;
    for name in &names {
        let tensor = checkpoint.load(name, DType::F32, &Device::Cpu)?;
        all_elements += tensor.elem_count();
        if name != "lm_head.weight" {
            tensors.insert(name.clone(), tensor);
        }
    }
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors"))?;

    let mut paths_without = paths();
    paths_without.llama = dir.path().to_owned();
    for policy in [Policy::All, Policy::Sequential] {
        let with = encode_llama_streamed(&source, &prompts, policy, DType::F32, &Device::Cpu)?;
        let without = encode_llama_streamed(dir.path(), &prompts, policy, DType::F32, &Device::Cpu)?;
        ensure_bit_identical(
            &format!("{policy}: without lm_head vs with"),
            &without.hidden_states,
            &with.hidden_states,
        )?;
        let planned = text_stage_plan(TextEncoderKind::Llama, &paths_without, DType::F32, policy)?;
        let original = text_stage_plan(TextEncoderKind::Llama, &paths(), DType::F32, policy)?;
        ensure!(
            (planned.stem_bytes, &planned.layers, &planned.plan)
                == (original.stem_bytes, &original.layers, &original.plan),
            "{policy}: the plan depends on lm_head"
        );
    }
    let plan = text_stage_plan(TextEncoderKind::Llama, &paths(), DType::F32, Policy::All)?;
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(source.join("config.json"))?)?;
    let (vocab, hidden) = (config["vocab_size"].as_u64().unwrap_or(0), config["hidden_size"].as_u64().unwrap_or(0));
    ensure!(plan.stem_bytes == hidden * 4, "the stem is the final norm alone: {} bytes", plan.stem_bytes);
    // Everything but lm_head and the embedding table, `[vocab, hidden]` each.
    ensure!(
        plan.weight_bytes() == all_elements as u64 * 4 - 2 * vocab * hidden * 4,
        "{} bytes planned",
        plan.weight_bytes()
    );
    Ok(())
}

/// CLIP-L (`quick_gelu`) runs candle-transformers' own encoder layers one at a time: the result is
/// its whole `ClipTextTransformer`'s, pooled and projected, bit for bit.
#[test]
fn clip_l_layer_by_layer_equals_candle_transformers() -> Result<()> {
    use candle_core::{IndexOp, Module};
    use candle_transformers::models::clip::text_model::{Activation, ClipTextConfig, ClipTextTransformer};
    let golden = Golden::load()?;
    let paths = paths();
    let device = Device::Cpu;
    let encoder = ClipTextEncoder::load(&paths.clip_l, &paths.clip_l_tokenizer, DType::F32, &device)?;
    let tokens = encoder.tokenizer().encode(&golden.prompts())?;
    let ours = encoder.forward(&tokens)?;

    let config = encoder.config();
    ensure!(config.hidden_act == "quick_gelu" && config.eos_token_id == 2, "the CLIP-L fixture changed");
    let candle_config = ClipTextConfig {
        vocab_size: config.vocab_size,
        embed_dim: config.hidden_size,
        activation: Activation::QuickGelu,
        intermediate_size: config.intermediate_size,
        max_position_embeddings: config.max_position_embeddings,
        pad_with: None,
        num_hidden_layers: config.num_hidden_layers,
        num_attention_heads: config.num_attention_heads,
        projection_dim: config.projection_dim,
    };
    let vb =
        hidream_weights::Checkpoint::open(&paths.clip_l.join("model.safetensors"))?.var_builder(DType::F32, &device);
    let model = ClipTextTransformer::new(vb.pp("text_model"), &candle_config)?;
    let projection = candle_nn::linear_no_bias(config.hidden_size, config.projection_dim, vb.pp("text_projection"))?;
    let hidden = model.forward_with_mask(&tokens.ids_tensor(&device)?, usize::MAX)?;
    // Legacy pooling (eos_token_id 2): the first largest id of each prompt.
    let pooled = tokens
        .ids()
        .iter()
        .enumerate()
        .map(|(batch_idx, row)| {
            let max = row.iter().copied().max().unwrap_or(0);
            hidden.i((batch_idx, row.iter().position(|&id| id == max).unwrap_or(0)))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    let theirs = projection.forward(&Tensor::stack(&pooled, 0)?)?;
    ensure_bit_identical("CLIP-L layer by layer vs candle-transformers", &ours, &theirs)
}

/// The whole text stage under the smallest budget that holds every stage: the embeddings of
/// policy `all` bit for bit, one report per stage in order, each within the budget and at the
/// peak its header-only plan gave; and which prompts were truncated.
#[test]
fn encode_prompts_under_a_budget_reports_every_stage() -> Result<()> {
    let golden = Golden::load()?;
    let prompts = golden.prompts();
    let paths = paths();
    let resident = encode_prompts(&paths, &prompts, DType::F32, &Device::Cpu)?;
    let budget_bytes = text_stage_plans(&paths, DType::F32, Policy::Stream { prefetch: 1 })?
        .iter()
        .map(|plan| plan.minimum_budget)
        .max()
        .ok_or_else(|| anyhow!("no stages"))?;
    let policy = Policy::Budget { budget_bytes, prefetch: 1 };
    let embeds = hidream_text::encode_prompts_under(&paths, &prompts, DType::F32, &Device::Cpu, policy)?;
    ensure_bit_identical("pooled under a budget", &embeds.pooled, &resident.pooled)?;
    ensure_bit_identical("t5 under a budget", &embeds.t5, &resident.t5)?;
    ensure_bit_identical("llama under a budget", &embeds.llama, &resident.llama)?;
    let order: Vec<TextEncoderKind> = embeds.stages.iter().map(|stage| stage.plan.encoder).collect();
    ensure!(order == TextEncoderKind::ALL, "{order:?}");
    let mut streamed_somewhere = false;
    for stage in &embeds.stages {
        let encoder = stage.plan.encoder;
        ensure!(stage.peak_weight_bytes == stage.plan.peak_weight_bytes(), "{encoder}: peak differs from the plan");
        ensure!(stage.peak_weight_bytes <= budget_bytes, "{encoder}: over budget");
        ensure!(stage.stats.bytes_loaded == stage.plan.plan.streamed_bytes_per_pass(), "{encoder}: bytes streamed");
        streamed_somewhere |= stage.stats.bytes_loaded > 0;
    }
    ensure!(streamed_somewhere, "the budget streamed nothing: the test does not exercise streaming");

    // Truncations: exactly the prompts whose tokens have no padding left and were cut, per encoder.
    ensure!(!embeds.truncations.is_empty(), "the fixture's long prompt was truncated by no encoder");
    for truncation in &embeds.truncations {
        ensure!(truncation.prompt_idx == 1 && truncation.dropped_tokens > 0, "{truncation}");
        ensure!(truncation.kept_tokens == hidream_text::MAX_SEQUENCE_LENGTH, "{truncation}");
        ensure!(truncation.to_string().contains(truncation.encoder.name()), "{truncation}");
    }
    let truncated_by: Vec<TextEncoderKind> = embeds.truncations.iter().map(|truncation| truncation.encoder).collect();
    let clip_l = ClipTextEncoder::load(&paths.clip_l, &paths.clip_l_tokenizer, DType::F32, &Device::Cpu)?;
    let clip_l_tokens = clip_l.tokenizer().encode(&prompts)?;
    let clip_l_full = clip_l_tokens.mask()[1].iter().all(|&keep| keep == 1);
    ensure!(
        truncated_by.contains(&TextEncoderKind::ClipL) == (clip_l_full && clip_l_tokens.dropped()[1] > 0),
        "CLIP-L: {truncated_by:?}"
    );
    Ok(())
}

/// Every stage is planned before any loads: a budget that the largest stage cannot hold fails
/// naming the first stage that does not fit, even where CLIP-L, which runs first and fits, could
/// not even load its tokenizer.
#[test]
fn encode_prompts_under_plans_every_stage_first() -> Result<()> {
    let mut paths = paths();
    let plans = text_stage_plans(&paths, DType::F32, Policy::Stream { prefetch: 1 })?;
    let largest = plans.iter().map(|plan| plan.minimum_budget).max().ok_or_else(|| anyhow!("no stages"))?;
    let budget_bytes = largest - 1;
    let refused =
        plans.iter().find(|plan| plan.minimum_budget > budget_bytes).ok_or_else(|| anyhow!("none refused"))?;
    ensure!(refused.encoder != TextEncoderKind::ClipL, "CLIP-L's stage is the largest in the fixture");
    let empty = tempfile::tempdir()?;
    paths.clip_l_tokenizer = empty.path().to_owned();
    let policy = Policy::Budget { budget_bytes, prefetch: 1 };
    match hidream_text::encode_prompts_under(&paths, &["a cat"], DType::F32, &Device::Cpu, policy) {
        Err(TextError::StageBudgetTooSmall { encoder, minimum, budget, .. }) => {
            ensure!(encoder == refused.encoder.name() && minimum == refused.minimum_budget, "{encoder} {minimum}");
            ensure!(budget == budget_bytes, "{budget}");
            Ok(())
        }
        other => Err(anyhow!("expected {} to be refused before CLIP-L loads, got {other:?}", refused.encoder)),
    }
}
