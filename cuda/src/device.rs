//! A CUDA device: its context and stream, typed device buffers from the caching allocator,
//! host <-> device copies, timing events, and the per-device cache of loaded kernels.

use crate::allocator::{AllocFailure, Block, CachingPool, MemoryStats, RawMemory};
use crate::compile::{self, KernelCache, KernelFile};
use crate::emulator::memory::{self as emulated, HostMemory, LiveBuffers};
use crate::emulator::{self, Emulator};
use crate::error::{CudaError, DriverContext, Result};
use crate::probe::{self, Library};
use cudarc::driver::{
    result, sys, CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, DriverError,
};
use half::{bf16, f16};
use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// The element types device buffers hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// bfloat16.
    BF16,
    /// IEEE half.
    F16,
    /// 32-bit unsigned integer (ids, masks).
    U32,
}

impl DType {
    /// The suffix kernel entry points carry for this type (`unary_bf16`).
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::U32 => "u32",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The suffix of width-generic kernels (`b16` or `b32`).
    pub fn width_suffix(self) -> &'static str {
        if self.size() == 2 {
            "b16"
        } else {
            "b32"
        }
    }
}

mod sealed {
    /// Only this crate's element types.
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
    impl Sealed for u32 {}
}

/// An element type of device buffers.
pub trait DeviceElem: sealed::Sealed + Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// The matching [`DType`].
    const DTYPE: DType;
    /// The element's bits, zero-extended (for fills).
    fn bits(self) -> u32;
}

/// A floating-point element type (f32, bf16, f16): what arithmetic kernels take.
pub trait FloatElem: DeviceElem {}

impl DeviceElem for f32 {
    const DTYPE: DType = DType::F32;
    fn bits(self) -> u32 {
        self.to_bits()
    }
}
impl DeviceElem for bf16 {
    const DTYPE: DType = DType::BF16;
    fn bits(self) -> u32 {
        u32::from(self.to_bits())
    }
}
impl DeviceElem for f16 {
    const DTYPE: DType = DType::F16;
    fn bits(self) -> u32 {
        u32::from(self.to_bits())
    }
}
impl DeviceElem for u32 {
    const DTYPE: DType = DType::U32;
    fn bits(self) -> u32 {
        self
    }
}
impl FloatElem for f32 {}
impl FloatElem for bf16 {}
impl FloatElem for f16 {}

/// Device memory through the driver: `cuMemAlloc` / `cuMemFree`.
#[derive(Debug)]
pub struct DriverMemory {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
}

impl RawMemory for DriverMemory {
    fn allocate(&mut self, bytes: usize) -> std::result::Result<u64, AllocFailure> {
        self.ctx
            .bind_to_thread()
            .during("binding the context")
            .map_err(AllocFailure::Other)?;
        // SAFETY: the context is current; the memory is uninitialised, which buffers document.
        match unsafe { result::malloc_sync(bytes) } {
            Ok(ptr) => Ok(ptr),
            Err(DriverError(sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => Err(AllocFailure::OutOfMemory),
            Err(source) => Err(AllocFailure::Other(CudaError::Driver {
                op: format!("allocating {bytes} bytes"),
                source,
            })),
        }
    }

    fn free(&mut self, ptr: u64, bytes: usize) -> Result<()> {
        self.ctx.bind_to_thread().during("binding the context")?;
        // SAFETY: `ptr` came from `allocate` and the pool frees it once, after synchronising.
        unsafe { result::free_sync(ptr) }.during(format!("freeing {bytes} bytes"))
    }

    fn synchronize(&mut self) -> Result<()> {
        self.stream.synchronize().during("synchronising the stream")
    }
}

/// The memory a device's pool draws from: the driver's, or the emulator's host memory.
#[derive(Debug)]
pub enum Memory {
    /// A real device.
    Driver(DriverMemory),
    /// The emulated device.
    Host(HostMemory),
}

impl RawMemory for Memory {
    fn allocate(&mut self, bytes: usize) -> std::result::Result<u64, AllocFailure> {
        match self {
            Memory::Driver(m) => m.allocate(bytes),
            Memory::Host(m) => m.allocate(bytes),
        }
    }

    fn free(&mut self, ptr: u64, bytes: usize) -> Result<()> {
        match self {
            Memory::Driver(m) => m.free(ptr, bytes),
            Memory::Host(m) => m.free(ptr, bytes),
        }
    }

    fn synchronize(&mut self) -> Result<()> {
        match self {
            Memory::Driver(m) => m.synchronize(),
            Memory::Host(m) => m.synchronize(),
        }
    }
}

type Pool = Arc<Mutex<CachingPool<Memory>>>;

/// Locks the pool, recovering it if a panic poisoned the lock (its counters stay consistent:
/// every mutation completes before it can panic).
fn lock(pool: &Pool) -> MutexGuard<'_, CachingPool<Memory>> {
    pool.lock().unwrap_or_else(|e| e.into_inner())
}

/// A typed buffer of device memory from a device's caching allocator; its block goes back to
/// the cache when it is dropped. Fresh buffers are uninitialised (on the emulator: poisoned
/// with NaN patterns).
pub struct DeviceBuffer<T: DeviceElem> {
    block: Block,
    len: usize,
    pool: Pool,
    /// The emulator's registry of live buffers (kernels may touch only these).
    live: Option<Arc<LiveBuffers>>,
    _elem: PhantomData<T>,
}

impl<T: DeviceElem> DeviceBuffer<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address of element 0 (0 for an empty buffer).
    pub fn device_ptr(&self) -> u64 {
        self.block.ptr
    }

    /// The device address of element `offset` (which must be within the buffer).
    pub(crate) fn ptr_at(&self, offset: usize) -> u64 {
        self.block.ptr + (offset * T::DTYPE.size()) as u64
    }

    /// Bytes of the elements (not of the block).
    pub fn byte_len(&self) -> usize {
        self.len * T::DTYPE.size()
    }
}

impl<T: DeviceElem> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if let Some(live) = &self.live {
            live.remove(self.block.ptr);
        }
        lock(&self.pool).release(self.block);
    }
}

impl<T: DeviceElem> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceBuffer<{:?}>[{}] @ {:#x}",
            T::DTYPE,
            self.len,
            self.block.ptr
        )
    }
}

/// Static facts about a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The device ordinal.
    pub ordinal: usize,
    /// The product name, e.g. `NVIDIA H100 80GB HBM3`.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Total device memory in bytes.
    pub total_memory: usize,
    /// Number of streaming multiprocessors.
    pub multiprocessors: usize,
}

impl DeviceInfo {
    /// The architecture kernels are compiled for, e.g. `sm_90`.
    pub fn arch(&self) -> String {
        compile::arch_for(self.compute_capability.0, self.compute_capability.1)
    }
}

/// A real device's driver state.
pub(crate) struct Driver {
    // First, so that the cuBLAS handles go while everything they use is alive.
    blas: Mutex<Option<crate::gemm::Blas>>,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
}

/// What runs a device's work.
pub(crate) enum Backend {
    /// The CUDA driver.
    Driver(Driver),
    /// The emulator.
    Emulated(Emulator),
}

struct Inner {
    backend: Backend,
    info: DeviceInfo,
    pool: Pool,
    kernel_cache: Option<KernelCache>,
}

/// An open CUDA device with one stream; cheap to clone (clones share everything). All work of
/// this crate is queued on that stream, in order.
#[derive(Clone)]
pub struct GpuDevice {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for GpuDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuDevice")
            .field("info", &self.inner.info)
            .finish()
    }
}

/// Initialises the driver after probing for it.
fn init_driver() -> Result<()> {
    probe::find(Library::Driver)?;
    match result::init() {
        Ok(()) => Ok(()),
        Err(DriverError(sys::CUresult::CUDA_ERROR_NO_DEVICE)) => Err(CudaError::NoDevice(
            "the driver reports no CUDA-capable device".into(),
        )),
        Err(source) => Err(CudaError::Driver {
            op: "cuInit".into(),
            source,
        }),
    }
}

impl GpuDevice {
    /// The number of CUDA devices (emulated ones with `EMMA_GPU=emulate`); errors (never
    /// panics) when there is no driver.
    pub fn count() -> Result<usize> {
        if emulator::requested()? {
            return Ok(emulator::DEVICE_COUNT);
        }
        init_driver()?;
        let n = CudaContext::device_count().during("counting devices")?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    /// Opens device `ordinal` after probing for the driver; errors with
    /// [`CudaError::NoDriver`] or [`CudaError::NoDevice`] when there is none. With
    /// `EMMA_GPU=emulate` the device is the emulator's (see [`emulator`](crate::emulator)).
    /// Kernels are cached on disk in [`KernelCache::from_env`].
    pub fn open(ordinal: usize) -> Result<Self> {
        let count = Self::count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice(format!(
                "device {ordinal} requested, {count} present"
            )));
        }
        if emulator::requested()? {
            return Self::open_emulated(ordinal);
        }
        let ctx = CudaContext::new(ordinal).during(format!("opening device {ordinal}"))?;
        let stream = ctx.new_stream().during("creating a stream")?;
        let attr = |a| ctx.attribute(a).during("reading a device attribute");
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().during("reading the device name")?,
            compute_capability: ctx
                .compute_capability()
                .during("reading the compute capability")?,
            total_memory: ctx.total_mem().during("reading the memory size")?,
            multiprocessors: attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1)
                as usize,
        };
        let memory = DriverMemory {
            ctx: ctx.clone(),
            stream: stream.clone(),
        };
        Ok(GpuDevice {
            inner: Arc::new(Inner {
                backend: Backend::Driver(Driver {
                    blas: Mutex::new(None),
                    ctx,
                    stream,
                    modules: Mutex::new(HashMap::new()),
                    functions: Mutex::new(HashMap::new()),
                }),
                info,
                pool: Arc::new(Mutex::new(CachingPool::new(Memory::Driver(memory)))),
                kernel_cache: KernelCache::from_env(),
            }),
        })
    }

    /// Opens emulated device `ordinal`: an H100-class compute capability (9.0), with
    /// [`emulator::MULTIPROCESSORS`] multiprocessors and [`emulator::MEMORY_BYTES`] of host
    /// memory.
    pub(crate) fn open_emulated(ordinal: usize) -> Result<Self> {
        let kernel_cache = KernelCache::from_env();
        let emu = Emulator::new(kernel_cache.as_ref())?;
        let info = DeviceInfo {
            ordinal,
            name: emu.name(),
            compute_capability: (9, 0),
            total_memory: emulator::MEMORY_BYTES,
            multiprocessors: emulator::MULTIPROCESSORS,
        };
        Ok(GpuDevice {
            inner: Arc::new(Inner {
                backend: Backend::Emulated(emu),
                info,
                pool: Arc::new(Mutex::new(CachingPool::new(Memory::Host(HostMemory::new(
                    emulator::MEMORY_BYTES,
                ))))),
                kernel_cache,
            }),
        })
    }

    /// Whether this is an emulated device.
    pub fn is_emulated(&self) -> bool {
        matches!(self.inner.backend, Backend::Emulated(_))
    }

    /// What runs the device's work.
    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// The driver state; an error on the emulator (for driver-only calls).
    pub(crate) fn driver(&self) -> Result<&Driver> {
        match &self.inner.backend {
            Backend::Driver(d) => Ok(d),
            Backend::Emulated(_) => Err(CudaError::NoDevice(
                "this call needs the CUDA driver, and the device is emulated".into(),
            )),
        }
    }

    /// The emulator's registry of live buffers, on an emulated device.
    pub(crate) fn live_buffers(&self) -> Option<&Arc<LiveBuffers>> {
        match &self.inner.backend {
            Backend::Emulated(e) => Some(e.live()),
            Backend::Driver(_) => None,
        }
    }

    /// Static facts about the device.
    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    /// Makes the device's context current on this thread (before raw driver calls).
    pub(crate) fn bind(&self) -> Result<()> {
        match &self.inner.backend {
            Backend::Driver(d) => d.ctx.bind_to_thread().during("binding the context"),
            Backend::Emulated(_) => Ok(()),
        }
    }

    /// Waits for all queued work (the emulator runs everything as it is queued).
    pub fn synchronize(&self) -> Result<()> {
        match &self.inner.backend {
            Backend::Driver(d) => d.stream.synchronize().during("synchronising the stream"),
            Backend::Emulated(_) => Ok(()),
        }
    }

    /// The allocator's counters.
    pub fn memory_stats(&self) -> MemoryStats {
        lock(&self.inner.pool).stats()
    }

    /// Restarts the allocator's peak from the current use.
    pub fn reset_peak_memory(&self) {
        lock(&self.inner.pool).reset_peak();
    }

    /// Returns every cached free block to the driver.
    pub fn empty_cache(&self) -> Result<()> {
        lock(&self.inner.pool).empty_cache()
    }

    /// An uninitialised buffer of `len` elements.
    pub fn alloc<T: DeviceElem>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        let bytes = len
            .checked_mul(T::DTYPE.size())
            .ok_or_else(|| CudaError::shape("alloc", format!("{len} elements of {:?} overflow", T::DTYPE)))?;
        let block = lock(&self.inner.pool).allocate(bytes)?;
        let live = self.live_buffers().cloned();
        if let Some(live) = &live {
            // SAFETY: the block holds at least `bytes` bytes of host memory.
            unsafe { emulated::poison(block.ptr, bytes) };
            live.insert(block.ptr, bytes);
        }
        Ok(DeviceBuffer {
            block,
            len,
            pool: self.inner.pool.clone(),
            live,
            _elem: PhantomData,
        })
    }

    /// Errors unless `buf` came from this device.
    pub(crate) fn check_owner<T: DeviceElem>(&self, op: &'static str, buf: &DeviceBuffer<T>) -> Result<()> {
        if Arc::ptr_eq(&buf.pool, &self.inner.pool) {
            Ok(())
        } else {
            Err(CudaError::shape(op, "a buffer belongs to another device"))
        }
    }

    /// A buffer of `len` elements, each `value`.
    pub fn full<T: DeviceElem>(&self, len: usize, value: T) -> Result<DeviceBuffer<T>> {
        let mut buf = self.alloc(len)?;
        self.fill(&mut buf, value)?;
        Ok(buf)
    }

    /// A buffer of `len` zeros (all bits zero, which is 0 in every dtype).
    pub fn zeros<T: DeviceElem>(&self, len: usize) -> Result<DeviceBuffer<T>> {
        self.full(len, T::default())
    }

    /// Sets every element of `buf` to `value` (a memset, queued on the stream).
    pub fn fill<T: DeviceElem>(&self, buf: &mut DeviceBuffer<T>, value: T) -> Result<()> {
        self.check_owner("fill", buf)?;
        if buf.is_empty() {
            return Ok(());
        }
        let Backend::Driver(driver) = &self.inner.backend else {
            // SAFETY: the buffer holds `len` elements of host memory.
            let host = unsafe { std::slice::from_raw_parts_mut(buf.device_ptr() as *mut T, buf.len()) };
            host.fill(value);
            return Ok(());
        };
        self.bind()?;
        let (ptr, n, stream) = (buf.device_ptr(), buf.len(), driver.stream.cu_stream());
        // SAFETY: `ptr` addresses `n` elements of this device; the memset is stream-ordered.
        let status = unsafe {
            if T::DTYPE.size() == 2 {
                sys::cuMemsetD16Async(ptr, value.bits() as u16, n, stream)
            } else {
                sys::cuMemsetD32Async(ptr, value.bits(), n, stream)
            }
        };
        status.result().during("filling a buffer")
    }

    /// A new buffer holding `host`.
    pub fn upload<T: DeviceElem>(&self, host: &[T]) -> Result<DeviceBuffer<T>> {
        let mut buf = self.alloc(host.len())?;
        self.copy_from_host(host, &mut buf)?;
        Ok(buf)
    }

    /// Copies `host` into `dst` (same length). The host slice may be reused at once.
    pub fn copy_from_host<T: DeviceElem>(&self, host: &[T], dst: &mut DeviceBuffer<T>) -> Result<()> {
        self.check_owner("copy_from_host", dst)?;
        check_len("copy_from_host", host.len(), dst.len())?;
        if host.is_empty() {
            return Ok(());
        }
        let Backend::Driver(driver) = &self.inner.backend else {
            // SAFETY: `dst` holds host.len() elements of host memory, disjoint from `host`.
            unsafe { std::ptr::copy_nonoverlapping(host.as_ptr(), dst.device_ptr() as *mut T, host.len()) };
            return Ok(());
        };
        self.bind()?;
        // SAFETY: `dst` holds host.len() elements; a copy from pageable memory is staged before
        // the call returns, so `host` need not outlive it.
        unsafe { result::memcpy_htod_async(dst.device_ptr(), host, driver.stream.cu_stream()) }
            .during("copying host to device")
    }

    /// Copies `src` into `host` (same length), waiting for the copy to finish.
    pub fn copy_to_host<T: DeviceElem>(&self, src: &DeviceBuffer<T>, host: &mut [T]) -> Result<()> {
        self.check_owner("copy_to_host", src)?;
        check_len("copy_to_host", src.len(), host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        let Backend::Driver(driver) = &self.inner.backend else {
            // SAFETY: `src` holds host.len() elements of host memory, disjoint from `host`.
            unsafe {
                std::ptr::copy_nonoverlapping(src.device_ptr() as *const T, host.as_mut_ptr(), host.len())
            };
            return Ok(());
        };
        self.bind()?;
        // SAFETY: `src` holds host.len() elements; the stream is synchronised before `host`
        // is used again.
        unsafe { result::memcpy_dtoh_async(host, src.device_ptr(), driver.stream.cu_stream()) }
            .during("copying device to host")?;
        self.synchronize()
    }

    /// The contents of `src` on the host (waits for queued work).
    pub fn download<T: DeviceElem>(&self, src: &DeviceBuffer<T>) -> Result<Vec<T>> {
        let mut host = vec![T::default(); src.len()];
        self.copy_to_host(src, &mut host)?;
        Ok(host)
    }

    /// Copies `src` into `dst` (same length) on the device.
    pub fn copy<T: DeviceElem>(&self, src: &DeviceBuffer<T>, dst: &mut DeviceBuffer<T>) -> Result<()> {
        self.check_owner("copy", src)?;
        self.check_owner("copy", dst)?;
        check_len("copy", src.len(), dst.len())?;
        if src.is_empty() {
            return Ok(());
        }
        let Backend::Driver(driver) = &self.inner.backend else {
            // SAFETY: both buffers hold src.byte_len() bytes of host memory; two live buffers
            // never overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.device_ptr() as *const u8,
                    dst.device_ptr() as *mut u8,
                    src.byte_len(),
                )
            };
            return Ok(());
        };
        self.bind()?;
        // SAFETY: both buffers hold src.byte_len() bytes on this device.
        unsafe {
            result::memcpy_dtod_async(
                dst.device_ptr(),
                src.device_ptr(),
                src.byte_len(),
                driver.stream.cu_stream(),
            )
        }
        .during("copying device to device")
    }

    /// A new timing event (wall-clock time on the emulator).
    pub fn event(&self) -> Result<GpuEvent> {
        let mark = match &self.inner.backend {
            Backend::Driver(d) => EventMark::Driver(
                d.ctx
                    .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                    .during("creating an event")?,
            ),
            Backend::Emulated(_) => EventMark::Wall(Mutex::new(None)),
        };
        Ok(GpuEvent {
            mark,
            device: self.clone(),
        })
    }

    /// The kernel `name` of `file`, compiled (or read from the disk cache) and loaded on first
    /// use.
    pub(crate) fn function(&self, file: &KernelFile, name: &str) -> Result<CudaFunction> {
        let driver = self.driver()?;
        let key = format!("{}:{name}", file.name);
        if let Some(f) = driver
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(f.clone());
        }
        let module = self.module(driver, file)?;
        let f = module
            .load_function(name)
            .during(format!("loading kernel {name} from {}", file.name))?;
        driver
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, f.clone());
        Ok(f)
    }

    /// The loaded module of `file`.
    fn module(&self, driver: &Driver, file: &KernelFile) -> Result<Arc<CudaModule>> {
        let mut modules = driver.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(file.name) {
            return Ok(m.clone());
        }
        let image = compile::compile_cached(file, &self.inner.info.arch(), self.inner.kernel_cache.as_ref())?;
        let module = driver
            .ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(image))
            .during(format!("loading module {}", file.name))?;
        modules.insert(file.name, module.clone());
        Ok(module)
    }

    /// The driver's stream, for cuBLAS.
    pub(crate) fn driver_stream(&self) -> Result<&Arc<CudaStream>> {
        Ok(&self.driver()?.stream)
    }

    /// Locks the device's cuBLAS state.
    pub(crate) fn blas(&self) -> Result<MutexGuard<'_, Option<crate::gemm::Blas>>> {
        Ok(self.driver()?.blas.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// Errors unless two lengths agree.
pub(crate) fn check_len(op: &'static str, a: usize, b: usize) -> Result<()> {
    if a == b {
        Ok(())
    } else {
        Err(CudaError::shape(op, format!("lengths differ: {a} vs {b}")))
    }
}

/// What an event holds: a driver event, or the wall-clock time it was recorded at.
enum EventMark {
    Driver(CudaEvent),
    Wall(Mutex<Option<Instant>>),
}

/// A point in a device's stream, for timing.
pub struct GpuEvent {
    mark: EventMark,
    device: GpuDevice,
}

impl GpuEvent {
    /// Marks the current end of the device's queued work.
    pub fn record(&self) -> Result<()> {
        match &self.mark {
            EventMark::Driver(e) => e
                .record(self.device.driver_stream()?)
                .during("recording an event"),
            EventMark::Wall(t) => {
                *t.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                Ok(())
            }
        }
    }

    /// Milliseconds from this event to `end` (both recorded; waits for `end`).
    pub fn elapsed_ms(&self, end: &GpuEvent) -> Result<f32> {
        match (&self.mark, &end.mark) {
            (EventMark::Driver(a), EventMark::Driver(b)) => a.elapsed_ms(b).during("timing events"),
            (EventMark::Wall(a), EventMark::Wall(b)) => {
                let get = |t: &Mutex<Option<Instant>>| *t.lock().unwrap_or_else(|e| e.into_inner());
                match (get(a), get(b)) {
                    (Some(a), Some(b)) => Ok(b.saturating_duration_since(a).as_secs_f32() * 1e3),
                    _ => Err(CudaError::shape("elapsed_ms", "an event was never recorded")),
                }
            }
            _ => Err(CudaError::shape(
                "elapsed_ms",
                "the events belong to different devices",
            )),
        }
    }

    /// Waits until the work before the event is done.
    pub fn synchronize(&self) -> Result<()> {
        match &self.mark {
            EventMark::Driver(e) => e.synchronize().during("waiting for an event"),
            EventMark::Wall(_) => Ok(()),
        }
    }
}
