//! Reductions over axes. A run of adjacent reduced axes is folded in one pass over the
//! contiguous input viewed as `[outer, len, inner]`; separate runs fold one after another in the
//! dtype's compute type (f32 for 16-bit types, f64 for f64) and the result is rounded once.
//!
//! Work is split into tasks by the shape alone (never by the thread count), so a reduction gives
//! bit-identical results on any number of threads.

use crate::dispatch::float_dispatch;
use crate::error::{range_err, shape_err};
use crate::gpu::{cuda_float_dispatch, Gpu};
use crate::storage::CpuStorage;
use crate::{FloatElement, Real, Result, Tensor, TensorError};
use cuda::kernels::{Dims3, ReduceOp};
use num_traits::Float;
use rayon::prelude::*;

/// Columns of the `inner` axis that one task folds together.
const TILE: usize = 512;
/// Elements of a contiguous row folded serially before their partial joins the row's total.
const ROW_BLOCK: usize = 4096;
/// With fewer independent outputs (rows or tiles) than this, the reduced axis itself is split.
const MIN_TASKS: usize = 64;
/// Fewest rows of the reduced axis in one task when it is split.
const MIN_GROUP_ROWS: usize = 64;

/// How an axis is reduced.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reduce {
    Sum,
    Max,
    Min,
}

/// Sizes of the axes before, at and after `axis`.
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

/// `shape` without `axes` (or with them set to 1 when `keepdim`).
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

/// Every axis must be in range and given once.
fn check_axes(op: &'static str, shape: &[usize], axes: &[usize]) -> Result<()> {
    for (i, &a) in axes.iter().enumerate() {
        if a >= shape.len() {
            return range_err(op, format!("axis {a} out of range for shape {shape:?}"));
        }
        if axes[..i].contains(&a) {
            return range_err(
                op,
                format!("axis {a} given twice in {axes:?} for shape {shape:?}"),
            );
        }
    }
    Ok(())
}

/// Maximal runs `start..end` of adjacent axes among `axes`.
fn runs(axes: &[usize]) -> Vec<(usize, usize)> {
    let mut sorted = axes.to_vec();
    sorted.sort_unstable();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for a in sorted {
        match runs.last_mut() {
            Some((_, end)) if *end == a => *end = a + 1,
            _ => runs.push((a, a + 1)),
        }
    }
    runs
}

/// max that propagates NaN.
fn max_nan<A: Real>(acc: A, v: A) -> A {
    if v > acc || v.is_nan() {
        v
    } else {
        acc
    }
}

/// min that propagates NaN.
fn min_nan<A: Real>(acc: A, v: A) -> A {
    if v < acc || v.is_nan() {
        v
    } else {
        acc
    }
}

/// Folds `[outer, len, inner]` over `len` into `outer * inner` values of the compute type.
fn fold_view<S: FloatElement<Acc = A>, A: Real>(
    xs: &[S],
    dims: (usize, usize, usize),
    how: Reduce,
) -> Vec<A> {
    match how {
        Reduce::Sum => fold_dims(xs, dims, A::zero(), |a, v| a + v),
        Reduce::Max => fold_dims(xs, dims, A::neg_infinity(), max_nan),
        Reduce::Min => fold_dims(xs, dims, A::infinity(), min_nan),
    }
}

/// `fold_view` with the combining function `f` (also used to join partial results).
fn fold_dims<S, A, F>(xs: &[S], (outer, len, inner): (usize, usize, usize), init: A, f: F) -> Vec<A>
where
    S: FloatElement<Acc = A>,
    A: Real,
    F: Fn(A, A) -> A + Sync + Copy,
{
    if outer * inner == 0 {
        return Vec::new();
    }
    if inner == 1 {
        fold_rows(xs, outer, len, init, f)
    } else {
        fold_columns(xs, (outer, len, inner), init, f)
    }
}

/// Folds a contiguous block with 8 independent lanes (vectorisable, and more accurate sums).
fn fold_block<S: FloatElement<Acc = A>, A: Real>(xs: &[S], init: A, f: impl Fn(A, A) -> A) -> A {
    let mut lanes = [init; 8];
    let mut chunks = xs.chunks_exact(8);
    for c in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l = f(*l, v.to_acc());
        }
    }
    let acc = chunks.remainder().iter().fold(init, |a, v| f(a, v.to_acc()));
    lanes.into_iter().fold(acc, f)
}

/// `inner == 1`: each output folds one contiguous row, block by block.
fn fold_rows<S, A, F>(xs: &[S], outer: usize, len: usize, init: A, f: F) -> Vec<A>
where
    S: FloatElement<Acc = A>,
    A: Real,
    F: Fn(A, A) -> A + Sync + Copy,
{
    let fold_row = |row: &[S]| -> A {
        if outer >= MIN_TASKS || len <= ROW_BLOCK {
            row.chunks(ROW_BLOCK)
                .map(|c| fold_block(c, init, f))
                .fold(init, f)
        } else {
            // Few long rows: fold the blocks in parallel, then join them in order.
            let parts: Vec<A> = row
                .par_chunks(ROW_BLOCK)
                .map(|c| fold_block(c, init, f))
                .collect();
            parts.into_iter().fold(init, f)
        }
    };
    let mut out = vec![init; outer];
    out.par_iter_mut()
        .enumerate()
        .for_each(|(o, r)| *r = fold_row(&xs[o * len..(o + 1) * len]));
    out
}

/// Runs `f(o, c0, tile)` in parallel on every tile (at most `TILE` columns from column `c0`) of
/// every row `o` of a non-empty `[outer, inner]` output.
fn par_tiles<X: Send>(out: &mut [X], inner: usize, f: impl Fn(usize, usize, &mut [X]) + Sync + Send) {
    if inner <= TILE {
        out.par_chunks_mut(inner)
            .enumerate()
            .for_each(|(o, row)| f(o, 0, row));
    } else {
        out.par_chunks_mut(inner)
            .enumerate()
            .flat_map(|(o, row)| {
                row.par_chunks_mut(TILE)
                    .enumerate()
                    .map(move |(t, c)| (o, t * TILE, c))
            })
            .for_each(|(o, c0, c)| f(o, c0, c));
    }
}

/// `inner > 1`: each task folds a tile of columns over (a group of) the `len` rows.
fn fold_columns<S, A, F>(xs: &[S], (outer, len, inner): (usize, usize, usize), init: A, f: F) -> Vec<A>
where
    S: FloatElement<Acc = A>,
    A: Real,
    F: Fn(A, A) -> A + Sync + Copy,
{
    // Folds rows `rows` of columns `c0..c0+acc.len()` of block `o` into `acc`.
    let fold_tile = |o: usize, c0: usize, rows: std::ops::Range<usize>, acc: &mut [A]| {
        for j in rows {
            let base = (o * len + j) * inner + c0;
            let w = acc.len();
            for (a, v) in acc.iter_mut().zip(&xs[base..base + w]) {
                *a = f(*a, v.to_acc());
            }
        }
    };
    let tiles = inner.div_ceil(TILE);
    let mut out = vec![init; outer * inner];
    if outer * tiles >= MIN_TASKS {
        par_tiles(&mut out, inner, |o, c0, acc| fold_tile(o, c0, 0..len, acc));
        return out;
    }
    // Few tiles: also split the reduced axis into groups, fold them in parallel, join in order.
    let groups = MIN_TASKS
        .div_ceil(outer * tiles)
        .min(len.div_ceil(MIN_GROUP_ROWS))
        .max(1);
    let rows_per_group = len.div_ceil(groups).max(1);
    let parts: Vec<Vec<A>> = (0..outer * tiles * groups)
        .into_par_iter()
        .map(|task| {
            let (o, t, g) = (task / (tiles * groups), task / groups % tiles, task % groups);
            let c0 = t * TILE;
            let mut acc = vec![init; TILE.min(inner - c0)];
            let rows = (g * rows_per_group).min(len)..((g + 1) * rows_per_group).min(len);
            fold_tile(o, c0, rows, &mut acc);
            acc
        })
        .collect();
    for (task, part) in parts.iter().enumerate() {
        let (o, t) = (task / (tiles * groups), task / groups % tiles);
        let start = o * inner + t * TILE;
        for (a, &p) in out[start..start + part.len()].iter_mut().zip(part) {
            *a = f(*a, p);
        }
    }
    out
}

/// Reduces the runs of axes `runs` of a contiguous `shape`-d slice; divides by `divisor` (for
/// means) before rounding once to `T`.
fn reduce_runs<T>(
    xs: &[T],
    shape: &[usize],
    runs: &[(usize, usize)],
    how: Reduce,
    divisor: Option<f64>,
) -> Vec<T>
where
    T: FloatElement,
    T::Acc: FloatElement<Acc = T::Acc>,
{
    let mut shape = shape.to_vec();
    let mut pass = |(start, end): (usize, usize)| {
        let dims = (
            shape[..start].iter().product(),
            shape[start..end].iter().product(),
            shape[end..].iter().product(),
        );
        shape[start..end].fill(1);
        dims
    };
    let mut acc: Vec<T::Acc> = match runs.split_first() {
        None => xs.par_iter().map(|v| v.to_acc()).collect(),
        Some((&first, _)) => fold_view(xs, pass(first), how),
    };
    for &run in runs.iter().skip(1) {
        acc = fold_view(&acc, pass(run), how);
    }
    match divisor {
        None => acc.into_par_iter().map(T::from_acc).collect(),
        Some(d) => {
            let d = <T::Acc as Real>::lit(d);
            acc.into_par_iter().map(|v| T::from_acc(v / d)).collect()
        }
    }
}

/// `reduce` on a CUDA device over the runs of axes `first` and then `rest`. One run is one kernel
/// pass rounding straight to the dtype; with several runs every pass but the last writes f32 and
/// the result is rounded once at the end, as on the CPU. A mean divides by `mean_of`.
fn reduce_cuda(
    gpu: &Gpu,
    x: &Tensor,
    (first, rest): (&(usize, usize), &[(usize, usize)]),
    how: Reduce,
    mean_of: Option<usize>,
) -> Result<Tensor> {
    let x = gpu.packed(x)?;
    let mut shape = x.shape().to_vec();
    // The pass over run `(start, end)`: the dims it reduces, and `shape` updated past it.
    let mut pass = |(start, end): (usize, usize)| {
        let dims = Dims3 {
            outer: shape[..start].iter().product(),
            len: shape[start..end].iter().product(),
            inner: shape[end..].iter().product(),
        };
        shape[start..end].fill(1);
        dims
    };
    let op = |last: bool| match (how, mean_of) {
        (Reduce::Sum, Some(count)) if last => ReduceOp::Mean { count },
        (Reduce::Sum, _) => ReduceOp::Sum,
        (Reduce::Max, _) => ReduceOp::Max,
        (Reduce::Min, _) => ReduceOp::Min,
    };
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let dims = pass(*first);
        if rest.is_empty() {
            let mut out = gpu.alloc::<T>(dims.outer * dims.inner)?;
            gpu.check(gpu.dev.reduce(op(true), x.cuda_buffer::<T>(), dims, &mut out))?;
            return Ok(gpu.tensor(out, &shape));
        }
        let mut acc = gpu.alloc::<f32>(dims.outer * dims.inner)?;
        gpu.check(gpu.dev.reduce_to_f32(op(false), x.cuda_buffer::<T>(), dims, &mut acc))?;
        for (i, &run) in rest.iter().enumerate() {
            let dims = pass(run);
            let mut next = gpu.alloc::<f32>(dims.outer * dims.inner)?;
            gpu.check(gpu.dev.reduce(op(i + 1 == rest.len()), &acc, dims, &mut next))?;
            acc = next;
        }
        gpu.cast(&gpu.tensor(acc, &shape), <T as crate::Element>::DTYPE)
    })
}

/// `argmax` on a CUDA device.
fn argmax_cuda(gpu: &Gpu, x: &Tensor, axis: usize) -> Result<Tensor> {
    let x = gpu.packed(x)?;
    let dims = Dims3::around(x.shape(), axis);
    let mut out = gpu.alloc::<u32>(dims.outer * dims.inner)?;
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        gpu.check(gpu.dev.argmax(x.cuda_buffer::<T>(), dims, &mut out))?;
    });
    Ok(gpu.tensor(out, &reduced_shape(x.shape(), &[axis], true)))
}

impl Tensor {
    /// Shared body of sum, mean, max and min.
    fn reduce(
        &self,
        op: &'static str,
        axes: &[usize],
        keepdim: bool,
        how: Reduce,
        mean: bool,
    ) -> Result<Tensor> {
        check_axes(op, self.shape(), axes)?;
        if let Some(gpu) = Gpu::of(op, &[self])? {
            let out_shape = reduced_shape(self.shape(), axes, keepdim);
            let count = mean.then(|| axes.iter().map(|&a| self.dim(a)).product::<usize>());
            return match runs(axes).split_first() {
                Some(runs) => reduce_cuda(&gpu, self, runs, how, count)?.reshape(&out_shape),
                // Nothing to reduce: the elements themselves (a mean divides by 1).
                None if self.dtype().is_float() => gpu.copy(self)?.reshape(&out_shape),
                None => Err(TensorError::DType {
                    op,
                    dtype: self.dtype(),
                }),
            };
        }
        let divisor = mean.then(|| axes.iter().map(|&a| self.dim(a)).product::<usize>() as f64);
        let x = self.contiguous();
        let out = float_dispatch!(op, self.dtype(), T => CpuStorage::from_vec(reduce_runs::<T>(
            x.contiguous_slice::<T>(),
            self.shape(),
            &runs(axes),
            how,
            divisor,
        )));
        Ok(Tensor::from_cpu(out, &reduced_shape(self.shape(), axes, keepdim)))
    }

    /// Sum over `axes` (empty = no reduction); reduced axes are kept with size 1 when `keepdim`.
    /// Accumulates in f32 for 16-bit dtypes and f64 for f64; a sum over no elements is 0.
    pub fn sum(&self, axes: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce("sum", axes, keepdim, Reduce::Sum, false)
    }

    /// Mean over `axes` (the sum divided by the number of reduced elements before rounding;
    /// NaN when that number is 0).
    pub fn mean(&self, axes: &[usize], keepdim: bool) -> Result<Tensor> {
        self.reduce("mean", axes, keepdim, Reduce::Sum, true)
    }

    /// Sum of every element as a rank-0 tensor.
    pub fn sum_all(&self) -> Result<Tensor> {
        let axes: Vec<usize> = (0..self.rank()).collect();
        self.sum(&axes, false)
    }

    /// Errors unless `axis` is in range and not empty.
    fn check_nonempty(&self, op: &'static str, axis: usize) -> Result<()> {
        check_axes(op, self.shape(), &[axis])?;
        if self.dim(axis) == 0 {
            return shape_err(op, format!("axis {axis} of {:?} is empty", self.shape()));
        }
        Ok(())
    }

    /// Maximum over one axis (NaN if the axis holds a NaN); an empty axis is an error.
    pub fn max(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        self.check_nonempty("max", axis)?;
        self.reduce("max", &[axis], keepdim, Reduce::Max, false)
    }

    /// Minimum over one axis (NaN if the axis holds a NaN); an empty axis is an error.
    pub fn min(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        self.check_nonempty("min", axis)?;
        self.reduce("min", &[axis], keepdim, Reduce::Min, false)
    }

    /// Index (u32) of the first maximum along one axis; a NaN counts as the maximum (numpy's
    /// rule). An empty axis is an error.
    pub fn argmax(&self, axis: usize, keepdim: bool) -> Result<Tensor> {
        self.check_nonempty("argmax", axis)?;
        if let Some(gpu) = Gpu::of("argmax", &[self])? {
            return argmax_cuda(&gpu, self, axis)?.reshape(&reduced_shape(self.shape(), &[axis], keepdim));
        }
        let x = self.contiguous();
        let dims = split(self.shape(), axis);
        let out = float_dispatch!("argmax", self.dtype(), T => argmax_view(x.contiguous_slice::<T>(), dims));
        Ok(Tensor::from_cpu(
            CpuStorage::from_vec(out),
            &reduced_shape(self.shape(), &[axis], keepdim),
        ))
    }

    /// Sums a broadcast tensor back down to `shape` (the inverse of `broadcast_to`, for
    /// gradients): leading extra axes and axes where `shape` has 1 are summed. The result has
    /// exactly `shape`; an error when `self`'s shape does not broadcast from it.
    pub fn sum_to_shape(&self, shape: &[usize]) -> Result<Tensor> {
        let src = self.shape();
        let lead = src.len().checked_sub(shape.len());
        let fits = lead.is_some_and(|lead| shape.iter().zip(&src[lead..]).all(|(&t, &s)| t == s || t == 1));
        let Some(lead) = lead.filter(|_| fits) else {
            return shape_err(
                "sum_to_shape",
                format!("{src:?} does not broadcast from {shape:?}"),
            );
        };
        let axes: Vec<usize> = (0..src.len())
            .filter(|&i| i < lead || (shape[i - lead] == 1 && src[i] != 1))
            .collect();
        self.sum(&axes, true)?.reshape(shape)
    }
}

/// First index of the maximum along `len` of a contiguous `[outer, len, inner]` slice (`len > 0`).
fn argmax_view<T: FloatElement>(xs: &[T], (outer, len, inner): (usize, usize, usize)) -> Vec<u32> {
    let mut out = vec![0u32; outer * inner];
    if out.is_empty() {
        return out;
    }
    par_tiles(&mut out, inner, |o, c0, idx| {
        let w = idx.len();
        let at = |j: usize| &xs[(o * len + j) * inner + c0..][..w];
        let mut best: Vec<T::Acc> = at(0).iter().map(|v| v.to_acc()).collect();
        for j in 1..len {
            for ((b, i), v) in best.iter_mut().zip(idx.iter_mut()).zip(at(j)) {
                let v = v.to_acc();
                if v > *b || (v.is_nan() && !b.is_nan()) {
                    *b = v;
                    *i = j as u32;
                }
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use crate::{DType, Tensor};

    fn t23() -> Tensor {
        Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], &[2, 3]).unwrap()
    }

    #[test]
    fn sums_over_axes() {
        assert_eq!(
            t23().sum(&[0], false).unwrap().to_vec::<f32>().unwrap(),
            vec![5., 7., 9.]
        );
        assert_eq!(
            t23().sum(&[1], false).unwrap().to_vec::<f32>().unwrap(),
            vec![6., 15.]
        );
        assert_eq!(t23().sum(&[1], true).unwrap().shape(), &[2, 1]);
        assert_eq!(
            t23().sum(&[], false).unwrap().to_vec::<f32>().unwrap(),
            t23().to_vec::<f32>().unwrap()
        );
        let all = t23().sum(&[1, 0], false).unwrap();
        assert_eq!((all.shape(), all.to_scalar_f64().unwrap()), (&[][..], 21.0));
        let all = t23().sum_all().unwrap();
        assert_eq!((all.shape(), all.to_scalar_f64().unwrap()), (&[][..], 21.0));
        let mean = t23().t().unwrap().mean(&[0], false).unwrap();
        assert_eq!(mean.to_vec::<f32>().unwrap(), vec![2., 5.]);
    }

    #[test]
    fn non_adjacent_axes_and_16_bit_dtypes() {
        // [2, 3, 2] summed over axes 0 and 2.
        let x = Tensor::arange(12, DType::BF16).reshape(&[2, 3, 2]).unwrap();
        let s = x.sum(&[0, 2], true).unwrap();
        assert_eq!((s.shape(), s.dtype()), (&[1, 3, 1][..], DType::BF16));
        assert_eq!(s.to_vec_f64(), vec![14., 22., 30.]);
        let m = x.to_dtype(DType::F16).unwrap().mean(&[2, 0], false).unwrap();
        assert_eq!(m.to_vec_f64(), vec![3.5, 5.5, 7.5]);
    }

    #[test]
    fn long_axes_split_across_tasks() {
        // Few outputs over long axes take the split paths; the sums are exact in f64.
        let n = 3 * 4096 + 5;
        let x = Tensor::arange(2 * n, DType::F64);
        let rows = x.reshape(&[2, n]).unwrap().sum(&[1], false).unwrap().to_vec_f64();
        let total = |a: usize, b: usize| (a..b).sum::<usize>() as f64;
        assert_eq!(rows, vec![total(0, n), total(n, 2 * n)]);
        let cols = x.reshape(&[n, 2]).unwrap().sum(&[0], false).unwrap().to_vec_f64();
        assert_eq!(
            cols,
            vec![
                (0..n).map(|i| 2 * i).sum::<usize>() as f64,
                (0..n).map(|i| 2 * i + 1).sum::<usize>() as f64
            ]
        );
    }

    #[test]
    fn every_axis_subset_matches_a_naive_reduction() {
        let shape = [3, 5, 2, 700];
        let n: usize = shape.iter().product();
        let vals: Vec<f64> = (0..n).map(|i| ((i * 7919) % 1000) as f64 - 500.0).collect();
        let x = Tensor::from_vec(vals.clone(), &shape).unwrap();
        let strides = [5 * 2 * 700, 2 * 700, 700, 1];
        for mask in 0..16usize {
            let axes: Vec<usize> = (0..4).filter(|a| mask >> a & 1 == 1).collect();
            let got = x.sum(&axes, true).unwrap();
            let kept: Vec<usize> = (0..4)
                .map(|a| if axes.contains(&a) { 1 } else { shape[a] })
                .collect();
            assert_eq!(got.shape(), &kept[..]);
            let mut want = vec![0.0; kept.iter().product()];
            for (i, v) in vals.iter().enumerate() {
                let o = (0..4).fold(0, |o, a| {
                    o * kept[a]
                        + if axes.contains(&a) {
                            0
                        } else {
                            i / strides[a] % shape[a]
                        }
                });
                want[o] += v;
            }
            assert_eq!(got.to_vec_f64(), want, "axes {axes:?}");
        }
        for axis in 0..4 {
            let mx = x.max(axis, false).unwrap().to_vec_f64();
            let am = x.argmax(axis, false).unwrap().to_vec::<u32>().unwrap();
            let mn = x.min(axis, false).unwrap().to_vec_f64();
            let (outer, len, inner) = super::split(&shape, axis);
            for o in 0..outer {
                for i in 0..inner {
                    let col: Vec<f64> = (0..len).map(|j| vals[(o * len + j) * inner + i]).collect();
                    let best = col.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    assert_eq!(mx[o * inner + i], best);
                    assert_eq!(
                        mn[o * inner + i],
                        col.iter().cloned().fold(f64::INFINITY, f64::min)
                    );
                    assert_eq!(
                        am[o * inner + i] as usize,
                        col.iter().position(|&v| v == best).unwrap()
                    );
                }
            }
        }
    }

    #[test]
    fn extremes_and_argmax() {
        let x = Tensor::from_vec(vec![3f64, 1., 3., 0., 5., 5.], &[2, 3]).unwrap();
        assert_eq!(x.max(1, false).unwrap().to_vec_f64(), vec![3., 5.]);
        assert_eq!(x.min(0, false).unwrap().to_vec_f64(), vec![0., 1., 3.]);
        assert_eq!(x.argmax(1, false).unwrap().to_vec::<u32>().unwrap(), vec![0, 1]);
        assert_eq!(x.argmax(0, true).unwrap().to_vec::<u32>().unwrap(), vec![0, 1, 1]);
        assert_eq!(x.argmax(0, true).unwrap().shape(), &[1, 3]);
        let nan = Tensor::from_vec(vec![1f32, f32::NAN, 2.], &[3]).unwrap();
        assert!(nan.max(0, false).unwrap().to_scalar_f64().unwrap().is_nan());
        assert_eq!(nan.argmax(0, false).unwrap().to_vec::<u32>().unwrap(), vec![1]);
    }

    #[test]
    fn bad_axes_are_errors() {
        let x = t23();
        assert!(x.max(2, false).is_err());
        assert!(x.sum(&[0, 0], false).is_err());
        assert!(x.mean(&[3], false).is_err());
        assert!(Tensor::zeros(&[2, 0], DType::F32).argmax(1, false).is_err());
        assert!(Tensor::zeros(&[2], DType::U32).sum(&[0], false).is_err());
    }

    #[test]
    fn sum_to_shape_inverts_broadcasting() {
        let x = Tensor::ones(&[4, 2, 3], DType::F32);
        let s = x.sum_to_shape(&[2, 1]).unwrap();
        assert_eq!(s.shape(), &[2, 1]);
        assert_eq!(s.to_vec::<f32>().unwrap(), vec![12., 12.]);
        assert_eq!(
            x.sum_to_shape(&[3]).unwrap().to_vec::<f32>().unwrap(),
            vec![8., 8., 8.]
        );
        assert_eq!(x.sum_to_shape(&[]).unwrap().to_scalar_f64().unwrap(), 24.);
        assert!(x.sum_to_shape(&[5]).is_err());
        assert!(x.sum_to_shape(&[1, 4, 2, 3]).is_err());
    }
}
