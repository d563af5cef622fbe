//! `CausalConv1d`: the depthwise causal convolution of Mamba blocks, weight `[C, 1, K]` as
//! PyTorch's `Conv1d(groups=C, padding=K-1)` stores it.

use crate::{NnError, ParamStore, Result};
use autograd::Var;
use tensor::{DType, Tensor};

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

    /// `silu(forward(x))` as one fused op (Mamba's convolution and activation).
    pub fn forward_silu(&self, x: &Var) -> Result<Var> {
        let w = self.weight.reshape(&[self.channels, self.kernel])?;
        Ok(x.conv1d_causal_depthwise_silu(&w, self.bias.as_ref())?)
    }

    /// The kernel width K.
    pub fn kernel(&self) -> usize {
        self.kernel
    }

    /// The weight as `[C, K]` and the bias, for single-step decoding.
    pub fn params(&self) -> Result<(Tensor, Option<Tensor>)> {
        Ok((
            self.weight.value().reshape(&[self.channels, self.kernel])?,
            self.bias.as_ref().map(|b| b.value().clone()),
        ))
    }

    /// The decoding state before any input: zeros `[batch, C, K-1]`, on the weight's device.
    pub fn empty_state(&self, batch: usize, dtype: DType) -> Result<Tensor> {
        let shape = [batch, self.channels, self.kernel - 1];
        Ok(Tensor::zeros_on(&shape, dtype, self.weight.value().device())?)
    }

    /// The decoding state after the inputs `x [B, C, L]`: their last K-1 steps `[B, C, K-1]`,
    /// zero-padded on the left when L < K-1.
    pub fn state_after(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 3 || x.dim(1) != self.channels {
            return Err(NnError::Input {
                layer: "causal conv1d state".into(),
                detail: format!("needs x [B, {}, L], got {:?}", self.channels, x.shape()),
            });
        }
        let keep = self.kernel - 1;
        let (batch, len) = (x.dim(0), x.dim(2));
        let take = len.min(keep);
        let pad = self.empty_state(batch, x.dtype())?.narrow(2, 0, keep - take)?;
        Ok(Tensor::concat(&[&pad, &x.narrow(2, len - take, take)?], 2)?)
    }

    /// One decoding step: the output `[B, C]` (bias added, no activation) for the input
    /// `x [B, C]` following the inputs held in `state [B, C, K-1]`, and the state after `x`.
    pub fn step(&self, state: &Tensor, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let batch = x.shape().first().copied().unwrap_or(0);
        let expected_state = [batch, self.channels, self.kernel - 1];
        if x.shape() != [batch, self.channels] || state.shape() != expected_state {
            return Err(NnError::Input {
                layer: "causal conv1d step".into(),
                detail: format!(
                    "needs x [B, {c}] and state [B, {c}, {k}], got x {:?} and state {:?}",
                    x.shape(),
                    state.shape(),
                    c = self.channels,
                    k = self.kernel - 1,
                ),
            });
        }
        let (weight, bias) = self.params()?;
        Ok(state.conv1d_step(x, &weight, bias.as_ref())?)
    }
}
