//! `Mlp`: Linear → GELU → Linear.

use crate::{Linear, ParamStore, Result};
use autograd::Var;

/// Which GELU an MLP uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gelu {
    /// The exact erf form (`gelu`).
    Erf,
    /// The tanh approximation (`gelu_pytorch_tanh`, `gelu_new`).
    Tanh,
}

impl Gelu {
    /// Parses a Hugging Face `hidden_act` name.
    pub fn from_hf(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(Gelu::Erf),
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Some(Gelu::Tanh),
            _ => None,
        }
    }

    /// Applies the activation.
    pub fn apply(self, x: &Var) -> Result<Var> {
        Ok(match self {
            Gelu::Erf => x.gelu_erf()?,
            Gelu::Tanh => x.gelu_tanh()?,
        })
    }
}

/// Two linear layers with a GELU between (`{prefix}.fc1`, `{prefix}.fc2`).
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
    act: Gelu,
}

impl Mlp {
    /// Takes `{prefix}.{fc1,fc2}.{weight,bias}`.
    pub fn new(store: &ParamStore, prefix: &str, dim: usize, hidden: usize, act: Gelu) -> Result<Self> {
        Ok(Mlp {
            fc1: Linear::new(store, &format!("{prefix}.fc1"), dim, hidden, true)?,
            fc2: Linear::new(store, &format!("{prefix}.fc2"), hidden, dim, true)?,
            act,
        })
    }

    /// `[..., dim] -> [..., dim]`.
    pub fn forward(&self, x: &Var) -> Result<Var> {
        self.fc2.forward(&self.act.apply(&self.fc1.forward(x)?)?)
    }
}
