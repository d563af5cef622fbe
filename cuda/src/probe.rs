//! Finds the CUDA libraries before cudarc touches them: cudarc panics when a library it needs
//! cannot be loaded, so every entry point of this crate probes first and turns an absence into
//! a [`CudaError`] that names the library and the names given to the loader.
//!
//! The probe tries exactly the names cudarc itself tries ([`cudarc::get_lib_name_candidates`]),
//! so a library the probe finds is one cudarc will find. `EMMA_REQUIRE_GPU` is the callers'
//! business, not this module's.

use crate::error::{CudaError, Result};
use std::sync::OnceLock;

/// A dynamically loaded CUDA library.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    /// The driver, libcuda.
    Driver,
    /// The runtime compiler, libnvrtc.
    Nvrtc,
    /// cuBLAS.
    Cublas,
    /// cuBLASLt.
    CublasLt,
    /// NCCL, for the collectives of multi-process runs (not needed otherwise).
    Nccl,
}

impl Library {
    /// Every library, in the order the probe reports them.
    pub const ALL: [Library; 5] = [
        Library::Driver,
        Library::Nvrtc,
        Library::Cublas,
        Library::CublasLt,
        Library::Nccl,
    ];

    /// The library's usual name, e.g. `libnvrtc`.
    pub fn name(self) -> &'static str {
        match self {
            Library::Driver => "libcuda",
            Library::Nvrtc => "libnvrtc",
            Library::Cublas => "libcublas",
            Library::CublasLt => "libcublasLt",
            Library::Nccl => "libnccl",
        }
    }

    /// The stems cudarc loads the library by (see its `sys` modules).
    fn stems(self) -> &'static [&'static str] {
        match self {
            Library::Driver => &["cuda", "nvcuda"],
            Library::Nvrtc => &["nvrtc"],
            Library::Cublas => &["cublas"],
            Library::CublasLt => &["cublasLt"],
            Library::Nccl => &["nccl"],
        }
    }

    /// The file names given to the dynamic loader, in cudarc's order (without repeats).
    pub fn candidates(self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for name in self
            .stems()
            .iter()
            .flat_map(|stem| cudarc::get_lib_name_candidates(stem))
        {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }

    /// The slot caching this library's probe result.
    fn slot(self) -> &'static OnceLock<Probe> {
        static SLOTS: [OnceLock<Probe>; 5] = [
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
            OnceLock::new(),
        ];
        &SLOTS[self as usize]
    }
}

/// The outcome of one probe: the name that loaded, or the loader's last message.
#[derive(Clone, Debug)]
enum Probe {
    Found(String),
    Missing(String),
}

/// Tries each candidate name in turn.
fn run_probe(lib: Library) -> Probe {
    let mut reason = String::from("no candidate names");
    for name in lib.candidates() {
        // SAFETY: loading a CUDA library runs its initialisers, which is what cudarc will do
        // with the same name; the handle is closed again at once.
        match unsafe { libloading::Library::new(&name) } {
            Ok(_) => return Probe::Found(name),
            Err(e) => {
                // The loader's own words are in the source (e.g. "cannot open shared object").
                reason = match std::error::Error::source(&e) {
                    Some(source) => format!("{e}: {source}"),
                    None => e.to_string(),
                };
            }
        }
    }
    Probe::Missing(reason)
}

/// The file name under which `lib` loads, or the typed error naming what was tried. The result
/// is cached for the life of the process.
pub fn find(lib: Library) -> Result<String> {
    match lib.slot().get_or_init(|| run_probe(lib)) {
        Probe::Found(name) => Ok(name.clone()),
        Probe::Missing(reason) => {
            let tried = lib.candidates();
            let ld_path = std::env::var("LD_LIBRARY_PATH").unwrap_or_default();
            let reason = reason.clone();
            Err(match lib {
                Library::Driver => CudaError::NoDriver {
                    tried,
                    ld_path,
                    reason,
                },
                _ => CudaError::LibraryMissing {
                    library: lib.name(),
                    tried,
                    ld_path,
                    reason,
                },
            })
        }
    }
}

/// Errors unless every library in `libs` loads.
pub fn require(libs: &[Library]) -> Result<()> {
    libs.iter().try_for_each(|&lib| find(lib).map(drop))
}

#[cfg(test)]
mod tests {
    use super::{find, Library};
    use crate::CudaError;

    #[test]
    fn candidates_follow_cudarc() {
        let names = Library::Nvrtc.candidates();
        assert!(names.contains(&"libnvrtc.so".to_string()), "{names:?}");
        assert!(names.contains(&"libnvrtc.so.13".to_string()), "{names:?}");
        let driver = Library::Driver.candidates();
        assert!(driver.iter().any(|n| n.contains("nvcuda")), "{driver:?}");
    }

    #[test]
    fn a_missing_library_is_a_typed_error_naming_it() {
        // Whatever this machine has, the probe must answer without panicking, and a missing
        // library's error must name it and the names tried.
        for lib in Library::ALL {
            match find(lib) {
                Ok(name) => assert!(name.contains(&lib.name()[3..]), "{name}"),
                Err(CudaError::NoDriver { tried, .. }) => {
                    assert_eq!(lib, Library::Driver);
                    assert!(tried.iter().any(|t| t.contains("libcuda")));
                }
                Err(e @ CudaError::LibraryMissing { .. }) => {
                    assert!(e.to_string().contains(lib.name()), "{e}");
                }
                Err(e) => panic!("unexpected error {e}"),
            }
        }
    }
}
