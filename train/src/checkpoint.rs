//! Training checkpoints: `OUT/checkpoints/step-NNNNNNNN/` holds the model (`config.json`,
//! `model.safetensors`, `tokenizer.json`: a directory `emma generate` can use), each rank's
//! optimizer moments (`optimizer-rankR.safetensors`) and `state.json` (step, data position, the
//! random-number state and the run's options). A checkpoint is written into a hidden
//! `.step-NNNNNNNN.partial` directory, every file atomically, and renamed into place only when
//! complete, so a run killed at any moment leaves only whole checkpoints behind.

use crate::error::{io_err, Result, TrainError};
use serde::{Deserialize, Serialize};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The file of a checkpoint's training state.
pub const STATE_FILE: &str = "state.json";

/// Where training stands, saved with each checkpoint.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Steps the run takes in all.
    pub total_steps: u64,
    /// The data position of the next step: the epoch ...
    pub epoch: u64,
    /// ... and the index of its first example in that epoch's order.
    pub position: u64,
    /// The random-number state: the data order of epoch e is a shuffle seeded by
    /// `(data_seed, e)`; nothing else in training draws random numbers.
    pub data_seed: u64,
    /// The ranks that wrote the checkpoint (a run may resume on another number).
    pub ranks: usize,
    /// The loss of the last step.
    pub loss: f64,
    /// The options of the run, `(name, value)`, that must not change on resuming.
    pub identity: Vec<(String, String)>,
}

/// The directory of the checkpoint after `step` steps.
pub fn step_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step-{step:08}"))
}

/// The partial directory a checkpoint is written into.
pub fn partial_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!(".step-{step:08}.partial"))
}

/// Complete checkpoints under `root`, oldest first, as `(step, dir)`.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut found = Vec::new();
    for entry in std::fs::read_dir(root).map_err(io_err(root))? {
        let path = entry.map_err(io_err(root))?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|s| s.parse::<u64>().ok());
        if let Some(step) = step {
            if path.join(STATE_FILE).is_file() {
                found.push((step, path));
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Reads a checkpoint's state.
pub fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path,
        detail: format!("malformed state: {e}"),
    })
}

/// Writes the state file of a partial checkpoint and moves it into place as `step_dir`; then
/// deletes all but the newest `keep` checkpoints and any partial ones left by a killed run.
pub fn finish(root: &Path, state: &TrainState, keep: usize) -> Result<PathBuf> {
    let partial = partial_dir(root, state.step);
    let json = serde_json::to_string_pretty(state).map_err(|e| TrainError::Checkpoint {
        path: partial.clone(),
        detail: e.to_string(),
    })?;
    tensor::atomic_file::write_atomic(&partial.join(STATE_FILE), |w| w.write_all(json.as_bytes()))
        .map_err(io_err(partial.join(STATE_FILE)))?;
    let done = step_dir(root, state.step);
    if done.exists() {
        std::fs::remove_dir_all(&done).map_err(io_err(&done))?;
    }
    std::fs::rename(&partial, &done).map_err(io_err(&done))?;
    sync_dir(root)?;
    let all = list(root)?;
    for (_, old) in &all[..all.len().saturating_sub(keep.max(1))] {
        std::fs::remove_dir_all(old).map_err(io_err(old))?;
    }
    Ok(done)
}

/// Deletes partial checkpoints (left by a killed run).
pub fn remove_partials(root: &Path) -> Result<()> {
    if !root.exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(root).map_err(io_err(root))? {
        let path = entry.map_err(io_err(root))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with(".step-") && name.ends_with(".partial") {
            std::fs::remove_dir_all(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// Makes a rename inside `dir` durable.
fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}
