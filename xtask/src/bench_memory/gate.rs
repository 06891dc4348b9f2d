//! The regression gate: the byte figures of this run against `bench/memory-baseline.toml`.
//!
//! The planner's figures (peak weights, streamed and resident bytes, the minimum budget) are
//! arithmetic on the unit sizes, so they are gated exactly: any change must be deliberate and
//! recorded with `--update-baseline`. The heap peak varies a little with the allocator and the
//! threads, so it may grow by the file's `tolerance.peak_device_bytes` (a fraction), and it is
//! only compared when the baseline was recorded with the same setup (inputs, steps, threads, build).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result};
use hidream_memory::format_bytes;
use serde::Deserialize;

use super::runs::{Outcome, RunResult};

/// The whole baseline file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Baseline {
    pub tolerance: Tolerance,
    /// One section per mode (`quick`, `full`, `tiny-quick`, ...).
    #[serde(flatten)]
    pub modes: BTreeMap<String, Section>,
}

/// How much a figure may grow before the gate fails.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct Tolerance {
    /// The growth allowed to the heap peak, as a fraction (0.05 is +5%).
    pub peak_device_bytes: f64,
}

/// The figures of one mode: its setup and every run by name.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Section {
    /// What the heap peak depends on besides the code: preset, inputs, steps, threads, build.
    pub setup: String,
    #[serde(flatten)]
    pub runs: BTreeMap<String, RunFigures>,
}

/// The gated figures of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct RunFigures {
    /// The budget is below the planner's minimum and the run is expected to stop with an error.
    #[serde(default)]
    pub fails: bool,
    pub minimum_budget_bytes: u64,
    /// Streamed units loaded ahead of the one computing: 0 for `all`, `sequential`, and any plan
    /// that streams nothing. Such runs have a heap peak that does not depend on timing.
    pub prefetch: Option<u64>,
    pub peak_device_bytes: Option<u64>,
    pub peak_weight_bytes: Option<u64>,
    pub streamed_bytes_per_forward: Option<u64>,
    pub resident_bytes: Option<u64>,
}

/// What the gate found: `failures` fail the bench, `notes` are printed.
#[derive(Debug, Default, PartialEq)]
pub struct Verdict {
    pub failures: Vec<String>,
    pub notes: Vec<String>,
}

impl Baseline {
    /// The tolerance a new baseline file starts with.
    pub const DEFAULT_TOLERANCE: Tolerance = Tolerance { peak_device_bytes: 0.05 };

    pub fn parse(text: &str) -> Result<Baseline> {
        toml::from_str(text).context("the baseline is not valid")
    }

    /// The file, comments included. Sections come in name order, runs in `order` and then by name.
    pub fn render(&self, order: &[String]) -> String {
        let mut text = String::from(FILE_HEADER);
        let _ = writeln!(text, "\n[tolerance]\npeak_device_bytes = {:?}", self.tolerance.peak_device_bytes);
        for (mode, section) in &self.modes {
            let _ = writeln!(text, "\n[{mode}]\nsetup = {}", quote(&section.setup));
            let position = |name: &String| order.iter().position(|other| other == name).unwrap_or(order.len());
            let mut names: Vec<&String> = section.runs.keys().collect();
            names.sort_by_key(|name| (position(name), *name));
            for name in names {
                let run = &section.runs[name];
                let _ = writeln!(text, "\n[{mode}.{}]", quote(name));
                if run.fails {
                    text.push_str("fails = true\n");
                }
                let figures = [
                    ("minimum_budget_bytes", Some(run.minimum_budget_bytes)),
                    ("prefetch", run.prefetch),
                    ("peak_device_bytes", run.peak_device_bytes),
                    ("peak_weight_bytes", run.peak_weight_bytes),
                    ("streamed_bytes_per_forward", run.streamed_bytes_per_forward),
                    ("resident_bytes", run.resident_bytes),
                ];
                for (key, value) in figures {
                    let Some(value) = value else { continue };
                    let comment = if key == "prefetch" { String::new() } else { format!(" # {}", format_bytes(value)) };
                    let _ = writeln!(text, "{key} = {value}{comment}");
                }
            }
        }
        text
    }
}

impl Section {
    /// The gated figures of this run's results.
    pub fn from_results(setup: &str, results: &[RunResult]) -> Section {
        let runs = results.iter().map(|result| (result.spec.name(), RunFigures::from_outcome(&result.outcome)));
        Section { setup: setup.to_owned(), runs: runs.collect() }
    }
}

impl RunFigures {
    pub fn from_outcome(outcome: &Outcome) -> RunFigures {
        let measured = outcome.measured();
        RunFigures {
            fails: measured.is_none(),
            minimum_budget_bytes: outcome.minimum_budget_bytes(),
            prefetch: measured.map(|m| if m.streamed_bytes_per_forward == 0 { 0 } else { m.prefetch }),
            peak_device_bytes: measured.map(|m| m.peak_device_bytes),
            peak_weight_bytes: measured.map(|m| m.peak_weight_bytes),
            streamed_bytes_per_forward: measured.map(|m| m.streamed_bytes_per_forward),
            resident_bytes: measured.map(|m| m.resident_bytes),
        }
    }
}

impl Section {
    /// The largest heap beyond the weights among the runs that load nothing ahead, whose heap peak
    /// does not depend on timing: activations, inputs, precomputed tensors, the allocator's slack.
    fn heap_beyond_weights(&self) -> u64 {
        let steady = self.runs.values().filter(|run| run.prefetch == Some(0));
        let beyond = steady.filter_map(|run| Some(run.peak_device_bytes?.saturating_sub(run.peak_weight_bytes?)));
        beyond.max().unwrap_or(0)
    }

    /// The heap peak that `run` may reach. A run that loads ahead reaches the weights' peak only
    /// when the loader has filled every slot at the moment the compute peaks; its ceiling is the
    /// recorded peak or, if larger, its weight peak plus the section's heap beyond the weights.
    fn heap_ceiling(&self, run: &RunFigures) -> Option<u64> {
        let heap = run.peak_device_bytes?;
        match run.prefetch {
            Some(0) => Some(heap),
            _ => Some(heap.max(run.peak_weight_bytes?.saturating_add(self.heap_beyond_weights()))),
        }
    }
}

/// Compares `current` with the baseline's section of the same mode.
pub fn compare(baseline: &Section, tolerance: Tolerance, current: &Section) -> Verdict {
    let mut verdict = Verdict::default();
    let same_setup = baseline.setup == current.setup;
    if !same_setup {
        verdict.notes.push(format!(
            "the heap peak is not gated: the baseline's setup is `{}`, this run's `{}`",
            baseline.setup, current.setup
        ));
    }
    for (name, now) in &current.runs {
        let Some(before) = baseline.runs.get(name) else {
            verdict.notes.push(format!("{name}: not in the baseline"));
            continue;
        };
        let mut check = |figure: &str, before: Option<u64>, now: Option<u64>, tolerance: f64, note_shrink: bool| {
            let (Some(before), Some(now)) = (before, now) else { return };
            let limit = before as f64 * (1.0 + tolerance);
            let change = 100.0 * (now as f64 - before as f64) / (before as f64).max(1.0);
            let describe = |verb: &str| {
                let (from, to) = (format_bytes(before), format_bytes(now));
                format!("{name}: {figure} {verb} from {from} ({before} B) to {to} ({now} B), {change:+.2}%")
            };
            if now as f64 > limit {
                let allowed = if tolerance > 0.0 { format!("{:.0}%", 100.0 * tolerance) } else { "none".to_owned() };
                verdict.failures.push(format!("{}; growth allowed: {allowed}", describe("grew")));
            } else if note_shrink && (now as f64) < before as f64 * (1.0 - tolerance) {
                verdict.notes.push(describe("shrank"));
            }
        };
        check("minimum_budget_bytes", Some(before.minimum_budget_bytes), Some(now.minimum_budget_bytes), 0.0, true);
        check("peak_weight_bytes", before.peak_weight_bytes, now.peak_weight_bytes, 0.0, true);
        let streamed = (before.streamed_bytes_per_forward, now.streamed_bytes_per_forward);
        check("streamed_bytes_per_forward", streamed.0, streamed.1, 0.0, true);
        check("resident_bytes", before.resident_bytes, now.resident_bytes, 0.0, true);
        if same_setup {
            let ceiling = baseline.heap_ceiling(before);
            let (figure, steady) = match ceiling == before.peak_device_bytes {
                true => ("peak_device_bytes", true),
                false => ("peak_device_bytes (its ceiling: peak weights + the section's heap beyond weights)", false),
            };
            check(figure, ceiling, now.peak_device_bytes, tolerance.peak_device_bytes, steady);
        }
        match (before.fails, now.fails) {
            (false, true) => verdict.failures.push(format!(
                "{name}: now fails (its budget is below the minimum of {}); the baseline ran it",
                format_bytes(now.minimum_budget_bytes)
            )),
            (true, false) => verdict.notes.push(format!("{name}: now runs; the baseline expected it to fail")),
            _ => {}
        }
    }
    for name in baseline.runs.keys().filter(|name| !current.runs.contains_key(*name)) {
        verdict.notes.push(format!("{name}: in the baseline but not run"));
    }
    if !verdict.notes.is_empty() && verdict.failures.is_empty() {
        verdict.notes.push("if these changes are deliberate, record them with --update-baseline".to_owned());
    }
    verdict
}

/// A TOML basic string.
fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

const FILE_HEADER: &str = "\
# The memory baseline of `cargo xtask bench-memory` (see docs/memory.md).
#
# Written by `cargo xtask bench-memory [--quick] --update-baseline`, which rewrites the section of
# its mode and keeps the others; edit `tolerance` by hand if you must. One section per mode:
# `quick` and `full` for the small preset, `<preset>-quick` and `<preset>-full` for the others.
# One table per run, named `<policy>-precompute` or `<policy>-no-precompute`.
#
# - minimum_budget_bytes, peak_weight_bytes, streamed_bytes_per_forward and resident_bytes are the
#   planner's arithmetic. They are deterministic and gated exactly: any growth fails the bench.
# - peak_device_bytes is the process heap peak. It varies a little with the allocator and the
#   threads, so it may grow by the fraction `tolerance.peak_device_bytes` before the gate fails, and
#   it is compared only when `setup` (preset, inputs, steps, threads, build) matches the run's.
# - A run with prefetch > 0 holds as many loaded units at its heap peak as its loader had finished
#   by then, so its heap peak varies with timing, up to the ledger's peak_weight_bytes plus the heap
#   beyond weights. Its gate is that ceiling: peak_weight_bytes plus the largest heap beyond
#   weights among the runs with prefetch 0 (all, sequential), or its own peak if that is larger.
# - `fails = true`: the budget is below the planner's minimum; `hidream denoise` is expected to
#   refuse it with an error that names minimum_budget_bytes.
";

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(peak_device: u64, peak_weight: u64) -> RunFigures {
        RunFigures {
            fails: false,
            minimum_budget_bytes: 230,
            prefetch: Some(0),
            peak_device_bytes: Some(peak_device),
            peak_weight_bytes: Some(peak_weight),
            streamed_bytes_per_forward: Some(700),
            resident_bytes: Some(300),
        }
    }

    fn failing(minimum: u64) -> RunFigures {
        RunFigures {
            fails: true,
            minimum_budget_bytes: minimum,
            prefetch: None,
            peak_device_bytes: None,
            peak_weight_bytes: None,
            streamed_bytes_per_forward: None,
            resident_bytes: None,
        }
    }

    fn section(setup: &str, runs: &[(&str, RunFigures)]) -> Section {
        Section { setup: setup.to_owned(), runs: runs.iter().map(|(name, run)| ((*name).to_owned(), *run)).collect() }
    }

    /// Compares one run, `before` and `now`, and returns what the gate says.
    fn check(before: RunFigures, now: RunFigures) -> Verdict {
        let baseline = section("s", &[("all-precompute", before)]);
        compare(&baseline, Baseline::DEFAULT_TOLERANCE, &section("s", &[("all-precompute", now)]))
    }

    #[test]
    fn equal_figures_pass_silently() {
        assert_eq!(check(figures(1000, 500), figures(1000, 500)), Verdict::default());
        assert_eq!(check(failing(278), failing(278)), Verdict::default());
    }

    #[test]
    fn the_heap_peak_may_grow_within_its_tolerance() {
        assert_eq!(check(figures(1000, 500), figures(1050, 500)), Verdict::default());
        assert_eq!(check(figures(1000, 500), figures(960, 500)), Verdict::default());
        let verdict = check(figures(1000, 500), figures(1051, 500));
        assert_eq!(verdict.failures.len(), 1);
        assert!(verdict.failures[0].contains("peak_device_bytes grew from 1000 B (1000 B) to 1.03 KiB (1051 B)"));
        assert!(verdict.failures[0].contains("growth allowed: 5%"));
    }

    #[test]
    fn planner_figures_may_not_change_unnoticed() {
        let verdict = check(figures(1000, 500), figures(1000, 501));
        assert_eq!(
            verdict.failures,
            [
                "all-precompute: peak_weight_bytes grew from 500 B (500 B) to 501 B (501 B), +0.20%; growth allowed: none"
            ]
        );
        let verdict = check(figures(1000, 500), figures(1000, 499));
        assert!(verdict.failures.is_empty());
        assert!(verdict.notes[0].contains("peak_weight_bytes shrank"));
        assert!(verdict.notes.last().unwrap().contains("--update-baseline"));
        assert_eq!(check(failing(278), failing(279)).failures.len(), 1);
    }

    #[test]
    fn a_run_that_starts_failing_fails_the_gate() {
        let verdict = check(figures(1000, 500), failing(230));
        assert_eq!(verdict.failures.len(), 1, "{verdict:?}");
        assert!(verdict.failures[0].contains("now fails"));
        let verdict = check(failing(230), figures(1000, 500));
        assert!(verdict.failures.is_empty());
        assert!(verdict.notes[0].contains("now runs"));
    }

    /// A run that loads ahead may reach its weight peak plus the heap beyond weights of the runs
    /// that do not, whatever its own recorded peak was; a unit more than that fails.
    #[test]
    fn a_run_that_loads_ahead_is_gated_by_its_ceiling() {
        let streamed = |peak_device: u64| RunFigures { prefetch: Some(2), ..figures(peak_device, 800) };
        let baseline = section("s", &[("all", figures(2040, 2000)), ("stream", streamed(700))]);
        let check = |peak_device: u64| {
            let current = section("s", &[("all", figures(2040, 2000)), ("stream", streamed(peak_device))]);
            compare(&baseline, Baseline::DEFAULT_TOLERANCE, &current)
        };
        // Recorded while the loader lagged (700 < 800 weights); every slot full is 840, plus 5%.
        assert_eq!(check(840), Verdict::default());
        assert_eq!(check(600), Verdict::default(), "a lagging loader is no change worth a note");
        assert_eq!(check(882), Verdict::default());
        let verdict = check(883);
        assert_eq!(verdict.failures.len(), 1, "{verdict:?}");
        assert!(verdict.failures[0].contains("ceiling"));
        assert!(verdict.failures[0].contains("from 840 B"));
    }

    #[test]
    fn another_setup_gates_only_the_planner() {
        let baseline = section("1 step", &[("all-precompute", figures(1000, 500))]);
        let current = section("3 steps", &[("all-precompute", figures(2000, 500))]);
        let verdict = compare(&baseline, Baseline::DEFAULT_TOLERANCE, &current);
        assert!(verdict.failures.is_empty());
        assert!(verdict.notes[0].contains("not gated"));
        let current = section("3 steps", &[("all-precompute", figures(2000, 600))]);
        assert_eq!(compare(&baseline, Baseline::DEFAULT_TOLERANCE, &current).failures.len(), 1);
    }

    #[test]
    fn new_and_missing_runs_are_noted() {
        let baseline = section("s", &[("a", figures(1, 1))]);
        let verdict = compare(&baseline, Baseline::DEFAULT_TOLERANCE, &section("s", &[("b", figures(1, 1))]));
        assert!(verdict.failures.is_empty());
        assert_eq!(verdict.notes.len(), 3);
    }

    #[test]
    fn the_file_round_trips() {
        let mut baseline = Baseline { tolerance: Baseline::DEFAULT_TOLERANCE, modes: BTreeMap::new() };
        baseline.modes.insert(
            "quick".to_owned(),
            section(
                "small \"preset\"",
                &[("budget-25%-no-precompute", failing(278)), ("all-precompute", figures(3 << 30, 1 << 30))],
            ),
        );
        baseline.modes.insert("full".to_owned(), section("s", &[("all-precompute", figures(5, 6))]));
        let order = ["all-precompute".to_owned(), "budget-25%-no-precompute".to_owned()];
        let text = baseline.render(&order);
        assert!(text.contains("[quick.\"all-precompute\"]\nminimum_budget_bytes = 230 # 230 B\nprefetch = 0\npeak_device_bytes = 3221225472 # 3.00 GiB\n"));
        assert!(text.contains("[quick.\"budget-25%-no-precompute\"]\nfails = true\nminimum_budget_bytes = 278"));
        assert!(text.find("quick.\"all-precompute\"") < text.find("quick.\"budget-25%"));
        assert_eq!(Baseline::parse(&text).unwrap(), baseline);
    }

    #[test]
    fn the_committed_baseline_parses() {
        let path = crate::util::root().join("bench/memory-baseline.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let baseline = Baseline::parse(&text).unwrap();
        assert!(baseline.tolerance.peak_device_bytes >= 0.0);
        assert!(text.starts_with(FILE_HEADER), "{} has an old header: record it again", path.display());
    }
}
