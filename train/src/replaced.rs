//! `--overwrite` without data loss: an earlier run's outputs (its checkpoints, metrics and final
//! model) are moved aside, deleted only once the new run has written its first checkpoint, and
//! moved back if the new run ends before that.

use crate::error::{io_err, Result, TrainError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The folder inside `--out` that holds an earlier run's outputs while they are set aside.
pub const ASIDE_DIR: &str = ".replaced-by-overwrite";

/// An earlier run's outputs, set aside.
#[derive(Debug)]
pub struct Replaced {
    aside: PathBuf,
    /// `(where it was, where it is now)` for each moved file or folder.
    moved: Vec<(PathBuf, PathBuf)>,
    committed: AtomicBool,
}

impl Replaced {
    /// Moves `checkpoints` (the earlier run's checkpoint folders) and `out`'s `metrics.jsonl`
    /// and `final` into `out/.replaced-by-overwrite`. Nothing else is touched. An aside folder
    /// left by an interrupted earlier `--overwrite` is an error: those files are someone's run.
    pub fn move_aside(out: &Path, checkpoints: &[PathBuf]) -> Result<Self> {
        let aside = out.join(ASIDE_DIR);
        if aside.exists() {
            return Err(TrainError::Options(format!(
                "{} holds the outputs of a run set aside by an interrupted --overwrite: move them \
                 back into {} or delete them, then run again",
                aside.display(),
                out.display()
            )));
        }
        std::fs::create_dir_all(&aside).map_err(io_err(&aside))?;
        let mut replaced = Replaced {
            aside: aside.clone(),
            moved: Vec::new(),
            committed: AtomicBool::new(false),
        };
        let others = [out.join("metrics.jsonl"), out.join("final")];
        for from in checkpoints.iter().chain(others.iter().filter(|p| p.exists())) {
            let name = from.file_name().unwrap_or_default();
            let to = aside.join(name);
            std::fs::rename(from, &to).map_err(io_err(from))?;
            replaced.moved.push((from.clone(), to));
        }
        Ok(replaced)
    }

    /// The new run has written its first checkpoint: deletes what was moved aside (only that),
    /// and the aside folder once empty. Later calls do nothing.
    pub fn commit(&self) -> Result<()> {
        if self.committed.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        for (_, at) in &self.moved {
            let removed = if at.is_dir() {
                std::fs::remove_dir_all(at)
            } else {
                std::fs::remove_file(at)
            };
            removed.map_err(io_err(at))?;
        }
        let _ = std::fs::remove_dir(&self.aside);
        Ok(())
    }
}

impl Drop for Replaced {
    /// Moves everything back when the new run ended before its first checkpoint.
    fn drop(&mut self) {
        if self.committed.load(Ordering::SeqCst) {
            return;
        }
        for (from, at) in self.moved.iter().rev() {
            if from.exists() {
                let _ = if from.is_dir() {
                    std::fs::remove_dir_all(from)
                } else {
                    std::fs::remove_file(from)
                };
            }
            if let Err(e) = std::fs::rename(at, from) {
                eprintln!(
                    "warning: could not move {} back to {}: {e}",
                    at.display(),
                    from.display()
                );
            }
        }
        let _ = std::fs::remove_dir(&self.aside);
        eprintln!(
            "note: the run ended before its first checkpoint; the earlier run's outputs are back in place"
        );
    }
}
