//! Multi-head attention (self or cross) built from tensor ops, with an optional mask.

use crate::{Linear, ParamStore, Result};
use autograd::Var;
use tensor::{DType, Tensor};

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

/// A u32 mask `[t, t]` that lets query i see keys 0..=i.
pub fn causal_mask(t: usize) -> Result<Tensor> {
    let rows = Tensor::arange(t, DType::U32).reshape(&[t, 1])?;
    let cols = Tensor::arange(t, DType::U32).reshape(&[1, t])?;
    Ok(cols.le(&rows)?)
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
    /// self-attention). `mask` (u32, broadcastable to `[B, heads, Tq, Tk]`) marks allowed
    /// pairs; a mask on another device is copied to the queries' one.
    pub fn forward(&self, x: &Var, kv: &Var, mask: Option<&Tensor>) -> Result<Var> {
        let (b, tq) = (x.value().dim(0), x.value().dim(1));
        let q = self.split_heads(&self.q.forward(x)?)?;
        let k = self.split_heads(&self.k.forward(kv)?)?;
        let v = self.split_heads(&self.v.forward(kv)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut scores = q.matmul(&k.transpose(2, 3)?)?.affine(scale, 0.0)?;
        if let Some(mask) = mask {
            let (dtype, device) = (scores.value().dtype(), scores.value().device());
            let blocked = Var::constant(Tensor::full_on(&[], f64::NEG_INFINITY, dtype, device)?);
            scores = Var::where_(&mask.to_device(device)?, &scores, &blocked)?;
        }
        let ctx = scores.softmax(3)?.matmul(&v)?.permute(&[0, 2, 1, 3])?;
        self.out
            .forward(&ctx.reshape(&[b, tq, self.heads * self.head_dim])?)
    }
}
