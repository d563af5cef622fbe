//! Softmax and log-softmax along an axis, with their backward kernels. Each works on rows of
//! the axis moved last (a copy only when the axis is not already last), in parallel over rows,
//! computing in the dtype's compute type and rounding once.

use crate::dispatch::float_dispatch;
use crate::error::{range_err, shape_err};
use crate::gpu::{cuda_float_dispatch, Gpu};
use crate::ops::elementwise::{lane_fold, lane_sum, lane_sum_pairs, with_simd, LANES};
use crate::ops::par_write::par_write;
use crate::storage::CpuStorage;
use crate::{FloatElement, Real, Result, Tensor};
use num_traits::{Float, One, Zero};
use std::mem::MaybeUninit;

/// The row computation: forward from x, or backward from the forward output y and gradient g.
#[derive(Clone, Copy)]
enum Row {
    Softmax,
    LogSoftmax,
    SoftmaxBackward,
    LogSoftmaxBackward,
}

impl Row {
    /// Computes one row into `out`; `g` is empty for the forward rows; `buf` is scratch space.
    /// Inlined (as are the row functions) into the caller's SIMD-compiled closure.
    #[inline(always)]
    fn run<S: FloatElement>(self, x: &[S], g: &[S], out: &mut [MaybeUninit<S>], buf: &mut Vec<S::Acc>) {
        match self {
            Row::Softmax => softmax_row(x, out, buf),
            Row::LogSoftmax => log_softmax_row(x, out),
            Row::SoftmaxBackward => softmax_backward_row(x, g, out),
            Row::LogSoftmaxBackward => log_softmax_backward_row(x, g, out),
        }
    }
}

/// Applies `row` to every row along `axis` of `x` (and of `g` when given, same shape and dtype).
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
    let mut operands = vec![x];
    operands.extend(g);
    if let Some(gpu) = Gpu::of(op, &operands)? {
        return along_axis_cuda(&gpu, x, g, axis, row);
    }
    let last = x.rank() - 1;
    let to_last = |t: &Tensor| -> Result<Tensor> { Ok(t.transpose(axis, last)?.contiguous()) };
    let xs = to_last(x)?;
    let gs = g.map(to_last).transpose()?;
    let d = x.dim(axis);
    let out = float_dispatch!(op, x.dtype(), T => {
        let xr = xs.contiguous_slice::<T>();
        let gr = gs.as_ref().map(|g| g.contiguous_slice::<T>());
        // Tasks of whole rows, about PAR_CHUNK elements each (a task per short row costs more
        // than the row).
        let d = d.max(1);
        let rows_per_task = (crate::tensor::PAR_CHUNK / d).max(1);
        // SAFETY: each row function writes its whole output row, and the rows tile the chunk.
        let out = unsafe {
            par_write(xr.len(), rows_per_task * d, |c, chunk| {
                let mut buf = Vec::new();
                with_simd(#[inline(always)] || {
                    for (k, y) in chunk.chunks_mut(d).enumerate() {
                        let rows = (c * rows_per_task + k) * d..(c * rows_per_task + k + 1) * d;
                        let g = gr.map_or(&[][..], |g| &g[rows.clone()]);
                        row.run(&xr[rows], g, y, &mut buf);
                    }
                })
            })
        };
        CpuStorage::from_vec(out)
    });
    Tensor::from_cpu(out, xs.shape())
        .transpose(axis, last)
        .map(|t| t.contiguous())
}

/// `along_axis` on a CUDA device: the row kernels on the axis moved last and packed.
fn along_axis_cuda(gpu: &Gpu, x: &Tensor, g: Option<&Tensor>, axis: usize, row: Row) -> Result<Tensor> {
    let last = x.rank() - 1;
    let to_last = |t: &Tensor| -> Result<Tensor> { gpu.packed(&t.transpose(axis, last)?) };
    let xs = to_last(x)?;
    let gs = g.map(to_last).transpose()?;
    let d = x.dim(axis);
    let rows = xs.numel().checked_div(d).unwrap_or(0);
    let out = cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let xb = xs.cuda_buffer::<T>();
        let mut out = gpu.alloc::<T>(xs.numel())?;
        // The backward rows come with a gradient, the forward rows without.
        let launched = match &gs {
            None if matches!(row, Row::LogSoftmax) => gpu.dev.log_softmax(xb, &mut out, rows, d),
            None => gpu.dev.softmax(xb, &mut out, rows, d),
            Some(g) => {
                let log = matches!(row, Row::LogSoftmaxBackward);
                gpu.dev.softmax_backward(xb, g.cuda_buffer::<T>(), &mut out, (rows, d), log)
            }
        };
        gpu.check(launched)?;
        gpu.tensor(out, xs.shape())
    });
    out.transpose(axis, last)?.try_contiguous()
}

/// The largest element of a row, widened, by a plain comparison (a single vector max, where
/// `f32::max`'s NaN rule costs a compare and a blend more), in four groups of lanes so that the
/// maxima do not wait on each other: a NaN may or may not win here, and either way it reaches
/// every output through `exp` and the row sum.
#[inline(always)]
fn row_max<S: FloatElement>(x: &[S]) -> S::Acc {
    let bigger = |a: S::Acc, b: S::Acc| if b > a { b } else { a };
    lane_fold::<4, _, _>(x, S::Acc::neg_infinity(), |v: S| v.to_acc(), bigger)
}

/// `exp(x - max) / Σ exp(x - max)`, in three passes: the max; the exponentials, stored and
/// summed as they are made; the scale. For f32 and f64 the exponentials go straight into the
/// output and are scaled there, so the output's cache lines are claimed while `exp` computes
/// rather than in the last, memory-bound pass (measured in `BENCHMARKS.md`); 16-bit rows keep
/// them in the compute type in `buf` and round once.
#[inline(always)]
fn softmax_row<S: FloatElement>(x: &[S], y: &mut [MaybeUninit<S>], buf: &mut Vec<S::Acc>) {
    let m = row_max(x);
    let exp = |v: S| (v.to_acc() - m).exp_nonpositive();
    // A row already in the compute type can hold the exponentials until they are scaled.
    if S::as_acc(x).is_some() {
        let store = |o: &mut MaybeUninit<S>, e| {
            o.write(S::from_acc(e));
        };
        let inv = S::Acc::one() / store_and_sum(x, y, exp, store);
        for o in y.iter_mut() {
            // SAFETY: `store_and_sum` wrote every element of `y`.
            let e = unsafe { o.assume_init_read() };
            o.write(S::from_acc(e.to_acc() * inv));
        }
    } else {
        buf.resize(x.len(), S::Acc::zero());
        let inv = S::Acc::one() / store_and_sum(x, buf, exp, |o, e| *o = e);
        for (o, &e) in y.iter_mut().zip(buf.iter()) {
            o.write(S::from_acc(e * inv));
        }
    }
}

/// Stores `f(x)` for each element through `store` into `out` (as long as `x`: every element of
/// it is stored) and returns their sum, added in [`LANES`] partial sums in `lane_sum`'s order.
#[inline(always)]
fn store_and_sum<S: Copy, O, A: Real>(
    x: &[S],
    out: &mut [O],
    f: impl Fn(S) -> A,
    store: impl Fn(&mut O, A),
) -> A {
    assert_eq!(x.len(), out.len(), "store_and_sum: input and output lengths");
    let mut acc = [A::zero(); LANES];
    let blocks = x.chunks_exact(LANES);
    let rest = blocks.remainder();
    let (whole, tail) = out.split_at_mut(x.len() - rest.len());
    for (xs, os) in blocks.zip(whole.chunks_exact_mut(LANES)) {
        // The values first, then the stores and sums in a loop of their own: with `f` in the
        // same loop as the sums, `acc` lived on the stack, and each block waited on the
        // previous one's store and reload of it (`BENCHMARKS.md`).
        let mut block = [A::zero(); LANES];
        for (b, &v) in block.iter_mut().zip(xs) {
            *b = f(v);
        }
        for ((s, o), b) in acc.iter_mut().zip(os).zip(block) {
            store(o, b);
            *s += b;
        }
    }
    for ((s, o), &v) in acc.iter_mut().zip(tail).zip(rest) {
        let e = f(v);
        store(o, e);
        *s += e;
    }
    acc.iter().fold(A::zero(), |t, &s| t + s)
}

/// A row's max `m` and `ln Σ exp(x - m)`, in the compute type (kept apart: adding them first
/// would round away the small terms next to a large max).
#[inline(always)]
fn max_and_log_sum<S: FloatElement>(row: &[S]) -> (S::Acc, S::Acc) {
    let m = row_max(row);
    (m, lane_sum(row, |v: S| (v.to_acc() - m).exp_fast()).ln())
}

/// `log Σ exp(row)`, max-subtracted, in the compute type.
#[inline(always)]
pub(crate) fn log_sum_exp<S: FloatElement>(row: &[S]) -> S::Acc {
    let (m, ls) = max_and_log_sum(row);
    m + ls
}

/// `(x - max) - ln Σ exp(x - max)`.
#[inline(always)]
fn log_softmax_row<S: FloatElement>(x: &[S], y: &mut [MaybeUninit<S>]) {
    let (m, ls) = max_and_log_sum(x);
    for (o, v) in y.iter_mut().zip(x) {
        o.write(S::from_acc((v.to_acc() - m) - ls));
    }
}

/// `y · (g - Σ g·y)`.
#[inline(always)]
fn softmax_backward_row<S: FloatElement>(y: &[S], g: &[S], dx: &mut [MaybeUninit<S>]) {
    let dot: S::Acc = lane_sum_pairs(y, g, |a: S, b: S| a.to_acc() * b.to_acc());
    for ((o, yv), gv) in dx.iter_mut().zip(y).zip(g) {
        o.write(S::from_acc(yv.to_acc() * (gv.to_acc() - dot)));
    }
}

/// `g - exp(y) · Σ g`.
#[inline(always)]
fn log_softmax_backward_row<S: FloatElement>(y: &[S], g: &[S], dx: &mut [MaybeUninit<S>]) {
    let total: S::Acc = lane_sum(g, |v: S| v.to_acc());
    for ((o, yv), gv) in dx.iter_mut().zip(y).zip(g) {
        o.write(S::from_acc(gv.to_acc() - yv.to_acc().exp_fast() * total));
    }
}

impl Tensor {
    /// Softmax along `axis` (max-subtracted, f32/f64 accumulation).
    pub fn softmax(&self, axis: usize) -> Result<Tensor> {
        along_axis("softmax", self, None, axis, Row::Softmax)
    }

    /// Log-softmax along `axis`: `(x - max) - ln Σ exp(x - max)`.
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
    use crate::{DType, Tensor};

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol)
    }

    #[test]
    fn softmax_of_zero_and_ln2() {
        let x = Tensor::from_vec(vec![0f64, 2f64.ln()], &[1, 2]).unwrap();
        let y = x.softmax(1).unwrap().to_vec_f64();
        assert!(close(&y, &[1.0 / 3.0, 2.0 / 3.0], 1e-15), "{y:?}");
        let l = x.log_softmax(1).unwrap().to_vec_f64();
        assert!(
            close(&l, &[(1.0f64 / 3.0).ln(), (2.0f64 / 3.0).ln()], 1e-15),
            "{l:?}"
        );
    }

    #[test]
    fn rows_sum_to_one_along_any_axis_and_dtype() {
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16] {
            let x = Tensor::arange(24, dtype).reshape(&[2, 3, 4]).unwrap();
            for axis in 0..3 {
                let s = x.softmax(axis).unwrap();
                assert_eq!((s.shape(), s.dtype()), (&[2, 3, 4][..], dtype));
                let sums = s.sum(&[axis], false).unwrap().to_vec_f64();
                assert!(
                    sums.iter().all(|v| (v - 1.0).abs() < 1e-2),
                    "{dtype} {axis} {sums:?}"
                );
            }
        }
    }

    #[test]
    fn large_logits_do_not_overflow() {
        let x = Tensor::from_vec(vec![1000f32, 1000., -1000.], &[3]).unwrap();
        assert_eq!(
            x.softmax(0).unwrap().to_vec::<f32>().unwrap(),
            vec![0.5, 0.5, 0.0]
        );
        let l = x.log_softmax(0).unwrap().to_vec_f64();
        assert!(
            close(&l[..2], &[-(2f64.ln()); 2], 1e-6) && l[2] < -1999.0,
            "{l:?}"
        );
    }

    #[test]
    fn backward_rows_by_hand() {
        // y = [0.25, 0.75], g = [1, 3]: Σ g·y = 2.5, so dx = [0.25·-1.5, 0.75·0.5].
        let y = Tensor::from_vec(vec![0.25f64, 0.75], &[2, 1]).unwrap();
        let g = Tensor::from_vec(vec![1f64, 3.], &[2, 1]).unwrap();
        assert_eq!(
            y.softmax_backward(&g, 0).unwrap().to_vec_f64(),
            vec![-0.375, 0.375]
        );
        // log-softmax: dx = g - exp(y)·Σ g with y = ln([0.25, 0.75]), Σ g = 4.
        let ly = y.log().unwrap();
        let dx = ly.log_softmax_backward(&g, 0).unwrap().to_vec_f64();
        assert!(close(&dx, &[0.0, 0.0], 1e-15), "{dx:?}");
        assert!(y.softmax_backward(&g.reshape(&[2]).unwrap(), 0).is_err());
        assert!(y.softmax(2).is_err());
    }
}
