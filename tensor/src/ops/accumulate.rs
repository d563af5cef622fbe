//! Sums written into the left operand's own memory, for gradient accumulation: a running sum
//! has one owner, and a fresh buffer per addition (page faults, a zero fill, one more pass
//! over memory) is most of the cost of adding into it. Each op gives exactly the values of its
//! out-of-place form, and is that form when the memory is shared with another handle,
//! borrowed from a mapped file, not one contiguous block, or on a CUDA device.

use crate::dispatch::float_dispatch;
use crate::error::{range_err, shape_err};
use crate::gpu::Gpu;
use crate::ops::elementwise::with_simd;
use crate::ops::index::{check_index_add, checked_ids, scatter_add};
use crate::storage::Storage;
use crate::tensor::PAR_CHUNK;
use crate::{Element, FloatElement, Result, Tensor};
use rayon::prelude::*;

/// `dst[i] = dst[i] + src[i]` on the calling thread, computed in the compute type and rounded
/// as `add` rounds.
fn add_run<T: FloatElement>(dst: &mut [T], src: &[T]) {
    with_simd(
        #[inline(always)]
        || {
            for (o, &v) in dst.iter_mut().zip(src) {
                *o = T::from_acc(o.to_acc() + v.to_acc());
            }
        },
    )
}

/// [`add_run`] in parallel pieces.
fn add_slices<T: FloatElement>(dst: &mut [T], src: &[T]) {
    dst.par_chunks_mut(PAR_CHUNK)
        .zip(src.par_chunks(PAR_CHUNK))
        .for_each(|(d, s)| add_run(d, s));
}

/// Checks that `slice` fits `shape` at `start` along `axis`: the same rank, at most the room
/// left along `axis`, and `shape` on every other axis.
fn check_slice(op: &'static str, slice: &Tensor, shape: &[usize], axis: usize, start: usize) -> Result<()> {
    if axis >= shape.len() || slice.rank() != shape.len() {
        return range_err(
            op,
            format!("axis {axis} of {shape:?} for a slice {:?}", slice.shape()),
        );
    }
    let fits =
        slice.shape().iter().zip(shape).enumerate().all(
            |(i, (&s, &d))| {
                if i == axis {
                    start + s <= d
                } else {
                    s == d
                }
            },
        );
    if !fits {
        return shape_err(
            op,
            format!(
                "slice {:?} at {start} along axis {axis} does not fit {shape:?}",
                slice.shape()
            ),
        );
    }
    Ok(())
}

impl Tensor {
    /// The host elements of `self` for writing, when it is the only handle on one contiguous
    /// block of host memory that it owns.
    fn sole_host_slice<T: Element>(&mut self) -> Option<&mut [T]> {
        match self.sole_storage_mut() {
            Some(Storage::Cpu(s)) => s.as_mut_slice::<T>(),
            _ => None,
        }
    }

    /// `self + other` for two float tensors of one shape, written into `self`'s memory when it
    /// is the only handle on it (see the module doc); otherwise, and for operands that
    /// broadcast, exactly [`Tensor::add`].
    pub fn add_into(mut self, other: &Tensor) -> Result<Tensor> {
        let op = "add_into";
        if self.shape() == other.shape()
            && self.dtype() == other.dtype()
            && self.dtype().is_float()
            && Gpu::of(op, &[&self, other])?.is_none()
        {
            let o = other.contiguous();
            float_dispatch!(op, self.dtype(), T => {
                if let Some(dst) = self.sole_host_slice::<T>() {
                    add_slices(dst, o.contiguous_slice::<T>());
                    return Ok(self);
                }
            });
        }
        self.add(other)
    }

    /// `self` plus `src` on elements `start..start + src.dim(axis)` of `axis` (`src` has
    /// `self`'s shape on every other axis, and `self`'s dtype): the running gradient of a
    /// tensor plus the gradient of one of its `narrow` views. Written into `self`'s memory when
    /// it is the only handle on it; otherwise `src` is padded with zeros and added.
    pub fn add_into_slice(mut self, axis: usize, start: usize, src: &Tensor) -> Result<Tensor> {
        let op = "add_into_slice";
        let shape = self.shape().to_vec();
        check_slice(op, src, &shape, axis, start)?;
        self.check_same_dtype(op, src)?;
        let (len, inner): (usize, usize) = (shape[axis], shape[axis + 1..].iter().product());
        let part = src.dim(axis) * inner;
        if part == 0 {
            return Ok(self);
        }
        if self.dtype().is_float() && Gpu::of(op, &[&self, src])?.is_none() {
            let s = src.contiguous();
            float_dispatch!(op, self.dtype(), T => {
                if let Some(dst) = self.sole_host_slice::<T>() {
                    let src = s.contiguous_slice::<T>();
                    if dst.len() == len * inner {
                        add_slices(&mut dst[start * inner..][..part], src);
                    } else {
                        // One run per index of the axes before `axis`, several runs per task.
                        dst.par_chunks_mut(len * inner)
                            .zip(src.par_chunks(part))
                            .with_min_len(PAR_CHUNK.div_ceil(part))
                            .for_each(|(d, s)| add_run(&mut d[start * inner..][..part], s));
                    }
                    return Ok(self);
                }
            });
        }
        self.add(&src.zero_padded(&shape, axis, start)?)
    }

    /// A tensor of `shape` that is `self` on elements `start..start + self.dim(axis)` of `axis`
    /// and zero elsewhere (`self` has `shape` on every other axis): the gradient of a `narrow`.
    pub fn zero_padded(&self, shape: &[usize], axis: usize, start: usize) -> Result<Tensor> {
        check_slice("zero_padded", self, shape, axis, start)?;
        let mut before = shape.to_vec();
        before[axis] = start;
        let mut after = shape.to_vec();
        after[axis] = shape[axis] - start - self.dim(axis);
        let (zb, za) = (
            Tensor::zeros_on(&before, self.dtype(), self.device())?,
            Tensor::zeros_on(&after, self.dtype(), self.device())?,
        );
        Tensor::concat(&[&zb, self, &za], axis)
    }

    /// [`Tensor::index_add`] written into `self`'s memory when it is the only handle on it:
    /// the running gradient of a table plus the gradient of an `index_select` or `embedding`
    /// of it, without a copy of the table.
    pub fn index_add_into(mut self, axis: usize, ids: &Tensor, src: &Tensor) -> Result<Tensor> {
        let (len, inner) = check_index_add(&self, axis, ids, src)?;
        if self.dtype().is_float() && Gpu::of("index_add", &[&self, ids, src])?.is_none() {
            let ids = checked_ids("index_add", ids, len)?;
            let s = src.contiguous();
            float_dispatch!("index_add", self.dtype(), T => {
                if let Some(dst) = self.sole_host_slice::<T>() {
                    scatter_add(dst, (len, inner), &ids, s.contiguous_slice::<T>());
                    return Ok(self);
                }
            });
        }
        self.index_add(axis, ids, src)
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Tensor};
    use std::sync::Arc;

    /// Values that are not round in any dtype, shaped `shape`.
    fn values(shape: &[usize], seed: usize, dtype: DType) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n)
            .map(|i| ((i * 7 + seed * 13) % 23) as f64 / 7.3 - 1.1)
            .collect();
        Tensor::from_vec(v, shape).unwrap().to_dtype(dtype).unwrap()
    }

    /// Runs `op` on a sole and on a shared left operand: both give `expected` exactly, the
    /// sole one in its own memory, the shared one in new memory with the other handle intact.
    fn in_place_only_when_sole(left: Tensor, expected: &Tensor, op: impl Fn(Tensor) -> Tensor) {
        let before = left.to_vec_f64();
        let held = left.clone();
        let shared = op(left);
        assert!(
            !Arc::ptr_eq(shared.storage(), held.storage()),
            "a shared sum was written in place"
        );
        assert_eq!(held.to_vec_f64(), before, "the other handle changed");
        assert_eq!(shared.to_vec_f64(), expected.to_vec_f64());
        let at = Arc::as_ptr(held.storage());
        let sole = op(held);
        assert_eq!(
            Arc::as_ptr(sole.storage()),
            at,
            "a sole sum was not written in place"
        );
        assert_eq!(sole.to_vec_f64(), expected.to_vec_f64());
        assert_eq!(sole.dtype(), expected.dtype());
    }

    #[test]
    fn add_into_is_add() {
        for dtype in [DType::F32, DType::BF16, DType::F64] {
            let (a, b) = (values(&[3, 5], 1, dtype), values(&[3, 5], 2, dtype));
            let expected = a.add(&b).unwrap();
            in_place_only_when_sole(a, &expected, |a| a.add_into(&b).unwrap());
            // A transposed other operand, and one that broadcasts (always out of place).
            let bt = values(&[5, 3], 3, dtype).t().unwrap();
            let a = values(&[3, 5], 4, dtype);
            assert_eq!(
                a.clone().add_into(&bt).unwrap().to_vec_f64(),
                a.add(&bt).unwrap().to_vec_f64()
            );
            let row = values(&[5], 5, dtype);
            assert_eq!(
                a.clone().add_into(&row).unwrap().to_vec_f64(),
                a.add(&row).unwrap().to_vec_f64()
            );
        }
    }

    #[test]
    fn add_into_slice_is_add_of_the_padded_slice() {
        for dtype in [DType::F32, DType::BF16] {
            for (axis, start, len) in [(0, 1, 2), (1, 0, 3), (1, 2, 2), (2, 3, 1), (2, 0, 4)] {
                let shape = [3, 4, 4];
                let mut part = shape;
                part[axis] = len;
                let (x, src) = (values(&shape, 1, dtype), values(&part, 2, dtype));
                let padded = src.zero_padded(&shape, axis, start).unwrap();
                assert_eq!(
                    padded.narrow(axis, start, len).unwrap().to_vec_f64(),
                    src.to_vec_f64()
                );
                let zeros = padded.to_vec_f64().iter().filter(|&&v| v == 0.0).count();
                assert_eq!(zeros, padded.numel() - src.numel(), "{padded:?}");
                let expected = x.add(&padded).unwrap();
                in_place_only_when_sole(x, &expected, |x| x.add_into_slice(axis, start, &src).unwrap());
            }
        }
        let x = Tensor::zeros(&[2, 3], DType::F32);
        assert!(x
            .clone()
            .add_into_slice(1, 2, &Tensor::zeros(&[2, 2], DType::F32))
            .is_err());
        assert!(x
            .clone()
            .add_into_slice(2, 0, &Tensor::zeros(&[2, 1], DType::F32))
            .is_err());
        assert!(x
            .clone()
            .add_into_slice(0, 0, &Tensor::zeros(&[1, 2], DType::F32))
            .is_err());
        assert!(x
            .add_into_slice(0, 0, &Tensor::zeros(&[1, 3], DType::F64))
            .is_err());
        assert!(Tensor::zeros(&[2, 2], DType::F32)
            .zero_padded(&[2, 3], 1, 2)
            .is_err());
        assert!(Tensor::zeros(&[3, 1], DType::F32)
            .zero_padded(&[2, 3], 1, 0)
            .is_err());
    }

    #[test]
    fn index_add_into_is_index_add() {
        for dtype in [DType::F32, DType::BF16] {
            let ids = Tensor::from_vec(vec![3u32, 0, 3, 1], &[4]).unwrap();
            let (table, rows) = (values(&[5, 3], 1, dtype), values(&[4, 3], 2, dtype));
            let expected = table.index_add(0, &ids, &rows).unwrap();
            in_place_only_when_sole(table, &expected, |t| t.index_add_into(0, &ids, &rows).unwrap());
        }
        let bad = Tensor::from_vec(vec![5u32], &[1]).unwrap();
        let table = Tensor::zeros(&[5, 3], DType::F32);
        assert!(table
            .index_add_into(0, &bad, &Tensor::zeros(&[1, 3], DType::F32))
            .is_err());
    }
}
