//! `CausalConv1d`: the depthwise causal convolution of Mamba blocks, weight `[C, 1, K]` as
//! PyTorch's `Conv1d(groups=C, padding=K-1)` stores it.

use crate::{ParamStore, Result};
use autograd::Var;

/// Depthwise causal conv over `[B, C, L]`.
pub struct CausalConv1d {
    weight: Var,
    bias: Option<Var>,
    channels: usize,
    kernel: usize,
}

impl CausalConv1d {
    /// Takes `{prefix}.weight` `[channels, 1, kernel]` and optionally `{prefix}.bias` `[channels]`.
    pub fn new(store: &ParamStore, prefix: &str, channels: usize, kernel: usize, bias: bool) -> Result<Self> {
        Ok(CausalConv1d {
            weight: store.take(&format!("{prefix}.weight"), &[channels, 1, kernel])?,
            bias: bias
                .then(|| store.take(&format!("{prefix}.bias"), &[channels]))
                .transpose()?,
            channels,
            kernel,
        })
    }

    /// `x [B, C, L] -> [B, C, L]`: output t sees inputs t-K+1..=t.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        let w = self.weight.reshape(&[self.channels, self.kernel])?;
        Ok(x.conv1d_causal_depthwise(&w, self.bias.as_ref())?)
    }

    /// The kernel width K.
    pub fn kernel(&self) -> usize {
        self.kernel
    }

    /// The weight as `[C, K]` and the bias, for single-step decoding.
    pub fn params(&self) -> Result<(tensor::Tensor, Option<tensor::Tensor>)> {
        Ok((
            self.weight.value().reshape(&[self.channels, self.kernel])?,
            self.bias.as_ref().map(|b| b.value().clone()),
        ))
    }
}
