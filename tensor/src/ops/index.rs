//! Gathers and scatters by index, concatenation and stacking. Each views its tensors as
//! contiguous `[outer, axis, inner]` blocks and works on whole `inner` runs.

use crate::dispatch::{any_dispatch, float_dispatch};
use crate::error::{range_err, shape_err};
use crate::storage::CpuStorage;
use crate::{DType, Element, FloatElement, Result, Tensor, TensorError};
use rayon::prelude::*;

/// Sizes of the axes before, at and after `axis`.
fn split(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    (
        shape[..axis].iter().product(),
        shape[axis],
        shape[axis + 1..].iter().product(),
    )
}

/// The ids of a u32 tensor, each checked to be below `bound`.
fn checked_ids(op: &'static str, ids: &Tensor, bound: usize) -> Result<Vec<usize>> {
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

fn check_axis(op: &'static str, shape: &[usize], axis: usize) -> Result<()> {
    if axis >= shape.len() {
        return range_err(op, format!("axis {axis} out of range for shape {shape:?}"));
    }
    Ok(())
}

impl Tensor {
    /// Rows of `self` (`[V, D]`) picked by u32 `ids` of any shape: `ids.shape + [D]`.
    /// An id >= V is an error naming it.
    pub fn embedding(&self, ids: &Tensor) -> Result<Tensor> {
        if self.rank() != 2 {
            return shape_err(
                "embedding",
                format!("table must be [V, D], got {:?}", self.shape()),
            );
        }
        let mut shape = ids.shape().to_vec();
        shape.push(self.dim(1));
        self.index_select(0, &ids.reshape(&[ids.numel()])?)?
            .reshape(&shape)
    }

    /// Entries `ids` (u32, 1-D) along `axis`.
    pub fn index_select(&self, axis: usize, ids: &Tensor) -> Result<Tensor> {
        check_axis("index_select", self.shape(), axis)?;
        if ids.rank() != 1 {
            return shape_err("index_select", format!("ids must be 1-D, got {:?}", ids.shape()));
        }
        let (outer, len, inner) = split(self.shape(), axis);
        let ids = checked_ids("index_select", ids, len)?;
        let mut shape = self.shape().to_vec();
        shape[axis] = ids.len();
        let x = self.contiguous();
        let out = any_dispatch!(self.dtype(), T => {
            let xs = x.contiguous_slice::<T>();
            let mut out = vec![T::from_f64(0.0); outer * ids.len() * inner];
            if inner > 0 {
                out.par_chunks_mut(inner).enumerate().for_each(|(r, dst)| {
                    let (o, i) = (r / ids.len(), r % ids.len());
                    let src = (o * len + ids[i]) * inner;
                    dst.copy_from_slice(&xs[src..src + inner]);
                });
            }
            CpuStorage::from_vec(out)
        });
        Ok(Tensor::from_cpu(out, &shape))
    }

    /// A copy of `self` with `src` added at `ids` along `axis` (scatter-add; repeated ids sum):
    /// `out[.., ids[i], ..] += src[.., i, ..]`. The backward of `index_select` and `embedding`.
    pub fn index_add(&self, axis: usize, ids: &Tensor, src: &Tensor) -> Result<Tensor> {
        check_axis("index_add", self.shape(), axis)?;
        self.check_same_dtype("index_add", src)?;
        let (_, len, inner) = split(self.shape(), axis);
        let ids = checked_ids("index_add", ids, len)?;
        let mut expected = self.shape().to_vec();
        expected[axis] = ids.len();
        if src.shape() != expected {
            return shape_err(
                "index_add",
                format!(
                    "source {:?} does not match {:?} with {} ids along axis {axis}",
                    src.shape(),
                    self.shape(),
                    ids.len()
                ),
            );
        }
        let (x, s) = (self.contiguous(), src.contiguous());
        float_dispatch!("index_add", self.dtype(), T => {
            let (xs, ss) = (x.contiguous_slice::<T>(), s.contiguous_slice::<T>());
            let mut out = xs.to_vec();
            let block = (len * inner).max(1);
            out.par_chunks_mut(block).enumerate().for_each(|(o, dst)| {
                let mut acc: Vec<<T as FloatElement>::Acc> = dst.iter().map(|v| v.to_acc()).collect();
                for (i, &id) in ids.iter().enumerate() {
                    let from = &ss[(o * ids.len() + i) * inner..][..inner];
                    for (a, v) in acc[id * inner..(id + 1) * inner].iter_mut().zip(from) {
                        *a += v.to_acc();
                    }
                }
                for (d, a) in dst.iter_mut().zip(acc) {
                    *d = T::from_acc(a);
                }
            });
            Ok(Tensor::from_cpu(CpuStorage::from_vec(out), self.shape()))
        })
    }

    /// Joins tensors along an existing axis; all other axes must agree.
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
        let (outer, total, inner) = split(&shape, axis);
        let parts: Vec<Tensor> = tensors.iter().map(|t| t.contiguous()).collect();
        let out = any_dispatch!(first.dtype(), T => {
            let mut out = vec![T::from_f64(0.0); outer * total * inner];
            if !out.is_empty() {
                out.par_chunks_mut(total * inner).enumerate().for_each(|(o, row)| {
                    let mut at = 0;
                    for p in &parts {
                        let run = p.dim(axis) * inner;
                        row[at..at + run].copy_from_slice(&p.contiguous_slice::<T>()[o * run..(o + 1) * run]);
                        at += run;
                    }
                });
            }
            CpuStorage::from_vec(out)
        });
        Ok(Tensor::from_cpu(out, &shape))
    }

    /// Joins equally shaped tensors along a new axis.
    pub fn stack(tensors: &[&Tensor], axis: usize) -> Result<Tensor> {
        if let Some(t) = tensors.iter().find(|t| t.shape() != tensors[0].shape()) {
            return shape_err(
                "stack",
                format!("shapes {:?} and {:?} differ", tensors[0].shape(), t.shape()),
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
    use crate::{DType, Tensor};

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
        let err = w.embedding(&ids(&[3])).unwrap_err().to_string();
        assert!(err.contains("id 3"), "{err}");
    }

    #[test]
    fn index_add_sums_repeated_ids() {
        let x = Tensor::zeros(&[2, 3], DType::F64);
        let src = Tensor::ones(&[2, 3], DType::F64);
        let y = x.index_add(1, &ids(&[2, 2, 0]), &src).unwrap();
        assert_eq!(y.to_vec_f64(), vec![1., 0., 2., 1., 0., 2.]);
    }

    #[test]
    fn concat_and_stack_shapes() {
        let a = Tensor::arange(4, DType::U32).reshape(&[2, 2]).unwrap();
        let b = Tensor::arange(2, DType::U32).reshape(&[2, 1]).unwrap();
        let c = Tensor::concat(&[&a, &b], 1).unwrap();
        assert_eq!(c.to_vec::<u32>().unwrap(), vec![0, 1, 0, 2, 3, 1]);
        assert_eq!(Tensor::stack(&[&a, &a], 2).unwrap().shape(), &[2, 2, 2]);
        assert!(Tensor::concat(&[&a, &b], 0).is_err());
    }
}
