//! Batched matrix multiplication on the `gemm` crate.

use crate::error::shape_err;
use crate::layout::{broadcast_shapes, numel, Layout};
use crate::storage::CpuStorage;
use crate::{DType, Element, Result, Tensor, TensorError};
use gemm::Parallelism;
use rayon::prelude::*;

/// Below this many multiply-adds per matrix, batches run in parallel and each product serially.
const SERIAL_GEMM_WORK: usize = 1 << 18;

impl Tensor {
    /// `[..., M, K] x [..., K, N] -> [..., M, N]`; batch axes broadcast (numpy rules); both
    /// operands have rank >= 2 and the same float dtype. Transposed views multiply without a copy.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.shape(), rhs.shape());
        if a.len() < 2 || b.len() < 2 {
            return shape_err("matmul", format!("operands need rank >= 2, got {a:?} and {b:?}"));
        }
        let (m, k) = (a[a.len() - 2], a[a.len() - 1]);
        let (k2, n) = (b[b.len() - 2], b[b.len() - 1]);
        if k != k2 {
            return shape_err("matmul", format!("inner dimensions differ: {a:?} x {b:?}"));
        }
        self.check_same_dtype("matmul", rhs)?;
        let batch = broadcast_shapes("matmul", &a[..a.len() - 2], &b[..b.len() - 2])?;
        let mut out_shape = batch.clone();
        out_shape.extend([m, n]);
        let la = self.layout().broadcast_to(&[&batch[..], &[m, k]].concat())?;
        let lb = rhs.layout().broadcast_to(&[&batch[..], &[k, n]].concat())?;
        let dims = Dims { m, k, n };
        let out = match self.dtype() {
            DType::F32 => CpuStorage::from_vec(batched::<f32>(self, &la, rhs, &lb, &batch, dims)),
            DType::F64 => CpuStorage::from_vec(batched::<f64>(self, &la, rhs, &lb, &batch, dims)),
            DType::F16 => CpuStorage::from_vec(batched::<half::f16>(self, &la, rhs, &lb, &batch, dims)),
            DType::BF16 => {
                // gemm has no bf16 kernel: multiply in f32 and round once.
                let (a32, b32) = (self.to_dtype(DType::F32)?, rhs.to_dtype(DType::F32)?);
                let (la, lb) = (a32.layout().broadcast_to(la.shape())?, b32.layout().broadcast_to(lb.shape())?);
                let out = batched::<f32>(&a32, &la, &b32, &lb, &batch, dims);
                CpuStorage::from_vec(out.into_iter().map(half::bf16::from_f32).collect::<Vec<_>>())
            }
            dtype @ DType::U32 => return Err(TensorError::DType { op: "matmul", dtype }),
        };
        Ok(Tensor::from_cpu(out, &out_shape))
    }
}

#[derive(Clone, Copy)]
struct Dims {
    m: usize,
    k: usize,
    n: usize,
}

/// Raw pointers handed to rayon tasks; every task writes a disjoint output matrix.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// Multiplies every batch element of the broadcast layouts `la` x `lb` into a contiguous result.
fn batched<T: Element>(a: &Tensor, la: &Layout, b: &Tensor, lb: &Layout, batch: &[usize], d: Dims) -> Vec<T>
where
    T: num_traits::Zero + num_traits::One,
{
    let (sa, sb) = (a.storage_slice::<T>(), b.storage_slice::<T>());
    let count = numel(batch);
    let mut out = vec![T::zero(); count * d.m * d.n];
    if d.m == 0 || d.n == 0 {
        return out;
    }
    let r = batch.len();
    let (a_rs, a_cs) = (la.strides()[r] as isize, la.strides()[r + 1] as isize);
    let (b_rs, b_cs) = (lb.strides()[r] as isize, lb.strides()[r + 1] as isize);
    // Offsets of each batch element's first entry, from the batch part of each layout.
    let batch_offsets = |l: &Layout| -> Vec<usize> {
        let bl = Layout::from_parts(batch.to_vec(), l.strides()[..r].to_vec(), l.offset());
        bl.offsets().collect()
    };
    let (oa, ob) = (batch_offsets(la), batch_offsets(lb));
    let dst = SendPtr(out.as_mut_ptr());
    let serial = d.m * d.n * d.k < SERIAL_GEMM_WORK && count > 1;
    let run = |i: usize, parallelism: Parallelism| {
        let dst = dst;
        // SAFETY: lhs/rhs offsets and strides come from layouts that index inside their storage;
        // output matrix i is the disjoint range [i*m*n, (i+1)*m*n) of `out`.
        unsafe {
            gemm::gemm(
                d.m,
                d.n,
                d.k,
                dst.0.add(i * d.m * d.n),
                1,
                d.n as isize,
                false,
                sa.as_ptr().add(oa[i]),
                a_cs,
                a_rs,
                sb.as_ptr().add(ob[i]),
                b_cs,
                b_rs,
                T::zero(),
                T::one(),
                false,
                false,
                false,
                parallelism,
            );
        }
    };
    if serial {
        (0..count).into_par_iter().for_each(|i| run(i, Parallelism::None));
    } else {
        let threads = rayon::current_num_threads();
        (0..count).for_each(|i| run(i, Parallelism::Rayon(threads)));
    }
    out
}

#[cfg(test)]
mod tests {
    use crate::{DType, Tensor};

    #[test]
    fn two_by_three_times_three_by_two() {
        let a = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], &[2, 3]).unwrap();
        let b = Tensor::from_vec(vec![7f32, 8., 9., 10., 11., 12.], &[3, 2]).unwrap();
        assert_eq!(a.matmul(&b).unwrap().to_vec::<f32>().unwrap(), vec![58., 64., 139., 154.]);
    }

    #[test]
    fn transposed_view_equals_contiguous_copy() {
        let a = Tensor::arange(12, DType::F64).reshape(&[2, 3, 2]).unwrap();
        let b = Tensor::arange(6, DType::F64).reshape(&[2, 3]).unwrap();
        let view = a.t().unwrap().matmul(&b.t().unwrap()).unwrap();
        let copy = a.t().unwrap().contiguous().matmul(&b.t().unwrap().contiguous()).unwrap();
        assert_eq!(view.shape(), &[2, 2, 2]);
        assert_eq!(view.to_vec_f64(), copy.to_vec_f64());
    }

    #[test]
    fn inner_dimension_mismatch_is_an_error() {
        let a = Tensor::zeros(&[2, 3], DType::F32);
        let err = a.matmul(&a).unwrap_err().to_string();
        assert!(err.contains("[2, 3]"), "{err}");
    }
}
