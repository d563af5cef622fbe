//! RMSNorm and LayerNorm over the last axis, with fused backward kernels.

use crate::{Result, Tensor};

impl Tensor {
    /// `x / sqrt(mean(x²) + eps) · weight` over the last axis; `weight` is `[D]`.
    pub fn rms_norm(&self, weight: &Tensor, eps: f64) -> Result<Tensor> {
        todo!("{weight:?} {eps}")
    }

    /// Backward of `rms_norm` with `self` = x: returns (dx, dweight).
    pub fn rms_norm_backward(&self, weight: &Tensor, grad: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        todo!("{weight:?} {grad:?} {eps}")
    }

    /// `(x - mean) / sqrt(var + eps) · weight + bias` over the last axis (biased variance).
    pub fn layer_norm(&self, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        todo!("{weight:?} {bias:?} {eps}")
    }

    /// Backward of `layer_norm` with `self` = x: returns (dx, dweight, dbias).
    pub fn layer_norm_backward(
        &self,
        weight: &Tensor,
        grad: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        todo!("{weight:?} {grad:?} {eps}")
    }
}
