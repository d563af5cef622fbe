//! The emulated GPU: a CUDA device that runs the same kernel sources on the CPU, so that every
//! GPU test runs without a GPU.
//!
//! `EMMA_GPU=emulate` makes [`GpuDevice::open`](crate::GpuDevice::open) give an emulated device
//! instead of the driver's; tensors on it are `cuda:N` tensors and nothing above this crate can
//! tell the difference. Kernels are compiled by the host C++ compiler against `emulate.h`
//! ([`compile`]), launched through the same argument lists and grids as on a GPU
//! ([`kernels`]), with memory that is host memory ([`memory`]) and GEMMs computed on the CPU
//! with cuBLAS's exact calling convention ([`blas`]). The runtime checks every memory access
//! (bounds of the buffers passed, shared-memory races between barriers) and reports threads that
//! miss a barrier; see `cuda/README.md`.

pub(crate) mod blas;
pub(crate) mod compile;
pub(crate) mod kernels;
pub(crate) mod memory;
#[cfg(test)]
mod tests;

use crate::compile::{KernelCache, KernelFile};
use crate::error::{CudaError, Result};
use crate::launch::{Arg, Grid};
use compile::HostCompiler;
use kernels::{Module, Runtime};
use memory::LiveBuffers;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// How many emulated devices there are.
pub const DEVICE_COUNT: usize = 4;
/// Multiprocessors an emulated device reports (grid-stride launches size their grids by it).
pub const MULTIPROCESSORS: usize = 8;
/// Memory of an emulated device: 8 GiB of host memory at most.
pub const MEMORY_BYTES: usize = 8 << 30;

/// Whether `EMMA_GPU` asks for the emulator (`emulate`) rather than the driver (unset, empty or
/// `cuda`); any other value is an error naming it.
pub fn requested() -> Result<bool> {
    match std::env::var("EMMA_GPU") {
        Err(_) => Ok(false),
        Ok(v) => match v.trim() {
            "" | "cuda" => Ok(false),
            "emulate" => Ok(true),
            other => Err(CudaError::NoDevice(format!(
                "EMMA_GPU={other:?} is not one of: emulate, cuda"
            ))),
        },
    }
}

/// Whether the shared-memory race check runs (`EMMA_EMU_RACECHECK=0` turns it off).
fn race_check_enabled() -> bool {
    std::env::var("EMMA_EMU_RACECHECK").map_or(true, |v| v.trim() != "0")
}

/// The state of one emulated device.
pub(crate) struct Emulator {
    compiler: HostCompiler,
    dir: PathBuf,
    runtime: Arc<Runtime>,
    modules: Mutex<HashMap<&'static str, Arc<Module>>>,
    live: Arc<LiveBuffers>,
    race_check: bool,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("compiler", &self.compiler)
            .field("dir", &self.dir)
            .finish()
    }
}

impl Emulator {
    /// Finds the host compiler and loads (building it if needed) the runtime.
    pub fn new(cache: Option<&KernelCache>) -> Result<Self> {
        let compiler = HostCompiler::find()?;
        let dir = compile::cache_dir(cache);
        let runtime = kernels::runtime(&compiler, &dir)?;
        Ok(Emulator {
            compiler,
            dir,
            runtime,
            modules: Mutex::new(HashMap::new()),
            live: Arc::new(LiveBuffers::default()),
            race_check: race_check_enabled(),
        })
    }

    /// The device's name, naming the compiler.
    pub fn name(&self) -> String {
        format!("emma-rs emulated GPU ({})", self.compiler.version())
    }

    /// The registry of live buffers.
    pub fn live(&self) -> &Arc<LiveBuffers> {
        &self.live
    }

    /// `file`'s library, built and loaded on first use.
    fn module(&self, file: &KernelFile) -> Result<Arc<Module>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(file.name) {
            return Ok(m.clone());
        }
        let m = Arc::new(Module::load(&self.compiler, &self.dir, file)?);
        modules.insert(file.name, m.clone());
        Ok(m)
    }

    /// Runs kernel `name` of `file`.
    pub fn launch(&self, file: &KernelFile, name: &str, grid: Grid, args: &[Arg]) -> Result<()> {
        let module = self.module(file)?;
        kernels::launch(
            &self.runtime,
            &module,
            name,
            grid,
            args,
            &self.live,
            self.race_check,
        )
    }
}
