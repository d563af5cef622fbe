//! Macros that pick a kernel's Rust element type from a runtime `DType`.

/// Runs `$body` with `$T` bound to the float type of `$dtype`; u32 is an error naming `$op`.
macro_rules! float_dispatch {
    ($op:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            $crate::DType::F16 => {
                type $T = half::f16;
                $body
            }
            dtype @ $crate::DType::U32 => {
                return Err($crate::TensorError::DType { op: $op, dtype });
            }
        }
    };
}

/// Runs `$body` with `$T` bound to the Rust type of `$dtype` (every dtype).
macro_rules! any_dispatch {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            $crate::DType::F16 => {
                type $T = half::f16;
                $body
            }
            $crate::DType::U32 => {
                type $T = u32;
                $body
            }
        }
    };
}

pub(crate) use any_dispatch;
pub(crate) use float_dispatch;
