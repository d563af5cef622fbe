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
    /// The error function.
    fn erf(self) -> Self;
    /// Converts from f64.
    fn lit(v: f64) -> Self {
        Self::from_f64(v).expect("every f64 converts to a float type")
    }
}

impl Real for f32 {
    fn erf(self) -> Self {
        libm::erff(self)
    }
}

impl Real for f64 {
    fn erf(self) -> Self {
        libm::erf(self)
    }
}

/// A floating-point element type; kernels compute in its `Acc` type (f32 for the
/// 16-bit types, so that bf16/f16 results are f32 results rounded once).
pub trait FloatElement: Element {
    /// The type arithmetic is done in.
    type Acc: Real;
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
    type Acc = f32;
    fn to_acc(self) -> f32 {
        self
    }
    fn from_acc(v: f32) -> Self {
        v
    }
}

impl FloatElement for f64 {
    type Acc = f64;
    fn to_acc(self) -> f64 {
        self
    }
    fn from_acc(v: f64) -> Self {
        v
    }
}

impl FloatElement for bf16 {
    type Acc = f32;
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl FloatElement for f16 {
    type Acc = f32;
    fn to_acc(self) -> f32 {
        self.to_f32()
    }
    fn from_acc(v: f32) -> Self {
        f16::from_f32(v)
    }
}
