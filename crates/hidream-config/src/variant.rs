//! The three released HiDream-I1 variants. They share the transformer and differ in scheduling.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// A released HiDream-I1 variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    Full,
    Dev,
    Fast,
}

/// Which sampler a variant uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchedulerKind {
    /// `FlowUniPCMultistepScheduler` of the official HiDream code.
    FlowUniPc,
    /// `FlashFlowMatchEulerDiscreteScheduler` of the official HiDream code.
    FlashFlowMatchEuler,
}

/// The sampling defaults of a variant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VariantDefaults {
    pub scheduler: SchedulerKind,
    pub shift: f64,
    pub steps: usize,
    pub guidance_scale: f64,
}

impl Variant {
    /// The sampling defaults, as in the official `hdi1` inference script's `MODEL_CONFIGS`.
    pub fn defaults(self) -> VariantDefaults {
        match self {
            Variant::Full => {
                VariantDefaults { scheduler: SchedulerKind::FlowUniPc, shift: 3.0, steps: 50, guidance_scale: 5.0 }
            }
            Variant::Dev => VariantDefaults {
                scheduler: SchedulerKind::FlashFlowMatchEuler,
                shift: 6.0,
                steps: 28,
                guidance_scale: 0.0,
            },
            Variant::Fast => VariantDefaults {
                scheduler: SchedulerKind::FlashFlowMatchEuler,
                shift: 3.0,
                steps: 16,
                guidance_scale: 0.0,
            },
        }
    }

    /// The lowercase name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Full => "full",
            Variant::Dev => "dev",
            Variant::Fast => "fast",
        }
    }
}

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Variant {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "full" => Ok(Variant::Full),
            "dev" => Ok(Variant::Dev),
            "fast" => Ok(Variant::Fast),
            _ => Err(ConfigError::UnknownName { what: "variant", given: s.to_owned(), expected: "full, dev, fast" }),
        }
    }
}
