//! Kernel sources and their compilation by NVRTC.
//!
//! Every `.cu` file in `cuda/kernels/` is embedded with `include_str!` and compiled on first use
//! to a CUBIN for one architecture (`sm_90` on Hopper; the device's own at run time). The shared
//! header `common.cuh` is handed to NVRTC as an in-memory header, so kernels need no CUDA toolkit
//! headers at all: bf16/f16 conversions are written with PTX `cvt` instructions in that header.
//!
//! Compiled images are cached on disk, keyed by a hash of the header, the source, the
//! architecture, the NVRTC version and the compile options; a cache write goes to a temporary
//! file that is synced and renamed into place, so a reader never sees a partial image.

use crate::error::{CacheError, CudaError, Result};
use crate::probe::{self, Library};
use cudarc::nvrtc::sys;
use std::ffi::{c_char, CStr, CString};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One embedded kernel source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFile {
    /// The file name inside `cuda/kernels/`, e.g. `unary.cu`.
    pub name: &'static str,
    /// The file's text.
    pub source: &'static str,
}

/// The header every kernel includes as `#include "common.cuh"`.
pub const COMMON_HEADER: KernelFile = KernelFile {
    name: "common.cuh",
    source: include_str!("../kernels/common.cuh"),
};

macro_rules! kernel_files {
    ($($konst:ident => $file:literal: $doc:literal),* $(,)?) => {
        $(
            #[doc = $doc]
            pub const $konst: KernelFile = KernelFile {
                name: $file,
                source: include_str!(concat!("../kernels/", $file)),
            };
        )*
        /// Every kernel source file (the header excluded), in a fixed order.
        pub const ALL_KERNELS: &[KernelFile] = &[$($konst),*];
    };
}

kernel_files! {
    UNARY => "unary.cu": "Elementwise unary ops and their derivatives.",
    BINARY => "binary.cu": "Broadcasting binary ops, comparisons and `where`.",
    CAST => "cast.cu": "Dtype conversions and strided copies.",
    REDUCE => "reduce.cu": "Sum, mean, max, min and argmax over an axis.",
    SOFTMAX => "softmax.cu": "Row-wise softmax and log-softmax, forward and backward.",
    CROSS_ENTROPY => "cross_entropy.cu": "Fused cross-entropy with an ignore index, forward and backward.",
    NORM => "norm.cu": "RMSNorm and LayerNorm (with a fused residual add), forward and backward.",
    GATED_NORM => "gated_norm.cu": "Mamba-2's gated, grouped RMSNorm, forward and backward.",
    INDEX => "index.cu": "Gathers (embedding, index-select), scatter-add and concatenation.",
    CONV1D => "conv1d.cu": "Causal depthwise conv1d, forward, backward and the decoding step.",
    ADAMW => "adamw.cu": "The fused AdamW step.",
    SELECTIVE_SCAN => "selective_scan.cu": "Mamba-1 fused selective scan, forward, backward and the decoding step.",
    SSD => "ssd.cu": "Mamba-2 SSD chunk scan, forward, backward and the decoding step.",
    ATTENTION => "attention.cu": "Fused scaled dot-product attention (FlashAttention-2's schedule).",
}

/// The architecture name NVRTC takes for compute capability `(major, minor)`, e.g. `sm_90`.
pub fn arch_for(major: i32, minor: i32) -> String {
    format!("sm_{major}{minor}")
}

/// Options passed to NVRTC for `arch`. Fast math stays off: the kernels must compute the same
/// functions as the CPU reference.
pub fn options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "-std=c++17".into(),
        "--generate-line-info".into(),
    ]
}

/// The NVRTC version as (major, minor); errors if libnvrtc is missing.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    probe::find(Library::Nvrtc)?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: both out-pointers are valid for writes; the library was probed above.
    let status = unsafe { sys::nvrtcVersion(&mut major, &mut minor) };
    status.result().map_err(|e| CudaError::Compile {
        file: "(nvrtcVersion)".into(),
        arch: String::new(),
        status: format!("{e:?}"),
        log: String::new(),
    })?;
    Ok((major, minor))
}

/// Errors unless `arch` names a real architecture (`sm_` and digits), for which NVRTC emits a
/// CUBIN.
fn check_arch(arch: &str) -> Result<()> {
    let digits = arch.strip_prefix("sm_").unwrap_or("");
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Err(CudaError::shape(
            "compile",
            format!("architecture {arch:?} is not of the form sm_XY"),
        ));
    }
    Ok(())
}

/// An NVRTC program, destroyed on drop.
struct Program(sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the handle came from nvrtcCreateProgram and is destroyed once.
        unsafe {
            let _ = sys::nvrtcDestroyProgram(&mut self.0);
        }
    }
}

impl Program {
    /// The program's log (warnings or errors), possibly empty.
    fn log(&self) -> String {
        let mut size = 0usize;
        // SAFETY: valid program handle, `size` is writable, and the buffer has `size` bytes.
        unsafe {
            if sys::nvrtcGetProgramLogSize(self.0, &mut size).result().is_err() || size == 0 {
                return String::new();
            }
            let mut buf = vec![0 as c_char; size];
            if sys::nvrtcGetProgramLog(self.0, buf.as_mut_ptr())
                .result()
                .is_err()
            {
                return String::new();
            }
            CStr::from_ptr(buf.as_ptr())
                .to_string_lossy()
                .trim_end()
                .to_string()
        }
    }

    /// The compiled CUBIN.
    fn cubin(&self) -> std::result::Result<Vec<u8>, String> {
        let mut size = 0usize;
        // SAFETY: valid, compiled program; the buffer has `size` bytes.
        unsafe {
            sys::nvrtcGetCUBINSize(self.0, &mut size)
                .result()
                .map_err(|e| format!("{e:?}"))?;
            let mut buf = vec![0u8; size];
            sys::nvrtcGetCUBIN(self.0, buf.as_mut_ptr().cast())
                .result()
                .map_err(|e| format!("{e:?}"))?;
            Ok(buf)
        }
    }
}

/// A C string for NVRTC; kernel sources never hold NUL bytes, and one that did is reported as a
/// compile error for `file`.
fn c_string(file: &str, arch: &str, text: &str) -> Result<CString> {
    CString::new(text).map_err(|_| CudaError::Compile {
        file: file.into(),
        arch: arch.into(),
        status: "invalid source".into(),
        log: "the text contains a NUL byte".into(),
    })
}

/// Compiles `file` for `arch` (e.g. `sm_90`) with NVRTC and returns the CUBIN. Errors name the
/// file and carry NVRTC's log; a missing libnvrtc is a [`CudaError::LibraryMissing`].
pub fn compile(file: &KernelFile, arch: &str) -> Result<Vec<u8>> {
    check_arch(arch)?;
    probe::find(Library::Nvrtc)?;
    let fail = |status: String, log: String| CudaError::Compile {
        file: file.name.into(),
        arch: arch.into(),
        status,
        log,
    };
    let src = c_string(file.name, arch, file.source)?;
    let name = c_string(file.name, arch, file.name)?;
    let header = c_string(file.name, arch, COMMON_HEADER.source)?;
    let header_name = c_string(file.name, arch, COMMON_HEADER.name)?;
    let headers = [header.as_ptr()];
    let header_names = [header_name.as_ptr()];
    let mut raw = std::ptr::null_mut();
    // SAFETY: every pointer refers to a live NUL-terminated string; one header is passed.
    unsafe {
        sys::nvrtcCreateProgram(
            &mut raw,
            src.as_ptr(),
            name.as_ptr(),
            1,
            headers.as_ptr(),
            header_names.as_ptr(),
        )
    }
    .result()
    .map_err(|e| fail(format!("{e:?}"), "nvrtcCreateProgram failed".into()))?;
    let program = Program(raw);
    let opts: Vec<CString> = options(arch)
        .iter()
        .map(|o| c_string(file.name, arch, o))
        .collect::<Result<_>>()?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: the program is live and the option array holds `len` valid C strings.
    let status = unsafe { sys::nvrtcCompileProgram(program.0, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    if let Err(e) = status.result() {
        return Err(fail(format!("{e:?}"), program.log()));
    }
    program.cubin().map_err(|status| fail(status, program.log()))
}

/// A directory of compiled kernel images.
#[derive(Clone, Debug)]
pub struct KernelCache {
    dir: PathBuf,
}

/// FNV-1a over `parts` (each followed by a 0xff separator) with 128-bit state, as hex.
fn fnv128_hex(parts: &[&[u8]]) -> String {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    let mut h = OFFSET;
    for part in parts {
        for &b in part.iter().chain(std::iter::once(&0xffu8)) {
            h ^= u128::from(b);
            h = h.wrapping_mul(PRIME);
        }
    }
    format!("{h:032x}")
}

impl KernelCache {
    /// A cache in `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        KernelCache { dir: dir.into() }
    }

    /// The default cache: `$EMMA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/emma-rs/kernels`, else
    /// `~/.cache/emma-rs/kernels`; `None` when none of these can be formed.
    pub fn from_env() -> Option<Self> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        let dir = var("EMMA_KERNEL_CACHE")
            .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("emma-rs").join("kernels")))
            .or_else(|| var("HOME").map(|d| d.join(".cache").join("emma-rs").join("kernels")))?;
        Some(KernelCache::new(dir))
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds `file` compiled for `arch` by NVRTC `version`.
    pub fn path_for(&self, file: &KernelFile, arch: &str, version: (i32, i32)) -> PathBuf {
        let version = format!("{}.{}", version.0, version.1);
        let opts = options(arch).join(" ");
        let hash = fnv128_hex(&[
            COMMON_HEADER.source.as_bytes(),
            file.source.as_bytes(),
            arch.as_bytes(),
            version.as_bytes(),
            opts.as_bytes(),
        ]);
        let stem = file.name.trim_end_matches(".cu");
        self.dir.join(format!("{stem}-{arch}-{}.cubin", &hash[..24]))
    }

    /// The cached image at `path`, if there is a plausible one (an ELF file).
    pub fn load(&self, path: &Path) -> Option<Vec<u8>> {
        let bytes = std::fs::read(path).ok()?;
        bytes.starts_with(b"\x7fELF").then_some(bytes)
    }

    /// Writes `bytes` to `path` atomically: a temporary file in the same directory, synced,
    /// then renamed over `path`.
    pub fn store(&self, path: &Path, bytes: &[u8]) -> std::result::Result<(), CacheError> {
        let err = |p: &Path| {
            let p = p.to_path_buf();
            move |source| CacheError { path: p, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(err(&self.dir))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let tmp = path.with_extension(format!("tmp.{}.{nanos}", std::process::id()));
        let written = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(source) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(CacheError {
                path: path.to_path_buf(),
                source,
            });
        }
        Ok(())
    }
}

/// `file` compiled for `arch`, from `cache` when it holds the image, else compiled by NVRTC and
/// written to the cache. A cache that cannot be written costs only a recompile next time, so
/// write failures are not errors here.
pub fn compile_cached(file: &KernelFile, arch: &str, cache: Option<&KernelCache>) -> Result<Vec<u8>> {
    let Some(cache) = cache else {
        return compile(file, arch);
    };
    let path = cache.path_for(file, arch, nvrtc_version()?);
    if let Some(image) = cache.load(&path) {
        return Ok(image);
    }
    let image = compile(file, arch)?;
    let _ = cache.store(&path, &image);
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_keys_change_with_source_arch_and_version() {
        let cache = KernelCache::new("/tmp/x");
        let a = cache.path_for(&UNARY, "sm_90", (13, 0));
        assert_eq!(a, cache.path_for(&UNARY, "sm_90", (13, 0)));
        assert_ne!(a, cache.path_for(&UNARY, "sm_80", (13, 0)));
        assert_ne!(a, cache.path_for(&UNARY, "sm_90", (13, 1)));
        assert_ne!(a, cache.path_for(&BINARY, "sm_90", (13, 0)));
        let name = a.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("unary-sm_90-") && name.ends_with(".cubin"),
            "{name}"
        );
    }

    #[test]
    fn store_is_atomic_and_load_checks_the_magic() {
        let dir = tempfile::tempdir().unwrap();
        let cache = KernelCache::new(dir.path().join("k"));
        let path = cache.path_for(&ADAMW, "sm_90", (13, 0));
        assert!(cache.load(&path).is_none());
        cache.store(&path, b"\x7fELF fake image").unwrap();
        assert_eq!(cache.load(&path).unwrap(), b"\x7fELF fake image");
        let leftovers: Vec<_> = std::fs::read_dir(cache.dir()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary files left behind");
        cache.store(&path, b"not an image").unwrap();
        assert!(cache.load(&path).is_none());
    }

    #[test]
    fn every_source_is_embedded_and_names_are_unique() {
        let mut names: Vec<_> = ALL_KERNELS.iter().map(|k| k.name).collect();
        assert!(ALL_KERNELS.iter().all(|k| k.source.contains("common.cuh")));
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL_KERNELS.len());
        // Every .cu file on disk is embedded.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        for entry in std::fs::read_dir(dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            if name.ends_with(".cu") {
                assert!(names.contains(&name.as_str()), "{name} is not embedded");
            }
        }
    }

    #[test]
    fn bad_architectures_are_rejected() {
        assert!(check_arch("sm_90").is_ok());
        assert!(check_arch("sm_90a").is_ok());
        assert!(check_arch("compute_90").is_err());
        assert!(check_arch("sm_").is_err());
    }
}
