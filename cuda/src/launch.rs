//! Kernel arguments, grid sizes and the launch itself.

use crate::compile::KernelFile;
use crate::device::{Backend, DeviceBuffer, DeviceElem, GpuDevice};
use crate::error::{DriverContext, Result};
use crate::layout::{BroadcastArg, StridedArg};
use cudarc::driver::result;
use std::ffi::c_void;

/// AdamW's coefficients as the kernel takes them (`AdamParams` in adamw.cu).
pub(crate) type AdamArg = crate::kernels::AdamCoefficients<f32>;

/// One kernel parameter, held by value until the launch.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Arg {
    /// A device address (0 for a null pointer).
    Ptr(u64),
    /// `u64` (sizes).
    U64(u64),
    /// `u32` (ids).
    U32(u32),
    /// `int` (op codes, flags).
    I32(i32),
    /// `float`.
    F32(f32),
    /// A `Strided` struct.
    Strided(StridedArg),
    /// A `Broadcast` struct.
    Broadcast(BroadcastArg),
    /// An `AdamParams` struct.
    Adam(AdamArg),
}

impl Arg {
    /// The address of a buffer's first element.
    pub fn buf<T: DeviceElem>(b: &DeviceBuffer<T>) -> Arg {
        Arg::Ptr(b.device_ptr())
    }

    /// A buffer's address, or null.
    pub fn opt<T: DeviceElem>(b: Option<&DeviceBuffer<T>>) -> Arg {
        Arg::Ptr(b.map_or(0, DeviceBuffer::device_ptr))
    }

    /// A size.
    pub fn size(n: usize) -> Arg {
        Arg::U64(n as u64)
    }

    /// A boolean flag as `int`.
    pub fn flag(b: bool) -> Arg {
        Arg::I32(i32::from(b))
    }

    /// The parameter's size in bytes, as the kernel declares it.
    pub fn byte_size(&self) -> usize {
        match self {
            Arg::Ptr(_) | Arg::U64(_) => 8,
            Arg::U32(_) | Arg::I32(_) | Arg::F32(_) => 4,
            Arg::Strided(_) => size_of::<StridedArg>(),
            Arg::Broadcast(_) => size_of::<BroadcastArg>(),
            Arg::Adam(_) => size_of::<AdamArg>(),
        }
    }

    /// The pointer the driver (or the emulator) reads the parameter from.
    pub(crate) fn as_param(&self) -> *mut c_void {
        match self {
            Arg::Ptr(v) | Arg::U64(v) => v as *const u64 as *mut c_void,
            Arg::U32(v) => v as *const u32 as *mut c_void,
            Arg::I32(v) => v as *const i32 as *mut c_void,
            Arg::F32(v) => v as *const f32 as *mut c_void,
            Arg::Strided(v) => v as *const StridedArg as *mut c_void,
            Arg::Broadcast(v) => v as *const BroadcastArg as *mut c_void,
            Arg::Adam(v) => v as *const AdamArg as *mut c_void,
        }
    }
}

/// Grid and block dimensions, and the bytes of dynamic shared memory per block
/// (`DYNAMIC_SHARED` in common.cuh).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Grid {
    pub blocks: u32,
    pub threads: (u32, u32),
    pub shared_bytes: u32,
}

/// Threads per block of elementwise kernels.
const ELEMENTWISE_THREADS: u32 = 256;
/// Resident blocks per multiprocessor that grid-stride kernels aim for.
const BLOCKS_PER_SM: usize = 32;
/// The most blocks any launch asks for (kernels loop over the rest).
const MAX_BLOCKS: usize = 1 << 30;

impl Grid {
    /// A grid-stride launch over `n` elements.
    pub fn elementwise(dev: &GpuDevice, n: usize) -> Grid {
        let cap = dev.info().multiprocessors * BLOCKS_PER_SM;
        let blocks = n.div_ceil(ELEMENTWISE_THREADS as usize).clamp(1, cap);
        Grid {
            blocks: blocks as u32,
            threads: (ELEMENTWISE_THREADS, 1),
            shared_bytes: 0,
        }
    }

    /// One block per row of `len` elements: a power of two of threads, from 32 up to 1024,
    /// about a quarter as many as the row has elements.
    pub fn rows(rows: usize, len: usize) -> Grid {
        Grid {
            blocks: rows.clamp(1, MAX_BLOCKS) as u32,
            threads: (row_threads(len), 1),
            shared_bytes: 0,
        }
    }

    /// `blocks` blocks of `threads` threads.
    pub fn blocks(blocks: usize, threads: u32) -> Grid {
        Grid {
            blocks: blocks.clamp(1, MAX_BLOCKS) as u32,
            threads: (threads, 1),
            shared_bytes: 0,
        }
    }

    /// The same grid with `bytes` of dynamic shared memory per block (no launcher asks for any
    /// yet; the emulator's tests do).
    #[cfg(test)]
    pub fn with_shared(self, bytes: u32) -> Grid {
        Grid {
            shared_bytes: bytes,
            ..self
        }
    }

    /// Column-tile reductions: blocks of 32 x 8 threads, one per tile of 32 columns.
    pub fn column_tiles(outer: usize, inner: usize) -> Grid {
        Grid {
            blocks: (outer * inner.div_ceil(32)).clamp(1, MAX_BLOCKS) as u32,
            threads: (32, 8),
            shared_bytes: 0,
        }
    }
}

/// Threads for a block that walks a row of `len` elements.
pub(crate) fn row_threads(len: usize) -> u32 {
    len.div_ceil(4).next_power_of_two().clamp(32, 1024) as u32
}

/// Launches kernel `name` of `file` on the device's stream (on the emulator: runs it).
pub(crate) fn launch(dev: &GpuDevice, file: &KernelFile, name: &str, grid: Grid, args: &[Arg]) -> Result<()> {
    let stream = match dev.backend() {
        Backend::Emulated(emu) => return emu.launch(file, name, grid, args),
        Backend::Driver(_) => dev.driver_stream()?,
    };
    let f = dev.function(file, name)?;
    let mut params: Vec<*mut c_void> = args.iter().map(Arg::as_param).collect();
    dev.bind()?;
    // SAFETY: `params` point into `args`, which outlives the call (the driver copies parameter
    // values at launch); the launchers check every buffer's length against the shapes the
    // kernel is given, and all work is ordered on the device's one stream.
    unsafe {
        result::launch_kernel(
            f.cu_function(),
            (grid.blocks, 1, 1),
            (grid.threads.0, grid.threads.1, 1),
            grid.shared_bytes,
            stream.cu_stream(),
            &mut params,
        )
    }
    .during(format!("launching {name} ({})", file.name))
}

/// The entry point `{base}_{suffix of T}`.
pub(crate) fn entry<T: DeviceElem>(base: &str) -> String {
    format!("{base}_{}", T::DTYPE.suffix())
}

#[cfg(test)]
mod tests {
    use super::row_threads;

    #[test]
    fn row_blocks_are_warp_multiples() {
        assert_eq!(row_threads(1), 32);
        assert_eq!(row_threads(128), 32);
        assert_eq!(row_threads(1000), 256);
        assert_eq!(row_threads(50_257), 1024);
        for len in 0..5000 {
            let t = row_threads(len);
            assert!(t.is_multiple_of(32) && (32..=1024).contains(&t));
        }
    }
}
