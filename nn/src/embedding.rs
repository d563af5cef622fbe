//! `Embedding`: a lookup table of row vectors.

use crate::{ParamStore, Result};
use autograd::Var;
use tensor::Tensor;

/// Rows of a `[vocab, dim]` table picked by token id.
pub struct Embedding {
    weight: Var,
}

impl Embedding {
    /// Takes `{prefix}.weight` `[vocab, dim]`.
    pub fn new(store: &ParamStore, prefix: &str, vocab: usize, dim: usize) -> Result<Self> {
        Ok(Embedding {
            weight: store.take(&format!("{prefix}.weight"), &[vocab, dim])?,
        })
    }

    /// u32 `ids` of any shape -> `ids.shape + [dim]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Var> {
        Ok(self.weight.embedding(ids)?)
    }

    /// The table `[vocab, dim]` (shared with a tied output head).
    pub fn weight(&self) -> &Var {
        &self.weight
    }
}
