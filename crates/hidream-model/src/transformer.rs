//! `HiDreamImageTransformer2DModel`: patchify, embed, run the blocks, project out, unpatchify.

use std::collections::HashMap;

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;
use hidream_config::TransformerConfig;

use crate::attention::{AttentionConfig, AttentionContext};
use crate::embeddings::{PatchEmbed, TimestepEmbed, TimestepEmbedding, rope_table};
use crate::modulation::Modulation;
use crate::nn::{LayerNormNoAffine, Linear, chunk_modulation, modulate};
use crate::provider::{BlockProvider, ResidentBlocks};
use crate::{ModelError, Result};

/// The arguments of diffusers' forward, under their names there.
#[derive(Debug, Clone)]
pub struct TransformerInputs {
    /// `[B, C, H, W]` latents.
    pub hidden_states: Tensor,
    /// `[B]` timesteps (0..1000, float).
    pub timesteps: Tensor,
    /// `[B, S_t5, C_t5]`.
    pub encoder_hidden_states_t5: Tensor,
    /// `[n_llama_layers, B, S_llama, C_llama]`: every Llama hidden state the config may select.
    pub encoder_hidden_states_llama3: Tensor,
    /// `[B, text_emb_dim]`.
    pub pooled_embeds: Tensor,
}

impl TransformerInputs {
    /// The argument names of diffusers' forward, in order.
    pub const NAMES: [&'static str; 5] =
        ["hidden_states", "timesteps", "encoder_hidden_states_t5", "encoder_hidden_states_llama3", "pooled_embeds"];

    /// Takes the five inputs out of `tensors`, under `prefix` + their diffusers names, converted
    /// to f32; a missing one is a typed error naming it.
    pub fn from_tensors(tensors: &mut HashMap<String, Tensor>, prefix: &str) -> Result<Self> {
        let mut take = |name: &'static str| -> Result<Tensor> {
            let tensor = tensors.remove(&format!("{prefix}{name}")).ok_or(ModelError::MissingInput { name })?;
            Ok(tensor.to_dtype(DType::F32)?)
        };
        Ok(Self {
            hidden_states: take(Self::NAMES[0])?,
            timesteps: take(Self::NAMES[1])?,
            encoder_hidden_states_t5: take(Self::NAMES[2])?,
            encoder_hidden_states_llama3: take(Self::NAMES[3])?,
            pooled_embeds: take(Self::NAMES[4])?,
        })
    }

    /// Checks every input shape against `cfg`, naming the first input that is wrong.
    pub fn validate(&self, cfg: &TransformerConfig) -> Result<()> {
        fn check(name: &'static str, tensor: &Tensor, expected: &[Option<usize>]) -> Result<()> {
            let dims = tensor.dims();
            let matches =
                dims.len() == expected.len() && dims.iter().zip(expected).all(|(d, e)| e.is_none_or(|e| e == *d));
            if matches {
                return Ok(());
            }
            let expected = expected.iter().map(|e| e.map_or("_".to_owned(), |e| e.to_string())).collect::<Vec<_>>();
            Err(ModelError::InputShape { name, expected: format!("[{}]", expected.join(", ")), actual: dims.to_vec() })
        }
        let dims = self.hidden_states.dims();
        check("hidden_states", &self.hidden_states, &[None, Some(cfg.in_channels), None, None])?;
        let (batch, height, width) = (dims[0], dims[2], dims[3]);
        if height % cfg.patch_size != 0 || width % cfg.patch_size != 0 || height == 0 || width == 0 {
            return Err(ModelError::InputShape {
                name: "hidden_states",
                expected: format!("height and width positive multiples of patch_size = {}", cfg.patch_size),
                actual: dims.to_vec(),
            });
        }
        check("timesteps", &self.timesteps, &[Some(batch)])?;
        check(
            "encoder_hidden_states_t5",
            &self.encoder_hidden_states_t5,
            &[Some(batch), None, Some(cfg.t5_channels())],
        )?;
        let n_llama = self.encoder_hidden_states_llama3.dims().first().copied().unwrap_or(0);
        let llama_layers =
            if n_llama >= cfg.n_llama_layers_needed() { Some(n_llama) } else { Some(cfg.n_llama_layers_needed()) };
        check(
            "encoder_hidden_states_llama3",
            &self.encoder_hidden_states_llama3,
            &[llama_layers, Some(batch), None, Some(cfg.llama_channels())],
        )?;
        check("pooled_embeds", &self.pooled_embeds, &[Some(batch), Some(cfg.text_emb_dim)])?;
        Ok(())
    }
}

/// The embedders and the final layer: the small unit that every step needs.
#[derive(Debug, Clone)]
pub struct Embedders {
    t_embedder: TimestepEmbed,
    p_embedder: TimestepEmbedding,
    x_embedder: PatchEmbed,
    final_norm: LayerNormNoAffine,
    final_linear: Linear,
    final_modulation: Linear,
}

impl Embedders {
    /// `vb` is the transformer's root.
    pub fn new(cfg: &TransformerConfig, vb: &VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.inner_dim();
        let patch_area = cfg.patch_size * cfg.patch_size;
        Ok(Self {
            t_embedder: TimestepEmbed::new(dim, vb.pp("t_embedder"))?,
            p_embedder: TimestepEmbedding::new(cfg.text_emb_dim, dim, vb.pp("p_embedder").pp("pooled_embedder"))?,
            x_embedder: PatchEmbed::new(patch_area * cfg.in_channels, dim, vb.pp("x_embedder"))?,
            final_norm: LayerNormNoAffine::new(dim, 1e-6, vb)?,
            final_linear: Linear::new(dim, patch_area * cfg.out_channels(), vb.pp("final_layer").pp("linear"))?,
            final_modulation: Linear::new(dim, 2 * dim, vb.pp("final_layer").pp("adaLN_modulation").pp(1))?,
        })
    }

    /// `temb = t_embedder(timesteps) + p_embedder(pooled_embeds)`, `[B, dim]`.
    pub fn temb(&self, timesteps: &Tensor, pooled_embeds: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        self.t_embedder.forward(timesteps, dtype)? + self.p_embedder.forward(&pooled_embeds.to_dtype(dtype)?)?
    }

    /// `final_layer`: modulated LayerNorm then the output projection.
    fn final_layer(&self, xs: &Tensor, temb: &Tensor) -> candle_core::Result<Tensor> {
        let [shift, scale] = &chunk_modulation::<2>(&self.final_modulation.forward(&temb.silu()?)?)?;
        self.final_linear.forward(&modulate(&self.final_norm.forward(xs)?, shift, scale)?)
    }
}

/// One caption projection, `caption_projection.{idx}.linear` (no bias).
#[derive(Debug, Clone)]
pub struct TextProjection {
    linear: Linear,
}

impl TextProjection {
    /// `vb` points at `caption_projection.{idx}`; `in_dim` is
    /// `TransformerConfig::caption_input_channels(idx)`.
    pub fn new(in_dim: usize, dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { linear: Linear::no_bias(in_dim, dim, vb.pp("linear"))? })
    }

    /// Projects `states` (`[B, S, in_dim]`) after casting them to `dtype`.
    pub fn forward(&self, states: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
        self.linear.forward(&states.to_dtype(dtype)?)
    }
}

/// The input of caption projection `idx`: the Llama state `llama_layers[idx]` names (`[B, S, C]`),
/// or the T5 states for the last one.
pub fn caption_input(cfg: &TransformerConfig, idx: usize, t5: &Tensor, llama: &Tensor) -> candle_core::Result<Tensor> {
    match cfg.llama_layers.get(idx) {
        Some(&layer) => llama.get(layer),
        None => Ok(t5.clone()),
    }
}

/// The `num_layers + num_single_layers + 1` caption projections: one per block for the Llama state
/// it reads, then one for T5. They depend only on the prompt.
#[derive(Debug, Clone)]
pub struct CaptionProjection {
    projections: Vec<TextProjection>,
}

/// Projected text tokens, as the blocks consume them.
#[derive(Debug, Clone)]
pub struct TextTokens {
    /// For each block, `[B, S_llama, dim]` from the Llama layer `llama_layers[block]` names.
    pub llama: Vec<Tensor>,
    /// `[B, S_t5, dim]`.
    pub t5: Tensor,
}

impl TextTokens {
    /// From the outputs of all caption projections, in order (the T5 one last).
    pub fn from_projections(mut projected: Vec<Tensor>) -> candle_core::Result<Self> {
        let t5 = projected.pop().ok_or_else(|| candle_core::Error::Msg("no caption projections".into()))?;
        Ok(Self { llama: projected, t5 })
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.llama.iter().chain([&self.t5]).map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum()
    }
}

impl CaptionProjection {
    /// `vb` is the transformer's root.
    pub fn new(cfg: &TransformerConfig, vb: &VarBuilder) -> candle_core::Result<Self> {
        let vb = vb.pp("caption_projection");
        let projections = (0..=cfg.n_blocks())
            .map(|idx| TextProjection::new(cfg.caption_input_channels(idx), cfg.inner_dim(), vb.pp(idx)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { projections })
    }

    /// Projects the T5 states and, for every block, the Llama state it selects.
    pub fn project(
        &self,
        cfg: &TransformerConfig,
        t5: &Tensor,
        llama: &Tensor,
        dtype: DType,
    ) -> candle_core::Result<TextTokens> {
        let projected = self
            .projections
            .iter()
            .enumerate()
            .map(|(idx, projection)| projection.forward(&caption_input(cfg, idx, t5, llama)?, dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        TextTokens::from_projections(projected)
    }
}

/// Latents cut into patch tokens, as diffusers' `patchify` does.
#[derive(Debug, Clone)]
pub struct Patchified {
    /// `[B, N, p * p * C]`; `N = max_seq` on the non-square path, with zero padding.
    pub tokens: Tensor,
    /// `[B, N]` of ones and zeros on the non-square path.
    pub mask: Option<Tensor>,
    /// `(frame, row, column)` of each token; zeros for padding.
    pub positions: Vec<[f32; 3]>,
    pub patch_height: usize,
    pub patch_width: usize,
}

/// Patchifies `[B, C, H, W]` latents. Non-square latents are padded to `max_seq` tokens with a mask.
pub fn patchify(cfg: &TransformerConfig, latents: &Tensor) -> Result<Patchified> {
    let (batch, channels, height, width) = latents.dims4()?;
    let patch = cfg.patch_size;
    let (patch_height, patch_width) = (height / patch, width / patch);
    let n_patches = patch_height * patch_width;
    let tokens = latents
        .reshape((batch, channels, patch_height, patch, patch_width, patch))?
        .permute((0, 2, 4, 3, 5, 1))?
        .reshape((batch, n_patches, patch * patch * channels))?;
    let mut positions: Vec<[f32; 3]> =
        (0..patch_height).flat_map(|row| (0..patch_width).map(move |col| [0.0, row as f32, col as f32])).collect();
    if height == width {
        return Ok(Patchified { tokens, mask: None, positions, patch_height, patch_width });
    }
    let max_seq = cfg.max_seq();
    if n_patches > max_seq {
        return Err(ModelError::LatentTooLarge { height, width, patches: n_patches, max_seq });
    }
    let n_pad = max_seq - n_patches;
    let tokens = tokens.pad_with_zeros(1, 0, n_pad)?;
    positions.resize(max_seq, [0.0; 3]);
    let mask = Tensor::ones((batch, n_patches), latents.dtype(), latents.device())?.pad_with_zeros(1, 0, n_pad)?;
    Ok(Patchified { tokens, mask: Some(mask), positions, patch_height, patch_width })
}

/// Turns `[B, N, p * p * C]` tokens back into `[B, C, H, W]`, dropping padding.
fn unpatchify(
    cfg: &TransformerConfig,
    tokens: &Tensor,
    patch_height: usize,
    patch_width: usize,
) -> candle_core::Result<Tensor> {
    let (batch, _, features) = tokens.dims3()?;
    let patch = cfg.patch_size;
    let channels = features / (patch * patch);
    tokens
        .narrow(1, 0, patch_height * patch_width)?
        .reshape((batch, patch_height, patch_width, patch, patch, channels))?
        .permute((0, 5, 1, 3, 2, 4))?
        .reshape((batch, channels, patch_height * patch, patch_width * patch))
}

/// What one forward of [`HiDreamTransformer`] takes besides its blocks.
#[derive(Debug, Clone, Copy)]
pub struct StepInputs<'a> {
    /// `[B, C, H, W]` latents.
    pub hidden_states: &'a Tensor,
    /// `[B]` timesteps.
    pub timesteps: &'a Tensor,
    /// `[B, text_emb_dim]`.
    pub pooled_embeds: &'a Tensor,
    /// The projected text, once per prompt.
    pub text: &'a TextTokens,
    pub modulation: Modulation<'a>,
}

impl<'a> StepInputs<'a> {
    /// The inputs of diffusers' forward, with the caption projections already applied to its text
    /// and the modulation computed inside the blocks.
    pub fn per_step(inputs: &'a TransformerInputs, text: &'a TextTokens) -> Self {
        StepInputs {
            hidden_states: &inputs.hidden_states,
            timesteps: &inputs.timesteps,
            pooled_embeds: &inputs.pooled_embeds,
            text,
            modulation: Modulation::FromBlocks,
        }
    }
}

/// The transformer without its caption projections and blocks: those come from the caller, so that
/// they can be computed once per prompt and streamed.
#[derive(Debug, Clone)]
pub struct HiDreamTransformer {
    cfg: TransformerConfig,
    embedders: Embedders,
    attention: AttentionConfig,
}

impl HiDreamTransformer {
    /// Loads the embedders and final layer from the transformer's root `vb`.
    pub fn new(cfg: &TransformerConfig, vb: &VarBuilder) -> candle_core::Result<Self> {
        Ok(Self::from_embedders(cfg, Embedders::new(cfg, vb)?))
    }

    /// The transformer around embedders loaded elsewhere.
    pub fn from_embedders(cfg: &TransformerConfig, embedders: Embedders) -> Self {
        Self { cfg: cfg.clone(), embedders, attention: AttentionConfig::default() }
    }

    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// Sets how attention is evaluated (query chunking).
    pub fn set_attention(&mut self, attention: AttentionConfig) {
        self.attention = attention;
    }

    /// The embedders and final layer.
    pub fn embedders(&self) -> &Embedders {
        &self.embedders
    }

    /// The compute dtype (that of the loaded weights).
    pub fn dtype(&self) -> DType {
        self.embedders.final_linear.dtype()
    }

    /// `temb` for `timesteps` (`[B]`) and `pooled_embeds` (`[B, text_emb_dim]`).
    pub fn temb(&self, timesteps: &Tensor, pooled_embeds: &Tensor) -> candle_core::Result<Tensor> {
        self.embedders.temb(timesteps, pooled_embeds, self.dtype())
    }

    /// One forward, exactly as diffusers' `HiDreamImageTransformer2DModel.forward`, with projected
    /// text and blocks from `blocks`. Returns `sample`, `[B, C_out, H, W]`.
    pub fn forward(&self, inputs: &StepInputs<'_>, blocks: &mut dyn BlockProvider) -> Result<Tensor> {
        let cfg = &self.cfg;
        let dtype = self.dtype();
        let text = inputs.text;
        let patches = patchify(cfg, &inputs.hidden_states.to_dtype(dtype)?)?;
        let mut image = self.embedders.x_embedder.forward(&patches.tokens)?;
        let temb = self.temb(inputs.timesteps, inputs.pooled_embeds)?;
        let modulation_of = |kind: &str, idx: usize, list: Option<&Vec<Tensor>>| -> Result<Option<Tensor>> {
            match list {
                None => Ok(None),
                Some(list) => list.get(idx).cloned().map(Some).ok_or_else(|| ModelError::InputShape {
                    name: "modulation",
                    expected: format!("precomputed modulation for {kind}-stream block {idx}"),
                    actual: vec![list.len()],
                }),
            }
        };
        let (double_modulation, single_modulation) = match inputs.modulation {
            Modulation::FromBlocks => (None, None),
            Modulation::Precomputed(step) => (Some(&step.double), Some(&step.single)),
        };
        let (batch, n_image, _) = image.dims3()?;

        let n_blocks = cfg.n_blocks();
        if text.llama.len() != n_blocks {
            return Err(ModelError::InputShape {
                name: "text.llama",
                expected: format!("{n_blocks} projected Llama states, one per block"),
                actual: vec![text.llama.len()],
            });
        }
        // The text stream starts as [T5, the last block's Llama state]; each double block appends
        // its own Llama state and keeps only the initial part of what comes out.
        let mut initial_text = Tensor::cat(&[&text.t5, &text.llama[n_blocks - 1]], 1)?;
        let n_initial = initial_text.dim(1)?;
        let n_text = n_initial + text.llama[0].dim(1)?;
        let mut positions = patches.positions.clone();
        positions.resize(n_image + n_text, [0.0; 3]);
        let (cos, sin) = rope_table(&positions, &cfg.axes_dims_rope, image.device())?;
        let mut ctx = AttentionContext { cos, sin, key_mask: patches.mask.clone(), config: self.attention };

        for block_idx in 0..cfg.num_layers {
            let block = blocks.double_block(block_idx)?;
            let text_tokens = Tensor::cat(&[&initial_text, &text.llama[block_idx]], 1)?;
            let modulation = match modulation_of("double", block_idx, double_modulation)? {
                Some(modulation) => modulation,
                None => block.modulation(&temb)?,
            };
            let (new_image, new_text) = block.forward(&image, &text_tokens, &modulation, &ctx)?;
            image = new_image;
            initial_text = new_text.narrow(1, 0, n_initial)?;
        }

        let mut joint = Tensor::cat(&[&image, &initial_text], 1)?;
        let n_joint = joint.dim(1)?;
        if let Some(mask) = &patches.mask {
            let ones = Tensor::ones((batch, n_text), mask.dtype(), mask.device())?;
            ctx.key_mask = Some(Tensor::cat(&[mask, &ones], 1)?);
        }
        for block_idx in 0..cfg.num_single_layers {
            let block = blocks.single_block(block_idx)?;
            let tokens = Tensor::cat(&[&joint, &text.llama[cfg.num_layers + block_idx]], 1)?;
            let modulation = match modulation_of("single", block_idx, single_modulation)? {
                Some(modulation) => modulation,
                None => block.modulation(&temb)?,
            };
            joint = block.forward(&tokens, &modulation, &ctx)?.narrow(1, 0, n_joint)?;
        }

        let image = joint.narrow(1, 0, n_image)?;
        let out = self.embedders.final_layer(&image, &temb)?;
        Ok(unpatchify(cfg, &out, patches.patch_height, patches.patch_width)?)
    }
}

/// The whole transformer with every weight resident: the simplest way to run a forward.
#[derive(Debug, Clone)]
pub struct HiDreamModel {
    transformer: HiDreamTransformer,
    captions: CaptionProjection,
    blocks: ResidentBlocks,
}

impl HiDreamModel {
    /// Loads every weight of `cfg` from the transformer's root `vb`.
    pub fn new(cfg: &TransformerConfig, vb: &VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            transformer: HiDreamTransformer::new(cfg, vb)?,
            captions: CaptionProjection::new(cfg, vb)?,
            blocks: ResidentBlocks::new(cfg, vb)?,
        })
    }

    pub fn transformer_mut(&mut self) -> &mut HiDreamTransformer {
        &mut self.transformer
    }

    /// diffusers' forward: returns `sample`, `[B, C_out, H, W]`, in the weights' dtype.
    pub fn forward(&mut self, inputs: &TransformerInputs) -> Result<Tensor> {
        let cfg = self.transformer.config().clone();
        inputs.validate(&cfg)?;
        let dtype = self.transformer.dtype();
        let text = self.captions.project(
            &cfg,
            &inputs.encoder_hidden_states_t5,
            &inputs.encoder_hidden_states_llama3,
            dtype,
        )?;
        self.transformer.forward(&StepInputs::per_step(inputs, &text), &mut self.blocks)
    }
}
