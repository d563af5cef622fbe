//! The CUDA side of tensors: device storage, the process-wide device handles, and what the op
//! files' CUDA arms share (typed buffers, strided views, packing, casts, error mapping). The
//! kernels and their launchers live in the `cuda` crate; each op file calls them from its own
//! CUDA arm, next to its CPU kernel.

use crate::layout::Layout;
use crate::storage::{Device, Storage};
use crate::{DType, Element, Result, Tensor, TensorError};
use cuda::{CudaError, DeviceBuffer, GpuDevice, View};
use half::{bf16, f16};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Device elements of one type.
#[derive(Debug)]
pub enum CudaBuffer {
    /// f32 elements.
    F32(DeviceBuffer<f32>),
    /// bf16 elements.
    BF16(DeviceBuffer<bf16>),
    /// f16 elements.
    F16(DeviceBuffer<f16>),
    /// u32 elements.
    U32(DeviceBuffer<u32>),
}

/// A tensor's elements in the memory of one CUDA device, with the device's handle (which the
/// ops launch their kernels on).
#[derive(Debug)]
pub struct CudaStorage {
    device: GpuDevice,
    buffer: CudaBuffer,
}

impl CudaStorage {
    /// The element type.
    pub fn dtype(&self) -> DType {
        match self.buffer {
            CudaBuffer::F32(_) => DType::F32,
            CudaBuffer::BF16(_) => DType::BF16,
            CudaBuffer::F16(_) => DType::F16,
            CudaBuffer::U32(_) => DType::U32,
        }
    }

    /// The device, as a tensor `Device`.
    pub fn device(&self) -> Device {
        Device::Cuda(self.device.info().ordinal)
    }

    /// The open device the elements live on.
    pub fn gpu(&self) -> &GpuDevice {
        &self.device
    }

    /// The typed device buffer.
    pub fn buffer(&self) -> &CudaBuffer {
        &self.buffer
    }

    /// The typed device buffer, for writing in place.
    pub(crate) fn buffer_mut(&mut self) -> &mut CudaBuffer {
        &mut self.buffer
    }

    /// Number of elements in the buffer.
    pub fn len(&self) -> usize {
        match &self.buffer {
            CudaBuffer::F32(b) => b.len(),
            CudaBuffer::BF16(b) => b.len(),
            CudaBuffer::F16(b) => b.len(),
            CudaBuffer::U32(b) => b.len(),
        }
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The process-wide handle of CUDA device `ordinal`, opened on first use and shared by every
/// tensor on `Device::Cuda(ordinal)`. When there is no usable GPU this is an error naming what
/// is missing (the driver library, or the device), never a panic; a failed open is retried on
/// the next call.
pub fn cuda_device(ordinal: usize) -> Result<GpuDevice> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, GpuDevice>>> = OnceLock::new();
    let mut open = DEVICES
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(dev) = open.get(&ordinal) {
        return Ok(dev.clone());
    }
    let dev = GpuDevice::open(ordinal).on("open", Device::Cuda(ordinal))?;
    open.insert(ordinal, dev.clone());
    Ok(dev)
}

/// Turns a `cuda` error into a tensor error naming the op and the device. An index found out of
/// range on the device becomes `OutOfRange`, as on the CPU.
pub(crate) trait OnDevice<T> {
    /// Attaches the op and device.
    fn on(self, op: &'static str, device: Device) -> Result<T>;
}

impl<T> OnDevice<T> for std::result::Result<T, CudaError> {
    fn on(self, op: &'static str, device: Device) -> Result<T> {
        self.map_err(|e| match e {
            CudaError::Index {
                what,
                value,
                position,
                bound,
                ..
            } => TensorError::OutOfRange {
                op,
                detail: format!("{what} {value} at position {position} is out of range for size {bound}"),
            },
            source => TensorError::Cuda {
                op,
                device,
                source: Box::new(source),
            },
        })
    }
}

/// An element type that CUDA buffers hold (f32, bf16, f16, u32).
pub(crate) trait GpuElement: Element + cuda::DeviceElem {
    /// Wraps a typed buffer.
    fn wrap(b: DeviceBuffer<Self>) -> CudaBuffer;
    /// The typed buffer, or `None` when the element type differs.
    fn unwrap(b: &CudaBuffer) -> Option<&DeviceBuffer<Self>>;
}

macro_rules! gpu_element {
    ($t:ty, $v:ident) => {
        impl GpuElement for $t {
            fn wrap(b: DeviceBuffer<Self>) -> CudaBuffer {
                CudaBuffer::$v(b)
            }
            fn unwrap(b: &CudaBuffer) -> Option<&DeviceBuffer<Self>> {
                match b {
                    CudaBuffer::$v(b) => Some(b),
                    _ => None,
                }
            }
        }
    };
}

gpu_element!(f32, F32);
gpu_element!(bf16, BF16);
gpu_element!(f16, F16);
gpu_element!(u32, U32);

/// Runs `$body` with `$T` bound to the float type of `$dtype` that CUDA kernels compute on (f32,
/// bf16, f16): u32 is a `DType` error naming `$op`, f64 a `DeviceDType` error naming `$device`.
macro_rules! cuda_float_dispatch {
    ($op:expr, $device:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
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
            dtype @ $crate::DType::F64 => {
                return Err($crate::TensorError::DeviceDType {
                    op: $op,
                    dtype,
                    device: $device,
                });
            }
        }
    };
}

/// Runs `$body` with `$T` bound to the Rust type of `$dtype` among those CUDA buffers hold (f32,
/// bf16, f16, u32); f64 is a `DeviceDType` error naming `$op` and `$device`.
macro_rules! cuda_any_dispatch {
    ($op:expr, $device:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
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
            dtype @ $crate::DType::F64 => {
                return Err($crate::TensorError::DeviceDType {
                    op: $op,
                    dtype,
                    device: $device,
                });
            }
        }
    };
}

pub(crate) use cuda_any_dispatch;
pub(crate) use cuda_float_dispatch;

/// The one device all `tensors` live on, or a `DeviceMismatch` naming the first two that differ.
pub(crate) fn same_device(op: &'static str, tensors: &[&Tensor]) -> Result<Device> {
    let first = tensors.first().map_or(Device::Cpu, |t| t.device());
    match tensors.iter().find(|t| t.device() != first) {
        Some(t) => Err(TensorError::DeviceMismatch {
            op,
            lhs: first,
            rhs: t.device(),
        }),
        None => Ok(first),
    }
}

/// Errors with `NoCudaKernel` when any of the operands (`required` and the given `optional`
/// ones) lives on a CUDA device: the op runs on the CPU only (for now), and a GPU tensor is never
/// moved to the host behind the caller's back.
pub(crate) fn cpu_only(op: &'static str, required: &[&Tensor], optional: &[Option<&Tensor>]) -> Result<()> {
    let mut all = required.iter().copied().chain(optional.iter().flatten().copied());
    if all.any(|t| t.device() != Device::Cpu) {
        return Err(TensorError::NoCudaKernel { op });
    }
    Ok(())
}

/// What an op's CUDA arm works with: the device its operands live on and the op's name, for
/// errors. Every buffer an arm allocates comes from this device's caching allocator.
pub(crate) struct Gpu {
    /// The open device.
    pub dev: GpuDevice,
    /// The device as a tensor `Device` (for error messages).
    pub device: Device,
    /// The op being run.
    pub op: &'static str,
}

impl Gpu {
    /// `None` when `tensors` live on the host; the CUDA device they all live on otherwise. Mixed
    /// devices are a `DeviceMismatch` error.
    pub fn of(op: &'static str, tensors: &[&Tensor]) -> Result<Option<Gpu>> {
        same_device(op, tensors)?;
        Ok(tensors.first().and_then(|t| match &**t.storage() {
            Storage::Cpu(_) => None,
            Storage::Cuda(s) => Some(Gpu {
                dev: s.gpu().clone(),
                device: s.device(),
                op,
            }),
        }))
    }

    /// Attaches the op and device to a launcher's result.
    pub fn check<R>(&self, r: cuda::Result<R>) -> Result<R> {
        r.on(self.op, self.device)
    }

    /// An uninitialised buffer of `n` elements.
    pub fn alloc<T: GpuElement>(&self, n: usize) -> Result<DeviceBuffer<T>> {
        self.check(self.dev.alloc::<T>(n))
    }

    /// A buffer of `n` zeros.
    pub fn zeros<T: GpuElement>(&self, n: usize) -> Result<DeviceBuffer<T>> {
        self.check(self.dev.zeros::<T>(n))
    }

    /// A contiguous tensor of `shape` over `buffer`.
    pub fn tensor<T: GpuElement>(&self, buffer: DeviceBuffer<T>, shape: &[usize]) -> Tensor {
        Tensor::from_cuda(self.dev.clone(), T::wrap(buffer), shape)
    }

    /// `t` with its elements contiguous from the start of a buffer that holds exactly them, as
    /// the launchers want their operands (a cheap clone when `t` already is).
    pub fn packed(&self, t: &Tensor) -> Result<Tensor> {
        if t.is_packed() {
            return Ok(t.clone());
        }
        self.copy(t)
    }

    /// A packed copy of `t`'s elements in row-major order.
    pub fn copy(&self, t: &Tensor) -> Result<Tensor> {
        cuda_any_dispatch!(self.op, self.device, t.dtype(), T => {
            let mut out = self.alloc::<T>(t.numel())?;
            self.check(self.dev.copy_strided((t.cuda_buffer::<T>(), &t.view()), &mut out))?;
            Ok(self.tensor(out, t.shape()))
        })
    }

    /// A packed copy of `t` converted to `dtype` (`t` itself when it already has that dtype
    /// and is packed).
    pub fn cast(&self, t: &Tensor, dtype: DType) -> Result<Tensor> {
        let x = self.packed(t)?;
        if x.dtype() == dtype {
            return Ok(x);
        }
        cuda_any_dispatch!(self.op, self.device, x.dtype(), S => cuda_any_dispatch!(self.op, self.device, dtype, D => {
            let mut out = self.alloc::<D>(x.numel())?;
            self.check(self.dev.cast::<S, D>(x.cuda_buffer::<S>(), &mut out))?;
            Ok(self.tensor(out, x.shape()))
        }))
    }
}

impl Tensor {
    /// A contiguous tensor of `shape` over a device buffer.
    pub(crate) fn from_cuda(device: GpuDevice, buffer: CudaBuffer, shape: &[usize]) -> Tensor {
        Tensor::from_storage(
            Arc::new(Storage::Cuda(CudaStorage { device, buffer })),
            Layout::contiguous(shape),
        )
    }

    /// The whole device buffer as `DeviceBuffer<T>`, for launchers that take a buffer and a view.
    pub(crate) fn cuda_buffer<T: GpuElement>(&self) -> &DeviceBuffer<T> {
        match &**self.storage() {
            Storage::Cuda(s) => T::unwrap(s.buffer()).expect("kernel dispatched on the tensor's own dtype"),
            Storage::Cpu(_) => {
                panic!("a CUDA kernel was given a host tensor: the op must dispatch on the device")
            }
        }
    }

    /// The layout as the `cuda` crate's strided view.
    pub(crate) fn view(&self) -> View {
        View {
            shape: self.shape().to_vec(),
            strides: self.layout().strides().to_vec(),
            offset: self.layout().offset(),
        }
    }

    /// Whether the elements are contiguous from the start of a buffer holding exactly them.
    pub(crate) fn is_packed(&self) -> bool {
        let len = match &**self.storage() {
            Storage::Cuda(s) => s.len(),
            Storage::Cpu(s) => s.len(),
        };
        self.is_contiguous() && self.layout().offset() == 0 && len == self.numel()
    }

    /// A copy of the tensor on `device` (the tensor itself when it is already there); the copy
    /// is contiguous. CUDA devices hold f32, bf16, f16 and u32: moving an f64 tensor there is a
    /// `DeviceDType` error. Without a usable GPU, moving to `Device::Cuda` is an error naming
    /// what is missing (never a panic).
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        const OP: &str = "to_device";
        if device == self.device() {
            return Ok(self.clone());
        }
        if let Some(gpu) = Gpu::of(OP, &[self])? {
            // Device to host (then on to another device if asked).
            let x = gpu.packed(self)?;
            let host = cuda_any_dispatch!(OP, gpu.device, x.dtype(), T => {
                let data = gpu.check(gpu.dev.download(x.cuda_buffer::<T>()))?;
                Tensor::from_vec(data, x.shape())?
            });
            return host.to_device(device);
        }
        match device {
            Device::Cpu => Ok(self.clone()),
            Device::Cuda(ordinal) => {
                let x = self.contiguous();
                cuda_any_dispatch!(OP, device, self.dtype(), T => {
                    let dev = cuda_device(ordinal)?;
                    let buf = dev.upload(x.contiguous_slice::<T>()).on(OP, device)?;
                    Ok(Tensor::from_cuda(dev, T::wrap(buf), self.shape()))
                })
            }
        }
    }

    /// A tensor of `shape` on `device` filled with `value` (rounded to `dtype`).
    pub fn full_on(shape: &[usize], value: f64, dtype: DType, device: Device) -> Result<Tensor> {
        const OP: &str = "full_on";
        match device {
            Device::Cpu => Ok(Tensor::full(shape, value, dtype)),
            Device::Cuda(ordinal) => cuda_any_dispatch!(OP, device, dtype, T => {
                let dev = cuda_device(ordinal)?;
                let n = crate::layout::numel(shape);
                let buf = dev.full(n, <T as Element>::from_f64(value)).on(OP, device)?;
                Ok(Tensor::from_cuda(dev, T::wrap(buf), shape))
            }),
        }
    }

    /// A tensor of zeros on `device`.
    pub fn zeros_on(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        Self::full_on(shape, 0.0, dtype, device)
    }

    /// A tensor of ones on `device`.
    pub fn ones_on(shape: &[usize], dtype: DType, device: Device) -> Result<Tensor> {
        Self::full_on(shape, 1.0, dtype, device)
    }
}

#[cfg(test)]
mod tests {
    use super::{cpu_only, cuda_device, same_device, Gpu};
    use crate::{DType, Device, Tensor, TensorError};

    #[test]
    fn host_tensors_take_the_cpu_kernels() {
        let (a, b) = (Tensor::ones(&[2], DType::F32), Tensor::zeros(&[3], DType::U32));
        assert_eq!(same_device("t", &[&a, &b]).unwrap(), Device::Cpu);
        assert!(Gpu::of("t", &[&a, &b]).unwrap().is_none());
        assert!(cpu_only("t", &[&a], &[None, Some(&b)]).is_ok());
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        assert_eq!(a.to_device(Device::Cpu).unwrap().device(), Device::Cpu);
    }

    #[test]
    fn f64_is_never_moved_to_a_gpu() {
        // Refused before any device is opened, so the answer is the same with or without a GPU.
        let err = Tensor::ones(&[2], DType::F64)
            .to_device(Device::Cuda(0))
            .unwrap_err();
        assert!(matches!(err, TensorError::DeviceDType { .. }), "{err}");
        assert!(
            err.to_string().contains("f64") && err.to_string().contains("cuda:0"),
            "{err}"
        );
        assert!(Tensor::zeros_on(&[1], DType::F64, Device::Cuda(0)).is_err());
    }

    #[test]
    fn a_missing_gpu_is_a_typed_error_naming_the_device() {
        // Whatever this machine has, asking for a device no machine has is an error, not a panic.
        let far = Device::Cuda(1 << 20);
        let err = Tensor::ones(&[2], DType::F32).to_device(far).unwrap_err();
        assert!(matches!(err, TensorError::Cuda { .. }), "{err}");
        assert!(err.to_string().contains("cuda:1048576"), "{err}");
        assert!(Tensor::ones_on(&[2], DType::BF16, far).is_err());
        if let Err(e) = cuda_device(0) {
            let msg = e.to_string();
            assert!(
                msg.contains("cuda:0") && (msg.contains("libcuda") || msg.contains("no CUDA device")),
                "{msg}"
            );
        }
    }
}
