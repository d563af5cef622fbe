//! Broadcasting binary ops, comparisons and `where`.

use crate::dispatch::{any_dispatch, float_dispatch};
use crate::ops::elementwise::{zip3_map, zip_map};
use crate::storage::CpuStorage;
use crate::{DType, Element, FloatElement, Result, Tensor, TensorError};

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
