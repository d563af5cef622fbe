//! The error type of every tensor operation.

use crate::{DType, Device};
use std::path::PathBuf;

/// What went wrong in a tensor operation; each variant names the op and the shapes at fault.
#[derive(Debug, thiserror::Error)]
pub enum TensorError {
    /// Two or more shapes that the op needs to agree do not.
    #[error("{op}: shape mismatch: {detail}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// Which shapes and why.
        detail: String,
    },
    /// An axis or index is outside the tensor.
    #[error("{op}: {detail}")]
    OutOfRange {
        /// The operation.
        op: &'static str,
        /// Which index and the valid range.
        detail: String,
    },
    /// The op does not support this element type.
    #[error("{op}: unsupported dtype {dtype}")]
    DType {
        /// The operation.
        op: &'static str,
        /// The offending dtype.
        dtype: DType,
    },
    /// Two operands have different dtypes.
    #[error("{op}: dtype mismatch: {lhs} vs {rhs}")]
    DTypeMismatch {
        /// The operation.
        op: &'static str,
        /// First operand's dtype.
        lhs: DType,
        /// Second operand's dtype.
        rhs: DType,
    },
    /// Operands live on different devices.
    #[error("{op}: operands on different devices: {lhs} and {rhs}")]
    DeviceMismatch {
        /// The operation.
        op: &'static str,
        /// The first operand's device.
        lhs: Device,
        /// The device of the first operand that differs from it.
        rhs: Device,
    },
    /// The op has no CUDA kernel yet and was given a tensor on a CUDA device.
    #[error("op {op} has no CUDA kernel yet")]
    NoCudaKernel {
        /// The operation.
        op: &'static str,
    },
    /// The dtype cannot live on the device (CUDA holds f32, bf16, f16 and u32).
    #[error("{op}: dtype {dtype} is not supported on {device}")]
    DeviceDType {
        /// The operation.
        op: &'static str,
        /// The offending dtype.
        dtype: DType,
        /// The device.
        device: Device,
    },
    /// The CUDA layer failed (no usable GPU, out of device memory, a driver or cuBLAS error).
    #[error("{op} on {device}: {source}")]
    Cuda {
        /// The operation.
        op: &'static str,
        /// The device.
        device: Device,
        /// What the CUDA layer reported (boxed: it is large, and rare).
        source: Box<cuda::CudaError>,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors file is malformed or lacks what was asked for.
    #[error("{path}: {detail}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong, naming the tensor.
        detail: String,
    },
    /// A backward rule that re-runs a forward computation (activation recomputation) failed
    /// for a reason other than a tensor op.
    #[error("{op} (backward): {detail}")]
    Recompute {
        /// The operation.
        op: &'static str,
        /// What failed.
        detail: String,
    },
}

/// Result alias for tensor operations.
pub type Result<T> = std::result::Result<T, TensorError>;

pub(crate) fn shape_err<T>(op: &'static str, detail: impl Into<String>) -> Result<T> {
    Err(TensorError::Shape {
        op,
        detail: detail.into(),
    })
}

pub(crate) fn range_err<T>(op: &'static str, detail: impl Into<String>) -> Result<T> {
    Err(TensorError::OutOfRange {
        op,
        detail: detail.into(),
    })
}
