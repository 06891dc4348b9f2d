//! The crate DAG, checked with `cargo tree`: each crate and what it must not depend on.

use anyhow::{Result, bail};

use crate::util;

/// `(crate, forbidden dependencies at any depth, reason)`.
const RULES: &[(&str, &[&str], &str)] = &[
    ("hidream-config", &["candle-core", "safetensors", "memmap2"], "plain data: no candle, no files"),
    (
        "hidream-memory",
        &["hidream-config", "hidream-weights", "hidream-model", "candle-core"],
        "generic: knows no HiDream types and no tensors",
    ),
    ("hidream-weights", &["hidream-model", "hidream-memory"], "I/O only: knows no layers or budgets"),
    ("hidream-model", &["hidream-weights", "hidream-memory"], "knows nothing of mmap, threads or budgets"),
    ("hidream-pipeline", &["hidream-cli", "clap", "indicatif"], "a library: knows no command line"),
];

pub fn check() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut violations = Vec::new();
    for (krate, forbidden, reason) in RULES {
        let tree = util::output(util::command(&cargo).args(["tree", "-p", krate, "-e", "normal", "--prefix", "none"]))?;
        for dep in *forbidden {
            if tree.lines().any(|line| line.split_whitespace().next() == Some(dep)) {
                violations.push(format!("{krate} depends on {dep} ({reason})"));
            }
        }
    }
    // hidream-model must not map files itself. candle-core uses memmap2 for its own safetensors
    // loader, so the rule is: memmap2's only dependent in hidream-model's tree is candle-core.
    let dependents = util::output(util::command(&cargo).args([
        "tree",
        "-p",
        "hidream-model",
        "-e",
        "normal",
        "-i",
        "memmap2",
        "--depth",
        "1",
        "--prefix",
        "none",
    ]))?;
    for line in dependents.lines().skip(1) {
        let name = line.split_whitespace().next().unwrap_or_default();
        if name != "candle-core" {
            violations.push(format!("hidream-model reaches memmap2 through {name}, not only through candle-core"));
        }
    }
    if !violations.is_empty() {
        bail!("layering violated:\n  {}", violations.join("\n  "));
    }
    println!("layering ok: {} rules, and hidream-model reaches memmap2 only through candle-core", RULES.len());
    Ok(())
}
