//! The `Tensor` type: shared storage plus a strided layout. Cloning is cheap; ops never mutate.

use crate::dispatch::any_dispatch;
use crate::error::{shape_err, Result};
use crate::gpu::Gpu;
use crate::layout::{numel, Layout};
use crate::ops::par_write::{par_write, write_each};
use crate::storage::{CpuStorage, Device, Storage};
use crate::{DType, Element, TensorError};
use std::sync::Arc;

/// Elements per rayon task in memory-bound kernels.
pub(crate) const PAR_CHUNK: usize = 1 << 14;

/// An n-dimensional array of one element type on one device.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    layout: Layout,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?}, {}, {})",
            self.shape(),
            self.dtype(),
            self.device()
        )
    }
}

impl Tensor {
    /// A tensor over existing storage with the given layout.
    pub fn from_storage(storage: Arc<Storage>, layout: Layout) -> Self {
        Tensor { storage, layout }
    }

    /// A contiguous host tensor holding `data` with `shape`.
    pub fn from_vec<T: Element>(data: Vec<T>, shape: &[usize]) -> Result<Self> {
        if data.len() != numel(shape) {
            return shape_err(
                "from_vec",
                format!("{} elements cannot have shape {shape:?}", data.len()),
            );
        }
        Ok(Self::from_cpu(CpuStorage::from_vec(data), shape))
    }

    /// A contiguous host tensor copied from `data`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Self> {
        Self::from_vec(data.to_vec(), shape)
    }

    /// A rank-0 tensor.
    pub fn scalar<T: Element>(value: T) -> Self {
        Self::from_cpu(CpuStorage::from_vec(vec![value]), &[])
    }

    /// A tensor of `shape` filled with `value` (rounded to `dtype`).
    pub fn full(shape: &[usize], value: f64, dtype: DType) -> Self {
        any_dispatch!(dtype, T => Self::from_cpu(CpuStorage::from_vec(vec![<T as Element>::from_f64(value); numel(shape)]), shape))
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize], dtype: DType) -> Self {
        Self::full(shape, 0.0, dtype)
    }

    /// A tensor of ones.
    pub fn ones(shape: &[usize], dtype: DType) -> Self {
        Self::full(shape, 1.0, dtype)
    }

    /// `[0, 1, ..., n-1]`.
    pub fn arange(n: usize, dtype: DType) -> Self {
        any_dispatch!(dtype, T => Self::from_cpu(
            CpuStorage::from_vec((0..n).map(|i| <T as Element>::from_f64(i as f64)).collect::<Vec<_>>()),
            &[n],
        ))
    }

    pub(crate) fn from_cpu(storage: CpuStorage, shape: &[usize]) -> Self {
        Tensor {
            storage: Arc::new(Storage::Cpu(storage)),
            layout: Layout::contiguous(shape),
        }
    }

    /// The logical shape.
    pub fn shape(&self) -> &[usize] {
        self.layout.shape()
    }

    /// Size of axis `axis`.
    pub fn dim(&self, axis: usize) -> usize {
        self.layout.shape()[axis]
    }

    /// Number of axes.
    pub fn rank(&self) -> usize {
        self.layout.rank()
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.layout.numel()
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.storage.dtype()
    }

    /// The device the elements live on.
    pub fn device(&self) -> Device {
        self.storage.device()
    }

    /// The strided layout over the storage.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The shared storage.
    pub fn storage(&self) -> &Arc<Storage> {
        &self.storage
    }

    /// The storage for writing in place: `Some` when this tensor is the only handle on it and
    /// covers all of it, contiguously from its start.
    pub(crate) fn sole_storage_mut(&mut self) -> Option<&mut Storage> {
        let len = match &*self.storage {
            Storage::Cpu(s) => s.len(),
            Storage::Cuda(s) => s.len(),
        };
        let whole = self.layout.is_contiguous() && self.layout.offset() == 0 && self.numel() == len;
        if whole {
            Arc::get_mut(&mut self.storage)
        } else {
            None
        }
    }

    /// Whether the elements are row-major without gaps.
    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }

    /// The host storage, for CPU kernels (which every op reaches only for host tensors).
    pub(crate) fn cpu(&self) -> &CpuStorage {
        match &*self.storage {
            Storage::Cpu(s) => s,
            Storage::Cuda(_) => panic!(
                "a CPU kernel was given a tensor on {}: the op must dispatch on the device",
                self.device()
            ),
        }
    }

    /// The whole storage as `&[T]`, for kernels that walk the layout themselves.
    pub(crate) fn storage_slice<T: Element>(&self) -> &[T] {
        self.cpu()
            .as_slice::<T>()
            .expect("kernel dispatched on the tensor's own dtype")
    }

    /// The elements of a contiguous tensor as `&[T]`.
    pub(crate) fn contiguous_slice<T: Element>(&self) -> &[T] {
        debug_assert!(self.is_contiguous());
        let start = self.layout.offset();
        &self.storage_slice::<T>()[start..start + self.numel()]
    }

    fn with_layout(&self, layout: Layout) -> Self {
        Tensor {
            storage: self.storage.clone(),
            layout,
        }
    }

    /// Row-major copy of the elements on the host (copied from the device for a GPU tensor);
    /// `T` must be the tensor's dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if self.dtype() != T::DTYPE {
            return Err(TensorError::DTypeMismatch {
                op: "to_vec",
                lhs: self.dtype(),
                rhs: T::DTYPE,
            });
        }
        let host = self.to_device(Device::Cpu)?;
        Ok(host.contiguous().contiguous_slice::<T>().to_vec())
    }

    /// Row-major copy of the elements widened to f64 (any dtype), on the host.
    ///
    /// # Panics
    /// When the tensor is on a CUDA device and the copy to the host fails (a device fault);
    /// [`Tensor::to_vec`] reports that as an error instead.
    pub fn to_vec_f64(&self) -> Vec<f64> {
        let host = self
            .to_device(Device::Cpu)
            .unwrap_or_else(|e| panic!("to_vec_f64 of {self:?}: {e}"));
        any_dispatch!(host.dtype(), T => host.contiguous().contiguous_slice::<T>().iter().map(|v| v.to_f64()).collect())
    }

    /// The single element of a one-element tensor, as f64 (copied from the device for a GPU
    /// tensor).
    pub fn to_scalar_f64(&self) -> Result<f64> {
        if self.numel() != 1 {
            return shape_err(
                "to_scalar",
                format!("tensor of shape {:?} is not a scalar", self.shape()),
            );
        }
        Ok(self.to_device(Device::Cpu)?.to_vec_f64()[0])
    }

    /// A contiguous tensor with the same elements (a cheap clone when already contiguous).
    ///
    /// # Panics
    /// When the tensor is on a CUDA device and the copy fails (out of device memory, a driver
    /// error); [`Tensor::try_contiguous`] reports that as an error instead. Host tensors never
    /// panic.
    pub fn contiguous(&self) -> Tensor {
        self.try_contiguous()
            .unwrap_or_else(|e| panic!("contiguous of {self:?}: {e}"))
    }

    /// A contiguous tensor with the same elements (a cheap clone when already contiguous); on a
    /// CUDA device the copy is a strided-copy kernel, and its failure an error.
    pub fn try_contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        if let Some(gpu) = Gpu::of("contiguous", &[self])? {
            return gpu.copy(self);
        }
        Ok(any_dispatch!(self.dtype(), T => {
            let src = self.storage_slice::<T>();
            let n = self.numel();
            let step = self.layout.strides().last().copied().unwrap_or(1);
            // SAFETY: the runs tile the chunk (checked below) and `write_each` writes every
            // element of each (or panics).
            let out = unsafe {
                par_write(n, PAR_CHUNK, |c, chunk| {
                    // A run along the last axis at a time: a slice copy where that axis is
                    // contiguous, a strided gather otherwise.
                    let mut runs = self.layout.offsets_from(c * PAR_CHUNK, chunk.len());
                    let mut rest = chunk;
                    while let Some((first, count)) = runs.next_run() {
                        let (run, tail) = std::mem::take(&mut rest).split_at_mut(count);
                        if step == 1 {
                            write_each(run, src[first..first + count].iter().copied());
                        } else {
                            write_each(run, (0..count).map(|j| src[first + j * step]));
                        }
                        rest = tail;
                    }
                    assert!(rest.is_empty(), "contiguous: the runs cover the chunk");
                })
            };
            Self::from_cpu(CpuStorage::from_vec(out), self.shape())
        }))
    }

    /// The same elements in a new shape; copies only when `self` is not contiguous.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel(shape) != self.numel() {
            return shape_err(
                "reshape",
                format!("cannot reshape {:?} into {shape:?}", self.shape()),
            );
        }
        let src = self.try_contiguous()?;
        let layout = src.layout.reshape(shape).expect("contiguous after contiguous()");
        Ok(src.with_layout(layout))
    }

    /// Reorders the axes: axis `i` of the result is axis `perm[i]` of `self`.
    pub fn permute(&self, perm: &[usize]) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.permute(perm)?))
    }

    /// Swaps axes `a` and `b`.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.transpose(a, b)?))
    }

    /// Swaps the last two axes (matrix transpose of every batch element).
    pub fn t(&self) -> Result<Tensor> {
        if self.rank() < 2 {
            return shape_err("t", format!("needs rank >= 2, got {:?}", self.shape()));
        }
        self.transpose(self.rank() - 2, self.rank() - 1)
    }

    /// Elements `start..start+len` of axis `axis` (a view).
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.narrow(axis, start, len)?))
    }

    /// Broadcasts to `shape` by numpy rules (a view with zero strides; torch's `expand`).
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Tensor> {
        Ok(self.with_layout(self.layout.broadcast_to(shape)?))
    }

    /// Inserts an axis of size 1 at `axis`.
    pub fn unsqueeze(&self, axis: usize) -> Result<Tensor> {
        if axis > self.rank() {
            return crate::error::range_err(
                "unsqueeze",
                format!("axis {axis} out of range for shape {:?}", self.shape()),
            );
        }
        let mut shape = self.shape().to_vec();
        shape.insert(axis, 1);
        let mut strides = self.layout.strides().to_vec();
        strides.insert(axis, 0);
        Ok(self.with_layout(Layout::from_parts(shape, strides, self.layout.offset())))
    }

    /// Removes axis `axis`, which must have size 1.
    pub fn squeeze(&self, axis: usize) -> Result<Tensor> {
        if axis >= self.rank() || self.dim(axis) != 1 {
            return shape_err(
                "squeeze",
                format!("axis {axis} of {:?} is not of size 1", self.shape()),
            );
        }
        let mut shape = self.shape().to_vec();
        shape.remove(axis);
        let mut strides = self.layout.strides().to_vec();
        strides.remove(axis);
        Ok(self.with_layout(Layout::from_parts(shape, strides, self.layout.offset())))
    }
}
