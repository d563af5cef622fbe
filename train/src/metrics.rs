//! A run's `metrics.jsonl`: one JSON line per optimizer step, appended as training goes.

use crate::error::{io_err, Result, TrainError};
use std::path::Path;

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Metrics {
    /// The optimizer step (from 1).
    pub step: u64,
    /// Text loss plus the weighted pixel loss.
    pub loss: f64,
    /// The answer tokens' cross-entropy.
    pub text_loss: f64,
    /// The pixel-alignment loss (0 without it).
    pub pixel_loss: f64,
    /// The learning rate of the step.
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Accuracy on the validation slice, on the steps that wrote a checkpoint (easy-VQA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_accuracy: Option<f64>,
}

/// Reads a metrics file. A last line cut short (a run killed while writing it) is left out; any
/// other malformed line is an error naming the file and the line.
pub fn read_metrics(path: &Path) -> Result<Vec<Metrics>> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Metrics>(line) {
            Ok(m) => out.push(m),
            Err(_) if i + 1 == lines.len() && !complete => {}
            Err(e) => {
                return Err(TrainError::Metrics {
                    path: path.to_owned(),
                    line: i + 1,
                    detail: e.to_string(),
                })
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_last_line_is_left_out_and_a_bad_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        let line = |step: u64| {
            let m = Metrics {
                step,
                loss: 1.0 / step as f64,
                text_loss: 0.9 / step as f64,
                pixel_loss: 0.1,
                lr: 1e-3,
                grad_norm: 0.5,
                val_accuracy: (step == 2).then_some(0.75),
            };
            serde_json::to_string(&m).unwrap()
        };
        let cut = &line(3)[..20];
        std::fs::write(&path, format!("{}\n{}\n{cut}", line(1), line(2))).unwrap();
        let read = read_metrics(&path).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[1].val_accuracy, Some(0.75));
        assert_eq!(read[0].val_accuracy, None);
        std::fs::write(&path, format!("{}\n{cut}\n{}\n", line(1), line(3))).unwrap();
        let err = read_metrics(&path).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl:2:"), "{err}");
        let err = read_metrics(&dir.path().join("none.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("none.jsonl"), "{err}");
    }
}
