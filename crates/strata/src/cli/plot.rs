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

/// Plots train and test loss and test accuracy per epoch; `history` holds
/// `(epoch, train loss, test loss, test accuracy)`.
pub fn loss_and_accuracy(path: &Path, history: &[(u64, f64, f64, f64)]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let text = font();
    let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let (left, right) = root.split_horizontally(500);
    let last = history.last().map_or(1, |h| h.0).max(1) as f64;
    let e = |x: plotters::drawing::DrawingAreaErrorKind<_>| anyhow!("plot: {x}");
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
