//! The differentiable ops: each computes its value with the tensor op and records its backward rule.

use crate::contribution::Contribution;
use crate::{Result, Var};
use tensor::{AttentionSpec, BinaryOp, DType, Tensor, UnaryOp};

/// The gradient of a broadcast operand: `grad` summed back down to `shape`.
fn unbroadcast(grad: &Tensor, shape: &[usize]) -> tensor::Result<Tensor> {
    if grad.shape() == shape {
        return Ok(grad.clone());
    }
    grad.sum_to_shape(shape)
}

/// d(loss)/d(b) of `a.matmul(b)` given `g` = d(loss)/d(a·b). A matrix `b` shared by a batch
/// of `a`s (a weight) gets one product over all their rows, with no batch sum after it; when `b`
/// is a transposed view (a weight `[out, in]` used as `[in, out]`), the product is taken in the
/// other order, so the gradient comes out in the weight's own memory order and needs no
/// transposing copy when it is accumulated.
fn rhs_gradient(a: &Tensor, b: &Tensor, g: &Tensor) -> tensor::Result<Tensor> {
    if b.rank() != 2 || a.rank() < 2 {
        return unbroadcast(&a.t()?.matmul(g)?, b.shape());
    }
    let rows = |t: &Tensor| match t.rank() {
        2 => Ok(t.clone()),
        r => t.reshape(&[t.numel() / t.dim(r - 1), t.dim(r - 1)]),
    };
    let (a, g) = (rows(a)?, rows(g)?);
    if b.t()?.is_contiguous() && !b.is_contiguous() {
        g.t()?.matmul(&a)?.t()
    } else {
        a.t()?.matmul(&g)
    }
}

/// `grad` of a reduction over `axes`, spread back over the input's `shape`.
fn spread(grad: &Tensor, shape: &[usize], axes: &[usize], keepdim: bool) -> tensor::Result<Tensor> {
    let mut g = grad.clone();
    if !keepdim {
        let mut sorted = axes.to_vec();
        sorted.sort_unstable();
        for &a in &sorted {
            g = g.unsqueeze(a)?;
        }
    }
    g.broadcast_to(shape)
}

/// A scalar zero of `g`'s dtype on `g`'s device (the "else" of a masked gradient).
fn zero_for(g: &Tensor) -> tensor::Result<Tensor> {
    Tensor::zeros_on(&[], g.dtype(), g.device())
}

impl Var {
    /// Applies an elementwise function.
    pub fn unary(&self, op: UnaryOp) -> Result<Var> {
        let x = self.value().clone();
        let y = x.unary(op)?;
        Ok(Var::record(y, &[self], move |g, _| {
            Ok(vec![Some(x.unary_backward(op, g)?)])
        }))
    }

    /// A broadcasting binary op.
    pub fn binary(&self, op: BinaryOp, rhs: &Var) -> Result<Var> {
        let (a, b) = (self.value().clone(), rhs.value().clone());
        let y = a.binary(op, &b)?;
        Ok(Var::record(y, &[self, rhs], move |g, needs| {
            let (ga, gb) = match op {
                BinaryOp::Add => (g.clone(), g.clone()),
                BinaryOp::Sub => (g.clone(), g.neg()?),
                BinaryOp::Mul => (g.mul(&b)?, g.mul(&a)?),
                BinaryOp::Div => {
                    let ga = g.div(&b)?;
                    let gb = if needs[1] {
                        ga.mul(&a)?.div(&b)?.neg()?
                    } else {
                        ga.clone()
                    };
                    (ga, gb)
                }
                BinaryOp::Maximum | BinaryOp::Minimum => {
                    // The gradient goes to `a` where it was picked (ties go to `a`).
                    let pick_a = if op == BinaryOp::Maximum {
                        a.ge(&b)?
                    } else {
                        a.le(&b)?
                    };
                    let zero = zero_for(g)?;
                    (pick_a.where_(g, &zero)?, pick_a.where_(&zero, g)?)
                }
            };
            Ok(vec![
                needs[0].then(|| unbroadcast(&ga, a.shape())).transpose()?,
                needs[1].then(|| unbroadcast(&gb, b.shape())).transpose()?,
            ])
        }))
    }

    /// `on_true` where the u32 mask `cond` is non-zero, else `on_false` (all broadcast).
    pub fn where_(cond: &Tensor, on_true: &Var, on_false: &Var) -> Result<Var> {
        let y = cond.where_(on_true.value(), on_false.value())?;
        let cond = cond.clone();
        let (st, sf) = (
            on_true.value().shape().to_vec(),
            on_false.value().shape().to_vec(),
        );
        Ok(Var::record(y, &[on_true, on_false], move |g, needs| {
            let zero = zero_for(g)?;
            Ok(vec![
                needs[0]
                    .then(|| unbroadcast(&cond.where_(g, &zero)?, &st))
                    .transpose()?,
                needs[1]
                    .then(|| unbroadcast(&cond.where_(&zero, g)?, &sf))
                    .transpose()?,
            ])
        }))
    }

    /// Batched matrix product (batch axes broadcast).
    pub fn matmul(&self, rhs: &Var) -> Result<Var> {
        let (a, b) = (self.value().clone(), rhs.value().clone());
        let y = a.matmul(&b)?;
        Ok(Var::record(y, &[self, rhs], move |g, needs| {
            let ga = needs[0]
                .then(|| unbroadcast(&g.matmul(&b.t()?)?, a.shape()))
                .transpose()?;
            let gb = needs[1].then(|| rhs_gradient(&a, &b, g)).transpose()?;
            Ok(vec![ga, gb])
        }))
    }

    /// Sum over `axes`.
    pub fn sum(&self, axes: &[usize], keepdim: bool) -> Result<Var> {
        let y = self.value().sum(axes, keepdim)?;
        let (shape, axes) = (self.value().shape().to_vec(), axes.to_vec());
        Ok(Var::record(y, &[self], move |g, _| {
            Ok(vec![Some(spread(g, &shape, &axes, keepdim)?)])
        }))
    }

    /// Sum of every element (rank 0).
    pub fn sum_all(&self) -> Result<Var> {
        let axes: Vec<usize> = (0..self.value().rank()).collect();
        self.sum(&axes, false)
    }

    /// Mean over `axes`.
    pub fn mean(&self, axes: &[usize], keepdim: bool) -> Result<Var> {
        let y = self.value().mean(axes, keepdim)?;
        let (shape, axes) = (self.value().shape().to_vec(), axes.to_vec());
        let count: usize = axes.iter().map(|&a| shape[a]).product();
        Ok(Var::record(y, &[self], move |g, _| {
            let g = g.affine(1.0 / count as f64, 0.0)?;
            Ok(vec![Some(spread(&g, &shape, &axes, keepdim)?)])
        }))
    }

    /// Maximum over one axis; the gradient goes to the first maximum.
    pub fn max(&self, axis: usize, keepdim: bool) -> Result<Var> {
        self.extremum(axis, keepdim, true)
    }

    /// Minimum over one axis; the gradient goes to the first minimum.
    pub fn min(&self, axis: usize, keepdim: bool) -> Result<Var> {
        self.extremum(axis, keepdim, false)
    }

    fn extremum(&self, axis: usize, keepdim: bool, is_max: bool) -> Result<Var> {
        let x = self.value().clone();
        let (y, at) = if is_max {
            (x.max(axis, keepdim)?, x.argmax(axis, true)?)
        } else {
            (x.min(axis, keepdim)?, x.neg()?.argmax(axis, true)?)
        };
        Ok(Var::record(y, &[self], move |g, _| {
            // One-hot of the picked position along `axis`, broadcast against the input.
            let mut pos_shape = vec![1; x.rank()];
            pos_shape[axis] = x.dim(axis);
            let positions = Tensor::arange(x.dim(axis), DType::U32)
                .to_device(x.device())?
                .reshape(&pos_shape)?;
            let picked = positions.eq(&at)?;
            let g = spread(g, x.shape(), &[axis], keepdim)?;
            Ok(vec![Some(picked.where_(&g, &zero_for(&g)?)?)])
        }))
    }

    /// Softmax along `axis`.
    pub fn softmax(&self, axis: usize) -> Result<Var> {
        let y = self.value().softmax(axis)?;
        let saved = y.clone();
        Ok(Var::record(y, &[self], move |g, _| {
            Ok(vec![Some(saved.softmax_backward(g, axis)?)])
        }))
    }

    /// Log-softmax along `axis`.
    pub fn log_softmax(&self, axis: usize) -> Result<Var> {
        let y = self.value().log_softmax(axis)?;
        let saved = y.clone();
        Ok(Var::record(y, &[self], move |g, _| {
            Ok(vec![Some(saved.log_softmax_backward(g, axis)?)])
        }))
    }

    /// Mean cross-entropy of logits `[N, C]` against u32 `targets` `[N]`, skipping `ignore_index`.
    pub fn cross_entropy(&self, targets: &Tensor, ignore_index: u32) -> Result<Var> {
        let logits = self.value().clone();
        let y = logits.cross_entropy(targets, ignore_index)?;
        let targets = targets.clone();
        Ok(Var::record(y, &[self], move |g, _| {
            Ok(vec![Some(logits.cross_entropy_backward(
                &targets,
                ignore_index,
                g,
            )?)])
        }))
    }

    /// RMSNorm over the last axis.
    pub fn rms_norm(&self, weight: &Var, eps: f64) -> Result<Var> {
        let (x, w) = (self.value().clone(), weight.value().clone());
        let y = x.rms_norm(&w, eps)?;
        Ok(Var::record(y, &[self, weight], move |g, _| {
            let (dx, dw) = x.rms_norm_backward(&w, g, eps)?;
            Ok(vec![Some(dx), Some(dw)])
        }))
    }

    /// LayerNorm over the last axis, with an optional bias.
    pub fn layer_norm(&self, weight: &Var, bias: Option<&Var>, eps: f64) -> Result<Var> {
        let (x, w) = (self.value().clone(), weight.value().clone());
        let y = x.layer_norm(&w, bias.map(Var::value), eps)?;
        let mut inputs = vec![self, weight];
        inputs.extend(bias);
        Ok(Var::record(y, &inputs, move |g, needs| {
            let (dx, dw, db) = x.layer_norm_backward(&w, g, eps)?;
            let mut grads = vec![Some(dx), Some(dw)];
            if needs.len() == 3 {
                grads.push(Some(db));
            }
            Ok(grads)
        }))
    }

    /// Mamba-2's gated RMSNorm of this `[..., D]` with gate `z` (same shape) and `weight` `[D]`,
    /// normalised over runs of `group` features (see `Tensor::gated_rms_norm`).
    pub fn gated_rms_norm(&self, z: &Var, weight: &Var, group: usize, eps: f64) -> Result<Var> {
        let (x, zv, w) = (self.value().clone(), z.value().clone(), weight.value().clone());
        let y = x.gated_rms_norm(&zv, &w, group, eps)?;
        Ok(Var::record(y, &[self, z, weight], move |g, _| {
            let (dx, dz, dw) = x.gated_rms_norm_backward(&zv, &w, g, group, eps)?;
            Ok(vec![Some(dx), Some(dz), Some(dw)])
        }))
    }

    /// Fused attention of queries `self` `[B, H, Tq, D]` over keys `k` and values `v`
    /// `[B, Hk, Tk, D]` ([`Tensor::attention`]); the backward pass recomputes the
    /// probabilities from the saved log-sum-exp instead of keeping the score matrix.
    pub fn attention(
        &self,
        k: &Var,
        v: &Var,
        spec: &AttentionSpec,
        key_padding: Option<&Tensor>,
    ) -> Result<Var> {
        let (q, kt, vt) = (self.value().clone(), k.value().clone(), v.value().clone());
        let (out, lse) = q.attention(&kt, &vt, spec, key_padding)?;
        let (saved, spec, keep) = (out.clone(), *spec, key_padding.cloned());
        Ok(Var::record(out, &[self, k, v], move |g, _| {
            let (dq, dk, dv) = q.attention_backward(&kt, &vt, &saved, &lse, g, &spec, keep.as_ref())?;
            Ok(vec![Some(dq), Some(dk), Some(dv)])
        }))
    }

    /// Rows of this `[V, D]` table picked by u32 `ids`.
    pub fn embedding(&self, ids: &Tensor) -> Result<Var> {
        let y = self.value().embedding(ids)?;
        let (ids, width) = (ids.clone(), self.value().dim(1));
        Ok(Var::record_contributions(y, &[self], move |g, _| {
            let flat_ids = ids.reshape(&[ids.numel()])?;
            let g = g.reshape(&[ids.numel(), width])?;
            Ok(vec![Some(Contribution::Scatter {
                axis: 0,
                ids: flat_ids,
                grad: g,
            })])
        }))
    }

    /// Entries `ids` (u32, 1-D) along `axis`.
    pub fn index_select(&self, axis: usize, ids: &Tensor) -> Result<Var> {
        let x = self.value().clone();
        let y = x.index_select(axis, ids)?;
        let ids = ids.clone();
        Ok(Var::record_contributions(y, &[self], move |g, _| {
            Ok(vec![Some(Contribution::Scatter {
                axis,
                ids,
                grad: g.clone(),
            })])
        }))
    }

    /// Joins vars along an existing axis.
    pub fn concat(vars: &[&Var], axis: usize) -> Result<Var> {
        let values: Vec<&Tensor> = vars.iter().map(|v| v.value()).collect();
        let y = Tensor::concat(&values, axis)?;
        let sizes: Vec<usize> = values.iter().map(|t| t.dim(axis)).collect();
        Ok(Var::record(y, vars, move |g, needs| {
            let mut start = 0;
            let mut grads = Vec::with_capacity(sizes.len());
            for (&len, &need) in sizes.iter().zip(needs) {
                grads.push(need.then(|| g.narrow(axis, start, len)).transpose()?);
                start += len;
            }
            Ok(grads)
        }))
    }

    /// Joins equally shaped vars along a new axis.
    pub fn stack(vars: &[&Var], axis: usize) -> Result<Var> {
        let values: Vec<&Tensor> = vars.iter().map(|v| v.value()).collect();
        let y = Tensor::stack(&values, axis)?;
        Ok(Var::record(y, vars, move |g, needs| {
            needs
                .iter()
                .enumerate()
                .map(|(i, &need)| need.then(|| g.narrow(axis, i, 1)?.squeeze(axis)).transpose())
                .collect()
        }))
    }

    /// Causal depthwise conv1d: x `[B, C, L]`, weight `[C, K]`, optional bias `[C]`.
    pub fn conv1d_causal_depthwise(&self, weight: &Var, bias: Option<&Var>) -> Result<Var> {
        self.conv1d(weight, bias, false)
    }

    /// `silu(conv1d_causal_depthwise(x))` as one op: the backward recomputes the pre-activation
    /// from x instead of keeping it.
    pub fn conv1d_causal_depthwise_silu(&self, weight: &Var, bias: Option<&Var>) -> Result<Var> {
        self.conv1d(weight, bias, true)
    }

    /// The two convolutions above, followed by SiLU when `silu`.
    fn conv1d(&self, weight: &Var, bias: Option<&Var>, silu: bool) -> Result<Var> {
        let (x, w) = (self.value().clone(), weight.value().clone());
        let b = bias.map(|b| b.value().clone());
        let y = if silu {
            x.conv1d_causal_depthwise_silu(&w, b.as_ref())?
        } else {
            x.conv1d_causal_depthwise(&w, b.as_ref())?
        };
        let mut inputs = vec![self, weight];
        inputs.extend(bias);
        Ok(Var::record(y, &inputs, move |g, needs| {
            let (dx, dw, db) = if silu {
                x.conv1d_causal_depthwise_silu_backward(&w, b.as_ref(), g)?
            } else {
                x.conv1d_causal_depthwise_backward(&w, g)?
            };
            let mut grads = vec![Some(dx), Some(dw)];
            if needs.len() == 3 {
                grads.push(Some(db));
            }
            Ok(grads)
        }))
    }

    /// Converts to another float dtype; the gradient is converted back.
    pub fn to_dtype(&self, dtype: DType) -> Result<Var> {
        let src = self.value().dtype();
        let y = self.value().to_dtype(dtype)?;
        Ok(Var::record(y, &[self], move |g, _| {
            Ok(vec![Some(g.to_dtype(src)?)])
        }))
    }

    /// The same elements in a new shape.
    pub fn reshape(&self, shape: &[usize]) -> Result<Var> {
        let y = self.value().reshape(shape)?;
        let src = self.value().shape().to_vec();
        Ok(Var::record(y, &[self], move |g, _| {
            Ok(vec![Some(g.reshape(&src)?)])
        }))
    }

    /// Reorders the axes.
    pub fn permute(&self, perm: &[usize]) -> Result<Var> {
        let y = self.value().permute(perm)?;
        let mut inverse = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        Ok(Var::record(y, &[self], move |g, _| {
            Ok(vec![Some(g.permute(&inverse)?)])
        }))
    }

    /// Swaps two axes.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Var> {
        let y = self.value().transpose(a, b)?;
        Ok(Var::record(y, &[self], move |g, _| {
            Ok(vec![Some(g.transpose(a, b)?)])
        }))
    }

    /// Elements `start..start+len` of `axis`; the gradient is zero outside that range.
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Result<Var> {
        let x = self.value();
        let y = x.narrow(axis, start, len)?;
        Ok(Var::record_contributions(y, &[self], move |g, _| {
            Ok(vec![Some(Contribution::Slice {
                axis,
                start,
                grad: g.clone(),
            })])
        }))
    }

    /// Broadcasts to `shape` (numpy rules).
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Var> {
        let y = self.value().broadcast_to(shape)?;
        let src = self.value().shape().to_vec();
        Ok(Var::record(y, &[self], move |g, _| {
            Ok(vec![Some(unbroadcast(g, &src)?)])
        }))
    }

    /// Inserts an axis of size 1.
    pub fn unsqueeze(&self, axis: usize) -> Result<Var> {
        let y = self.value().unsqueeze(axis)?;
        self.reshape(y.shape())
    }

    /// Removes an axis of size 1.
    pub fn squeeze(&self, axis: usize) -> Result<Var> {
        let y = self.value().squeeze(axis)?;
        self.reshape(y.shape())
    }
}

macro_rules! unary_methods {
    ($($name:ident => $op:ident: $doc:literal),* $(,)?) => {
        impl Var {
            $(
                #[doc = $doc]
                pub fn $name(&self) -> Result<Var> {
                    self.unary(UnaryOp::$op)
                }
            )*
        }
    };
}

unary_methods! {
    neg => Neg: "-x elementwise.",
    exp => Exp: "e^x elementwise.",
    log => Log: "ln x elementwise.",
    sqrt => Sqrt: "√x elementwise.",
    rsqrt => Rsqrt: "1/√x elementwise.",
    tanh => Tanh: "tanh elementwise.",
    sigmoid => Sigmoid: "Logistic sigmoid elementwise.",
    silu => Silu: "x·sigmoid(x) elementwise.",
    gelu_tanh => GeluTanh: "GELU (tanh approximation) elementwise.",
    gelu_erf => GeluErf: "GELU (exact, erf) elementwise.",
    softplus => Softplus: "ln(1+e^x) elementwise.",
    abs => Abs: "|x| elementwise.",
    sqr => Sqr: "x² elementwise.",
    recip => Recip: "1/x elementwise.",
}

impl Var {
    /// x^p elementwise.
    pub fn powf(&self, p: f64) -> Result<Var> {
        self.unary(UnaryOp::Powf(p))
    }

    /// Clamps into `[lo, hi]`.
    pub fn clamp(&self, lo: f64, hi: f64) -> Result<Var> {
        self.unary(UnaryOp::Clamp(lo, hi))
    }

    /// a·x + b elementwise.
    pub fn affine(&self, a: f64, b: f64) -> Result<Var> {
        self.unary(UnaryOp::Affine(a, b))
    }
}

macro_rules! binary_methods {
    ($($name:ident => $op:ident: $doc:literal),* $(,)?) => {
        impl Var {
            $(
                #[doc = $doc]
                pub fn $name(&self, rhs: &Var) -> Result<Var> {
                    self.binary(BinaryOp::$op, rhs)
                }
            )*
        }
    };
}

binary_methods! {
    add => Add: "a + b with broadcasting.",
    sub => Sub: "a - b with broadcasting.",
    mul => Mul: "a · b with broadcasting.",
    div => Div: "a / b with broadcasting.",
    maximum => Maximum: "max(a, b) with broadcasting.",
    minimum => Minimum: "min(a, b) with broadcasting.",
}
