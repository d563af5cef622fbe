//! `tensor`: n-dimensional arrays with strided views and a rayon CPU backend.
//!
//! Tensors are immutable and cheap to clone (shared storage + layout). Every op checks its
//! shapes and dtypes, then dispatches on the storage's device to a kernel: a rayon CPU kernel, or
//! a launcher of the `cuda` crate for tensors on a CUDA device. The CPU kernels are the numerical
//! reference for every other backend. Operands of one op must live on one device.

pub mod atomic_file;
mod dispatch;
pub mod dtype;
pub mod error;
pub mod gpu;
pub mod host_memory;
pub mod layout;
pub mod nccl;
pub mod ops;
pub mod safetensors;
pub mod storage;
mod tensor;
#[cfg(test)]
mod testing;

pub use cuda::kernels::AdamWStep;
pub use dtype::{DType, Element, FloatElement, Real};
pub use error::{Result, TensorError};
pub use gpu::{cuda_device, CudaBuffer, CudaStorage};
pub use half::{bf16, f16};
pub use layout::Layout;
pub use ops::attention::{AttentionMask, AttentionSpec};
pub use ops::binary::{BinaryOp, CmpOp};
pub use ops::random::{seeded_rng, Rng};
pub use ops::unary::UnaryOp;
pub use ops::{selective_scan::SelectiveScanGrads, ssd::SsdGrads};
pub use storage::{Buffer, CpuStorage, Device, Storage};
pub use tensor::Tensor;
