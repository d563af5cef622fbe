//! Where a tensor's elements live. Each device is one `Storage` variant; an op matches on it
//! and calls that device's kernel, so a new backend adds a variant and its arms.

use crate::gpu::CudaStorage;
use crate::{DType, Element};
use memmap2::Mmap;
use std::sync::Arc;

/// The devices a tensor can live on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Device {
    /// Host memory; kernels run on the rayon thread pool.
    Cpu,
    /// The CUDA device of this ordinal; kernels are the `cuda` crate's.
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Host elements of one type: owned, or borrowed zero-copy from a memory-mapped file.
#[derive(Debug)]
pub enum Buffer<T> {
    /// Elements owned by the process.
    Owned(Vec<T>),
    /// `len` elements at `byte_offset` of a mapped file (aligned for `T`).
    Mapped {
        /// The mapping, shared by every tensor read from the file.
        map: Arc<Mmap>,
        /// Where the elements start.
        byte_offset: usize,
        /// Number of elements.
        len: usize,
    },
}

impl<T: Element> std::ops::Deref for Buffer<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            Buffer::Owned(v) => v,
            Buffer::Mapped {
                map,
                byte_offset,
                len,
            } => {
                let bytes = &map[*byte_offset..*byte_offset + len * std::mem::size_of::<T>()];
                bytemuck::cast_slice(bytes)
            }
        }
    }
}

/// Host storage of any element type.
#[derive(Debug)]
pub enum CpuStorage {
    /// f32 elements.
    F32(Buffer<f32>),
    /// f64 elements.
    F64(Buffer<f64>),
    /// bf16 elements.
    BF16(Buffer<half::bf16>),
    /// f16 elements.
    F16(Buffer<half::f16>),
    /// u32 elements.
    U32(Buffer<u32>),
}

impl CpuStorage {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::U32(_) => DType::U32,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(b) => b.len(),
            CpuStorage::F64(b) => b.len(),
            CpuStorage::BF16(b) => b.len(),
            CpuStorage::F16(b) => b.len(),
            CpuStorage::U32(b) => b.len(),
        }
    }

    /// Whether the storage holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as a slice of `T`, or `None` when the element type differs.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        let bytes: &[u8] = match self {
            CpuStorage::F32(b) => bytemuck::cast_slice(b),
            CpuStorage::F64(b) => bytemuck::cast_slice(b),
            CpuStorage::BF16(b) => bytemuck::cast_slice(b),
            CpuStorage::F16(b) => bytemuck::cast_slice(b),
            CpuStorage::U32(b) => bytemuck::cast_slice(b),
        };
        (self.dtype() == T::DTYPE).then(|| bytemuck::cast_slice(bytes))
    }

    /// The owned elements as a mutable slice of `T`: `None` when the element type differs or
    /// the elements are borrowed from a mapped file.
    pub fn as_mut_slice<T: Element>(&mut self) -> Option<&mut [T]> {
        if self.dtype() != T::DTYPE {
            return None;
        }
        let bytes: &mut [u8] = match self {
            CpuStorage::F32(Buffer::Owned(v)) => bytemuck::cast_slice_mut(v),
            CpuStorage::F64(Buffer::Owned(v)) => bytemuck::cast_slice_mut(v),
            CpuStorage::BF16(Buffer::Owned(v)) => bytemuck::cast_slice_mut(v),
            CpuStorage::F16(Buffer::Owned(v)) => bytemuck::cast_slice_mut(v),
            CpuStorage::U32(Buffer::Owned(v)) => bytemuck::cast_slice_mut(v),
            _ => return None,
        };
        Some(bytemuck::cast_slice_mut(bytes))
    }

    /// Wraps owned elements.
    pub fn from_vec<T: Element>(v: Vec<T>) -> Self {
        Self::from_buffer(Buffer::Owned(v))
    }

    /// Wraps a buffer of any element type.
    pub fn from_buffer<T: Element>(b: Buffer<T>) -> Self {
        fn cast<T: 'static, U: 'static>(b: Buffer<T>) -> Buffer<U> {
            let mut slot = Some(b);
            let any: &mut dyn std::any::Any = &mut slot;
            any.downcast_mut::<Option<Buffer<U>>>()
                .and_then(Option::take)
                .expect("Element::DTYPE matches the Rust type")
        }
        match T::DTYPE {
            DType::F32 => CpuStorage::F32(cast(b)),
            DType::F64 => CpuStorage::F64(cast(b)),
            DType::BF16 => CpuStorage::BF16(cast(b)),
            DType::F16 => CpuStorage::F16(cast(b)),
            DType::U32 => CpuStorage::U32(cast(b)),
        }
    }
}

/// A tensor's storage on some device.
#[derive(Debug)]
pub enum Storage {
    /// Host memory.
    Cpu(CpuStorage),
    /// Memory of a CUDA device.
    Cuda(CudaStorage),
}

impl Storage {
    /// The device the storage lives on.
    pub fn device(&self) -> Device {
        match self {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => s.device(),
        }
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        match self {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }
}
