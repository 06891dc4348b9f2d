//! Llama-3.1-8B under a memory policy: its 32 layers stream through hidream-memory's scheduler
//! exactly as the transformer's blocks do (the memory crate is generic for this).
//!
//! The stem (embedding, final norm, tokenizer) stays resident; each layer is a unit of the
//! planner. The layers run once per prompt batch, so the pass is not cyclic here, but the same
//! rules hold: a fixed resident set, the rest prefetched `depth` ahead into reusable slots.
//! The output is bit-identical to the all-resident encoder: the same tensors load the same way.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use hidream_memory::{DevicePool, Plan, Policy, Prefetcher, ScheduleError, UnitLoader, UnitSpec};

use super::llama::{LlamaLayer, LlamaStem};
use crate::{Result, TextError};

/// Loads Llama layers for the scheduler.
struct LayerLoader {
    stem: Arc<LlamaStem>,
}

impl UnitLoader for LayerLoader {
    type Unit = LlamaLayer;
    type Error = TextError;

    fn load(&self, unit_idx: usize) -> Result<LlamaLayer> {
        self.stem.load_layer(unit_idx)
    }
}

/// The bytes of each layer in `dtype`, from the checkpoint's tensor shapes.
pub fn layer_specs(stem: &LlamaStem, dtype: DType) -> Vec<UnitSpec> {
    (0..stem.config().num_hidden_layers)
        .map(|layer_idx| {
            let prefix = LlamaLayer::prefix(layer_idx);
            let elements: usize = stem
                .checkpoint()
                .tensor_names()
                .filter(|name| name.starts_with(&prefix))
                .filter_map(|name| stem.checkpoint().tensor_info(name))
                .map(|info| info.shape.iter().product::<usize>())
                .sum();
            UnitSpec::streamable((elements * dtype.size_in_bytes()) as u64)
        })
        .collect()
}

/// What a streamed encode measured.
#[derive(Debug, Clone)]
pub struct StreamedEncode {
    /// `[n_layers, B, T, hidden]`, as [`super::LlamaTextEncoder::encode`] returns.
    pub hidden_states: Tensor,
    pub plan: Plan,
    /// The pool's peak of layer bytes.
    pub peak_weight_bytes: u64,
}

/// Encodes `prompts` with the layers placed by `policy`.
pub fn encode_llama_streamed(
    dir: &std::path::Path,
    prompts: &[&str],
    policy: Policy,
    dtype: DType,
    device: &Device,
) -> Result<StreamedEncode> {
    let stem = Arc::new(LlamaStem::load(dir, dtype, device)?);
    let specs = layer_specs(&stem, dtype);
    let plan = policy.plan(&specs)?;
    let pool = Arc::new(DevicePool::new(match policy {
        Policy::Budget { budget_bytes, .. } => Some(budget_bytes),
        _ => None,
    }));
    let mut resident: Vec<Option<LlamaLayer>> = (0..specs.len()).map(|_| None).collect();
    let mut reservations = Vec::with_capacity(plan.resident().len());
    for &layer_idx in plan.resident() {
        reservations.push(pool.try_reserve(specs[layer_idx].bytes, &format!("llama layer {layer_idx}"))?);
        resident[layer_idx] = Some(stem.load_layer(layer_idx)?);
    }
    let loader = Arc::new(LayerLoader { stem: Arc::clone(&stem) });
    let mut prefetcher = match plan.streamed() {
        [] => None,
        _ => Some(Prefetcher::from_plan(loader, &specs, &plan, &pool)?),
    };
    let mut pass = stem.begin(prompts)?;
    for slot in &resident {
        let layer_idx = pass.next_layer();
        match (slot, prefetcher.as_mut()) {
            (Some(layer), _) => stem.run_layer(&mut pass, layer)?,
            (None, Some(prefetcher)) => {
                let loaded = prefetcher.next().map_err(|err| match err {
                    ScheduleError::Load { source, .. } => source,
                    other => TextError::Schedule(other.to_string()),
                })?;
                if loaded.unit_idx() != layer_idx {
                    return Err(TextError::Schedule(format!(
                        "expected Llama layer {layer_idx}, the prefetcher gave {}",
                        loaded.unit_idx()
                    )));
                }
                stem.run_layer(&mut pass, &loaded)?;
            }
            (None, None) => {
                return Err(TextError::invalid("Llama plan", "a layer is neither resident nor streamed"));
            }
        }
    }
    drop(prefetcher);
    drop(resident);
    drop(reservations);
    let hidden_states = stem.finish(pass)?;
    Ok(StreamedEncode { hidden_states, peak_weight_bytes: pool.peak_bytes(), plan })
}
