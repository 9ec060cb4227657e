//! The benchmark chart: % of floor by token count, one panel per model, one line per op, drawn
//! with plotters into a PNG (an embedded DejaVu font: no system font library needed).
use moe_kernels::benchmarks::Series;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use std::path::Path;

const FONT: &str = "sans-serif";
const WIDTH: u32 = 1600;
const HEIGHT: u32 = 700;

/// Draws `series` (from `benchmarks::chart_series`) into `path`.
pub fn draw(series: &[Series], title: &str, path: &Path) -> Result<(), String> {
    // Registering twice replaces the font: harmless.
    register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).map_err(|_| "the embedded font is invalid")?;
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let root = root.titled(title, (FONT, 24).into_font()).map_err(|e| err(&e))?;
    let mut models: Vec<&str> = series.iter().map(|s| s.model.as_str()).collect();
    models.dedup();
    if models.is_empty() {
        root.draw(&Text::new("no records", (20, 20), (FONT, 20).into_font()))
            .map_err(|e| err(&e))?;
    }
    // One colour per op, the same in every panel.
    let mut ops: Vec<&str> = series.iter().map(|s| s.op.as_str()).collect();
    ops.sort_unstable();
    ops.dedup();
    let panels = root.split_evenly((1, models.len().max(1)));
    for (panel, model) in panels.iter().zip(&models) {
        let lines: Vec<&Series> = series.iter().filter(|s| s.model == *model).collect();
        // The same T axis in every panel: 1 to the largest T run (16384 by default).
        let max_t = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .max()
            .unwrap_or(1)
            .max(2) as f64;
        let max_y = lines
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(100.0f64, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(*model, (FONT, 20).into_font())
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((0.7f64..max_t * 1.5).log_scale(), 0f64..max_y * 1.05)
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .light_line_style(WHITE)
            .x_desc("tokens T")
            .y_desc("% of floor")
            .label_style((FONT, 14).into_font())
            .x_label_formatter(&|t| format!("{t:.0}"))
            .draw()
            .map_err(|e| err(&e))?;
        for s in &lines {
            let color = Palette99::pick(ops.binary_search(&s.op.as_str()).unwrap_or(0)).to_rgba();
            let points: Vec<(f64, f64)> = s.points.iter().map(|&(t, y)| (t as f64, y)).collect();
            chart
                .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                .map_err(|e| err(&e))?
                .label(s.op.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
            chart
                .draw_series(points.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 12).into_font())
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))
}
