//! Softmax and log-softmax along an axis, with their backward kernels.

use crate::{Result, Tensor};

impl Tensor {
    /// Softmax along `axis` (max-subtracted, f32/f64 accumulation).
    pub fn softmax(&self, axis: usize) -> Result<Tensor> {
        todo!("{axis}")
    }

    /// Log-softmax along `axis`.
    pub fn log_softmax(&self, axis: usize) -> Result<Tensor> {
        todo!("{axis}")
    }

    /// Backward of softmax with `self` = its output y: `y · (g - Σ g·y)`.
    pub fn softmax_backward(&self, grad: &Tensor, axis: usize) -> Result<Tensor> {
        todo!("{grad:?} {axis}")
    }

    /// Backward of log-softmax with `self` = its output y: `g - exp(y) · Σ g`.
    pub fn log_softmax_backward(&self, grad: &Tensor, axis: usize) -> Result<Tensor> {
        todo!("{grad:?} {axis}")
    }
}
