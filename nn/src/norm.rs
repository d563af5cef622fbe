//! Normalisation layers over the last axis: RMSNorm, LayerNorm and Mamba-2's gated RMSNorm.

use crate::{ParamStore, Result};
use autograd::Var;
use tensor::Tensor;

/// `x / rms(x) · w`.
pub struct RmsNorm {
    weight: Var,
    eps: f64,
}

impl RmsNorm {
    /// Takes `{prefix}.weight` `[dim]`.
    pub fn new(store: &ParamStore, prefix: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: store.take(&format!("{prefix}.weight"), &[dim])?,
            eps,
        })
    }

    /// Normalises over the last axis.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        Ok(x.rms_norm(&self.weight, self.eps)?)
    }

    /// [`RmsNorm::forward`] on a plain tensor (no graph), for inference.
    pub fn forward_tensor(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.rms_norm(self.weight.value(), self.eps)?)
    }

    /// The residual stream `x + residual` and its normalisation, `(normed, sum)`, on plain
    /// tensors (one fused kernel on a GPU), for inference.
    pub fn add_forward_tensor(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(x.add_rms_norm(residual, self.weight.value(), self.eps)?)
    }
}

/// `(x - mean) / std · w + b`.
pub struct LayerNorm {
    weight: Var,
    bias: Option<Var>,
    eps: f64,
}

impl LayerNorm {
    /// Takes `{prefix}.weight` and, when `bias`, `{prefix}.bias`, both `[dim]`.
    pub fn new(store: &ParamStore, prefix: &str, dim: usize, eps: f64, bias: bool) -> Result<Self> {
        Ok(LayerNorm {
            weight: store.take(&format!("{prefix}.weight"), &[dim])?,
            bias: bias
                .then(|| store.take(&format!("{prefix}.bias"), &[dim]))
                .transpose()?,
            eps,
        })
    }

    /// Normalises over the last axis.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        Ok(x.layer_norm(&self.weight, self.bias.as_ref(), self.eps)?)
    }
}

/// Mamba-2's gated RMSNorm: `rms_norm_per_group(x · silu(z)) · w`, the RMS taken over each
/// group of `group_size` channels.
pub struct GatedRmsNorm {
    weight: Var,
    eps: f64,
    group_size: usize,
}

impl GatedRmsNorm {
    /// Takes `{prefix}.weight` `[dim]`; `dim` must be a multiple of `group_size`.
    pub fn new(store: &ParamStore, prefix: &str, dim: usize, group_size: usize, eps: f64) -> Result<Self> {
        if group_size == 0 || !dim.is_multiple_of(group_size) {
            return Err(crate::NnError::Input {
                layer: prefix.to_string(),
                detail: format!("gated norm width {dim} is not a multiple of group size {group_size}"),
            });
        }
        Ok(GatedRmsNorm {
            weight: store.take(&format!("{prefix}.weight"), &[dim])?,
            eps,
            group_size,
        })
    }

    /// `x`, `z`: `[..., dim]`.
    pub fn forward(&self, x: &Var, z: &Var) -> Result<Var> {
        Ok(x.gated_rms_norm(z, &self.weight, self.group_size, self.eps)?)
    }

    /// [`GatedRmsNorm::forward`] on plain tensors (no graph), for inference.
    pub fn forward_tensor(&self, x: &Tensor, z: &Tensor) -> Result<Tensor> {
        Ok(x.gated_rms_norm(z, self.weight.value(), self.group_size, self.eps)?)
    }
}
