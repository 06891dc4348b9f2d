//! Which official sampler each HiDream-I1 variant uses, and the pipeline's shift for a transformer
//! config: the meeting point of hidream-config and hidream-schedulers, which knows neither
//! variants nor configs.

use hidream_config::{SchedulerKind, TransformerConfig, Variant};
use hidream_schedulers::{FlashEulerConfig, FlowUniPcConfig, PipelineShift, Scheduler, SchedulerConfig};

use crate::{PipelineError, Result};

/// The scheduler a variant's official pipeline builds (`hdi1/nf4.py`, `MODEL_CONFIGS` and
/// `load_models`): 1000 training timesteps, the variant's shift, no dynamic shifting, every other
/// argument at its default.
pub fn scheduler_config_for_variant(variant: Variant) -> SchedulerConfig {
    let defaults = variant.defaults();
    match defaults.scheduler {
        SchedulerKind::FlowUniPc => {
            SchedulerConfig::FlowUniPc(FlowUniPcConfig { shift: defaults.shift, ..FlowUniPcConfig::default() })
        }
        SchedulerKind::FlashFlowMatchEuler => {
            SchedulerConfig::FlashEuler(FlashEulerConfig { shift: defaults.shift, ..FlashEulerConfig::default() })
        }
    }
}

/// The scheduler of a released variant, for the released transformer ([`PipelineShift::default`]).
pub fn scheduler_for_variant(variant: Variant) -> Result<Scheduler> {
    Ok(Scheduler::new(scheduler_config_for_variant(variant), PipelineShift::default())?)
}

/// The sampler a scheduler config names.
pub fn scheduler_kind(config: &SchedulerConfig) -> SchedulerKind {
    match config {
        SchedulerConfig::FlowUniPc(_) => SchedulerKind::FlowUniPc,
        SchedulerConfig::FlashEuler(_) => SchedulerKind::FlashFlowMatchEuler,
    }
}

/// `mu` for a transformer config: `max_seq = max_resolution[0] * max_resolution[1] / patch_size²`
/// (`transformer_hidream_image.py`, `__init__`).
pub fn pipeline_shift_for_transformer(cfg: &TransformerConfig) -> Result<PipelineShift> {
    match cfg.max_resolution.as_slice() {
        [rows, cols] if cfg.patch_size > 0 => {
            Ok(PipelineShift::from_max_seq(rows * cols / (cfg.patch_size * cfg.patch_size)))
        }
        other => Err(PipelineError::invalid(
            "transformer config",
            format!("max_resolution {other:?} with patch_size {} gives no max_seq", cfg.patch_size),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipeline_shift_reads_the_transformer_config() -> Result<()> {
        let mut cfg = TransformerConfig::full();
        assert_eq!(pipeline_shift_for_transformer(&cfg)?, PipelineShift::default());
        cfg.max_resolution = vec![128];
        assert!(matches!(pipeline_shift_for_transformer(&cfg), Err(PipelineError::Invalid { .. })));
        Ok(())
    }

    #[test]
    fn variants_get_their_official_schedulers() -> Result<()> {
        let cases = [
            (Variant::Full, SchedulerKind::FlowUniPc, 3.0),
            (Variant::Dev, SchedulerKind::FlashFlowMatchEuler, 6.0),
            (Variant::Fast, SchedulerKind::FlashFlowMatchEuler, 3.0),
        ];
        for (variant, kind, shift) in cases {
            let config = scheduler_config_for_variant(variant);
            assert_eq!(scheduler_kind(&config), kind);
            let configured_shift = match &config {
                SchedulerConfig::FlowUniPc(config) => config.shift,
                SchedulerConfig::FlashEuler(config) => config.shift,
            };
            assert_eq!(configured_shift, shift, "{variant}");
            assert!(config.validate().is_ok());
            let scheduler = scheduler_for_variant(variant)?;
            assert_eq!(scheduler.as_flow_unipc().is_some(), kind == SchedulerKind::FlowUniPc, "{variant}");
        }
        Ok(())
    }
}
