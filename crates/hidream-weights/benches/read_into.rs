//! `cargo bench -p hidream-weights --bench read_into`: one 100 MB bf16 tensor loaded as f32, by
//! today's path and by `Checkpoint::read_into`, side by side.
//!
//! The variants run in alternating rounds, so that they see the same machine noise, and each
//! iteration opens the checkpoint afresh, so that every read takes the page faults of a new map
//! (the file itself stays in the page cache, as it does between the loads of a real run):
//! - `before`: the path `Checkpoint::load` took before `read_into`: a bf16 copy by
//!   `Tensor::from_raw_buffer` (what `load` into the stored dtype still does), then `to_dtype`;
//! - `load`: `Checkpoint::load` as it is now (`read_into` into a new zeroed `Vec<f32>`);
//! - `read_into fresh`: `read_into` into a new zeroed `Vec<f32>` each time;
//! - `read_into reused`: `read_into` into one buffer allocated (and touched) once, as a slot's is;
//! - `copy reused`: `read_into` into a reused bf16 buffer, a plain copy out of the map: the floor of
//!   any load that reads the stored bytes once.
//!
//! Arguments: `[MB] [ROUNDS]` (default 100 MB, 7 rounds). The figures are medians; compare
//! them only as ratios within one run.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use hidream_weights::Checkpoint;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1).filter(|arg| !arg.starts_with('-'));
    let megabytes: usize = args.next().map_or(Ok(100), |arg| arg.parse())?;
    let rounds: usize = args.next().map_or(Ok(7), |arg| arg.parse())?;
    let n_elements = megabytes * 1_000_000 / 2;

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("big.safetensors");
    let values = Tensor::randn(0f32, 1.0, n_elements, &Device::Cpu)?.to_dtype(DType::BF16)?;
    hidream_weights::write_tensors(&path, &HashMap::from([("w".to_owned(), values)]))?;

    // Touched once, as a slot's buffer is by its first load.
    let mut reused = vec![1f32; n_elements];
    let mut reused_bf16 = vec![half::bf16::ONE; n_elements];
    let mut expected = None;
    let mut times: [(&str, Vec<f64>); 5] = [
        ("before", vec![]),
        ("load", vec![]),
        ("read_into fresh", vec![]),
        ("read_into reused", vec![]),
        ("copy reused", vec![]),
    ];
    for _ in 0..rounds {
        for (variant, seconds) in &mut times {
            let checkpoint = Checkpoint::open(&path)?;
            let started = Instant::now();
            match *variant {
                "before" => {
                    let tensor = checkpoint.load("w", DType::BF16, &Device::Cpu)?.to_dtype(DType::F32)?;
                    seconds.push(started.elapsed().as_secs_f64());
                    let loaded: Vec<f32> = tensor.to_vec1()?;
                    let bits: Vec<u32> = loaded.iter().map(|v| v.to_bits()).collect();
                    expected = Some(bits);
                }
                "load" => {
                    let tensor = checkpoint.load("w", DType::F32, &Device::Cpu)?;
                    seconds.push(started.elapsed().as_secs_f64());
                    check(&tensor.to_vec1::<f32>()?, expected.as_deref())?;
                }
                "read_into fresh" => {
                    let mut fresh = vec![0f32; n_elements];
                    checkpoint.read_into("w", &mut fresh)?;
                    seconds.push(started.elapsed().as_secs_f64());
                    check(&fresh, expected.as_deref())?;
                }
                "read_into reused" => {
                    checkpoint.read_into("w", &mut reused)?;
                    seconds.push(started.elapsed().as_secs_f64());
                    check(&reused, expected.as_deref())?;
                }
                _ => {
                    checkpoint.read_into("w", &mut reused_bf16)?;
                    seconds.push(started.elapsed().as_secs_f64());
                }
            }
        }
    }
    println!("{megabytes} MB bf16 tensor ({n_elements} elements) -> f32, {rounds} alternating rounds");
    let base = median(&times[0].1);
    for (variant, seconds) in &times {
        let median = median(seconds);
        let (min, max) = min_max(seconds);
        println!(
            "  {variant:<17} median {:7.1} ms  (min {:6.1}, max {:6.1})  {:5.2}x before  {:5.2} GB/s of output",
            median * 1e3,
            min * 1e3,
            max * 1e3,
            median / base,
            (n_elements * 4) as f64 / median / 1e9
        );
    }
    Ok(())
}

fn check(got: &[f32], expected: Option<&[u32]>) -> Result<()> {
    let expected = expected.ok_or("no reference load yet")?;
    if !got.iter().map(|v| v.to_bits()).eq(expected.iter().copied()) {
        return Err("read_into differs from load".into());
    }
    Ok(())
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

fn min_max(values: &[f64]) -> (f64, f64) {
    values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(min, max), v| (min.min(*v), max.max(*v)))
}
