//! Fused scaled dot-product attention, forward and backward, without the `[Tq, Tk]` score
//! matrix: keys and values are streamed in tiles with an online softmax (FlashAttention-2's
//! schedule), the per-row log-sum-exp is kept, and the backward pass recomputes the
//! probabilities from it. Memory is O(T·D) per head.
//!
//! Every mask kind lets a query see a prefix of the keys (all of them, up to the causal
//! diagonal, or up to the end of its raster row), so key tiles past that prefix are never
//! touched; an optional key-padding mask per batch row removes single keys. Queries are
//! computed in the compute type (f32 for the 16-bit types, rounded once at the end).

use crate::dispatch::float_dispatch;
use crate::error::shape_err;
use crate::storage::CpuStorage;
use crate::{DType, FloatElement, Real, Result, Tensor, TensorError};
use num_traits::{Float, ToPrimitive, Zero};
use rayon::prelude::*;

/// Keys per tile of the forward pass's online softmax.
const KEY_TILE: usize = 64;

/// Which keys each query may see (before the key-padding mask).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionMask {
    /// Every key.
    Full,
    /// Keys up to the query's position, aligned to the end of the keys: query i of Tq sees key
    /// j when j <= i + Tk - Tq (so that a prefix of Tk - Tq cached keys is seen by all).
    Causal,
    /// Block-causal over a raster of rows `width` positions wide: query i sees key j when j's
    /// row (j / width) is at most i's row (the pixel decoder's mask).
    BlockCausal {
        /// Positions per raster row.
        width: usize,
    },
}

impl AttentionMask {
    /// The number of leading keys query `i` may see: it sees keys `0..end`.
    fn key_end(self, i: usize, tq: usize, tk: usize) -> usize {
        match self {
            AttentionMask::Full => tk,
            AttentionMask::Causal => (i + tk + 1).saturating_sub(tq).min(tk),
            AttentionMask::BlockCausal { width } => ((i / width + 1) * width).min(tk),
        }
    }
}

/// The scale of the scores and the mask of a fused attention call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionSpec {
    /// Multiplies q·k before the softmax (usually 1/√D).
    pub scale: f64,
    /// Which keys each query may see.
    pub mask: AttentionMask,
}

/// The sizes of one call: q `[b, h, tq, d]`, k and v `[b, hk, tk, d]`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    h: usize,
    hk: usize,
    tq: usize,
    tk: usize,
    d: usize,
}

impl Dims {
    /// Query heads per key/value head.
    fn group(&self) -> usize {
        self.h / self.hk
    }
}

/// The dtype of the log-sum-exp: f64 for f64 inputs, f32 otherwise.
fn lse_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Checks the operands of `op` and returns their sizes.
fn check(
    op: &'static str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    spec: &AttentionSpec,
    keep: Option<&Tensor>,
) -> Result<Dims> {
    if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
        return shape_err(
            op,
            format!(
                "q, k and v must be [B, heads, T, D]; got {:?}, {:?}, {:?}",
                q.shape(),
                k.shape(),
                v.shape()
            ),
        );
    }
    let (qs, ks) = (q.shape(), k.shape());
    if k.shape() != v.shape() {
        return shape_err(op, format!("k {:?} and v {:?} differ", k.shape(), v.shape()));
    }
    let dims = Dims {
        b: qs[0],
        h: qs[1],
        hk: ks[1],
        tq: qs[2],
        tk: ks[2],
        d: qs[3],
    };
    if ks[0] != dims.b || ks[3] != dims.d {
        return shape_err(
            op,
            format!("q {qs:?} and k {ks:?} differ in batch or head dimension"),
        );
    }
    if dims.hk == 0 || !dims.h.is_multiple_of(dims.hk) {
        return shape_err(
            op,
            format!("{} key heads do not divide {} query heads", dims.hk, dims.h),
        );
    }
    q.check_same_dtype(op, k)?;
    q.check_same_dtype(op, v)?;
    if !spec.scale.is_finite() {
        return shape_err(op, format!("the scale must be finite, not {}", spec.scale));
    }
    if spec.mask == (AttentionMask::BlockCausal { width: 0 }) {
        return shape_err(op, "a block-causal mask needs rows at least one wide");
    }
    if let Some(keep) = keep {
        if keep.shape() != [dims.b, dims.tk] || keep.dtype() != DType::U32 {
            return shape_err(
                op,
                format!(
                    "the key-padding mask must be u32 [{}, {}], not {} {:?}",
                    dims.b,
                    dims.tk,
                    keep.dtype(),
                    keep.shape()
                ),
            );
        }
    }
    Ok(dims)
}

/// The key-padding mask as one flag per (batch row, key): all true without one.
fn keep_flags(keep: Option<&Tensor>, dims: &Dims) -> Vec<bool> {
    match keep {
        Some(m) => m
            .contiguous()
            .contiguous_slice::<u32>()
            .iter()
            .map(|&v| v != 0)
            .collect(),
        None => vec![true; dims.b * dims.tk],
    }
}

/// Σ a·b with eight partial sums in a fixed order, so that the loop vectorises and the result
/// does not depend on the thread count.
#[inline(always)]
fn dot<A: Real>(a: &[A], b: &[A]) -> A {
    let mut lanes = [A::zero(); 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            lanes[l] += x[l] * y[l];
        }
    }
    let mut tail = A::zero();
    for (&x, &y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail
}

/// `acc += w · x` elementwise.
#[inline(always)]
fn axpy<A: Real>(acc: &mut [A], w: A, x: &[A]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += w * v;
    }
}

/// A tensor's values in the compute type, row-major.
fn widen<T: FloatElement>(t: &Tensor) -> Vec<T::Acc> {
    t.contiguous()
        .contiguous_slice::<T>()
        .iter()
        .map(|v| v.to_acc())
        .collect()
}

/// The forward pass: the output `[B, H, Tq, D]` and the log-sum-exp `[B, H, Tq]` (-inf for a
/// query that sees no key; its output row is zero).
fn forward<T: FloatElement>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dims: Dims,
    spec: &AttentionSpec,
    keep: &[bool],
) -> (Vec<T>, Vec<T::Acc>) {
    let Dims { h, tq, tk, d, .. } = dims;
    let (qw, kw, vw) = (widen::<T>(q), widen::<T>(k), widen::<T>(v));
    let scale = T::Acc::lit(spec.scale);
    let mut out = vec![T::from_acc(T::Acc::zero()); qw.len()];
    let mut lse = vec![T::Acc::zero(); dims.b * h * tq];
    out.par_chunks_mut(d.max(1))
        .zip(lse.par_iter_mut())
        .enumerate()
        .for_each(|(row, (o, l))| {
            let (bh, i) = (row / tq, row % tq);
            let (bi, hi) = (bh / h, bh % h);
            let kv = (bi * dims.hk + hi / dims.group()) * tk * d;
            let qi = &qw[row * d..][..d];
            let keys = &keep[bi * tk..][..tk];
            let end = spec.mask.key_end(i, tq, tk);
            let mut acc = vec![T::Acc::zero(); d];
            let (mut m, mut sum) = (T::Acc::neg_infinity(), T::Acc::zero());
            let mut scores = [T::Acc::zero(); KEY_TILE];
            for j0 in (0..end).step_by(KEY_TILE) {
                let j1 = (j0 + KEY_TILE).min(end);
                let mut tile_max = T::Acc::neg_infinity();
                for j in j0..j1 {
                    let s = if keys[j] {
                        dot(qi, &kw[kv + j * d..][..d]) * scale
                    } else {
                        T::Acc::neg_infinity()
                    };
                    scores[j - j0] = s;
                    tile_max = tile_max.max(s);
                }
                if tile_max == T::Acc::neg_infinity() {
                    continue;
                }
                let m_new = m.max(tile_max);
                let rescale = (m - m_new).exp_fast();
                acc.iter_mut().for_each(|a| *a = *a * rescale);
                sum = sum * rescale;
                for j in j0..j1 {
                    let p = (scores[j - j0] - m_new).exp_fast();
                    if p != T::Acc::zero() {
                        sum += p;
                        axpy(&mut acc, p, &vw[kv + j * d..][..d]);
                    }
                }
                m = m_new;
            }
            if sum > T::Acc::zero() {
                for (ov, &a) in o.iter_mut().zip(&acc) {
                    *ov = T::from_acc(a / sum);
                }
                *l = m + sum.ln();
            } else {
                *l = T::Acc::neg_infinity();
            }
        });
    (out, lse)
}

/// The gradients (dq, dk, dv) in the compute type.
type Grads<A> = (Vec<A>, Vec<A>, Vec<A>);

/// The backward pass given the forward's output, log-sum-exp and dL/d(out): one task per
/// (batch row, key/value head), which owns that head's dk and dv and its query heads' dq.
#[allow(clippy::too_many_arguments)]
fn backward<T: FloatElement>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    grad: &Tensor,
    dims: Dims,
    spec: &AttentionSpec,
    keep: &[bool],
) -> Grads<T::Acc> {
    let Dims { hk, tq, tk, d, .. } = dims;
    let g = dims.group();
    let (qw, kw, vw) = (widen::<T>(q), widen::<T>(k), widen::<T>(v));
    let (ow, gw) = (widen::<T>(out), widen::<T>(grad));
    let lw: Vec<T::Acc> = lse.to_vec_f64().iter().map(|&x| T::Acc::lit(x)).collect();
    let scale = T::Acc::lit(spec.scale);
    let zero = T::Acc::zero();
    let (mut dq, mut dk, mut dv) = (vec![zero; qw.len()], vec![zero; kw.len()], vec![zero; vw.len()]);
    dq.par_chunks_mut((g * tq * d).max(1))
        .zip(dk.par_chunks_mut((tk * d).max(1)))
        .zip(dv.par_chunks_mut((tk * d).max(1)))
        .enumerate()
        .for_each(|(task, ((dq, dk), dv))| {
            let bi = task / hk;
            let kv = task * tk * d;
            let (kh, vh) = (&kw[kv..][..tk * d], &vw[kv..][..tk * d]);
            let keys = &keep[bi * tk..][..tk];
            // The query heads of this key head are consecutive: rows task·g·tq ...
            for local in 0..g * tq {
                let row = task * g * tq + local;
                let i = local % tq;
                let lse_i = lw[row];
                if lse_i == T::Acc::neg_infinity() {
                    continue;
                }
                let (qi, oi, gi) = (&qw[row * d..][..d], &ow[row * d..][..d], &gw[row * d..][..d]);
                // D_i = rowsum(dO ∘ O) = Σ_j P_ij (dO_i · v_j).
                let delta = dot(gi, oi);
                let dqi = &mut dq[local * d..][..d];
                for j in 0..spec.mask.key_end(i, tq, tk) {
                    if !keys[j] {
                        continue;
                    }
                    let (kj, vj) = (&kh[j * d..][..d], &vh[j * d..][..d]);
                    let p = (dot(qi, kj) * scale - lse_i).exp_fast();
                    axpy(&mut dv[j * d..][..d], p, gi);
                    let ds = p * (dot(gi, vj) - delta) * scale;
                    axpy(dqi, ds, kj);
                    axpy(&mut dk[j * d..][..d], ds, qi);
                }
            }
        });
    (dq, dk, dv)
}

/// Values in the compute type rounded to `T`, as a tensor of `shape`.
fn narrow<T: FloatElement>(v: Vec<T::Acc>, shape: &[usize]) -> Tensor {
    let data: Vec<T> = v.into_iter().map(T::from_acc).collect();
    Tensor::from_cpu(CpuStorage::from_vec(data), shape)
}

impl Tensor {
    /// Fused attention of queries `self` `[B, H, Tq, D]` over keys `k` and values `v`
    /// `[B, Hk, Tk, D]` (Hk divides H; query head i uses key head i / (H / Hk)):
    /// `softmax(q kᵀ · scale, masked) v`. `key_padding` (u32 `[B, Tk]`, nonzero = keep)
    /// removes keys per batch row. Returns the output `[B, H, Tq, D]` and the per-row
    /// log-sum-exp of the scaled, masked scores `[B, H, Tq]` (f32; f64 for f64 inputs), which
    /// the backward pass needs. A query that sees no key gets a zero row and a log-sum-exp of
    /// -inf. CPU only for now: a CUDA tensor is an error naming the op.
    pub fn attention(
        &self,
        k: &Tensor,
        v: &Tensor,
        spec: &AttentionSpec,
        key_padding: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let op = "attention";
        let dims = check(op, self, k, v, spec, key_padding)?;
        crate::gpu::cpu_only(op, &[self, k, v], &[key_padding])?;
        let keep = keep_flags(key_padding, &dims);
        float_dispatch!(op, self.dtype(), T => {
            let (out, lse) = forward::<T>(self, k, v, dims, spec, &keep);
            let lse: Vec<f64> = lse.iter().map(|v| v.to_f64().unwrap_or(f64::NAN)).collect();
            let lse = Tensor::from_vec(lse, &[dims.b, dims.h, dims.tq])?;
            Ok((
                Tensor::from_cpu(CpuStorage::from_vec(out), self.shape()),
                lse.to_dtype(lse_dtype(self.dtype()))?,
            ))
        })
    }

    /// The backward pass of [`Tensor::attention`]: `(dq, dk, dv)` from the same operands, the
    /// forward's output `out` and log-sum-exp `lse`, and dL/d(out) `grad`. Deterministic: each
    /// key head's gradients are summed by one task in a fixed order.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward(
        &self,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        grad: &Tensor,
        spec: &AttentionSpec,
        key_padding: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let op = "attention_backward";
        let dims = check(op, self, k, v, spec, key_padding)?;
        crate::gpu::cpu_only(op, &[self, k, v, out, lse, grad], &[key_padding])?;
        if out.shape() != self.shape() || grad.shape() != self.shape() {
            return shape_err(
                op,
                format!(
                    "out {:?} and its gradient {:?} must have the queries' shape {:?}",
                    out.shape(),
                    grad.shape(),
                    self.shape()
                ),
            );
        }
        if lse.shape() != [dims.b, dims.h, dims.tq] {
            return shape_err(
                op,
                format!(
                    "the log-sum-exp {:?} must be [{}, {}, {}]",
                    lse.shape(),
                    dims.b,
                    dims.h,
                    dims.tq
                ),
            );
        }
        self.check_same_dtype(op, out)?;
        self.check_same_dtype(op, grad)?;
        if lse.dtype() == DType::U32 {
            return Err(TensorError::DType {
                op,
                dtype: lse.dtype(),
            });
        }
        let keep = keep_flags(key_padding, &dims);
        float_dispatch!(op, self.dtype(), T => {
            let (dq, dk, dv) = backward::<T>(self, k, v, out, lse, grad, dims, spec, &keep);
            Ok((
                narrow::<T>(dq, self.shape()),
                narrow::<T>(dk, k.shape()),
                narrow::<T>(dv, v.shape()),
            ))
        })
    }
}
