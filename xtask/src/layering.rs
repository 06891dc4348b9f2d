//! The crate DAG, checked with `cargo tree`: each crate and what it must not depend on.
//!
//! candle-core itself depends on memmap2, safetensors, tokenizers and rand, so a rule about those
//! is a rule about *direct* dependencies (`cargo tree -e normal --depth 1`): a transitive search
//! would find candle-core's.

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
    (
        "hidream-device",
        &["hidream-model", "hidream-text", "hidream-pipeline", "hidream-schedulers"],
        "moves checkpoint bytes onto a device: knows no layers, models or plans",
    ),
    (
        "hidream-schedulers",
        &[
            "hidream-config",
            "hidream-weights",
            "hidream-memory",
            "hidream-model",
            "hidream-text",
            "hidream-pipeline",
            "hf-hub",
        ],
        "samplers on candle-core alone: no HiDream crate, no weights",
    ),
    ("hidream-text", &["hidream-model", "hidream-schedulers", "hidream-pipeline"], "text encoders: no transformer"),
    ("hidream-weights", &["hidream-device", "cudarc"], "I/O only: knows no device streams"),
    ("hidream-pipeline", &["hidream-cli", "clap", "indicatif"], "a library: knows no command line"),
];

/// `(crate, forbidden direct dependencies, reason)`, with the crate's default features.
const DIRECT_RULES: &[(&str, &[&str], &str)] = &[
    (
        "hidream-schedulers",
        &["tokenizers", "safetensors", "memmap2", "candle-nn", "candle-transformers"],
        "samplers on candle-core alone",
    ),
    ("hidream-weights", &["rand", "rand_distr"], "without the `synth` feature, the loader pulls in no rand"),
];

/// `(dependency, the one workspace crate that may depend on it directly)`.
const OWNED: &[(&str, &str)] = &[("tokenizers", "hidream-text"), ("hf-hub", "hidream-text")];

/// Workspace crates that other crates may use only as dev-dependencies.
const DEV_ONLY: &[&str] = &["hidream-test-support"];

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
    for (krate, forbidden, reason) in DIRECT_RULES {
        let direct = direct_dependencies(&cargo, krate)?;
        for dep in *forbidden {
            if direct.iter().any(|name| name == dep) {
                violations.push(format!("{krate} depends directly on {dep} ({reason})"));
            }
        }
    }
    let members =
        util::output(util::command(&cargo).args(["tree", "--workspace", "--depth", "0", "--prefix", "none"]))?;
    let members: Vec<&str> = members.lines().filter_map(|line| line.split_whitespace().next()).collect();
    for member in &members {
        let direct = direct_dependencies(&cargo, member)?;
        for (dep, owner) in OWNED {
            if member != owner && direct.iter().any(|name| name == dep) {
                violations.push(format!("{member} depends directly on {dep} (only {owner} may)"));
            }
        }
        for dep in DEV_ONLY {
            if direct.iter().any(|name| name == dep) {
                violations.push(format!("{member} depends on {dep} outside its dev-dependencies (tests only)"));
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
    println!(
        "layering ok: {} rules, {} direct-dependency rules, {} owned dependencies and {} dev-only crates \
         over {} crates, and hidream-model reaches memmap2 only through candle-core",
        RULES.len(),
        DIRECT_RULES.len(),
        OWNED.len(),
        DEV_ONLY.len(),
        members.len()
    );
    Ok(())
}

/// The names of `krate`'s direct normal dependencies, with its default features.
fn direct_dependencies(cargo: &str, krate: &str) -> Result<Vec<String>> {
    let tree = util::output(
        util::command(cargo).args(["tree", "-p", krate, "-e", "normal", "--depth", "1", "--prefix", "none"]),
    )?;
    Ok(tree.lines().skip(1).filter_map(|line| line.split_whitespace().next()).map(str::to_owned).collect())
}
