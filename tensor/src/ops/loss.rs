//! Fused cross-entropy over logits with an ignore index.

use crate::dispatch::float_dispatch;
use crate::error::{range_err, shape_err};
use crate::storage::CpuStorage;
use crate::{DType, Element, FloatElement, Real, Result, Tensor, TensorError};
use num_traits::Zero;
use rayon::prelude::*;

/// Checks shapes and reads the targets; returns (rows, classes, targets).
fn check(logits: &Tensor, targets: &Tensor, ignore_index: u32) -> Result<(usize, usize, Vec<u32>)> {
    let (l, t) = (logits.shape(), targets.shape());
    if l.len() != 2 || t.len() != 1 || t[0] != l[0] {
        return shape_err(
            "cross_entropy",
            format!("needs logits [N, C] and targets [N], got {l:?} and {t:?}"),
        );
    }
    if targets.dtype() != DType::U32 {
        return Err(TensorError::DType {
            op: "cross_entropy (targets)",
            dtype: targets.dtype(),
        });
    }
    let ids = targets.to_vec::<u32>()?;
    if let Some((row, &id)) = ids
        .iter()
        .enumerate()
        .find(|(_, &id)| id != ignore_index && id as usize >= l[1])
    {
        return range_err(
            "cross_entropy",
            format!("target {id} at row {row} is not below {} classes", l[1]),
        );
    }
    Ok((l[0], l[1], ids))
}

/// `log Σ exp(row)`, max-subtracted.
fn log_sum_exp<A: Real>(row: &[A]) -> A {
    let m = row.iter().fold(A::neg_infinity(), |m, &v| m.max(v));
    m + row.iter().map(|&v| (v - m).exp()).sum::<A>().ln()
}

impl Tensor {
    /// Mean over rows whose target is not `ignore_index` of `-log_softmax(logits)[row, target]`;
    /// `self` = logits `[N, C]`, `targets` u32 `[N]`. Returns a rank-0 tensor (0 when no row counts).
    pub fn cross_entropy(&self, targets: &Tensor, ignore_index: u32) -> Result<Tensor> {
        let (_, c, ids) = check(self, targets, ignore_index)?;
        let x = self.contiguous();
        float_dispatch!("cross_entropy", self.dtype(), T => {
            let xs = x.contiguous_slice::<T>();
            let (total, count) = ids
                .par_iter()
                .enumerate()
                .filter(|(_, &id)| id != ignore_index)
                .map(|(r, &id)| {
                    let row: Vec<_> = xs[r * c..(r + 1) * c].iter().map(|v| v.to_acc()).collect();
                    (log_sum_exp(&row) - row[id as usize], 1usize)
                })
                .reduce(|| (Zero::zero(), 0), |a, b| (a.0 + b.0, a.1 + b.1));
            let mean = if count == 0 { Zero::zero() } else { total / <T as FloatElement>::Acc::lit(count as f64) };
            Ok(Tensor::scalar(T::from_acc(mean)))
        })
    }

    /// d loss / d logits scaled by the upstream scalar `grad`: `(softmax - onehot) / count` on
    /// counted rows, 0 on ignored rows.
    pub fn cross_entropy_backward(
        &self,
        targets: &Tensor,
        ignore_index: u32,
        grad: &Tensor,
    ) -> Result<Tensor> {
        let (n, c, ids) = check(self, targets, ignore_index)?;
        let count = ids.iter().filter(|&&id| id != ignore_index).count();
        let scale = grad.to_scalar_f64()? / count.max(1) as f64;
        let x = self.contiguous();
        float_dispatch!("cross_entropy_backward", self.dtype(), T => {
            let xs = x.contiguous_slice::<T>();
            let mut out = vec![T::from_f64(0.0); n * c];
            out.par_chunks_mut(c.max(1)).zip(ids.par_iter()).enumerate().for_each(|(r, (dx, &id))| {
                if id == ignore_index {
                    return;
                }
                let row: Vec<_> = xs[r * c..(r + 1) * c].iter().map(|v| v.to_acc()).collect();
                let lse = log_sum_exp(&row);
                let s = <T as FloatElement>::Acc::lit(scale);
                for (j, (o, &v)) in dx.iter_mut().zip(&row).enumerate() {
                    let onehot = if j == id as usize { 1.0 } else { 0.0 };
                    *o = T::from_acc(((v - lse).exp() - <T as FloatElement>::Acc::lit(onehot)) * s);
                }
            });
            Ok(Tensor::from_cpu(CpuStorage::from_vec(out), &[n, c]))
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::Tensor;

    #[test]
    fn ignored_rows_do_not_count() {
        let logits = Tensor::from_vec(vec![0f64, 0., 5., -5.], &[2, 2]).unwrap();
        let targets = Tensor::from_vec(vec![1u32, 7], &[2]).unwrap();
        let loss = logits
            .cross_entropy(&targets, 7)
            .unwrap()
            .to_scalar_f64()
            .unwrap();
        assert!((loss - 2f64.ln()).abs() < 1e-15);
        let g = logits
            .cross_entropy_backward(&targets, 7, &Tensor::scalar(1f64))
            .unwrap();
        assert_eq!(g.to_vec_f64(), vec![0.5, -0.5, 0., 0.]);
    }

    #[test]
    fn a_target_out_of_range_is_named() {
        let logits = Tensor::zeros(&[2, 3], crate::DType::F32);
        let targets = Tensor::from_vec(vec![1u32, 3], &[2]).unwrap();
        let err = logits.cross_entropy(&targets, u32::MAX).unwrap_err().to_string();
        assert!(err.contains("target 3 at row 1"), "{err}");
    }
}
