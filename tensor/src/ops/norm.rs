//! RMSNorm and LayerNorm over the last axis, with fused backward kernels. Rows run in parallel;
//! the weight/bias gradients are summed from per-block partials.

use crate::dispatch::float_dispatch;
use crate::error::shape_err;
use crate::storage::CpuStorage;
use crate::{FloatElement, Real, Result, Tensor};
use num_traits::Zero;
use rayon::prelude::*;

/// Rows per rayon task in the backward kernels' weight-gradient reduction.
const ROWS_PER_TASK: usize = 64;

/// Checks x `[..., D]` against `[D]` parameters and returns D.
fn check(op: &'static str, x: &Tensor, params: &[&Tensor]) -> Result<usize> {
    let Some(&d) = x.shape().last() else {
        return shape_err(op, "input must have rank >= 1, got a scalar");
    };
    for p in params {
        if p.shape() != [d] {
            return shape_err(
                op,
                format!("parameter {:?} does not match input {:?}", p.shape(), x.shape()),
            );
        }
        x.check_same_dtype(op, p)?;
    }
    Ok(d)
}

fn widen<T: FloatElement>(s: &[T]) -> Vec<T::Acc> {
    s.iter().map(|v| v.to_acc()).collect()
}

fn narrow<T: FloatElement>(v: &[T::Acc]) -> Vec<T> {
    v.iter().map(|&a| T::from_acc(a)).collect()
}

/// Normalises every row with `f(row, out)`.
fn rows_forward<T: FloatElement>(x: &Tensor, d: usize, f: impl Fn(&[T::Acc], &mut [T]) + Sync) -> Tensor {
    let x = x.contiguous();
    let xs = x.contiguous_slice::<T>();
    let mut out = vec![T::from_acc(Zero::zero()); xs.len()];
    out.par_chunks_mut(d.max(1))
        .zip(xs.par_chunks(d.max(1)))
        .for_each(|(y, row)| f(&widen(row), y));
    Tensor::from_cpu(CpuStorage::from_vec(out), x.shape())
}

/// Backward over rows: `f(x_row, g_row, dx_row, partials)` writes dx and adds into `partials`
/// (`n_partials` vectors of length D, summed over all rows).
fn rows_backward<T: FloatElement>(
    x: &Tensor,
    g: &Tensor,
    d: usize,
    n_partials: usize,
    f: impl Fn(&[T::Acc], &[T::Acc], &mut [T], &mut [Vec<T::Acc>]) + Sync,
) -> (Tensor, Vec<Tensor>) {
    let (x, g) = (x.contiguous(), g.contiguous());
    let (xs, gs) = (x.contiguous_slice::<T>(), g.contiguous_slice::<T>());
    let mut dx = vec![T::from_acc(Zero::zero()); xs.len()];
    let block = ROWS_PER_TASK * d.max(1);
    let partials = dx
        .par_chunks_mut(block)
        .zip(xs.par_chunks(block).zip(gs.par_chunks(block)))
        .map(|(dxb, (xb, gb))| {
            let mut acc = vec![vec![T::Acc::zero(); d]; n_partials];
            for ((dxr, xr), gr) in dxb.chunks_mut(d).zip(xb.chunks(d)).zip(gb.chunks(d)) {
                f(&widen(xr), &widen(gr), dxr, &mut acc);
            }
            acc
        })
        .reduce(
            || vec![vec![T::Acc::zero(); d]; n_partials],
            |mut a, b| {
                for (pa, pb) in a.iter_mut().zip(b) {
                    pa.iter_mut().zip(pb).for_each(|(u, v)| *u += v);
                }
                a
            },
        );
    let dx = Tensor::from_cpu(CpuStorage::from_vec(dx), x.shape());
    let params = partials
        .iter()
        .map(|p| Tensor::from_cpu(CpuStorage::from_vec(narrow::<T>(p)), &[d]))
        .collect();
    (dx, params)
}

fn inv_rms<A: Real>(row: &[A], eps: f64) -> A {
    let ms = row.iter().map(|&v| v * v).sum::<A>() / A::lit(row.len() as f64);
    A::one() / (ms + A::lit(eps)).sqrt()
}

/// Mean and 1/std of a row (biased variance).
fn moments<A: Real>(row: &[A], eps: f64) -> (A, A) {
    let n = A::lit(row.len() as f64);
    let mean = row.iter().copied().sum::<A>() / n;
    let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<A>() / n;
    (mean, A::one() / (var + A::lit(eps)).sqrt())
}

impl Tensor {
    /// `x / sqrt(mean(x²) + eps) · weight` over the last axis; `weight` is `[D]`.
    pub fn rms_norm(&self, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let d = check("rms_norm", self, &[weight])?;
        float_dispatch!("rms_norm", self.dtype(), T => {
            let w = widen(weight.contiguous().contiguous_slice::<T>());
            Ok(rows_forward::<T>(self, d, |x, y| {
                let r = inv_rms(x, eps);
                for ((o, &v), &wv) in y.iter_mut().zip(x).zip(&w) {
                    *o = T::from_acc(v * r * wv);
                }
            }))
        })
    }

    /// Backward of `rms_norm` with `self` = x: returns (dx, dweight).
    pub fn rms_norm_backward(&self, weight: &Tensor, grad: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        let d = check("rms_norm_backward", self, &[weight])?;
        if grad.shape() != self.shape() {
            return shape_err(
                "rms_norm_backward",
                format!("input {:?} vs gradient {:?}", self.shape(), grad.shape()),
            );
        }
        float_dispatch!("rms_norm_backward", self.dtype(), T => {
            let w = widen(weight.contiguous().contiguous_slice::<T>());
            let (dx, mut p) = rows_backward::<T>(self, grad, d, 1, |x, g, dx, acc| {
                let r = inv_rms(x, eps);
                // dx = r·(g·w) - x·r³·mean(g·w·x)
                let gw: Vec<_> = g.iter().zip(&w).map(|(&a, &b)| a * b).collect();
                let dot = gw.iter().zip(x).map(|(&a, &b)| a * b).sum::<<T as FloatElement>::Acc>()
                    / <T as FloatElement>::Acc::lit(d as f64);
                for (i, o) in dx.iter_mut().enumerate() {
                    *o = T::from_acc(r * gw[i] - x[i] * r * r * r * dot);
                    acc[0][i] += g[i] * x[i] * r;
                }
            });
            Ok((dx, p.remove(0)))
        })
    }

    /// `(x - mean) / sqrt(var + eps) · weight + bias` over the last axis (biased variance).
    pub fn layer_norm(&self, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        let d = check("layer_norm", self, &[weight])?;
        if let Some(b) = bias {
            check("layer_norm", self, &[b])?;
        }
        float_dispatch!("layer_norm", self.dtype(), T => {
            let w = widen(weight.contiguous().contiguous_slice::<T>());
            let b = bias.map(|b| widen(b.contiguous().contiguous_slice::<T>()));
            Ok(rows_forward::<T>(self, d, |x, y| {
                let (mean, rstd) = moments(x, eps);
                for (i, o) in y.iter_mut().enumerate() {
                    let shift = b.as_ref().map_or(Zero::zero(), |b| b[i]);
                    *o = T::from_acc((x[i] - mean) * rstd * w[i] + shift);
                }
            }))
        })
    }

    /// Backward of `layer_norm` with `self` = x: returns (dx, dweight, dbias).
    pub fn layer_norm_backward(
        &self,
        weight: &Tensor,
        grad: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let d = check("layer_norm_backward", self, &[weight])?;
        if grad.shape() != self.shape() {
            return shape_err(
                "layer_norm_backward",
                format!("input {:?} vs gradient {:?}", self.shape(), grad.shape()),
            );
        }
        float_dispatch!("layer_norm_backward", self.dtype(), T => {
            let w = widen(weight.contiguous().contiguous_slice::<T>());
            let (dx, mut p) = rows_backward::<T>(self, grad, d, 2, |x, g, dx, acc| {
                type A = <T as FloatElement>::Acc;
                let (mean, rstd) = moments(x, eps);
                let xhat: Vec<A> = x.iter().map(|&v| (v - mean) * rstd).collect();
                let gw: Vec<A> = g.iter().zip(&w).map(|(&a, &b)| a * b).collect();
                let n = A::lit(d as f64);
                let mean_gw = gw.iter().copied().sum::<A>() / n;
                let mean_gw_xhat = gw.iter().zip(&xhat).map(|(&a, &b)| a * b).sum::<A>() / n;
                for (i, o) in dx.iter_mut().enumerate() {
                    *o = T::from_acc(rstd * (gw[i] - mean_gw - xhat[i] * mean_gw_xhat));
                    acc[0][i] += g[i] * xhat[i];
                    acc[1][i] += g[i];
                }
            });
            let db = p.remove(1);
            Ok((dx, p.remove(0), db))
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Tensor};

    #[test]
    fn rms_norm_gives_unit_rms() {
        let x = Tensor::arange(12, DType::F64).reshape(&[3, 4]).unwrap();
        let y = x.rms_norm(&Tensor::ones(&[4], DType::F64), 0.0).unwrap();
        let ms = y.sqr().unwrap().mean(&[1], false).unwrap().to_vec_f64();
        assert!(ms.iter().skip(1).all(|m| (m - 1.0).abs() < 1e-12), "{ms:?}");
    }

    #[test]
    fn layer_norm_gives_zero_mean() {
        let x = Tensor::arange(12, DType::F32).reshape(&[3, 4]).unwrap();
        let y = x.layer_norm(&Tensor::ones(&[4], DType::F32), None, 1e-5).unwrap();
        let m = y.mean(&[1], false).unwrap().to_vec_f64();
        assert!(m.iter().all(|v| v.abs() < 1e-6), "{m:?}");
        assert!(x.layer_norm(&Tensor::ones(&[3], DType::F32), None, 1e-5).is_err());
    }
}
