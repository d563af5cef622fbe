//! Unary ops, broadcasting binary ops, comparisons, `where`, casts and strided copies.

use super::need;
use crate::compile::{BINARY, CAST, UNARY};
use crate::device::{check_len, DeviceBuffer, DeviceElem, FloatElem, GpuDevice};
use crate::error::Result;
use crate::launch::{entry, launch, Arg, Grid};
use crate::layout::{broadcast_arg, strided_arg, View};

/// An elementwise function of one float (the CPU reference's `UnaryOp`, plus ReLU).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum UnaryOp {
    /// -x
    Neg,
    /// e^x
    Exp,
    /// ln x
    Log,
    /// √x
    Sqrt,
    /// 1/√x
    Rsqrt,
    /// tanh x
    Tanh,
    /// 1/(1+e^-x)
    Sigmoid,
    /// x·sigmoid(x)
    Silu,
    /// GELU, tanh approximation.
    GeluTanh,
    /// GELU, exact (erf).
    GeluErf,
    /// ln(1+e^x), computed stably.
    Softplus,
    /// |x|
    Abs,
    /// x²
    Sqr,
    /// 1/x
    Recip,
    /// x^p
    Powf(f64),
    /// min(max(x, lo), hi)
    Clamp(f64, f64),
    /// a·x + b
    Affine(f64, f64),
    /// max(x, 0), NaN kept.
    Relu,
}

impl UnaryOp {
    /// The op code of unary.cu and the two float parameters the kernel takes (powf: p and
    /// p - 1, computed in f64 as the CPU does).
    fn code(self) -> (i32, f32, f32) {
        match self {
            UnaryOp::Neg => (0, 0.0, 0.0),
            UnaryOp::Exp => (1, 0.0, 0.0),
            UnaryOp::Log => (2, 0.0, 0.0),
            UnaryOp::Sqrt => (3, 0.0, 0.0),
            UnaryOp::Rsqrt => (4, 0.0, 0.0),
            UnaryOp::Tanh => (5, 0.0, 0.0),
            UnaryOp::Sigmoid => (6, 0.0, 0.0),
            UnaryOp::Silu => (7, 0.0, 0.0),
            UnaryOp::GeluTanh => (8, 0.0, 0.0),
            UnaryOp::GeluErf => (9, 0.0, 0.0),
            UnaryOp::Softplus => (10, 0.0, 0.0),
            UnaryOp::Abs => (11, 0.0, 0.0),
            UnaryOp::Sqr => (12, 0.0, 0.0),
            UnaryOp::Recip => (13, 0.0, 0.0),
            UnaryOp::Powf(p) => (14, p as f32, (p - 1.0) as f32),
            UnaryOp::Clamp(lo, hi) => (15, lo as f32, hi as f32),
            UnaryOp::Affine(a, b) => (16, a as f32, b as f32),
            UnaryOp::Relu => (17, 0.0, 0.0),
        }
    }

    /// The leading kernel arguments: op code and parameters.
    fn args(self) -> [Arg; 3] {
        let (code, p0, p1) = self.code();
        [Arg::I32(code), Arg::F32(p0), Arg::F32(p1)]
    }
}

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
    /// max(a, b) (a NaN operand is ignored)
    Maximum,
    /// min(a, b) (a NaN operand is ignored)
    Minimum,
}

impl BinaryOp {
    /// The op code of binary.cu.
    fn code(self) -> i32 {
        match self {
            BinaryOp::Add => 0,
            BinaryOp::Sub => 1,
            BinaryOp::Mul => 2,
            BinaryOp::Div => 3,
            BinaryOp::Maximum => 4,
            BinaryOp::Minimum => 5,
        }
    }
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

impl CmpOp {
    /// The op code of binary.cu.
    fn code(self) -> i32 {
        match self {
            CmpOp::Eq => 0,
            CmpOp::Ne => 1,
            CmpOp::Lt => 2,
            CmpOp::Le => 3,
            CmpOp::Gt => 4,
            CmpOp::Ge => 5,
        }
    }
}

/// A buffer read through a view.
pub type Operand<'a, T> = (&'a DeviceBuffer<T>, &'a View);

impl GpuDevice {
    /// `y = op(x)` over contiguous buffers of one length, 16 bytes per access where aligned.
    pub fn unary<T: FloatElem>(
        &self,
        op: UnaryOp,
        x: &DeviceBuffer<T>,
        y: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        need(self, "unary", "output", y, x.len())?;
        self.check_owner("unary", x)?;
        self.unary_raw::<T>(op, x.device_ptr(), y.device_ptr(), x.len())
    }

    /// `x = op(x)` in place.
    pub fn unary_inplace<T: FloatElem>(&self, op: UnaryOp, x: &mut DeviceBuffer<T>) -> Result<()> {
        self.check_owner("unary_inplace", x)?;
        self.unary_raw::<T>(op, x.device_ptr(), x.device_ptr(), x.len())
    }

    fn unary_raw<T: FloatElem>(&self, op: UnaryOp, x: u64, y: u64, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let [code, p0, p1] = op.args();
        let args = [code, p0, p1, Arg::Ptr(x), Arg::Ptr(y), Arg::size(n)];
        launch(
            self,
            &UNARY,
            &entry::<T>("unary"),
            Grid::elementwise(self, n),
            &args,
        )
    }

    /// `y = op(x[view])` with `y` contiguous in the view's row-major order.
    pub fn unary_strided<T: FloatElem>(
        &self,
        op: UnaryOp,
        x: Operand<'_, T>,
        y: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let (xb, view) = x;
        self.check_owner("unary_strided", xb)?;
        view.check("unary_strided", xb.len())?;
        let n = view.numel();
        need(self, "unary_strided", "output", y, n)?;
        if n == 0 {
            return Ok(());
        }
        let [code, p0, p1] = op.args();
        let args = [
            code,
            p0,
            p1,
            Arg::Ptr(xb.ptr_at(view.offset)),
            Arg::buf(y),
            Arg::size(n),
            Arg::Strided(strided_arg("unary_strided", view)?),
        ];
        launch(
            self,
            &UNARY,
            &entry::<T>("unary_strided"),
            Grid::elementwise(self, n),
            &args,
        )
    }

    /// `dx = g · op'(x)`, the backward of [`GpuDevice::unary`]; contiguous, one length.
    pub fn unary_backward<T: FloatElem>(
        &self,
        op: UnaryOp,
        x: &DeviceBuffer<T>,
        g: &DeviceBuffer<T>,
        dx: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        self.check_owner("unary_backward", x)?;
        need(self, "unary_backward", "gradient", g, x.len())?;
        need(self, "unary_backward", "input gradient", dx, x.len())?;
        if x.is_empty() {
            return Ok(());
        }
        let [code, p0, p1] = op.args();
        let args = [
            code,
            p0,
            p1,
            Arg::buf(x),
            Arg::buf(g),
            Arg::buf(dx),
            Arg::size(x.len()),
        ];
        launch(
            self,
            &UNARY,
            &entry::<T>("unary_backward"),
            Grid::elementwise(self, x.len()),
            &args,
        )
    }

    /// `out = op(a, b)` over contiguous buffers of one length.
    pub fn binary<T: FloatElem>(
        &self,
        op: BinaryOp,
        a: &DeviceBuffer<T>,
        b: &DeviceBuffer<T>,
        out: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        self.check_owner("binary", a)?;
        need(self, "binary", "rhs", b, a.len())?;
        need(self, "binary", "output", out, a.len())?;
        if a.is_empty() {
            return Ok(());
        }
        let args = [
            Arg::I32(op.code()),
            Arg::buf(a),
            Arg::buf(b),
            Arg::buf(out),
            Arg::size(a.len()),
        ];
        launch(
            self,
            &BINARY,
            &entry::<T>("binary"),
            Grid::elementwise(self, a.len()),
            &args,
        )
    }

    /// `out = op(a, b)` with `a` and `b` strided views broadcast (numpy rules) to `out_shape`;
    /// `out` is contiguous.
    pub fn binary_broadcast<T: FloatElem>(
        &self,
        op: BinaryOp,
        a: Operand<'_, T>,
        b: Operand<'_, T>,
        out: &mut DeviceBuffer<T>,
        out_shape: &[usize],
    ) -> Result<()> {
        let (n, layout) = self.broadcast_layout("binary_broadcast", &[a, b], out, out_shape)?;
        if n == 0 {
            return Ok(());
        }
        let args = [
            Arg::I32(op.code()),
            Arg::Ptr(a.0.ptr_at(a.1.offset)),
            Arg::Ptr(b.0.ptr_at(b.1.offset)),
            Arg::buf(out),
            Arg::size(n),
            layout,
        ];
        launch(
            self,
            &BINARY,
            &entry::<T>("binary_broadcast"),
            Grid::elementwise(self, n),
            &args,
        )
    }

    /// `out = (a op b) as u32` with broadcasting as [`GpuDevice::binary_broadcast`]; any dtype.
    pub fn compare<T: DeviceElem>(
        &self,
        op: CmpOp,
        a: Operand<'_, T>,
        b: Operand<'_, T>,
        out: &mut DeviceBuffer<u32>,
        out_shape: &[usize],
    ) -> Result<()> {
        let (n, layout) = self.broadcast_layout("compare", &[a, b], out, out_shape)?;
        if n == 0 {
            return Ok(());
        }
        let args = [
            Arg::I32(op.code()),
            Arg::Ptr(a.0.ptr_at(a.1.offset)),
            Arg::Ptr(b.0.ptr_at(b.1.offset)),
            Arg::buf(out),
            Arg::size(n),
            layout,
        ];
        launch(
            self,
            &BINARY,
            &entry::<T>("compare"),
            Grid::elementwise(self, n),
            &args,
        )
    }

    /// `out = cond != 0 ? a : b`, all three broadcast to `out_shape`; any dtype.
    pub fn where_<T: DeviceElem>(
        &self,
        cond: Operand<'_, u32>,
        a: Operand<'_, T>,
        b: Operand<'_, T>,
        out: &mut DeviceBuffer<T>,
        out_shape: &[usize],
    ) -> Result<()> {
        let (cb, cv) = cond;
        self.check_owner("where", cb)?;
        cv.check("where", cb.len())?;
        let (n, _) = self.broadcast_layout("where", &[a, b], out, out_shape)?;
        if n == 0 {
            return Ok(());
        }
        let layout = broadcast_arg("where", out_shape, &[cv, a.1, b.1])?;
        let args = [
            Arg::Ptr(cb.ptr_at(cv.offset)),
            Arg::Ptr(a.0.ptr_at(a.1.offset)),
            Arg::Ptr(b.0.ptr_at(b.1.offset)),
            Arg::buf(out),
            Arg::size(n),
            Arg::Broadcast(layout),
        ];
        let name = format!("where_{}", T::DTYPE.width_suffix());
        launch(self, &BINARY, &name, Grid::elementwise(self, n), &args)
    }

    /// Checks operands against their buffers and the output against `out_shape`; returns the
    /// element count and the packed layout of the operands.
    fn broadcast_layout<T: DeviceElem, O: DeviceElem>(
        &self,
        op: &'static str,
        operands: &[Operand<'_, T>],
        out: &DeviceBuffer<O>,
        out_shape: &[usize],
    ) -> Result<(usize, Arg)> {
        for (buf, view) in operands {
            self.check_owner(op, buf)?;
            view.check(op, buf.len())?;
        }
        let n = super::product(op, "output shape", out_shape)?;
        need(self, op, "output", out, n)?;
        let views: Vec<&View> = operands.iter().map(|(_, v)| *v).collect();
        Ok((n, Arg::Broadcast(broadcast_arg(op, out_shape, &views)?)))
    }

    /// `y = x` converted to `D` (round to nearest; floats to u32 truncate and saturate, NaN to
    /// 0); contiguous, one length. `S` and `D` must differ.
    pub fn cast<S: DeviceElem, D: DeviceElem>(
        &self,
        x: &DeviceBuffer<S>,
        y: &mut DeviceBuffer<D>,
    ) -> Result<()> {
        self.check_owner("cast", x)?;
        need(self, "cast", "output", y, x.len())?;
        if S::DTYPE == D::DTYPE {
            return Err(crate::CudaError::shape(
                "cast",
                format!("{:?} to itself: use copy", S::DTYPE),
            ));
        }
        if x.is_empty() {
            return Ok(());
        }
        let name = format!("cast_{}_{}", S::DTYPE.suffix(), D::DTYPE.suffix());
        let args = [Arg::buf(x), Arg::buf(y), Arg::size(x.len())];
        launch(self, &CAST, &name, Grid::elementwise(self, x.len()), &args)
    }

    /// `y = x[view]`, materialising a strided view contiguously; any dtype.
    pub fn copy_strided<T: DeviceElem>(&self, x: Operand<'_, T>, y: &mut DeviceBuffer<T>) -> Result<()> {
        let (xb, view) = x;
        self.check_owner("copy_strided", xb)?;
        view.check("copy_strided", xb.len())?;
        let n = view.numel();
        check_len("copy_strided", n, y.len())?;
        self.check_owner("copy_strided", y)?;
        if n == 0 {
            return Ok(());
        }
        let args = [
            Arg::Ptr(xb.ptr_at(view.offset)),
            Arg::buf(y),
            Arg::size(n),
            Arg::Strided(strided_arg("copy_strided", view)?),
        ];
        let name = format!("copy_strided_{}", T::DTYPE.width_suffix());
        launch(self, &CAST, &name, Grid::elementwise(self, n), &args)
    }
}
