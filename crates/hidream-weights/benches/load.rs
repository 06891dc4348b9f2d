//! `cargo bench -p hidream-weights --bench load -- CHECKPOINT [ROUNDS]`: where the load of a whole
//! checkpoint into f32 goes, phase by phase, in alternating rounds.
//!
//! For the checkpoint that `hidream forward` loads under the `all` policy (such as the `small`
//! preset that `cargo xtask bench-forward` writes to `target/bench-forward/small`), it times:
//! - `open`: `Checkpoint::open` (map the files, parse and check every header);
//! - `config + validate`: `config.json` and the check of every tensor against the size model;
//! - `load fresh`: every tensor through `Checkpoint::load` into a new f32 tensor, as the runner's
//!   loader does today (the tensors are kept until the phase ends, as resident units are);
//! - `read_into reused`: every tensor converted into buffers allocated and touched beforehand, as
//!   a residency runtime with a reusable slot per unit would;
//! - `touch fresh`: the f32 bytes of the whole checkpoint allocated and written once, with no
//!   conversion: what fresh memory alone costs (page faults and the kernel's zeroing).
//!
//! Every phase opens the checkpoint afresh, so every read takes the faults of a new map. Compare the
//! figures only as ratios within one run.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use hidream_weights::Checkpoint;

type Result<T, E = Box<dyn std::error::Error>> = std::result::Result<T, E>;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).filter(|arg| !arg.starts_with('-'));
    let path = PathBuf::from(args.next().ok_or("usage: load CHECKPOINT [ROUNDS]")?);
    let rounds: usize = args.next().map_or(Ok(5), |arg| arg.parse())?;
    if rounds == 0 {
        return Err("ROUNDS must be at least 1".into());
    }

    let checkpoint = Checkpoint::open(&path)?;
    let names: Vec<String> = checkpoint.tensor_names().map(str::to_owned).collect();
    let numels: Vec<usize> = names.iter().map(|name| checkpoint.tensor_numel(name)).collect::<Result<_, _>>()?;
    let total: usize = numels.iter().sum();
    let mut reused: Vec<Vec<f32>> = numels.iter().map(|numel| vec![1.0; *numel]).collect();
    drop(checkpoint);

    let phases = ["open", "config + validate", "load fresh", "read_into reused", "touch fresh"];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); phases.len()];
    for _ in 0..rounds {
        for (phase, seconds) in phases.iter().zip(&mut times) {
            let started = Instant::now();
            let checkpoint = Checkpoint::open(&path)?;
            match *phase {
                "open" => {}
                "config + validate" => {
                    let cfg = checkpoint.config()?;
                    checkpoint.validate(&hidream_config::SizeModel::new(&cfg))?;
                }
                "load fresh" => {
                    let tensors = names
                        .iter()
                        .map(|name| checkpoint.load(name, DType::F32, &Device::Cpu))
                        .collect::<Result<Vec<_>, _>>()?;
                    seconds.push(started.elapsed().as_secs_f64());
                    drop(tensors);
                    continue;
                }
                "read_into reused" => {
                    for (name, buffer) in names.iter().zip(&mut reused) {
                        checkpoint.read_into(name, buffer)?;
                    }
                }
                _ => {
                    let buffers: Vec<Vec<f32>> = numels.iter().map(|numel| vec![1.0; *numel]).collect();
                    seconds.push(started.elapsed().as_secs_f64());
                    drop(buffers);
                    continue;
                }
            }
            seconds.push(started.elapsed().as_secs_f64());
        }
    }
    println!(
        "{}: {} tensors, {:.2} GB as f32, {rounds} alternating rounds (each phase opens the checkpoint)",
        path.display(),
        names.len(),
        (total * 4) as f64 / 1e9
    );
    for (phase, seconds) in phases.iter().zip(&times) {
        let mut sorted = seconds.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        println!(
            "  {phase:<18} median {:8.1} ms  (min {:7.1}, max {:7.1})",
            median * 1e3,
            sorted[0] * 1e3,
            sorted[sorted.len() - 1] * 1e3
        );
    }
    Ok(())
}
