//! The error type of layers, parameter stores and checkpoint loading.

use std::path::PathBuf;

/// What went wrong while building, loading or running a layer; each variant names the key,
/// file or shape at fault.
#[derive(Debug, thiserror::Error)]
pub enum NnError {
    /// A tensor op failed.
    #[error(transparent)]
    Tensor(#[from] tensor::TensorError),
    /// Differentiation failed.
    #[error(transparent)]
    Autograd(#[from] autograd::AutogradError),
    /// A parameter the model needs is not in the checkpoint.
    #[error("missing parameter '{key}' (expected shape {shape:?}) in {source_name}")]
    MissingKey {
        /// The Hugging Face name.
        key: String,
        /// The shape the model expects.
        shape: Vec<usize>,
        /// Where the parameters came from.
        source_name: String,
    },
    /// The checkpoint holds parameters the model does not use.
    #[error("unexpected parameter(s) in {source_name}: {}", keys.join(", "))]
    UnexpectedKeys {
        /// The unused names.
        keys: Vec<String>,
        /// Where the parameters came from.
        source_name: String,
    },
    /// A parameter has the wrong shape.
    #[error("parameter '{key}' in {source_name} has shape {found:?}, the model expects {expected:?}")]
    ShapeMismatch {
        /// The Hugging Face name.
        key: String,
        /// The shape the model expects.
        expected: Vec<usize>,
        /// The shape in the checkpoint.
        found: Vec<usize>,
        /// Where the parameters came from.
        source_name: String,
    },
    /// A `config.json` is unreadable, malformed or describes something unsupported.
    #[error("{path}: {detail}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Reading a file or directory failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A layer got an input it cannot take.
    #[error("{layer}: {detail}")]
    Input {
        /// The layer.
        layer: String,
        /// What is wrong with the input.
        detail: String,
    },
}

/// Result alias for nn operations.
pub type Result<T> = std::result::Result<T, NnError>;
