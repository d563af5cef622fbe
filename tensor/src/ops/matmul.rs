//! Batched matrix multiplication on the `gemm` crate.
//!
//! f32 and f64 go to gemm's own kernels; bf16, which gemm lacks, and f16, whose gemm
//! matrix-vector path (M or N of 1) rounds the running sum to f16 at every step, are widened to
//! f32, multiplied and rounded once. Every operand is passed to gemm by the strides of its last
//! two axes, so transposed and other strided views multiply without a copy; batch axes are
//! addressed through per-matrix offsets of the broadcast layouts.
//!
//! On a CUDA device the product is one cuBLAS strided-batched GEMM (f32 accumulation, rounded
//! once). An operand goes to cuBLAS in place when its matrices are stored row-major or
//! transposed without gaps and its batch matrices sit at a constant stride (0 for a broadcast);
//! otherwise its matrices are packed first (and, when the batch axes still do not fit, the
//! broadcast is materialised).

use crate::error::shape_err;
use crate::gpu::{cuda_float_dispatch, Gpu};
use crate::layout::{broadcast_shapes, numel, Layout};
use crate::storage::CpuStorage;
use crate::{DType, Element, Result, Tensor, TensorError};
use cuda::GemmSpec;
use gemm::Parallelism;
use num_traits::{One, Zero};
use rayon::prelude::*;

/// Below this many multiply-adds a product runs on one thread; batches of such products run in
/// parallel over the batch instead.
const SERIAL_GEMM_WORK: usize = 1 << 18;

impl Tensor {
    /// `[..., M, K] x [..., K, N] -> [..., M, N]`; batch axes broadcast (numpy rules); both
    /// operands have rank >= 2 and the same float dtype. Transposed views multiply without a copy.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        let (a, b) = (self.shape(), rhs.shape());
        if a.len() < 2 || b.len() < 2 {
            return shape_err("matmul", format!("operands need rank >= 2, got {a:?} x {b:?}"));
        }
        let (m, k) = (a[a.len() - 2], a[a.len() - 1]);
        let (k2, n) = (b[b.len() - 2], b[b.len() - 1]);
        if k != k2 {
            return shape_err("matmul", format!("inner dimensions differ: {a:?} x {b:?}"));
        }
        let batch = broadcast_shapes("matmul", &a[..a.len() - 2], &b[..b.len() - 2])
            .or_else(|_| shape_err("matmul", format!("batch axes do not broadcast: {a:?} x {b:?}")))?;
        self.check_same_dtype("matmul", rhs)?;
        let mut out_shape = batch.clone();
        out_shape.extend([m, n]);
        let dims = Dims { m, k, n };
        if let Some(gpu) = Gpu::of("matmul", &[self, rhs])? {
            return matmul_cuda(&gpu, self, rhs, &batch, dims).and_then(|t| t.reshape(&out_shape));
        }
        let out = match self.dtype() {
            DType::F32 => CpuStorage::from_vec(batched::<f32>(self, rhs, &batch, dims)?),
            DType::F64 => CpuStorage::from_vec(batched::<f64>(self, rhs, &batch, dims)?),
            dtype @ (DType::BF16 | DType::F16) => {
                // Multiply in f32 and round once (see the module doc).
                let (a32, b32) = (self.to_dtype(DType::F32)?, rhs.to_dtype(DType::F32)?);
                let out = batched::<f32>(&a32, &b32, &batch, dims)?.into_par_iter();
                if dtype == DType::BF16 {
                    CpuStorage::from_vec(out.map(half::bf16::from_f32).collect::<Vec<_>>())
                } else {
                    CpuStorage::from_vec(out.map(half::f16::from_f32).collect::<Vec<_>>())
                }
            }
            dtype @ DType::U32 => return Err(TensorError::DType { op: "matmul", dtype }),
        };
        Ok(Tensor::from_cpu(out, &out_shape))
    }
}

/// How cuBLAS reads one operand: its tensor (whose storage starts at its matrix 0), whether the
/// matrices are stored transposed, and the elements between consecutive batch matrices.
struct GemmOperand {
    tensor: Tensor,
    trans: bool,
    stride: usize,
}

/// `t`'s `[batch..., rows, cols]` matrices as cuBLAS can read them, or `None`: the view must start
/// at its storage's first element, its matrices must be row-major (`trans` false) or column-major
/// (`trans` true) without gaps, and its batch matrices must sit at one stride (0 when shared).
fn gemm_view(t: &Tensor, batch: &[usize], rows: usize, cols: usize) -> Option<GemmOperand> {
    let l = t.layout().broadcast_to(&[batch, &[rows, cols]].concat()).ok()?;
    if l.offset() != 0 {
        return None;
    }
    let r = batch.len();
    let (rs, cs) = (l.strides()[r], l.strides()[r + 1]);
    let trans = if (cs == 1 || cols == 1) && (rs == cols || rows == 1) {
        false
    } else if (rs == 1 || rows == 1) && (cs == rows || cols == 1) {
        true
    } else {
        return None;
    };
    // Batch axes (ignoring those of size 1) must flatten to one arithmetic progression: all
    // strides 0 (one matrix for the whole batch), or each axis' stride the next one's times its
    // length.
    let axes: Vec<(usize, usize)> = batch
        .iter()
        .zip(l.strides())
        .filter(|(&n, _)| n != 1)
        .map(|(&n, &s)| (n, s))
        .collect();
    let stride = axes.last().map_or(rows * cols, |&(_, s)| s);
    let uniform = if stride == 0 {
        axes.iter().all(|&(_, s)| s == 0)
    } else {
        axes.windows(2).all(|w| w[0].1 == w[1].1 * w[1].0) && stride >= rows * cols
    };
    uniform.then(|| GemmOperand {
        tensor: t.clone(),
        trans,
        stride,
    })
}

/// `t` as a cuBLAS operand: in place when it can be, else with its own matrices packed, else with
/// the broadcast to `[batch..., rows, cols]` materialised. `pack` makes a packed copy.
fn gemm_operand(
    t: &Tensor,
    batch: &[usize],
    (rows, cols): (usize, usize),
    pack: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<GemmOperand> {
    if let Some(op) = gemm_view(t, batch, rows, cols) {
        return Ok(op);
    }
    if let Some(op) = gemm_view(&pack(t)?, batch, rows, cols) {
        return Ok(op);
    }
    let full = pack(&t.broadcast_to(&[batch, &[rows, cols]].concat())?)?;
    Ok(GemmOperand {
        tensor: full,
        trans: false,
        stride: rows * cols,
    })
}

/// `matmul` on a CUDA device: `[batch, m, n]` from one strided-batched cuBLAS GEMM.
fn matmul_cuda(gpu: &Gpu, a: &Tensor, b: &Tensor, batch: &[usize], d: Dims) -> Result<Tensor> {
    let count = numel(batch);
    let shape = [count, d.m, d.n];
    cuda_float_dispatch!(gpu.op, gpu.device, a.dtype(), T => {
        if d.k == 0 || count * d.m * d.n == 0 {
            return Ok(gpu.tensor(gpu.zeros::<T>(count * d.m * d.n)?, &shape));
        }
        let mut out = gpu.alloc::<T>(count * d.m * d.n)?;
        let pack = |t: &Tensor| gpu.packed(t);
        let (oa, ob) = (
            gemm_operand(a, batch, (d.m, d.k), pack)?,
            gemm_operand(b, batch, (d.k, d.n), pack)?,
        );
        let spec = GemmSpec {
            stride_a: oa.stride,
            stride_b: ob.stride,
            ..GemmSpec::new(d.m, d.n, d.k).batched(count).transposed(oa.trans, ob.trans)
        };
        let (ab, bb) = (oa.tensor.cuda_buffer::<T>(), ob.tensor.cuda_buffer::<T>());
        gpu.check(gpu.dev.gemm(ab, bb, &mut out, spec))?;
        Ok(gpu.tensor(out, &shape))
    })
}

/// Matrix sizes of one product: `[m, k] x [k, n]`.
#[derive(Clone, Copy)]
struct Dims {
    m: usize,
    k: usize,
    n: usize,
}

/// The output pointer handed to rayon tasks; every task writes a disjoint output matrix.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);

// SAFETY: tasks only write disjoint ranges of the buffer behind the pointer, which outlives them.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so that closures capture the whole `Send` wrapper).
    fn get(self) -> *mut T {
        self.0
    }
}

/// Storage offsets of the first element of every batch matrix of `layout`, whose leading axes
/// have the (broadcast) shape `batch`.
fn batch_offsets(layout: &Layout, batch: &[usize]) -> Vec<usize> {
    let r = batch.len();
    Layout::from_parts(batch.to_vec(), layout.strides()[..r].to_vec(), layout.offset())
        .offsets()
        .collect()
}

/// Whether the `[batch..., m, k]` layout's rows, over all batch matrices, sit at one stride:
/// then the batch is one `[batch·m, k]` matrix with the same row and column strides.
fn rows_fold(layout: &Layout, batch: &[usize], m: usize) -> bool {
    let r = batch.len();
    let mut expected = layout.strides()[r] * m;
    for (&n, &s) in batch.iter().zip(layout.strides()).rev() {
        if n == 1 {
            continue;
        }
        if s != expected {
            return false;
        }
        expected = s * n;
    }
    true
}

/// Every batch matrix of `a` x `b` (broadcast over `batch`) into a contiguous result.
fn batched<T: Element + Zero + One>(a: &Tensor, b: &Tensor, batch: &[usize], d: Dims) -> Result<Vec<T>> {
    let la = a.layout().broadcast_to(&[batch, &[d.m, d.k]].concat())?;
    let lb = b.layout().broadcast_to(&[batch, &[d.k, d.n]].concat())?;
    let count = numel(batch);
    let total = count * d.m * d.n;
    if d.m == 0 || d.n == 0 || d.k == 0 {
        return Ok(vec![T::zero(); total]);
    }
    // Not zero-filled: with `read_dst` false below, gemm writes every element of every product.
    let mut out = Vec::<T>::with_capacity(total);
    let (sa, sb) = (a.storage_slice::<T>(), b.storage_slice::<T>());
    let r = batch.len();
    let (a_rs, a_cs) = (la.strides()[r] as isize, la.strides()[r + 1] as isize);
    let (b_rs, b_cs) = (lb.strides()[r] as isize, lb.strides()[r + 1] as isize);
    // One right-hand matrix for the whole batch (a Linear's weight): when the left matrices'
    // rows follow each other at one stride across the batch, the batch is one taller product.
    let (count, d) = if count > 1 && rows_fold(&la, batch, d.m) && lb.strides()[..r].iter().all(|&s| s == 0) {
        (1, Dims { m: count * d.m, ..d })
    } else {
        (count, d)
    };
    let (oa, ob) = (batch_offsets(&la, batch), batch_offsets(&lb, batch));
    let dst = SendPtr(out.as_mut_ptr());
    let run = |i: usize, parallelism: Parallelism| {
        // SAFETY: the offsets and strides come from layouts that index inside their storage;
        // output matrix i is the range [i*m*n, (i+1)*m*n) of `out`, disjoint from every other.
        unsafe {
            gemm::gemm(
                d.m,
                d.n,
                d.k,
                dst.get().add(i * d.m * d.n),
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
    if d.m * d.n * d.k < SERIAL_GEMM_WORK {
        (0..count).into_par_iter().for_each(|i| run(i, Parallelism::None));
    } else {
        let threads = rayon::current_num_threads();
        (0..count).for_each(|i| run(i, Parallelism::Rayon(threads)));
    }
    // SAFETY: the products above wrote all `total` elements (gemm does not read `dst`).
    unsafe { out.set_len(total) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{gemm_operand, GemmOperand};
    use crate::layout::{broadcast_shapes, numel};
    use crate::{DType, Tensor, TensorError};

    /// The naive triple loop over f64 copies, for comparison.
    fn reference(a: &Tensor, b: &Tensor) -> Vec<f64> {
        let (m, k, n) = (a.dim(0), a.dim(1), b.dim(1));
        let (x, y) = (a.to_vec_f64(), b.to_vec_f64());
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| x[i * k + p] * y[p * n + j]).sum();
            }
        }
        out
    }

    /// Matrix `i` of a cuBLAS operand as the GEMM reads it: `rows × cols`, stored row-major or
    /// (`trans`) column-major without gaps, `i · stride` elements from the storage's start.
    fn read(op: &GemmOperand, i: usize, (rows, cols): (usize, usize)) -> Vec<f64> {
        let buf = op.tensor.storage_slice::<f64>();
        let at = |r: usize, c: usize| if op.trans { c * rows + r } else { r * cols + c };
        (0..rows * cols)
            .map(|e| buf[i * op.stride + at(e / cols, e % cols)])
            .collect()
    }

    /// `a · b` computed as the CUDA arm does: each operand through `gemm_operand` (packing on
    /// the host), then one product per batch matrix from the storage alone.
    fn as_cublas_would(a: &Tensor, b: &Tensor) -> Vec<f64> {
        let (ra, rb) = (a.rank(), b.rank());
        let (m, k, n) = (a.dim(ra - 2), a.dim(ra - 1), b.dim(rb - 1));
        let batch = broadcast_shapes("t", &a.shape()[..ra - 2], &b.shape()[..rb - 2]).unwrap();
        let pack = |t: &Tensor| Tensor::from_vec(t.to_vec_f64(), t.shape());
        let oa = gemm_operand(a, &batch, (m, k), pack).unwrap();
        let ob = gemm_operand(b, &batch, (k, n), pack).unwrap();
        let mut out = Vec::new();
        for i in 0..numel(&batch) {
            let (x, y) = (read(&oa, i, (m, k)), read(&ob, i, (k, n)));
            for r in 0..m {
                for c in 0..n {
                    out.push((0..k).map(|p| x[r * k + p] * y[p * n + c]).sum());
                }
            }
        }
        out
    }

    #[test]
    fn cublas_operands_read_every_layout() {
        let t = |shape: &[usize], start: usize| {
            let n = numel(shape);
            Tensor::from_vec((start..start + n).map(|v| (v % 13) as f64 - 6.0).collect(), shape).unwrap()
        };
        let x = t(&[2, 3, 4], 0);
        let cases: Vec<(Tensor, Tensor)> = vec![
            // Packed, and transposed without a copy.
            (x.clone(), t(&[4, 5], 1)),
            (x.clone(), t(&[5, 4], 2).t().unwrap()),
            (t(&[2, 4, 3], 3).t().unwrap(), t(&[2, 5, 4], 4).t().unwrap()),
            // A shared matrix (batch stride 0) and a broadcast batch axis.
            (t(&[3, 4], 5), t(&[2, 4, 5], 6)),
            (t(&[2, 1, 3, 4], 7), t(&[3, 4, 2], 8)),
            // Views that need a copy: an offset, gaps in rows, permuted batch axes.
            (x.narrow(0, 1, 1).unwrap(), t(&[4, 2], 9)),
            (t(&[2, 3, 6], 10).narrow(2, 1, 4).unwrap(), t(&[4, 1], 11)),
            (t(&[3, 2, 4], 12).permute(&[1, 0, 2]).unwrap(), t(&[4, 3], 13)),
            (t(&[4, 3, 2], 14).permute(&[2, 1, 0]).unwrap(), t(&[2, 4, 2], 15)),
            // Vectors and size-1 axes.
            (t(&[1, 4], 16), t(&[4, 1], 17)),
            (t(&[4, 1], 18).t().unwrap(), t(&[1, 4], 19).t().unwrap()),
        ];
        for (a, b) in cases {
            let want = a.matmul(&b).unwrap().to_vec_f64();
            assert_eq!(as_cublas_would(&a, &b), want, "{a:?} x {b:?}");
        }
        // A linear layer's x · wᵀ and a shared matrix go to cuBLAS without a copy.
        let no_copy = |t: &Tensor, batch: &[usize], dims| {
            let op = gemm_operand(t, batch, dims, |_| panic!("no copy expected")).unwrap();
            (
                op.trans,
                op.stride,
                std::sync::Arc::ptr_eq(op.tensor.storage(), t.storage()),
            )
        };
        let w = t(&[5, 4], 0);
        assert_eq!(no_copy(&w.t().unwrap(), &[2], (4, 5)), (true, 0, true));
        assert_eq!(no_copy(&x, &[2], (3, 4)), (false, 12, true));
    }

    #[test]
    fn two_by_three_times_three_by_two() {
        let a = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], &[2, 3]).unwrap();
        let b = Tensor::from_vec(vec![7f32, 8., 9., 10., 11., 12.], &[3, 2]).unwrap();
        assert_eq!(
            a.matmul(&b).unwrap().to_vec::<f32>().unwrap(),
            vec![58., 64., 139., 154.]
        );
    }

    #[test]
    fn every_float_dtype_matches_the_reference() {
        let a = Tensor::from_vec((0..12).map(|i| i as f64 * 0.5 - 2.0).collect(), &[3, 4]).unwrap();
        let b = Tensor::from_vec((0..8).map(|i| 1.0 - i as f64 * 0.25).collect(), &[4, 2]).unwrap();
        let want = reference(&a, &b);
        for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            let (x, y) = (a.to_dtype(dtype).unwrap(), b.to_dtype(dtype).unwrap());
            let got = x.matmul(&y).unwrap();
            assert_eq!(got.dtype(), dtype);
            assert_eq!(got.to_vec_f64(), want, "{dtype}");
        }
    }

    #[test]
    fn transposed_view_equals_contiguous_copy() {
        let a = Tensor::arange(12, DType::F64).reshape(&[2, 3, 2]).unwrap();
        let b = Tensor::arange(6, DType::F64).reshape(&[2, 3]).unwrap();
        let view = a.t().unwrap().matmul(&b.t().unwrap()).unwrap();
        let copy = a
            .t()
            .unwrap()
            .contiguous()
            .matmul(&b.t().unwrap().contiguous())
            .unwrap();
        assert_eq!(view.shape(), &[2, 2, 2]);
        assert_eq!(view.to_vec_f64(), copy.to_vec_f64());
    }

    #[test]
    fn batch_axes_broadcast_and_strided_batches() {
        // [2, 1, 2, 3] x [3, 3, 2] -> [2, 3, 2, 2]; the lhs batch is a permuted view.
        let a = Tensor::arange(12, DType::F32).reshape(&[2, 3, 2]).unwrap();
        let a = a.permute(&[0, 2, 1]).unwrap().unsqueeze(1).unwrap();
        let b = Tensor::arange(18, DType::F32).reshape(&[3, 3, 2]).unwrap();
        let got = a.matmul(&b).unwrap();
        assert_eq!(got.shape(), &[2, 3, 2, 2]);
        let want = a.contiguous().broadcast_to(&[2, 3, 2, 3]).unwrap().contiguous();
        for i in 0..2 {
            for j in 0..3 {
                let x = want
                    .narrow(0, i, 1)
                    .unwrap()
                    .narrow(1, j, 1)
                    .unwrap()
                    .reshape(&[2, 3])
                    .unwrap();
                let y = b.narrow(0, j, 1).unwrap().reshape(&[3, 2]).unwrap();
                let g = got.narrow(0, i, 1).unwrap().narrow(1, j, 1).unwrap();
                assert_eq!(g.to_vec_f64(), reference(&x, &y));
            }
        }
    }

    #[test]
    fn multithreaded_product_of_a_transposed_view() {
        // 80^3 multiply-adds is above the serial threshold, so gemm runs on the rayon pool.
        let a = Tensor::from_vec((0..6400).map(|i| (i % 7) as f64 - 3.0).collect(), &[80, 80]).unwrap();
        let b = Tensor::from_vec((0..6400).map(|i| (i % 5) as f64 * 0.5).collect(), &[80, 80]).unwrap();
        let bt = b.t().unwrap();
        let want = reference(&a, &bt.contiguous());
        assert_eq!(a.matmul(&bt).unwrap().to_vec_f64(), want);
        let (a32, bt32) = (a.to_dtype(DType::F32).unwrap(), bt.to_dtype(DType::F32).unwrap());
        assert_eq!(a32.matmul(&bt32).unwrap().to_vec_f64(), want);
    }

    #[test]
    fn empty_inner_dimension_gives_zeros() {
        let a = Tensor::zeros(&[2, 0], DType::F32);
        let b = Tensor::zeros(&[0, 3], DType::F32);
        assert_eq!(a.matmul(&b).unwrap().to_vec::<f32>().unwrap(), vec![0.0; 6]);
    }

    #[test]
    fn bad_operands_are_errors_naming_both_shapes() {
        let a = Tensor::zeros(&[2, 3], DType::F32);
        let err = a.matmul(&a).unwrap_err().to_string();
        assert!(err.contains("[2, 3] x [2, 3]"), "{err}");
        let err = a
            .matmul(&Tensor::zeros(&[3], DType::F32))
            .unwrap_err()
            .to_string();
        assert!(err.contains("[2, 3] x [3]"), "{err}");
        let (x, y) = (
            Tensor::zeros(&[2, 2, 3], DType::F32),
            Tensor::zeros(&[3, 3, 1], DType::F32),
        );
        let err = x.matmul(&y).unwrap_err().to_string();
        assert!(err.contains("[2, 2, 3] x [3, 3, 1]"), "{err}");
        let b = Tensor::zeros(&[3, 2], DType::F64);
        assert!(matches!(a.matmul(&b), Err(TensorError::DTypeMismatch { .. })));
        let u = Tensor::zeros(&[2, 2], DType::U32);
        assert!(matches!(u.matmul(&u), Err(TensorError::DType { .. })));
    }
}
