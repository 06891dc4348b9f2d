//! Text encoders under a memory policy: their layers stream through hidream-memory's residency
//! runtime exactly as the transformer's blocks do.
//!
//! An encoder is a [`LayerStack`]: a stem that stays resident (tokenizer, embeddings, final norm,
//! and for CLIP the projection) and layers that run once per prompt batch, in order: CLIP-L and
//! CLIP-G ([`encode_clip_streamed`]), T5 ([`encode_t5_streamed`]) and Llama
//! ([`encode_llama_streamed`]). Each layer is a unit of the planner,
//! loaded into a reusable slot buffer; the rest is the runtime's. The stem counts against the same
//! budget: it is the ledger's first reservation, and the layers are planned in what it leaves
//! ([`crate::text_stage_plan`] makes the same plan from the headers alone). The output is
//! bit-identical to the all-resident encoder: the same tensors load and convert the same way.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use hidream_device::{DeviceBuffer, DeviceTier, TierFence};
use hidream_memory::{
    BudgetLedger, Plan, Policy, PrefetchStats, Ready, Residency, ScheduleError, SlotBuffer, UnitLoader, UnitSpec,
};
use hidream_weights::Checkpoint;

use crate::clip::{ClipLayer, ClipStem};
use crate::llama::{LlamaLayer, LlamaStem};
use crate::t5::{T5Block, T5Stem};
use crate::{Result, TextError, Tokens};

/// A text encoder's stem and the recipe of its layers.
pub trait LayerStack: Send + Sync + 'static {
    /// One layer, as the stem runs it.
    type Layer: Send + 'static;

    /// The checkpoint the layers are read from.
    fn checkpoint(&self) -> &Checkpoint;
    fn n_layers(&self) -> usize;
    /// The checkpoint key prefix of layer `layer_idx`'s tensors.
    fn layer_prefix(&self, layer_idx: usize) -> String;
    /// Builds layer `layer_idx` from a `VarBuilder` over full checkpoint keys.
    fn build_layer(&self, layer_idx: usize, vb: VarBuilder<'static>) -> Result<Self::Layer>;
    /// The compute dtype and device.
    fn dtype(&self) -> DType;
    fn device(&self) -> &Device;
    /// The encoder's name in messages: `CLIP`, `T5` or `Llama`.
    fn label(&self) -> &'static str;
    /// The bytes of the stem's weights as loaded, which stay resident beside the layers.
    fn stem_bytes(&self) -> u64;
}

/// What a streamed encode measured.
#[derive(Debug, Clone)]
pub struct StreamedEncode {
    /// The encoder's output.
    pub hidden_states: Tensor,
    /// The prompts' tokens, with what truncation dropped ([`Tokens::dropped`]).
    pub tokens: Tokens,
    /// Where the layers went, in what the budget left beside the stem.
    pub plan: Plan,
    /// The ledger's peak of weight bytes: the stem plus the layers resident or in slots at once.
    pub peak_weight_bytes: u64,
    pub stats: PrefetchStats,
}

/// The bytes of each layer in the compute dtype, from the checkpoint's tensor shapes.
pub fn layer_specs<S: LayerStack>(stack: &S) -> Result<Vec<UnitSpec>> {
    stack_layout(stack).map(|(_, specs)| specs)
}

/// Runs every layer of `stack` in order through `run`, placed by `policy`: resident or streamed
/// into reusable slots, loaded ahead as the plan allows and never past the last layer. The stem
/// counts against the policy's budget too: the layers get what it leaves, and a budget below the
/// stage's minimum is [`TextError::StageBudgetTooSmall`].
pub fn run_layers<S: LayerStack>(
    stack: &Arc<S>,
    policy: Policy,
    mut run: impl FnMut(&S::Layer) -> Result<()>,
) -> Result<(Plan, u64, PrefetchStats)> {
    let (names, specs) = stack_layout(&**stack)?;
    let stem_bytes = stack.stem_bytes();
    let (plan, _) = crate::stage::plan_layers(stack.label(), stack.checkpoint().dir(), stem_bytes, &specs, policy)?;
    let ledger = Arc::new(BudgetLedger::new(policy.budget_bytes()));
    // The stem is on the device already; its bytes are the ledger's first.
    let _stem = ledger.try_reserve(stem_bytes, &format!("the {} stem", stack.label()))?;
    let tier = DeviceTier::for_device(stack.device())?;
    let loader = Arc::new(LayerLoader { stack: Arc::clone(stack), tier, names });
    let mut layers =
        Residency::new(loader, &specs, plan.clone(), Arc::clone(&ledger)).map_err(ScheduleError::into_error)?;
    layers.expect_passes(1);
    let mut pass = layers.pass().map_err(ScheduleError::into_error)?;
    for layer_idx in 0..specs.len() {
        let layer = pass.unit(layer_idx).map_err(ScheduleError::into_error)?;
        run(&layer)?;
    }
    drop(pass);
    Ok((plan, ledger.peak_bytes(), layers.stats()))
}

/// Encodes `prompts` with Llama's layers placed by `policy`.
pub fn encode_llama_streamed(
    dir: &std::path::Path,
    prompts: &[&str],
    policy: Policy,
    dtype: DType,
    device: &Device,
) -> Result<StreamedEncode> {
    let stem = Arc::new(LlamaStem::load(dir, dtype, device)?);
    let mut pass = stem.begin(prompts)?;
    let (plan, peak_weight_bytes, stats) = run_layers(&stem, policy, |layer| stem.run_layer(&mut pass, layer))?;
    let tokens = pass.tokens().clone();
    let hidden_states = stem.finish(pass)?;
    Ok(StreamedEncode { hidden_states, tokens, plan, peak_weight_bytes, stats })
}

/// Encodes `prompts` with T5's blocks placed by `policy`.
pub fn encode_t5_streamed(
    encoder_dir: &std::path::Path,
    tokenizer_dir: &std::path::Path,
    prompts: &[&str],
    policy: Policy,
    dtype: DType,
    device: &Device,
) -> Result<StreamedEncode> {
    let stem = Arc::new(T5Stem::load(encoder_dir, tokenizer_dir, dtype, device)?);
    let tokens = stem.tokenizer().encode(prompts)?;
    let mut pass = stem.begin(&tokens)?;
    let (plan, peak_weight_bytes, stats) = run_layers(&stem, policy, |block| stem.run_block(&mut pass, block))?;
    let hidden_states = stem.finish(pass)?;
    Ok(StreamedEncode { hidden_states, tokens, plan, peak_weight_bytes, stats })
}

/// Encodes `prompts` with CLIP's encoder layers placed by `policy`; the hidden states are the
/// projected pooled `text_embeds` `[B, projection_dim]`.
pub fn encode_clip_streamed(
    encoder_dir: &std::path::Path,
    tokenizer_dir: &std::path::Path,
    prompts: &[&str],
    policy: Policy,
    dtype: DType,
    device: &Device,
) -> Result<StreamedEncode> {
    let stem = Arc::new(ClipStem::load(encoder_dir, tokenizer_dir, dtype, device)?);
    let tokens = stem.tokenizer().encode(prompts)?;
    let mut pass = stem.begin(tokens)?;
    let (plan, peak_weight_bytes, stats) = run_layers(&stem, policy, |layer| stem.run_layer(&mut pass, layer))?;
    let tokens = pass.tokens().clone();
    let hidden_states = stem.finish(pass)?;
    Ok(StreamedEncode { hidden_states, tokens, plan, peak_weight_bytes, stats })
}

impl LayerStack for ClipStem {
    type Layer = ClipLayer;

    fn checkpoint(&self) -> &Checkpoint {
        ClipStem::checkpoint(self)
    }

    fn n_layers(&self) -> usize {
        self.config().num_hidden_layers
    }

    fn layer_prefix(&self, layer_idx: usize) -> String {
        ClipLayer::prefix(layer_idx)
    }

    fn build_layer(&self, layer_idx: usize, vb: VarBuilder<'static>) -> Result<ClipLayer> {
        ClipStem::build_layer(self, layer_idx, vb)
    }

    fn dtype(&self) -> DType {
        ClipStem::dtype(self)
    }

    fn device(&self) -> &Device {
        ClipStem::device(self)
    }

    fn label(&self) -> &'static str {
        "CLIP"
    }

    fn stem_bytes(&self) -> u64 {
        self.resident_bytes()
    }
}

impl LayerStack for LlamaStem {
    type Layer = LlamaLayer;

    fn checkpoint(&self) -> &Checkpoint {
        LlamaStem::checkpoint(self)
    }

    fn n_layers(&self) -> usize {
        self.config().num_hidden_layers
    }

    fn layer_prefix(&self, layer_idx: usize) -> String {
        LlamaLayer::prefix(layer_idx)
    }

    fn build_layer(&self, layer_idx: usize, vb: VarBuilder<'static>) -> Result<LlamaLayer> {
        LlamaLayer::new(self.config(), layer_idx, vb)
    }

    fn dtype(&self) -> DType {
        LlamaStem::dtype(self)
    }

    fn device(&self) -> &Device {
        LlamaStem::device(self)
    }

    fn label(&self) -> &'static str {
        "Llama"
    }

    fn stem_bytes(&self) -> u64 {
        self.resident_bytes()
    }
}

impl LayerStack for T5Stem {
    type Layer = T5Block;

    fn checkpoint(&self) -> &Checkpoint {
        T5Stem::checkpoint(self)
    }

    fn n_layers(&self) -> usize {
        self.config().num_layers
    }

    fn layer_prefix(&self, layer_idx: usize) -> String {
        T5Block::prefix(layer_idx)
    }

    fn build_layer(&self, layer_idx: usize, vb: VarBuilder<'static>) -> Result<T5Block> {
        T5Block::new(self.config(), layer_idx, vb)
    }

    fn dtype(&self) -> DType {
        T5Stem::dtype(self)
    }

    fn device(&self) -> &Device {
        T5Stem::device(self)
    }

    fn label(&self) -> &'static str {
        "T5"
    }

    fn stem_bytes(&self) -> u64 {
        self.resident_bytes()
    }
}

/// Loads a stack's layers into unit buffers for the runtime.
struct LayerLoader<S> {
    stack: Arc<S>,
    tier: DeviceTier,
    /// The checkpoint keys of each layer, sorted: its layout in a buffer.
    names: Vec<Vec<String>>,
}

fn stack_layout<S: LayerStack>(stack: &S) -> Result<(Vec<Vec<String>>, Vec<UnitSpec>)> {
    layout(stack.checkpoint(), stack.n_layers(), |layer_idx| stack.layer_prefix(layer_idx), stack.dtype())
}

/// Each layer's checkpoint keys (sorted) and its bytes in `dtype`, from the checkpoint's headers.
pub(crate) fn layout(
    checkpoint: &Checkpoint,
    n_layers: usize,
    prefix: impl Fn(usize) -> String,
    dtype: DType,
) -> Result<(Vec<Vec<String>>, Vec<UnitSpec>)> {
    let element_bytes = dtype.size_in_bytes();
    let mut names = Vec::with_capacity(n_layers);
    let mut specs = Vec::with_capacity(n_layers);
    for layer_idx in 0..n_layers {
        let prefix = prefix(layer_idx);
        let layer: Vec<String> =
            checkpoint.tensor_names().filter(|name| name.starts_with(&prefix)).map(str::to_owned).collect();
        if layer.is_empty() {
            return Err(TextError::invalid(
                prefix,
                format!("no tensor of this layer in the checkpoint at {}", checkpoint.dir().display()),
            ));
        }
        let elements: usize = layer
            .iter()
            .filter_map(|name| checkpoint.tensor_info(name))
            .map(|info| info.shape.iter().product::<usize>())
            .sum();
        specs.push(UnitSpec::streamable((elements * element_bytes) as u64));
        names.push(layer);
    }
    Ok((names, specs))
}

/// The fences are the device tier's (see the transformer's loader).
impl<S: LayerStack> UnitLoader for LayerLoader<S> {
    type Buffer = DeviceBuffer;
    type Unit = S::Layer;
    type Fence = TierFence;
    type Error = TextError;

    fn allocate(&self, bytes: u64) -> Result<DeviceBuffer> {
        Ok(self.tier.allocate(bytes, self.stack.dtype())?)
    }

    fn load_into(
        &self,
        layer_idx: usize,
        slot: &mut SlotBuffer<DeviceBuffer, TierFence>,
    ) -> Result<Ready<S::Layer, TierFence>> {
        let names = self.names.get(layer_idx).ok_or_else(|| {
            TextError::invalid(format!("layer {layer_idx}"), format!("out of {} layers", self.names.len()))
        })?;
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let (loaded, ready) = self.tier.load(self.stack.checkpoint(), &names, slot)?;
        let vb = hidream_weights::unit_var_builder(loaded.tensors, self.stack.dtype(), self.stack.device());
        let unit = self.stack.build_layer(layer_idx, vb)?;
        Ok(Ready { unit, ready, bytes_loaded: loaded.bytes })
    }

    fn wait_ready(&self, ready: &TierFence) -> Result<()> {
        Ok(self.tier.wait_ready(ready)?)
    }

    fn record_consumed(&self) -> TierFence {
        self.tier.record_consumed()
    }
}
