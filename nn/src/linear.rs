//! `Linear`: y = x Wᵀ + b, with weight `[out, in]` as PyTorch stores it.

use crate::{ParamStore, Result};
use autograd::Var;

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

    /// The weight `[out, in]`.
    pub fn weight(&self) -> &Var {
        &self.weight
    }
}
