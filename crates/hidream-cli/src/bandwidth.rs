//! `hidream bandwidth`: the host-to-device bandwidth of the staged upload path that streamed units
//! take, measured with this binary on this device.
//!
//! On CUDA it times copies from the two pinned staging buffers over the copy stream into one device
//! buffer, which is the bound on how fast a streamed unit can land. On the CPU it times the same
//! protocol over the copy thread of the CPU implementation, in host memory. No disk is read, so the
//! figure excludes the checkpoint's read.

use anyhow::Result;
use hidream_memory::format_bytes;

#[derive(Debug, clap::Args)]
pub struct BandwidthArgs {
    /// Where to measure: `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: hidream_device::DeviceSpec,
    /// Bytes to copy in all (`4GiB`).
    #[arg(long, default_value = "4GiB", value_parser = crate::parse::bytes, allow_negative_numbers = true)]
    bytes: u64,
    /// The device buffer they land in, refilled from its start: the size of one slot (`1GiB`).
    #[arg(long, default_value = "1GiB", value_parser = crate::parse::bytes, allow_negative_numbers = true)]
    buffer: u64,
    /// Repeat the measurement and report each run and the best.
    #[arg(long, default_value_t = 3, value_parser = crate::parse::positive)]
    repeat: usize,
    /// Print the figures as one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &BandwidthArgs) -> Result<()> {
    anyhow::ensure!(args.bytes > 0 && args.buffer > 0, "--bytes and --buffer must be at least 1 byte");
    let device = args.device.open()?;
    let runs = (0..args.repeat)
        .map(|_| hidream_device::measure_upload(&device, args.bytes, args.buffer.min(args.bytes)))
        .collect::<Result<Vec<_>, _>>()?;
    let best = runs.iter().map(|run| run.bandwidth).fold(0.0, f64::max);
    if args.json {
        let report = serde_json::json!({
            "device": args.device.to_string(),
            "bytes": args.bytes,
            "buffer_bytes": args.buffer.min(args.bytes),
            "staging_bytes": runs[0].staging_bytes,
            "seconds": runs.iter().map(|run| run.seconds).collect::<Vec<_>>(),
            "bandwidth_bytes_per_s": runs.iter().map(|run| run.bandwidth).collect::<Vec<_>>(),
            "best_bandwidth_bytes_per_s": best,
        });
        outln!("{report}")?;
        return Ok(());
    }
    outln!(
        "{} staged uploads of {} into a {} buffer, staging 2 × {}",
        args.device,
        format_bytes(args.bytes),
        format_bytes(args.buffer.min(args.bytes)),
        format_bytes(runs[0].staging_bytes as u64)
    )?;
    for (idx, run) in runs.iter().enumerate() {
        outln!("  run {}: {:.3} s, {:.2} GB/s", idx + 1, run.seconds, run.bandwidth / 1e9)?;
    }
    outln!("best: {:.2} GB/s", best / 1e9)?;
    Ok(())
}
