//! `autograd`: reverse-mode automatic differentiation over `tensor` ops.
//!
//! A [`Var`] wraps a [`tensor::Tensor`]. Ops on vars compute their value with the tensor op and,
//! when any input requires a gradient, record a node holding the op's backward rule.
//! [`Var::backward`] walks the recorded graph in reverse creation order (a topological order:
//! a node is always created after its inputs), frees each node's saved tensors as soon as its
//! rule has run, and accumulates gradients into the leaves. A gradient is added into the running
//! sum's own memory when nothing else holds it, and a `narrow` or an embedding passes only its
//! slice or rows to add (`contribution`); a gradient you hold (from [`Var::grad`]) is never
//! written to. Plain `Tensor` ops build no graph: that is the no-grad path for inference, and it
//! costs nothing.

mod contribution;
mod error;
pub mod gradcheck;
mod ops;
mod recompute;
mod scan_ops;
mod var;

pub use error::{AutogradError, Result};
pub use gradcheck::{check_gradients, GradCheck, ROUNDING_ALLOWANCE};
pub use var::Var;
