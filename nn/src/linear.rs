//! `Linear`: y = x Wᵀ + b, with weight `[out, in]` as PyTorch stores it.

use crate::{ParamStore, Result};
use autograd::Var;
use tensor::Tensor;

/// A fully connected layer.
pub struct Linear {
    weight: Var,
    bias: Option<Var>,
}

impl Linear {
    /// Takes `{prefix}.weight` `[out, in]` and, when `bias`, `{prefix}.bias` `[out]`.
    pub fn new(store: &ParamStore, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Linear {
            weight: store.take(&format!("{prefix}.weight"), &[out_dim, in_dim])?,
            bias: bias
                .then(|| store.take(&format!("{prefix}.bias"), &[out_dim]))
                .transpose()?,
        })
    }

    /// `x [..., in] -> [..., out]`.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        let y = x.matmul(&self.weight.transpose(0, 1)?)?;
        Ok(match &self.bias {
            Some(b) => y.add(b)?,
            None => y,
        })
    }

    /// [`Linear::forward`] on a plain tensor (no graph), for inference.
    pub fn forward_tensor(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.weight.value().transpose(0, 1)?)?;
        Ok(match &self.bias {
            Some(b) => y.add(b.value())?,
            None => y,
        })
    }

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Var {
        &self.weight
    }
}
