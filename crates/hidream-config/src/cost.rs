//! The cost model of one transformer forward: its FLOPs, its activation peak and the state that
//! per-prompt precomputation keeps.
//!
//! This is plain arithmetic over the config and the shape of a forward, so that `hidream plan`
//! can say what fits and how fast it can run before any weight is downloaded. The FLOPs count
//! every matmul (2 per multiply-add) and nothing else. The activation peak is an *estimate*: it
//! counts the large tensors that the forward of `hidream-model` holds at once, not the allocator's
//! rounding or a kernel's workspace, and it assumes the worst routing (one expert takes every
//! token). Weights are not activations: the memory planner accounts for them.
//!
//! Every product saturates instead of overflowing, so an absurd shape gives `u64::MAX`, never a
//! panic.

use serde::Serialize;

use crate::{DType, TransformerConfig};

/// HiDream's `max_sequence_length`: the pipeline pads or cuts T5 and Llama prompts to 128 tokens.
pub const MAX_SEQUENCE_LENGTH: usize = 128;

/// The image tokens that the blocks see for a latent of `latent_height × latent_width`.
///
/// A square latent gives its patches. A non-square one is padded with zero tokens to
/// [`TransformerConfig::max_seq`], as diffusers does. `None` when a side is zero or not a multiple
/// of `patch_size`, or when a non-square latent has more patches than `max_seq`.
pub fn image_tokens(cfg: &TransformerConfig, latent_height: usize, latent_width: usize) -> Option<usize> {
    let patch = cfg.patch_size;
    if latent_height == 0
        || latent_width == 0
        || !latent_height.is_multiple_of(patch)
        || !latent_width.is_multiple_of(patch)
    {
        return None;
    }
    let patches = (latent_height / patch).checked_mul(latent_width / patch)?;
    if latent_height == latent_width { Some(patches) } else { (patches <= cfg.max_seq()).then_some(cfg.max_seq()) }
}

/// The shape of one forward and how it is evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Workload {
    /// Samples per forward: the images, twice over with classifier-free guidance.
    pub batch: usize,
    /// Image tokens per sample as the blocks see them, padding included (see [`image_tokens`]).
    pub image_tokens: usize,
    /// T5 tokens per sample.
    pub t5_tokens: usize,
    /// Llama tokens per sample, in each Llama hidden state.
    pub llama_tokens: usize,
    /// Attention queries per chunk; `None` evaluates all queries at once.
    pub attention_chunk: Option<usize>,
    /// The compute dtype of activations (RoPE runs in f32 whatever it is).
    pub dtype: DType,
}

impl Workload {
    /// Text tokens per block: `[T5, Llama of the last block]` plus the block's own Llama tokens.
    pub fn text_tokens(&self) -> usize {
        self.t5_tokens.saturating_add(self.llama_tokens.saturating_mul(2))
    }

    /// Tokens in every block's attention: image plus text. Single-stream blocks see the same
    /// number (the joint stream plus the block's own Llama tokens).
    pub fn joint_tokens(&self) -> usize {
        self.image_tokens.saturating_add(self.text_tokens())
    }

    /// The FLOPs of one forward of the whole batch.
    pub fn flops(&self, cfg: &TransformerConfig) -> ForwardFlops {
        let b = self.batch;
        let dim = cfg.inner_dim();
        let (n_image, n_text, n_joint) = (self.image_tokens, self.text_tokens(), self.joint_tokens());
        let (n_double, n_single) = (cfg.num_layers, cfg.num_single_layers);
        let n_blocks = cfg.n_blocks();
        let (expert_hidden, shared_hidden) = (cfg.expert_hidden_dim(), cfg.shared_expert_hidden_dim());
        let (n_experts, top_k) = (cfg.num_routed_experts, cfg.num_activated_experts);
        let patch = cfg.patch_size;
        // A MoE feed-forward over `tokens`: the gate, top-k routed SwiGLUs, the shared SwiGLU.
        let gate = |tokens| prod(&[2, b, tokens, dim, n_experts]);
        let routed = |tokens| prod(&[2, b, tokens, top_k, 3, dim, expert_hidden]);
        let shared = |tokens| prod(&[2, b, tokens, 3, dim, shared_hidden]);
        ForwardFlops {
            embedders: sum(&[
                prod(&[2, b, n_image, patch, patch, cfg.in_channels, dim]),
                prod(&[2, b, 256 + dim, dim]),
                prod(&[2, b, cfg.text_emb_dim.saturating_add(dim), dim]),
                prod(&[2, b, dim, 2, dim]),
                prod(&[2, b, n_image, dim, patch, patch, cfg.out_channels()]),
            ]),
            caption_projections: sum(&[
                prod(&[n_blocks, 2, b, self.llama_tokens, cfg.llama_channels(), dim]),
                prod(&[2, b, self.t5_tokens, cfg.t5_channels(), dim]),
            ]),
            modulation: sum(&[prod(&[n_double, 2, b, dim, 12, dim]), prod(&[n_single, 2, b, dim, 6, dim])]),
            attention_projections: prod(&[n_blocks, 4, 2, b, n_joint, dim, dim]),
            attention: prod(&[n_blocks, 2, 2, b, n_joint, n_joint, dim]),
            moe_gate: sum(&[times(n_double, gate(n_image)), times(n_single, gate(n_joint))]),
            moe_routed: sum(&[times(n_double, routed(n_image)), times(n_single, routed(n_joint))]),
            moe_shared: sum(&[times(n_double, shared(n_image)), times(n_single, shared(n_joint))]),
            text_feed_forward: prod(&[n_double, 2, b, n_text, 3, dim, expert_hidden]),
        }
    }

    /// The estimated activation peak of one forward, block by block kind.
    pub fn activations(&self, cfg: &TransformerConfig) -> ActivationPeak {
        ActivationPeak {
            double: self.block_activations(cfg, BlockKind::Double),
            single: self.block_activations(cfg, BlockKind::Single),
        }
    }

    /// What [`Self::activations`] counts in one block of `kind`.
    fn block_activations(&self, cfg: &TransformerConfig, kind: BlockKind) -> ActivationTerms {
        let (b, dim, elem) = (self.batch, cfg.inner_dim(), self.dtype.size_in_bytes());
        let n_joint = self.joint_tokens();
        let stream = prod(&[b, n_joint, dim, elem]);
        let rows = self.attention_chunk.map_or(n_joint, |chunk| chunk.clamp(1, n_joint.max(1)));
        // The MoE's input: the image tokens in a double block (its text goes through the smaller
        // dense `ff_t` afterwards), every token in a single block.
        let moe_tokens = match kind {
            BlockKind::Double => self.image_tokens,
            BlockKind::Single => n_joint,
        };
        let moe_hidden = cfg.expert_hidden_dim().max(cfg.shared_expert_hidden_dim());
        // q, k and v; the rotated q and k; v contiguous per head; the attention output. A double
        // block also holds its image and text projections before they are concatenated.
        let projection_copies = match kind {
            BlockKind::Double => 10,
            BlockKind::Single => 7,
        };
        ActivationTerms {
            kind,
            streams: times(3, stream),
            projections: times(projection_copies, stream),
            rope_f32: prod(&[2, b, n_joint, dim, DType::F32.size_in_bytes()]),
            scores: prod(&[2, b, cfg.num_attention_heads, rows, n_joint, elem]),
            moe_hidden: prod(&[3, b, moe_tokens, moe_hidden, elem]),
            moe_io: prod(&[3, b, moe_tokens, dim, elem]),
        }
    }

    /// The state that per-prompt precomputation keeps on the device for a schedule of `steps`.
    pub fn prepared_state(&self, cfg: &TransformerConfig, steps: usize) -> PreparedState {
        let (b, dim, elem) = (self.batch, cfg.inner_dim(), self.dtype.size_in_bytes());
        let vectors_per_step = sum(&[prod(&[12, cfg.num_layers]), prod(&[6, cfg.num_single_layers])]);
        let modulation_per_step = prod(&[b, dim, elem]).saturating_mul(vectors_per_step);
        PreparedState {
            modulation_per_step,
            modulation_all_steps: modulation_per_step.saturating_mul(steps as u64),
            text_tokens: sum(&[
                prod(&[cfg.n_blocks(), b, self.llama_tokens, dim, elem]),
                prod(&[b, self.t5_tokens, dim, elem]),
            ]),
        }
    }
}

/// The FLOPs of one forward of the whole batch, by where they are spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ForwardFlops {
    /// `x_embedder` over the image tokens, the timestep and pooled-text embedders, and the final
    /// layer (its modulation and the output projection over the image tokens).
    pub embedders: u64,
    /// The 49 caption projections: one per block of its Llama state, and one of T5.
    pub caption_projections: u64,
    /// Every block's adaLN modulation, `Linear(dim, 12·dim)` or `Linear(dim, 6·dim)` of `temb`.
    pub modulation: u64,
    /// q, k, v and out projections of every token in every block (`4 × 2 × N × dim²`).
    pub attention_projections: u64,
    /// The attention itself: the scores `q kᵀ` and the weighted sum of `v` (`2 × 2 × N² × dim`).
    pub attention: u64,
    /// The MoE gates (`2 × tokens × dim × experts`).
    pub moe_gate: u64,
    /// Each token through its top-k routed SwiGLU experts (`2 × k × 3 × dim × expert_hidden`).
    pub moe_routed: u64,
    /// Each token through the shared SwiGLU expert (`2 × 3 × dim × shared_hidden`).
    pub moe_shared: u64,
    /// The text tokens of the double blocks through the dense `ff_t` (`2 × 3 × dim × expert_hidden`).
    pub text_feed_forward: u64,
}

impl ForwardFlops {
    /// Everything.
    pub fn total(&self) -> u64 {
        sum(&[self.prompt_work(), self.without_prompt_work()])
    }

    /// What depends on the prompt and the timestep only: caption projections and modulation.
    pub fn prompt_work(&self) -> u64 {
        sum(&[self.caption_projections, self.modulation])
    }

    /// What a step computes when [`Self::prompt_work`] is done once per prompt.
    pub fn without_prompt_work(&self) -> u64 {
        sum(&[
            self.embedders,
            self.attention_projections,
            self.attention,
            self.moe_gate,
            self.moe_routed,
            self.moe_shared,
            self.text_feed_forward,
        ])
    }
}

/// A double-stream or a single-stream block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    Double,
    Single,
}

impl BlockKind {
    /// `double` or `single`.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockKind::Double => "double",
            BlockKind::Single => "single",
        }
    }
}

/// The large activations of one block, in bytes (an estimate; see the module doc).
///
/// `N` is [`Workload::joint_tokens`] and `B` the batch. The block first attends, then runs its
/// feed-forward; the streams live through both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ActivationTerms {
    pub kind: BlockKind,
    /// The stream entering the block, the residual it becomes and its normalised copy:
    /// `3 × [B, N, dim]`.
    pub streams: u64,
    /// q, k, v, their rotated and per-head contiguous copies and the attention output:
    /// `7 × [B, N, dim]`, `10 ×` in a double block (image and text halves before concatenation).
    pub projections: u64,
    /// q or k in f32 while RoPE rotates it, before and after: `2 × [B, N, dim]` in f32.
    pub rope_f32: u64,
    /// The score matrix and its softmax: `2 × [B, heads, rows, N]`, `rows` the query chunk or `N`.
    pub scores: u64,
    /// One SwiGLU's hidden activations (`w1`, `w3` and their product) when one expert takes
    /// every token of the MoE: `3 × [B·tokens, expert_hidden]`.
    pub moe_hidden: u64,
    /// The MoE's gathered input, the expert's output and the accumulated result:
    /// `3 × [B·tokens, dim]`.
    pub moe_io: u64,
}

impl ActivationTerms {
    /// Held while attention runs: the projections, then RoPE's f32 copies or the scores.
    pub fn attention_phase(&self) -> u64 {
        self.projections.saturating_add(self.rope_f32.max(self.scores))
    }

    /// Held while the feed-forward runs.
    pub fn feed_forward_phase(&self) -> u64 {
        self.moe_hidden.saturating_add(self.moe_io)
    }

    /// Whether attention (rather than the feed-forward) sets this block's peak.
    pub fn attention_binds(&self) -> bool {
        self.attention_phase() >= self.feed_forward_phase()
    }

    /// The block's peak: the streams plus the larger phase.
    pub fn peak(&self) -> u64 {
        self.streams.saturating_add(self.attention_phase().max(self.feed_forward_phase()))
    }
}

/// The estimated activation peak of one forward: the larger of its two block kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ActivationPeak {
    pub double: ActivationTerms,
    pub single: ActivationTerms,
}

impl ActivationPeak {
    /// The block kind whose peak is larger (double on a tie).
    pub fn binding(&self) -> &ActivationTerms {
        if self.single.peak() > self.double.peak() { &self.single } else { &self.double }
    }

    /// The estimated peak in bytes.
    pub fn bytes(&self) -> u64 {
        self.binding().peak()
    }
}

/// What per-prompt precomputation keeps, in the compute dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PreparedState {
    /// Every block's modulation vectors for one step: `[B, 12·dim]` per double block and
    /// `[B, 6·dim]` per single block.
    pub modulation_per_step: u64,
    /// [`Self::modulation_per_step`] for every step of the schedule.
    pub modulation_all_steps: u64,
    /// The projected text: `[B, llama_tokens, dim]` per block and `[B, t5_tokens, dim]` of T5.
    /// A forward holds these whether or not they are precomputed.
    pub text_tokens: u64,
}

impl PreparedState {
    /// Everything kept across the steps.
    pub fn total(&self) -> u64 {
        self.modulation_all_steps.saturating_add(self.text_tokens)
    }
}

/// The product of `factors`, saturating at `u64::MAX`.
fn prod(factors: &[usize]) -> u64 {
    factors.iter().fold(1u64, |product, &factor| product.saturating_mul(u64::try_from(factor).unwrap_or(u64::MAX)))
}

/// `count × value`, saturating at `u64::MAX`.
fn times(count: usize, value: u64) -> u64 {
    prod(&[count]).saturating_mul(value)
}

/// The sum of `terms`, saturating at `u64::MAX`.
fn sum(terms: &[u64]) -> u64 {
    terms.iter().fold(0u64, |total, &term| total.saturating_add(term))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tiny preset with 16 image tokens (a 8x8 latent), 4 T5 and 4 Llama tokens, batch 1, f32.
    fn tiny_workload() -> Workload {
        Workload { batch: 1, image_tokens: 16, t5_tokens: 4, llama_tokens: 4, attention_chunk: None, dtype: DType::F32 }
    }

    /// The full model at 1024x1024 pixels (a 128x128 latent), 128 + 128 text tokens, bf16.
    fn full_workload(batch: usize) -> Workload {
        Workload {
            batch,
            image_tokens: image_tokens(&TransformerConfig::full(), 128, 128).unwrap(),
            t5_tokens: MAX_SEQUENCE_LENGTH,
            llama_tokens: MAX_SEQUENCE_LENGTH,
            attention_chunk: None,
            dtype: DType::BF16,
        }
    }

    #[test]
    fn image_tokens_pad_non_square_latents_to_max_seq() {
        let full = TransformerConfig::full();
        let check =
            |height, width, expected| assert_eq!(image_tokens(&full, height, width), expected, "{height}x{width}");
        check(128, 128, Some(4096));
        check(256, 256, Some(16384)); // Square latents are never padded, nor limited.
        check(96, 128, Some(4096)); // 48 x 64 = 3072 patches, padded to max_seq.
        check(128, 256, None); // 8192 patches do not fit max_seq = 4096.
        check(127, 127, None); // Not a multiple of the patch.
        check(0, 0, None);
    }

    /// Every figure of the tiny preset by hand: dim 32 (2 heads of 16), patch 2, 4 channels in and
    /// out, 2 + 2 blocks, T5 width 32, Llama width 24, pooled width 16, 4 experts, top 2, expert
    /// and shared hidden 256 (`2 × 128 / 3 = 85` and `2 × 64 / 3 = 42`, both rounded up to 256).
    /// Tokens: 16 image, 4 + 4 + 4 = 12 text, 28 joint.
    #[test]
    fn tiny_flops_by_hand() {
        let expected = ForwardFlops {
            // x_embedder 2·16·16·32 = 16384; t_embedder 2·(256·32 + 32·32) = 18432; p_embedder
            // 2·(16·32 + 32·32) = 3072; final modulation 2·32·64 = 4096; final linear 2·16·32·16.
            embedders: 16384 + 18432 + 3072 + 4096 + 16384,
            // 4 Llama projections of 2·4·24·32 = 6144, and T5 2·4·32·32 = 8192.
            caption_projections: 4 * 6144 + 8192,
            // Double 2·32·384 = 24576, single 2·32·192 = 12288, two of each.
            modulation: 2 * 24576 + 2 * 12288,
            // 4 blocks × 4 projections × 2·28·32·32.
            attention_projections: 4 * 4 * 57344,
            // 4 blocks × (scores + weighted sum) 2 × 2·28·28·32.
            attention: 4 * 2 * 50176,
            // Gates 2·tokens·32·4: 16 image tokens in double blocks, 28 in single blocks.
            moe_gate: 2 * 4096 + 2 * 7168,
            // 2 experts × 3 matrices × 2·tokens·32·256 = tokens × 98304.
            moe_routed: 2 * 16 * 98304 + 2 * 28 * 98304,
            // 3 matrices × 2·tokens·32·256 = tokens × 49152.
            moe_shared: 2 * 16 * 49152 + 2 * 28 * 49152,
            // The 12 text tokens of each double block through 3 × 2·32·256.
            text_feed_forward: 2 * 12 * 49152,
        };
        let flops = tiny_workload().flops(&TransformerConfig::tiny());
        assert_eq!(flops, expected);
        assert_eq!(flops.total(), 15_662_080);
        assert_eq!(flops.prompt_work(), 32768 + 73728);
        assert_eq!(flops.without_prompt_work() + flops.prompt_work(), flops.total());
        // Everything scales with the batch.
        let batch_3 = Workload { batch: 3, ..tiny_workload() }.flops(&TransformerConfig::tiny());
        assert_eq!(batch_3.total(), 3 * flops.total());
    }

    /// The tiny activations by hand, in f32: one `[1, 28, 32]` stream is 3584 bytes.
    #[test]
    fn tiny_activations_by_hand() {
        let peak = tiny_workload().activations(&TransformerConfig::tiny());
        let double = ActivationTerms {
            kind: BlockKind::Double,
            streams: 3 * 3584,
            projections: 10 * 3584,
            rope_f32: 2 * 3584,
            scores: 2 * 2 * 28 * 28 * 4,
            // The MoE of a double block takes the 16 image tokens.
            moe_hidden: 3 * 16 * 256 * 4,
            moe_io: 3 * 16 * 32 * 4,
        };
        let single = ActivationTerms {
            kind: BlockKind::Single,
            projections: 7 * 3584,
            moe_hidden: 3 * 28 * 256 * 4,
            moe_io: 3 * 28 * 32 * 4,
            ..double
        };
        assert_eq!(peak, ActivationPeak { double, single });
        // Double: 10752 + max(35840 + 12544, 49152 + 6144); single: 10752 + max(25088 + 12544, 86016 + 10752).
        assert_eq!((double.peak(), single.peak()), (66_048, 107_520));
        assert!(!single.attention_binds());
        assert_eq!(peak.binding().kind, BlockKind::Single);
        assert_eq!(peak.bytes(), 107_520);

        // Chunks of 5 queries: the score matrix holds 5 rows of 28 instead of 28.
        let chunked = Workload { attention_chunk: Some(5), ..tiny_workload() }.activations(&TransformerConfig::tiny());
        assert_eq!(chunked.double.scores, 2 * 2 * 5 * 28 * 4);
        // A chunk of 0 or larger than the sequence is one chunk of every query.
        for chunk in [0, 1000] {
            let whole =
                Workload { attention_chunk: Some(chunk), ..tiny_workload() }.activations(&TransformerConfig::tiny());
            assert_eq!(whole.double.scores, if chunk == 0 { 2 * 2 * 28 * 4 } else { double.scores });
        }
    }

    #[test]
    fn tiny_prepared_state_by_hand() {
        let state = tiny_workload().prepared_state(&TransformerConfig::tiny(), 3);
        // [1, 12·32] for 2 double blocks and [1, 6·32] for 2 single blocks, f32: 36·32·4 bytes.
        assert_eq!(state.modulation_per_step, 4608);
        assert_eq!(state.modulation_all_steps, 3 * 4608);
        // [1, 4, 32] for each of the 4 blocks and for T5.
        assert_eq!(state.text_tokens, 5 * 4 * 32 * 4);
        assert_eq!(state.total(), 3 * 4608 + 2560);
    }

    /// The full model at 1024x1024, by hand: N = 4096 + 384 = 4480 tokens, dim 2560, expert hidden
    /// 6912, shared hidden 3584.
    ///
    /// - q/k/v/out: 48 blocks × 8·4480·2560² = 48 × 2.349e11 = 1.127e13.
    /// - attention: 48 × 4·4480²·2560 = 48 × 2.055e11 = 9.865e12.
    /// - routed: 2 experts × 6·2560·6912 = 2.123e8 per token; 16 × 4096 + 32 × 4480 = 208896
    ///   tokens: 4.436e13. Shared: 6·2560·3584 = 5.505e7 per token: 1.150e13.
    /// - ff_t: 16 × 384 × 2·3·2560·6912 = 6.52e11. Captions 1.3e11, the rest below 1e10.
    ///
    /// Sum: 7.78e13 per image and forward, 0.111 s at 700 TFLOP/s: DESIGN's 0.11 s per forward on
    /// an H100, twice that with guidance.
    #[test]
    fn full_at_1024_is_about_78_tflop_per_image() {
        let cfg = TransformerConfig::full();
        let flops = full_workload(1).flops(&cfg);
        assert_eq!(flops.attention_projections, 48 * 8 * 4480 * 2560 * 2560);
        assert_eq!(flops.attention, 48 * 4 * 4480 * 4480 * 2560);
        assert_eq!(flops.moe_routed, (16 * 4096 + 32 * 4480) * 2 * 6 * 2560 * 6912);
        assert_eq!(flops.moe_shared, (16 * 4096 + 32 * 4480) * 6 * 2560 * 3584);
        let total = flops.total() as f64;
        assert!((7.7e13..7.9e13).contains(&total), "{total:e}");
        let seconds = total / 700e12;
        assert!((0.105..0.115).contains(&seconds), "{seconds}");
        assert_eq!(full_workload(2).flops(&cfg).total(), 2 * flops.total());

        // Activations: the double blocks' unchunked attention binds, with two [1, 20, 4480, 4480]
        // bf16 matrices (1.50 GiB) beside 13 streams of [1, 4480, 2560] (21.9 MiB each).
        let peak = full_workload(1).activations(&cfg);
        assert_eq!(peak.binding().kind, BlockKind::Double);
        assert!(peak.binding().attention_binds());
        assert_eq!(peak.bytes(), 13 * 4480 * 2560 * 2 + 2 * 20 * 4480 * 4480 * 2);
        let chunked = Workload { attention_chunk: Some(1024), ..full_workload(1) }.activations(&cfg);
        assert!(chunked.bytes() < peak.bytes() / 2, "{} vs {}", chunked.bytes(), peak.bytes());
    }

    #[test]
    fn absurd_shapes_saturate_instead_of_overflowing() {
        let workload = Workload { batch: usize::MAX, image_tokens: usize::MAX, ..tiny_workload() };
        let cfg = TransformerConfig::tiny();
        assert_eq!(workload.flops(&cfg).total(), u64::MAX);
        assert_eq!(workload.activations(&cfg).bytes(), u64::MAX);
        assert_eq!(workload.prepared_state(&cfg, usize::MAX).total(), u64::MAX);
    }
}
