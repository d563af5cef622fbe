//! The crate's error type.

use std::path::PathBuf;

/// The library names a probe tried, for a one-line message: all of up to four, else the
/// count with the first and the last.
fn summary(tried: &[String]) -> String {
    match tried {
        [first, .., last] if tried.len() > 4 => format!("{} names, {first} ... {last}", tried.len()),
        _ => tried.join(", "),
    }
}

/// Everything that can go wrong between the host and a CUDA device.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// The CUDA driver library (libcuda) could not be loaded.
    #[error(
        "no CUDA driver found: could not load libcuda (tried {}; LD_LIBRARY_PATH={ld_path:?}): {reason}",
        summary(tried)
    )]
    NoDriver {
        /// The library names given to the dynamic loader, in order.
        tried: Vec<String>,
        /// `LD_LIBRARY_PATH` at the time of the probe.
        ld_path: String,
        /// The loader's message for the last name tried.
        reason: String,
    },
    /// A CUDA library other than the driver (NVRTC, cuBLAS, cuBLASLt) could not be loaded.
    #[error(
        "CUDA library {library} not found (tried {}; LD_LIBRARY_PATH={ld_path:?}): {reason}",
        summary(tried)
    )]
    LibraryMissing {
        /// The library, e.g. `libnvrtc`.
        library: &'static str,
        /// The library names given to the dynamic loader, in order.
        tried: Vec<String>,
        /// `LD_LIBRARY_PATH` at the time of the probe.
        ld_path: String,
        /// The loader's message for the last name tried.
        reason: String,
    },
    /// The driver loaded but there is no usable device (or not the one asked for).
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// NVRTC rejected a kernel source.
    #[error("kernel {file} failed to compile for {arch} ({status}):\n{log}")]
    Compile {
        /// The kernel file, e.g. `unary.cu`.
        file: String,
        /// The target, e.g. `sm_90`.
        arch: String,
        /// NVRTC's status code.
        status: String,
        /// NVRTC's program log.
        log: String,
    },
    /// A driver call (launch, copy, module load, ...) failed.
    #[error("CUDA driver error in {op}: {source}")]
    Driver {
        /// What was being done.
        op: String,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS error in {op}: {source}")]
    Cublas {
        /// What was being done.
        op: &'static str,
        /// The library's status.
        #[source]
        source: cudarc::cublas::result::CublasError,
    },
    /// A cuBLASLt call failed.
    #[error("cuBLASLt error in {op}: {source}")]
    CublasLt {
        /// What was being done.
        op: &'static str,
        /// The library's status.
        #[source]
        source: cudarc::cublaslt::result::CublasError,
    },
    /// An NCCL call failed.
    #[error("NCCL error in {op}: {status:?}")]
    Nccl {
        /// What was being done.
        op: &'static str,
        /// The library's status.
        status: cudarc::nccl::result::NcclError,
    },
    /// An NCCL call on a communicator that was aborted.
    #[error("{op}: the NCCL communicator was aborted")]
    NcclAborted {
        /// The call.
        op: &'static str,
    },
    /// The device could not satisfy an allocation, even after the cache was emptied.
    #[error("out of device memory: requested {requested} bytes with {in_use} bytes in use")]
    OutOfMemory {
        /// Bytes asked for (rounded to the allocator's size class).
        requested: usize,
        /// Bytes held by live buffers at the time.
        in_use: usize,
    },
    /// Buffer lengths or shapes that do not fit the operation.
    #[error("{op}: {detail}")]
    Shape {
        /// The operation.
        op: &'static str,
        /// What did not fit.
        detail: String,
    },
    /// No host C++ compiler for the emulated GPU.
    #[error(
        "no C++ compiler for the emulated GPU (EMMA_GPU=emulate): tried {}; install g++ or set CXX",
        tried.join(", ")
    )]
    NoHostCompiler {
        /// Each compiler tried, with why it failed.
        tried: Vec<String>,
    },
    /// The emulated GPU found a fault in a kernel or a library call (an out-of-bounds access, a
    /// shared-memory race, a thread missing a barrier, parameters that do not match), or could
    /// not load its libraries.
    #[error("emulated kernel {kernel}: {detail}")]
    Emulator {
        /// The kernel (and its file) or library call.
        kernel: String,
        /// What went wrong, with the block and threads involved.
        detail: String,
    },
    /// An index (token id, class target, ...) out of range, found on the device.
    #[error("{op}: {what} {value} at position {position} is not below {bound}")]
    Index {
        /// The operation.
        op: &'static str,
        /// What the value is (`id`, `target`).
        what: &'static str,
        /// The offending value.
        value: u64,
        /// Its position in the index buffer.
        position: u64,
        /// The exclusive upper bound.
        bound: u64,
    },
}

/// `Result` with [`CudaError`].
pub type Result<T, E = CudaError> = std::result::Result<T, E>;

impl CudaError {
    /// A [`CudaError::Shape`] for `op`.
    pub(crate) fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        CudaError::Shape {
            op,
            detail: detail.into(),
        }
    }
}

/// Maps a driver result to [`CudaError::Driver`] naming `op`.
pub(crate) trait DriverContext<T> {
    /// Attaches the operation's name.
    fn during(self, op: impl Into<String>) -> Result<T>;
}

impl<T> DriverContext<T> for std::result::Result<T, cudarc::driver::DriverError> {
    fn during(self, op: impl Into<String>) -> Result<T> {
        self.map_err(|source| CudaError::Driver {
            op: op.into(),
            source,
        })
    }
}

/// A kernel cache directory that could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("kernel cache {path}: {source}")]
pub struct CacheError {
    /// The file or directory at fault.
    pub path: PathBuf,
    /// The I/O error.
    #[source]
    pub source: std::io::Error,
}
