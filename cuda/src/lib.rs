//! The CUDA device layer of emma-rs, on `cudarc` with dynamic loading: it builds without a CUDA
//! toolkit and never panics when a library is missing (see [`probe`]).
//!
//! - [`GpuDevice`]: device discovery, one stream, timing events, host <-> device copies and
//!   typed [`DeviceBuffer`]s from a caching allocator ([`allocator`]).
//! - [`compile`]: the kernels of `cuda/kernels/*.cu`, embedded and compiled by NVRTC for the
//!   device's architecture on first use, cached on disk.
//! - [`kernels`]: typed launchers for every kernel (elementwise, reductions, softmax,
//!   cross-entropy, norms, indexing, conv1d, AdamW), as methods of [`GpuDevice`].
//! - [`gemm`]: cuBLAS / cuBLASLt matrix products.
//! - [`emulator`]: the emulated GPU (`EMMA_GPU=emulate`): the same kernel sources compiled by
//!   the host C++ compiler and run on the CPU with memory, barrier and race checks.
//!
//! This crate does not depend on `tensor`; the tensor dispatch builds on it.

pub mod allocator;
pub mod compile;
pub mod device;
pub mod emulator;
pub mod error;
pub mod gemm;
pub mod kernels;
mod launch;
pub mod layout;
pub mod nccl;
pub mod probe;

pub use device::{DType, DeviceBuffer, DeviceElem, DeviceInfo, FloatElem, GpuDevice, GpuEvent};
pub use error::{CudaError, Result};
pub use gemm::GemmSpec;
pub use half::{bf16, f16};
pub use layout::View;
