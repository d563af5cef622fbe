//! Loading the emulator's libraries and running a launch: the runtime (once per process, with
//! its symbols global so that kernel libraries bind to them), each kernel file's library, and
//! the launch itself, block by block on the host's threads.

use super::compile::{self, HostCompiler};
use super::memory::LiveBuffers;
use crate::compile::KernelFile;
use crate::error::{CudaError, Result};
use crate::launch::{Arg, Grid};
use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_LOCAL, RTLD_NOW};
use rayon::prelude::*;
use std::collections::HashMap;
use std::ffi::{c_char, c_void, CString};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Most threads in a block, as on every CUDA GPU.
const MAX_BLOCK_THREADS: u32 = 1024;
/// Most dynamic shared memory a launch gets without opting in to more (48 KiB).
const MAX_DYNAMIC_SHARED: u32 = 48 << 10;

/// A grid or block shape (`Dim` in runtime.cpp).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Dim {
    x: u32,
    y: u32,
    z: u32,
}

/// A buffer a kernel may touch (`Extent` in runtime.cpp).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Extent {
    lo: u64,
    len: u64,
    arg: i32,
    pad: i32,
}

type EntryFn = unsafe extern "C" fn(*mut *mut c_void);
type TouchFn = unsafe extern "C" fn() -> *mut c_void;
type RunBlockFn = unsafe extern "C" fn(*const LaunchDesc, u32, u32, u32, *mut c_char, u64) -> i32;

/// One launch (`Launch` in runtime.cpp).
#[repr(C)]
struct LaunchDesc {
    entry: EntryFn,
    params: *const *mut c_void,
    kernel: *const c_char,
    grid: Dim,
    block: Dim,
    dynamic_shared: u64,
    extents: *const Extent,
    n_extents: u64,
    race_check: i32,
    pad: i32,
    tls_touch: TouchFn,
}

/// The launch as the block runners share it.
struct SharedLaunch<'a>(&'a LaunchDesc);
// SAFETY: the description and everything it points to live until every block has run, and the
// runtime only reads them.
unsafe impl Sync for SharedLaunch<'_> {}

/// What a kernel library says of an entry point (`EmuKernelInfo` in emulate.h).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct KernelInfo {
    params: u32,
    launch_bound: u32,
    sizes: [u32; 32],
}

/// The runtime library.
pub(crate) struct Runtime {
    run_block: RunBlockFn,
    _lib: Library,
}

/// Loads (building it first if needed) the process's runtime library.
pub(crate) fn runtime(cc: &HostCompiler, dir: &Path) -> Result<Arc<Runtime>> {
    static RUNTIME: Mutex<Option<Arc<Runtime>>> = Mutex::new(None);
    let mut slot = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(rt) = slot.as_ref() {
        return Ok(rt.clone());
    }
    let path = compile::runtime_library(cc, dir)?;
    let lib = open(&path, RTLD_NOW | RTLD_GLOBAL)?;
    // SAFETY: the runtime defines both symbols with these signatures.
    let (abi, run_block) = unsafe {
        let abi = *lib
            .get::<unsafe extern "C" fn() -> u32>(b"emma_emu_abi\0")
            .map_err(|e| load_error(&path, e))?;
        let run = *lib
            .get::<RunBlockFn>(b"emma_emu_run_block\0")
            .map_err(|e| load_error(&path, e))?;
        (abi(), run)
    };
    let expected = (size_of::<LaunchDesc>() * 1000 + size_of::<Extent>()) as u32;
    if abi != expected {
        return Err(CudaError::Emulator {
            kernel: "(runtime)".into(),
            detail: format!("runtime layout {abi} does not match the Rust side's {expected}"),
        });
    }
    let rt = Arc::new(Runtime { run_block, _lib: lib });
    *slot = Some(rt.clone());
    Ok(rt)
}

fn open(path: &Path, flags: i32) -> Result<Library> {
    // SAFETY: the library is ours, built from the embedded sources; its initialisers only set
    // up C++ statics.
    unsafe { Library::open(Some(path), flags) }.map_err(|e| load_error(path, e))
}

fn load_error(path: &Path, e: libloading::Error) -> CudaError {
    CudaError::Emulator {
        kernel: path.display().to_string(),
        detail: format!("could not load: {e}"),
    }
}

/// One kernel entry point, resolved.
#[derive(Clone, Copy)]
struct Entry {
    entry: EntryFn,
    info: KernelInfo,
}

/// A kernel file's library.
pub(crate) struct Module {
    file: &'static str,
    tls_touch: TouchFn,
    entries: Mutex<HashMap<String, Entry>>,
    lib: Library,
}

impl Module {
    /// Builds (or finds in the cache) and loads `file`'s library.
    pub fn load(cc: &HostCompiler, dir: &Path, file: &KernelFile) -> Result<Self> {
        let path = compile::kernel_library(cc, dir, file)?;
        let lib = open(&path, RTLD_NOW | RTLD_LOCAL)?;
        // SAFETY: every kernel library defines `emu_tls_touch` (emulate.h) with this signature.
        let tls_touch = unsafe {
            *lib.get::<TouchFn>(b"emu_tls_touch\0")
                .map_err(|e| load_error(&path, e))?
        };
        Ok(Module {
            file: file.name,
            tls_touch,
            entries: Mutex::new(HashMap::new()),
            lib,
        })
    }

    /// The entry point `name`.
    fn entry(&self, name: &str) -> Result<Entry> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = entries.get(name) {
            return Ok(*e);
        }
        let missing = |_| CudaError::Emulator {
            kernel: name.into(),
            detail: format!("no such kernel in {}", self.file),
        };
        // SAFETY: `EMU_ENTRY` defines `emu_entry_<name>` as a function of this signature and
        // `emu_info_<name>` as a constant `EmuKernelInfo`, which outlives the library handle's
        // users (the module is never unloaded while in use).
        let e = unsafe {
            let entry = *self
                .lib
                .get::<EntryFn>(format!("emu_entry_{name}\0").as_bytes())
                .map_err(missing)?;
            let info = **self
                .lib
                .get::<*const KernelInfo>(format!("emu_info_{name}\0").as_bytes())
                .map_err(missing)?;
            Entry { entry, info }
        };
        entries.insert(name.to_string(), e);
        Ok(e)
    }
}

/// Runs kernel `name` of `module` over `grid` with `args`: checks the parameters against the
/// kernel's own (count and sizes), the block size against 1024 and `__launch_bounds__`, and
/// that every pointer argument lies in a live buffer, whose whole extent the kernel may then
/// touch; then runs the blocks, in parallel over the host's threads.
pub(crate) fn launch(
    rt: &Runtime,
    module: &Module,
    name: &str,
    grid: Grid,
    args: &[Arg],
    live: &LiveBuffers,
    race_check: bool,
) -> Result<()> {
    let fail = |detail: String| CudaError::Emulator {
        kernel: name.into(),
        detail,
    };
    let entry = module.entry(name)?;
    let info = entry.info;
    if info.params as usize != args.len() {
        return Err(fail(format!(
            "takes {} parameters, launched with {}",
            info.params,
            args.len()
        )));
    }
    for (i, arg) in args.iter().enumerate() {
        if info.sizes[i] as usize != arg.byte_size() {
            return Err(fail(format!(
                "parameter {i} is {} bytes, launched with a {}-byte {arg:?}",
                info.sizes[i],
                arg.byte_size()
            )));
        }
    }
    let threads = grid.threads.0 * grid.threads.1;
    if threads == 0 || threads > MAX_BLOCK_THREADS {
        return Err(fail(format!("{threads} threads per block (1 to 1024 allowed)")));
    }
    if info.launch_bound != 0 && threads > info.launch_bound {
        return Err(fail(format!(
            "{threads} threads per block exceed its __launch_bounds__ of {}",
            info.launch_bound
        )));
    }
    if grid.shared_bytes > MAX_DYNAMIC_SHARED {
        return Err(fail(format!(
            "{} bytes of dynamic shared memory exceed the 48 KiB a launch gets without opting in",
            grid.shared_bytes
        )));
    }
    let mut extents = Vec::new();
    for (i, arg) in args.iter().enumerate() {
        if let Arg::Ptr(p) = arg {
            if *p == 0 {
                continue;
            }
            let (lo, len) = live
                .containing(*p)
                .ok_or_else(|| fail(format!("pointer argument {i} ({p:#x}) is in no live buffer")))?;
            extents.push(Extent {
                lo,
                len: len as u64,
                arg: i as i32,
                pad: 0,
            });
        }
    }
    let params: Vec<*mut c_void> = args.iter().map(Arg::as_param).collect();
    let kernel = CString::new(name).map_err(|_| fail("the name holds a NUL byte".into()))?;
    let desc = LaunchDesc {
        entry: entry.entry,
        params: params.as_ptr(),
        kernel: kernel.as_ptr(),
        grid: Dim {
            x: grid.blocks,
            y: 1,
            z: 1,
        },
        block: Dim {
            x: grid.threads.0,
            y: grid.threads.1,
            z: 1,
        },
        dynamic_shared: u64::from(grid.shared_bytes),
        extents: extents.as_ptr(),
        n_extents: extents.len() as u64,
        race_check: i32::from(race_check),
        pad: 0,
        tls_touch: module.tls_touch,
    };
    let shared = SharedLaunch(&desc);
    let run = |b: u32| -> std::result::Result<(), String> {
        let shared = &shared;
        let mut err = [0u8; 1024];
        // SAFETY: the description is valid for the call (see SharedLaunch); `err` has the length
        // passed.
        let status = unsafe { (rt.run_block)(shared.0, b, 0, 0, err.as_mut_ptr().cast(), err.len() as u64) };
        if status == 0 {
            return Ok(());
        }
        let end = err.iter().position(|&c| c == 0).unwrap_or(err.len());
        Err(String::from_utf8_lossy(&err[..end]).into_owned())
    };
    (0..grid.blocks)
        .into_par_iter()
        .try_for_each(run)
        .map_err(|detail| CudaError::Emulator {
            kernel: format!("{name} ({})", module.file),
            detail,
        })
}
