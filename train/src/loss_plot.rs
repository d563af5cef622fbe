//! `loss.png`: a run's training curves, drawn from its `metrics.jsonl`: the text loss and the
//! pixel loss (each step, and their mean over the last [`SMOOTHING`] steps, on a log scale), the
//! learning rate, and the accuracy on the validation slice at each checkpoint. `train` draws it
//! at every checkpoint and at the end; `train plot RUN_DIR` redraws it, also for a killed run.

use crate::error::{Result, TrainError};
use crate::metrics::{read_metrics, Metrics};
use emma::picture::{draw_png, FONT};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Size of the picture in pixels.
pub const SIZE: (u32, u32) = (1200, 800);

/// Steps in the moving mean drawn over each loss.
pub const SMOOTHING: usize = 50;

/// Draws `RUN_DIR/loss.png` from `RUN_DIR/metrics.jsonl`; returns the picture's path. A run
/// without a recorded step is an error naming the metrics file.
pub fn draw_loss_png(run_dir: &Path) -> Result<PathBuf> {
    let metrics_path = run_dir.join("metrics.jsonl");
    let metrics = read_metrics(&metrics_path)?;
    if metrics.is_empty() {
        return Err(TrainError::Metrics {
            path: metrics_path,
            line: 0,
            detail: "no training step recorded yet".into(),
        });
    }
    let out = run_dir.join("loss.png");
    draw_png(&out, SIZE, |root| draw(root, &metrics).map_err(|e| e.to_string()))?;
    Ok(out)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

/// The four panels.
fn draw(root: &Area, metrics: &[Metrics]) -> DrawResult {
    let last = metrics.iter().map(|m| m.step).max().unwrap_or(1).max(1) as f64;
    let panels = root.split_evenly((2, 2));
    let series = |value: fn(&Metrics) -> Option<f64>| -> Vec<(f64, f64)> {
        metrics
            .iter()
            .filter_map(|m| value(m).map(|v| (m.step as f64, v)))
            .filter(|(_, v)| v.is_finite())
            .collect()
    };
    let text = series(|m| Some(m.text_loss).filter(|v| *v > 0.0));
    let pixel = series(|m| Some(m.pixel_loss).filter(|v| *v > 0.0));
    let lr = series(|m| Some(m.lr));
    let val = series(|m| m.val_accuracy.map(|a| 100.0 * a));
    loss_panel(&panels[0], "text loss", &text, last)?;
    loss_panel(&panels[1], "pixel loss", &pixel, last)?;
    linear_panel(&panels[2], "learning rate", &lr, last, None)?;
    linear_panel(
        &panels[3],
        "validation accuracy (%)",
        &val,
        last,
        Some((0.0, 100.0)),
    )?;
    Ok(())
}

/// A panel that says its series was not recorded.
fn empty_panel(area: &Area, title: &str) -> DrawResult {
    area.titled(title, (FONT, 22))?;
    let (w, h) = area.dim_in_pixel();
    area.draw(&Text::new(
        "not recorded in this run",
        (w as i32 / 2 - 100, h as i32 / 2),
        (FONT, 18).into_font().color(&BLACK.mix(0.6)),
    ))?;
    Ok(())
}

/// A loss on a log scale: each step thin, the moving mean over [`SMOOTHING`] steps bold.
fn loss_panel(area: &Area, title: &str, points: &[(f64, f64)], last: f64) -> DrawResult {
    if points.is_empty() {
        return empty_panel(area, title);
    }
    let (lo, hi) = bounds(points);
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..last, (lo * 0.9..hi * 1.1).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;
    chart.draw_series(LineSeries::new(points.iter().copied(), BLUE.mix(0.3)))?;
    chart.draw_series(LineSeries::new(
        moving_mean(points, SMOOTHING),
        BLUE.stroke_width(2),
    ))?;
    Ok(())
}

/// A series on a linear scale (`y` fixed, else fitted to the points), with a mark per point
/// when there are few.
fn linear_panel(
    area: &Area,
    title: &str,
    points: &[(f64, f64)],
    last: f64,
    y: Option<(f64, f64)>,
) -> DrawResult {
    if points.is_empty() {
        return empty_panel(area, title);
    }
    let (lo, hi) = y.unwrap_or_else(|| {
        let (lo, hi) = bounds(points);
        (lo.min(0.0), if hi > lo { hi * 1.05 } else { hi + 1.0 })
    });
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FONT, 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..last, lo..hi)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| tick(*y))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;
    chart.draw_series(LineSeries::new(points.iter().copied(), RED.stroke_width(2)))?;
    if points.len() <= 100 {
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 4, RED.filled())))?;
    }
    Ok(())
}

/// A linear axis' tick label: small values in scientific notation, large ones without decimals.
fn tick(y: f64) -> String {
    match y.abs() {
        0.0 => "0".to_owned(),
        a if a < 0.01 => format!("{y:.1e}"),
        a if a >= 10.0 => format!("{y:.0}"),
        _ => format!("{y:.2}"),
    }
}

/// The smallest and largest value of `points`.
fn bounds(points: &[(f64, f64)]) -> (f64, f64) {
    points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, v)| {
            (lo.min(v), hi.max(v))
        })
}

/// Each point's value replaced by the mean of the last `window` values up to it.
fn moving_mean(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, v))| {
            sum += v;
            if i >= window {
                sum -= points[i - window].1;
            }
            (x, sum / (i + 1).min(window) as f64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::{moving_mean, tick};

    #[test]
    fn the_moving_mean_averages_the_last_values() {
        let points: Vec<(f64, f64)> = (1..=5).map(|i| (i as f64, i as f64)).collect();
        let mean = moving_mean(&points, 2);
        assert_eq!(mean, [(1.0, 1.0), (2.0, 1.5), (3.0, 2.5), (4.0, 3.5), (5.0, 4.5)]);
    }

    #[test]
    fn ticks_keep_small_learning_rates_and_whole_percentages_readable() {
        assert_eq!(tick(0.0), "0");
        assert_eq!(tick(4e-4), "4.0e-4");
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(90.0), "90");
    }
}
