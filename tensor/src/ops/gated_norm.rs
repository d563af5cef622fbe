//! Mamba-2's gated RMSNorm: `rms_norm_per_group(x · silu(z)) · weight`, forward and backward.
//!
//! The CPU kernel rounds `silu(z)`, `x · silu(z)` and the normalised value to the dtype as the
//! unfused ops (silu, mul, rms_norm, mul) would, so the fused op gives their result; the CUDA
//! kernel (`gated_norm.cu`) rounds at the same points.

use crate::dispatch::float_dispatch;
use crate::error::shape_err;
use crate::gpu::{cuda_float_dispatch, Gpu};
use crate::ops::elementwise::{lane_sum, with_simd};
use crate::ops::norm;
use crate::ops::unary::{sigmoid, silu_fused};
use crate::storage::CpuStorage;
use crate::{FloatElement, Real, Result, Tensor};
use cuda::kernels::{GatedNormGrads, NormSpec};
use num_traits::{Float, One, Zero};
use rayon::prelude::*;

/// Rows per rayon task of the backward pass (the weight gradient's partial sums are per task,
/// added in task order, so the result does not depend on the thread count).
const ROWS_PER_TASK: usize = 64;

/// Checks x `[..., D]`, z like x and weight `[D]` of one dtype, D a multiple of `group`;
/// returns D.
fn check(op: &'static str, x: &Tensor, z: &Tensor, weight: &Tensor, group: usize) -> Result<usize> {
    let d = norm::check(op, x, &[weight])?;
    norm::check_like(op, x, z, "gate")?;
    if group == 0 || !d.is_multiple_of(group) {
        return shape_err(op, format!("width {d} is not a multiple of group size {group}"));
    }
    Ok(d)
}

/// `v` rounded to `T` and widened again.
#[inline(always)]
fn round<T: FloatElement>(v: T::Acc) -> T::Acc {
    T::from_acc(v).to_acc()
}

/// One group's forward quantities: silu(z) and x · silu(z) (each rounded) and 1/rms. Inlined
/// into the callers' `with_simd` loops (the fused exp of `silu_fused` needs them).
#[inline(always)]
fn group_forward<T: FloatElement>(x: &[T], z: &[T], eps: f64) -> (Vec<T::Acc>, Vec<T::Acc>, T::Acc) {
    let mut s = vec![T::Acc::zero(); z.len()];
    for (o, &v) in s.iter_mut().zip(z) {
        *o = round::<T>(silu_fused(v.to_acc()));
    }
    let mut h = vec![T::Acc::zero(); x.len()];
    for ((o, &v), &sv) in h.iter_mut().zip(x).zip(&s) {
        *o = round::<T>(v.to_acc() * sv);
    }
    let n = T::Acc::lit(h.len() as f64);
    let ms = lane_sum(&h, |v: T::Acc| v * v) / n;
    (s, h, T::Acc::one() / (ms + T::Acc::lit(eps)).sqrt())
}

/// The shape of the kernels' launch.
fn spec(x: &Tensor, d: usize, group: usize, eps: f64) -> NormSpec {
    NormSpec::grouped(x.numel() / d.max(1), d, group, eps)
}

impl Tensor {
    /// Mamba-2's gated RMSNorm of `self` = x `[..., D]` with gate `z` (x's shape) and `weight`
    /// `[D]`: `y = h / sqrt(mean_group(h²) + eps) · weight` with `h = x · silu(z)`, the mean
    /// taken over each run of `group` consecutive features (D a multiple of `group`).
    pub fn gated_rms_norm(&self, z: &Tensor, weight: &Tensor, group: usize, eps: f64) -> Result<Tensor> {
        let op = "gated_rms_norm";
        let d = check(op, self, z, weight, group)?;
        if let Some(gpu) = Gpu::of(op, &[self, z, weight])? {
            let (xp, zp, w) = (gpu.packed(self)?, gpu.packed(z)?, gpu.packed(weight)?);
            return cuda_float_dispatch!(op, gpu.device, self.dtype(), T => {
                let mut y = gpu.alloc::<T>(xp.numel())?;
                let (xb, zb, wb) = (xp.cuda_buffer::<T>(), zp.cuda_buffer::<T>(), w.cuda_buffer::<T>());
                gpu.check(gpu.dev.gated_rms_norm(xb, zb, wb, &mut y, spec(&xp, d, group, eps)))?;
                Ok(gpu.tensor(y, self.shape()))
            });
        }
        let (x, z, w) = (self.contiguous(), z.contiguous(), weight.contiguous());
        float_dispatch!(op, self.dtype(), T => {
            let (xs, zs) = (x.contiguous_slice::<T>(), z.contiguous_slice::<T>());
            let ws: Vec<_> = w.contiguous_slice::<T>().iter().map(|v| v.to_acc()).collect();
            let mut y = vec![T::from_acc(Zero::zero()); xs.len()];
            y.par_chunks_mut(group)
                .zip(xs.par_chunks(group).zip(zs.par_chunks(group)))
                .enumerate()
                .for_each(|(item, (yg, (xg, zg)))| {
                    with_simd(#[inline(always)] || {
                        let (_, h, inv) = group_forward::<T>(xg, zg, eps);
                        let col0 = (item * group) % d;
                        for (j, o) in yg.iter_mut().enumerate() {
                            *o = T::from_acc(round::<T>(h[j] * inv) * ws[col0 + j]);
                        }
                    })
                });
            Ok(Tensor::from_cpu(CpuStorage::from_vec(y), self.shape()))
        })
    }

    /// Backward of `gated_rms_norm` (same operands) given `grad` = dL/dy: returns (dx, dz,
    /// dweight), dweight summed over all rows in an order fixed by the shape.
    pub fn gated_rms_norm_backward(
        &self,
        z: &Tensor,
        weight: &Tensor,
        grad: &Tensor,
        group: usize,
        eps: f64,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let op = "gated_rms_norm_backward";
        let d = check(op, self, z, weight, group)?;
        norm::check_like(op, self, grad, "gradient")?;
        if let Some(gpu) = Gpu::of(op, &[self, z, weight, grad])? {
            let (xp, zp, w, g) = (
                gpu.packed(self)?,
                gpu.packed(z)?,
                gpu.packed(weight)?,
                gpu.packed(grad)?,
            );
            return cuda_float_dispatch!(op, gpu.device, self.dtype(), T => {
                let n = xp.numel();
                let (mut dx, mut dz, mut dw) = (gpu.alloc::<T>(n)?, gpu.alloc::<T>(n)?, gpu.alloc::<T>(d)?);
                let grads = GatedNormGrads { dx: &mut dx, dz: &mut dz, dweight: &mut dw };
                let operands = (xp.cuda_buffer::<T>(), zp.cuda_buffer::<T>());
                let launched = gpu.dev.gated_rms_norm_backward(
                    operands,
                    w.cuda_buffer::<T>(),
                    g.cuda_buffer::<T>(),
                    grads,
                    spec(&xp, d, group, eps),
                );
                gpu.check(launched)?;
                Ok((gpu.tensor(dx, self.shape()), gpu.tensor(dz, self.shape()), gpu.tensor(dw, &[d])))
            });
        }
        let (x, z, w, g) = (
            self.contiguous(),
            z.contiguous(),
            weight.contiguous(),
            grad.contiguous(),
        );
        float_dispatch!(op, self.dtype(), T => {
            type A = <T as FloatElement>::Acc;
            let (xs, zs, gs) = (x.contiguous_slice::<T>(), z.contiguous_slice::<T>(), g.contiguous_slice::<T>());
            let ws: Vec<A> = w.contiguous_slice::<T>().iter().map(|v| v.to_acc()).collect();
            let (mut dx, mut dz) = (vec![T::from_acc(A::zero()); xs.len()], vec![T::from_acc(A::zero()); xs.len()]);
            let block = ROWS_PER_TASK * d.max(1);
            let partials: Vec<Vec<A>> = dx
                .par_chunks_mut(block)
                .zip(dz.par_chunks_mut(block))
                .zip(xs.par_chunks(block).zip(zs.par_chunks(block)).zip(gs.par_chunks(block)))
                .map(|((dxb, dzb), ((xb, zb), gb))| with_simd(#[inline(always)] || {
                    let mut dw = vec![A::zero(); d];
                    for (i, ((xg, zg), gg)) in xb.chunks(group).zip(zb.chunks(group)).zip(gb.chunks(group)).enumerate() {
                        let (s, h, inv) = group_forward::<T>(xg, zg, eps);
                        let col0 = (i * group) % d;
                        let w = &ws[col0..col0 + group];
                        // dn = g·w; dh = r·dn - h·r³·mean(dn·h); dx = dh·s; dz = dh·x·silu'(z).
                        let dn: Vec<A> = gg.iter().zip(w).map(|(gv, &wv)| gv.to_acc() * wv).collect();
                        let mean = dn.iter().zip(&h).map(|(&a, &b)| a * b).sum::<A>() / A::lit(group as f64);
                        let c = inv * inv * inv * mean;
                        for j in 0..group {
                            let dh = inv * dn[j] - h[j] * c;
                            let zv = zg[j].to_acc();
                            let sig = sigmoid(zv);
                            let dsilu = sig * (A::one() + zv * (A::one() - sig));
                            dxb[i * group + j] = T::from_acc(dh * s[j]);
                            dzb[i * group + j] = T::from_acc(dh * xg[j].to_acc() * dsilu);
                            dw[col0 + j] += gg[j].to_acc() * round::<T>(h[j] * inv);
                        }
                    }
                    dw
                }))
                .collect();
            let mut dw = vec![A::zero(); d];
            for part in &partials {
                for (total, &v) in dw.iter_mut().zip(part) {
                    *total += v;
                }
            }
            let wrap = |v: Vec<T>, shape: &[usize]| Tensor::from_cpu(CpuStorage::from_vec(v), shape);
            let dw: Vec<T> = dw.into_iter().map(T::from_acc).collect();
            Ok((wrap(dx, self.shape()), wrap(dz, self.shape()), wrap(dw, &[d])))
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Tensor};

    /// The unfused composition the op replaces: silu, mul, a per-group RMS norm, mul.
    fn unfused(x: &Tensor, z: &Tensor, w: &Tensor, group: usize) -> Tensor {
        let s = x.shape().to_vec();
        let mut grouped = s[..s.len() - 1].to_vec();
        grouped.extend([s[s.len() - 1] / group, group]);
        let ones = Tensor::ones(&[group], x.dtype());
        let h = x.mul(&z.silu().unwrap()).unwrap();
        let n = h.reshape(&grouped).unwrap().rms_norm(&ones, 1e-5).unwrap();
        n.reshape(&s).unwrap().mul(w).unwrap()
    }

    #[test]
    fn the_fused_op_rounds_like_the_unfused_ops() {
        let mut rng = crate::seeded_rng(5);
        for dtype in [DType::F32, DType::BF16, DType::F64] {
            let (shape, group) = ([2, 3, 12], 4);
            let x = Tensor::randn(&shape, dtype, 0.0, 1.0, &mut rng).unwrap();
            let z = Tensor::randn(&shape, dtype, 0.0, 2.0, &mut rng).unwrap();
            let w = Tensor::randn(&[12], dtype, 1.0, 0.2, &mut rng).unwrap();
            let fused = x.gated_rms_norm(&z, &w, group, 1e-5).unwrap();
            assert_eq!(
                fused.to_vec_f64(),
                unfused(&x, &z, &w, group).to_vec_f64(),
                "{dtype:?}"
            );
        }
    }

    #[test]
    fn bad_shapes_and_groups_are_errors() {
        let x = Tensor::ones(&[2, 6], DType::F32);
        let w = Tensor::ones(&[6], DType::F32);
        let err = x.gated_rms_norm(&x, &w, 4, 1e-5).unwrap_err().to_string();
        assert!(err.contains("not a multiple of group size 4"), "{err}");
        let err = x.gated_rms_norm(&w, &w, 3, 1e-5).unwrap_err().to_string();
        assert!(err.contains("gate [6]"), "{err}");
        let g = Tensor::ones(&[6, 2], DType::F32);
        assert!(x.gated_rms_norm_backward(&x, &w, &g, 3, 1e-5).is_err());
    }
}
