//! `hidream inspect`: a checkpoint's config and the parameters and bytes of every unit.

use std::path::PathBuf;

use anyhow::Result;
use hidream_config::{DType, SizeModel};
use hidream_weights::Checkpoint;

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// A diffusers `transformer/` folder, or a model folder holding one.
    dir: PathBuf,
}

pub fn run(args: &InspectArgs) -> Result<()> {
    let checkpoint = Checkpoint::open(&args.dir)?;
    let cfg = checkpoint.config()?;
    let sizes = SizeModel::new(&cfg);
    outln!("checkpoint {}", checkpoint.dir().display())?;
    outln!("config {}", serde_json::to_string(&cfg)?)?;
    match checkpoint.validate(&sizes) {
        Ok(()) => outln!("tensors: all {} present with the expected shapes", sizes.all_tensors().count())?,
        Err(err) => outln!("tensors: INVALID: {err}")?,
    }
    outln!()?;
    outln!("{:<28} {:>14} {:>12} {:>12} {:>12}", "unit", "params", "f32", "bf16", "adaLN bf16")?;
    for unit in sizes.units() {
        let size = sizes.unit_size(unit);
        outln!(
            "{:<28} {:>14} {:>12} {:>12} {:>12}",
            unit.to_string(),
            size.params,
            hidream_memory::format_bytes(size.bytes(DType::F32)),
            hidream_memory::format_bytes(size.bytes(DType::BF16)),
            hidream_memory::format_bytes((size.modulation_params * 2) as u64),
        )?;
    }
    outln!(
        "{:<28} {:>14} {:>12} {:>12}",
        "total",
        sizes.total_params(),
        hidream_memory::format_bytes(sizes.total_bytes(DType::F32)),
        hidream_memory::format_bytes(sizes.total_bytes(DType::BF16)),
    )?;
    Ok(())
}
