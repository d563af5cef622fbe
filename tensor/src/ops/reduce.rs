//! Reductions over axes. Each reduces one axis of a contiguous `[outer, len, inner]` view,
//! in parallel over `outer`, accumulating in the dtype's compute type.

use crate::dispatch::float_dispatch;
use crate::error::{range_err, shape_err};
use crate::storage::CpuStorage;
use crate::{DType, Element, FloatElement, Result, Tensor};
use num_traits::{Float, Zero};
use rayon::prelude::*;

/// How one axis is reduced.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reduce {
    Sum,
    Max,
    Min,
}

/// Sizes of the axes before, at and after `axis`.
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (shape[..axis].iter().product(), shape[axis], shape[axis + 1..].iter().product())
}

fn reduced_shape(shape: &[usize], axes: &[usize], keepdim: bool) -> Vec<usize> {
    let mut out = Vec::with_capacity(shape.len());
    for (i, &d) in shape.iter().enumerate() {
        if !axes.contains(&i) {
            out.push(d);
        } else if keepdim {
            out.push(1);
        }
    }
    out
}

fn check_axes(op: &'static str, shape: &[usize], axes: &[usize]) -> Result<()> {
    for (i, &a) in axes.iter().enumerate() {
        if a >= shape.len() {
            return range_err(op, format!("axis {a} out of range for shape {shape:?}"));
        }
        if axes[..i].contains(&a) {
            return range_err(op, format!("axis {a} given twice in {axes:?}"));
        }
    }
    Ok(())
}

/// `out[o, i] = reduce_j x[o, j, i]` for a contiguous slice viewed as `[outer, len, inner]`.
fn reduce_axis<T: FloatElement>(xs: &[T], (outer, len, inner): (usize, usize, usize), how: Reduce) -> Vec<T> {
    let init = match how {
        Reduce::Sum => T::Acc::zero(),
        Reduce::Max => T::Acc::neg_infinity(),
        Reduce::Min => T::Acc::infinity(),
    };
    let combine = |acc: T::Acc, v: T::Acc| match how {
        Reduce::Sum => acc + v,
        // NaN propagates, so a NaN input never hides behind a larger value.
        _ if acc.is_nan() || v.is_nan() => T::Acc::nan(),
        Reduce::Max => acc.max(v),
        Reduce::Min => acc.min(v),
    };
    let mut out = vec![T::from_acc(init); outer * inner];
    out.par_chunks_mut(inner.max(1)).enumerate().for_each(|(o, row)| {
        let block = &xs[o * len * inner..(o + 1) * len * inner];
        if inner == 1 {
            row[0] = T::from_acc(block.iter().fold(init, |acc, v| combine(acc, v.to_acc())));
            return;
        }
        let mut acc = vec![init; inner];
        for j in 0..len {
            for (a, v) in acc.iter_mut().zip(&block[j * inner..(j + 1) * inner]) {
                *a = combine(*a, v.to_acc());
            }
        }
        for (r, a) in row.iter_mut().zip(acc) {
            *r = T::from_acc(a);
        }
    });
    out
}

impl Tensor {
    fn reduce(&self, op: &'static str, axes: &[usize], keepdim: bool, how: Reduce) -> Result<Tensor> {
        check_axes(op, self.shape(), axes)?;
        // 16-bit inputs reduce in f32 and round once at the end.
        let wide = matches!(self.dtype(), DType::BF16 | DType::F16);
        let mut x = if wide { self.to_dtype(DType::F32)? } else { self.contiguous() };
        let mut shape = self.shape().to_vec();
        for &axis in axes {
            let dims = split(&shape, axis);
            float_dispatch!(op, x.dtype(), T => {
                let out = reduce_axis::<T>(x.contiguous().contiguous_slice::<T>(), dims, how);
                shape[axis] = 1;
                x = Tensor::from_cpu(CpuStorage::from_vec(out), &shape);
            })
        }
        let x = x.reshape(&reduced_shape(self.shape(), axes, keepdim))?;
        x.to_dtype(self.dtype())
    }

    /// Sum over `axes` (empty = no reduction); reduced axes are kept with size 1 when `keepdim`.
    pub fn sum(&self, axes: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce("sum", axes, keepdim, Reduce::Sum)
    }

    /// Mean over `axes`.
    pub fn mean(&self, axes: &[usize], keepdim: bool) -> Result<Tensor> {
        check_axes("mean", self.shape(), axes)?;
        let count: usize = axes.iter().map(|&a| self.dim(a)).product();
        let sum = self.reduce("mean", axes, keepdim, Reduce::Sum)?;
        sum.affine(1.0 / count as f64, 0.0)
    }

    /// Sum of every element as a rank-0 tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        let axes: Vec<usize> = (0..self.rank()).collect();
        self.sum(&axes, false)
    }

    fn check_nonempty(&self, op: &'static str, axis: usize) -> Result<()> {
        check_axes(op, self.shape(), &[axis])?;
        if self.dim(axis) == 0 {
            return shape_err(op, format!("axis {axis} of {:?} is empty", self.shape()));
        }
        Ok(())
    }

    /// Maximum over one axis (NaN if the axis holds a NaN).
    pub fn max(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        self.check_nonempty("max", axis)?;
        self.reduce("max", &[axis], keepdim, Reduce::Max)
    }

    /// Minimum over one axis (NaN if the axis holds a NaN).
    pub fn min(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        self.check_nonempty("min", axis)?;
        self.reduce("min", &[axis], keepdim, Reduce::Min)
    }

    /// Index (u32) of the first maximum along one axis.
    pub fn argmax(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        self.check_nonempty("argmax", axis)?;
        let x = self.contiguous();
        let (outer, len, inner) = split(self.shape(), axis);
        let out = float_dispatch!("argmax", self.dtype(), T => {
            let xs = x.contiguous_slice::<T>();
            let mut out = vec![0u32; outer * inner];
            out.par_chunks_mut(inner.max(1)).enumerate().for_each(|(o, row)| {
                for (i, r) in row.iter_mut().enumerate() {
                    let at = |j: usize| xs[(o * len + j) * inner + i].to_f64();
                    *r = (1..len).fold(0, |best, j| if at(j) > at(best) { j } else { best }) as u32;
                }
            });
            out
        });
        Ok(Tensor::from_cpu(CpuStorage::from_vec(out), &reduced_shape(self.shape(), &[axis], keepdim)))
    }

    /// Sums a broadcast tensor back down to `shape` (the inverse of `broadcast_to`, for gradients).
    pub fn sum_to_shape(&self, shape: &[usize]) -> Result<Tensor> {
        let src = self.shape();
        let lead = src.len().checked_sub(shape.len());
        let fits = lead.is_some_and(|lead| {
            shape.iter().zip(&src[lead..]).all(|(&t, &s)| t == s || t == 1)
        });
        let Some(lead) = lead.filter(|_| fits) else {
            return shape_err("sum_to_shape", format!("{src:?} does not broadcast from {shape:?}"));
        };
        let axes: Vec<usize> = (0..src.len())
            .filter(|&i| i < lead || (shape[i - lead] == 1 && src[i] != 1))
            .collect();
        self.sum(&axes, true)?.reshape(shape)
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Tensor};

    fn t23() -> Tensor {
        Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], &[2, 3]).unwrap()
    }

    #[test]
    fn sums_over_axes() {
        assert_eq!(t23().sum(&[0], false).unwrap().to_vec::<f32>().unwrap(), vec![5., 7., 9.]);
        assert_eq!(t23().sum(&[1], true).unwrap().shape(), &[2, 1]);
        assert_eq!(t23().sum_all().unwrap().to_scalar_f64().unwrap(), 21.0);
        assert_eq!(t23().t().unwrap().mean(&[0], false).unwrap().to_vec::<f32>().unwrap(), vec![2., 5.]);
    }

    #[test]
    fn extremes_and_argmax() {
        let x = Tensor::from_vec(vec![3f64, 1., 3., 0., 5., 5.], &[2, 3]).unwrap();
        assert_eq!(x.max(1, false).unwrap().to_vec_f64(), vec![3., 5.]);
        assert_eq!(x.min(0, false).unwrap().to_vec_f64(), vec![0., 1., 3.]);
        assert_eq!(x.argmax(1, false).unwrap().to_vec::<u32>().unwrap(), vec![0, 1]);
        assert!(x.max(2, false).is_err());
    }

    #[test]
    fn sum_to_shape_inverts_broadcasting() {
        let x = Tensor::ones(&[4, 2, 3], DType::F32);
        let s = x.sum_to_shape(&[2, 1]).unwrap();
        assert_eq!(s.shape(), &[2, 1]);
        assert_eq!(s.to_vec::<f32>().unwrap(), vec![12., 12.]);
        assert!(x.sum_to_shape(&[5]).is_err());
    }
}
