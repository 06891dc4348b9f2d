//! Properties of the transformer that hold whatever the weights: batching, query chunking, the
//! patch layout, and the bf16 path staying close to f32. The golden tests against diffusers live in
//! `tests/golden/transformer/`.

use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use hidream_config::{DType as StorageDType, TransformerConfig};
use hidream_model::{AttentionConfig, HiDreamModel, TransformerInputs, patchify, scaled_dot_product_attention};
use hidream_test_support::{ensure_close, scale};
use hidream_weights::{Checkpoint, InputSpec, SynthOptions};

fn tiny_checkpoint(dir: &std::path::Path) -> Result<(TransformerConfig, Checkpoint)> {
    let cfg = TransformerConfig::tiny();
    let options = SynthOptions { seed: 7, dtype: StorageDType::F32, max_shard_bytes: 1 << 20 };
    hidream_weights::write_synthetic(dir, &cfg, &options)?;
    Ok((cfg, Checkpoint::open(dir)?))
}

fn inputs(cfg: &TransformerConfig, batch: usize, height: usize, width: usize, seed: u64) -> Result<TransformerInputs> {
    let spec = InputSpec { batch, height, width, t5_tokens: 5, llama_tokens: 7, seed };
    let mut tensors: HashMap<String, Tensor> = hidream_weights::synthetic_inputs(cfg, &spec)?;
    Ok(TransformerInputs::from_tensors(&mut tensors, "")?)
}

/// Each sample of a batch gets the output it would get alone, on both latent paths.
#[test]
fn batch_samples_are_independent() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cfg, checkpoint) = tiny_checkpoint(dir.path())?;
    let mut model = HiDreamModel::new(&cfg, &checkpoint.var_builder(DType::F32, &Device::Cpu))?;
    for (height, width) in [(8, 8), (8, 12)] {
        let batch = inputs(&cfg, 2, height, width, 3)?;
        let together = model.forward(&batch)?;
        assert_eq!(together.dims(), &[2, cfg.out_channels(), height, width]);
        for sample in 0..2 {
            let pick = |t: &Tensor, dim: usize| t.narrow(dim, sample, 1);
            let alone = TransformerInputs {
                hidden_states: pick(&batch.hidden_states, 0)?,
                timesteps: pick(&batch.timesteps, 0)?,
                encoder_hidden_states_t5: pick(&batch.encoder_hidden_states_t5, 0)?,
                encoder_hidden_states_llama3: pick(&batch.encoder_hidden_states_llama3, 1)?,
                pooled_embeds: pick(&batch.pooled_embeds, 0)?,
            };
            let out = model.forward(&alone)?;
            let label = format!("{height}x{width} sample {sample}: alone vs batched");
            ensure_close(&label, &out, &together.narrow(0, sample, 1)?, 1e-5 * scale(&out)?)?;
        }
    }
    Ok(())
}

/// Query-chunked attention stays within 1e-5 of the unchunked result, in a whole forward.
///
/// A chunk of at least the number of queries takes the unchunked path, so every chunk here is
/// smaller than the image tokens alone, which every attention call attends from. Each call of this
/// forward has 83 queries (64 image tokens, the non-square latent padded to `max_seq`, then 5 T5
/// and 2 × 7 Llama tokens), a prime: no chunk divides it, so the last chunk is always a short one.
#[test]
fn chunked_attention_matches_unchunked() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cfg, checkpoint) = tiny_checkpoint(dir.path())?;
    let mut model = HiDreamModel::new(&cfg, &checkpoint.var_builder(DType::F32, &Device::Cpu))?;
    let batch = inputs(&cfg, 1, 8, 12, 5)?;
    let n_image_tokens = patchify(&cfg, &batch.hidden_states)?.tokens.dim(1)?;
    let reference = model.forward(&batch)?;
    for chunk in [1, 7, 16, 63] {
        assert!(chunk < n_image_tokens, "chunk {chunk} would not chunk {n_image_tokens} image tokens");
        model.transformer_mut().set_attention(AttentionConfig { query_chunk: Some(chunk) });
        let label = format!("chunk {chunk}: chunked vs unchunked");
        ensure_close(&label, &model.forward(&batch)?, &reference, 1e-5 * scale(&reference)?)?;
    }
    Ok(())
}

/// The attention kernel itself, chunked against unchunked, with chunks that do not divide the 37
/// queries (and one of 1), and against the formula in f64.
#[test]
fn chunked_sdpa_matches() -> Result<()> {
    let device = Device::Cpu;
    let n_queries = 37;
    let query = Tensor::randn(0f32, 1.0, (2, 3, n_queries, 16), &device)?;
    let key = Tensor::randn(0f32, 1.0, (2, 3, n_queries, 16), &device)?;
    let value = Tensor::randn(0f32, 1.0, (2, 3, n_queries, 16), &device)?;
    let full = scaled_dot_product_attention(&query, &key, &value, AttentionConfig::default())?;
    for chunk in [1, 5, 36] {
        assert!(chunk < n_queries, "chunk {chunk} would take the unchunked path");
        assert!(chunk == 1 || n_queries % chunk != 0, "chunk {chunk} divides {n_queries}: no short last chunk");
        let chunked = scaled_dot_product_attention(&query, &key, &value, AttentionConfig { query_chunk: Some(chunk) })?;
        ensure_close(&format!("chunk {chunk}: chunked vs unchunked"), &chunked, &full, 1e-5)?;
    }
    // Against softmax(q kᵀ/√d) v written out in f64.
    let (q, k, v) = (query.to_dtype(DType::F64)?, key.to_dtype(DType::F64)?, value.to_dtype(DType::F64)?);
    let scores = (q.matmul(&k.t()?)? / 4.0)?;
    let expected = candle_nn::ops::softmax(&scores, candle_core::D::Minus1)?.matmul(&v)?;
    ensure_close("unchunked vs f64", &full, &expected, 1e-5)?;
    Ok(())
}

/// Square latents give `H/p * W/p` tokens; non-square ones are padded to `max_seq` with a mask,
/// and both keep diffusers' `(p, p, C)` feature order.
#[test]
fn patch_layout() -> Result<()> {
    let cfg = TransformerConfig::tiny();
    let device = Device::Cpu;
    let latents = Tensor::arange(0f32, (2 * 4 * 6 * 4) as f32, &device)?.reshape((2, 4, 6, 4))?;
    let patches = patchify(&cfg, &latents)?;
    assert_eq!(patches.tokens.dims(), &[2, cfg.max_seq(), 16]);
    let mask: Vec<Vec<f32>> = patches.mask.as_ref().ok_or_else(|| anyhow::anyhow!("no mask"))?.to_vec2()?;
    assert_eq!(mask[1].iter().filter(|m| **m == 1.0).count(), 3 * 2);
    assert_eq!(patches.positions[3], [0.0, 1.0, 1.0]);
    assert_eq!(patches.positions[6], [0.0, 0.0, 0.0]);
    // Token (row 1, col 0) of sample 0: feature (py, px, c) is latents[0, c, 2 + py, px].
    let token: Vec<f32> = patches.tokens.get(0)?.get(2)?.to_vec1()?;
    for (feature, value) in token.iter().enumerate() {
        let (py, px, c) = (feature / 8, (feature / 4) % 2, feature % 4);
        let expected: f32 = latents.get(0)?.get(c)?.get(2 + py)?.get(px)?.to_scalar()?;
        assert_eq!(*value, expected, "feature {feature}");
    }
    let padding: Vec<f32> = patches.tokens.get(1)?.get(cfg.max_seq() - 1)?.to_vec1()?;
    assert!(padding.iter().all(|v| *v == 0.0));
    Ok(())
}

/// bf16 compute stays within 5% of f32 (relative to the output's scale) on the tiny model.
#[test]
fn bf16_tracks_f32() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cfg, checkpoint) = tiny_checkpoint(dir.path())?;
    let batch = inputs(&cfg, 1, 8, 8, 11)?;
    let reference = HiDreamModel::new(&cfg, &checkpoint.var_builder(DType::F32, &Device::Cpu))?.forward(&batch)?;
    let bf16 = HiDreamModel::new(&cfg, &checkpoint.var_builder(DType::BF16, &Device::Cpu))?.forward(&batch)?;
    assert_eq!(bf16.dtype(), DType::BF16);
    ensure_close("bf16 vs f32", &bf16, &reference, 0.05 * scale(&reference)?)?;
    Ok(())
}

/// Wrong input shapes are typed errors naming the input.
#[test]
fn bad_inputs_are_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cfg, checkpoint) = tiny_checkpoint(dir.path())?;
    let mut model = HiDreamModel::new(&cfg, &checkpoint.var_builder(DType::F32, &Device::Cpu))?;
    let good = inputs(&cfg, 1, 8, 8, 1)?;
    let mut cases: Vec<(&str, TransformerInputs)> = Vec::new();
    let mut case = |name, edit: &dyn Fn(&mut TransformerInputs) -> candle_core::Result<()>| -> Result<()> {
        let mut bad = good.clone();
        edit(&mut bad)?;
        cases.push((name, bad));
        Ok(())
    };
    case("hidden_states", &|i| {
        i.hidden_states = i.hidden_states.narrow(1, 0, 3)?;
        Ok(())
    })?;
    case("hidden_states", &|i| {
        i.hidden_states = i.hidden_states.narrow(2, 0, 7)?;
        Ok(())
    })?;
    case("timesteps", &|i| {
        i.timesteps = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
        Ok(())
    })?;
    case("encoder_hidden_states_t5", &|i| {
        i.encoder_hidden_states_t5 = i.encoder_hidden_states_t5.narrow(2, 0, 8)?;
        Ok(())
    })?;
    case("encoder_hidden_states_llama3", &|i| {
        i.encoder_hidden_states_llama3 = i.encoder_hidden_states_llama3.narrow(0, 0, 2)?;
        Ok(())
    })?;
    case("pooled_embeds", &|i| {
        i.pooled_embeds = i.pooled_embeds.narrow(1, 0, 3)?;
        Ok(())
    })?;
    for (name, bad) in &cases {
        match model.forward(bad) {
            Err(hidream_model::ModelError::InputShape { name: got, .. }) => assert_eq!(got, *name),
            other => panic!("expected a shape error on {name}, got {other:?}"),
        }
    }
    Ok(())
}
