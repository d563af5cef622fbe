//! Elementwise unary ops and their derivatives.

use crate::dispatch::float_dispatch;
use crate::gpu::{cuda_float_dispatch, Gpu};
use crate::ops::elementwise::map;
use crate::storage::CpuStorage;
use crate::{FloatElement, Real, Result, Tensor};
use cuda::kernels::UnaryOp as CudaUnaryOp;

/// An elementwise function of one float.
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
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_CUBIC: f64 = 0.044_715;

impl UnaryOp {
    /// f(x).
    #[inline(always)]
    pub fn apply<A: Real>(self, x: A) -> A {
        let one = A::one();
        let half = A::lit(0.5);
        match self {
            UnaryOp::Neg => -x,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => x.ln(),
            UnaryOp::Sqrt => x.sqrt(),
            UnaryOp::Rsqrt => one / x.sqrt(),
            UnaryOp::Tanh => x.tanh_fast(),
            UnaryOp::Sigmoid => sigmoid(x),
            UnaryOp::Silu => silu(x),
            UnaryOp::GeluTanh => {
                half * x * (one + (A::lit(SQRT_2_OVER_PI) * (x + A::lit(GELU_CUBIC) * x * x * x)).tanh_fast())
            }
            UnaryOp::GeluErf => half * x * (one + (x * A::lit(std::f64::consts::FRAC_1_SQRT_2)).erf()),
            UnaryOp::Softplus => x.max(A::zero()) + (-x.abs()).exp_fast().ln_1p_unit(),
            UnaryOp::Abs => x.abs(),
            UnaryOp::Sqr => x * x,
            UnaryOp::Recip => one / x,
            UnaryOp::Powf(p) => x.powf(A::lit(p)),
            UnaryOp::Clamp(lo, hi) => x.max(A::lit(lo)).min(A::lit(hi)),
            UnaryOp::Affine(a, b) => A::lit(a) * x + A::lit(b),
        }
    }

    /// f'(x). Clamp's derivative is 1 strictly inside its range and 0 outside; |x|' is sign(x) (0 at 0).
    #[inline(always)]
    pub fn derivative<A: Real>(self, x: A) -> A {
        let one = A::one();
        let half = A::lit(0.5);
        match self {
            UnaryOp::Neg => -one,
            UnaryOp::Exp => x.exp(),
            UnaryOp::Log => one / x,
            UnaryOp::Sqrt => half / x.sqrt(),
            UnaryOp::Rsqrt => -half / (x * x.sqrt()),
            UnaryOp::Tanh => {
                let t = x.tanh_fast();
                one - t * t
            }
            UnaryOp::Sigmoid => sigmoid(x) * (one - sigmoid(x)),
            UnaryOp::Silu => {
                let s = sigmoid(x);
                s * (one + x * (one - s))
            }
            UnaryOp::GeluTanh => {
                let c = A::lit(SQRT_2_OVER_PI);
                let k = A::lit(GELU_CUBIC);
                let t = (c * (x + k * x * x * x)).tanh_fast();
                half * (one + t) + half * x * (one - t * t) * c * (one + A::lit(3.0) * k * x * x)
            }
            UnaryOp::GeluErf => {
                let pdf = (-half * x * x).exp_fast() * A::lit(0.398_942_280_401_432_7);
                half * (one + (x * A::lit(std::f64::consts::FRAC_1_SQRT_2)).erf()) + x * pdf
            }
            UnaryOp::Softplus => sigmoid(x),
            UnaryOp::Abs => {
                if x == A::zero() {
                    A::zero()
                } else {
                    x.signum()
                }
            }
            UnaryOp::Sqr => A::lit(2.0) * x,
            UnaryOp::Recip => -one / (x * x),
            UnaryOp::Powf(p) => A::lit(p) * x.powf(A::lit(p - 1.0)),
            UnaryOp::Clamp(lo, hi) => {
                if x > A::lit(lo) && x < A::lit(hi) {
                    one
                } else {
                    A::zero()
                }
            }
            UnaryOp::Affine(a, _) => A::lit(a),
        }
    }
}

/// The logistic function 1 / (1 + e^-x), without a branch or a library call so that loops of
/// it vectorise; e^-x overflowing to infinity gives the right limit, 0.
pub(crate) fn sigmoid<A: Real>(x: A) -> A {
    A::one() / (A::one() + (-x).exp_fast())
}

/// x·sigmoid(x), as x / (1 + e^-x): one division and no multiply.
#[inline(always)]
pub(crate) fn silu<A: Real>(x: A) -> A {
    x / (A::one() + (-x).exp_fast())
}

/// [`silu`] on [`Real::exp_fused`]: for loops inside `with_simd` (the `silu` tensor op and the
/// gated norm, which must round alike).
#[inline(always)]
pub(crate) fn silu_fused<A: Real>(x: A) -> A {
    x / (A::one() + (-x).exp_fused())
}

impl UnaryOp {
    /// The same function as the `cuda` crate names it.
    fn to_cuda(self) -> CudaUnaryOp {
        match self {
            UnaryOp::Neg => CudaUnaryOp::Neg,
            UnaryOp::Exp => CudaUnaryOp::Exp,
            UnaryOp::Log => CudaUnaryOp::Log,
            UnaryOp::Sqrt => CudaUnaryOp::Sqrt,
            UnaryOp::Rsqrt => CudaUnaryOp::Rsqrt,
            UnaryOp::Tanh => CudaUnaryOp::Tanh,
            UnaryOp::Sigmoid => CudaUnaryOp::Sigmoid,
            UnaryOp::Silu => CudaUnaryOp::Silu,
            UnaryOp::GeluTanh => CudaUnaryOp::GeluTanh,
            UnaryOp::GeluErf => CudaUnaryOp::GeluErf,
            UnaryOp::Softplus => CudaUnaryOp::Softplus,
            UnaryOp::Abs => CudaUnaryOp::Abs,
            UnaryOp::Sqr => CudaUnaryOp::Sqr,
            UnaryOp::Recip => CudaUnaryOp::Recip,
            UnaryOp::Powf(p) => CudaUnaryOp::Powf(p),
            UnaryOp::Clamp(lo, hi) => CudaUnaryOp::Clamp(lo, hi),
            UnaryOp::Affine(a, b) => CudaUnaryOp::Affine(a, b),
        }
    }
}

/// `unary` on a CUDA device: strided views are read in place.
fn unary_cuda(gpu: &Gpu, x: &Tensor, op: UnaryOp) -> Result<Tensor> {
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let mut y = gpu.alloc::<T>(x.numel())?;
        let xb = x.cuda_buffer::<T>();
        if x.is_packed() {
            gpu.check(gpu.dev.unary(op.to_cuda(), xb, &mut y))?;
        } else {
            gpu.check(gpu.dev.unary_strided(op.to_cuda(), (xb, &x.view()), &mut y))?;
        }
        Ok(gpu.tensor(y, x.shape()))
    })
}

/// `unary_backward` on a CUDA device.
fn unary_backward_cuda(gpu: &Gpu, x: &Tensor, op: UnaryOp, grad: &Tensor) -> Result<Tensor> {
    cuda_float_dispatch!(gpu.op, gpu.device, x.dtype(), T => {
        let (x, g) = (gpu.packed(x)?, gpu.packed(grad)?);
        let mut dx = gpu.alloc::<T>(x.numel())?;
        gpu.check(gpu.dev.unary_backward(op.to_cuda(), x.cuda_buffer::<T>(), g.cuda_buffer::<T>(), &mut dx))?;
        Ok(gpu.tensor(dx, x.shape()))
    })
}

impl Tensor {
    /// Applies `op` to every element.
    pub fn unary(&self, op: UnaryOp) -> Result<Tensor> {
        if let Some(gpu) = Gpu::of("unary", &[self])? {
            return unary_cuda(&gpu, self, op);
        }
        fn run<T: FloatElement>(x: &Tensor, f: impl Fn(T::Acc) -> T::Acc + Sync) -> Result<Tensor> {
            let out = map::<T, T>(x, |v| T::from_acc(f(v.to_acc())));
            Ok(Tensor::from_cpu(CpuStorage::from_vec(out), x.shape()))
        }
        // A loop per op (its parameters bound once), so that the match folds away and the loop can
        // vectorise.
        macro_rules! specialised {
            ($T:ty; $($v:ident),*) => {
                match op {
                    $(UnaryOp::$v => run::<$T>(self, |x| UnaryOp::$v.apply(x)),)*
                    // The map runs inside `with_simd`: the fused exp is fast there.
                    UnaryOp::Silu => run::<$T>(self, silu_fused),
                    UnaryOp::Affine(a, b) => run::<$T>(self, |x| UnaryOp::Affine(a, b).apply(x)),
                    UnaryOp::Clamp(lo, hi) => run::<$T>(self, |x| UnaryOp::Clamp(lo, hi).apply(x)),
                    UnaryOp::Powf(p) => run::<$T>(self, |x| UnaryOp::Powf(p).apply(x)),
                }
            };
        }
        float_dispatch!("unary", self.dtype(), T => specialised!(T; Neg, Exp, Log, Sqrt, Rsqrt, Tanh, Sigmoid,
            GeluTanh, GeluErf, Softplus, Abs, Sqr, Recip))
    }

    /// `grad · f'(x)` elementwise, with `self` as x: the backward of `unary(op)`.
    pub fn unary_backward(&self, op: UnaryOp, grad: &Tensor) -> Result<Tensor> {
        if self.shape() != grad.shape() {
            return crate::error::shape_err(
                "unary_backward",
                format!("input {:?} vs gradient {:?}", self.shape(), grad.shape()),
            );
        }
        self.check_same_dtype("unary_backward", grad)?;
        if let Some(gpu) = Gpu::of("unary_backward", &[self, grad])? {
            return unary_backward_cuda(&gpu, self, op, grad);
        }
        fn run<T: FloatElement>(
            x: &Tensor,
            g: &Tensor,
            d: impl Fn(T::Acc) -> T::Acc + Sync,
        ) -> Result<Tensor> {
            let (out, shape) =
                crate::ops::elementwise::zip_map::<T, T, T>("unary_backward", x, g, |x, g| {
                    T::from_acc(g.to_acc() * d(x.to_acc()))
                })?;
            Ok(Tensor::from_cpu(CpuStorage::from_vec(out), &shape))
        }
        // As in `unary`: a loop per constant op.
        macro_rules! specialised {
            ($T:ty; $($v:ident),*) => {
                match op {
                    $(UnaryOp::$v => run::<$T>(self, grad, |x| UnaryOp::$v.derivative(x)),)*
                    UnaryOp::Affine(a, b) => run::<$T>(self, grad, |x| UnaryOp::Affine(a, b).derivative(x)),
                    UnaryOp::Clamp(lo, hi) => run::<$T>(self, grad, |x| UnaryOp::Clamp(lo, hi).derivative(x)),
                    UnaryOp::Powf(p) => run::<$T>(self, grad, |x| UnaryOp::Powf(p).derivative(x)),
                }
            };
        }
        float_dispatch!("unary_backward", self.dtype(), T => specialised!(T; Neg, Exp, Log, Sqrt, Rsqrt, Tanh,
            Sigmoid, Silu, GeluTanh, GeluErf, Softplus, Abs, Sqr, Recip))
    }
}

macro_rules! unary_methods {
    ($($name:ident => $op:ident: $doc:literal),* $(,)?) => {
        impl Tensor {
            $(
                #[doc = $doc]
                pub fn $name(&self) -> Result<Tensor> {
                    self.unary(UnaryOp::$op)
                }
            )*
        }
    };
}

unary_methods! {
    neg => Neg: "-x elementwise.",
    exp => Exp: "e^x elementwise.",
    log => Log: "ln x elementwise.",
    sqrt => Sqrt: "√x elementwise.",
    rsqrt => Rsqrt: "1/√x elementwise.",
    tanh => Tanh: "tanh elementwise.",
    sigmoid => Sigmoid: "Logistic sigmoid elementwise.",
    silu => Silu: "x·sigmoid(x) elementwise.",
    gelu_tanh => GeluTanh: "GELU (tanh approximation) elementwise.",
    gelu_erf => GeluErf: "GELU (exact, erf) elementwise.",
    softplus => Softplus: "ln(1+e^x) elementwise.",
    abs => Abs: "|x| elementwise.",
    sqr => Sqr: "x² elementwise.",
    recip => Recip: "1/x elementwise.",
}

impl Tensor {
    /// x^p elementwise.
    pub fn powf(&self, p: f64) -> Result<Tensor> {
        self.unary(UnaryOp::Powf(p))
    }

    /// Clamps every element into `[lo, hi]`.
    pub fn clamp(&self, lo: f64, hi: f64) -> Result<Tensor> {
        self.unary(UnaryOp::Clamp(lo, hi))
    }

    /// a·x + b elementwise.
    pub fn affine(&self, a: f64, b: f64) -> Result<Tensor> {
        self.unary(UnaryOp::Affine(a, b))
    }
}
