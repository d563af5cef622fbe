//! Every forward op of `tensor` against the plain f64 reference in `tests::reference`, plus the two
//! backward kernels that have a direct reference (`unary_backward`, `cross_entropy_backward`).
//!
//! Inputs are fresh random values, seeded from a proptest-drawn u64, on small random shapes with
//! size-1 and odd dimensions. Each input is laid out contiguously or as a non-contiguous view (see
//! [`View`]): permuted storage, narrowed or strided out of a NaN-padded buffer, or broadcast from a
//! smaller tensor. The reference always sees the same logical values rounded to the dtype under
//! test, so what is left is the kernel's own error, measured as the relative L2 error of the
//! whole output: at most 1e-5 in f32, 2e-3 in f16, 1e-2 in bf16 and 1e-12 in f64; ops that only
//! move, pick or compare elements must match exactly. NaN never passes, so a kernel that reads a
//! view's padding fails.
//!
//! A one-element output is only as accurate as that element, so the elementwise suites draw from
//! domains where the f32 formulas do not cancel to a result near zero (e.g. GELU left of -2, where
//! `1 + tanh(..)` loses digits), and reductions use mostly positive values.
//!
//! `OPS_STRESS=n cargo test -p tests --test ops` multiplies every case count by n.

use std::sync::Arc;

use proptest::prelude::*;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tensor::DType::{BF16, F16, F32, F64, U32};
use tensor::{bf16, f16, seeded_rng, DType, Tensor, TensorError, UnaryOp};
use tests::reference::{self as r, RefBinary, RefCmp, RefTensor, RefUnary};
use tests::{config, random_ids, random_ref, shape, to_ref, to_tensor};

type TestResult = Result<(), TestCaseError>;

/// The float dtypes: f32 and the representative others.
const FLOATS: [DType; 4] = [F32, BF16, F16, F64];
/// f32, bf16 and f64, for the ops whose f16 path is the bf16 one.
const MAIN: [DType; 3] = [F32, BF16, F64];
/// Every dtype, for ops that only move or compare elements.
const ALL: [DType; 5] = [F32, BF16, F16, F64, U32];

/// Proptest settings with `n` cases, times `OPS_STRESS` when set.
fn cases(n: u32) -> ProptestConfig {
    let stress = std::env::var("OPS_STRESS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    config(n * stress)
}

/// The largest relative error a kernel may have in `dtype` (0: exact).
fn tol(dtype: DType) -> f64 {
    match dtype {
        F32 => 1e-5,
        F64 => 1e-12,
        BF16 => 1e-2,
        F16 => 2e-3,
        U32 => 0.0,
    }
}

// ---------------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------------

/// Turns a tensor error into a failed case.
trait OrFail<T> {
    fn or_fail(self) -> Result<T, TestCaseError>;
}

impl<T> OrFail<T> for tensor::Result<T> {
    fn or_fail(self) -> Result<T, TestCaseError> {
        self.map_err(|e| TestCaseError::fail(format!("unexpected error: {e}")))
    }
}

/// Fails unless `out` has the reference's shape and a relative error of at most `tol` (0: exact).
fn check_close(out: &Tensor, reference: &RefTensor, tol: f64) -> TestResult {
    prop_assert_eq!(
        out.shape(),
        reference.shape.as_slice(),
        "shape of the {} result",
        out.dtype()
    );
    let err = to_ref(out).rel_error(reference);
    prop_assert!(
        err <= tol,
        "{} result of shape {:?} off by {err:.3e} (tolerance {tol:.0e})\n got {:?}\nwant {:?}",
        out.dtype(),
        out.shape(),
        head(&to_ref(out).data),
        head(&reference.data)
    );
    Ok(())
}

/// The first few values, for failure messages.
fn head(values: &[f64]) -> &[f64] {
    &values[..values.len().min(12)]
}

/// `check_close` at the tolerance of `dtype`, which `out` must have.
fn check(out: &Tensor, reference: &RefTensor, dtype: DType) -> TestResult {
    prop_assert_eq!(out.dtype(), dtype);
    check_close(out, reference, tol(dtype))
}

/// Exact equality in `dtype`, for ops that only move, pick or compare elements.
fn check_exact(out: &Tensor, reference: &RefTensor, dtype: DType) -> TestResult {
    prop_assert_eq!(out.dtype(), dtype);
    check_close(out, reference, 0.0)
}

/// Whether two tensors are views of one storage (no copy was made).
fn shares_storage(a: &Tensor, b: &Tensor) -> bool {
    Arc::ptr_eq(a.storage(), b.storage())
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/// How an input tensor is laid out over its storage.
#[derive(Clone, Copy, Debug)]
enum View {
    /// Row-major, offset 0.
    Contiguous,
    /// Stored with the axes reversed and viewed through `permute` (rank >= 2, else `Strided`).
    Permuted,
    /// Cut out of a buffer padded with NaN on both sides of one axis, by `narrow`.
    Narrowed,
    /// Every other element of a NaN-interleaved buffer: all strides doubled.
    Strided,
    /// Broadcast (zero strides) from a shape with some axes 1 and some leading axes dropped.
    Broadcast,
}

fn view() -> impl Strategy<Value = View> {
    prop_oneof![
        Just(View::Contiguous),
        Just(View::Permuted),
        Just(View::Narrowed),
        Just(View::Strided),
        Just(View::Broadcast),
    ]
}

/// Where input values come from: uniform in `[lo, hi)`, rounded down to a multiple of `step`
/// when `step > 0` (which makes ties and exact equalities common).
#[derive(Clone, Copy, Debug)]
struct Dist {
    lo: f64,
    hi: f64,
    step: f64,
}

const fn uniform(lo: f64, hi: f64) -> Dist {
    Dist { lo, hi, step: 0.0 }
}

const fn grid(lo: f64, hi: f64, step: f64) -> Dist {
    Dist { lo, hi, step }
}

impl Dist {
    /// Fresh values of `shape`, rounded to `dtype`.
    fn sample(self, shape: &[usize], dtype: DType, seed: u64) -> RefTensor {
        let mut values = random_ref(shape, self.lo, self.hi, seed);
        if self.step > 0.0 {
            values
                .data
                .iter_mut()
                .for_each(|v| *v = (*v / self.step).floor() * self.step);
        }
        rounded(&values, dtype)
    }
}

/// Values that every dtype holds exactly once rounded: small integers for u32.
fn values_for(dtype: DType) -> Dist {
    if dtype.is_float() {
        uniform(-2.0, 2.0)
    } else {
        grid(0.0, 1000.0, 1.0)
    }
}

/// The values rounded to `dtype` (through a contiguous tensor, independent of any view code).
fn rounded(values: &RefTensor, dtype: DType) -> RefTensor {
    to_ref(&to_tensor(values, dtype))
}

/// `f` applied to every element.
fn map(x: &RefTensor, f: impl Fn(f64) -> f64) -> RefTensor {
    RefTensor::new(x.shape.clone(), x.data.iter().map(|&v| f(v)).collect())
}

/// A rank-0 reference tensor.
fn scalar_ref(v: f64) -> RefTensor {
    RefTensor::new(vec![], vec![v])
}

/// `shape` with some axes set to 1 and some leading axes dropped: a shape that broadcasts to it.
fn broadcastable(shape: &[usize], mask: u32) -> Vec<usize> {
    let drop = (mask as usize >> 8) % (shape.len() + 1);
    shape[drop..]
        .iter()
        .enumerate()
        .map(|(i, &d)| if mask >> i & 1 == 1 { 1 } else { d })
        .collect()
}

/// A tensor holding `values` (already representable in `dtype`) laid out as `view`. `Broadcast`
/// needs values of its own (see [`input`]), so here it means `Strided`.
fn lay_out(values: &RefTensor, dtype: DType, view: View, seed: u64) -> Tensor {
    let rank = values.rank();
    // Padding that a kernel must never read: NaN, or for u32 a value that is usually out of range.
    let pad = if dtype.is_float() { f64::NAN } else { 7.0 };
    let laid_out = match view {
        View::Contiguous => Ok(to_tensor(values, dtype)),
        View::Permuted if rank >= 2 => {
            // Reversing the axes is its own inverse.
            let perm: Vec<usize> = (0..rank).rev().collect();
            to_tensor(&r::permute(values, &perm), dtype).permute(&perm)
        }
        View::Narrowed if rank >= 1 => {
            let axis = (seed % rank as u64) as usize;
            let (before, len) = (1 + (seed >> 8) as usize % 3, values.shape[axis]);
            let mut padded = values.shape.clone();
            padded[axis] += before + 2;
            let stored = RefTensor::from_fn(&padded, |idx| {
                let mut src = idx.to_vec();
                src[axis] = idx[axis].wrapping_sub(before);
                if src[axis] < len {
                    values.get(&src)
                } else {
                    pad
                }
            });
            to_tensor(&stored, dtype).narrow(axis, before, len)
        }
        _ => {
            let stored = RefTensor::from_fn(&[values.shape.as_slice(), &[2]].concat(), |idx| {
                if idx[rank] == 0 {
                    values.get(&idx[..rank])
                } else {
                    pad
                }
            });
            to_tensor(&stored, dtype)
                .narrow(rank, 0, 1)
                .and_then(|t| t.squeeze(rank))
        }
    };
    laid_out.expect("views of a fresh tensor are valid")
}

/// A fresh input of `shape` from `dist` in `dtype`, laid out as `view`, and its logical values.
fn input(shape: &[usize], dist: Dist, dtype: DType, view: View, seed: u64) -> (Tensor, RefTensor) {
    if let View::Broadcast = view {
        let source = dist.sample(&broadcastable(shape, (seed >> 32) as u32), dtype, seed);
        let t = to_tensor(&source, dtype)
            .broadcast_to(shape)
            .expect("the source broadcasts");
        return (t, r::broadcast_to(&source, shape));
    }
    let values = dist.sample(shape, dtype, seed);
    (lay_out(&values, dtype, view, seed), values)
}

/// Ids as a u32 tensor of `shape`, laid out as `view`.
fn ids_input(ids: &[usize], shape: &[usize], view: View, seed: u64) -> Tensor {
    let values = RefTensor::new(shape.to_vec(), ids.iter().map(|&i| i as f64).collect());
    lay_out(&values, U32, view, seed)
}

/// A `[batch.., rows, cols]` matmul operand in [-1, 1); when `transposed`, it is built as
/// `[batch.., cols, rows]` (laid out as `view`) and seen through `.t()`.
fn matrix(
    batch: &[usize],
    (rows, cols): (usize, usize),
    transposed: bool,
    dtype: DType,
    view: View,
    seed: u64,
) -> (Tensor, RefTensor) {
    let dims = if transposed { [cols, rows] } else { [rows, cols] };
    let (t, tr) = input(&[batch, &dims].concat(), uniform(-1.0, 1.0), dtype, view, seed);
    if !transposed {
        return (t, tr);
    }
    let rank = tr.rank();
    (t.t().expect("rank >= 2"), r::transpose(&tr, rank - 2, rank - 1))
}

// ---------------------------------------------------------------------------------------------
// Unary ops
// ---------------------------------------------------------------------------------------------

/// The reference's name for `op` (Affine, which it lacks, is mapped by hand where used).
fn ref_unary(op: UnaryOp) -> RefUnary {
    match op {
        UnaryOp::Neg => RefUnary::Neg,
        UnaryOp::Exp => RefUnary::Exp,
        UnaryOp::Log => RefUnary::Log,
        UnaryOp::Sqrt => RefUnary::Sqrt,
        UnaryOp::Rsqrt => RefUnary::Rsqrt,
        UnaryOp::Tanh => RefUnary::Tanh,
        UnaryOp::Sigmoid => RefUnary::Sigmoid,
        UnaryOp::Silu => RefUnary::Silu,
        UnaryOp::GeluTanh => RefUnary::GeluTanh,
        UnaryOp::GeluErf => RefUnary::GeluErf,
        UnaryOp::Softplus => RefUnary::Softplus,
        UnaryOp::Abs => RefUnary::Abs,
        UnaryOp::Sqr => RefUnary::Sqr,
        UnaryOp::Recip => RefUnary::Recip,
        UnaryOp::Powf(p) => RefUnary::Powf(p),
        UnaryOp::Clamp(lo, hi) => RefUnary::Clamp(lo, hi),
        UnaryOp::Affine(..) => unreachable!("the reference has no affine op"),
    }
}

/// f(x) elementwise.
fn unary_ref(x: &RefTensor, op: UnaryOp) -> RefTensor {
    match op {
        UnaryOp::Affine(a, b) => map(x, |v| a * v + b),
        _ => r::unary(x, ref_unary(op)),
    }
}

/// f'(x) elementwise.
fn unary_derivative_ref(x: &RefTensor, op: UnaryOp) -> RefTensor {
    match op {
        UnaryOp::Affine(a, _) => map(x, |_| a),
        _ => r::unary_derivative(x, ref_unary(op)),
    }
}

/// `op` in every float dtype on one input layout.
fn check_unary(op: UnaryOp, s: &[usize], dist: Dist, view: View, seed: u64) -> TestResult {
    for dtype in FLOATS {
        let (x, xr) = input(s, dist, dtype, view, seed);
        check(&x.unary(op).or_fail()?, &unary_ref(&xr, op), dtype)?;
    }
    Ok(())
}

macro_rules! unary_tests {
    ($($name:ident: $op:expr, $lo:expr, $hi:expr;)*) => {
        proptest! {
            #![proptest_config(cases(24))]
            $(
                #[test]
                fn $name(s in shape(4, 7), v in view(), seed in any::<u64>()) {
                    check_unary($op, &s, uniform($lo, $hi), v, seed)?;
                }
            )*
        }
    };
}

unary_tests! {
    unary_neg: UnaryOp::Neg, -2.0, 2.0;
    unary_exp: UnaryOp::Exp, -4.0, 4.0;
    unary_log: UnaryOp::Log, 0.1, 4.0;
    unary_sqrt: UnaryOp::Sqrt, 0.1, 4.0;
    unary_rsqrt: UnaryOp::Rsqrt, 0.1, 4.0;
    unary_tanh: UnaryOp::Tanh, -3.0, 3.0;
    unary_sigmoid: UnaryOp::Sigmoid, -6.0, 6.0;
    unary_silu: UnaryOp::Silu, -6.0, 6.0;
    unary_gelu_tanh: UnaryOp::GeluTanh, -2.0, 3.0;
    unary_gelu_erf: UnaryOp::GeluErf, -2.0, 3.0;
    unary_softplus: UnaryOp::Softplus, -6.0, 6.0;
    unary_abs: UnaryOp::Abs, -2.0, 2.0;
    unary_sqr: UnaryOp::Sqr, -2.0, 2.0;
    unary_recip: UnaryOp::Recip, 0.25, 4.0;
    unary_powf: UnaryOp::Powf(2.7), 0.1, 3.0;
    unary_powf_negative_exponent: UnaryOp::Powf(-1.5), 0.25, 4.0;
    unary_clamp: UnaryOp::Clamp(-0.5, 0.7), -2.0, 2.0;
    unary_affine: UnaryOp::Affine(-1.5, 3.5), -2.0, 2.0;
    unary_affine_shift: UnaryOp::Affine(0.75, -2.0), -2.0, 2.0;
}

/// Every unary op with a domain where its f32 derivative formula is well conditioned (SiLU' and
/// GELU' cross zero left of -0.75, tanh' and sigmoid' flatten out far from 0).
const UNARY_DERIVATIVES: [(UnaryOp, f64, f64); 19] = [
    (UnaryOp::Neg, -2.0, 2.0),
    (UnaryOp::Exp, -4.0, 4.0),
    (UnaryOp::Log, 0.25, 4.0),
    (UnaryOp::Sqrt, 0.25, 4.0),
    (UnaryOp::Rsqrt, 0.25, 4.0),
    (UnaryOp::Tanh, -2.0, 2.0),
    (UnaryOp::Sigmoid, -4.0, 4.0),
    (UnaryOp::Silu, -1.0, 4.0),
    (UnaryOp::GeluTanh, -0.5, 3.0),
    (UnaryOp::GeluErf, -0.5, 3.0),
    (UnaryOp::Softplus, -4.0, 4.0),
    (UnaryOp::Abs, -2.0, 2.0),
    (UnaryOp::Sqr, -2.0, 2.0),
    (UnaryOp::Recip, 0.25, 4.0),
    (UnaryOp::Powf(2.7), 0.25, 3.0),
    (UnaryOp::Powf(-1.5), 0.25, 4.0),
    (UnaryOp::Clamp(-0.5, 0.7), -2.0, 2.0),
    (UnaryOp::Affine(-1.5, 3.5), -2.0, 2.0),
    (UnaryOp::Affine(0.75, -2.0), -2.0, 2.0),
];

proptest! {
    #![proptest_config(cases(24))]

    #[test]
    fn unary_backward_is_grad_times_derivative(
        s in shape(3, 6),
        (vx, vg) in (view(), view()),
        seed in any::<u64>(),
    ) {
        for (op, lo, hi) in UNARY_DERIVATIVES {
            for dtype in MAIN {
                let (x, xr) = input(&s, uniform(lo, hi), dtype, vx, seed);
                let (g, gr) = input(&s, uniform(-2.0, 2.0), dtype, vg, seed ^ 1);
                let want = r::binary(&unary_derivative_ref(&xr, op), &gr, RefBinary::Mul);
                check(&x.unary_backward(op, &g).or_fail()?, &want, dtype)
                    .map_err(|e| TestCaseError::fail(format!("{op:?}: {e}")))?;
            }
        }
    }
}

#[test]
fn named_unary_methods_are_their_ops() {
    type Method = fn(&Tensor) -> tensor::Result<Tensor>;
    let named: [(Method, UnaryOp); 14] = [
        (Tensor::neg, UnaryOp::Neg),
        (Tensor::exp, UnaryOp::Exp),
        (Tensor::log, UnaryOp::Log),
        (Tensor::sqrt, UnaryOp::Sqrt),
        (Tensor::rsqrt, UnaryOp::Rsqrt),
        (Tensor::tanh, UnaryOp::Tanh),
        (Tensor::sigmoid, UnaryOp::Sigmoid),
        (Tensor::silu, UnaryOp::Silu),
        (Tensor::gelu_tanh, UnaryOp::GeluTanh),
        (Tensor::gelu_erf, UnaryOp::GeluErf),
        (Tensor::softplus, UnaryOp::Softplus),
        (Tensor::abs, UnaryOp::Abs),
        (Tensor::sqr, UnaryOp::Sqr),
        (Tensor::recip, UnaryOp::Recip),
    ];
    let x = to_tensor(&random_ref(&[3, 5], 0.25, 2.0, 11), F32);
    let same = |a: tensor::Result<Tensor>, op| a.unwrap().to_vec_f64() == x.unary(op).unwrap().to_vec_f64();
    for (method, op) in named {
        assert!(same(method(&x), op), "{op:?}");
    }
    assert!(same(x.powf(1.3), UnaryOp::Powf(1.3)));
    assert!(same(x.clamp(0.5, 1.5), UnaryOp::Clamp(0.5, 1.5)));
    assert!(same(x.affine(-2.0, 0.5), UnaryOp::Affine(-2.0, 0.5)));
}

// ---------------------------------------------------------------------------------------------
// Binary ops, comparisons, where, casts
// ---------------------------------------------------------------------------------------------

macro_rules! binary_tests {
    ($($name:ident: $method:ident, $op:ident, $lhs:expr, $rhs:expr;)*) => {
        proptest! {
            #![proptest_config(cases(24))]
            $(
                #[test]
                fn $name(
                    s in shape(4, 6),
                    mask in any::<u32>(),
                    broadcast_lhs in any::<bool>(),
                    (va, vb) in (view(), view()),
                    seed in any::<u64>(),
                ) {
                    let small = broadcastable(&s, mask);
                    let (sa, sb) = if broadcast_lhs { (&small, &s) } else { (&s, &small) };
                    for dtype in FLOATS {
                        let (a, ar) = input(sa, $lhs, dtype, va, seed);
                        let (b, br) = input(sb, $rhs, dtype, vb, seed ^ 1);
                        check(&a.$method(&b).or_fail()?, &r::binary(&ar, &br, RefBinary::$op), dtype)?;
                    }
                }
            )*
        }
    };
}

binary_tests! {
    binary_add: add, Add, uniform(-2.0, 2.0), uniform(-2.0, 2.0);
    binary_sub: sub, Sub, uniform(-2.0, 2.0), uniform(-2.0, 2.0);
    binary_mul: mul, Mul, uniform(-2.0, 2.0), uniform(-2.0, 2.0);
    binary_div: div, Div, uniform(-2.0, 2.0), uniform(0.25, 2.0);
    binary_maximum: maximum, Maximum, grid(-2.0, 2.0, 0.5), grid(-2.0, 2.0, 0.5);
    binary_minimum: minimum, Minimum, grid(-2.0, 2.0, 0.5), grid(-2.0, 2.0, 0.5);
}

macro_rules! compare_tests {
    ($($name:ident: $method:ident, $op:ident;)*) => {
        proptest! {
            #![proptest_config(cases(24))]
            $(
                #[test]
                fn $name(
                    s in shape(4, 6),
                    mask in any::<u32>(),
                    (va, vb) in (view(), view()),
                    seed in any::<u64>(),
                ) {
                    // Values in {0, 1, 2, 3}: every dtype holds them and equal pairs are common.
                    for dtype in ALL {
                        let (a, ar) = input(&s, grid(0.0, 4.0, 1.0), dtype, va, seed);
                        let small = broadcastable(&s, mask);
                        let (b, br) = input(&small, grid(0.0, 4.0, 1.0), dtype, vb, seed ^ 1);
                        check_exact(&a.$method(&b).or_fail()?, &r::compare(&ar, &br, RefCmp::$op), U32)?;
                        check_exact(&b.$method(&a).or_fail()?, &r::compare(&br, &ar, RefCmp::$op), U32)?;
                    }
                }
            )*
        }
    };
}

compare_tests! {
    compare_eq: eq, Eq;
    compare_ne: ne, Ne;
    compare_lt: lt, Lt;
    compare_le: le, Le;
    compare_gt: gt, Gt;
    compare_ge: ge, Ge;
}

/// Cast-test values: mantissas in [-1, 1) scaled by 2^e for e in -12..12, so that every cast sees
/// many exponents (and f16 its subnormals).
fn spread_exponents(s: &[usize], seed: u64) -> RefTensor {
    let mantissas = random_ref(s, -1.0, 1.0, seed);
    let exponents = random_ref(s, -12.0, 12.0, seed ^ 1);
    let data = mantissas
        .data
        .iter()
        .zip(&exponents.data)
        .map(|(m, e)| m * 2f64.powi(e.floor() as i32));
    RefTensor::new(s.to_vec(), data.collect())
}

/// The bits of `v` rounded to nearest (ties to even) in a 16-bit float format with decoder
/// `decode`: whichever of `guess` and its two neighbours is closest. This needs no bit tricks
/// and so checks them.
fn nearest_16bit(v: f64, guess: u16, decode: fn(u16) -> f64) -> u16 {
    let mut best = guess;
    for candidate in [guess.wrapping_sub(1), guess.wrapping_add(1)] {
        let (d, d_best) = ((decode(candidate) - v).abs(), (decode(best) - v).abs());
        if d < d_best || (d == d_best && candidate % 2 == 0) {
            best = candidate;
        }
    }
    best
}

/// Fails unless every element of `y` (bf16 or f16) is `source` rounded to nearest.
fn check_nearest_16bit(y: &Tensor, source: &[f64]) -> TestResult {
    let (bits, decode): (Vec<u16>, fn(u16) -> f64) = match y.dtype() {
        BF16 => (
            y.to_vec::<bf16>()
                .or_fail()?
                .iter()
                .map(|h| h.to_bits())
                .collect(),
            |b| bf16::from_bits(b).to_f64(),
        ),
        F16 => (
            y.to_vec::<f16>().or_fail()?.iter().map(|h| h.to_bits()).collect(),
            |b| f16::from_bits(b).to_f64(),
        ),
        dtype => unreachable!("{dtype} is not a 16-bit float"),
    };
    for (&got, &v) in bits.iter().zip(source) {
        let want = nearest_16bit(v, got, decode);
        let (dtype, got_v, want_v) = (y.dtype(), decode(got), decode(want));
        prop_assert_eq!(
            got,
            want,
            "{} rounded {} to {} instead of {}",
            dtype,
            v,
            got_v,
            want_v
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(cases(24))]

    #[test]
    fn where_selects_with_broadcasting(
        s in shape(4, 6),
        masks in (any::<u32>(), any::<u32>(), any::<u32>()),
        views in (view(), view(), view()),
        seed in any::<u64>(),
    ) {
        // Any non-zero condition selects `on_true`.
        let shapes = [masks.0, masks.1, masks.2].map(|m| broadcastable(&s, m));
        let (cond, cr) = input(&shapes[0], grid(0.0, 3.0, 1.0), U32, views.0, seed);
        for dtype in ALL {
            let (a, ar) = input(&shapes[1], values_for(dtype), dtype, views.1, seed ^ 1);
            let (b, br) = input(&shapes[2], values_for(dtype), dtype, views.2, seed ^ 2);
            check_exact(&cond.where_(&a, &b).or_fail()?, &r::where_(&cr, &ar, &br), dtype)?;
        }
    }

    #[test]
    fn float_casts_within_unit_roundoff(s in shape(3, 7), v in view(), seed in any::<u64>()) {
        // (target, unit roundoff, half the smallest subnormal step where the values reach it).
        // Round-to-nearest itself is checked on many fixed values in `casts_round_to_nearest`.
        let targets = [
            (F64, 0.0, 0.0),
            (F32, 2f64.powi(-24), 0.0),
            (BF16, 2f64.powi(-8), 0.0),
            (F16, 2f64.powi(-11), 2f64.powi(-25)),
        ];
        for source in [F32, F64] {
            let xr = rounded(&spread_exponents(&s, seed), source);
            let x = lay_out(&xr, source, v, seed);
            for (target, unit, tiny) in targets {
                let y = x.to_dtype(target).or_fail()?;
                prop_assert_eq!(y.dtype(), target);
                let yr = to_ref(&y);
                for (&got, &want) in yr.data.iter().zip(&xr.data) {
                    let bound = unit * want.abs() + tiny;
                    prop_assert!((got - want).abs() <= bound, "{}: {} became {}", target, want, got);
                }
                // Casting back is exact: the target is the narrower type, or it holds every value.
                let back = y.to_dtype(source).or_fail()?;
                check_exact(&back, &yr, source)?;
                // Rust's `as f32` rounds to nearest.
                if target == F32 {
                    check_exact(&y, &map(&xr, |v| v as f32 as f64), F32)?;
                }
            }
        }
    }

    #[test]
    fn integer_casts_truncate_and_saturate(s in shape(3, 7), v in view(), seed in any::<u64>()) {
        let xr = rounded(&random_ref(&s, -3.0, 300.0, seed), F32);
        let ids = lay_out(&xr, F32, v, seed).to_dtype(U32).or_fail()?;
        let want = map(&xr, |v| v.max(0.0).trunc());
        check_exact(&ids, &want, U32)?;
        for dtype in FLOATS {
            check_exact(&ids.to_dtype(dtype).or_fail()?, &rounded(&want, dtype), dtype)?;
        }
    }
}

#[test]
fn casts_of_extremes() {
    let x = Tensor::from_vec(vec![-1.5f32, -0.0, 2.9, 1e10, 4.0e9, 70000.0], &[6]).unwrap();
    let ids = x.to_dtype(U32).unwrap().to_vec::<u32>().unwrap();
    assert_eq!(ids, vec![0, 0, 2, u32::MAX, 4_000_000_000, 70000]);
    // f16 overflows to infinity; bf16 keeps f32's range.
    assert_eq!(x.to_dtype(F16).unwrap().to_vec_f64()[3], f64::INFINITY);
    assert_eq!(
        x.to_dtype(BF16).unwrap().to_vec_f64()[3],
        bf16::from_f32(1e10).to_f64()
    );
    // A cast to the same dtype is the same tensor.
    assert!(shares_storage(&x.to_dtype(F32).unwrap(), &x));
}

#[test]
fn casts_round_to_nearest() {
    // Values just above a tie must round up, even when only bits beyond the first 32 of an f64
    // (or the last three of an f32) say so: 1 + 2^-8 + tiny is nearer 1 + 2^-7 than 1 in bf16,
    // and 1 + 2^-11 + tiny nearer 1 + 2^-10 than 1 in f16.
    let above_tie = |tie: f64, tiny: f64| Tensor::from_vec(vec![1.0 + tie + tiny], &[1]).unwrap();
    let cases = [
        (
            above_tie(2f64.powi(-8), 2f64.powi(-23)).to_dtype(F32).unwrap(),
            BF16,
            1.0 + 2f64.powi(-7),
        ),
        (
            above_tie(2f64.powi(-8), 2f64.powi(-40)),
            BF16,
            1.0 + 2f64.powi(-7),
        ),
        (
            above_tie(2f64.powi(-11), 2f64.powi(-40)),
            F16,
            1.0 + 2f64.powi(-10),
        ),
    ];
    let mut wrong = Vec::new();
    for (x, dtype, want) in cases {
        let got = x.to_dtype(dtype).unwrap().to_vec_f64()[0];
        if got != want {
            wrong.push(format!(
                "{} {} -> {dtype}: got {got}, want {want}",
                x.dtype(),
                x.to_vec_f64()[0]
            ));
        }
    }
    // And every one of many random values, against the nearest neighbour found by distance.
    let wide = spread_exponents(&[20_000], 7);
    for source in [F32, F64] {
        let xr = rounded(&wide, source);
        let x = to_tensor(&xr, source);
        for target in [BF16, F16] {
            if let Err(e) = check_nearest_16bit(&x.to_dtype(target).unwrap(), &xr.data) {
                wrong.push(format!("{source} -> {target}: {e}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "casts that are not round-to-nearest:\n{}",
        wrong.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Matmul
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(32))]

    #[test]
    fn matmul_batched_broadcast_and_transposed(
        batch in prop::collection::vec(1usize..4, 0..3),
        masks in (any::<u32>(), any::<u32>()),
        (m, k, n) in (1usize..=33, 1usize..=33, 1usize..=33),
        transposed in (any::<bool>(), any::<bool>()),
        views in (view(), view()),
        seed in any::<u64>(),
    ) {
        let (batch_a, batch_b) = (broadcastable(&batch, masks.0), broadcastable(&batch, masks.1));
        for dtype in FLOATS {
            let (a, ar) = matrix(&batch_a, (m, k), transposed.0, dtype, views.0, seed);
            let (b, br) = matrix(&batch_b, (k, n), transposed.1, dtype, views.1, seed ^ 1);
            check(&a.matmul(&b).or_fail()?, &r::matmul(&ar, &br), dtype)?;
        }
    }
}

#[test]
fn matmul_large_enough_for_the_parallel_kernel() {
    // 70·66·65 multiply-adds per matrix: above the size where gemm runs on the rayon pool.
    for dtype in FLOATS {
        let (a, ar) = matrix(&[2], (70, 65), false, dtype, View::Narrowed, 1);
        let (b, br) = matrix(&[], (65, 66), true, dtype, View::Contiguous, 2);
        check(&a.matmul(&b).unwrap(), &r::matmul(&ar, &br), dtype).unwrap();
    }
}

#[test]
fn matmul_f16_accumulates_in_f32() {
    // 1 + 16·2^-12 = 1 + 2^-8 is an f16, but 1 + 2^-12 rounds back to 1: a product that rounds its
    // running sum to f16 after every step returns 1. M = N = 1 with a column-major lhs takes
    // gemm's matrix-vector path.
    let mut row = vec![1.0; 17];
    row[1..].fill(2f64.powi(-12));
    let a = to_tensor(&RefTensor::new(vec![17, 1], row), F16).t().unwrap();
    let b = Tensor::ones(&[17, 1], F16);
    for (a, b) in [(a.clone(), b.clone()), (b.t().unwrap(), a.t().unwrap())] {
        let got = a.matmul(&b).unwrap().to_vec_f64();
        assert_eq!(
            got,
            vec![1.0 + 2f64.powi(-8)],
            "{:?} x {:?}",
            a.layout(),
            b.layout()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Reductions
// ---------------------------------------------------------------------------------------------

/// Mostly positive values, so that sums do not cancel to near zero.
const SUMMANDS: Dist = uniform(-0.25, 1.0);

proptest! {
    #![proptest_config(cases(32))]

    #[test]
    fn sum_and_mean_over_axis_subsets(
        s in shape(4, 7),
        axis_mask in any::<u32>(),
        keepdim in any::<bool>(),
        v in view(),
        seed in any::<u64>(),
    ) {
        // Any subset of the axes (possibly none), in either order.
        let mut axes: Vec<usize> = (0..s.len()).filter(|&i| axis_mask >> i & 1 == 1).collect();
        if axis_mask >> 31 == 1 {
            axes.reverse();
        }
        for dtype in FLOATS {
            let (x, xr) = input(&s, SUMMANDS, dtype, v, seed);
            check(&x.sum(&axes, keepdim).or_fail()?, &r::sum(&xr, &axes, keepdim), dtype)?;
            check(&x.mean(&axes, keepdim).or_fail()?, &r::mean(&xr, &axes, keepdim), dtype)?;
        }
    }

    #[test]
    fn sum_all(s in shape(4, 7), v in view(), seed in any::<u64>()) {
        for dtype in FLOATS {
            let (x, xr) = input(&s, SUMMANDS, dtype, v, seed);
            check(&x.sum_all().or_fail()?, &scalar_ref(r::sum_all(&xr)), dtype)?;
        }
    }

    #[test]
    fn max_min_argmax_with_ties(
        s in shape(4, 6),
        keepdim in any::<bool>(),
        v in view(),
        seed in any::<u64>(),
    ) {
        for dtype in FLOATS {
            let (x, xr) = input(&s, grid(-2.0, 2.0, 0.25), dtype, v, seed);
            for axis in 0..s.len() {
                check_exact(&x.max(axis, keepdim).or_fail()?, &r::max(&xr, axis, keepdim), dtype)?;
                check_exact(&x.min(axis, keepdim).or_fail()?, &r::min(&xr, axis, keepdim), dtype)?;
                check_exact(&x.argmax(axis, keepdim).or_fail()?, &r::argmax(&xr, axis, keepdim), U32)?;
            }
        }
    }

    #[test]
    fn sum_to_shape(s in shape(4, 6), mask in any::<u32>(), v in view(), seed in any::<u64>()) {
        let target = broadcastable(&s, mask);
        for dtype in FLOATS {
            let (x, xr) = input(&s, SUMMANDS, dtype, v, seed);
            check(&x.sum_to_shape(&target).or_fail()?, &r::sum_to_shape(&xr, &target), dtype)?;
        }
    }
}

#[test]
fn max_and_min_propagate_nan() {
    let x = Tensor::from_vec(vec![1.0f32, f32::NAN, 3.0, -1.0, 0.0, 2.0], &[2, 3]).unwrap();
    for y in [x.max(1, false).unwrap(), x.min(1, false).unwrap()] {
        let v = y.to_vec_f64();
        assert!(v[0].is_nan() && !v[1].is_nan(), "{v:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax, cross-entropy, norms
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(24))]

    #[test]
    fn softmax_and_log_softmax_on_each_axis(s in shape(4, 7), v in view(), seed in any::<u64>()) {
        for dtype in FLOATS {
            let (x, xr) = input(&s, uniform(-4.0, 4.0), dtype, v, seed);
            for axis in 0..s.len() {
                check(&x.softmax(axis).or_fail()?, &r::softmax(&xr, axis), dtype)?;
                check(&x.log_softmax(axis).or_fail()?, &r::log_softmax(&xr, axis), dtype)?;
            }
        }
    }

    #[test]
    fn softmax_and_norms_on_long_rows(
        (rows, d) in (1usize..4, 1usize..1100),
        (vx, vw) in (view(), view()),
        seed in any::<u64>(),
    ) {
        // Rows long enough for the kernels' blocks of 16 lanes as well as their tails (the
        // shapes of the other tests stop at 7).
        for dtype in FLOATS {
            let (x, xr) = input(&[rows, d], uniform(-4.0, 4.0), dtype, vx, seed);
            check(&x.softmax(1).or_fail()?, &r::softmax(&xr, 1), dtype)?;
            check(&x.log_softmax(1).or_fail()?, &r::log_softmax(&xr, 1), dtype)?;
        }
        for dtype in MAIN {
            // On the grid of `layer_norm_with_and_without_bias`, for the same reason.
            let (x, xr) = input(&[rows, d], grid(-2.0, 2.0, 1.0 / 64.0), dtype, vx, seed);
            let (w, wr) = input(&[d], uniform(0.5, 1.5), dtype, vw, seed ^ 1);
            check(&x.rms_norm(&w, 1e-5).or_fail()?, &r::rms_norm(&xr, &wr, 1e-5), dtype)?;
            check(&x.layer_norm(&w, None, 1e-5).or_fail()?, &r::layer_norm(&xr, &wr, None, 1e-5), dtype)?;
        }
    }

    #[test]
    fn cross_entropy_with_ignored_rows(
        (n, c) in (1usize..9, 1usize..12),
        counted in any::<u32>(),
        ignore_a_class in any::<bool>(),
        grad in 0.25f64..2.0,
        (vx, vt) in (view(), view()),
        seed in any::<u64>(),
    ) {
        // The ignore index is a sentinel above every class or one of the classes; rows whose bit
        // in `counted` is clear are ignored too (possibly all of them).
        let ignore = if ignore_a_class { seed as usize % c } else { 999 };
        let ids: Vec<usize> = random_ids(n, c, seed)
            .into_iter()
            .enumerate()
            .map(|(i, id)| if counted >> i & 1 == 1 { id } else { ignore })
            .collect();
        let targets = ids_input(&ids, &[n], vt, seed);
        for dtype in MAIN {
            let (x, xr) = input(&[n, c], uniform(-1.5, 1.5), dtype, vx, seed ^ 1);
            let loss = x.cross_entropy(&targets, ignore as u32).or_fail()?;
            check(&loss, &scalar_ref(r::cross_entropy(&xr, &ids, ignore)), dtype)?;
            let g = to_tensor(&scalar_ref(grad), dtype);
            let g_value = g.to_scalar_f64().or_fail()?;
            let want = map(&r::cross_entropy_grad(&xr, &ids, ignore), |v| v * g_value);
            check(&x.cross_entropy_backward(&targets, ignore as u32, &g).or_fail()?, &want, dtype)?;
        }
    }

    #[test]
    fn rms_norm(s in shape(4, 7), (vx, vw) in (view(), view()), seed in any::<u64>()) {
        let d = *s.last().unwrap();
        for dtype in MAIN {
            let (x, xr) = input(&s, uniform(-2.0, 2.0), dtype, vx, seed);
            let (w, wr) = input(&[d], uniform(0.5, 1.5), dtype, vw, seed ^ 1);
            check(&x.rms_norm(&w, 1e-5).or_fail()?, &r::rms_norm(&xr, &wr, 1e-5), dtype)?;
        }
    }

    #[test]
    fn layer_norm_with_and_without_bias(
        s in shape(4, 7),
        views in (view(), view(), view()),
        seed in any::<u64>(),
    ) {
        let d = *s.last().unwrap();
        for dtype in MAIN {
            // Multiples of 1/64: distinct values in a row differ by at least that much, so the
            // f32 `x - mean` of a two-element row never cancels to a few ulps (equal rows still
            // occur, and give exactly the bias).
            let (x, xr) = input(&s, grid(-2.0, 2.0, 1.0 / 64.0), dtype, views.0, seed);
            let (w, wr) = input(&[d], uniform(0.5, 1.5), dtype, views.1, seed ^ 1);
            let (b, br) = input(&[d], uniform(-1.0, 1.0), dtype, views.2, seed ^ 2);
            for bias in [Some((&b, &br)), None] {
                let out = x.layer_norm(&w, bias.map(|(b, _)| b), 1e-5).or_fail()?;
                check(&out, &r::layer_norm(&xr, &wr, bias.map(|(_, br)| br), 1e-5), dtype)?;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Indexing, concatenation, convolution
// ---------------------------------------------------------------------------------------------

/// `x` with `src` added at `ids` along `axis`, by plain loops over `src`.
fn index_add_ref(x: &RefTensor, axis: usize, ids: &[usize], src: &RefTensor) -> RefTensor {
    let mut out = x.clone();
    for idx in r::multi_indices(&src.shape) {
        let mut dst = idx.clone();
        dst[axis] = ids[idx[axis]];
        let at = out.index_of(&dst);
        out.data[at] += src.get(&idx);
    }
    out
}

proptest! {
    #![proptest_config(cases(24))]

    #[test]
    fn embedding(
        (vocab, d) in (1usize..7, 1usize..6),
        ids_shape in shape(3, 4),
        (vw, vi) in (view(), view()),
        seed in any::<u64>(),
    ) {
        let ids = random_ids(ids_shape.iter().product(), vocab, seed);
        let ids_t = ids_input(&ids, &ids_shape, vi, seed);
        for dtype in ALL {
            let (w, wr) = input(&[vocab, d], values_for(dtype), dtype, vw, seed ^ 1);
            check_exact(&w.embedding(&ids_t).or_fail()?, &r::embedding(&wr, &ids, &ids_shape), dtype)?;
        }
    }

    #[test]
    fn index_select(
        s in shape(4, 6),
        axis in 0usize..4,
        n in 1usize..8,
        (vx, vi) in (view(), view()),
        seed in any::<u64>(),
    ) {
        let axis = axis % s.len();
        let ids = random_ids(n, s[axis], seed);
        let ids_t = ids_input(&ids, &[n], vi, seed);
        for dtype in ALL {
            let (x, xr) = input(&s, values_for(dtype), dtype, vx, seed ^ 1);
            check_exact(&x.index_select(axis, &ids_t).or_fail()?, &r::index_select(&xr, axis, &ids), dtype)?;
        }
    }

    #[test]
    fn index_add_with_repeated_ids(
        s in shape(4, 6),
        axis in 0usize..4,
        n in 1usize..8,
        views in (view(), view(), view()),
        seed in any::<u64>(),
    ) {
        let axis = axis % s.len();
        let ids = random_ids(n, s[axis], seed);
        let ids_t = ids_input(&ids, &[n], views.1, seed);
        let mut src_shape = s.clone();
        src_shape[axis] = n;
        for dtype in FLOATS {
            // Sources in [1, 2) added to x in [-1, 1): only the first addition can cancel, and it
            // is rounded once; every later partial sum is at least 1.
            let (x, xr) = input(&s, uniform(-1.0, 1.0), dtype, views.0, seed ^ 1);
            let (src, sr) = input(&src_shape, uniform(1.0, 2.0), dtype, views.2, seed ^ 2);
            check(&x.index_add(axis, &ids_t, &src).or_fail()?, &index_add_ref(&xr, axis, &ids, &sr), dtype)?;
        }
    }

    #[test]
    fn concat_along_each_axis(
        s in shape(4, 5),
        axis in 0usize..4,
        sizes in prop::collection::vec(1usize..4, 1..=3),
        views in prop::collection::vec(view(), 3),
        seed in any::<u64>(),
    ) {
        let axis = axis % s.len();
        for dtype in ALL {
            let parts: Vec<(Tensor, RefTensor)> = sizes
                .iter()
                .zip(&views)
                .enumerate()
                .map(|(i, (&size, &v))| {
                    let mut part = s.clone();
                    part[axis] = size;
                    input(&part, values_for(dtype), dtype, v, seed ^ i as u64)
                })
                .collect();
            let tensors: Vec<&Tensor> = parts.iter().map(|(t, _)| t).collect();
            let refs: Vec<&RefTensor> = parts.iter().map(|(_, r)| r).collect();
            check_exact(&Tensor::concat(&tensors, axis).or_fail()?, &r::concat(&refs, axis), dtype)?;
        }
    }

    #[test]
    fn stack_along_each_axis(
        s in shape(3, 5),
        axis in 0usize..4,
        views in prop::collection::vec(view(), 1..=3),
        seed in any::<u64>(),
    ) {
        let axis = axis % (s.len() + 1);
        for dtype in ALL {
            let parts: Vec<(Tensor, RefTensor)> = views
                .iter()
                .enumerate()
                .map(|(i, &v)| input(&s, values_for(dtype), dtype, v, seed ^ i as u64))
                .collect();
            let tensors: Vec<&Tensor> = parts.iter().map(|(t, _)| t).collect();
            let refs: Vec<&RefTensor> = parts.iter().map(|(_, r)| r).collect();
            check_exact(&Tensor::stack(&tensors, axis).or_fail()?, &r::stack(&refs, axis), dtype)?;
        }
    }

    #[test]
    fn conv1d_causal_depthwise_with_and_without_bias(
        (b, c, l, k) in (1usize..4, 1usize..5, 1usize..10, 1usize..6),
        views in (view(), view(), view()),
        seed in any::<u64>(),
    ) {
        for dtype in MAIN {
            let (x, xr) = input(&[b, c, l], uniform(-1.0, 1.0), dtype, views.0, seed);
            let (w, wr) = input(&[c, k], uniform(-1.0, 1.0), dtype, views.1, seed ^ 1);
            let (bias, bias_r) = input(&[c], uniform(-1.0, 1.0), dtype, views.2, seed ^ 2);
            let with_bias = x.conv1d_causal_depthwise(&w, Some(&bias)).or_fail()?;
            check(&with_bias, &r::conv1d_causal_depthwise(&xr, &wr, Some(&bias_r)), dtype)?;
            let without = x.conv1d_causal_depthwise(&w, None).or_fail()?;
            check(&without, &r::conv1d_causal_depthwise(&xr, &wr, None), dtype)?;
        }
    }

    #[test]
    fn conv1d_causal_depthwise_silu_and_channels_last(
        (b, c, l, k) in (1usize..3, 2usize..40, 1usize..140, 1usize..6),
        with_bias in any::<bool>(),
        seed in any::<u64>(),
    ) {
        for dtype in MAIN {
            // Values stored [B, L, C + 3] and seen as [B, C, L] slices (channels-last, as Mamba's
            // in_proj output is), and the same values as contiguous [B, C, L] rows.
            let layouts = |seed| -> Result<(Tensor, Tensor, RefTensor), TestCaseError> {
                let (t, tr) = input(&[b, l, c + 3], uniform(-2.0, 2.0), dtype, View::Contiguous, seed);
                let last = t.narrow(2, 1, c).or_fail()?.transpose(1, 2).or_fail()?;
                let values = r::transpose(&r::narrow(&tr, 2, 1, c), 1, 2);
                Ok((last, to_tensor(&values, dtype), values))
            };
            let (x_last, x_rows, xr) = layouts(seed)?;
            let (g_last, g_rows, gr) = layouts(seed ^ 3)?;
            let (w, wr) = input(&[c, k], uniform(-1.0, 1.0), dtype, View::Contiguous, seed ^ 1);
            let (bias, bias_r) = input(&[c], uniform(-1.0, 1.0), dtype, View::Contiguous, seed ^ 2);
            let (bias, bias_r) = (with_bias.then_some(&bias), with_bias.then_some(&bias_r));
            let pre = r::conv1d_causal_depthwise(&xr, &wr, bias_r);
            let silu = r::unary(&pre, RefUnary::Silu);
            let plain_grads = r::conv1d_causal_depthwise_backward(&xr, &wr, &gr);
            let gpre = r::binary(&gr, &r::unary_derivative(&pre, RefUnary::Silu), RefBinary::Mul);
            let silu_grads = r::conv1d_causal_depthwise_backward(&xr, &wr, &gpre);
            for (x, g) in [(&x_last, &g_last), (&x_last, &g_rows), (&x_rows, &g_last), (&x_rows, &g_rows)] {
                check(&x.conv1d_causal_depthwise(&w, bias).or_fail()?, &pre, dtype)?;
                check(&x.conv1d_causal_depthwise_silu(&w, bias).or_fail()?, &silu, dtype)?;
                let (dx, dw, db) = x.conv1d_causal_depthwise_backward(&w, g).or_fail()?;
                check(&dx, &plain_grads.0, dtype)?;
                check(&dw, &plain_grads.1, dtype)?;
                check(&db, &plain_grads.2, dtype)?;
                let (dx, dw, db) = x.conv1d_causal_depthwise_silu_backward(&w, bias, g).or_fail()?;
                check(&dx, &silu_grads.0, dtype)?;
                check(&dw, &silu_grads.1, dtype)?;
                check(&db, &silu_grads.2, dtype)?;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Views: exact values, and no copy where none is needed
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(cases(32))]

    #[test]
    fn view_reshape(s in shape(4, 6), v in view(), seed in any::<u64>()) {
        let (x, xr) = input(&s, uniform(-1.0, 1.0), F32, v, seed);
        let targets = [
            vec![xr.numel()],
            s.iter().rev().copied().collect(),
            [&[1], s.as_slice(), &[1]].concat(),
        ];
        for target in targets {
            let y = x.reshape(&target).or_fail()?;
            check_exact(&y, &r::reshape(&xr, &target), F32)?;
            // Only a non-contiguous view needs a copy.
            prop_assert_eq!(shares_storage(&y, &x), x.is_contiguous());
        }
    }

    #[test]
    fn view_permute(s in shape(4, 6), v in view(), seed in any::<u64>()) {
        let (x, xr) = input(&s, uniform(-1.0, 1.0), F32, v, seed);
        let mut perm: Vec<usize> = (0..s.len()).collect();
        perm.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        let y = x.permute(&perm).or_fail()?;
        prop_assert!(shares_storage(&y, &x));
        check_exact(&y, &r::permute(&xr, &perm), F32)?;
        // The inverse permutation restores the original view.
        let mut inverse = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        let back = y.permute(&inverse).or_fail()?;
        prop_assert_eq!(back.layout(), x.layout());
    }

    #[test]
    fn view_transpose_and_t(s in shape(4, 6), v in view(), seed in any::<u64>()) {
        let (x, xr) = input(&s, uniform(-1.0, 1.0), F32, v, seed);
        let rank = s.len();
        for a in 0..rank {
            for b in 0..rank {
                let y = x.transpose(a, b).or_fail()?;
                prop_assert!(shares_storage(&y, &x));
                check_exact(&y, &r::transpose(&xr, a, b), F32)?;
            }
        }
        if rank >= 2 {
            check_exact(&x.t().or_fail()?, &r::transpose(&xr, rank - 2, rank - 1), F32)?;
        } else {
            prop_assert!(matches!(x.t(), Err(TensorError::Shape { .. })), "t() of rank {}", rank);
        }
    }

    #[test]
    fn view_narrow(s in shape(4, 6), picks in any::<u64>(), v in view(), seed in any::<u64>()) {
        let (x, xr) = input(&s, uniform(-1.0, 1.0), F32, v, seed);
        for (axis, &dim) in s.iter().enumerate() {
            // Any start, and any length that fits (zero included).
            let start = (picks >> (16 * axis)) as usize % dim;
            let len = (picks >> (16 * axis + 8)) as usize % (dim - start + 1);
            let y = x.narrow(axis, start, len).or_fail()?;
            prop_assert!(shares_storage(&y, &x));
            check_exact(&y, &r::narrow(&xr, axis, start, len), F32)?;
        }
    }

    #[test]
    fn view_broadcast_to(
        s in shape(4, 5),
        mask in any::<u32>(),
        lead in 0usize..3,
        v in view(),
        seed in any::<u64>(),
    ) {
        let small = broadcastable(&s, mask);
        let target = [vec![2; lead], s.clone()].concat();
        let (x, xr) = input(&small, uniform(-1.0, 1.0), F32, v, seed);
        let y = x.broadcast_to(&target).or_fail()?;
        prop_assert!(shares_storage(&y, &x));
        check_exact(&y, &r::broadcast_to(&xr, &target), F32)?;
        // Repeated axes are stride 0.
        let added = target.len() - small.len();
        for (i, &stride) in y.layout().strides().iter().enumerate() {
            if i < added || (small[i - added] == 1 && target[i] != 1) {
                prop_assert_eq!(stride, 0, "axis {} of {:?} from {:?}", i, target, small);
            }
        }
    }

    #[test]
    fn view_unsqueeze_and_squeeze(s in shape(4, 5), v in view(), seed in any::<u64>()) {
        let (x, xr) = input(&s, uniform(-1.0, 1.0), F32, v, seed);
        for axis in 0..=s.len() {
            let mut longer = s.clone();
            longer.insert(axis, 1);
            let y = x.unsqueeze(axis).or_fail()?;
            prop_assert!(shares_storage(&y, &x));
            // Size-1 axes leave the row-major order alone.
            check_exact(&y, &r::reshape(&xr, &longer), F32)?;
            let back = y.squeeze(axis).or_fail()?;
            prop_assert_eq!(back.layout(), x.layout());
        }
        for (axis, &dim) in s.iter().enumerate() {
            if dim == 1 {
                let mut shorter = s.clone();
                shorter.remove(axis);
                check_exact(&x.squeeze(axis).or_fail()?, &r::reshape(&xr, &shorter), F32)?;
            } else {
                prop_assert!(matches!(x.squeeze(axis), Err(TensorError::Shape { .. })), "squeeze({})", axis);
            }
        }
    }

    #[test]
    fn view_contiguous(s in shape(4, 6), v in view(), seed in any::<u64>()) {
        for dtype in ALL {
            let (x, xr) = input(&s, values_for(dtype), dtype, v, seed);
            let y = x.contiguous();
            prop_assert!(y.is_contiguous());
            prop_assert_eq!(shares_storage(&y, &x), x.is_contiguous());
            check_exact(&y, &xr, dtype)?;
        }
    }
}

#[test]
fn constructors() {
    let data = [1.5f64, -2.0, 0.25, 8.0, 3.0, -0.5];
    let x = Tensor::from_slice(&data, &[2, 3]).unwrap();
    assert_eq!(
        (x.shape(), x.dtype(), x.to_vec_f64()),
        (&[2, 3][..], F64, data.to_vec())
    );
    for dtype in ALL {
        let full = Tensor::full(&[2, 1, 3], 3.0, dtype);
        assert_eq!((full.shape(), full.dtype()), (&[2, 1, 3][..], dtype));
        assert_eq!(full.to_vec_f64(), vec![3.0; 6]);
        assert_eq!(Tensor::zeros(&[4], dtype).to_vec_f64(), vec![0.0; 4]);
        assert_eq!(Tensor::ones(&[1, 2], dtype).to_vec_f64(), vec![1.0; 2]);
        assert_eq!(
            Tensor::arange(5, dtype).to_vec_f64(),
            vec![0.0, 1.0, 2.0, 3.0, 4.0]
        );
    }
    let s = Tensor::scalar(bf16::from_f32(2.5));
    assert_eq!(
        (s.shape(), s.dtype(), s.to_scalar_f64().unwrap()),
        (&[][..], BF16, 2.5)
    );
}

// ---------------------------------------------------------------------------------------------
// Random initialisers
// ---------------------------------------------------------------------------------------------

/// Mean and (biased) standard deviation.
fn moments(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    (
        mean,
        (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt(),
    )
}

proptest! {
    #![proptest_config(cases(8))]

    #[test]
    fn randn_is_seeded_and_has_the_right_moments(
        mean in -2.0f64..2.0,
        std in 0.1f64..3.0,
        seed in any::<u64>(),
    ) {
        let draw = |dtype, seed| Tensor::randn(&[64, 64], dtype, mean, std, &mut seeded_rng(seed)).or_fail();
        let x = draw(F64, seed)?;
        prop_assert_eq!(x.shape(), &[64, 64]);
        check_exact(&draw(F64, seed)?, &to_ref(&x), F64)?;
        prop_assert_ne!(draw(F64, seed ^ 1)?.to_vec_f64(), x.to_vec_f64());
        // Samples are drawn in f64 and rounded: every dtype sees the same ones.
        for dtype in [F32, BF16, F16] {
            check_exact(&draw(dtype, seed)?, &rounded(&to_ref(&x), dtype), dtype)?;
        }
        // 4096 samples: 5 standard errors on the mean, about 5 on the standard deviation.
        let (m, sd) = moments(&x.to_vec_f64());
        prop_assert!((m - mean).abs() < 5.0 * std / 64.0, "mean {} for {}", m, mean);
        prop_assert!((sd / std - 1.0).abs() < 0.06, "std {} for {}", sd, std);
    }

    #[test]
    fn rand_uniform_is_seeded_and_has_the_right_moments(
        lo in -3.0f64..1.0,
        width in 0.1f64..4.0,
        seed in any::<u64>(),
    ) {
        let hi = lo + width;
        let draw = |dtype, seed| {
            Tensor::rand_uniform(&[64, 64], dtype, lo, hi, &mut seeded_rng(seed)).or_fail()
        };
        let x = draw(F64, seed)?;
        check_exact(&draw(F64, seed)?, &to_ref(&x), F64)?;
        prop_assert_ne!(draw(F64, seed ^ 1)?.to_vec_f64(), x.to_vec_f64());
        for dtype in [F32, BF16, F16] {
            check_exact(&draw(dtype, seed)?, &rounded(&to_ref(&x), dtype), dtype)?;
        }
        let v = x.to_vec_f64();
        prop_assert!(v.iter().all(|&u| lo <= u && u < hi));
        // Uniform: mean (lo+hi)/2 and standard deviation width/√12.
        let (m, sd) = moments(&v);
        let expected_sd = width / 12f64.sqrt();
        let mid = (lo + hi) / 2.0;
        prop_assert!((m - mid).abs() < 5.0 * expected_sd / 64.0, "mean {} in [{}, {})", m, lo, hi);
        prop_assert!((sd / expected_sd - 1.0).abs() < 0.05, "std {} for {}", sd, expected_sd);
    }
}

// ---------------------------------------------------------------------------------------------
// Errors: bad shapes, indices and dtypes give Err, never a panic
// ---------------------------------------------------------------------------------------------

/// Asserts that `$call` returns an `Err` matching `$pattern`.
macro_rules! assert_err {
    ($call:expr, $pattern:pat) => {
        match $call {
            Err($pattern) => {}
            other => panic!(
                "`{}` gave {:?}, expected {}",
                stringify!($call),
                other.map(|_| ()),
                stringify!($pattern)
            ),
        }
    };
}

fn zeros(shape: &[usize]) -> Tensor {
    Tensor::zeros(shape, F32)
}

fn ids(values: &[u32]) -> Tensor {
    Tensor::from_slice(values, &[values.len()]).unwrap()
}

#[test]
fn matmul_shape_errors() {
    use TensorError::{DType as Dt, DTypeMismatch, Shape};
    assert_err!(zeros(&[2, 3]).matmul(&zeros(&[4, 2])), Shape { .. });
    assert_err!(zeros(&[2, 3]).t().unwrap().matmul(&zeros(&[3, 5])), Shape { .. });
    assert_err!(zeros(&[2, 2, 3]).matmul(&zeros(&[3, 3, 4])), Shape { .. });
    assert_err!(zeros(&[3]).matmul(&zeros(&[3, 1])), Shape { .. });
    assert_err!(
        zeros(&[2, 3]).matmul(&Tensor::zeros(&[3, 2], F64)),
        DTypeMismatch { .. }
    );
    let u = Tensor::zeros(&[2, 2], U32);
    assert_err!(u.matmul(&u), Dt { .. });
}

#[test]
fn broadcast_errors() {
    use TensorError::Shape;
    let (a, b) = (zeros(&[2, 3]), zeros(&[4]));
    assert_err!(a.add(&b), Shape { .. });
    assert_err!(a.div(&zeros(&[3, 2])), Shape { .. });
    assert_err!(a.lt(&b), Shape { .. });
    assert_err!(Tensor::zeros(&[2, 1], U32).where_(&a, &b), Shape { .. });
    assert_err!(a.broadcast_to(&[2, 4]), Shape { .. });
    assert_err!(a.broadcast_to(&[3]), Shape { .. });
    assert_err!(a.sum_to_shape(&[4]), Shape { .. });
    assert_err!(a.sum_to_shape(&[1, 2, 3]), Shape { .. });
    assert_err!(a.unary_backward(UnaryOp::Exp, &zeros(&[3, 2])), Shape { .. });
}

#[test]
fn index_and_axis_errors() {
    use TensorError::{OutOfRange, Shape};
    let table = zeros(&[5, 3]);
    assert_err!(table.embedding(&ids(&[0, 5])), OutOfRange { .. });
    assert_err!(table.index_select(1, &ids(&[3])), OutOfRange { .. });
    assert_err!(table.index_select(2, &ids(&[0])), OutOfRange { .. });
    assert_err!(
        table.index_add(0, &ids(&[1, 9]), &zeros(&[2, 3])),
        OutOfRange { .. }
    );
    assert_err!(table.cross_entropy(&ids(&[0, 1, 3, 7, 2]), 7), OutOfRange { .. });
    assert_err!(table.cross_entropy(&ids(&[0, 1, 2, 7, 2]), 3), OutOfRange { .. });
    assert_err!(table.narrow(0, 4, 2), OutOfRange { .. });
    assert_err!(table.narrow(2, 0, 1), OutOfRange { .. });
    assert_err!(table.narrow(0, usize::MAX, 2), OutOfRange { .. });
    assert_err!(table.transpose(0, 2), OutOfRange { .. });
    assert_err!(table.unsqueeze(3), OutOfRange { .. });
    assert_err!(table.sum(&[2], false), OutOfRange { .. });
    assert_err!(table.mean(&[1, 1], true), OutOfRange { .. });
    assert_err!(table.max(2, false), OutOfRange { .. });
    assert_err!(table.argmax(5, false), OutOfRange { .. });
    assert_err!(table.softmax(2), OutOfRange { .. });
    assert_err!(table.log_softmax(2), OutOfRange { .. });
    assert_err!(Tensor::concat(&[&table, &table], 2), OutOfRange { .. });
    assert_err!(Tensor::stack(&[&table, &table], 3), OutOfRange { .. });
    assert_err!(zeros(&[2, 0]).max(1, false), Shape { .. });
    assert_err!(zeros(&[2, 0]).argmax(1, false), Shape { .. });
}

#[test]
fn dtype_errors() {
    use TensorError::{DType as Dt, DTypeMismatch};
    let (x, x64, u) = (
        zeros(&[2, 3]),
        Tensor::zeros(&[2, 3], F64),
        Tensor::zeros(&[2, 3], U32),
    );
    let float_ids = zeros(&[2]);
    assert_err!(x.add(&x64), DTypeMismatch { .. });
    assert_err!(x.eq(&x64), DTypeMismatch { .. });
    assert_err!(u.where_(&x, &x64), DTypeMismatch { .. });
    assert_err!(x.where_(&x, &x), Dt { .. });
    assert_err!(u.exp(), Dt { .. });
    assert_err!(u.add(&u), Dt { .. });
    assert_err!(u.sum(&[0], false), Dt { .. });
    assert_err!(u.softmax(1), Dt { .. });
    assert_err!(x.unary_backward(UnaryOp::Exp, &x64), DTypeMismatch { .. });
    assert_err!(x.embedding(&float_ids), Dt { .. });
    assert_err!(x.index_select(0, &float_ids), Dt { .. });
    assert_err!(x.index_add(0, &ids(&[0, 1]), &x64), DTypeMismatch { .. });
    assert_err!(x.cross_entropy(&float_ids, 9), Dt { .. });
    assert_err!(Tensor::concat(&[&x, &x64], 0), DTypeMismatch { .. });
    assert_err!(x.rms_norm(&Tensor::ones(&[3], F64), 1e-5), DTypeMismatch { .. });
    assert_err!(
        x.layer_norm(&zeros(&[3]), Some(&Tensor::zeros(&[3], F64)), 1e-5),
        DTypeMismatch { .. }
    );
    let conv_x = zeros(&[1, 2, 4]);
    assert_err!(
        conv_x.conv1d_causal_depthwise(&Tensor::zeros(&[2, 3], F64), None),
        DTypeMismatch { .. }
    );
    assert_err!(x.to_vec::<f64>(), DTypeMismatch { .. });
    assert_err!(Tensor::randn(&[2], U32, 0.0, 1.0, &mut seeded_rng(0)), Dt { .. });
}

#[test]
fn other_shape_errors() {
    use TensorError::{OutOfRange, Shape};
    let x = zeros(&[2, 3]);
    assert_err!(Tensor::from_vec(vec![0f32; 5], &[2, 3]), Shape { .. });
    assert_err!(x.reshape(&[4, 2]), Shape { .. });
    assert_err!(x.permute(&[0, 0]), Shape { .. });
    assert_err!(x.permute(&[1]), Shape { .. });
    assert_err!(x.squeeze(0), Shape { .. });
    assert_err!(x.to_scalar_f64(), Shape { .. });
    assert_err!(Tensor::concat(&[&x, &zeros(&[3, 2])], 0), Shape { .. });
    assert_err!(Tensor::concat(&[&x, &zeros(&[2])], 0), Shape { .. });
    assert_err!(Tensor::concat(&[], 0), Shape { .. });
    assert_err!(Tensor::stack(&[&x, &zeros(&[2, 2])], 0), Shape { .. });
    assert_err!(Tensor::stack(&[], 0), Shape { .. });
    assert_err!(x.rms_norm(&zeros(&[2]), 1e-5), Shape { .. });
    assert_err!(Tensor::scalar(1f32).rms_norm(&zeros(&[1]), 1e-5), Shape { .. });
    assert_err!(x.layer_norm(&zeros(&[3]), Some(&zeros(&[2])), 1e-5), Shape { .. });
    assert_err!(zeros(&[3]).embedding(&ids(&[0])), Shape { .. });
    assert_err!(x.index_select(0, &Tensor::zeros(&[1, 1], U32)), Shape { .. });
    assert_err!(x.index_add(1, &ids(&[0, 2]), &zeros(&[2, 3])), Shape { .. });
    assert_err!(x.cross_entropy(&ids(&[0]), 9), Shape { .. });
    assert_err!(zeros(&[2, 3, 1]).cross_entropy(&ids(&[0, 0]), 9), Shape { .. });
    assert_err!(
        x.cross_entropy_backward(&ids(&[0, 1]), 9, &zeros(&[2])),
        Shape { .. }
    );
    let conv_x = zeros(&[1, 2, 4]);
    assert_err!(
        conv_x.conv1d_causal_depthwise(&zeros(&[3, 2]), None),
        Shape { .. }
    );
    assert_err!(
        conv_x.conv1d_causal_depthwise(&zeros(&[2, 0]), None),
        Shape { .. }
    );
    assert_err!(
        conv_x.conv1d_causal_depthwise(&zeros(&[2, 2]), Some(&zeros(&[3]))),
        Shape { .. }
    );
    assert_err!(
        zeros(&[2, 4]).conv1d_causal_depthwise(&zeros(&[2, 2]), None),
        Shape { .. }
    );
    assert_err!(
        Tensor::randn(&[2], F32, 0.0, -1.0, &mut seeded_rng(0)),
        OutOfRange { .. }
    );
    assert_err!(
        Tensor::rand_uniform(&[2], F32, 1.0, 1.0, &mut seeded_rng(0)),
        OutOfRange { .. }
    );
    assert_err!(
        Tensor::rand_uniform(&[2], F32, 0.0, f64::INFINITY, &mut seeded_rng(0)),
        OutOfRange { .. }
    );
    assert_err!(
        Tensor::rand_uniform(&[2], F32, -f64::MAX, f64::MAX, &mut seeded_rng(0)),
        OutOfRange { .. }
    );
}
