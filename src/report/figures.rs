//! The routing report's figures (feature `figures`): PNG files drawn with plotters and an
//! embedded DejaVu font, so no system font library is needed.
//!
//! - [`load_bars`]: slots routed to each expert, and the rows kept after capacity;
//! - [`transition_heatmap`]: a Chain-of-Experts transition matrix (first expert at t → t+1);
//! - [`code_histogram`]: uses of each code, dead codes in red;
//! - [`margin_histogram`]: the k-th minus (k+1)-th score, one or more gates overlaid;
//! - [`line_chart`]: curves over steps (the quadratic-gate demo's loss and accuracy).
//!
//! [`write_all`] draws every figure a report has into a directory.
use super::{Margins, RoutingReport, Transitions, dead_codes};
use crate::{Error, Result};
use plotters::coord::Shift;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use std::path::{Path, PathBuf};

const FONT: &str = "sans-serif";
const SIZE: (u32, u32) = (900, 520);
/// Bins of a margin histogram over [0, max margin].
const MARGIN_BINS: usize = 40;

fn failed(path: &Path, problem: impl std::fmt::Display) -> Error {
    Error::Report {
        path: path.display().to_string(),
        problem: problem.to_string(),
    }
}

/// A white canvas for `path` with `title`, the font registered (registering twice is harmless).
fn canvas<'a>(path: &'a Path, title: &str) -> Result<DrawingArea<BitMapBackend<'a>, Shift>> {
    register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).map_err(|_| failed(path, "the embedded font"))?;
    let root = BitMapBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(path, e))?;
    root.titled(title, (FONT, 22).into_font()).map_err(|e| failed(path, e))
}

type Chart<'a, 'b> = ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// One bar per value at x = its index, in `color`; `offset` and `width` place the bar around x.
fn bars(
    chart: &mut Chart<'_, '_>,
    path: &Path,
    values: &[f64],
    color: RGBColor,
    (offset, width): (f64, f64),
) -> Result<()> {
    let rects = values.iter().enumerate().map(|(i, &v)| {
        let x = i as f64 + offset;
        Rectangle::new([(x, 0.0), (x + width, v)], color.filled())
    });
    chart.draw_series(rects).map(drop).map_err(|e| failed(path, e))
}

/// An f64 chart on `root` over `x` and `y`, with axis descriptions.
fn chart<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    path: &Path,
    (x, y): (std::ops::Range<f64>, std::ops::Range<f64>),
    (x_desc, y_desc): (&str, &str),
) -> Result<Chart<'a, 'b>> {
    let mut chart = ChartBuilder::on(root)
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)
        .map_err(|e| failed(path, e))?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc(x_desc)
        .y_desc(y_desc)
        .label_style((FONT, 14).into_font())
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .draw()
        .map_err(|e| failed(path, e))?;
    Ok(chart)
}

/// An axis label: whole numbers without decimals, others to at most 3 decimals.
fn tick(value: &f64) -> String {
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Slots routed to each expert (blue) and rows kept after capacity (orange, when they differ).
pub fn load_bars(report: &RoutingReport, path: &Path) -> Result<()> {
    let title = format!(
        "{}: load per expert (max/mean {:.2}, CV {:.2})",
        report.source,
        report.max_over_mean(),
        report.coefficient_of_variation()
    );
    let root = canvas(path, &title)?;
    let routed: Vec<f64> = report.routed.iter().map(|&v| v as f64).collect();
    let kept: Vec<f64> = report.kept.iter().map(|&v| v as f64).collect();
    let top = routed.iter().copied().fold(1.0, f64::max) * 1.1;
    let range = (-0.5..report.experts as f64 - 0.5, 0.0..top);
    let mut chart = chart(&root, path, range, ("expert", "slots"))?;
    let split = report.capacity.is_some();
    let width = if split { 0.4 } else { 0.8 };
    bars(&mut chart, path, &routed, BLUE, (-0.4, width))?;
    if split {
        bars(&mut chart, path, &kept, RGBColor(230, 120, 0), (0.0, width))?;
    }
    root.present().map_err(|e| failed(path, e))
}

/// A transition matrix of `experts` experts as a heatmap: row i (y) → column j (x), darker for
/// more tokens.
pub fn transition_heatmap(transitions: &Transitions, experts: usize, path: &Path) -> Result<()> {
    let title = format!(
        "first expert, iteration {} -> {} ({:.0}% change)",
        transitions.from,
        transitions.from + 1,
        100.0 * transitions.first_changed_share()
    );
    let root = canvas(path, &title)?;
    let e = experts as f64;
    let desc = ("expert at t+1", "expert at t");
    let mut chart = chart(&root, path, (-0.5..e - 0.5, -0.5..e - 0.5), desc)?;
    let most = transitions.matrix.iter().copied().max().unwrap_or(0).max(1) as f64;
    let cells = transitions.matrix.iter().enumerate().map(|(n, &count)| {
        let (i, j) = ((n / experts) as f64, (n % experts) as f64);
        let shade = 255 - (235.0 * count as f64 / most) as u8;
        Rectangle::new(
            [(j - 0.5, i - 0.5), (j + 0.5, i + 0.5)],
            RGBColor(shade, shade, 255).filled(),
        )
    });
    chart.draw_series(cells).map_err(|e| failed(path, e))?;
    root.present().map_err(|e| failed(path, e))
}

/// Uses of each code; dead codes get a red mark on the axis.
pub fn code_histogram(uses: &[u64], path: &Path) -> Result<()> {
    let dead = dead_codes(uses);
    let title = format!(
        "code use (perplexity {:.2} of {}, {} dead)",
        super::perplexity(uses),
        uses.len(),
        dead.len()
    );
    let root = canvas(path, &title)?;
    let values: Vec<f64> = uses.iter().map(|&v| v as f64).collect();
    let top = values.iter().copied().fold(1.0, f64::max) * 1.1;
    let range = (-0.5..uses.len() as f64 - 0.5, 0.0..top);
    let mut chart = chart(&root, path, range, ("code", "tokens"))?;
    bars(&mut chart, path, &values, RGBColor(40, 150, 60), (-0.4, 0.8))?;
    let marks = dead.iter().map(|&c| {
        let x = c as f64;
        Rectangle::new([(x - 0.4, 0.0), (x + 0.4, top * 0.02)], RED.filled())
    });
    chart.draw_series(marks).map_err(|e| failed(path, e))?;
    root.present().map_err(|e| failed(path, e))
}

/// Histograms of one or more gates' margins over the same bins, as outlined steps with a
/// legend (e.g. `[("quadratic", ..), ("linear", ..)]`).
pub fn margin_histogram(series: &[(&str, &Margins)], path: &Path) -> Result<()> {
    let root = canvas(path, "k-th minus (k+1)-th score, per token")?;
    let max = (series.iter())
        .flat_map(|(_, m)| m.values.iter().copied())
        .fold(1e-6f32, f32::max) as f64;
    let width = max / MARGIN_BINS as f64;
    let histograms: Vec<Vec<f64>> = (series.iter())
        .map(|(_, m)| {
            let mut bins = vec![0.0; MARGIN_BINS];
            for &v in &m.values {
                bins[((v as f64 / width) as usize).min(MARGIN_BINS - 1)] += 1.0;
            }
            let total = m.values.len().max(1) as f64;
            bins.into_iter().map(|b| b / total).collect()
        })
        .collect();
    let top = histograms.iter().flatten().copied().fold(0.01, f64::max) * 1.1;
    let mut chart = chart(&root, path, (0.0..max, 0.0..top), ("margin", "share of tokens"))?;
    for (n, ((name, _), bins)) in series.iter().zip(&histograms).enumerate() {
        let steps = bins.iter().enumerate().flat_map(|(b, &v)| {
            let x = b as f64 * width;
            [(x, v), (x + width, v)]
        });
        curve(&mut chart, path, (n, name), steps)?;
    }
    legend(&mut chart, path)?;
    root.present().map_err(|e| failed(path, e))
}

/// Series `n` of a chart, `name` in the legend: a line through `points` in palette colour n.
fn curve<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    path: &Path,
    (n, name): (usize, &str),
    points: impl Iterator<Item = (f64, f64)>,
) -> Result<()> {
    let color = Palette99::pick(n).to_rgba();
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(2)))
        .map_err(|e| failed(path, e))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    Ok(())
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, path: &Path) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14).into_font())
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| failed(path, e))
}

/// Named curves of (x, y) points on one chart with a legend.
pub fn line_chart(path: &Path, title: &str, axes: (&str, &str), series: &[(&str, Vec<(f64, f64)>)]) -> Result<()> {
    let root = canvas(path, title)?;
    let points = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let x_max = points().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points().map(|p| p.1).filter(|y| y.is_finite()).fold(1e-6, f64::max) * 1.05;
    let mut chart = chart(&root, path, (0.0..x_max, 0.0..y_max), axes)?;
    for (n, (name, points)) in series.iter().enumerate() {
        curve(&mut chart, path, (n, name), points.iter().copied())?;
    }
    legend(&mut chart, path)?;
    root.present().map_err(|e| failed(path, e))
}

/// Every figure `report` has, into `dir` (created if missing): `load.png`, then
/// `transitions_<t>.png` per chain pair, `codes.png`, and `margins.png` (with `compare`'s
/// margins overlaid when given, e.g. the linear gate on the same inputs). Returns the paths.
pub fn write_all(
    report: &RoutingReport,
    dir: &Path,
    name: &str,
    compare: Option<(&str, &RoutingReport)>,
) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| failed(dir, e))?;
    let mut written = vec![dir.join("load.png")];
    load_bars(report, &written[0])?;
    for t in &report.transitions {
        let path = dir.join(format!("transitions_{}.png", t.from));
        transition_heatmap(t, report.experts, &path)?;
        written.push(path);
    }
    if let Some(uses) = &report.codes {
        let path = dir.join("codes.png");
        code_histogram(uses, &path)?;
        written.push(path);
    }
    if let Some(margins) = &report.margins {
        let mut series = vec![(name, margins)];
        if let Some((other, m)) = compare.and_then(|(n, r)| r.margins.as_ref().map(|m| (n, m))) {
            series.push((other, m));
        }
        let path = dir.join("margins.png");
        margin_histogram(&series, &path)?;
        written.push(path);
    }
    Ok(written)
}
