//! Causal depthwise 1-D convolution (the short convolution of Mamba blocks).

use crate::{Result, Tensor};

impl Tensor {
    /// `self` = x `[B, C, L]`, `weight` `[C, K]`, optional `bias` `[C]`:
    /// `y[b,c,t] = bias[c] + Σ_k weight[c,k] · x[b,c,t-(K-1)+k]`, zero before the sequence start.
    pub fn conv1d_causal_depthwise(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        todo!("{weight:?} {bias:?}")
    }

    /// Backward with `self` = x: returns (dx, dweight, dbias).
    pub fn conv1d_causal_depthwise_backward(
        &self,
        weight: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        todo!("{weight:?} {grad:?}")
    }
}
