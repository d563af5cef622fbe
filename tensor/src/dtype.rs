//! Element types: the `DType` tag and the traits that tie Rust types to it.

use half::{bf16, f16};
use std::fmt;

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// 64-bit IEEE float (references and gradient checks).
    F64,
    /// bfloat16: 8-bit exponent, 7-bit mantissa.
    BF16,
    /// IEEE half precision.
    F16,
    /// Unsigned 32-bit integers: token ids, indices, masks.
    U32,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F64 => 8,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        !matches!(self, DType::U32)
    }

    /// The name used by safetensors ("F32", "BF16", ...).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::U32 => "U32",
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::U32 => "u32",
        })
    }
}

/// A Rust type that can be stored in a tensor.
pub trait Element: Copy + Send + Sync + 'static + bytemuck::Pod + PartialOrd + fmt::Debug {
    /// The tag of this type.
    const DTYPE: DType;
    /// Converts to f64 (exact for every supported type).
    fn to_f64(self) -> f64;
    /// Converts from f64, rounding to nearest.
    fn from_f64(v: f64) -> Self;
}

/// The arithmetic type kernels compute in: f32 or f64.
pub trait Real:
    num_traits::Float
    + num_traits::FromPrimitive
    + std::ops::AddAssign
    + std::iter::Sum
    + Send
    + Sync
    + fmt::Debug
    + 'static
{
    /// The error function. For f32 without a library call or a branch, so that a loop of it
    /// vectorises: Cephes' `erff` polynomial for |x| <= 1 and Abramowitz & Stegun 7.1.26 (on
    /// `exp_fast`) beyond, within 3e-7 of the f64 `erf` (tested); for f64 `libm::erf`.
    fn erf(self) -> Self;
    /// tanh x. For f32 branch-free and without a library call: Cephes' `tanhf` (a polynomial
    /// below |x| = 0.625, 1 - 2/(e^2|x| + 1) above, on `exp_fast`), within 3e-7 of the f64
    /// `tanh` (tested); for f64 the standard library's `tanh`.
    fn tanh_fast(self) -> Self;
    /// ln(1 + y) for y in [0, 1] (the softplus of a non-positive argument's exponential). For
    /// f32 as 2·atanh(y / (2 + y)) by its odd series to the 15th power (no cancellation, within
    /// 3e-7 of the f64 `ln_1p`, tested); for f64 the standard library's `ln_1p`.
    fn ln_1p_unit(self) -> Self;
    /// e^x without a library call, so that a loop of them vectorises: for f32 a Cody-Waite
    /// range reduction and Cephes' degree-5 minimax polynomial (relative error under 3e-7 over
    /// f32's normal range, tested; results below the smallest normal number, x < -87.33, flush
    /// to zero; x > 88.72 gives infinity and NaN stays NaN); for f64 the standard library's `exp`.
    fn exp_fast(self) -> Self;
    /// `exp_fast` with fused multiply-adds (the same bound, tested): for loops run inside
    /// `ops::elementwise::with_simd`, whose AVX2 and AVX-512 paths have FMA instructions.
    /// Anywhere else each fused multiply-add is a call to the C library's `fmaf`: right, but
    /// many times slower. For f64 the standard library's `exp`.
    fn exp_fused(self) -> Self;
    /// e^x for x <= 0 (softmax's shifted logits), with fused multiply-adds like `exp_fused` (for
    /// loops inside `with_simd`). For f32: the same range reduction as `exp_fast`, then a
    /// degree-5 polynomial for e^r with constant term 1, its other coefficients fitted for the
    /// least largest relative error on [-ln2/2, ln2/2] (`scripts/fit_exp_polynomial.py`), and
    /// 2^k applied as a product (so a NaN of any payload stays NaN). No clamp and one select
    /// fewer than `exp_fast`: relative error under 3e-7 on [-87.33, 0] (tested), e^0 = 1
    /// exactly, 0 below -87.33 (-inf included). For f64 the standard library's `exp`.
    fn exp_nonpositive(self) -> Self;
    /// Converts from f64.
    fn lit(v: f64) -> Self {
        Self::from_f64(v).expect("every f64 converts to a float type")
    }
}

impl Real for f32 {
    #[inline(always)]
    fn erf(self) -> Self {
        let x = self.abs();
        // |x| <= 1: x · P(x²).
        let z = x * x;
        let small = ((((((7.853_861e-5 * z - 8.010_194e-4) * z + 5.188_328e-3) * z - 2.685_381_2e-2) * z
            + 0.112_835_85)
            * z
            - 0.376_126_26)
            * z
            + std::f32::consts::FRAC_2_SQRT_PI)
            * x;
        // |x| > 1: 1 - (a1·t + ... + a5·t⁵)·e^(-x²), t = 1/(1 + p·x).
        let t = 1.0 / (1.0 + 0.327_591_1 * x);
        let poly =
            ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_8) * t - 0.284_496_72) * t + 0.254_829_6) * t;
        let large = 1.0 - poly * (-z).exp_fast();
        let v = if x <= 1.0 { small } else { large };
        v.copysign(self)
    }

    #[inline(always)]
    fn tanh_fast(self) -> Self {
        let x = self.abs();
        let s = x * x;
        let small = ((((-5.704_988_7e-3 * s + 2.063_909e-2) * s - 5.373_971_6e-2) * s + 0.133_314_42) * s
            - 0.333_332_8)
            * s
            * x
            + x;
        let large = 1.0 - 2.0 / ((x + x).exp_fast() + 1.0);
        let v = if x < 0.625 { small } else { large };
        v.copysign(self)
    }

    #[inline(always)]
    fn ln_1p_unit(self) -> Self {
        let s = self / (2.0 + self);
        let z = s * s;
        let series = ((((((z / 15.0 + 1.0 / 13.0) * z + 1.0 / 11.0) * z + 1.0 / 9.0) * z + 1.0 / 7.0) * z
            + 1.0 / 5.0)
            * z
            + 1.0 / 3.0)
            * z;
        2.0 * (s + s * series)
    }

    #[inline(always)]
    fn exp_fast(self) -> Self {
        exp_f32::<false>(self)
    }

    #[inline(always)]
    fn exp_fused(self) -> Self {
        exp_f32::<true>(self)
    }

    #[inline(always)]
    fn exp_nonpositive(self) -> Self {
        let (k, r) = reduce_exp_argument::<true>(self);
        let mut p: f32 = 0.008_290_316;
        for c in [0.041_897_93, 0.166_676_36, 0.499_991_5, 0.999_999_7, 1.0] {
            p = p.mul_add(r, c);
        }
        // 2^k from its exponent bits: k + 127 is in [1, 127] for x in [-87.33, 0].
        let two_k = f32::from_bits(((k + 127) << 23) as u32);
        if self < -87.33 {
            0.0
        } else {
            p * two_k
        }
    }
}

/// `a·b + c`, fused into one rounding when `FUSED`.
#[inline(always)]
fn madd<const FUSED: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FUSED {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// The range reduction of the f32 exponentials: x = k·ln2 + r with k = round(x·log2 e) and
/// |r| <= ln2/2, as (k, r); multiply-adds fused when `FUSED`.
#[inline(always)]
fn reduce_exp_argument<const FUSED: bool>(x: f32) -> (i32, f32) {
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let shifted = madd::<FUSED>(x, std::f32::consts::LOG2_E, ROUND);
    let k = shifted - ROUND;
    // x - k·ln2 in two parts, so that the reduced argument keeps its precision.
    let r = madd::<FUSED>(k, 2.121_944_4e-4, madd::<FUSED>(-k, 0.693_359_4, x));
    (shifted.to_bits() as i32 - ROUND.to_bits() as i32, r)
}

/// e^x for f32 (see [`Real::exp_fast`]), its multiply-adds fused when `FUSED`.
#[inline(always)]
fn exp_f32<const FUSED: bool>(v: f32) -> f32 {
    let (k_int, r) = reduce_exp_argument::<FUSED>(v.clamp(-87.33, 88.72));
    let mut p = 1.987_569_2e-4;
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
        p = madd::<FUSED>(p, r, c);
    }
    let e_r = madd::<FUSED>(p, r * r, r) + 1.0;
    // e_r · 2^k by adding k to e_r's exponent. No overflow or subnormal on the way: k = 128
    // only when x > 127.5·ln2, where r < 0 and so e_r < 1; k = -126 only when
    // x < -125.5·ln2, where r > 0 and e_r > 1 (the clamp keeps |x·log2 e| under 128 and 126).
    let scaled = f32::from_bits((e_r.to_bits() as i32 + (k_int << 23)) as u32);
    if v > 88.72 {
        f32::INFINITY
    } else if v < -87.33 {
        0.0
    } else {
        scaled
    }
}

impl Real for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }

    fn tanh_fast(self) -> Self {
        self.tanh()
    }

    fn ln_1p_unit(self) -> Self {
        self.ln_1p()
    }

    fn exp_fast(self) -> Self {
        self.exp()
    }

    fn exp_fused(self) -> Self {
        self.exp()
    }

    fn exp_nonpositive(self) -> Self {
        self.exp()
    }
}

/// A floating-point element type; kernels compute in its `Acc` type (f32 for the
/// 16-bit types, so that bf16/f16 results are f32 results rounded once).
pub trait FloatElement: Element {
    /// The type arithmetic is done in.
    type Acc: Real;
    /// `s` itself when the type is its own compute type (f32, f64; `from_acc` is then exact), so
    /// that a kernel working in the compute type reads it in place rather than through a
    /// widened copy.
    fn as_acc(s: &[Self]) -> Option<&[Self::Acc]>;
    /// Widens to the compute type.
    fn to_acc(self) -> Self::Acc;
    /// Rounds from the compute type.
    fn from_acc(v: Self::Acc) -> Self;
}

/// `v` rounded to f32 by round-to-odd: truncated toward zero, with the last bit set when inexact.
/// Rounding that to nearest in a format of at most 22 bits of precision (bf16, f16) gives `v`
/// rounded to nearest in that format: no double-rounding error.
fn f64_to_f32_odd(v: f64) -> f32 {
    let nearest = v as f32;
    if nearest as f64 == v || !nearest.is_finite() {
        return nearest; // exact, NaN, or beyond f32's range (and so beyond bf16's and f16's)
    }
    let truncated = if (nearest as f64).abs() > v.abs() {
        f32::from_bits(nearest.to_bits() - 1) // one step back toward zero
    } else {
        nearest
    };
    f32::from_bits(truncated.to_bits() | 1)
}

macro_rules! impl_element {
    ($t:ty, $dt:ident, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$dt;
            fn to_f64(self) -> f64 {
                $to(self)
            }
            fn from_f64(v: f64) -> Self {
                $from(v)
            }
        }
    };
}

impl_element!(f32, F32, |x: f32| x as f64, |v: f64| v as f32);
impl_element!(f64, F64, |x: f64| x, |v: f64| v);
// Not `half`'s `from_f64`, which is not round-to-nearest: for bf16 (and f16 without F16C) it
// drops the low 32 bits of the f64 before rounding, for f16 with F16C it rounds through f32
// first; both turn values just above a tie into the tie and round them down to even.
impl_element!(bf16, BF16, |x: bf16| x.to_f64(), |v: f64| bf16::from_f32(
    f64_to_f32_odd(v)
));
impl_element!(f16, F16, |x: f16| x.to_f64(), |v: f64| f16::from_f32(
    f64_to_f32_odd(v)
));
impl_element!(u32, U32, |x: u32| x as f64, |v: f64| v as u32);

impl FloatElement for f32 {
    fn as_acc(s: &[Self]) -> Option<&[Self::Acc]> {
        Some(s)
    }
    type Acc = f32;
    fn to_acc(self) -> f32 {
        self
    }
    fn from_acc(v: f32) -> Self {
        v
    }
}

impl FloatElement for f64 {
    fn as_acc(s: &[Self]) -> Option<&[Self::Acc]> {
        Some(s)
    }
    type Acc = f64;
    fn to_acc(self) -> f64 {
        self
    }
    fn from_acc(v: f64) -> Self {
        v
    }
}

impl FloatElement for bf16 {
    fn as_acc(_: &[Self]) -> Option<&[Self::Acc]> {
        None
    }
    type Acc = f32;
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl FloatElement for f16 {
    fn as_acc(_: &[Self]) -> Option<&[Self::Acc]> {
        None
    }
    type Acc = f32;
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(v: f32) -> Self {
        f16::from_f32(v)
    }
}

#[cfg(test)]
mod tests {
    use super::Real;

    #[test]
    fn fast_f32_exp_is_within_3e7_of_the_f64_exp() {
        type Exp = fn(f32) -> f32;
        for (name, exp) in [
            ("exp_fast", Real::exp_fast as Exp),
            ("exp_fused", Real::exp_fused),
        ] {
            let mut worst = (0.0f64, 0.0f32);
            let steps = 400_000;
            for i in 0..=steps {
                let x = -87.3f32 + (88.7 + 87.3) * i as f32 / steps as f32;
                let want = f64::from(x).exp();
                let err = (f64::from(exp(x)) - want).abs() / want;
                if err > worst.0 {
                    worst = (err, x);
                }
            }
            assert!(
                worst.0 < 3e-7,
                "{name}: relative error {} at x = {}",
                worst.0,
                worst.1
            );
            assert_eq!(exp(0.0), 1.0, "{name}");
            assert_eq!(exp(-100.0), 0.0, "{name}");
            assert_eq!(exp(100.0), f32::INFINITY, "{name}");
            assert_eq!(exp(f32::NEG_INFINITY), 0.0, "{name}");
            assert!(exp(f32::NAN).is_nan(), "{name}");
        }
        assert_eq!(1.5f64.exp_fast(), 1.5f64.exp());
        assert_eq!(1.5f64.exp_fused(), 1.5f64.exp());
    }

    #[test]
    fn f32_exp_of_nonpositive_arguments_is_within_3e7_of_the_f64_exp() {
        let (err, at) = worst(-87.33, 0.0, Real::exp_nonpositive, f64::exp);
        assert!(err < 3e-7, "relative error {err} at x = {at}");
        // Near zero, where softmax's largest terms are.
        let (err, at) = worst(-1e-3, 0.0, Real::exp_nonpositive, f64::exp);
        assert!(err < 3e-7, "relative error {err} at x = {at}");
        assert_eq!(0.0f32.exp_nonpositive(), 1.0);
        assert_eq!((-87.4f32).exp_nonpositive(), 0.0);
        assert_eq!(f32::NEG_INFINITY.exp_nonpositive(), 0.0);
        // A NaN stays NaN whatever its payload (payload bits must not leak into the result).
        for payload in [0u32, 1, 0x1ff, 0x3f_ffff] {
            let nan = f32::from_bits(0x7fc0_0000 | payload);
            assert!(nan.exp_nonpositive().is_nan(), "payload {payload:#x}");
            assert!(
                (-nan).exp_nonpositive().is_nan(),
                "payload {payload:#x}, negative"
            );
        }
        assert_eq!((-1.5f64).exp_nonpositive(), (-1.5f64).exp());
    }

    /// The largest relative error of `fast` against `exact` on a dense grid over [lo, hi], and
    /// where it is.
    fn worst(lo: f32, hi: f32, fast: impl Fn(f32) -> f32, exact: impl Fn(f64) -> f64) -> (f64, f32) {
        let steps = 400_000;
        (0..=steps)
            .map(|i| {
                let x = lo + (hi - lo) * i as f32 / steps as f32;
                let want = exact(f64::from(x));
                let err = if want == 0.0 {
                    f64::from(fast(x)).abs()
                } else {
                    (f64::from(fast(x)) - want).abs() / want.abs()
                };
                (err, x)
            })
            .fold((0.0, 0.0), |w, e| if e.0 > w.0 { e } else { w })
    }

    #[test]
    fn f32_erf_tanh_and_ln_1p_are_within_3e7_of_f64() {
        for (lo, hi) in [(-8.0, 8.0), (-1e-3, 1e-3)] {
            let (err, at) = worst(lo, hi, Real::erf, libm::erf);
            assert!(err < 3e-7, "erf: relative error {err} at x = {at}");
            let (err, at) = worst(lo, hi, Real::tanh_fast, f64::tanh);
            assert!(err < 3e-7, "tanh: relative error {err} at x = {at}");
        }
        for (lo, hi) in [(0.0, 1.0), (0.0, 1e-4)] {
            let (err, at) = worst(lo, hi, Real::ln_1p_unit, f64::ln_1p);
            assert!(err < 3e-7, "ln_1p: relative error {err} at y = {at}");
        }
        assert_eq!(100f32.tanh_fast(), 1.0);
        assert_eq!((-100f32).tanh_fast(), -1.0);
        assert_eq!(Real::erf(f32::INFINITY), 1.0);
        assert!(Real::erf(f32::NAN).is_nan() && f32::NAN.tanh_fast().is_nan());
        assert_eq!(0.7f64.tanh_fast(), 0.7f64.tanh());
    }
}
