//! Gathers and scatters by index, concatenation and stacking. Each views its tensors as
//! contiguous `[outer, axis, inner]` blocks and moves whole `inner` runs.

use crate::dispatch::{any_dispatch, float_dispatch};
use crate::error::{range_err, shape_err};
use crate::gpu::{cuda_any_dispatch, cuda_float_dispatch, Gpu};
use crate::storage::CpuStorage;
use crate::tensor::PAR_CHUNK;
use crate::{DType, Element, FloatElement, Result, Tensor, TensorError};
use cuda::kernels::Dims3;
use rayon::prelude::*;

/// Sizes of the axes before, at and after `axis`.
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

/// Rows of `inner` elements per rayon task, so that short rows are handled in batches.
fn rows_per_task(inner: usize) -> usize {
    (PAR_CHUNK / inner.max(1)).max(1)
}

/// The ids of a u32 tensor (any shape, row-major), each checked to be below `bound`.
pub(crate) fn checked_ids(op: &'static str, ids: &Tensor, bound: usize) -> Result<Vec<usize>> {
    if ids.dtype() != DType::U32 {
        return Err(TensorError::DType {
            op,
            dtype: ids.dtype(),
        });
    }
    let ids = ids.to_vec::<u32>()?;
    if let Some((pos, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= bound) {
        return range_err(
            op,
            format!("id {id} at position {pos} is out of range for size {bound}"),
        );
    }
    Ok(ids.into_iter().map(|id| id as usize).collect())
}

/// Errors unless `ids` is 1-D.
fn check_1d(op: &'static str, ids: &Tensor) -> Result<()> {
    if ids.rank() != 1 {
        return shape_err(op, format!("ids must be 1-D, got {:?}", ids.shape()));
    }
    Ok(())
}

/// Like `checked_ids`, for ids that must be 1-D.
fn checked_ids_1d(op: &'static str, ids: &Tensor, bound: usize) -> Result<Vec<usize>> {
    check_1d(op, ids)?;
    checked_ids(op, ids, bound)
}

fn check_axis(op: &'static str, shape: &[usize], axis: usize) -> Result<()> {
    if axis >= shape.len() {
        return range_err(op, format!("axis {axis} out of range for shape {shape:?}"));
    }
    Ok(())
}

/// Entries `ids` (already checked) along `axis` of `x`, in parallel over output rows.
fn gather(x: &Tensor, axis: usize, ids: &[usize]) -> Tensor {
    let (outer, len, inner) = split(x.shape(), axis);
    let mut shape = x.shape().to_vec();
    shape[axis] = ids.len();
    let x = x.contiguous();
    let out = any_dispatch!(x.dtype(), T => {
        let xs = x.contiguous_slice::<T>();
        let mut out = vec![T::from_f64(0.0); outer * ids.len() * inner];
        if inner > 0 {
            out.par_chunks_mut(inner)
                .with_min_len(rows_per_task(inner))
                .enumerate()
                .for_each(|(r, dst)| {
                    let (o, i) = (r / ids.len(), r % ids.len());
                    let src = (o * len + ids[i]) * inner;
                    dst.copy_from_slice(&xs[src..src + inner]);
                });
        }
        CpuStorage::from_vec(out)
    });
    Tensor::from_cpu(out, &shape)
}

/// Errors unless `ids` is u32 (the CUDA kernels check the values themselves).
fn check_id_dtype(op: &'static str, ids: &Tensor) -> Result<()> {
    if ids.dtype() != DType::U32 {
        return Err(TensorError::DType {
            op,
            dtype: ids.dtype(),
        });
    }
    Ok(())
}

/// `gather` on a CUDA device with the u32 `ids` on the device; ids out of range are an error
/// naming the first one found.
fn gather_cuda(gpu: &Gpu, x: &Tensor, axis: usize, ids: &Tensor) -> Result<Tensor> {
    check_id_dtype(gpu.op, ids)?;
    let (xp, idp) = (gpu.packed(x)?, gpu.packed(ids)?);
    let dims = Dims3::around(x.shape(), axis);
    let mut shape = x.shape().to_vec();
    shape[axis] = ids.numel();
    cuda_any_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let mut out = gpu.alloc::<T>(crate::layout::numel(&shape))?;
        gpu.check(gpu.dev.index_select(xp.cuda_buffer::<T>(), idp.cuda_buffer::<u32>(), dims, &mut out))?;
        Ok(gpu.tensor(out, &shape))
    })
}

/// `index_add` on a CUDA device: sums in f32 (atomics, in no fixed order), rounded once.
fn index_add_cuda(gpu: &Gpu, x: &Tensor, axis: usize, ids: &Tensor, src: &Tensor) -> Result<Tensor> {
    let dims = Dims3::around(x.shape(), axis);
    let (xp, sp, idp) = (gpu.packed(x)?, gpu.packed(src)?, gpu.packed(ids)?);
    // The f32 accumulator starts as a copy of `self`, widened.
    let mut acc = gpu.alloc::<f32>(xp.numel())?;
    let widened = match xp.dtype() {
        DType::F32 => gpu.dev.copy(xp.cuda_buffer::<f32>(), &mut acc),
        DType::BF16 => gpu.dev.cast(xp.cuda_buffer::<half::bf16>(), &mut acc),
        DType::F16 => gpu.dev.cast(xp.cuda_buffer::<half::f16>(), &mut acc),
        dtype @ (DType::U32 | DType::F64) => return Err(TensorError::DType { op: gpu.op, dtype }),
    };
    gpu.check(widened)?;
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        gpu.check(gpu.dev.index_add(&mut acc, dims, idp.cuda_buffer::<u32>(), sp.cuda_buffer::<T>()))?;
    });
    gpu.cast(&gpu.tensor(acc, x.shape()), x.dtype())
}

/// `concat` on a CUDA device; the parts are checked by the caller.
fn concat_cuda(gpu: &Gpu, tensors: &[&Tensor], axis: usize, shape: &[usize]) -> Result<Tensor> {
    let (outer, _, inner) = split(shape, axis);
    let parts = tensors
        .iter()
        .map(|t| gpu.packed(t))
        .collect::<Result<Vec<_>>>()?;
    let lens: Vec<usize> = parts.iter().map(|p| p.dim(axis)).collect();
    cuda_any_dispatch!(gpu.op, gpu.device, tensors[0].dtype(), T => {
        let bufs: Vec<_> = parts.iter().map(|p| p.cuda_buffer::<T>()).collect();
        let mut out = gpu.alloc::<T>(crate::layout::numel(shape))?;
        gpu.check(gpu.dev.concat(&bufs, &lens, (outer, inner), &mut out))?;
        Ok(gpu.tensor(out, shape))
    })
}

/// Positions of `ids` grouped by id (a counting sort): index `j < len` receives positions
/// `order[starts[j]..starts[j + 1]]`, in increasing order.
fn positions_by_id(ids: &[usize], len: usize) -> (Vec<usize>, Vec<usize>) {
    let mut starts = vec![0; len + 1];
    for &id in ids {
        starts[id + 1] += 1;
    }
    let mut running = 0;
    for s in &mut starts {
        running += *s;
        *s = running;
    }
    let mut next = starts.clone();
    let mut order = vec![0; ids.len()];
    for (pos, &id) in ids.iter().enumerate() {
        order[next[id]] = pos;
        next[id] += 1;
    }
    (starts, order)
}

/// Checks the operands of `index_add` on `x` (dtypes, ranks, shapes); returns the length of
/// `axis` and the elements after it.
pub(crate) fn check_index_add(x: &Tensor, axis: usize, ids: &Tensor, src: &Tensor) -> Result<(usize, usize)> {
    check_axis("index_add", x.shape(), axis)?;
    x.check_same_dtype("index_add", src)?;
    let (_, len, inner) = split(x.shape(), axis);
    check_1d("index_add", ids)?;
    let mut expected = x.shape().to_vec();
    expected[axis] = ids.numel();
    if src.shape() != expected {
        return shape_err(
            "index_add",
            format!(
                "source {:?} does not match {:?} with {} ids along axis {axis}",
                src.shape(),
                x.shape(),
                ids.numel()
            ),
        );
    }
    Ok((len, inner))
}

/// The kernel of `index_add` on the CPU: `out` (`[outer, len, inner]`, row-major) gets
/// `src` (`[outer, ids.len(), inner]`) added at `ids` along its middle axis, in place. Each
/// output row gathers its own sources in id order, sums them in the `Acc` type onto its value
/// and rounds once, so rows run in parallel without races.
pub(crate) fn scatter_add<T: FloatElement>(
    out: &mut [T],
    (len, inner): (usize, usize),
    ids: &[usize],
    src: &[T],
) {
    let (starts, order) = positions_by_id(ids, len);
    let n = ids.len();
    if inner == 0 {
        return;
    }
    out.par_chunks_mut(inner)
        .with_min_len(rows_per_task(inner))
        .enumerate()
        .for_each_init(Vec::new, |acc, (r, dst)| {
            let (o, j) = (r / len, r % len);
            let from = &order[starts[j]..starts[j + 1]];
            if from.is_empty() {
                return;
            }
            acc.clear();
            acc.extend(dst.iter().map(|v| v.to_acc()));
            for &i in from {
                let row = &src[(o * n + i) * inner..][..inner];
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v.to_acc();
                }
            }
            for (d, &a) in dst.iter_mut().zip(acc.iter()) {
                *d = T::from_acc(a);
            }
        });
}

impl Tensor {
    /// Rows of `self` (`[V, D]`, any dtype) picked by u32 `ids` of any shape: the result is
    /// `ids.shape + [D]`. An id >= V is an error naming the id and V.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        if self.rank() != 2 {
            return shape_err(
                "embedding",
                format!("table must be [V, D], got {:?}", self.shape()),
            );
        }
        let mut shape = ids.shape().to_vec();
        shape.push(self.dim(1));
        if let Some(gpu) = Gpu::of("embedding", &[self, ids])? {
            return gather_cuda(&gpu, self, 0, ids)?.reshape(&shape);
        }
        let rows = checked_ids("embedding", ids, self.dim(0))?;
        gather(self, 0, &rows).reshape(&shape)
    }

    /// Entries `ids` (u32, 1-D, each below `self.dim(axis)`) along `axis`, any dtype: the
    /// result has `self`'s shape with axis `axis` of length `len(ids)`.
    pub fn index_select(&self, axis: usize, ids: &Tensor) -> Result<Tensor> {
        check_axis("index_select", self.shape(), axis)?;
        if let Some(gpu) = Gpu::of("index_select", &[self, ids])? {
            check_1d("index_select", ids)?;
            return gather_cuda(&gpu, self, axis, ids);
        }
        let ids = checked_ids_1d("index_select", ids, self.dim(axis))?;
        Ok(gather(self, axis, &ids))
    }

    /// A copy of `self` with `src` added at `ids` along `axis` (scatter-add; repeated ids sum):
    /// `out[.., ids[i], ..] += src[.., i, ..]`. Float dtypes; `ids` is u32 and 1-D, and `src`
    /// has `self`'s shape except for `len(ids)` along `axis`. The backward of `index_select`
    /// and `embedding`. Sums are taken in the `Acc` type, in id order, and rounded once.
    pub fn index_add(&self, axis: usize, ids: &Tensor, src: &Tensor) -> Result<Tensor> {
        let (len, inner) = check_index_add(self, axis, ids, src)?;
        if let Some(gpu) = Gpu::of("index_add", &[self, ids, src])? {
            check_id_dtype("index_add", ids)?;
            return index_add_cuda(&gpu, self, axis, ids, src);
        }
        let ids = checked_ids("index_add", ids, len)?;
        let (x, s) = (self.contiguous(), src.contiguous());
        float_dispatch!("index_add", self.dtype(), T => {
            let mut out = x.contiguous_slice::<T>().to_vec();
            scatter_add(&mut out, (len, inner), &ids, s.contiguous_slice::<T>());
            Ok(Tensor::from_cpu(CpuStorage::from_vec(out), self.shape()))
        })
    }

    /// Joins tensors (any dtype, all the same) along an existing axis; all have the same rank
    /// and agree on every other axis.
    pub fn concat(tensors: &[&Tensor], axis: usize) -> Result<Tensor> {
        let Some(first) = tensors.first() else {
            return shape_err("concat", "needs at least one tensor");
        };
        check_axis("concat", first.shape(), axis)?;
        for t in tensors {
            first.check_same_dtype("concat", t)?;
            let agree = t.rank() == first.rank()
                && t.shape()
                    .iter()
                    .zip(first.shape())
                    .enumerate()
                    .all(|(i, (a, b))| i == axis || a == b);
            if !agree {
                let shapes: Vec<_> = tensors.iter().map(|t| t.shape().to_vec()).collect();
                return shape_err("concat", format!("shapes {shapes:?} differ outside axis {axis}"));
            }
        }
        let mut shape = first.shape().to_vec();
        shape[axis] = tensors.iter().map(|t| t.dim(axis)).sum();
        if let Some(gpu) = Gpu::of("concat", tensors)? {
            return concat_cuda(&gpu, tensors, axis, &shape);
        }
        let (_, total, inner) = split(&shape, axis);
        let row = total * inner;
        let parts: Vec<Tensor> = tensors.iter().map(|t| t.contiguous()).collect();
        // Each output row is the parts' runs side by side; `starts` are the runs' offsets.
        let runs: Vec<usize> = parts.iter().map(|p| p.dim(axis) * inner).collect();
        let starts: Vec<usize> = runs
            .iter()
            .scan(0, |at, &r| {
                *at += r;
                Some(*at - r)
            })
            .collect();
        let out = any_dispatch!(first.dtype(), T => {
            let srcs: Vec<&[T]> = parts.iter().map(|p| p.contiguous_slice::<T>()).collect();
            let mut out = vec![T::from_f64(0.0); crate::layout::numel(&shape)];
            // Fixed-size chunks of the output, so that even one long row is split across tasks.
            out.par_chunks_mut(PAR_CHUNK).enumerate().for_each(|(c, chunk)| {
                let mut pos = c * PAR_CHUNK;
                let mut done = 0;
                while done < chunk.len() {
                    let (o, at_row) = (pos / row, pos % row);
                    // The last part starting at or before `at_row` is the non-empty one holding it.
                    let p = starts.partition_point(|&s| s <= at_row) - 1;
                    let at = at_row - starts[p];
                    let n = (runs[p] - at).min(chunk.len() - done);
                    chunk[done..done + n].copy_from_slice(&srcs[p][o * runs[p] + at..][..n]);
                    done += n;
                    pos += n;
                }
            });
            CpuStorage::from_vec(out)
        });
        Ok(Tensor::from_cpu(out, &shape))
    }

    /// Joins equally shaped tensors (any dtype, all the same) along a new axis `axis`
    /// (at most their rank).
    pub fn stack(tensors: &[&Tensor], axis: usize) -> Result<Tensor> {
        let Some(first) = tensors.first() else {
            return shape_err("stack", "needs at least one tensor");
        };
        if let Some(t) = tensors.iter().find(|t| t.shape() != first.shape()) {
            return shape_err(
                "stack",
                format!("shapes {:?} and {:?} differ", first.shape(), t.shape()),
            );
        }
        let expanded = tensors
            .iter()
            .map(|t| t.unsqueeze(axis))
            .collect::<Result<Vec<_>>>()?;
        Tensor::concat(&expanded.iter().collect::<Vec<_>>(), axis)
    }
}

#[cfg(test)]
mod tests {
    use crate::tensor::PAR_CHUNK;
    use crate::{bf16, DType, Tensor};

    fn ids(v: &[u32]) -> Tensor {
        Tensor::from_vec(v.to_vec(), &[v.len()]).unwrap()
    }

    #[test]
    fn embedding_picks_rows_and_names_a_bad_id() {
        let w = Tensor::arange(6, DType::F32).reshape(&[3, 2]).unwrap();
        let e = w
            .embedding(&Tensor::from_vec(vec![2u32, 0, 2, 1], &[2, 2]).unwrap())
            .unwrap();
        assert_eq!(e.shape(), &[2, 2, 2]);
        assert_eq!(e.to_vec::<f32>().unwrap(), vec![4., 5., 0., 1., 4., 5., 2., 3.]);
        assert_eq!(
            w.embedding(&Tensor::scalar(1u32)).unwrap().to_vec_f64(),
            vec![2., 3.]
        );
        let err = w.embedding(&ids(&[0, 3])).unwrap_err().to_string();
        assert!(
            err.contains("embedding") && err.contains("id 3") && err.contains("size 3"),
            "{err}"
        );
        assert!(w.embedding(&Tensor::zeros(&[2], DType::F32)).is_err());
        assert!(Tensor::zeros(&[3], DType::F32).embedding(&ids(&[0])).is_err());
    }

    #[test]
    fn index_select_any_axis_and_dtype() {
        // [[0, 1, 2], [3, 4, 5]] viewed transposed: [[0, 3], [1, 4], [2, 5]].
        let x = Tensor::arange(6, DType::U32).reshape(&[2, 3]).unwrap();
        let y = x.index_select(1, &ids(&[2, 0, 2])).unwrap();
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(y.to_vec::<u32>().unwrap(), vec![2, 0, 2, 5, 3, 5]);
        let t = x.t().unwrap().index_select(0, &ids(&[1])).unwrap();
        assert_eq!(t.to_vec::<u32>().unwrap(), vec![1, 4]);
        assert_eq!(x.index_select(0, &ids(&[])).unwrap().shape(), &[0, 3]);
        assert!(x.index_select(1, &ids(&[3])).is_err());
        assert!(x.index_select(2, &ids(&[0])).is_err());
        assert!(x.index_select(0, &Tensor::zeros(&[1, 1], DType::U32)).is_err());
    }

    #[test]
    fn index_add_sums_repeated_ids() {
        let x = Tensor::zeros(&[2, 3], DType::F64);
        let src = Tensor::ones(&[2, 3], DType::F64);
        let y = x.index_add(1, &ids(&[2, 2, 0]), &src).unwrap();
        assert_eq!(y.to_vec_f64(), vec![1., 0., 2., 1., 0., 2.]);
        // Keeps `self`'s values: [10, 20] + rows 0 and 2 of src at id 1.
        let x = Tensor::from_vec(vec![10f32, 20.], &[2, 1]).unwrap();
        let src = Tensor::from_vec(vec![1f32, 2., 3.], &[3, 1]).unwrap();
        let y = x.index_add(0, &ids(&[1, 0, 1]), &src).unwrap();
        assert_eq!(y.to_vec::<f32>().unwrap(), vec![12., 24.]);
        assert!(x.index_add(0, &ids(&[1, 0]), &src).is_err());
        assert!(x.index_add(0, &ids(&[2, 0, 1]), &src).is_err());
        assert!(x.index_add(1, &ids(&[0, 0, 0]), &src).is_err());
        let u = Tensor::zeros(&[2, 1], DType::U32);
        assert!(u
            .index_add(0, &ids(&[0]), &Tensor::zeros(&[1, 1], DType::U32))
            .is_err());
    }

    #[test]
    fn index_add_accumulates_wide_and_matches_a_loop() {
        // 300 ones in bf16 would stall at 256 if rounded after every addition.
        let x = Tensor::zeros(&[2, 1], DType::BF16);
        let src = Tensor::ones(&[300, 1], DType::BF16);
        let y = x.index_add(0, &ids(&[1; 300]), &src).unwrap();
        assert_eq!(
            y.to_vec::<bf16>().unwrap(),
            vec![bf16::from_f64(0.0), bf16::from_f64(300.0)]
        );
        // Many short rows (the embedding backward) against a plain loop.
        let (v, d, n) = (50, 3, 2000);
        let id: Vec<u32> = (0..n).map(|i| ((i * 7 + i / 3) % v) as u32).collect();
        let src = Tensor::arange(n * d, DType::F64).reshape(&[n, d]).unwrap();
        let y = Tensor::zeros(&[v, d], DType::F64)
            .index_add(0, &ids(&id), &src)
            .unwrap();
        let mut want = vec![0.0; v * d];
        for (i, &j) in id.iter().enumerate() {
            for k in 0..d {
                want[j as usize * d + k] += (i * d + k) as f64;
            }
        }
        assert_eq!(y.to_vec_f64(), want);
    }

    #[test]
    fn concat_and_stack_shapes() {
        let a = Tensor::arange(4, DType::U32).reshape(&[2, 2]).unwrap();
        let b = Tensor::arange(2, DType::U32).reshape(&[2, 1]).unwrap();
        let c = Tensor::concat(&[&a, &b], 1).unwrap();
        assert_eq!(c.to_vec::<u32>().unwrap(), vec![0, 1, 0, 2, 3, 1]);
        let empty = Tensor::zeros(&[2, 0], DType::U32);
        let c = Tensor::concat(&[&empty, &b, &empty, &a, &empty], 1).unwrap();
        assert_eq!(c.to_vec::<u32>().unwrap(), vec![0, 0, 1, 1, 2, 3]);
        let c = Tensor::concat(&[&a, &a.t().unwrap()], 0).unwrap();
        assert_eq!(c.to_vec::<u32>().unwrap(), vec![0, 1, 2, 3, 0, 2, 1, 3]);
        let s = Tensor::stack(&[&a, &a], 2).unwrap();
        assert_eq!(s.shape(), &[2, 2, 2]);
        assert_eq!(s.to_vec::<u32>().unwrap(), vec![0, 0, 1, 1, 2, 2, 3, 3]);
        assert_eq!(Tensor::stack(&[&b, &b, &b], 0).unwrap().shape(), &[3, 2, 1]);
        let err = Tensor::concat(&[&a, &b], 0).unwrap_err().to_string();
        assert!(err.contains("[2, 2]") && err.contains("[2, 1]"), "{err}");
        assert!(Tensor::concat(&[&a, &a.to_dtype(DType::F32).unwrap()], 0).is_err());
        assert!(Tensor::concat(&[&a, &Tensor::zeros(&[4], DType::U32)], 0).is_err());
        assert!(Tensor::concat(&[], 0).is_err());
        assert!(Tensor::stack(&[&a, &b], 0).is_err());
        assert!(Tensor::stack(&[&a], 3).is_err());
        assert!(Tensor::stack(&[], 0).is_err());
    }

    #[test]
    fn concat_across_chunk_boundaries_matches_a_loop() {
        // Rows longer and shorter than a parallel chunk.
        for (outer, la, lb) in [(2, PAR_CHUNK + 5, 7), (3000, 3, 4)] {
            let a = Tensor::arange(outer * la, DType::F32)
                .reshape(&[outer, la])
                .unwrap();
            let b = Tensor::full(&[outer, lb], -1.0, DType::F32);
            let c = Tensor::concat(&[&a, &b], 1).unwrap().to_vec::<f32>().unwrap();
            let want: Vec<f32> = (0..outer)
                .flat_map(|o| {
                    (0..la)
                        .map(move |i| (o * la + i) as f32)
                        .chain((0..lb).map(|_| -1.0))
                })
                .collect();
            assert_eq!(c, want);
        }
    }
}
