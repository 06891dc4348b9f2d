//! The configurations `bench-memory` runs, and what one `hidream denoise` run reports.
//!
//! A run is a residency policy plus whether prompt-only work is precomputed. Each runs as its own
//! process so that its heap peak starts clean. Its report JSON is parsed into an [`Outcome`]: the
//! run's figures, or the planner's "budget too small" answer, which is an expected result of the
//! smallest budgets and not a crash.

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_json::Value;

/// How the transformer's units are kept on the device during a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// Every unit resident.
    All,
    /// One slot: load, run, free, with no overlap.
    Sequential,
    /// Nothing optional resident; `prefetch` units load ahead of the one computing.
    Stream { prefetch: usize },
    /// The planner's best plan within `percent`% of the weight bytes (in the compute dtype).
    Budget { percent: u32, prefetch: usize },
}

/// One configuration of the bench.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunSpec {
    pub residency: Residency,
    pub precompute: bool,
}

impl RunSpec {
    /// The reference run: every other output must equal its output bit for bit.
    pub const REFERENCE: RunSpec = RunSpec { residency: Residency::All, precompute: true };

    /// Every configuration, the reference first, each with and without precomputation.
    pub fn all_runs() -> Vec<RunSpec> {
        let residencies = [
            Residency::All,
            Residency::Sequential,
            Residency::Stream { prefetch: 1 },
            Residency::Stream { prefetch: 2 },
            Residency::Budget { percent: 50, prefetch: 1 },
            Residency::Budget { percent: 30, prefetch: 1 },
            Residency::Budget { percent: 25, prefetch: 1 },
        ];
        residencies
            .into_iter()
            .flat_map(|residency| [true, false].map(|precompute| RunSpec { residency, precompute }))
            .collect()
    }

    /// The run's name in tables and in the baseline, e.g. `budget-30%-precompute`.
    pub fn name(&self) -> String {
        let policy = match self.residency {
            Residency::All => "all".to_owned(),
            Residency::Sequential => "sequential".to_owned(),
            Residency::Stream { prefetch } => format!("stream-{prefetch}"),
            Residency::Budget { percent, .. } => format!("budget-{percent}%"),
        };
        let precompute = if self.precompute { "precompute" } else { "no-precompute" };
        format!("{policy}-{precompute}")
    }

    /// The name as a file stem (no `%`).
    pub fn file_stem(&self) -> String {
        self.name().replace('%', "pct")
    }

    /// The policy as the table shows it.
    pub fn policy_label(&self) -> String {
        match self.residency {
            Residency::All => "all".to_owned(),
            Residency::Sequential => "sequential".to_owned(),
            Residency::Stream { prefetch } => format!("stream, prefetch {prefetch}"),
            Residency::Budget { prefetch, .. } => format!("budget, prefetch {prefetch}"),
        }
    }

    /// The policy name the report's `policy` key carries.
    pub fn policy_key(&self) -> &'static str {
        match self.residency {
            Residency::All => "all",
            Residency::Sequential => "sequential",
            Residency::Stream { .. } => "stream",
            Residency::Budget { .. } => "budget",
        }
    }

    /// The `hidream denoise` flags of this configuration.
    pub fn cli_args(&self) -> Vec<String> {
        let mut args = vec!["--residency".to_owned(), self.policy_key().to_owned()];
        match self.residency {
            Residency::All | Residency::Sequential => {}
            Residency::Stream { prefetch } => args.extend(["--prefetch".to_owned(), prefetch.to_string()]),
            Residency::Budget { percent, prefetch } => args.extend([
                "--budget".to_owned(),
                format!("{percent}%"),
                "--prefetch".to_owned(),
                prefetch.to_string(),
            ]),
        }
        if !self.precompute {
            args.push("--no-precompute".to_owned());
        }
        args
    }
}

/// The figures of a run that finished, as `hidream denoise --report` writes them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Measured {
    pub policy: String,
    pub prefetch: u64,
    pub precompute: bool,
    pub budget_bytes: Option<u64>,
    pub weight_bytes_total: u64,
    pub resident_bytes: u64,
    pub streamed_bytes_per_forward: u64,
    pub peak_weight_bytes: u64,
    pub peak_device_bytes: u64,
    pub forward_heap_peak_delta_bytes: u64,
    pub prepared_bytes: u64,
    pub steps: u64,
    pub seconds: f64,
    pub seconds_per_step: f64,
    pub stall_seconds: f64,
    pub minimum_budget_bytes: u64,
    /// Absent on the reference run; `null` (a NaN) counts as a difference.
    #[serde(default)]
    pub max_abs_diff: Option<f64>,
    /// Whether the output has the reference's bits, every element (absent on the reference run,
    /// and in reports of a `hidream` that predates it). `max_abs_diff == 0` alone does not prove
    /// it: `-0` against `+0`, or NaN payloads, differ in bits but not in value.
    #[serde(default)]
    pub bit_identical: Option<bool>,
}

impl Measured {
    /// Whether the run reproduced the reference bit for bit, as the CLI measured it.
    pub fn is_bit_identical(&self) -> bool {
        self.bit_identical == Some(true) && self.max_abs_diff == Some(0.0)
    }

    /// How the output compares with the reference, as the table and the error show it.
    pub fn difference(&self) -> String {
        match (self.bit_identical, self.max_abs_diff) {
            _ if self.is_bit_identical() => "0 (identical)".to_owned(),
            (None, _) => "missing".to_owned(),
            (Some(_), None) => "NaN".to_owned(),
            (Some(_), Some(0.0)) => "0 (bits differ)".to_owned(),
            (Some(_), Some(diff)) => format!("{diff:.3e}"),
        }
    }
}

/// One line for each run (the reference aside) whose output is not the reference's bit for bit.
pub fn differences_from_reference(results: &[RunResult]) -> Vec<String> {
    results
        .iter()
        .filter(|result| result.spec != RunSpec::REFERENCE)
        .filter_map(|result| {
            let measured = result.outcome.measured()?;
            (!measured.is_bit_identical()).then(|| {
                format!(
                    "{}: max |out − reference| = {:?}, bit_identical = {:?}",
                    result.spec.name(),
                    measured.max_abs_diff,
                    measured.bit_identical
                )
            })
        })
        .collect()
}

/// What a run came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The run finished and reported its figures.
    Ran(Measured),
    /// The budget is below the planner's minimum: `hidream denoise` refused, as it must.
    BudgetTooSmall { budget_bytes: u64, minimum_budget_bytes: u64, weight_bytes_total: Option<u64>, error: String },
}

impl Outcome {
    /// The planner's minimum budget for this configuration, which every report carries.
    pub fn minimum_budget_bytes(&self) -> u64 {
        match self {
            Outcome::Ran(measured) => measured.minimum_budget_bytes,
            Outcome::BudgetTooSmall { minimum_budget_bytes, .. } => *minimum_budget_bytes,
        }
    }

    pub fn measured(&self) -> Option<&Measured> {
        match self {
            Outcome::Ran(measured) => Some(measured),
            Outcome::BudgetTooSmall { .. } => None,
        }
    }
}

/// A run with its outcome and the report exactly as the CLI wrote it.
#[derive(Debug, Clone)]
pub struct RunResult {
    pub spec: RunSpec,
    pub outcome: Outcome,
    pub report: Value,
}

/// Reads a run's report: `succeeded` is the process's exit status, `report` the JSON it left.
///
/// Anything but a finished run or a clean "budget too small" refusal is an error: a crash, a
/// missing or malformed report, a report whose settings are not the ones asked for.
pub fn parse_outcome(spec: &RunSpec, steps: usize, succeeded: bool, report: Option<&str>) -> Result<(Outcome, Value)> {
    let Some(text) = report else {
        bail!("no report was written (exit {})", if succeeded { "success" } else { "failure" });
    };
    let report: Value = serde_json::from_str(text).context("the report is not JSON")?;
    if let Some(error) = report.get("error") {
        let error = error.as_str().map_or_else(|| error.to_string(), str::to_owned);
        ensure!(!succeeded, "the process exited with success, yet the report has an error: {error}");
        let minimum = report.get("minimum_budget_bytes").and_then(Value::as_u64);
        let budget = report.get("budget_bytes").and_then(Value::as_u64);
        let (Some(minimum_budget_bytes), Some(budget_bytes)) = (minimum, budget) else {
            bail!("the run failed: {error}");
        };
        ensure!(
            matches!(spec.residency, Residency::Budget { .. }) && budget_bytes < minimum_budget_bytes,
            "the run failed with a budget of {budget_bytes} bytes, not below its minimum of {minimum_budget_bytes}: {error}"
        );
        let weight_bytes_total = report.get("weight_bytes_total").and_then(Value::as_u64);
        let outcome = Outcome::BudgetTooSmall { budget_bytes, minimum_budget_bytes, weight_bytes_total, error };
        return Ok((outcome, report));
    }
    ensure!(succeeded, "the process failed, yet its report has no `error`");
    let measured: Measured = serde_json::from_value(report.clone()).context("the report lacks a figure")?;
    check_settings(spec, steps, &measured)?;
    Ok((Outcome::Ran(measured), report))
}

/// The report must describe the configuration that was asked for.
fn check_settings(spec: &RunSpec, steps: usize, measured: &Measured) -> Result<()> {
    ensure!(
        measured.policy == spec.policy_key(),
        "asked for policy {}, the report says {}",
        spec.policy_key(),
        measured.policy
    );
    ensure!(
        measured.precompute == spec.precompute,
        "asked for precompute {}, the report says {}",
        spec.precompute,
        measured.precompute
    );
    ensure!(measured.steps == steps as u64, "asked for {steps} steps, the report says {}", measured.steps);
    let prefetch = match spec.residency {
        Residency::Stream { prefetch } | Residency::Budget { prefetch, .. } => Some(prefetch as u64),
        Residency::All | Residency::Sequential => None,
    };
    // A budget that holds everything streams nothing, and a plan that streams nothing loads nothing ahead.
    if let Some(prefetch) = prefetch.filter(|_| measured.streamed_bytes_per_forward > 0) {
        ensure!(measured.prefetch == prefetch, "asked for prefetch {prefetch}, the report says {}", measured.prefetch);
    }
    if let Residency::Budget { .. } = spec.residency {
        let budget = measured.budget_bytes.context("a budget run's report has no budget_bytes")?;
        ensure!(
            measured.peak_weight_bytes <= budget,
            "peak weight bytes {} exceed the budget {budget}",
            measured.peak_weight_bytes
        );
    }
    Ok(())
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A finished run's report, as `hidream denoise` writes it, with the given byte figures.
    pub fn ran_report(spec: &RunSpec, peak_device: u64, peak_weight: u64, seconds_per_step: f64) -> String {
        let (prefetch, budget) = match spec.residency {
            Residency::All | Residency::Sequential => (0, None),
            Residency::Stream { prefetch } => (prefetch, None),
            Residency::Budget { percent, prefetch } => (prefetch, Some(u64::from(percent) * 10_000)),
        };
        let diff = if *spec == RunSpec::REFERENCE {
            String::new()
        } else {
            r#", "max_abs_diff": 0.0, "bit_identical": true"#.to_owned()
        };
        format!(
            r#"{{"policy": "{}", "prefetch": {prefetch}, "precompute": {}, "budget_bytes": {},
               "weight_bytes_total": 1000000, "resident_bytes": {}, "streamed_bytes_per_forward": {},
               "peak_weight_bytes": {peak_weight}, "peak_device_bytes": {peak_device},
               "forward_heap_peak_delta_bytes": 4096, "prepared_bytes": 512, "steps": 1,
               "seconds": {seconds_per_step}, "seconds_per_step": {seconds_per_step}, "stall_seconds": 0.01,
               "minimum_budget_bytes": 230000{diff}}}"#,
            spec.policy_key(),
            spec.precompute,
            budget.map_or_else(|| "null".to_owned(), |b| b.to_string()),
            peak_weight / 2,
            1_000_000 - peak_weight / 2,
        )
    }

    pub fn too_small_report(spec: &RunSpec, budget: u64, minimum: u64) -> String {
        format!(
            r#"{{"policy": "budget", "prefetch": 1, "precompute": {}, "budget_bytes": {budget},
               "minimum_budget_bytes": {minimum}, "weight_bytes_total": 1000000,
               "error": "budget {budget} B is below the minimum {minimum} B"}}"#,
            spec.precompute
        )
    }

    fn budget_spec(percent: u32) -> RunSpec {
        RunSpec { residency: Residency::Budget { percent, prefetch: 1 }, precompute: false }
    }

    #[test]
    fn names_and_flags() {
        let runs = RunSpec::all_runs();
        assert_eq!(runs.len(), 14);
        assert_eq!(runs[0], RunSpec::REFERENCE);
        assert_eq!(runs[0].name(), "all-precompute");
        assert_eq!(budget_spec(30).name(), "budget-30%-no-precompute");
        assert_eq!(budget_spec(30).file_stem(), "budget-30pct-no-precompute");
        assert_eq!(
            budget_spec(25).cli_args(),
            ["--residency", "budget", "--budget", "25%", "--prefetch", "1", "--no-precompute"]
        );
        let stream = RunSpec { residency: Residency::Stream { prefetch: 2 }, precompute: true };
        assert_eq!(stream.name(), "stream-2-precompute");
        assert_eq!(stream.cli_args(), ["--residency", "stream", "--prefetch", "2"]);
        let names: std::collections::HashSet<String> = runs.iter().map(RunSpec::name).collect();
        assert_eq!(names.len(), runs.len(), "run names must be unique: they key the baseline");
    }

    #[test]
    fn parses_a_finished_run() {
        let spec = budget_spec(30);
        let (outcome, _) = parse_outcome(&spec, 1, true, Some(&ran_report(&spec, 900, 250_000, 1.5))).unwrap();
        let measured = outcome.measured().unwrap();
        assert_eq!((measured.peak_device_bytes, measured.peak_weight_bytes), (900, 250_000));
        assert_eq!((measured.max_abs_diff, measured.bit_identical), (Some(0.0), Some(true)));
        assert!(measured.is_bit_identical());
    }

    /// A run differs from the reference unless the CLI says its bits are identical: a zero
    /// difference is not enough (signed zeros, NaN payloads), nor is a report without the field.
    #[test]
    fn only_bit_identical_runs_match_the_reference() {
        let spec = budget_spec(30);
        let identical = ran_report(&spec, 900, 250_000, 1.5);
        let differing = identical.replace(r#""bit_identical": true"#, r#""bit_identical": false"#);
        let with_diff = |diff: &str| differing.replace(r#""max_abs_diff": 0.0"#, &format!(r#""max_abs_diff": {diff}"#));
        let cases = [
            (identical.clone(), None),
            (differing.clone(), Some("0 (bits differ)")),
            (identical.replace(r#", "bit_identical": true"#, ""), Some("missing")),
            (with_diff("null"), Some("NaN")),
            (with_diff("2.5e-7"), Some("2.500e-7")),
        ];
        for (report, expected) in cases {
            let (outcome, report_value) = parse_outcome(&spec, 1, true, Some(&report)).unwrap();
            let reference = ran_report(&RunSpec::REFERENCE, 900, 250_000, 1.5);
            let (reference_outcome, reference_value) =
                parse_outcome(&RunSpec::REFERENCE, 1, true, Some(&reference)).unwrap();
            let results = [
                RunResult { spec: RunSpec::REFERENCE, outcome: reference_outcome, report: reference_value },
                RunResult { spec, outcome, report: report_value },
            ];
            let differences = differences_from_reference(&results);
            let measured = results[1].outcome.measured().unwrap();
            match expected {
                None => {
                    assert!(differences.is_empty(), "{differences:?}");
                    assert_eq!(measured.difference(), "0 (identical)");
                }
                Some(label) => {
                    assert_eq!(differences.len(), 1, "{report}");
                    assert!(differences[0].starts_with("budget-30%-no-precompute: "), "{differences:?}");
                    assert_eq!(measured.difference(), label);
                }
            }
        }
    }

    #[test]
    fn a_budget_below_the_minimum_is_an_outcome() {
        let spec = budget_spec(25);
        let (outcome, _) = parse_outcome(&spec, 1, false, Some(&too_small_report(&spec, 250_000, 278_000))).unwrap();
        assert_eq!(outcome.minimum_budget_bytes(), 278_000);
        assert!(matches!(outcome, Outcome::BudgetTooSmall { budget_bytes: 250_000, .. }));
    }

    #[test]
    fn other_failures_are_errors() {
        let spec = budget_spec(30);
        let check = |succeeded: bool, report: Option<&str>, expected: &str| {
            let err = parse_outcome(&spec, 1, succeeded, report).unwrap_err();
            let message = format!("{err:#}");
            assert!(message.contains(expected), "{message:?} should contain {expected:?}");
        };
        check(false, None, "no report");
        check(false, Some("{"), "not JSON");
        check(false, Some(r#"{"error": "cannot open the checkpoint"}"#), "cannot open the checkpoint");
        check(true, Some(&too_small_report(&spec, 250_000, 278_000)), "exited with success");
        check(false, Some(&too_small_report(&spec, 300_000, 278_000)), "not below its minimum");
        check(false, Some(&ran_report(&spec, 900, 250_000, 1.0)), "no `error`");
        check(true, Some(r#"{"policy": "budget"}"#), "lacks a figure");
        let wrong_steps = ran_report(&spec, 900, 250_000, 1.0).replace(r#""steps": 1"#, r#""steps": 2"#);
        check(true, Some(&wrong_steps), "asked for 1 steps");
        check(true, Some(&ran_report(&spec, 900, 400_000, 1.0)), "exceed the budget");
        let sequential = RunSpec { residency: Residency::Sequential, precompute: false };
        let err = parse_outcome(&sequential, 1, true, Some(&ran_report(&spec, 900, 250_000, 1.0))).unwrap_err();
        assert!(err.to_string().contains("asked for policy sequential"));
    }
}
