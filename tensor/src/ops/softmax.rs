//! Softmax and log-softmax along an axis, with their backward kernels. Each works on rows of
//! the axis moved last, in parallel over rows, accumulating in the dtype's compute type.

use crate::dispatch::float_dispatch;
use crate::error::{range_err, shape_err};
use crate::storage::CpuStorage;
use crate::{FloatElement, Real, Result, Tensor};
use num_traits::Zero;
use rayon::prelude::*;

/// The row computation: forward from x, or backward from the forward output y and gradient g.
#[derive(Clone, Copy)]
enum Row {
    Softmax,
    LogSoftmax,
    SoftmaxBackward,
    LogSoftmaxBackward,
}

impl Row {
    fn run<A: Real>(self, x: &[A], g: &[A], out: &mut [A]) {
        match self {
            Row::Softmax => softmax_row(x, out),
            Row::LogSoftmax => log_softmax_row(x, out),
            Row::SoftmaxBackward => softmax_backward_row(x, g, out),
            Row::LogSoftmaxBackward => log_softmax_backward_row(x, g, out),
        }
    }
}

/// Applies `f` to every row along `axis` of `x` (and of `g` when given, same shape).
fn along_axis(op: &'static str, x: &Tensor, g: Option<&Tensor>, axis: usize, row: Row) -> Result<Tensor> {
    if axis >= x.rank() {
        return range_err(op, format!("axis {axis} out of range for shape {:?}", x.shape()));
    }
    if let Some(g) = g {
        if g.shape() != x.shape() {
            return shape_err(op, format!("output {:?} vs gradient {:?}", x.shape(), g.shape()));
        }
        x.check_same_dtype(op, g)?;
    }
    let last = x.rank() - 1;
    let to_last = |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(axis, last)?.contiguous()) };
    let xs = to_last(x)?;
    let gs = g.map(to_last).transpose()?;
    let d = x.dim(axis);
    let out = float_dispatch!(op, x.dtype(), T => {
        let xr = xs.contiguous_slice::<T>();
        let gr = gs.as_ref().map(|g| g.contiguous_slice::<T>());
        let mut out = vec![T::from_acc(Zero::zero()); xr.len()];
        out.par_chunks_mut(d.max(1)).enumerate().for_each(|(r, y)| {
            let wide = |s: &[T]| s[r * d..(r + 1) * d].iter().map(|v| v.to_acc()).collect::<Vec<_>>();
            let xa = wide(xr);
            let ga = gr.map(wide).unwrap_or_default();
            let mut ya = vec![<T as FloatElement>::Acc::zero(); d];
            row.run(&xa, &ga, &mut ya);
            for (o, v) in y.iter_mut().zip(ya) {
                *o = T::from_acc(v);
            }
        });
        CpuStorage::from_vec(out)
    });
    Ok(Tensor::from_cpu(out, xs.shape())
        .transpose(axis, last)?
        .contiguous())
}

fn max_and_sum_exp<A: Real>(x: &[A]) -> (A, A) {
    let m = x.iter().fold(A::neg_infinity(), |m, &v| m.max(v));
    (m, x.iter().map(|&v| (v - m).exp()).sum())
}

fn softmax_row<A: Real>(x: &[A], y: &mut [A]) {
    let (m, s) = max_and_sum_exp(x);
    for (o, &v) in y.iter_mut().zip(x) {
        *o = (v - m).exp() / s;
    }
}

fn log_softmax_row<A: Real>(x: &[A], y: &mut [A]) {
    let (m, s) = max_and_sum_exp(x);
    let lse = m + s.ln();
    for (o, &v) in y.iter_mut().zip(x) {
        *o = v - lse;
    }
}

fn softmax_backward_row<A: Real>(y: &[A], g: &[A], dx: &mut [A]) {
    let dot: A = y.iter().zip(g).map(|(&a, &b)| a * b).sum();
    for ((o, &yv), &gv) in dx.iter_mut().zip(y).zip(g) {
        *o = yv * (gv - dot);
    }
}

fn log_softmax_backward_row<A: Real>(y: &[A], g: &[A], dx: &mut [A]) {
    let total: A = g.iter().copied().sum();
    for ((o, &yv), &gv) in dx.iter_mut().zip(y).zip(g) {
        *o = gv - yv.exp() * total;
    }
}

impl Tensor {
    /// Softmax along `axis` (max-subtracted).
    pub fn softmax(&self, axis: usize) -> Result<Tensor> {
        along_axis("softmax", self, None, axis, Row::Softmax)
    }

    /// Log-softmax along `axis`.
    pub fn log_softmax(&self, axis: usize) -> Result<Tensor> {
        along_axis("log_softmax", self, None, axis, Row::LogSoftmax)
    }

    /// Backward of softmax with `self` = its output y: `y · (g - Σ g·y)`.
    pub fn softmax_backward(&self, grad: &Tensor, axis: usize) -> Result<Tensor> {
        along_axis("softmax_backward", self, Some(grad), axis, Row::SoftmaxBackward)
    }

    /// Backward of log-softmax with `self` = its output y: `g - exp(y) · Σ g`.
    pub fn log_softmax_backward(&self, grad: &Tensor, axis: usize) -> Result<Tensor> {
        along_axis(
            "log_softmax_backward",
            self,
            Some(grad),
            axis,
            Row::LogSoftmaxBackward,
        )
    }
}

#[cfg(test)]
mod tests {
    use crate::Tensor;

    #[test]
    fn softmax_of_zero_and_ln2() {
        let x = Tensor::from_vec(vec![0f64, 2f64.ln()], &[1, 2]).unwrap();
        let y = x.softmax(1).unwrap().to_vec_f64();
        assert!((y[0] - 1.0 / 3.0).abs() < 1e-15 && (y[1] - 2.0 / 3.0).abs() < 1e-15);
        let l = x.log_softmax(1).unwrap().to_vec_f64();
        assert!((l[1] - (2.0f64 / 3.0).ln()).abs() < 1e-15);
    }

    #[test]
    fn softmax_along_the_first_axis_sums_to_one() {
        let x = Tensor::arange(6, crate::DType::F32).reshape(&[3, 2]).unwrap();
        let s = x
            .softmax(0)
            .unwrap()
            .sum(&[0], false)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-6), "{s:?}");
    }
}
