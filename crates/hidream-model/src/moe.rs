//! The feed-forward layers: SwiGLU, and the mixture of experts with a shared expert.
//!
//! The gate is a softmax over `num_routed_experts` logits; each token goes to its top-k experts,
//! weighted by their (not renormalised) probabilities. diffusers' `moe_infer` adds the expert
//! outputs into a zero tensor in ascending expert order, then adds the shared expert; this module
//! adds in the same order so that results agree to the last bit where the kernels do.

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::nn::Linear;

/// `HiDreamImageFeedForwardSwiGLU`: `w2(silu(w1 x) * w3 x)`.
#[derive(Debug, Clone)]
pub struct FeedForwardSwiGlu {
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

impl FeedForwardSwiGlu {
    /// `hidden_dim` is the final width (after diffusers' 2/3 and multiple-of-256 rounding).
    pub fn new(dim: usize, hidden_dim: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            w1: Linear::no_bias(dim, hidden_dim, vb.pp("w1"))?,
            w2: Linear::no_bias(hidden_dim, dim, vb.pp("w2"))?,
            w3: Linear::no_bias(dim, hidden_dim, vb.pp("w3"))?,
        })
    }
}

impl Module for FeedForwardSwiGlu {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let gated = (self.w1.forward(xs)?.silu()? * self.w3.forward(xs)?)?;
        self.w2.forward(&gated)
    }
}

/// `MoEGate`: softmax scores and the top-k routing per token.
#[derive(Debug, Clone)]
pub struct MoeGate {
    weight: Tensor,
    top_k: usize,
}

/// The routing of a batch of tokens: for each expert, the tokens it takes and their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// `per_expert[e]` lists `(token_idx, weight)` in ascending token order.
    pub per_expert: Vec<Vec<(u32, f32)>>,
}

impl MoeGate {
    pub fn new(dim: usize, n_experts: usize, top_k: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self { weight: vb.get((n_experts, dim), "weight")?, top_k })
    }

    /// Routes `xs` (`[n_tokens, dim]`).
    pub fn route(&self, xs: &Tensor) -> candle_core::Result<Routing> {
        let logits = xs.matmul(&self.weight.t()?)?;
        let scores = candle_nn::ops::softmax_last_dim(&logits)?;
        let scores: Vec<Vec<f32>> = scores.to_dtype(DType::F32)?.to_vec2()?;
        let n_experts = self.weight.dim(0)?;
        let mut per_expert = vec![Vec::new(); n_experts];
        let mut order: Vec<usize> = (0..n_experts).collect();
        for (token_idx, token_scores) in scores.iter().enumerate() {
            // Highest score first; ties go to the lower expert index.
            order.sort_by(|&a, &b| token_scores[b].total_cmp(&token_scores[a]).then(a.cmp(&b)));
            for &expert_idx in &order[..self.top_k] {
                per_expert[expert_idx].push((token_idx as u32, token_scores[expert_idx]));
            }
        }
        Ok(Routing { per_expert })
    }
}

/// `MOEFeedForwardSwiGLU`: routed experts plus a shared expert.
#[derive(Debug, Clone)]
pub struct MoeFeedForward {
    shared_experts: FeedForwardSwiGlu,
    experts: Vec<FeedForwardSwiGlu>,
    gate: MoeGate,
}

impl MoeFeedForward {
    pub fn new(cfg: &hidream_config::TransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let dim = cfg.inner_dim();
        let shared_experts = FeedForwardSwiGlu::new(dim, cfg.shared_expert_hidden_dim(), vb.pp("shared_experts"))?;
        let experts = (0..cfg.num_routed_experts)
            .map(|expert_idx| FeedForwardSwiGlu::new(dim, cfg.expert_hidden_dim(), vb.pp("experts").pp(expert_idx)))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let gate = MoeGate::new(dim, cfg.num_routed_experts, cfg.num_activated_experts, vb.pp("gate"))?;
        Ok(Self { shared_experts, experts, gate })
    }
}

impl Module for MoeFeedForward {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let dims = xs.dims().to_vec();
        let dim = dims[dims.len() - 1];
        let flat = xs.reshape(((), dim))?;
        let routing = self.gate.route(&flat)?;
        let mut routed = flat.zeros_like()?;
        for (expert, assignments) in self.experts.iter().zip(&routing.per_expert) {
            if assignments.is_empty() {
                continue;
            }
            let token_idxs: Vec<u32> = assignments.iter().map(|(token_idx, _)| *token_idx).collect();
            let weights: Vec<f32> = assignments.iter().map(|(_, weight)| *weight).collect();
            let n_assigned = token_idxs.len();
            let token_idxs = Tensor::from_vec(token_idxs, n_assigned, xs.device())?;
            let weights = Tensor::from_vec(weights, (n_assigned, 1), xs.device())?.to_dtype(xs.dtype())?;
            let expert_out = expert.forward(&flat.index_select(&token_idxs, 0)?)?.broadcast_mul(&weights)?;
            routed = routed.index_add(&token_idxs, &expert_out, 0)?;
        }
        (routed + self.shared_experts.forward(&flat)?)?.reshape(dims)
    }
}
