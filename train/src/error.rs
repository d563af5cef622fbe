//! The trainer's error type: each variant names the file, record, step or rank at fault.

use crate::data::DataError;
use std::path::PathBuf;

/// What stopped training or evaluation.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A data set problem.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Tokenizing, prompting, image preprocessing or a model file failed.
    #[error(transparent)]
    Emma(#[from] emma::error::EmmaError),
    /// The model failed.
    #[error(transparent)]
    Nn(#[from] nn::NnError),
    /// A tensor op failed.
    #[error(transparent)]
    Tensor(#[from] tensor::TensorError),
    /// Differentiation failed.
    #[error(transparent)]
    Autograd(#[from] autograd::AutogradError),
    /// The loss or the gradient became NaN or infinite.
    #[error(
        "non-finite training at step {step}: loss {loss}, gradient norm {grad_norm}; {}",
        match checkpoint {
            Some(p) => format!("the last good checkpoint is {}", p.display()),
            None => "no checkpoint was written before it".to_owned(),
        }
    )]
    NonFinite {
        /// The optimizer step (from 1) whose loss was not finite.
        step: u64,
        /// The loss of that step.
        loss: f64,
        /// The global gradient norm of that step.
        grad_norm: f64,
        /// The newest checkpoint, which holds the weights before it.
        checkpoint: Option<PathBuf>,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A line of a run's `metrics.jsonl` is malformed.
    #[error("{}:{line}: {detail}", path.display())]
    Metrics {
        /// The metrics file.
        path: PathBuf,
        /// The line (from 1).
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// A checkpoint is malformed or does not fit this run.
    #[error("checkpoint {}: {detail}", path.display())]
    Checkpoint {
        /// The checkpoint directory or file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The requested device cannot be used.
    #[error("device: {0}")]
    Device(String),
    /// The options cannot work together.
    #[error("invalid options: {0}")]
    Options(String),
    /// The other ranks could not be reached, left the run or stopped answering.
    #[error(transparent)]
    Ranks(#[from] crate::rendezvous::RendezvousError),
    /// Another rank failed (its own error is reported by that rank).
    #[error("rank {0} failed; stopping every rank")]
    PeerFailed(usize),
}

/// Result alias of the trainer.
pub type Result<T> = std::result::Result<T, TrainError>;

/// A [`TrainError::Io`] for `path`, to pass to `map_err`.
pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> TrainError {
    let path = path.into();
    move |source| TrainError::Io { path, source }
}
