//! Multi-head attention (self or cross) with a mask kind, computed by the fused attention op
//! (`Tensor::attention`: tiled, no score matrix in memory, on the CPU and on CUDA devices).

use crate::{Linear, ParamStore, Result};
use autograd::Var;
use tensor::{AttentionMask, AttentionSpec};

/// The parameter-name prefixes of the four projections (they differ between model families).
pub struct AttentionNames {
    /// Query projection.
    pub q: String,
    /// Key projection.
    pub k: String,
    /// Value projection.
    pub v: String,
    /// Output projection.
    pub out: String,
}

/// Scaled dot-product attention over `heads` heads of `dim / heads` channels.
pub struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Projections `dim -> dim` (with biases when `bias`) named by `names`.
    pub fn new(
        store: &ParamStore,
        names: &AttentionNames,
        dim: usize,
        heads: usize,
        bias: bool,
    ) -> Result<Self> {
        if heads == 0 || !dim.is_multiple_of(heads) {
            return Err(crate::NnError::Input {
                layer: names.q.clone(),
                detail: format!("width {dim} is not divisible into {heads} heads"),
            });
        }
        Ok(Attention {
            q: Linear::new(store, &names.q, dim, dim, bias)?,
            k: Linear::new(store, &names.k, dim, dim, bias)?,
            v: Linear::new(store, &names.v, dim, dim, bias)?,
            out: Linear::new(store, &names.out, dim, dim, bias)?,
            heads,
            head_dim: dim / heads,
        })
    }

    /// `[B, T, dim]` into `[B, heads, T, head_dim]`.
    fn split_heads(&self, x: &Var) -> Result<Var> {
        let s = x.value().shape().to_vec();
        Ok(x.reshape(&[s[0], s[1], self.heads, self.head_dim])?
            .permute(&[0, 2, 1, 3])?)
    }

    /// Queries from `x [B, Tq, dim]`, keys and values from `kv [B, Tk, dim]` (pass `x` for
    /// self-attention); `mask` says which keys each query sees.
    pub fn forward(&self, x: &Var, kv: &Var, mask: AttentionMask) -> Result<Var> {
        let (b, tq) = (x.value().dim(0), x.value().dim(1));
        let q = self.split_heads(&self.q.forward(x)?)?;
        let k = self.split_heads(&self.k.forward(kv)?)?;
        let v = self.split_heads(&self.v.forward(kv)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let ctx = q.attention(&k, &v, &AttentionSpec { scale, mask }, None)?;
        self.out.forward(
            &ctx.permute(&[0, 2, 1, 3])?
                .reshape(&[b, tq, self.heads * self.head_dim])?,
        )
    }
}
