//! The training curve: accuracy after each step, as JSON and as an SVG plot.

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::Serialize;
use std::path::Path;

/// One training step as the history records it.
#[derive(Clone, Debug, Serialize)]
pub struct StepRecord {
    pub epoch: usize,
    /// Batch within the epoch, from 1.
    pub batch: usize,
    /// Steps since the start of this run, from 1.
    pub step: usize,
    pub seconds: f64,
    /// Accuracy of the model after this step (on the test data when given, else on the
    /// training data).
    pub accuracy: f64,
    /// Float SGD on the same batches, for comparison.
    pub float_accuracy: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct History {
    pub mode: String,
    /// What the accuracy is measured on.
    pub evaluated_on: String,
    pub samples: usize,
    pub features: usize,
    pub classes: Vec<i64>,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub epochs: usize,
    pub batches_per_epoch: usize,
    pub lookups_per_step: usize,
    pub widest_lookup_bits: u32,
    pub p_error: f64,
    pub keygen_seconds: f64,
    pub server_key_mb: f64,
    pub steps: Vec<StepRecord>,
}

impl History {
    /// Accuracy after the last step of each epoch: (ours, float).
    pub fn per_epoch(&self) -> Vec<(f64, f64)> {
        self.steps
            .iter()
            .filter(|s| s.batch == self.batches_per_epoch)
            .map(|s| (s.accuracy, s.float_accuracy))
            .collect()
    }

    pub fn mean_seconds_per_step(&self) -> f64 {
        if self.steps.is_empty() {
            return 0.0;
        }
        self.steps.iter().map(|s| s.seconds).sum::<f64>() / self.steps.len() as f64
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)?;
        crate::npy::write_atomic(path, |w| Ok(std::io::Write::write_all(w, text.as_bytes())?))
    }

    /// Accuracy against steps, ours and float SGD's, epochs marked.
    pub fn plot_svg(&self, path: &Path) -> Result<()> {
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
            root.fill(&WHITE).map_err(plot_err)?;
            let steps = self.steps.len().max(1) as f64;
            let lo = self.steps.iter().flat_map(|s| [s.accuracy, s.float_accuracy]).fold(1.0f64, f64::min);
            let lo = (lo - 0.05).clamp(0.0, 0.9);
            let mut chart = ChartBuilder::on(&root)
                .caption(
                    format!(
                        "{} training, batch {}, learning rate {} — {} accuracy",
                        self.mode, self.batch_size, self.learning_rate, self.evaluated_on
                    ),
                    ("sans-serif", 18),
                )
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(50)
                .build_cartesian_2d(0f64..steps, lo..1.0f64)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc(format!("step ({} per epoch)", self.batches_per_epoch))
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_desc("accuracy")
                .draw()
                .map_err(plot_err)?;
            let ours: Vec<(f64, f64)> = self.steps.iter().map(|s| (s.step as f64, s.accuracy)).collect();
            let float: Vec<(f64, f64)> = self.steps.iter().map(|s| (s.step as f64, s.float_accuracy)).collect();
            chart
                .draw_series(LineSeries::new(float, BLUE.stroke_width(2)))
                .map_err(plot_err)?
                .label("float SGD, same batches")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
            chart
                .draw_series(LineSeries::new(ours, RED.stroke_width(2)))
                .map_err(plot_err)?
                .label(format!("veil ({})", self.mode))
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
            for e in 1..self.epochs {
                let x = (e * self.batches_per_epoch) as f64;
                chart.draw_series(LineSeries::new(vec![(x, lo), (x, 1.0)], BLACK.mix(0.3))).map_err(plot_err)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::LowerRight)
                .border_style(BLACK)
                .background_style(WHITE.mix(0.9))
                .draw()
                .map_err(plot_err)?;
            root.present().map_err(plot_err)?;
        }
        crate::npy::write_atomic(path, |w| Ok(std::io::Write::write_all(w, svg.as_bytes())?))
            .with_context(|| format!("writing the plot {}", path.display()))
    }
}

fn plot_err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e}")
}
