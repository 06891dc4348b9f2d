//! `report.svg`: two bar panels side by side, one row per run. On the left, the peak memory of
//! each run (the heap peak, with the budget ledger's peak of weight bytes drawn inside it); on the right,
//! the seconds per step. Runs that fail as expected show the minimum budget they would need.

use std::path::Path;

use anyhow::{Result, anyhow};
use hidream_memory::format_bytes;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::runs::{Outcome, RunResult};

const PRECOMPUTE: RGBColor = RGBColor(31, 119, 180);
const PER_STEP: RGBColor = RGBColor(255, 127, 14);
const WEIGHTS: RGBColor = RGBColor(40, 40, 40);
const ROW_HEIGHT: u32 = 30;

/// Writes the chart of `results` to `path`.
pub fn write_svg(path: &Path, title: &str, results: &[RunResult]) -> Result<()> {
    let n_rows = u32::try_from(results.len()).unwrap_or(u32::MAX);
    let height = 150 + ROW_HEIGHT * n_rows.max(1);
    let root = SVGBackend::new(path, (1400, height)).into_drawing_area();
    draw(&root, title, results).map_err(|err| anyhow!("drawing {}: {err}", path.display()))?;
    root.present().map_err(|err| anyhow!("writing {}: {err}", path.display()))
}

type DrawResult = std::result::Result<(), DrawingAreaErrorKind<std::io::Error>>;

fn draw(root: &DrawingArea<SVGBackend<'_>, Shift>, title: &str, results: &[RunResult]) -> DrawResult {
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 18))?;
    let (legend_band, panels) = root.split_vertically(30);
    legend(&legend_band)?;
    let (left, right) = panels.split_horizontally(820);
    let names: Vec<String> = results.iter().map(|result| result.spec.name()).collect();

    // The memory axis counts MiB or GiB, so that its ticks fall on round numbers of the unit.
    let memory_max = results
        .iter()
        .filter_map(|result| result.outcome.measured())
        .map(|measured| measured.peak_device_bytes.max(measured.peak_weight_bytes))
        .max()
        .unwrap_or(0);
    let (unit, unit_bytes) =
        if memory_max >= 1 << 30 { ("GiB", (1u64 << 30) as f64) } else { ("MiB", (1u64 << 20) as f64) };
    let bars: Vec<Bar> = results
        .iter()
        .map(|result| match &result.outcome {
            Outcome::Ran(measured) => Bar {
                value: measured.peak_device_bytes as f64 / unit_bytes,
                inner: Some(measured.peak_weight_bytes as f64 / unit_bytes),
                label: format_bytes(measured.peak_device_bytes),
                precompute: result.spec.precompute,
            },
            Outcome::BudgetTooSmall { minimum_budget_bytes, .. } => Bar {
                value: 0.0,
                inner: None,
                label: format!("refused: needs a budget ≥ {}", format_bytes(*minimum_budget_bytes)),
                precompute: result.spec.precompute,
            },
        })
        .collect();
    let x_max = (memory_max as f64 / unit_bytes * 1.3).max(1e-3);
    let format_memory = |value: f64| format!("{} {unit}", tick(value));
    panel(&left, "peak memory: process heap, and the weights within it", &names, &bars, x_max, &format_memory)?;

    let bars: Vec<Bar> = results
        .iter()
        .map(|result| {
            let seconds = result.outcome.measured().map_or(0.0, |measured| measured.seconds_per_step);
            let label = if result.outcome.measured().is_some() { format!("{seconds:.3} s") } else { String::new() };
            Bar { value: seconds, inner: None, label, precompute: result.spec.precompute }
        })
        .collect();
    let seconds_max = bars.iter().map(|bar| bar.value).fold(1e-3, f64::max);
    panel(&right, "seconds per step", &[], &bars, seconds_max * 1.25, &|seconds| format!("{} s", tick(seconds)))
}

/// An axis tick: at most two decimals, without trailing zeros.
fn tick(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The colours' meaning, in one row under the title.
fn legend(area: &DrawingArea<SVGBackend<'_>, Shift>) -> DrawResult {
    let entries = [
        (PRECOMPUTE.to_rgba(), "prompt work precomputed once"),
        (PER_STEP.to_rgba(), "prompt work in every step (as diffusers)"),
        (WEIGHTS.mix(0.55), "peak weight bytes (the budget ledger)"),
    ];
    let mut x = 260;
    for (color, text) in entries {
        area.draw(&Rectangle::new([(x, 8), (x + 16, 20)], color.filled()))?;
        area.draw(&Text::new(text, (x + 22, 8), ("sans-serif", 13)))?;
        x += 40 + 7 * i32::try_from(text.len()).unwrap_or(0);
    }
    Ok(())
}

/// One horizontal bar: `inner` is drawn inside it, `label` at its end.
struct Bar {
    value: f64,
    inner: Option<f64>,
    label: String,
    precompute: bool,
}

/// A panel of horizontal bars, the first at the top. Row names are drawn when `names` is not empty.
fn panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    caption: &str,
    names: &[String],
    bars: &[Bar],
    x_max: f64,
    x_format: &dyn Fn(f64) -> String,
) -> DrawResult {
    let n_rows = i32::try_from(bars.len()).unwrap_or(i32::MAX).max(1);
    let row = |idx: usize| n_rows - 1 - i32::try_from(idx).unwrap_or(0);
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(if names.is_empty() { 10 } else { 230 })
        .build_cartesian_2d(0.0..x_max, (0..n_rows - 1).into_segmented())?;
    let y_format = |value: &SegmentValue<i32>| match value {
        SegmentValue::CenterOf(y) => {
            usize::try_from(n_rows - 1 - y).ok().and_then(|idx| names.get(idx)).cloned().unwrap_or_default()
        }
        _ => String::new(),
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(bars.len() + 1)
        .y_label_formatter(&y_format)
        .x_labels(6)
        .x_label_formatter(&|value| x_format(*value))
        .label_style(("sans-serif", 13))
        .draw()?;
    let segment =
        |idx: usize, value: f64| [(0.0, SegmentValue::Exact(row(idx))), (value, SegmentValue::Exact(row(idx) + 1))];
    chart.draw_series(bars.iter().enumerate().map(|(idx, bar)| {
        let color = if bar.precompute { PRECOMPUTE } else { PER_STEP };
        let mut rect = Rectangle::new(segment(idx, bar.value), color.filled());
        rect.set_margin(4, 4, 0, 0);
        rect
    }))?;
    chart.draw_series(bars.iter().enumerate().filter_map(|(idx, bar)| {
        let mut rect = Rectangle::new(segment(idx, bar.inner?), WEIGHTS.mix(0.55).filled());
        rect.set_margin(10, 10, 0, 0);
        Some(rect)
    }))?;
    chart.draw_series(bars.iter().enumerate().map(|(idx, bar)| {
        let style = TextStyle::from(("sans-serif", 12)).pos(Pos::new(HPos::Left, VPos::Center));
        Text::new(format!(" {}", bar.label), (bar.value, SegmentValue::CenterOf(row(idx))), style)
    }))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::runs::tests::{ran_report, too_small_report};
    use super::super::runs::{Residency, RunSpec, parse_outcome};
    use super::*;

    #[test]
    fn writes_a_chart_with_every_run() {
        let mut results = Vec::new();
        for spec in RunSpec::all_runs() {
            let (report, succeeded) = match spec.residency {
                Residency::Budget { percent: 25, .. } => (too_small_report(&spec, 250_000, 278_000), false),
                _ => (ran_report(&spec, 3 << 20, 200_000, 1.5), true),
            };
            let (outcome, report) = parse_outcome(&spec, 1, succeeded, Some(&report)).unwrap();
            results.push(RunResult { spec, outcome, report });
        }
        let dir = std::env::temp_dir().join(format!("xtask-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("report.svg");
        write_svg(&path, "bench-memory test", &results).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(svg.starts_with("<svg"));
        for result in &results {
            assert!(svg.contains(&format!(">\n{}\n<", result.spec.name())), "{}", result.spec.name());
        }
        assert!(svg.contains("refused: needs a budget ≥ 271.48 KiB"));
    }
}
