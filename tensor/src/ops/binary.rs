//! Broadcasting binary ops, comparisons and `where`.

use crate::dispatch::{any_dispatch, float_dispatch};
use crate::gpu::{cuda_any_dispatch, cuda_float_dispatch, Gpu};
use crate::ops::elementwise::{broadcast_all, zip3_map, zip_map};
use crate::storage::CpuStorage;
use crate::{DType, Element, FloatElement, Result, Tensor, TensorError};
use cuda::kernels::{BinaryOp as CudaBinaryOp, CmpOp as CudaCmpOp};

/// An elementwise function of two floats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinaryOp {
    /// a + b
    Add,
    /// a - b
    Sub,
    /// a · b
    Mul,
    /// a / b
    Div,
    /// max(a, b)
    Maximum,
    /// min(a, b)
    Minimum,
}

/// An elementwise comparison; the result is a u32 mask of 0 and 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// a == b
    Eq,
    /// a != b
    Ne,
    /// a < b
    Lt,
    /// a <= b
    Le,
    /// a > b
    Gt,
    /// a >= b
    Ge,
}

impl BinaryOp {
    /// The same function as the `cuda` crate names it.
    fn to_cuda(self) -> CudaBinaryOp {
        match self {
            BinaryOp::Add => CudaBinaryOp::Add,
            BinaryOp::Sub => CudaBinaryOp::Sub,
            BinaryOp::Mul => CudaBinaryOp::Mul,
            BinaryOp::Div => CudaBinaryOp::Div,
            BinaryOp::Maximum => CudaBinaryOp::Maximum,
            BinaryOp::Minimum => CudaBinaryOp::Minimum,
        }
    }
}

impl CmpOp {
    /// The same comparison as the `cuda` crate names it.
    fn to_cuda(self) -> CudaCmpOp {
        match self {
            CmpOp::Eq => CudaCmpOp::Eq,
            CmpOp::Ne => CudaCmpOp::Ne,
            CmpOp::Lt => CudaCmpOp::Lt,
            CmpOp::Le => CudaCmpOp::Le,
            CmpOp::Gt => CudaCmpOp::Gt,
            CmpOp::Ge => CudaCmpOp::Ge,
        }
    }
}

/// `binary` on a CUDA device: packed operands of one shape take the plain kernel, anything else
/// (broadcasts, strided views) the broadcasting one, which reads the views in place.
fn binary_cuda(gpu: &Gpu, a: &Tensor, op: BinaryOp, b: &Tensor) -> Result<Tensor> {
    let shape = broadcast_all(gpu.op, &[a, b])?;
    cuda_float_dispatch!(gpu.op, gpu.device, a.dtype(), T => {
        let mut out = gpu.alloc::<T>(crate::layout::numel(&shape))?;
        let (ab, bb) = (a.cuda_buffer::<T>(), b.cuda_buffer::<T>());
        if a.shape() == b.shape() && a.is_packed() && b.is_packed() {
            gpu.check(gpu.dev.binary(op.to_cuda(), ab, bb, &mut out))?;
        } else {
            let (va, vb) = (a.view(), b.view());
            gpu.check(gpu.dev.binary_broadcast(op.to_cuda(), (ab, &va), (bb, &vb), &mut out, &shape))?;
        }
        Ok(gpu.tensor(out, &shape))
    })
}

/// `compare` on a CUDA device (any dtype, views read in place).
fn compare_cuda(gpu: &Gpu, a: &Tensor, op: CmpOp, b: &Tensor) -> Result<Tensor> {
    let shape = broadcast_all(gpu.op, &[a, b])?;
    let mut out = gpu.alloc::<u32>(crate::layout::numel(&shape))?;
    let (va, vb) = (a.view(), b.view());
    cuda_any_dispatch!(gpu.op, gpu.device, a.dtype(), T => {
        let (ab, bb) = (a.cuda_buffer::<T>(), b.cuda_buffer::<T>());
        gpu.check(gpu.dev.compare(op.to_cuda(), (ab, &va), (bb, &vb), &mut out, &shape))?;
    });
    Ok(gpu.tensor(out, &shape))
}

/// `where_` on a CUDA device (any dtype, views read in place).
fn where_cuda(gpu: &Gpu, cond: &Tensor, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
    let shape = broadcast_all(gpu.op, &[cond, on_true, on_false])?;
    let (vc, va, vb) = (cond.view(), on_true.view(), on_false.view());
    cuda_any_dispatch!(gpu.op, gpu.device, on_true.dtype(), T => {
        let mut out = gpu.alloc::<T>(crate::layout::numel(&shape))?;
        let (ab, bb) = (on_true.cuda_buffer::<T>(), on_false.cuda_buffer::<T>());
        let cb = cond.cuda_buffer::<u32>();
        gpu.check(gpu.dev.where_((cb, &vc), (ab, &va), (bb, &vb), &mut out, &shape))?;
        Ok(gpu.tensor(out, &shape))
    })
}

impl Tensor {
    pub(crate) fn check_same_dtype(&self, op: &'static str, other: &Tensor) -> Result<()> {
        if self.dtype() != other.dtype() {
            return Err(TensorError::DTypeMismatch {
                op,
                lhs: self.dtype(),
                rhs: other.dtype(),
            });
        }
        Ok(())
    }

    /// `op(self, rhs)` elementwise over the numpy broadcast of both shapes.
    pub fn binary(&self, op: BinaryOp, rhs: &Tensor) -> Result<Tensor> {
        self.check_same_dtype("binary", rhs)?;
        if let Some(gpu) = Gpu::of("binary", &[self, rhs])? {
            return binary_cuda(&gpu, self, op, rhs);
        }
        // One monomorphic loop per op, so that each one vectorises.
        fn run<T: FloatElement>(
            a: &Tensor,
            b: &Tensor,
            f: impl Fn(T::Acc, T::Acc) -> T::Acc + Sync,
        ) -> Result<Tensor> {
            let (out, shape) =
                zip_map::<T, T, T>("binary", a, b, |x, y| T::from_acc(f(x.to_acc(), y.to_acc())))?;
            Ok(Tensor::from_cpu(CpuStorage::from_vec(out), &shape))
        }
        float_dispatch!("binary", self.dtype(), T => match op {
            BinaryOp::Add => run::<T>(self, rhs, |a, b| a + b),
            BinaryOp::Sub => run::<T>(self, rhs, |a, b| a - b),
            BinaryOp::Mul => run::<T>(self, rhs, |a, b| a * b),
            BinaryOp::Div => run::<T>(self, rhs, |a, b| a / b),
            BinaryOp::Maximum => run::<T>(self, rhs, |a, b| a.max(b)),
            BinaryOp::Minimum => run::<T>(self, rhs, |a, b| a.min(b)),
        })
    }

    /// Elementwise comparison with broadcasting; 1 where it holds, else 0 (u32).
    pub fn compare(&self, op: CmpOp, rhs: &Tensor) -> Result<Tensor> {
        self.check_same_dtype("compare", rhs)?;
        if let Some(gpu) = Gpu::of("compare", &[self, rhs])? {
            return compare_cuda(&gpu, self, op, rhs);
        }
        any_dispatch!(self.dtype(), T => {
            let (out, shape) = zip_map::<T, T, u32>("compare", self, rhs, |a, b| {
                u32::from(match op {
                    CmpOp::Eq => a == b,
                    CmpOp::Ne => a != b,
                    CmpOp::Lt => a < b,
                    CmpOp::Le => a <= b,
                    CmpOp::Gt => a > b,
                    CmpOp::Ge => a >= b,
                })
            })?;
            Ok(Tensor::from_cpu(CpuStorage::from_vec(out), &shape))
        })
    }

    /// Picks `on_true` where `self` (a u32 mask) is non-zero, else `on_false`; all three broadcast.
    pub fn where_(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        if self.dtype() != DType::U32 {
            return Err(TensorError::DType {
                op: "where (condition)",
                dtype: self.dtype(),
            });
        }
        on_true.check_same_dtype("where", on_false)?;
        if let Some(gpu) = Gpu::of("where", &[self, on_true, on_false])? {
            return where_cuda(&gpu, self, on_true, on_false);
        }
        any_dispatch!(on_true.dtype(), T => {
            let (out, shape) = zip3_map::<u32, T, T, T>("where", self, on_true, on_false, |c, a, b| {
                if c != 0 { a } else { b }
            })?;
            Ok(Tensor::from_cpu(CpuStorage::from_vec(out), &shape))
        })
    }

    /// Converts every element to `dtype` (round to nearest; floats to u32 truncate and saturate).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        if let Some(gpu) = Gpu::of("to_dtype", &[self])? {
            return gpu.cast(self, dtype);
        }
        any_dispatch!(self.dtype(), S => any_dispatch!(dtype, D => {
            let out = crate::ops::elementwise::map::<S, D>(self, |v| <D as Element>::from_f64(v.to_f64()));
            Ok(Tensor::from_cpu(CpuStorage::from_vec(out), self.shape()))
        }))
    }
}

macro_rules! binary_methods {
    ($($name:ident => $op:ident: $doc:literal),* $(,)?) => {
        impl Tensor {
            $(
                #[doc = $doc]
                pub fn $name(&self, rhs: &Tensor) -> Result<Tensor> {
                    self.binary(BinaryOp::$op, rhs)
                }
            )*
        }
    };
}

binary_methods! {
    add => Add: "a + b with broadcasting.",
    sub => Sub: "a - b with broadcasting.",
    mul => Mul: "a · b with broadcasting.",
    div => Div: "a / b with broadcasting.",
    maximum => Maximum: "max(a, b) with broadcasting.",
    minimum => Minimum: "min(a, b) with broadcasting.",
}

macro_rules! compare_methods {
    ($($name:ident => $op:ident: $doc:literal),* $(,)?) => {
        impl Tensor {
            $(
                #[doc = $doc]
                pub fn $name(&self, rhs: &Tensor) -> Result<Tensor> {
                    self.compare(CmpOp::$op, rhs)
                }
            )*
        }
    };
}

compare_methods! {
    eq => Eq: "1 where a == b (u32 mask).",
    ne => Ne: "1 where a != b (u32 mask).",
    lt => Lt: "1 where a < b (u32 mask).",
    le => Le: "1 where a <= b (u32 mask).",
    gt => Gt: "1 where a > b (u32 mask).",
    ge => Ge: "1 where a >= b (u32 mask).",
}
