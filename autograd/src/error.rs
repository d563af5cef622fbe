//! The error type of autograd operations.

use tensor::TensorError;

/// What went wrong while building or differentiating a graph.
#[derive(Debug, thiserror::Error)]
pub enum AutogradError {
    /// A tensor op failed (shape, dtype, range...).
    #[error(transparent)]
    Tensor(#[from] TensorError),
    /// `backward` was called on a var with more than one element.
    #[error("backward needs a scalar (one element), got shape {0:?}")]
    NotScalar(Vec<usize>),
    /// `backward` was called on a var that does not depend on any var requiring a gradient.
    #[error("backward on a var that requires no gradient")]
    NoGradient,
    /// The graph's saved tensors were already freed by an earlier `backward`.
    #[error("backward through a graph a second time: its saved tensors were freed by the first")]
    GraphConsumed,
}

/// Result alias for autograd operations.
pub type Result<T> = std::result::Result<T, AutogradError>;
