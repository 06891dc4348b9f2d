//! The bench's table, one row per run, as aligned text for the terminal and as markdown.

use hidream_memory::format_bytes;

use super::runs::{Outcome, Residency, RunResult};

/// The column titles.
pub const HEADER: [&str; 11] = [
    "run",
    "policy",
    "precompute",
    "budget",
    "peak device",
    "peak weights",
    "streamed/step",
    "s/step",
    "× all",
    "stall/step",
    "max diff",
];

/// One row of cells per run, in the order given.
pub fn rows(results: &[RunResult]) -> Vec<[String; HEADER.len()]> {
    results.iter().map(|result| row(result, results)).collect()
}

/// The table as text with padded columns.
pub fn render_text(rows: &[[String; HEADER.len()]]) -> String {
    let mut widths = HEADER.map(|title| title.chars().count());
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(cell, width)| format!("{cell:<width$}")).collect();
        padded.join("  ").trim_end().to_owned()
    };
    let mut text = line(&HEADER.map(str::to_owned));
    text.push('\n');
    for row in rows {
        text.push_str(&line(row));
        text.push('\n');
    }
    text
}

/// The table in markdown.
pub fn render_markdown(rows: &[[String; HEADER.len()]]) -> String {
    let mut text = format!("| {} |\n|{}\n", HEADER.join(" | "), "---|".repeat(HEADER.len()));
    for row in rows {
        let cells: Vec<String> = row.iter().map(|cell| cell.replace('|', "\\|")).collect();
        text.push_str(&format!("| {} |\n", cells.join(" | ")));
    }
    text
}

/// The time of `result` over that of the `all` run with the same precompute setting.
pub fn time_ratio_to_all(result: &RunResult, results: &[RunResult]) -> Option<f64> {
    let seconds = result.outcome.measured()?.seconds_per_step;
    let all = results
        .iter()
        .find(|other| other.spec.residency == Residency::All && other.spec.precompute == result.spec.precompute)?;
    Some(seconds / all.outcome.measured()?.seconds_per_step)
}

fn row(result: &RunResult, results: &[RunResult]) -> [String; HEADER.len()] {
    let spec = &result.spec;
    let precompute = if spec.precompute { "yes" } else { "no" }.to_owned();
    let dash = || "—".to_owned();
    let budget = |budget_bytes: Option<u64>| match (spec.residency, budget_bytes) {
        (Residency::Budget { percent, .. }, Some(bytes)) => format!("{percent}% ({})", format_bytes(bytes)),
        (Residency::Budget { percent, .. }, None) => format!("{percent}%"),
        _ => dash(),
    };
    match &result.outcome {
        Outcome::Ran(measured) => {
            let steps = measured.steps.max(1) as f64;
            let max_diff =
                if *spec == super::runs::RunSpec::REFERENCE { "reference".to_owned() } else { measured.difference() };
            [
                spec.name(),
                spec.policy_label(),
                precompute,
                budget(measured.budget_bytes),
                format_bytes(measured.peak_device_bytes),
                format_bytes(measured.peak_weight_bytes),
                format_bytes(measured.streamed_bytes_per_forward),
                format!("{:.3}", measured.seconds_per_step),
                time_ratio_to_all(result, results).map_or_else(dash, |ratio| format!("{ratio:.2}")),
                format!("{:.3}", measured.stall_seconds / steps),
                max_diff,
            ]
        }
        Outcome::BudgetTooSmall { budget_bytes, minimum_budget_bytes, weight_bytes_total, .. } => {
            // The minimum as a share of the weights; without the total, the budget's share gives it.
            let minimum = *minimum_budget_bytes as f64;
            let share = match (weight_bytes_total, spec.residency) {
                (Some(total), _) if *total > 0 => Some(100.0 * minimum / *total as f64),
                (_, Residency::Budget { percent, .. }) if *budget_bytes > 0 => {
                    Some(f64::from(percent) * minimum / *budget_bytes as f64)
                }
                _ => None,
            };
            let share = share.map(|share| format!(" ({share:.1}%)")).unwrap_or_default();
            [
                spec.name(),
                spec.policy_label(),
                precompute,
                budget(Some(*budget_bytes)),
                format!("refused: minimum {}{share}", format_bytes(*minimum_budget_bytes)),
                dash(),
                dash(),
                dash(),
                dash(),
                dash(),
                dash(),
            ]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::runs::tests::{ran_report, too_small_report};
    use super::super::runs::{RunSpec, parse_outcome};
    use super::*;

    fn result(spec: RunSpec, report: &str, succeeded: bool) -> RunResult {
        let (outcome, report) = parse_outcome(&spec, 1, succeeded, Some(report)).unwrap();
        RunResult { spec, outcome, report }
    }

    fn fixture() -> Vec<RunResult> {
        let all = RunSpec { residency: Residency::All, precompute: false };
        let stream = RunSpec { residency: Residency::Stream { prefetch: 1 }, precompute: false };
        let stream_pre = RunSpec { residency: Residency::Stream { prefetch: 1 }, precompute: true };
        let budget = RunSpec { residency: Residency::Budget { percent: 25, prefetch: 1 }, precompute: false };
        vec![
            result(RunSpec::REFERENCE, &ran_report(&RunSpec::REFERENCE, 3 << 20, 1_000_000, 2.0), true),
            result(all, &ran_report(&all, 4 << 20, 1_000_000, 4.0), true),
            result(stream, &ran_report(&stream, 2 << 20, 500_000, 5.0), true),
            result(stream_pre, &ran_report(&stream_pre, 2 << 20, 400_000, 3.0), true),
            result(budget, &too_small_report(&budget, 250_000, 278_000), false),
        ]
    }

    #[test]
    fn ratios_are_to_all_with_the_same_precompute_setting() {
        let results = fixture();
        let ratios: Vec<Option<f64>> = results.iter().map(|result| time_ratio_to_all(result, &results)).collect();
        assert_eq!(ratios, [Some(1.0), Some(1.0), Some(1.25), Some(1.5), None]);
    }

    #[test]
    fn renders_every_run() {
        let rows = rows(&fixture());
        assert_eq!(rows[0][10], "reference");
        assert_eq!(rows[2][4], "2.00 MiB");
        assert_eq!(rows[2][8], "1.25");
        assert_eq!(rows[2][10], "0 (identical)");
        assert_eq!(rows[4][3], "25% (244.14 KiB)");
        assert_eq!(rows[4][4], "refused: minimum 271.48 KiB (27.8%)");
        let text = render_text(&rows);
        assert_eq!(text.lines().count(), 6);
        assert!(
            text.lines().nth(3).unwrap().starts_with("stream-1-no-precompute    stream, prefetch 1  no "),
            "{text}"
        );
        // Without `weight_bytes_total` in the report, the share comes from the budget's.
        let budget = RunSpec { residency: Residency::Budget { percent: 25, prefetch: 1 }, precompute: true };
        let report = too_small_report(&budget, 250_000, 278_000).replace(r#""weight_bytes_total": 1000000,"#, "");
        let cells = &super::rows(&[result(budget, &report, false)])[0];
        assert_eq!(cells[4], "refused: minimum 271.48 KiB (27.8%)");
        let markdown = render_markdown(&rows);
        assert!(markdown.starts_with("| run | policy |"));
        assert_eq!(markdown.lines().filter(|line| line.starts_with('|') && line.ends_with('|')).count(), 7);
    }
}
