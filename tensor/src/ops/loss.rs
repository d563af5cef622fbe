//! Fused cross-entropy over logits with an ignore index. Each row is computed in the dtype's
//! compute type with a max-subtracted log-sum-exp, in parallel over rows; the mean over rows is
//! summed in row order, so the loss does not depend on the thread count. On a CUDA device the
//! fused kernels of the `cuda` crate validate the targets themselves.

use crate::dispatch::float_dispatch;
use crate::error::{range_err, shape_err};
use crate::gpu::{cuda_float_dispatch, Gpu};
use crate::ops::elementwise::with_simd;
use crate::ops::par_write::par_write;
use crate::ops::softmax::log_sum_exp;
use crate::storage::CpuStorage;
use crate::{DType, Element, FloatElement, Real, Result, Tensor, TensorError};
use rayon::prelude::*;

/// Checks shapes and dtypes; returns (rows, classes).
fn check_shapes(op: &'static str, logits: &Tensor, targets: &Tensor) -> Result<(usize, usize)> {
    let (l, t) = (logits.shape(), targets.shape());
    if l.len() != 2 || t.len() != 1 || t[0] != l[0] {
        return shape_err(
            op,
            format!("needs logits [N, C] and targets [N], got {l:?} and {t:?}"),
        );
    }
    if targets.dtype() != DType::U32 {
        return Err(TensorError::DType {
            op: "cross_entropy (targets must be u32)",
            dtype: targets.dtype(),
        });
    }
    Ok((l[0], l[1]))
}

/// Checks shapes and dtypes and reads the (host) targets; returns (rows, classes, targets).
fn check(
    op: &'static str,
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: u32,
) -> Result<(usize, usize, Vec<u32>)> {
    let (n, c) = check_shapes(op, logits, targets)?;
    let l = logits.shape();
    let ids = targets.to_vec::<u32>()?;
    let bad = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id != ignore_index && id as usize >= l[1]);
    if let Some((row, &id)) = bad {
        return range_err(
            op,
            format!(
                "target {id} at row {row} is not below {} classes (logits {l:?})",
                l[1]
            ),
        );
    }
    Ok((n, c, ids))
}

/// `cross_entropy` on a CUDA device: the loss stays on the device (reading back the bad-target
/// flag waits for it).
fn cross_entropy_cuda(gpu: &Gpu, logits: &Tensor, targets: &Tensor, ignore_index: u32) -> Result<Tensor> {
    let (n, c) = check_shapes(gpu.op, logits, targets)?;
    let (x, ids) = (gpu.packed(logits)?, gpu.packed(targets)?);
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let launched = gpu.dev.cross_entropy(x.cuda_buffer::<T>(), ids.cuda_buffer::<u32>(), (n, c), ignore_index);
        let (loss, _count) = gpu.check(launched)?;
        Ok(gpu.tensor(loss, &[]))
    })
}

/// `cross_entropy_backward` on a CUDA device; the upstream scalar is read on the device.
/// Targets out of range are reported by the forward pass; here their rows get zero gradient.
fn cross_entropy_backward_cuda(
    gpu: &Gpu,
    logits: &Tensor,
    targets: &Tensor,
    ignore_index: u32,
    grad: &Tensor,
) -> Result<Tensor> {
    let (n, c) = check_shapes(gpu.op, logits, targets)?;
    let (x, ids) = (gpu.packed(logits)?, gpu.packed(targets)?);
    let g = gpu.cast(grad, DType::F32)?;
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let mut dx = gpu.alloc::<T>(n * c)?;
        gpu.check(gpu.dev.cross_entropy_backward(
            x.cuda_buffer::<T>(),
            ids.cuda_buffer::<u32>(),
            g.cuda_buffer::<f32>(),
            &mut dx,
            (n, c),
            ignore_index,
        ))?;
        Ok(gpu.tensor(dx, &[n, c]))
    })
}

impl Tensor {
    /// Mean over rows whose target is not `ignore_index` of `-log_softmax(logits)[row, target]`;
    /// `self` = logits `[N, C]` (any float dtype), `targets` u32 `[N]`. Returns a rank-0 tensor
    /// in the logits' dtype (0 when no row counts). A target `>= C` that is not `ignore_index`
    /// is an error naming its row and value.
    pub fn cross_entropy(&self, targets: &Tensor, ignore_index: u32) -> Result<Tensor> {
        if let Some(gpu) = Gpu::of("cross_entropy", &[self, targets])? {
            return cross_entropy_cuda(&gpu, self, targets, ignore_index);
        }
        let (_, c, ids) = check("cross_entropy", self, targets, ignore_index)?;
        let x = self.contiguous();
        float_dispatch!("cross_entropy", self.dtype(), T => {
            type A = <T as FloatElement>::Acc;
            let xs = x.contiguous_slice::<T>();
            let losses: Vec<Option<A>> = ids
                .par_iter()
                .enumerate()
                .map(|(r, &id)| {
                    (id != ignore_index).then(|| {
                        let row = &xs[r * c..(r + 1) * c];
                        with_simd(
                            #[inline(always)]
                            || log_sum_exp(row) - row[id as usize].to_acc(),
                        )
                    })
                })
                .collect();
            let (total, count) = losses
                .into_iter()
                .flatten()
                .fold((A::lit(0.0), 0usize), |(t, n), l| (t + l, n + 1));
            let mean = if count == 0 { A::lit(0.0) } else { total / A::lit(count as f64) };
            Ok(Tensor::scalar(T::from_acc(mean)))
        })
    }

    /// d loss / d logits scaled by the upstream scalar `grad` (a one-element tensor of any
    /// dtype, on the logits' device): `grad · (softmax - onehot) / count` on counted rows, 0 on
    /// ignored rows. The result has the logits' shape and dtype. On a CUDA device, targets out
    /// of range are reported by the forward pass only (their rows get zero gradient here).
    pub fn cross_entropy_backward(
        &self,
        targets: &Tensor,
        ignore_index: u32,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let op = "cross_entropy_backward";
        check_shapes(op, self, targets)?;
        if grad.numel() != 1 {
            return shape_err(
                "cross_entropy_backward",
                format!(
                    "upstream gradient must have one element, got shape {:?}",
                    grad.shape()
                ),
            );
        }
        if let Some(gpu) = Gpu::of(op, &[self, targets, grad])? {
            return cross_entropy_backward_cuda(&gpu, self, targets, ignore_index, grad);
        }
        let (n, c, ids) = check(op, self, targets, ignore_index)?;
        let count = ids.iter().filter(|&&id| id != ignore_index).count();
        let scale = grad.to_scalar_f64()? / count.max(1) as f64;
        let x = self.contiguous();
        float_dispatch!("cross_entropy_backward", self.dtype(), T => {
            type A = <T as FloatElement>::Acc;
            let xs = x.contiguous_slice::<T>();
            let s = A::lit(scale);
            // SAFETY: every row is written in full, with zeros when it is ignored.
            let out = unsafe {
                par_write(n * c, c, |r, dx| {
                    let id = ids[r];
                    if id == ignore_index {
                        dx.iter_mut().for_each(|o| {
                            o.write(T::from_f64(0.0));
                        });
                        return;
                    }
                    let row = &xs[r * c..(r + 1) * c];
                    let lse = with_simd(
                        #[inline(always)]
                        || {
                            let lse = log_sum_exp(row);
                            for (o, v) in dx.iter_mut().zip(row) {
                                o.write(T::from_acc((v.to_acc() - lse).exp_fast() * s));
                            }
                            lse
                        },
                    );
                    let t = id as usize;
                    dx[t].write(T::from_acc(((row[t].to_acc() - lse).exp_fast() - A::lit(1.0)) * s));
                })
            };
            Ok(Tensor::from_cpu(CpuStorage::from_vec(out), &[n, c]))
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Tensor};

    #[test]
    fn ignored_rows_do_not_count() {
        let logits = Tensor::from_vec(vec![0f64, 0., 5., -5.], &[2, 2]).unwrap();
        let targets = Tensor::from_vec(vec![1u32, 7], &[2]).unwrap();
        let loss = logits.cross_entropy(&targets, 7).unwrap();
        assert_eq!((loss.shape(), loss.dtype()), (&[][..], DType::F64));
        assert!((loss.to_scalar_f64().unwrap() - 2f64.ln()).abs() < 1e-15);
        let g = logits
            .cross_entropy_backward(&targets, 7, &Tensor::scalar(1f64))
            .unwrap();
        assert_eq!(g.to_vec_f64(), vec![0.5, -0.5, 0., 0.]);
        let g = logits
            .cross_entropy_backward(&targets, 7, &Tensor::scalar(2f32))
            .unwrap();
        assert_eq!(g.to_vec_f64(), vec![1.0, -1.0, 0., 0.]);
    }

    #[test]
    fn mean_over_counted_rows_in_every_dtype() {
        // Row 0: logits [ln 1, ln 3], target 1 -> -ln(3/4); row 1: [0, 0], target 0 -> ln 2.
        let want = ((4.0f64 / 3.0).ln() + 2f64.ln()) / 2.0;
        let logits = Tensor::from_vec(vec![0f64, 3f64.ln(), 0., 0.], &[2, 2]).unwrap();
        let targets = Tensor::from_vec(vec![1u32, 0], &[2]).unwrap();
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let loss = logits
                .to_dtype(dtype)
                .unwrap()
                .cross_entropy(&targets, u32::MAX)
                .unwrap();
            assert_eq!(loss.dtype(), dtype);
            assert!((loss.to_scalar_f64().unwrap() - want).abs() < 1e-2, "{dtype}");
        }
        let all_ignored = Tensor::from_vec(vec![3u32, 3], &[2]).unwrap();
        assert_eq!(
            logits
                .cross_entropy(&all_ignored, 3)
                .unwrap()
                .to_scalar_f64()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn bad_inputs_are_errors() {
        let logits = Tensor::zeros(&[2, 3], DType::F32);
        let targets = Tensor::from_vec(vec![1u32, 3], &[2]).unwrap();
        let err = logits.cross_entropy(&targets, u32::MAX).unwrap_err().to_string();
        assert!(err.contains("target 3 at row 1"), "{err}");
        let short = Tensor::from_vec(vec![1u32], &[1]).unwrap();
        assert!(logits.cross_entropy(&short, u32::MAX).is_err());
        assert!(logits
            .cross_entropy(&logits.sum(&[1], false).unwrap(), u32::MAX)
            .is_err());
        let ok = Tensor::from_vec(vec![1u32, 2], &[2]).unwrap();
        let two = Tensor::ones(&[2], DType::F32);
        assert!(logits.cross_entropy_backward(&ok, u32::MAX, &two).is_err());
    }
}
