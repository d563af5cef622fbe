//! Building the emulator with the host C++ compiler: its runtime (`emulator/runtime.cpp`) once,
//! and each kernel file (`kernels/*.cu`, unchanged) against `emulator/emulate.h`, instrumented
//! with `-fsanitize=thread` so that the runtime sees every load and store.
//!
//! A kernel file is preprocessed once to list its entry points (`__global__` functions, with
//! their `__launch_bounds__`), then compiled with one small trampoline per entry point appended
//! (`EMU_ENTRY` in emulate.h) that reads the parameters the way `cuLaunchKernel` takes them.
//! Libraries are cached on disk under a hash of the header, runtime, source, compiler version
//! and options; a write goes to a temporary file that is synced and renamed into place.

use crate::compile::{KernelCache, KernelFile, COMMON_HEADER};
use crate::error::{CudaError, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The header kernels are compiled against on the emulator.
pub(crate) const EMULATE_HEADER: &str = include_str!("../../emulator/emulate.h");
/// The runtime library's source.
pub(crate) const RUNTIME_SOURCE: &str = include_str!("../../emulator/runtime.cpp");

/// Options for kernel libraries: the instrumentation that reports every memory access to the
/// runtime, no exceptions, no strict aliasing (the kernels reinterpret 16-byte packs), and
/// hidden symbols without GNU "unique" binding, so that each library keeps its own copy of a
/// template's static shared memory (a unique symbol would bind every library to the first one
/// loaded).
const KERNEL_OPTIONS: &[&str] = &[
    "-std=c++17",
    "-O2",
    "-fPIC",
    "-fvisibility=hidden",
    "-fno-gnu-unique",
    "-fno-exceptions",
    "-fno-strict-aliasing",
    "-fsanitize=thread",
    "-Wno-unknown-pragmas",
    "-Wno-attributes",
];
/// Options for the runtime library.
const RUNTIME_OPTIONS: &[&str] = &["-std=c++17", "-O2", "-fPIC", "-fno-exceptions", "-shared"];

/// The host C++ compiler the emulator builds with.
#[derive(Clone, Debug)]
pub(crate) struct HostCompiler {
    program: String,
    version: String,
}

impl HostCompiler {
    /// `$CXX` if set, else the first of `c++`, `g++`, `clang++` that runs; a typed error naming
    /// what was tried otherwise.
    pub fn find() -> Result<Self> {
        let mut candidates: Vec<String> = Vec::new();
        if let Some(cxx) = std::env::var("CXX").ok().filter(|v| !v.trim().is_empty()) {
            candidates.push(cxx);
        }
        candidates.extend(["c++", "g++", "clang++"].map(String::from));
        Self::first_of(candidates)
    }

    /// The first of `candidates` whose `--version` runs.
    fn first_of(candidates: Vec<String>) -> Result<Self> {
        let mut tried = Vec::new();
        for program in candidates {
            match Command::new(&program).arg("--version").output() {
                Ok(out) if out.status.success() => {
                    let text = String::from_utf8_lossy(&out.stdout);
                    let version = text.lines().next().unwrap_or("").trim().to_string();
                    return Ok(HostCompiler { program, version });
                }
                Ok(out) => tried.push(format!("{program} (exit {})", out.status)),
                Err(e) => tried.push(format!("{program} ({e})")),
            }
        }
        Err(CudaError::NoHostCompiler { tried })
    }

    /// The first line of `--version`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Runs the compiler in `dir`; a failure is a compile error for `file` with its output.
    fn run(&self, file: &str, dir: &Path, args: &[&str]) -> Result<Vec<u8>> {
        let out = Command::new(&self.program)
            .args(args)
            .current_dir(dir)
            .output()
            .map_err(|e| compile_error(file, format!("could not run {}", self.program), e.to_string()))?;
        if !out.status.success() {
            let log = String::from_utf8_lossy(&out.stderr).trim_end().to_string();
            return Err(compile_error(
                file,
                format!("{} {}", self.program, out.status),
                log,
            ));
        }
        Ok(out.stdout)
    }
}

fn compile_error(file: &str, status: String, log: String) -> CudaError {
    CudaError::Compile {
        file: file.into(),
        arch: "the emulator".into(),
        status,
        log,
    }
}

/// Where emulator libraries are cached: `<kernel cache>/emulated`, else a folder in the
/// system's temporary directory.
pub(crate) fn cache_dir(cache: Option<&KernelCache>) -> PathBuf {
    match cache {
        Some(c) => c.dir().join("emulated"),
        None => std::env::temp_dir().join("emma-rs-emulated"),
    }
}

/// FNV-1a (64-bit) over the parts, as hex: the cache key.
fn key(parts: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.as_bytes().iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// A scratch folder inside `dir`, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(dir: &Path, stem: &str) -> Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = dir.join(format!(".build-{stem}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&path).map_err(|e| io_error(&path, e))?;
        Ok(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn io_error(path: &Path, e: std::io::Error) -> CudaError {
    compile_error(&path.display().to_string(), "I/O error".into(), e.to_string())
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| io_error(path, e))
}

/// Syncs `built` and renames it to `path`.
fn publish(built: &Path, path: &Path) -> Result<()> {
    let synced = std::fs::File::open(built).and_then(|f| f.sync_all());
    synced
        .and_then(|()| std::fs::rename(built, path))
        .map_err(|e| io_error(path, e))
}

/// The runtime library, built on first use.
pub(crate) fn runtime_library(cc: &HostCompiler, dir: &Path) -> Result<PathBuf> {
    let hash = key(&[RUNTIME_SOURCE, cc.version(), &RUNTIME_OPTIONS.join(" ")]);
    let path = dir.join(format!("emma-emu-runtime-{hash}.so"));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let scratch = Scratch::new(dir, "runtime")?;
    write(&scratch.0.join("runtime.cpp"), RUNTIME_SOURCE)?;
    let mut args = RUNTIME_OPTIONS.to_vec();
    args.extend(["runtime.cpp", "-o", "runtime.so"]);
    cc.run("runtime.cpp", &scratch.0, &args)?;
    publish(&scratch.0.join("runtime.so"), &path)?;
    Ok(path)
}

/// One kernel entry point found in a source: its name and `__launch_bounds__` expression.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct EntryPoint {
    /// The `extern "C"` name.
    pub name: String,
    /// The thread bound as a C++ expression (`0` for none).
    pub bound: String,
}

/// The entry points in preprocessed text (emulate.h's scan mode marks them).
pub(crate) fn entry_points(preprocessed: &str) -> Vec<EntryPoint> {
    let mut found = Vec::new();
    for piece in preprocessed.split("@@KERNEL@@").skip(1) {
        let Some(rest) = piece.trim_start().strip_prefix("void") else {
            continue;
        };
        let mut rest = rest.trim_start();
        let mut bound = "0".to_string();
        if let Some(b) = rest.strip_prefix("@@BOUNDS(") {
            let Some(end) = b.find(")@@") else { continue };
            bound = format!("({})", &b[..end]);
            rest = b[end + 3..].trim_start();
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.push(EntryPoint { name, bound });
        }
    }
    found
}

/// The library of kernel file `file`, built on first use.
pub(crate) fn kernel_library(cc: &HostCompiler, dir: &Path, file: &KernelFile) -> Result<PathBuf> {
    let hash = key(&[
        EMULATE_HEADER,
        RUNTIME_SOURCE,
        COMMON_HEADER.source,
        file.source,
        cc.version(),
        &KERNEL_OPTIONS.join(" "),
    ]);
    let stem = file.name.trim_end_matches(".cu");
    let path = dir.join(format!("{stem}-emu-{hash}.so"));
    if path.is_file() {
        return Ok(path);
    }
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))?;
    let scratch = Scratch::new(dir, stem)?;
    let work = &scratch.0;
    write(&work.join("emulate.h"), EMULATE_HEADER)?;
    write(&work.join(COMMON_HEADER.name), COMMON_HEADER.source)?;
    write(&work.join(file.name), file.source)?;
    let scan = cc.run(
        file.name,
        work,
        &[
            "-std=c++17",
            "-E",
            "-DEMMA_EMU_SCAN",
            "-include",
            "emulate.h",
            "-x",
            "c++",
            file.name,
        ],
    )?;
    let entries = entry_points(&String::from_utf8_lossy(&scan));
    let mut unit = format!("#include \"{}\"\n", file.name);
    for e in &entries {
        unit.push_str(&format!("EMU_ENTRY({}, {})\n", e.name, e.bound));
    }
    write(&work.join("unit.cpp"), &unit)?;
    let mut args = KERNEL_OPTIONS.to_vec();
    args.extend(["-include", "emulate.h", "-c", "unit.cpp", "-o", "unit.o"]);
    cc.run(file.name, work, &args)?;
    cc.run(file.name, work, &["-shared", "unit.o", "-o", "unit.so"])?;
    publish(&work.join("unit.so"), &path)?;
    let _ = std::fs::File::open(dir).and_then(|d| d.sync_all());
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_and_bounds_are_found() {
        let text = "int x; extern \"C\" @@KERNEL@@ void add_f32(const float *a) {}\n\
                    extern \"C\" @@KERNEL@@ void @@BOUNDS(4 * 32)@@ scan_f32 (int n) {}";
        let found = entry_points(text);
        assert_eq!(
            found,
            vec![
                EntryPoint {
                    name: "add_f32".into(),
                    bound: "0".into()
                },
                EntryPoint {
                    name: "scan_f32".into(),
                    bound: "(4 * 32)".into()
                },
            ]
        );
    }

    #[test]
    fn no_compiler_is_an_error_naming_each_one_tried() {
        let err = HostCompiler::first_of(vec!["/nonexistent/c++".into(), "false".into()]).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, CudaError::NoHostCompiler { .. }), "{msg}");
        assert!(
            msg.contains("/nonexistent/c++ (") && msg.contains("false (exit"),
            "{msg}"
        );
        assert!(msg.contains("install g++ or set CXX"), "{msg}");
    }

    #[test]
    fn keys_change_with_every_part() {
        assert_ne!(key(&["a", "b"]), key(&["ab", ""]));
        assert_ne!(key(&["a"]), key(&["b"]));
    }
}
