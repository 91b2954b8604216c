//! PNG plots of training progress (plotters).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/Library/Fonts/Arial.ttf",
];

/// Registers a system font for labels; `false` when none is found (the plot is then
/// drawn without text).
fn font() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, leaked).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Plots the training loss of every step, train and test loss per epoch, and test
/// accuracy per epoch; `history` holds `(epoch, train loss, test loss, test accuracy)`.
pub fn training(path: &Path, history: &[(u64, f64, f64, f64)], steps: &[f32]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = font();
    let root = BitMapBackend::new(path, (1500, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let (per_step, rest) = root.split_horizontally(500);
    let (left, right) = rest.split_horizontally(500);
    let last = history.last().map_or(1, |h| h.0).max(1) as f64;
    let e = |x: plotters::drawing::DrawingAreaErrorKind<_>| anyhow!("plot: {x}");
    // Loss per step: the curve a one-epoch run has (the per-epoch panels hold one point).
    let finite: Vec<(f64, f64)> =
        steps.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, l)| ((i + 1) as f64, f64::from(*l))).collect();
    let top = finite.iter().map(|p| p.1).fold(0.0, f64::max) * 1.05 + 1e-3;
    let mut c = ChartBuilder::on(&per_step);
    c.margin(15).x_label_area_size(if text { 35 } else { 5 }).y_label_area_size(if text { 50 } else { 5 });
    if text {
        c.caption("training loss per step", ("sans-serif", 20));
    }
    let mut chart = c.build_cartesian_2d(0.0..(finite.len().max(1) as f64 + 1.0), 0.0..top).map_err(e)?;
    if text {
        chart.configure_mesh().x_desc("step").draw().map_err(e)?;
    }
    chart.draw_series(LineSeries::new(finite, &BLUE)).map_err(e)?;
    // Epochs are whole numbers: label only those.
    let whole = |x: &f64| if (x - x.round()).abs() < 1e-9 { format!("{}", x.round()) } else { String::new() };
    let max_loss = history.iter().map(|h| h.1.max(h.2)).fold(0.0, f64::max) * 1.1 + 1e-3;
    let mut c = ChartBuilder::on(&left);
    c.margin(15).x_label_area_size(if text { 35 } else { 5 }).y_label_area_size(if text { 50 } else { 5 });
    if text {
        c.caption("loss per epoch", ("sans-serif", 20));
    }
    let mut chart = c.build_cartesian_2d(0.0..last + 0.5, 0.0..max_loss).map_err(e)?;
    if text {
        chart.configure_mesh().x_desc("epoch").x_label_formatter(&whole).draw().map_err(e)?;
    }
    let train: Vec<(f64, f64)> = history.iter().map(|h| (h.0 as f64, h.1)).collect();
    let test: Vec<(f64, f64)> = history.iter().map(|h| (h.0 as f64, h.2)).collect();
    for (points, color, label) in [(&train, BLUE, "train loss"), (&test, RED, "test loss")] {
        chart
            .draw_series(LineSeries::new(points.clone(), color))
            .map_err(e)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled()))).map_err(e)?;
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(e)?;
    }
    let mut c = ChartBuilder::on(&right);
    c.margin(15).x_label_area_size(if text { 35 } else { 5 }).y_label_area_size(if text { 50 } else { 5 });
    if text {
        c.caption("test accuracy (%)", ("sans-serif", 20));
    }
    let mut chart = c.build_cartesian_2d(0.0..last + 0.5, 0.0..100.0).map_err(e)?;
    if text {
        chart.configure_mesh().x_desc("epoch").x_label_formatter(&whole).draw().map_err(e)?;
    }
    let acc: Vec<(f64, f64)> = history.iter().map(|h| (h.0 as f64, h.3 * 100.0)).collect();
    chart.draw_series(LineSeries::new(acc.clone(), &GREEN)).map_err(e)?;
    chart.draw_series(acc.iter().map(|p| Circle::new(*p, 4, GREEN.filled()))).map_err(e)?;
    root.present().map_err(|x| anyhow!("plot: {x}"))?;
    Ok(())
}

/// Draws a pipeline timeline as a Gantt chart: one row per stage (and replica), forward
/// work blue, backward green (input gradient) and orange (weight gradient), optimiser grey,
/// over a red shade that shows through wherever the stage sat idle within a step (the
/// bubble). Shows up to three steps after the first (the warm-up).
pub fn timeline(path: &Path, t: &strata_train::pipeline::Timeline) -> Result<()> {
    use strata_train::pipeline::EventKind;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = font();
    let first = t.events.iter().map(|e| e.step).min().unwrap_or(0);
    let shown = |s: u64| if t.events.iter().any(|e| e.step > first) { s > first && s <= first + 3 } else { s == first };
    let events: Vec<_> = t.events.iter().filter(|e| shown(e.step)).collect();
    let t0 = events.iter().map(|e| e.start_us).min().unwrap_or(0);
    let t1 = events.iter().map(|e| e.end_us).max().unwrap_or(t0 + 1).max(t0 + 1);
    let ms = |us: u64| (us - t0) as f64 / 1e3;
    let rows = (t.stages * t.replicas.max(1)).max(1);
    let row = |e: &strata_train::pipeline::Event| (e.replica as usize * t.stages + e.stage as usize) as f64;
    let root = BitMapBackend::new(path, (1400, 120 + 70 * rows as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let e = |x: plotters::drawing::DrawingAreaErrorKind<_>| anyhow!("plot: {x}");
    let mut c = ChartBuilder::on(&root);
    c.margin(15).x_label_area_size(if text { 35 } else { 5 }).y_label_area_size(if text { 90 } else { 5 });
    if text {
        c.caption("pipeline timeline (red: idle, the bubble)", ("sans-serif", 20));
    }
    let mut chart = c.build_cartesian_2d(0.0..ms(t1), rows as f64..0.0).map_err(e)?;
    if text {
        let label = |y: &f64| {
            let r = y.floor() as usize;
            if (y - y.floor() - 0.5).abs() < 0.26 && r < rows {
                format!("r{} stage {}", r / t.stages, r % t.stages)
            } else {
                String::new()
            }
        };
        chart.configure_mesh().x_desc("ms").y_labels(rows * 4).y_label_formatter(&label).draw().map_err(e)?;
    }
    // Each step's window per row, shaded; the work drawn over it leaves the idle time red.
    let windows = t.step_windows(shown);
    let idle = RGBColor(244, 180, 180);
    for ((replica, _), (a, b, _)) in &windows {
        for s in 0..t.stages {
            let y = (*replica as usize * t.stages + s) as f64;
            chart.draw_series([Rectangle::new([(ms(*a), y + 0.1), (ms(*b), y + 0.9)], idle.filled())]).map_err(e)?;
        }
    }
    for ev in events.iter().filter(|e| e.kind.is_compute()) {
        let color = match ev.kind {
            EventKind::Forward => RGBColor(66, 110, 200),
            EventKind::Backward | EventKind::BackwardInput => RGBColor(60, 160, 80),
            EventKind::BackwardWeight => RGBColor(235, 150, 40),
            _ => RGBColor(130, 130, 130),
        };
        let y = row(ev);
        chart
            .draw_series([Rectangle::new([(ms(ev.start_us), y + 0.1), (ms(ev.end_us), y + 0.9)], color.filled())])
            .map_err(e)?;
    }
    root.present().map_err(|x| anyhow!("plot: {x}"))?;
    Ok(())
}
