//! RMSNorm and LayerNorm over the last axis, with fused backward kernels. Rows run in parallel
//! and are computed in the dtype's `Acc` type; the weight/bias gradients are summed from
//! per-block partials in block order, so they do not depend on the number of threads.

use crate::dispatch::float_dispatch;
use crate::error::shape_err;
use crate::gpu::{cuda_float_dispatch, Gpu};
use crate::ops::elementwise::{lane_sum, with_simd};
use crate::ops::par_write::par_write;
use crate::storage::CpuStorage;
use crate::{FloatElement, Real, Result, Tensor};
use cuda::kernels::{LayerNormGrads, NormSpec, Residual, RmsNormGrads};
use num_traits::Zero;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Fewest rows per rayon task in the backward kernels.
const MIN_ROWS_PER_TASK: usize = 64;
/// Most rayon tasks (and so partial weight gradients kept at once) in the backward kernels.
const MAX_TASKS: usize = 1024;

/// Checks x `[..., D]` against `[D]` parameters of the same dtype and returns D.
pub(crate) fn check(op: &'static str, x: &Tensor, params: &[&Tensor]) -> Result<usize> {
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

/// Checks that `other` (named `what`: a gradient, a residual, a gate) has the input's shape and
/// dtype.
pub(crate) fn check_like(op: &'static str, x: &Tensor, other: &Tensor, what: &str) -> Result<()> {
    if other.shape() != x.shape() {
        return shape_err(op, format!("input {:?} vs {what} {:?}", x.shape(), other.shape()));
    }
    x.check_same_dtype(op, other)
}

/// The elements of a `[D]` parameter, widened.
fn widen<T: FloatElement>(p: &Tensor) -> Vec<T::Acc> {
    p.contiguous()
        .contiguous_slice::<T>()
        .iter()
        .map(|v| v.to_acc())
        .collect()
}

/// `row` in the compute type: itself for f32 and f64, else widened into `buf`.
#[inline(always)]
fn widened<'a, T: FloatElement>(row: &'a [T], buf: &'a mut Vec<T::Acc>) -> &'a [T::Acc] {
    if let Some(row) = T::as_acc(row) {
        return row;
    }
    buf.resize(row.len(), T::Acc::zero());
    for (b, v) in buf.iter_mut().zip(row) {
        *b = v.to_acc();
    }
    buf
}

/// Normalises every row of D elements with `f(x_row, y_row)`, which writes all of `y_row`.
fn rows_forward<T: FloatElement>(
    x: &Tensor,
    d: usize,
    f: impl Fn(&[T::Acc], &mut [MaybeUninit<T>]) + Sync,
) -> Tensor {
    let x = x.contiguous();
    let xs = x.contiguous_slice::<T>();
    let d1 = d.max(1);
    let rows_per_task = (crate::tensor::PAR_CHUNK / d1).max(1);
    // SAFETY: the rows tile each chunk and `f` writes each row in full.
    let out = unsafe {
        par_write(xs.len(), rows_per_task * d1, |c, chunk| {
            let mut buf = Vec::with_capacity(d);
            let first = c * rows_per_task * d1;
            with_simd(
                #[inline(always)]
                || {
                    for (y, row) in chunk.chunks_mut(d1).zip(xs[first..].chunks(d1)) {
                        f(widened(row, &mut buf), y);
                    }
                },
            );
        })
    };
    Tensor::from_cpu(CpuStorage::from_vec(out), x.shape())
}

/// Backward over rows: `f(x_row, g_row, dx_row, partials)` writes dx and adds the row's
/// contribution into the `P` parameter gradients, which come back summed over all rows.
fn rows_backward<T: FloatElement, const P: usize>(
    x: &Tensor,
    g: &Tensor,
    d: usize,
    f: impl Fn(&[T::Acc], &[T::Acc], &mut [T], &mut [Vec<T::Acc>; P]) + Sync,
) -> (Tensor, [Tensor; P]) {
    let (x, g) = (x.contiguous(), g.contiguous());
    let (xs, gs) = (x.contiguous_slice::<T>(), g.contiguous_slice::<T>());
    let zeros = || std::array::from_fn::<_, P, _>(|_| vec![T::Acc::zero(); d]);
    let mut dx = vec![T::from_acc(Zero::zero()); xs.len()];
    let mut total = zeros();
    // Nothing to do when D = 0. The block size depends only on the shape, so the partials
    // are always summed in the same order.
    if let Some(rows) = xs.len().checked_div(d) {
        let block = rows.div_ceil(MAX_TASKS).max(MIN_ROWS_PER_TASK) * d;
        let partials: Vec<[Vec<T::Acc>; P]> = dx
            .par_chunks_mut(block)
            .zip(xs.par_chunks(block))
            .zip(gs.par_chunks(block))
            .map(|((dxb, xb), gb)| {
                let mut acc = zeros();
                let (mut xa, mut ga) = (Vec::with_capacity(d), Vec::with_capacity(d));
                with_simd(
                    #[inline(always)]
                    || {
                        for ((dxr, xr), gr) in dxb.chunks_mut(d).zip(xb.chunks(d)).zip(gb.chunks(d)) {
                            f(widened(xr, &mut xa), widened(gr, &mut ga), dxr, &mut acc);
                        }
                    },
                );
                acc
            })
            .collect();
        for part in partials {
            for (t, p) in total.iter_mut().zip(part) {
                t.iter_mut().zip(p).for_each(|(u, v)| *u += v);
            }
        }
    }
    let params = total.map(|p| {
        let p: Vec<T> = p.into_iter().map(T::from_acc).collect();
        Tensor::from_cpu(CpuStorage::from_vec(p), &[d])
    });
    (Tensor::from_cpu(CpuStorage::from_vec(dx), x.shape()), params)
}

/// The norm's shape for the kernels: rows of `d` features.
fn spec(x: &Tensor, d: usize, eps: f64) -> NormSpec {
    NormSpec::new(x.numel().checked_div(d).unwrap_or(0), d, eps)
}

/// `rms_norm` (no bias) or `layer_norm` (`layer`) forward on a CUDA device.
fn norm_cuda(
    gpu: &Gpu,
    (x, residual): (&Tensor, Option<&Tensor>),
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
    layer: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let d = weight.numel();
    let (xp, w) = (gpu.packed(x)?, gpu.packed(weight)?);
    let b = bias.map(|b| gpu.packed(b)).transpose()?;
    let r = residual.map(|r| gpu.packed(r)).transpose()?;
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let n = xp.numel();
        let mut y = gpu.alloc::<T>(n)?;
        let mut sum = r.as_ref().map(|_| gpu.alloc::<T>(n)).transpose()?;
        let fused = r.as_ref().zip(sum.as_mut()).map(|(r, sum_out)| Residual {
            input: r.cuda_buffer::<T>(),
            sum_out,
        });
        let (xb, wb) = (xp.cuda_buffer::<T>(), w.cuda_buffer::<T>());
        let launched = if layer {
            let bb = b.as_ref().map(|b| b.cuda_buffer::<T>());
            gpu.dev.layer_norm(xb, fused, wb, bb, &mut y, spec(&xp, d, eps))
        } else {
            gpu.dev.rms_norm(xb, fused, wb, &mut y, spec(&xp, d, eps))
        };
        gpu.check(launched)?;
        Ok((gpu.tensor(y, x.shape()), sum.map(|s| gpu.tensor(s, x.shape()))))
    })
}

/// `rms_norm_backward` on a CUDA device: (dx, dweight).
fn rms_norm_backward_cuda(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor)> {
    let d = weight.numel();
    let (xp, w, g) = (gpu.packed(x)?, gpu.packed(weight)?, gpu.packed(grad)?);
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let mut dx = gpu.alloc::<T>(xp.numel())?;
        let mut dw = gpu.alloc::<T>(d)?;
        let grads = RmsNormGrads { dx: &mut dx, dweight: &mut dw };
        let (xb, wb, gb) = (xp.cuda_buffer::<T>(), w.cuda_buffer::<T>(), g.cuda_buffer::<T>());
        gpu.check(gpu.dev.rms_norm_backward(xb, wb, gb, grads, spec(&xp, d, eps)))?;
        Ok((gpu.tensor(dx, x.shape()), gpu.tensor(dw, &[d])))
    })
}

/// `layer_norm_backward` on a CUDA device: (dx, dweight, dbias).
fn layer_norm_backward_cuda(
    gpu: &Gpu,
    x: &Tensor,
    weight: &Tensor,
    grad: &Tensor,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = weight.numel();
    let (xp, w, g) = (gpu.packed(x)?, gpu.packed(weight)?, gpu.packed(grad)?);
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let mut dx = gpu.alloc::<T>(xp.numel())?;
        let (mut dw, mut db) = (gpu.alloc::<T>(d)?, gpu.alloc::<T>(d)?);
        let grads = LayerNormGrads { dx: &mut dx, dweight: &mut dw, dbias: &mut db };
        let (xb, wb, gb) = (xp.cuda_buffer::<T>(), w.cuda_buffer::<T>(), g.cuda_buffer::<T>());
        gpu.check(gpu.dev.layer_norm_backward(xb, wb, gb, grads, spec(&xp, d, eps)))?;
        Ok((gpu.tensor(dx, x.shape()), gpu.tensor(dw, &[d]), gpu.tensor(db, &[d])))
    })
}

/// 1/sqrt(mean(x²) + eps) of a row.
#[inline(always)]
fn inv_rms<A: Real>(row: &[A], eps: f64) -> A {
    let ms = lane_sum(row, |v: A| v * v) / A::lit(row.len() as f64);
    A::one() / (ms + A::lit(eps)).sqrt()
}

/// Mean and 1/sqrt(var + eps) of a row (biased variance, two passes).
#[inline(always)]
fn moments<A: Real>(row: &[A], eps: f64) -> (A, A) {
    let n = A::lit(row.len() as f64);
    let mean = lane_sum(row, |v: A| v) / n;
    let var = lane_sum(row, |v: A| (v - mean) * (v - mean)) / n;
    (mean, A::one() / (var + A::lit(eps)).sqrt())
}

impl Tensor {
    /// `x / sqrt(mean(x²) + eps) · weight` over the last axis; `self` is `[..., D]` (rank >= 1)
    /// and `weight` is `[D]` of the same dtype.
    pub fn rms_norm(&self, weight: &Tensor, eps: f64) -> Result<Tensor> {
        let d = check("rms_norm", self, &[weight])?;
        if let Some(gpu) = Gpu::of("rms_norm", &[self, weight])? {
            return Ok(norm_cuda(&gpu, (self, None), weight, None, eps, false)?.0);
        }
        float_dispatch!("rms_norm", self.dtype(), T => {
            let w = widen::<T>(weight);
            Ok(rows_forward::<T>(self, d, #[inline(always)] |x, y| {
                let r = inv_rms(x, eps);
                for ((o, &v), &wv) in y.iter_mut().zip(x).zip(&w) {
                    o.write(T::from_acc(v * r * wv));
                }
            }))
        })
    }

    /// Backward of `rms_norm` with `self` = x and `grad` = dL/dy (shape and dtype of x):
    /// returns (dx, dweight), dweight summed over all rows.
    pub fn rms_norm_backward(&self, weight: &Tensor, grad: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        let d = check("rms_norm_backward", self, &[weight])?;
        check_like("rms_norm_backward", self, grad, "gradient")?;
        if let Some(gpu) = Gpu::of("rms_norm_backward", &[self, weight, grad])? {
            return rms_norm_backward_cuda(&gpu, self, weight, grad, eps);
        }
        float_dispatch!("rms_norm_backward", self.dtype(), T => {
            type A = <T as FloatElement>::Acc;
            let w = widen::<T>(weight);
            let n = A::lit(d as f64);
            let (dx, [dw]) = rows_backward::<T, 1>(self, grad, d, #[inline(always)] |x, g, dx, [dw]| {
                // With r = 1/rms: dx = r·(g·w) - x·r³·mean(g·w·x); dweight += g·x·r.
                let r = inv_rms(x, eps);
                let dot = x.iter().zip(g).zip(&w).map(|((&xv, &gv), &wv)| gv * wv * xv).sum::<A>() / n;
                let c = r * r * r * dot;
                for ((((o, &xv), &gv), &wv), dwv) in dx.iter_mut().zip(x).zip(g).zip(&w).zip(dw.iter_mut()) {
                    *o = T::from_acc(r * gv * wv - xv * c);
                    *dwv += gv * xv * r;
                }
            });
            Ok((dx, dw))
        })
    }

    /// `(x - mean) / sqrt(var + eps) · weight + bias` over the last axis (biased variance);
    /// `self` is `[..., D]` (rank >= 1), `weight` and the optional `bias` are `[D]`, all of
    /// one dtype.
    pub fn layer_norm(&self, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
        let d = check("layer_norm", self, &[weight])?;
        if let Some(b) = bias {
            check("layer_norm", self, &[b])?;
        }
        let mut operands = vec![self, weight];
        operands.extend(bias);
        if let Some(gpu) = Gpu::of("layer_norm", &operands)? {
            return Ok(norm_cuda(&gpu, (self, None), weight, bias, eps, true)?.0);
        }
        float_dispatch!("layer_norm", self.dtype(), T => {
            let w = widen::<T>(weight);
            let b = bias.map(widen::<T>);
            Ok(rows_forward::<T>(self, d, #[inline(always)] |x, y| {
                let (mean, rstd) = moments(x, eps);
                for (i, o) in y.iter_mut().enumerate() {
                    let shift = b.as_ref().map_or(Zero::zero(), |b| b[i]);
                    o.write(T::from_acc((x[i] - mean) * rstd * w[i] + shift));
                }
            }))
        })
    }

    /// `rms_norm(self + residual)` and the sum itself (the new residual stream), the sum
    /// rounded to the dtype before it is normalised, as the two ops one after the other; a
    /// single pass on a GPU. `residual` has `self`'s shape and dtype.
    pub fn add_rms_norm(&self, residual: &Tensor, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        self.add_norm("add_rms_norm", residual, weight, None, eps, false)
    }

    /// `layer_norm(self + residual)` and the sum, as [`Tensor::add_rms_norm`].
    pub fn add_layer_norm(
        &self,
        residual: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<(Tensor, Tensor)> {
        self.add_norm("add_layer_norm", residual, weight, bias, eps, true)
    }

    /// The residual add followed by RMSNorm or (`layer`) LayerNorm.
    fn add_norm(
        &self,
        op: &'static str,
        residual: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        eps: f64,
        layer: bool,
    ) -> Result<(Tensor, Tensor)> {
        check_like(op, self, residual, "residual")?;
        check(op, self, &[weight])?;
        if let Some(b) = bias {
            check(op, self, &[b])?;
        }
        let mut operands = vec![self, residual, weight];
        operands.extend(bias);
        if let Some(gpu) = Gpu::of(op, &operands)? {
            let (y, sum) = norm_cuda(&gpu, (self, Some(residual)), weight, bias, eps, layer)?;
            return Ok((y, sum.expect("a residual was given")));
        }
        let sum = self.add(residual)?;
        let y = if layer {
            sum.layer_norm(weight, bias, eps)?
        } else {
            sum.rms_norm(weight, eps)?
        };
        Ok((y, sum))
    }

    /// Backward of `layer_norm` with `self` = x and `grad` = dL/dy (shape and dtype of x):
    /// returns (dx, dweight, dbias), the parameter gradients summed over all rows. dbias is
    /// Σ_rows grad; it is meaningful only when the forward pass had a bias.
    pub fn layer_norm_backward(
        &self,
        weight: &Tensor,
        grad: &Tensor,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let d = check("layer_norm_backward", self, &[weight])?;
        check_like("layer_norm_backward", self, grad, "gradient")?;
        if let Some(gpu) = Gpu::of("layer_norm_backward", &[self, weight, grad])? {
            return layer_norm_backward_cuda(&gpu, self, weight, grad, eps);
        }
        float_dispatch!("layer_norm_backward", self.dtype(), T => {
            type A = <T as FloatElement>::Acc;
            let w = widen::<T>(weight);
            let n = A::lit(d as f64);
            let (dx, [dw, db]) = rows_backward::<T, 2>(self, grad, d, #[inline(always)] |x, g, dx, [dw, db]| {
                // With x̂ = (x - mean)·rstd: dx = rstd·(g·w - mean(g·w) - x̂·mean(g·w·x̂)).
                let (mean, rstd) = moments(x, eps);
                let (mut sum_gw, mut sum_gw_xhat) = (A::zero(), A::zero());
                for ((&xv, &gv), &wv) in x.iter().zip(g).zip(&w) {
                    sum_gw += gv * wv;
                    sum_gw_xhat += gv * wv * (xv - mean) * rstd;
                }
                let (mean_gw, mean_gw_xhat) = (sum_gw / n, sum_gw_xhat / n);
                for (i, o) in dx.iter_mut().enumerate() {
                    let xhat = (x[i] - mean) * rstd;
                    *o = T::from_acc(rstd * (g[i] * w[i] - mean_gw - xhat * mean_gw_xhat));
                    dw[i] += g[i] * xhat;
                    db[i] += g[i];
                }
            });
            Ok((dx, dw, db))
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::{bf16, DType, Tensor};

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    /// Row means of `v` seen as rows of `d`.
    fn row_means(v: &[f64], d: usize) -> Vec<f64> {
        v.chunks(d).map(|r| r.iter().sum::<f64>() / d as f64).collect()
    }

    #[test]
    fn rms_norm_gives_unit_rms() {
        let x = Tensor::arange(12, DType::F64).reshape(&[3, 4]).unwrap();
        let y = x.rms_norm(&Tensor::ones(&[4], DType::F64), 0.0).unwrap();
        let sq: Vec<f64> = y.to_vec_f64().iter().map(|v| v * v).collect();
        assert!(close(&row_means(&sq, 4), &[1.0; 3], 1e-12), "{sq:?}");
        // [3, 4, 0, 0] has rms 2.5: y = x/2.5 · w with w = [1, 2, 1, 1] (rank 1 works too).
        let x = Tensor::from_vec(vec![3f64, 4., 0., 0.], &[4]).unwrap();
        let w = Tensor::from_vec(vec![1f64, 2., 1., 1.], &[4]).unwrap();
        let y = x.rms_norm(&w, 0.0).unwrap().to_vec_f64();
        assert!(close(&y, &[1.2, 3.2, 0., 0.], 1e-12), "{y:?}");
    }

    #[test]
    fn rms_norm_checks_shapes_and_dtypes() {
        let x = Tensor::ones(&[2, 3], DType::F32);
        assert!(x.rms_norm(&Tensor::ones(&[2], DType::F32), 1e-6).is_err());
        assert!(x.rms_norm(&Tensor::ones(&[3], DType::F64), 1e-6).is_err());
        assert!(Tensor::scalar(1f32)
            .rms_norm(&Tensor::ones(&[1], DType::F32), 1e-6)
            .is_err());
        let w = Tensor::ones(&[3], DType::F32);
        assert!(x
            .rms_norm_backward(&w, &Tensor::ones(&[2, 3], DType::F64), 1e-6)
            .is_err());
        assert!(x
            .rms_norm_backward(&w, &Tensor::ones(&[3, 2], DType::F32), 1e-6)
            .is_err());
        let u = Tensor::ones(&[2, 3], DType::U32);
        assert!(u.rms_norm(&Tensor::ones(&[3], DType::U32), 1e-6).is_err());
    }

    #[test]
    fn rms_norm_backward_by_hand() {
        // x = [3, 4, 0, 0], w = 1, eps = 0: rms 2.5, r = 0.4. With g = [1, 0, 0, 0],
        // mean(g·w·x) = 0.75: dx = r·g - x·r³·0.75 = [0.256, -0.192, 0, 0]; dw = g·x·r.
        let x = Tensor::from_vec(vec![3f64, 4., 0., 0.], &[1, 4]).unwrap();
        let g = Tensor::from_vec(vec![1f64, 0., 0., 0.], &[1, 4]).unwrap();
        let (dx, dw) = x
            .rms_norm_backward(&Tensor::ones(&[4], DType::F64), &g, 0.0)
            .unwrap();
        assert!(
            close(&dx.to_vec_f64(), &[0.256, -0.192, 0., 0.], 1e-12),
            "{:?}",
            dx.to_vec_f64()
        );
        assert!(close(&dw.to_vec_f64(), &[1.2, 0., 0., 0.], 1e-12));
    }

    #[test]
    fn rms_norm_backward_of_one_feature_matches_the_closed_form() {
        // D = 1: y = w·x/√(x² + eps), dy/dx = w·eps/(x² + eps)^{3/2}, a difference of two
        // nearly equal terms in the kernel.
        let (x, w, g, eps) = (1.3f64, 0.7f64, 2.0f64, 1e-5);
        let t = |v: f64| Tensor::from_vec(vec![v], &[1]).unwrap();
        let (dx, dw) = t(x).rms_norm_backward(&t(w), &t(g), eps).unwrap();
        let want = g * w * eps / (x * x + eps).powf(1.5);
        assert!(
            (dx.to_scalar_f64().unwrap() / want - 1.0).abs() < 1e-9,
            "{dx:?} vs {want}"
        );
        assert!((dw.to_scalar_f64().unwrap() - g * x / (x * x + eps).sqrt()).abs() < 1e-15);
    }

    #[test]
    fn layer_norm_gives_zero_mean_unit_variance() {
        let x = Tensor::arange(12, DType::F32).reshape(&[3, 4]).unwrap();
        let y = x
            .layer_norm(&Tensor::ones(&[4], DType::F32), None, 0.0)
            .unwrap()
            .to_vec_f64();
        assert!(close(&row_means(&y, 4), &[0.0; 3], 1e-6), "{y:?}");
        let sq: Vec<f64> = y.iter().map(|v| v * v).collect();
        assert!(close(&row_means(&sq, 4), &[1.0; 3], 1e-5), "{y:?}");
        let b = Tensor::full(&[4], 2.0, DType::F32);
        let yb = x
            .layer_norm(&Tensor::ones(&[4], DType::F32), Some(&b), 0.0)
            .unwrap();
        assert!(close(&row_means(&yb.to_vec_f64(), 4), &[2.0; 3], 1e-6));
        assert!(x.layer_norm(&Tensor::ones(&[3], DType::F32), None, 1e-5).is_err());
        assert!(x
            .layer_norm(&b, Some(&Tensor::ones(&[3], DType::F32)), 1e-5)
            .is_err());
    }

    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        let xv = vec![0.3f64, -1.2, 2.0, 0.7, 1.5, -0.4, 0.1, -2.2];
        let (wv, gv) = (
            vec![0.5f64, 1.5, -1.0, 2.0],
            vec![1f64, -2., 0.5, 3., -1., 0.25, 2., -0.5],
        );
        let (w, g) = (
            Tensor::from_slice(&wv, &[4]).unwrap(),
            Tensor::from_slice(&gv, &[2, 4]).unwrap(),
        );
        let loss = |x: &[f64]| -> f64 {
            let y = Tensor::from_slice(x, &[2, 4])
                .unwrap()
                .layer_norm(&w, None, 1e-5)
                .unwrap();
            y.to_vec_f64().iter().zip(&gv).map(|(a, b)| a * b).sum()
        };
        let x = Tensor::from_slice(&xv, &[2, 4]).unwrap();
        let (dx, dw, db) = x.layer_norm_backward(&w, &g, 1e-5).unwrap();
        let h = 1e-6;
        let numeric: Vec<f64> = (0..xv.len())
            .map(|i| {
                let (mut p, mut m) = (xv.clone(), xv.clone());
                p[i] += h;
                m[i] -= h;
                (loss(&p) - loss(&m)) / (2.0 * h)
            })
            .collect();
        assert!(close(&dx.to_vec_f64(), &numeric, 1e-6), "{dx:?} vs {numeric:?}");
        // dweight = Σ_rows g·x̂ (checked via the forward with w = 1), dbias = Σ_rows g.
        let xhat = x
            .layer_norm(&Tensor::ones(&[4], DType::F64), None, 1e-5)
            .unwrap()
            .to_vec_f64();
        let want_dw: Vec<f64> = (0..4)
            .map(|j| gv[j] * xhat[j] + gv[4 + j] * xhat[4 + j])
            .collect();
        assert!(close(&dw.to_vec_f64(), &want_dw, 1e-12));
        assert_eq!(db.to_vec_f64(), vec![0., -1.75, 2.5, 2.5]);
    }

    #[test]
    fn sixteen_bit_types_and_many_rows() {
        // 300 rows span several backward blocks; every row is [1, 2, 3, 4].
        let row = [1f64, 2., 3., 4.];
        let x: Vec<bf16> = (0..300).flat_map(|_| row.map(bf16::from_f64)).collect();
        let x = Tensor::from_vec(x, &[3, 100, 4]).unwrap();
        let w = Tensor::ones(&[4], DType::BF16);
        let y = x.rms_norm(&w, 0.0).unwrap();
        assert_eq!(y.dtype(), DType::BF16);
        let want = row.map(|v| v / 7.5f64.sqrt());
        assert!(close(&y.to_vec_f64()[..4], &want, 1e-2));
        let (_, dw, db) = x
            .layer_norm_backward(&w, &Tensor::ones(&[3, 100, 4], DType::BF16), 0.0)
            .unwrap();
        assert!(close(&db.to_vec_f64(), &[300.0; 4], 0.0), "{db:?}");
        let s = 1.25f64.sqrt();
        let want_dw = [-1.5, -0.5, 0.5, 1.5].map(|v| 300.0 * v / s);
        assert!(close(&dw.to_vec_f64(), &want_dw, 2.0), "{dw:?}");
    }

    #[test]
    fn the_residual_add_comes_first_and_is_returned() {
        let x = Tensor::from_vec(vec![1.0f64, 2.0, -1.0, 0.5, 3.0, -2.0], &[2, 3]).unwrap();
        let r = Tensor::from_vec(vec![0.5f64, -1.0, 2.0, 1.5, 0.0, 1.0], &[2, 3]).unwrap();
        let w = Tensor::from_vec(vec![1.0f64, 0.5, 2.0], &[3]).unwrap();
        let b = Tensor::from_vec(vec![0.1f64, 0.2, 0.3], &[3]).unwrap();
        let sum = [1.5, 1.0, 1.0, 2.0, 3.0, -1.0];
        let (y, s) = x.add_rms_norm(&r, &w, 1e-6).unwrap();
        assert_eq!(s.to_vec_f64(), sum);
        let h = Tensor::from_vec(sum.to_vec(), &[2, 3]).unwrap();
        assert_eq!(y.to_vec_f64(), h.rms_norm(&w, 1e-6).unwrap().to_vec_f64());
        let (y, _) = x.add_layer_norm(&r, &w, Some(&b), 1e-6).unwrap();
        assert_eq!(
            y.to_vec_f64(),
            h.layer_norm(&w, Some(&b), 1e-6).unwrap().to_vec_f64()
        );
        let err = x.add_rms_norm(&w, &w, 1e-6).unwrap_err().to_string();
        assert!(err.contains("residual [3]"), "{err}");
    }
}
